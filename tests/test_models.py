"""Model 0 (conditional GRU autoencoder) and Model 1 (WAE): registry, config loading, shapes,
training on a tiny hand-built batch, and the sequence-handling contracts (lengths, not PAD)."""

from __future__ import annotations

import doctest
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import mirror.config as config_module
from mirror.config import build_config, config_to_flat_dict
from mirror.data.batch import SequenceBatch, SequenceInfo
from mirror.data.views.sequence import SequenceView
from mirror.data.vocab import EOS, N_SPECIAL, PAD, SOS
from mirror.models import MODELS, ConfigError, build_model, get_model_spec, make_config
from mirror.models.ae import AEConfig, ConditionalAutoencoder
from mirror.models.base import CAPABILITIES, TrainableModel
from mirror.models.local_step import LocalStepContext
from mirror.models.wae import WAEConfig, WassersteinAutoencoder

N_WEEKS = 40
INFO = SequenceInfo(week_vocab_size=N_SPECIAL + N_WEEKS)
TINY = {
    "dx_emb_dim": 16,
    "wk_emb_dim": 8,
    "n_heads": 2,
    "head_hidden": 32,
    "latent_dim": 16,
    "out_hidden": 32,
    "lr": 1e-2,
}
# Fast critic schedule for tests (the WGAN reference warm-up is 25 x 100 critic steps).
TINY_WAE = TINY | {"n_critic": 2, "n_critic_warmup": 3, "critic_warmup_steps": 2}

# Sentences of (diagnosis-age id, week id) words.
SENTENCES = [
    [(3 + 24 * 10 + 5, 4), (3 + 24 * 200 + 6, 9), (3 + 24 * 33 + 6, 12), (3 + 24 * 7 + 7, 30)],
    [(3 + 24 * 400 + 1, 3)],
    [(3 + 24 * 5 + 12, 20), (3 + 24 * 5 + 12, 21)],
    [(3 + 24 * 600 + 23, 5), (3 + 24 * 90 + 23, 6), (3 + 24 * 91 + 23, 7)],
]
SEXES = [-1.0, 1.0, 1.0, -1.0]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core box spinning
    OpenMP threads slow these tests down many times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_batch(
    sentences: list[list[tuple[int, int]]],
    sexes: list[float],
    steps: int | None = None,
    masked_words: dict[int, list[int]] | None = None,
) -> SequenceBatch:
    """A SequenceBatch laid out as the collate contract says, padded to ``steps`` columns;
    ``masked_words[b]`` lists the (forward) word indices replaced by <PAD> in the encoder."""
    b, longest = len(sentences), max(len(s) for s in sentences)
    t = steps or longest + 1
    cols = {
        k: torch.full((b, t), PAD, dtype=torch.long) for k in ("ed", "ew", "dd", "dw", "td", "tw")
    }
    masked = torch.zeros(b, t - 1, dtype=torch.bool)
    for row, sentence in enumerate(sentences):
        n = len(sentence)
        dx = torch.tensor([d for d, _ in sentence])
        wk = torch.tensor([w for _, w in sentence])
        cols["ed"][row, : n + 1] = torch.cat([torch.tensor([EOS]), dx.flip(0)])
        cols["ew"][row, : n + 1] = torch.cat([torch.tensor([EOS]), wk.flip(0)])
        cols["dd"][row, : n + 1] = torch.cat([torch.tensor([SOS]), dx])
        cols["dw"][row, : n + 1] = torch.cat([torch.tensor([SOS]), wk])
        cols["td"][row, : n + 1] = torch.cat([dx, torch.tensor([EOS])])
        cols["tw"][row, : n + 1] = torch.cat([wk, torch.tensor([EOS])])
        for i in (masked_words or {}).get(row, []):
            cols["ed"][row, n - i] = PAD
            masked[row, i] = True
    return SequenceBatch(
        subject_id=torch.arange(b),
        sex=torch.tensor(sexes, dtype=torch.float32),
        lengths=torch.tensor([len(s) for s in sentences]),
        enc_dx=cols["ed"],
        enc_wk=cols["ew"],
        dec_dx=cols["dd"],
        dec_wk=cols["dw"],
        tgt_dx=cols["td"],
        tgt_wk=cols["tw"],
        masked=masked,
    )


def tiny_model(name: str, **overrides: object) -> TrainableModel:
    torch.manual_seed(0)
    base = TINY_WAE if name == "wae" else TINY
    return build_model(name, base | overrides, INFO)


def train(model: TrainableModel, batch: SequenceBatch, steps: int) -> list[dict[str, float]]:
    ctx = LocalStepContext(model, model.make_optimizers(), grad_clip=1.0)
    return [ctx.train_step(batch) for _ in range(steps)]


