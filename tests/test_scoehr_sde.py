"""ScoEHR's VP-SDE against closed forms, on Gaussians where every score is known: the forward
marginals, the DSM loss at the true score, and each sampler driven by the analytic score
recovering the Gaussian it started from. Also the code-vector view's collate and its rows."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch
import torchsde

from mirror.config import ConfigError, build_config
from mirror.data import schema
from mirror.data.views.code_vector import (
    CodeVectorInfo,
    CodeVectorViewConfig,
    code_rows,
    code_vectors,
    n_features,
)
from mirror.models.scoehr import (
    LATENT_SCALE_FLOOR,
    ScoEHRAEConfig,
    ScoEHRAutoencoder,
    ScoEHRScoreConfig,
    ScoEHRScoreModel,
    grid_side,
)
from mirror.models.vpsde import SAMPLERS, VPSDE, dsm_loss, sample, stratified_times

SDE = VPSDE()
MU, S0 = 0.5, 0.3  # z_0 ~ N(MU, S0² I)


def gaussian_score(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """True score of z_t when z_0 ~ N(MU, S0² I): -(z - m MU) / (m² S0² + σ²)."""
    m, sigma = SDE.mean_coeff(t)[:, None], SDE.std(t)[:, None]
    return -(z - m * MU) / (m**2 * S0**2 + sigma**2)


def analytic(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return gaussian_score(t, z)


class ForwardSDE(torch.nn.Module):
    noise_type, sde_type = "diagonal", "ito"

    def f(self, t, z):
        return -0.5 * SDE.beta(t) * z

    def g(self, t, z):
        return torch.sqrt(SDE.beta(t)).expand_as(z)


def test_forward_sde_marginals_match_the_closed_form():
    torch.manual_seed(0)
    z0 = torch.full((20_000, 1), 1.5)
    ts = torch.tensor([0.0, 0.1, 0.5, 1.0])
    path = torchsde.sdeint(ForwardSDE(), z0, ts, method="euler", dt=1e-3)  # (4, N, 1)
    for k, t in enumerate(ts[1:], 1):
        mean, var = path[k].mean().item(), path[k].var().item()
        m, sigma = SDE.mean_coeff(t).item(), SDE.std(t).item()
        assert mean == pytest.approx(1.5 * m, abs=4 * sigma / np.sqrt(20_000) + 2e-3), float(t)
        assert var == pytest.approx(sigma**2, rel=0.04), float(t)
    assert SDE.mean_coeff(torch.tensor(1.0)).item() == pytest.approx(0.0066, abs=2e-4)  # models.md


def test_dsm_loss_at_the_true_score_is_its_closed_form_minimum():
    """E‖σ s* + ε‖² per dimension is m²S0² / (m²S0² + σ²) at the true score s*."""
    d, b = 4, 50_000
    g = torch.Generator().manual_seed(1)
    z0 = MU + S0 * torch.randn(b, d, generator=g)
    loss = dsm_loss(analytic, z0, SDE, torch.Generator().manual_seed(2)).item()
    t = stratified_times(b, SDE, torch.Generator().manual_seed(2))
    m2, var = SDE.mean_coeff(t) ** 2, SDE.std(t) ** 2
    expected = d * (m2 * S0**2 / (m2 * S0**2 + var)).mean().item()
    assert loss == pytest.approx(expected, rel=0.03)
    for scale in (0.8, 1.2):  # any other score does worse
        worse = dsm_loss(lambda z, t, k=scale: k * analytic(z, t), z0, SDE, torch.Generator().manual_seed(2)).item()
        assert worse > loss * 1.005


def test_stratified_times_cover_the_interval_once_per_stratum():
    t = stratified_times(256, SDE, torch.Generator().manual_seed(0))
    assert t.min() >= SDE.t_eps and t.max() <= SDE.T
    counts = np.histogram(t.numpy(), bins=8, range=(0, 1))[0]
    assert counts.min() >= 28 and counts.max() <= 36  # 32 per eighth, give or take the jitter


@pytest.mark.parametrize(("sampler", "steps"), [
    ("em", 300), ("heun", 40), ("dpm2m", 25), ("ancestral", 400), ("dpm2m_sde", 60), ("pc", 100),
])
def test_sampling_with_the_analytic_score_recovers_the_gaussian(sampler, steps):
    g = torch.Generator().manual_seed(3)
    z_T = torch.randn(4000, 4, generator=g)
    z = sample(sampler, analytic, SDE, z_T, steps, g)
    assert z.mean().item() == pytest.approx(MU, abs=0.02)
    assert z.std().item() == pytest.approx(S0, rel=0.06)


def test_samplers_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match="unknown 'rk4'"):
        sample("rk4", analytic, SDE, torch.zeros(2, 2), 5)
    with pytest.raises(ValueError, match="steps: expected >= 1"):
        sample("dpm2m", analytic, SDE, torch.zeros(2, 2), 0)
    assert set(SAMPLERS) == {"em", "heun", "dpm2m", "ancestral", "dpm2m_sde", "pc"}


# ---------------------------------------------------------------------------------------------
# The view and the models, without Ray.


def _table() -> pa.Table:
    rows = {
        schema.SUBJECT_ID: [1, 2, 3],
        schema.SEX: [1, -1, 1],
        schema.CONDITIONS: [[4, 4, 600], [], [0]],
        schema.AGE_GROUPS: [[2, 3, 23], [], [0]],
        schema.PROCEDURES: [[1], [0, 0], []],
        schema.MEDICATIONS: [[], [2], []],
    }
    return pa.table(rows)


def test_code_vectors_count_or_flag_each_feature_space():
    table = _table()
    binary = code_vectors(table, "conditions", "binary")
    assert binary.shape == (3, 605) and binary.sum() == 3 and binary[0, 4] == 1 and binary[0, 600] == 1
    counts = code_vectors(table, "conditions", "counts")
    assert counts[0, 4] == 2 and counts[1].sum() == 0
    ages = code_vectors(table, "condition_age", "binary")
    assert ages.shape == (3, 605 * 24) and ages[0, 4 * 24 + 2] == 1 and ages[0, 4 * 24 + 3] == 1
    record = code_vectors(table, "record_codes", "counts")
    assert record.shape == (3, n_features("record_codes"))
    assert record[1, 605 + 0] == 2 and record[0, 605 + 1] == 1
    assert record[1].sum() == 3  # two procedures and one drug class


@pytest.mark.parametrize("features", ["conditions", "condition_age", "record_codes"])
def test_code_rows_round_trip_to_the_same_vectors(features):
    rng = np.random.default_rng(0)
    x = (rng.random((20, n_features(features))) < 0.01).astype(np.float32)
    info = CodeVectorInfo(n_features=x.shape[1], features=features)
    rows = code_rows(x, info, first_id=schema.SYNTHETIC_ID_OFFSET, sex=np.ones(20))
    assert rows.schema == schema.ROW_SCHEMA
    assert np.array_equal(code_vectors(rows, features, "binary"), x)
    assert rows.column(schema.N_EVENTS).to_pylist() == [len(c) for c in rows.column(schema.CONDITIONS).to_pylist()]


def test_view_and_model_configs_refuse_bad_values_by_name():
    with pytest.raises(ConfigError, match="CodeVectorViewConfig.features: expected one of"):
        build_config(CodeVectorViewConfig, {"features": "icd"})
    with pytest.raises(ConfigError, match="ScoEHRScoreConfig.groups: expected a divisor of ch"):
        build_config(ScoEHRScoreConfig, {"ch": 12, "groups": 8})
    with pytest.raises(ConfigError, match="ScoEHRScoreConfig.net: expected one of"):
        build_config(ScoEHRScoreConfig, {"net": "transformer"})
    with pytest.raises(ValueError, match="latent width 100 needs to be a square whose side is divisible by"):
        grid_side(100, 3, pad=False)
    assert grid_side(144, 3, pad=False) == 12 and grid_side(605, 3, pad=True) == 28


def test_the_score_model_trains_on_frozen_latents_and_decodes_code_vectors():
    torch.manual_seed(0)
    info = CodeVectorInfo()
    ae = ScoEHRAutoencoder(ScoEHRAEConfig(latent_dim=16), info)
    for p in ae.parameters():
        p.requires_grad_(False)
    cfg = ScoEHRScoreConfig(net="unet", ch=8, groups=4, levels=2, res_blocks=1, sample_steps=3)
    model = ScoEHRScoreModel(cfg, info, ae)
    x = (torch.rand(8, 605) < 0.02).float()
    z0 = model.to_diffusion_space(x)
    assert z0.shape == (8, 16) and z0.abs().max() <= 1
    loss = dsm_loss(model.score_fn(model.score_net), z0, model.sde, torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is None for p in ae.parameters())  # stage 1 stays frozen
    for sampler in SAMPLERS:
        out, empty = model.sample_vectors(5, generator=torch.Generator().manual_seed(1), sampler=sampler)
        assert out.shape == (5, 605) and set(out.unique().tolist()) <= {0.0, 1.0}
        assert empty.shape == (5,) and (out.sum(1) >= 1).all()  # "top1": never an empty record
    ablation = ScoEHRScoreModel(ScoEHRScoreConfig(net="unet", ch=8, groups=4, levels=2, res_blocks=1, autoencoder=False), info, ae)
    assert ablation.width == 26 * 26 and ablation.to_diffusion_space(x).shape == (8, 676)


def test_the_mlp_score_net_diffuses_the_flat_latent_and_learns_a_gaussian_score():
    """``net = "mlp"``: no square padding (latent or code vector as is), a zero score at
    initialisation (zero-initialised output), and training moves its DSM loss from the zero
    score's d towards the closed-form minimum of a known Gaussian."""
    torch.manual_seed(0)
    info = CodeVectorInfo()
    ae = ScoEHRAutoencoder(ScoEHRAEConfig(latent_dim=4), info)
    cfg = ScoEHRScoreConfig(net="mlp", mlp_width=32, mlp_blocks=1, time_scale=1000.0)
    model = ScoEHRScoreModel(cfg, info, ae)
    assert model.width == 4
    assert ScoEHRScoreModel(ScoEHRScoreConfig(net="mlp", autoencoder=False), info, ae).width == 605
    score = model.score_fn(model.score_net)
    z0 = MU + S0 * torch.randn(4096, 4, generator=torch.Generator().manual_seed(1))
    assert score(z0[:8], torch.full((8,), 0.5)).abs().max() == 0

    def held_loss() -> float:
        with torch.no_grad():
            return dsm_loss(score, z0[-1024:], SDE, torch.Generator().manual_seed(2)).item()

    t = stratified_times(1024, SDE, torch.Generator().manual_seed(2))
    m2, var = SDE.mean_coeff(t) ** 2, SDE.std(t) ** 2
    minimum = 4 * (m2 * S0**2 / (m2 * S0**2 + var)).mean().item()
    before = held_loss()
    opt = torch.optim.Adam(model.score_net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(3)
    for _ in range(100):
        batch = z0[torch.randint(0, 3072, (128,), generator=g)]
        loss = dsm_loss(score, batch, SDE, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_loss()
    assert before == pytest.approx(4, rel=0.05)  # the zero score: E‖ε‖² = d
    assert after < minimum + 0.1 * (before - minimum), (before, after, minimum)
    x, empty = model.sample_vectors(5, generator=torch.Generator().manual_seed(4))
    assert x.shape == (5, 605) and (x.sum(1) >= 1).all()


def test_both_stages_take_loop_steps_with_one_schedule_step_each():
    from mirror.data.views.code_vector import CodeVectorBatch
    from mirror.models.local_step import LocalStepContext
    from mirror.train.schedule import lr_lambda, make_schedulers

    torch.manual_seed(0)
    info = CodeVectorInfo()
    ae = ScoEHRAutoencoder(ScoEHRAEConfig(latent_dim=16), info)
    score = ScoEHRScoreModel(ScoEHRScoreConfig(net="unet", ch=8, groups=4, levels=2, res_blocks=1), info, ae)
    batch = CodeVectorBatch(torch.arange(16), (torch.rand(16, 605) < 0.05).float())
    for model in (ae, score):
        optimizers = model.make_optimizers()
        schedulers = make_schedulers(optimizers, 10, 0.2, 0.1)
        ctx = LocalStepContext(model, optimizers, grad_clip=1.0, schedulers=schedulers)
        losses = [ctx.train_step(batch)["loss"] for _ in range(4)]
        assert all(np.isfinite(losses)) and ctx.global_step == 4
        (name, opt), = optimizers.items()
        assert opt.param_groups[0]["lr"] == pytest.approx(model.config.lr * lr_lambda(10, 0.2, 0.1)(4))
    assert losses[-1] < losses[0] * 1.5  # the score net's loss is finite and not blowing up


def test_empty_decodes_get_their_likeliest_code_or_are_rejected_and_are_counted():
    """A latent whose every decoded probability is below 1/2: "top1" gives its single most
    probable code (the MAP non-empty vector of independent Bernoullis), "reject" leaves it
    empty; both report it in the mask that sample_rows counts."""
    info = CodeVectorInfo()
    ae = ScoEHRAutoencoder(ScoEHRAEConfig(latent_dim=16), info)
    with torch.no_grad():
        ae.autoencoder.dec.weight.zero_()
        ae.autoencoder.dec.bias.fill_(-3.0)
        ae.autoencoder.dec.bias[7] = -1.0  # the likeliest code, still below 1/2
        ae.autoencoder.dec.weight[9, 0] = 10.0  # code 9 fires when z_0 > 0.3
    z = torch.zeros(3, 16)
    z[2, 0] = 1.0
    small = dict(net="unet", ch=8, groups=4, levels=2, res_blocks=1)
    top1 = ScoEHRScoreModel(ScoEHRScoreConfig(**small, decode="threshold"), info, ae)
    x, empty = top1.from_diffusion_space(z)
    assert empty.tolist() == [True, True, False]
    assert x[:2].sum(1).tolist() == [1.0, 1.0] and x[:2, 7].tolist() == [1.0, 1.0]
    assert x[2].nonzero().flatten().tolist() == [9]  # a non-empty decode is untouched
    reject = ScoEHRScoreModel(ScoEHRScoreConfig(**small, decode="threshold", empty_decode="reject"), info, ae)
    x, empty = reject.from_diffusion_space(z)
    assert empty.tolist() == [True, True, False] and x.sum(1).tolist() == [0.0, 0.0, 1.0]


def test_bernoulli_decode_draws_each_code_at_its_decoded_probability():
    """``decode = "bernoulli"`` (the default) draws code j with the decoder's p_j (threshold
    keeps only p_j > 1/2), reproducibly from the generator; without an autoencoder (the
    ablation) p is (z + 1) / 2, the inverse of the code vector's 2x - 1 scaling."""
    info = CodeVectorInfo()
    ae = ScoEHRAutoencoder(ScoEHRAEConfig(latent_dim=16), info)
    with torch.no_grad():
        ae.autoencoder.dec.weight.zero_()
        ae.autoencoder.dec.bias.fill_(-20.0)
        ae.autoencoder.dec.bias[3] = math.log(0.3 / 0.7)  # p = 0.3: never kept by the threshold
        ae.autoencoder.dec.bias[5] = math.log(0.8 / 0.2)  # p = 0.8
    small = dict(net="unet", ch=8, groups=4, levels=2, res_blocks=1)
    z = torch.zeros(20_000, 16)
    threshold = ScoEHRScoreModel(ScoEHRScoreConfig(**small, decode="threshold"), info, ae)
    x, _ = threshold.from_diffusion_space(z)
    assert x.sum(0).nonzero().flatten().tolist() == [5] and bool((x[:, 5] == 1).all())
    bernoulli = ScoEHRScoreModel(ScoEHRScoreConfig(**small, decode="bernoulli"), info, ae)
    x, empty = bernoulli.from_diffusion_space(z, torch.Generator().manual_seed(0))
    # empty draws (no code: 0.7 x 0.2 = 0.14) get their likeliest code, as under threshold,
    # so code 5 shows at 0.8 + 0.14
    assert abs(float(empty.float().mean()) - 0.14) < 0.015 and bool((x[empty, 5] == 1).all())
    rates = x.mean(0)
    assert abs(float(rates[3]) - 0.3) < 0.015 and abs(float(rates[5]) - 0.94) < 0.015
    assert float(x.sum(0)[[i for i in range(x.shape[1]) if i not in (3, 5)]].sum()) == 0
    again, _ = bernoulli.from_diffusion_space(z, torch.Generator().manual_seed(0))
    assert torch.equal(x, again)
    assert ScoEHRScoreConfig().decode == "bernoulli"
    ablation = ScoEHRScoreModel(ScoEHRScoreConfig(**small, autoencoder=False, empty_decode="reject"), info, ae)
    z = torch.full((20_000, ablation.width), -1.0)
    z[:, 3] = 0.6  # p = 0.8
    x, _ = ablation.from_diffusion_space(z, torch.Generator().manual_seed(0))
    assert abs(float(x[:, 3].mean()) - 0.8) < 0.015 and float(x.sum()) == float(x[:, 3].sum())


def test_latent_noise_trains_a_decoder_that_answers_for_a_neighbourhood_of_each_latent():
    """``latent_noise`` perturbs z in training only: evaluation decodes the clean latent, and
    a decoder trained with it reconstructs perturbed latents with fewer wrong bits than one
    trained without (what stage 2's near-miss samples need)."""
    from mirror.data.views.code_vector import CodeVectorBatch
    from mirror.models.local_step import LocalStepContext

    info = CodeVectorInfo()
    x = (torch.rand(64, 605, generator=torch.Generator().manual_seed(0)) < 0.01).float()
    x[torch.arange(64), torch.arange(64) * 7] = 1.0  # every patient holds a code
    batch = CodeVectorBatch(torch.arange(64), x)
    perturb = 0.3 * torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    wrong_bits = {}
    for sigma in (0.0, 0.3):
        torch.manual_seed(0)
        ae = ScoEHRAutoencoder(ScoEHRAEConfig(latent_dim=16, latent_noise=sigma), info)
        ctx = LocalStepContext(ae, ae.make_optimizers(), grad_clip=1.0)
        for _ in range(400):
            ctx.train_step(batch)
        with torch.no_grad():
            z = ae.encode(batch)
            assert float(ae.eval_sums(batch)["bit_errors"]) == float((ae.decode(z) != x).sum())  # clean in eval
            wrong_bits[sigma] = float((ae.decode(z + perturb) != x).sum())
    assert wrong_bits[0.3] < 0.8 * wrong_bits[0.0], wrong_bits
    with pytest.raises(ConfigError, match="ScoEHRAEConfig.latent_noise: expected a float >= 0"):
        build_config(ScoEHRAEConfig, {"latent_noise": -0.1})


def test_a_run_saved_before_decode_and_net_existed_keeps_the_unet_and_thresholding():
    """A checkpoint's model config without ``decode`` or ``net`` (saved before the options)
    reads back as ``"threshold"`` and ``"unet"``, what it did then, not today's defaults; a
    sample-time override still changes the decode, and a new run's spec records the defaults."""
    from mirror.models import get_model_spec
    from mirror.train.spec import RunSpec, build_run_spec, sample_time_overrides

    spec = get_model_spec("scoehr_score")
    new = build_run_spec(spec, "/data", "r", {}, upstream_run="up")
    assert new.model_config["decode"] == "bernoulli" and new.model_config["net"] == "mlp"
    old = new.to_dict()
    del old["model_config"]["decode"], old["model_config"]["net"]
    read_back = RunSpec.from_dict(old, spec).model_config
    assert read_back["decode"] == "threshold" and read_back["net"] == "unet"
    assert sample_time_overrides(spec, {}, old["model_config"])["decode"] == "threshold"
    assert sample_time_overrides(spec, {"model.decode": "bernoulli"}, old["model_config"])["decode"] == "bernoulli"


def test_latent_norm_standardises_each_dimension_once_and_decodes_back():
    """``latent_norm``: the first batch sets each dimension's mean and SD (floored), later
    batches reuse them, decoding undoes them, and they travel in the state dict; a run saved
    before the option diffuses the raw latent."""
    torch.manual_seed(0)
    info = CodeVectorInfo()
    ae = ScoEHRAutoencoder(ScoEHRAEConfig(latent_dim=16), info)
    with torch.no_grad():
        ae.autoencoder.enc.weight[3].zero_()
        ae.autoencoder.enc.bias[3] = 3.0  # a saturated, constant dimension: tanh(3)
    cfg = ScoEHRScoreConfig(latent_norm=True, mlp_width=16, mlp_blocks=1, decode="threshold")
    model = ScoEHRScoreModel(cfg, info, ae)
    x = (torch.rand(512, 605) < 0.05).float()
    z = model.to_diffusion_space(x)
    raw = ae.autoencoder.encode(x)
    live = [j for j in range(16) if j != 3]
    assert torch.allclose(z[:, live].mean(0), torch.zeros(15), atol=1e-4)
    assert torch.allclose(z[:, live].std(0, unbiased=False), torch.ones(15), atol=1e-3)
    assert math.isclose(float(model.latent_scale[3]), LATENT_SCALE_FLOOR, rel_tol=1e-6) and z[:, 3].abs().max() < 1e-3
    other = model.to_diffusion_space(x[:100] * 0)  # a second batch does not move the statistics
    assert torch.allclose(other, (ae.autoencoder.encode(x[:100] * 0) - model.latent_mean) / model.latent_scale)
    decoded, _ = model.from_diffusion_space(z)
    assert torch.equal(decoded, (ae.autoencoder.decode_logits(raw) > 0).float())
    fresh = ScoEHRScoreModel(cfg, info, ae)
    fresh.load_state_dict(model.state_dict())
    assert bool(fresh.latent_norm_set) and torch.equal(fresh.latent_scale, model.latent_scale)
    assert ScoEHRScoreConfig.SAVED_BEFORE["latent_norm"] is False
    assert "latent_mean" not in ScoEHRScoreModel(ScoEHRScoreConfig(mlp_width=16, mlp_blocks=1), info, ae).state_dict()


def _latent_norm_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    info = CodeVectorInfo()
    ae = ScoEHRAutoencoder(ScoEHRAEConfig(latent_dim=16), info)
    model = ScoEHRScoreModel(ScoEHRScoreConfig(latent_norm=True, mlp_width=16, mlp_blocks=1), info, ae)
    x = (torch.rand(2, 300, 605) < 0.05).float()  # the same draw on both ranks; each takes its half
    x[1, :, :50] = 1.0  # the second rank's patients differ
    model.to_diffusion_space(x[rank])
    torch.save({"mean": model.latent_mean, "scale": model.latent_scale,
                "pooled": ae.autoencoder.encode(x.reshape(600, 605))}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_latent_norm_statistics_pool_every_ranks_batch(tmp_path):
    """Under DDP the first batch's statistics are all-reduced: both ranks hold the mean and SD
    of the two batches together (a rank-local SD would desynchronise the diffusion spaces)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_latent_norm_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    pooled = ranks[0]["pooled"]
    for got in ranks:
        assert torch.allclose(got["mean"], pooled.mean(0), atol=1e-5)
        assert torch.allclose(got["scale"], pooled.std(0, unbiased=False).clamp_min(LATENT_SCALE_FLOOR), atol=1e-5)


def test_ema_averages_every_optimizer_step_and_is_what_validates_and_samples():
    """``ema_decay``: after each loop step the averaged weights move (1 - decay) of the way to
    the online ones (the first step copies them); validation reports both nets' loss, the EMA's
    as ``loss``; sampling uses the EMA unless ``sample_online``; the average travels in the state
    dict, and a run saved before the option has none."""
    from mirror.data.views.code_vector import CodeVectorBatch
    from mirror.models.local_step import LocalStepContext
    from mirror.train.schedule import make_schedulers

    torch.manual_seed(0)
    info = CodeVectorInfo()
    ae = ScoEHRAutoencoder(ScoEHRAEConfig(latent_dim=16), info)
    decay = 0.9
    model = ScoEHRScoreModel(ScoEHRScoreConfig(mlp_width=16, mlp_blocks=1, ema_decay=decay, lr=1e-2), info, ae)
    assert all(not p.requires_grad for p in model.score_ema.parameters())
    optimizers = model.make_optimizers()
    assert len(optimizers["score"].param_groups[0]["params"]) == len(list(model.score_net.parameters()))
    ctx = LocalStepContext(model, optimizers, grad_clip=1.0, schedulers=make_schedulers(optimizers, 10, 0.0, 1.0))
    batch = CodeVectorBatch(torch.arange(64), (torch.rand(64, 605) < 0.05).float())
    expected = None
    for _ in range(4):
        ctx.train_step(batch)
        online = [p.detach().clone() for p in model.score_net.parameters()]
        expected = online if expected is None else [decay * e + (1 - decay) * o for e, o in zip(expected, online, strict=True)]
    averaged = list(model.score_ema.module.parameters())
    assert all(torch.allclose(got, want, atol=1e-6) for got, want in zip(averaged, expected, strict=True))
    assert any(not torch.allclose(got, now) for got, now in zip(averaged, online, strict=True))

    sums = model.eval_sums(batch)
    assert set(sums) == {"loss", "loss_online"} and sums["loss"].item() != sums["loss_online"].item()
    assert model.sampling_net is model.score_ema.module
    fresh = ScoEHRScoreModel(model.config, info, ae)
    fresh.load_state_dict(model.state_dict())
    assert torch.allclose(fresh.eval_sums(batch)["loss"], sums["loss"])
    one = fresh.sample_vectors(4, generator=torch.Generator().manual_seed(1))[0]
    assert torch.equal(one, model.sample_vectors(4, generator=torch.Generator().manual_seed(1))[0])
    online_model = ScoEHRScoreModel(replace(model.config, sample_online=True), info, ae)
    online_model.load_state_dict(model.state_dict())
    assert online_model.sampling_net is online_model.score_net
    assert torch.allclose(online_model.eval_sums(batch)["loss"], sums["loss_online"])
    assert ScoEHRScoreConfig.SAVED_BEFORE["ema_decay"] == 0.0
    plain = ScoEHRScoreModel(ScoEHRScoreConfig(mlp_width=16, mlp_blocks=1), info, ae)
    assert plain.score_ema is None and not any(k.startswith("score_ema") for k in plain.state_dict())
    assert set(plain.eval_sums(batch)) == {"loss"}
    with pytest.raises(ConfigError, match="ema_decay"):
        build_config(ScoEHRScoreConfig, {"ema_decay": 1.0})