# ---------------------------------------------------------------------------------------------
# Registry and config loading.


def test_registry_lists_valid_names_for_unknown_model():
    assert set(MODELS) == {"ae", "wae"}
    with pytest.raises(ValueError, match=r"unknown model 'vae'; valid models: ae, wae"):
        get_model_spec("vae")
    with pytest.raises(ValueError, match="valid models"):
        build_model("gan", {}, INFO)


def test_registry_builds_each_model_with_its_config():
    ae, wae = build_model("ae", {}, INFO), build_model("wae", {"latent_dim": 8}, INFO)
    assert isinstance(ae, ConditionalAutoencoder) and isinstance(ae.config, AEConfig)
    assert isinstance(wae, WassersteinAutoencoder) and wae.latent_dim == 8
    assert isinstance(ae, TrainableModel) and isinstance(wae, TrainableModel)
    assert set(wae.parts()) == {"autoencoder", "critic"} and list(ae.parts()) == ["autoencoder"]
    assert list(wae.make_optimizers()) == ["autoencoder", "critic"]
    assert get_model_spec("wae").view is SequenceView


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_implements_the_capabilities_it_declares(name):
    spec = get_model_spec(name)
    model = build_model(name, {}, spec.view.probe_info())
    assert isinstance(model, TrainableModel)
    for capability in spec.capabilities:
        assert isinstance(model, CAPABILITIES[capability]), f"{name} declares {capability} but lacks its methods"
    if spec.default_sweep:
        assert (Path(__file__).parents[1] / spec.default_sweep).exists(), spec.default_sweep


def test_config_rejects_unknown_key_and_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        make_config("wae", {"lamda": 3.0})
    message = str(err.value)
    assert "unknown key 'lamda'" in message and "did you mean 'lam'" in message
    assert "valid keys:" in message and "critic_lr" in message and "n_heads" in message
    with pytest.raises(ConfigError, match="unknown key 'critic_lr'"):
        make_config("ae", {"critic_lr": 1e-4})  # a WAE-only field is not an AE field


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("n_heads", 2.0, "AEConfig.n_heads: expected int, received float 2.0"),
        ("n_heads", True, "AEConfig.n_heads: expected int, received bool True"),
        ("lr", "1e-3", "AEConfig.lr: expected float, received str '1e-3'"),
        ("w_time", False, "AEConfig.w_time: expected float, received bool False"),
    ],
)
def test_config_rejects_type_mismatch(key: str, value: object, expected: str):
    with pytest.raises(ConfigError) as err:
        make_config("ae", {key: value})
    assert str(err.value) == expected


def test_config_accepts_ints_for_floats_and_numpy_scalars():
    np = pytest.importorskip("numpy")
    cfg = make_config("wae", {"lam": 10, "n_heads": np.int64(4), "lr": np.float64(3e-4)})
    assert cfg.lam == 10.0 and isinstance(cfg.lam, float)
    assert cfg.n_heads == 4 and type(cfg.n_heads) is int and cfg.lr == 3e-4


def test_config_value_rules_name_field_expected_and_received():
    with pytest.raises(ConfigError, match=r"WAEConfig.clip: expected a float > 0, received 0.0"):
        make_config("wae", {"clip": 0.0})
    with pytest.raises(ConfigError, match=r"AEConfig.n_heads: expected an int >= 1, received 0"):
        make_config("ae", {"n_heads": 0})


def test_config_is_frozen_and_defaults_follow_references():
    cfg = make_config("wae")
    with pytest.raises(AttributeError):
        cfg.lam = 1.0  # type: ignore[misc]
    # WGAN reference critic settings; WAE reference AdamW beta1.
    assert (cfg.clip, cfg.critic_lr, cfg.n_critic, cfg.adam_beta1) == (0.01, 5e-5, 5, 0.5)


@dataclass(frozen=True)
class _Inner:
    lr: float = 1e-3
    steps: int = 1


@dataclass(frozen=True)
class _Outer:
    name: str = "x"
    inner: _Inner = field(default_factory=_Inner)


def test_config_dotted_and_nested_keys_round_trip_through_flat_dict():
    cfg = build_config(_Outer, {"inner.lr": 0.5, "inner": {"steps": 3}})
    assert cfg == _Outer(inner=_Inner(lr=0.5, steps=3))
    flat = config_to_flat_dict(cfg)
    assert flat == {"name": "x", "inner.lr": 0.5, "inner.steps": 3}
    assert build_config(_Outer, flat) == cfg
    with pytest.raises(
        ConfigError, match=r"unknown key 'inner.lrr'.*valid keys: inner.lr, inner.steps, name"
    ):
        build_config(_Outer, {"inner.lrr": 1.0})
    with pytest.raises(ConfigError, match=r"_Outer.inner.steps: expected int, received float 1.5"):
        build_config(_Outer, {"inner.steps": 1.5})
    wae = make_config("wae", {"lam": 2.5})
    assert build_config(WAEConfig, config_to_flat_dict(wae)) == wae


def test_config_module_doctests_pass():
    result = doctest.testmod(config_module)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------------------------
# Shapes and the sequence contract.


@pytest.mark.parametrize("name", ["ae", "wae"])
def test_encode_logits_generate_nll_shapes(name: str):
    model = tiny_model(name)
    batch = make_batch(SENTENCES, SEXES)
    b, t = batch.enc_dx.shape
    with torch.no_grad():
        z = model.encode(batch)
        dx_logits, wk_logits = model.teacher_forced_logits(batch, z)
        dx, wk, n_words = model.generate(z, batch.sex, max_words=7)
        per_patient = model.patient_nll(batch)
        sums = model.eval_sums(batch)
    assert z.shape == (b, 16)
    assert dx_logits.shape == (b, t, INFO.diag_age_vocab_size)
    assert wk_logits.shape == (b, t, INFO.week_vocab_size)
    assert dx.shape == wk.shape == (b, 7) and n_words.shape == (b,)
    assert per_patient.shape == (b,) and bool((per_patient > 0).all())
    assert set(sums) == {"nll_dx", "nll_wk", "loss", "tokens"}
    assert all(v.dim() == 0 and v.dtype == torch.float32 for v in sums.values())
    assert sums["tokens"].item() == batch.n_tokens
    # Per-patient NLL adds up to the summed eval terms, and matches the padded logits.
    torch.testing.assert_close(per_patient.sum(), sums["nll_dx"] + sums["nll_wk"])
    valid = batch.tgt_dx != PAD
    ce = torch.nn.functional.cross_entropy(dx_logits[valid], batch.tgt_dx[valid], reduction="sum")
    torch.testing.assert_close(ce, sums["nll_dx"])


@pytest.mark.parametrize("name", ["ae", "wae"])
def test_z_is_independent_of_padding_length(name: str):
    model = tiny_model(name)
    with torch.no_grad():
        z_tight = model.encode(make_batch(SENTENCES, SEXES))
        z_padded = model.encode(make_batch(SENTENCES, SEXES, steps=12))
        nll_tight = model.patient_nll(make_batch(SENTENCES, SEXES))
        nll_padded = model.patient_nll(make_batch(SENTENCES, SEXES, steps=12))
    torch.testing.assert_close(z_tight, z_padded, rtol=0, atol=1e-6)
    torch.testing.assert_close(nll_tight, nll_padded, rtol=0, atol=1e-5)


def test_encoder_reads_past_a_masked_token():
    """<PAD> is also the mask token: a masked word inside the sentence must not end it."""
    model = tiny_model("ae")
    masked = {0: [1]}  # word 1 of the 4-word sentence 0 -> <PAD> in the encoder input
    first = make_batch(SENTENCES, SEXES, masked_words=masked)
    changed = [list(s) for s in SENTENCES]
    changed[0][0] = (3 + 24 * 77 + 5, 4)  # word 0 sits after the mask in the reversed input
    second = make_batch(changed, SEXES, masked_words=masked)
    assert first.enc_dx[0, 3] == PAD and first.enc_dx[0, 4] != second.enc_dx[0, 4]
    with torch.no_grad():
        z1, z2 = model.encode(first), model.encode(second)
    assert (z1[0] - z2[0]).abs().max() > 1e-4  # the word after the mask reaches z
    torch.testing.assert_close(z1[1:], z2[1:])  # other patients unaffected


def test_sex_conditions_encoder_and_decoder():
    model = tiny_model("ae")
    batch = make_batch(SENTENCES, SEXES)
    flipped = make_batch(SENTENCES, [-s for s in SEXES])
    with torch.no_grad():
        z = model.encode(batch)
        assert (z - model.encode(flipped)).abs().max() > 1e-4
        logits, _ = model.teacher_forced_logits(batch, z)
        logits_flipped, _ = model.teacher_forced_logits(flipped, z)
    assert (logits - logits_flipped).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------
# Generation.


def test_generate_restricts_vocab_and_pads_after_eos():
    model = tiny_model("ae")
    out = model.autoencoder.decoder.dx_out
    z, sex = torch.randn(5, 16), torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    with torch.no_grad():
        out.bias[PAD] = out.bias[SOS] = 1e4  # never emitted, however likely
        out.bias[EOS] = -1e4
        dx, wk, n = model.generate(z, sex, max_words=6)
        assert bool((n == 6).all())  # no <EOS>: every row runs to max_words
        assert bool((dx >= N_SPECIAL).all()) and bool((wk >= N_SPECIAL).all())
        assert bool((wk < INFO.week_vocab_size).all())
        out.bias[EOS] = 2e4
        dx, wk, n = model.generate(z, sex, max_words=6)
    assert bool((n == 0).all()) and bool((dx == PAD).all()) and bool((wk == PAD).all())


@pytest.mark.parametrize("name", ["ae", "wae"])
def test_overfitting_a_tiny_batch_lowers_loss_and_generate_reconstructs(name: str):
    model = tiny_model(name)
    batch = make_batch(SENTENCES, SEXES)
    history = train(model, batch, steps=60)
    key = "recon_loss" if name == "wae" else "loss"  # the WAE total adds -λ E[h(z)]
    first, last = history[0][key], history[-1][key]
    assert last < 0.2 * first, (first, last)
    with torch.no_grad():
        dx, wk, n_words = model.generate(model.encode(batch), batch.sex, max_words=8)
    # Greedy decoding from z stops at <EOS> per row, with the right words, and pads after.
    assert n_words.tolist() == batch.lengths.tolist()
    for row, sentence in enumerate(SENTENCES):
        length = len(sentence)
        assert dx[row, :length].tolist() == [d for d, _ in sentence]
        assert wk[row, :length].tolist() == [w for _, w in sentence]
        assert bool((dx[row, length:] == PAD).all()) and bool((wk[row, length:] == PAD).all())


# ---------------------------------------------------------------------------------------------
# WAE critic.


def test_wae_critic_stays_within_clip_and_follows_schedule():
    model = tiny_model("wae", clip=0.02)
    assert isinstance(model, WassersteinAutoencoder)
    before = [p.detach().clone() for p in model.critic.parameters()]
    assert all(bool((p.abs() <= 0.02).all()) for p in before)  # clamped from construction on
    history = train(model, make_batch(SENTENCES, SEXES), steps=4)
    after = list(model.critic.parameters())
    assert all(bool((p.abs() <= 0.02).all()) for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert all(p.requires_grad for p in after)  # unfrozen after the autoencoder step
    assert [m["critic_steps"] for m in history] == [3.0, 3.0, 2.0, 2.0]
    assert model.critic_steps(1000) == 3  # boost every 500th step (WGAN schedule)


class _RecordingContext(LocalStepContext):
    """Records, at each autoencoder step, which critic/encoder parameters received gradient."""

    def step(self, loss: torch.Tensor, optimizer: str) -> float:
        if optimizer == "autoencoder":
            loss.backward(retain_graph=True)
            self.critic_grads = [p.grad for p in self.model.critic.parameters()]
            self.encoder_grad = self.model.autoencoder.encoder.heads[0].weight_hh_l0.grad.clone()
            self.optimizers[optimizer].zero_grad(set_to_none=True)
        return super().step(loss, optimizer)


def test_wae_generator_loss_reaches_encoder_but_not_critic():
    grads = {}
    for lam in (0.0, 1e4):
        torch.manual_seed(1)
        model = tiny_model("wae", lam=lam, critic_warmup_steps=0, critic_boost_every=0)
        torch.manual_seed(2)
        ctx = _RecordingContext(model, model.make_optimizers(), grad_clip=0.0)
        ctx.train_step(make_batch(SENTENCES, SEXES))
        assert all(g is None for g in ctx.critic_grads)
        grads[lam] = ctx.encoder_grad
    assert (grads[0.0] - grads[1e4]).abs().max() > 1e-6  # L_g = -λ E[h(z)] moves the encoder


def test_local_step_context_clips_and_reports_pre_clip_norm():
    model = tiny_model("ae")
    params = list(model.parameters())
    before = torch.cat([p.detach().flatten() for p in params])
    sgd = torch.optim.SGD(params, lr=1.0)  # the update is exactly the (clipped) gradient
    ctx = LocalStepContext(model, {"autoencoder": sgd}, grad_clip=1e-3)
    ctx.train_step(make_batch(SENTENCES, SEXES))
    moved = torch.cat([p.detach().flatten() for p in params]) - before
    assert ctx.grad_norms["autoencoder"] > 1e-2  # the pre-clip norm is reported
    assert moved.norm().item() == pytest.approx(1e-3, rel=1e-3)  # the step used the clipped one
    assert ctx.global_step == 1
