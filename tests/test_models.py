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

# Sentences of (diagnosis-age id, week id) words, each consistent with one birth week (as
# real data are: constrained decoding could not reproduce one that is not).
SENTENCES = [
    [(3 + 24 * 10 + 5, 4), (3 + 24 * 200 + 6, 9), (3 + 24 * 33 + 6, 12), (3 + 24 * 7 + 6, 30)],
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
    assert {"ae", "wae", "scoehr_ae", "scoehr_score"} <= set(MODELS)
    with pytest.raises(ValueError, match=r"unknown model 'vae'; valid models: ae, "):
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
    upstream = None
    if spec.upstream:  # a second stage is built on a first stage's model
        upstream = build_model(spec.upstream[0], {}, spec.upstream[0].view.probe_info())
    model = build_model(name, {}, spec.view.probe_info(), upstream=upstream)
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


# The decoder options of AEConfig (bench/bench_decoder.py measures them): each one keeps
# every contract of the sequence models.
DECODER_OPTIONS = [{"dx_output": "full", "z_every_step": False, "copy_history": False}, {"z_every_step": False},
                   {"word_dropout": 0.3}, {"copy_history": False}]
MODEL_VARIANTS = [("ae", {}), ("wae", {})] + [("ae", options) for options in DECODER_OPTIONS]
VARIANT_IDS = ["ae", "wae"] + ["ae-" + ",".join(f"{k}={v}" for k, v in o.items()) for o in DECODER_OPTIONS]


@pytest.mark.parametrize(("name", "options"), MODEL_VARIANTS, ids=VARIANT_IDS)
def test_encode_logits_generate_nll_shapes(name: str, options: dict):
    model = tiny_model(name, **options)
    model.eval()
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
    latent = {"z_mean_abs", "z_var", "mmd", "w1_estimate", "loss_plus_mmd"} if name == "wae" else set()
    bow = {"bow"} if model.config.bow_weight > 0 else set()  # on by default
    assert set(sums) == {"nll_dx", "nll_wk", "loss", "tokens"} | latent | bow
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
    model = tiny_model("ae", dx_output="full", copy_history=False)  # the test steers the softmax through its biases
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
    # <EOS> is never the first word (every patient has one): one word, then <EOS>, then <PAD>.
    assert bool((n == 1).all()) and bool((dx[:, 1:] == PAD).all()) and bool((wk[:, 1:] == PAD).all())
    assert bool((dx[:, 0] >= N_SPECIAL).all()) and bool((wk[:, 0] >= N_SPECIAL).all())


@pytest.mark.parametrize("greedy", [True, False])
def test_decoding_never_breaks_a_validity_rule_even_from_an_untrained_model(greedy: bool):
    """Words and weeks are picked among what the data contract allows: an untrained decoder
    (uniform-ish logits, weeks pushed towards the wrong end) still yields only sentences that
    pass every rule of generation_rule_failures, except running past max_words."""
    from mirror.metrics.tasks import generation_rule_failures

    model = tiny_model("wae", dx_output="full", copy_history=False)  # steered through the softmax's biases
    out = model.autoencoder.decoder
    n = 64
    z, sex = torch.randn(n, 16), torch.where(torch.rand(n) < 0.5, 1.0, -1.0)
    with torch.no_grad():
        # Sampled: <EOS> ~17% per step, sentences of a few words; greedy: never (runs to 31).
        out.dx_out.bias[EOS] = -5.0 if greedy else 8.0
        out.wk_out.bias[N_SPECIAL:] = torch.linspace(5.0, 0.0, N_WEEKS)  # early weeks favoured
        gen = torch.Generator().manual_seed(3)
        dx, wk, n_words = model.generate(z, sex, 31, greedy=greedy, generator=gen, top_p=0.9)
    fails = generation_rule_failures(dx, wk, n_words, max_words=30, week_vocab_size=INFO.week_vocab_size)
    for rule in ("empty", "token", "age_order", "week_order", "age_time"):
        assert int(fails[rule].sum()) == 0, rule
    assert int((n_words > 1).sum()) > 0  # multi-word sentences were made, so the rules bit


def test_decode_constraints_keep_age_week_order_and_one_birth_week():
    """What DecodeConstraints allows after one word (age group 5 at week 20) in row 0 and
    nothing yet in row 1."""
    from mirror.models.ae import DecodeConstraints

    rules = DecodeConstraints(2, INFO.diag_age_vocab_size, INFO.week_vocab_size, torch.device("cpu"))
    word = torch.tensor([3 + 24 * 10 + 5, 3 + 24 * 10 + 5])  # age group 5, both rows
    rules.update(word, torch.tensor([N_SPECIAL + 20, N_SPECIAL + 20]), torch.tensor([True, False]))
    allowed = rules.allowed_words(first=False)
    assert not bool(allowed[0, 3 + 24 * 10 + 4]) and bool(allowed[0, 3 + 24 * 10 + 5])  # no younger
    assert bool(allowed[1, 3 + 24 * 10 + 4])  # row 1 emitted nothing yet: anything goes
    assert bool(allowed[0, EOS]) and not bool(rules.allowed_words(first=True)[0, EOS])
    weeks = rules.allowed_weeks(word)
    assert not bool(weeks[0, N_SPECIAL + 19]) and bool(weeks[0, N_SPECIAL + 20])  # no earlier week
    # Age group 6 after 5 at week 20: born in (20 - 6P, 20 - 5P], P = 260.9 weeks per group,
    # the patient turns 30 at week 20.36 at the earliest, so week 20 is too early, 21 is fine.
    weeks = rules.allowed_weeks(torch.tensor([3 + 24 * 10 + 6, 3 + 24 * 10 + 6]))
    assert not bool(weeks[0, N_SPECIAL + 20]) and bool(weeks[0, N_SPECIAL + 21])
    assert bool(weeks[1, N_SPECIAL:].all())  # no word yet: every real week
    assert not bool(rules.allowed_words(first=False)[0, 3 + 24 * 10 + 13])  # 40 years later:
    # no week in the 40-week span is that far from week 20


def test_sampling_follows_temperature_and_top_p():
    from mirror.models.ae import sample_logits

    logits = torch.tensor([[2.0, 1.0, 0.0, float("-inf")]]).expand(4000, 4)
    gen = torch.Generator().manual_seed(0)
    draws = sample_logits(logits, 1.0, 1.0, gen)
    assert not bool((draws == 3).any())  # -inf is never drawn
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    torch.testing.assert_close(freq[:3], torch.softmax(logits[0, :3], 0).double(), atol=0.03, rtol=0)
    nucleus = sample_logits(logits, 1.0, 0.6, gen)  # p = (.665, .245, .09): only the first stays
    assert bool((nucleus == 0).all())
    hot = sample_logits(logits, 100.0, 1.0, gen)  # near-uniform over the three allowed ids
    assert float((hot == 2).double().mean()) > 0.25


@pytest.mark.parametrize(("name", "options"), MODEL_VARIANTS, ids=VARIANT_IDS)
def test_overfitting_a_tiny_batch_lowers_loss_and_generate_reconstructs(name: str, options: dict):
    model = tiny_model(name, **options)
    batch = make_batch(SENTENCES, SEXES)
    history = train(model, batch, steps=60 if options.get("word_dropout", 0) == 0 else 120)
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


def test_factorised_word_head_is_a_normalised_joint_distribution():
    """log P(word) = log P(condition) + log P(age group | condition) sums to one over the
    vocabulary, never predicts <PAD>/<SOS>, and its NLL is the joint table's entry."""
    from mirror.models.ae import FactorisedWordHead

    torch.manual_seed(0)
    head = FactorisedWordHead(8, INFO.diag_age_vocab_size)
    torch.nn.init.normal_(head.age_profile.weight)  # condition-specific age profiles
    features = torch.randn(5, 8)
    logp = head.logits(features)
    assert logp.shape == (5, INFO.diag_age_vocab_size)
    torch.testing.assert_close(torch.logsumexp(logp, -1), torch.zeros(5))
    assert bool((logp[:, [PAD, SOS]] < -1e8).all())
    target = torch.tensor([EOS, 3, 3 + 24 * 604 + 23, 3 + 24 * 10 + 5, PAD])
    nll = head.nll(features, target)
    expected = -logp.gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(nll[:4], expected[:4])
    assert nll[4].item() == 0.0


def test_copy_history_is_the_sentence_so_far_under_teacher_forcing_and_decoding():
    """The teacher-forced history of step t (one scatter over the padded inputs) is what
    decoding builds word by word: the conditions of w_1..w_t and w_t's own."""
    from mirror.models.ae import WordHistory

    batch = make_batch(SENTENCES, SEXES)
    b, t = batch.dec_dx.shape
    row = torch.arange(b).repeat_interleave(t)
    step = torch.arange(t).repeat(b)
    forced = WordHistory.teacher_forced(batch.dec_dx, row, step, batch.dec_dx.flatten())
    decoded = WordHistory.empty(b, batch.dec_dx.device)
    for k in range(t):
        at_k = step == k
        on = k <= batch.lengths  # steps a row takes: <SOS> and its words
        assert torch.equal(forced.seen[at_k][on], decoded.seen[on]), k
        assert torch.equal(forced.last[at_k][on], decoded.last[on]), k
        if k + 1 < t:
            decoded = decoded.after(batch.dec_dx[:, k + 1], k + 1 <= batch.lengths)
    # Row 2 repeats condition 5: at its second word it has seen {5} and last said 5.
    second = (row == 2) & (step == 2)
    assert forced.seen[second].nonzero()[:, 1].tolist() == [5] and forced.last[second].item() == 5
    assert forced.last[(row == 0) & (step == 0)].item() == -1  # <SOS>


def test_copy_history_is_zero_at_initialisation_and_needs_the_factorised_head():
    model = tiny_model("ae", copy_history=True)
    plain = tiny_model("ae", copy_history=False)
    model.load_state_dict(plain.state_dict(), strict=False)  # the same weights but the bias's
    batch = make_batch(SENTENCES, SEXES)
    with torch.no_grad():
        z = plain.encode(batch)
        torch.testing.assert_close(model.teacher_forced_logits(batch, z)[0], plain.teacher_forced_logits(batch, z)[0])
    with pytest.raises(ConfigError, match="copy_history: expected false unless dx_output is 'factorised'"):
        make_config("ae", {"copy_history": True, "dx_output": "full"})


def test_word_dropout_acts_in_training_only_and_z_every_step_reads_z():
    batch = make_batch(SENTENCES, SEXES)
    model = tiny_model("ae", word_dropout=0.9)
    z = torch.randn(batch.size, 16)
    with torch.no_grad():
        trained = model.autoencoder.token_nll(batch, z)[0]
        model.eval()
        evaluated = [model.autoencoder.token_nll(batch, z)[0] for _ in range(2)]
    torch.testing.assert_close(evaluated[0], evaluated[1])  # no dropout outside training
    assert (trained - evaluated[0]).abs().max() > 1e-4
    # With z beside every input, z moves the features even where h_0 ignores it.
    model = tiny_model("ae", z_every_step=True).eval()
    with torch.no_grad():
        model.autoencoder.decoder.init_state.weight.zero_()
        model.autoencoder.decoder.init_state.bias.zero_()
        a, _ = model.teacher_forced_logits(batch, z)
        b, _ = model.teacher_forced_logits(batch, -z)
    assert (a - b).abs().max() > 1e-4


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
        model = tiny_model(
            "wae", lam=lam, critic_warmup_steps=0, critic_boost_every=0, lam_warmup_steps=0
        )
        torch.manual_seed(2)
        ctx = _RecordingContext(model, model.make_optimizers(), grad_clip=0.0)
        ctx.train_step(make_batch(SENTENCES, SEXES))
        assert all(g is None for g in ctx.critic_grads)
        grads[lam] = ctx.encoder_grad
    assert (grads[0.0] - grads[1e4]).abs().max() > 1e-6  # L_g = -λ E[h(z)] moves the encoder


def test_wae_mmd_penalty_is_the_metric_mmd_and_pulls_z_towards_the_prior():
    """``latent_penalty=mmd``: the differentiable penalty equals the scorecard's unbiased IMQ
    MMD², the model has no critic (parts, optimizers), and training with a large λ leaves z
    closer to N(0, I) than λ = 0 from the same start."""
    from mirror.metrics.tasks import imq_mmd2_unbiased
    from mirror.models.wae import imq_mmd2_penalty

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=g, dtype=torch.float64) + 0.5, torch.randn(40, 6, generator=g, dtype=torch.float64)
    x.requires_grad_(True)
    penalty = imq_mmd2_penalty(x, y)
    assert float(penalty) == pytest.approx(imq_mmd2_unbiased(x.detach(), y), rel=1e-9)
    penalty.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() > 0

    fits = {}
    for lam in (0.0, 100.0):
        torch.manual_seed(3)
        model = tiny_model("wae", latent_penalty="mmd", lam=lam, lam_warmup_steps=0)
        assert model.critic is None and list(model.parts()) == list(model.make_optimizers()) == ["autoencoder"]
        history = train(model, make_batch(SENTENCES * 4, SEXES * 4), steps=30)
        assert all(m["critic_steps"] == 0.0 and "w1_estimate" not in m for m in history)
        fits[lam] = history[-1]["mmd"]
    assert fits[100.0] < fits[0.0]


def test_wae_mmd_by_sex_sees_a_latent_split_by_sex_that_the_aggregate_mmd_misses():
    """``latent_penalty=mmd_by_sex``: z whose two sexes sit at +-1.5 on one axis but whose
    pooled law is near N(0, I) on it costs the per-sex penalty far more than the aggregate
    one; and a model trained with it takes no critic steps and adds a nonzero penalty."""
    torch.manual_seed(0)
    sex = torch.tensor([-1.0, 1.0] * 100)
    z = torch.randn(200, 4) * torch.tensor([0.3, 1.0, 1.0, 1.0])
    z[:, 0] += 1.5 * sex  # pooled: a two-mode mixture with variance ~2.3 on axis 0
    split = tiny_model("wae", latent_penalty="mmd_by_sex")
    pooled = tiny_model("wae", latent_penalty="mmd")
    torch.manual_seed(1)
    per_sex = float(split.mmd_penalty(z, sex))
    torch.manual_seed(1)
    aggregate = float(pooled.mmd_penalty(z, sex))
    assert per_sex > 3 * aggregate
    assert split.critic is None

    model = tiny_model("wae", latent_penalty="mmd_by_sex", lam=10.0, lam_warmup_steps=0)
    history = train(model, make_batch(SENTENCES * 4, SEXES * 4), steps=3)
    assert all(m["critic_steps"] == 0.0 and m["gen_loss"] != 0.0 for m in history)


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


# ---------------------------------------------------------------------------------------------
# LR schedules.


@pytest.mark.parametrize("name", sorted(n for n, spec in MODELS.items() if spec.view is SequenceView))
def test_every_optimizer_schedule_advances_once_per_training_step(name: str):
    """An optimizer's LR schedule is sized in training steps: after N steps each optimizer's
    rate is base * lr_lambda(N), however many optimizer steps a training step takes (the WAE
    critic takes 2-3 here; stepping its schedule on each would run ahead of the autoencoder's)."""
    from mirror.train.schedule import lr_lambda, make_schedulers

    model = tiny_model(name)
    optimizers = model.make_optimizers()
    base = {k: [g["lr"] for g in o.param_groups] for k, o in optimizers.items()}
    total, warmup_fraction, floor = 20, 0.25, 0.1
    schedulers = make_schedulers(optimizers, total, warmup_fraction, floor)
    ctx = LocalStepContext(model, optimizers, grad_clip=1.0, schedulers=schedulers)
    factor = lr_lambda(total, warmup_fraction, floor)
    batch = make_batch(SENTENCES, SEXES)
    for n in range(1, 8):  # through the warm-up (5 steps) and into the decay
        ctx.train_step(batch)
        for key, opt in optimizers.items():
            got = [g["lr"] for g in opt.param_groups]
            assert got == pytest.approx([b * factor(n) for b in base[key]], rel=1e-12), (key, n)
            assert schedulers[key].last_epoch == n == ctx.global_step


def test_resume_pins_every_schedule_to_the_global_step():
    """A checkpoint whose critic schedule ran ahead (the old per-critic-step rule) resumes with
    every schedule at the checkpoint's global step, on this run's base rates."""
    from mirror.train.loop import hyperparameters, reapply_hyperparameters
    from mirror.train.schedule import lr_lambda, make_schedulers

    model = tiny_model("wae", critic_lr=1e-4)
    optimizers = model.make_optimizers()
    schedulers = make_schedulers(optimizers, 20, 0.25, 0.1)
    for _ in range(9):
        schedulers["critic"].step()  # ran ahead: 9 critic schedule steps in 3 training steps
    for _ in range(3):
        schedulers["autoencoder"].step()
    settings = hyperparameters(optimizers)
    settings["critic"][0].update(lr=2e-4, initial_lr=2e-4)  # a PBT perturbation of critic_lr
    reapply_hyperparameters(optimizers, schedulers, settings, global_step=3)
    factor = lr_lambda(20, 0.25, 0.1)
    assert optimizers["critic"].param_groups[0]["lr"] == pytest.approx(2e-4 * factor(3))
    assert schedulers["critic"].last_epoch == 3


# ---------------------------------------------------------------------------------------------
# WAE latent fit.


def test_wae_lambda_warms_up_from_zero_and_step_metrics_report_latent_fit():
    model = tiny_model("wae", lam=10.0, lam_warmup_steps=4)
    assert isinstance(model, WassersteinAutoencoder)
    assert [model.lam_at(s) for s in (0, 1, 2, 4, 9)] == [0.0, 2.5, 5.0, 10.0, 10.0]
    history = train(model, make_batch(SENTENCES, SEXES), steps=3)
    assert [m["lam"] for m in history] == [0.0, 2.5, 5.0]
    assert history[0]["gen_loss"] == 0.0  # λ = 0 at step 0: no W1 penalty yet
    for m in history:
        assert {"z_mean_abs", "z_var", "mmd", "w1_estimate"} <= set(m)
        assert m["z_mean_abs"] >= 0 and m["z_var"] >= 0


def test_wae_validation_selection_metric_is_loss_plus_mmd_per_token():
    """eval_sums carry batch statistics times tokens, so after the loop's division by the
    total token count val/loss_plus_mmd == val/loss + val/mmd."""
    from mirror.train.loop import epoch_metrics

    model = tiny_model("wae")
    model.eval()
    batches = [make_batch(SENTENCES, SEXES), make_batch(SENTENCES[:3], SEXES[:3])]
    sums: dict[str, float] = {}
    with torch.no_grad():
        for batch in batches:
            for key, value in model.eval_sums(batch).items():
                sums[key] = sums.get(key, 0.0) + float(value)
    ctx = LocalStepContext(model, model.make_optimizers(), grad_clip=1.0)
    metrics = epoch_metrics({"steps": 1.0}, sums | {"patients": 7.0}, 1, ctx, 0, normaliser="tokens")
    assert metrics["val/loss_plus_mmd"] == pytest.approx(metrics["val/loss"] + metrics["val/mmd"])
    assert metrics["val/mmd"] > 0.05  # an untrained encoder's z is far from N(0, I)
    assert metrics["val/z_var"] >= 0


def test_wae_warns_when_the_w1_estimate_turns_negative():
    model = tiny_model("wae")
    assert model.epoch_warnings({"train/w1_estimate": 0.01, "val/w1_estimate": 0.0}) == []
    (warning,) = model.epoch_warnings({"train/w1_estimate": -0.02, "train/z_mean_abs": 97.0})
    assert "train/w1_estimate" in warning and "< 0" in warning and "97" in warning


def test_shuffled_z_control_scores_below_an_overfitted_autoencoder():
    """The shuffled-z floor decodes each patient with another patient's z: once z carries the
    sentence (a tiny overfitted batch), the control loses what z carried."""
    from mirror.metrics.evaluate import EvalConfig, evaluate_model

    model = tiny_model("ae")
    batch = make_batch(SENTENCES, SEXES)
    train(model, batch, steps=60)
    result = evaluate_model(model, [batch], data_info=INFO, config=EvalConfig(n_generate=8, cv_folds=2))
    m = result.metrics
    assert m["eval/recon/tf_acc"] == 1.0
    assert m["baseline/shuffled_z/recon/tf_acc"] < 0.8
    assert 0.0 <= m["baseline/copy_prev/recon/tf_acc"] < 1.0
    # Generation goes through the sampling path, under the validity constraints.
    assert m["eval/gen/fail_age_order"] == m["eval/gen/fail_week_order"] == m["eval/gen/fail_empty"] == 0.0


def test_the_loop_asks_each_model_for_its_epoch_warnings():
    from mirror.train.loop import epoch_warnings

    negative = {"train/w1_estimate": -0.5, "val/w1_estimate": -0.1}
    assert epoch_warnings(tiny_model("ae"), negative) == []  # no hook: no warnings
    assert len(epoch_warnings(tiny_model("wae"), negative)) == 2


def test_runs_saved_before_the_decoder_options_load_with_the_seed_decoder(tmp_path):
    """A saved spec without the decoder option keys reads as the decoder it was trained
    with (the seed's full softmax, z in h_0 only), not as today's defaults."""
    from mirror.train.spec import RunSpec, build_run_spec

    spec = build_run_spec("ae", str(tmp_path), "old-run", {"model.latent_dim": 16})
    assert spec.model_config["dx_output"] == "factorised" and spec.model_config["z_every_step"] is True
    saved = spec.to_dict()
    for key in ("dx_output", "z_every_step", "word_dropout", "gen_prior", "copy_history"):
        del saved["model_config"][key]
    old = RunSpec.from_dict(saved)
    assert old.model_config["dx_output"] == "full" and old.model_config["z_every_step"] is False
    assert old.model_config["gen_prior"] == "standard"  # no fitted moments in its checkpoint
    assert old.model_config["copy_history"] is False  # no HistoryBias weights in its checkpoint
    assert old.model_config["latent_dim"] == 16
    assert RunSpec.from_dict(spec.to_dict()).model_config == spec.model_config


def test_latent_moments_fit_the_aggregate_posterior_and_sample_it():
    """The EMA's first batch sets the moments exactly; later batches move them by the momentum;
    draws reproduce the fitted mean and covariance."""
    from mirror.models.ae import LatentMoments

    gen = torch.Generator().manual_seed(0)
    mixing = torch.tensor([[0.5, 0.0, 0.0], [0.3, 0.2, 0.0], [0.0, 0.1, 1.5]], dtype=torch.float64)
    z = (torch.randn(4000, 3, generator=gen, dtype=torch.float64) @ mixing.T + torch.tensor([1.0, -2.0, 0.5])).float()
    moments = LatentMoments(3, momentum=0.5)
    moments.update(z)
    zd = z.double()
    assert torch.allclose(moments.mean, zd.mean(0), atol=1e-9)
    assert torch.allclose(moments.covariance(), torch.cov(zd.T, correction=0), atol=1e-9)
    moments.update(z + 2.0)  # half-way towards the shifted batch
    assert torch.allclose(moments.mean, zd.mean(0) + 1.0, atol=1e-9)
    assert moments.seen.item() == 8000
    draws = moments.sample(20_000, gen).double()
    assert draws.dtype == torch.float64 and draws.shape == (20_000, 3)
    assert torch.allclose(draws.mean(0), moments.mean, atol=0.05)
    assert torch.allclose(torch.cov(draws.T), moments.covariance(), atol=0.08)


def test_ae_generates_from_its_fitted_aggregate_posterior_and_wae_from_the_standard_prior():
    ae, wae = tiny_model("ae", lr=1e-9), tiny_model("wae")  # the AE's z barely moves
    batch = make_batch(SENTENCES, SEXES)
    train(ae, batch, steps=3)
    train(wae, batch, steps=3)
    assert ae.config.gen_prior == "aggregate" and wae.config.gen_prior == "standard"
    assert wae.latent_moments is None and "latent_moments.mean" not in wae.state_dict()
    with torch.no_grad():
        z = ae.encode(batch).double()
    assert ae.latent_moments.seen.item() == 3 * len(SENTENCES)
    assert torch.allclose(ae.latent_moments.mean, z.mean(0), atol=1e-4)
    assert torch.allclose(ae.latent_moments.covariance(), torch.cov(z.T, correction=0), atol=1e-4)
    draws = ae.sample_latent(5000, torch.Generator().manual_seed(1)).double()
    assert torch.allclose(draws.mean(0), ae.latent_moments.mean, atol=0.1)
    standard = wae.sample_latent(5000, torch.Generator().manual_seed(1))
    assert abs(standard.var(0).mean().item() - 1.0) < 0.1
    # The moments are checkpointed with the model.
    clone = tiny_model("ae")
    clone.load_state_dict(ae.state_dict())
    assert torch.equal(clone.latent_moments.second, ae.latent_moments.second)


# ---------------------------------------------------------------------------------------------
# Bag-of-words loss from z (AEConfig.bow_weight).


@pytest.mark.parametrize("name", ["ae", "wae"])
def test_bow_loss_trains_a_head_from_z_towards_the_sentences_conditions(name: str):
    """With bow_weight > 0 the head's NLL is logged and falls under training, and its
    optimum is each sentence's condition frequencies (the softmax puts its mass there)."""
    model = tiny_model(name, bow_weight=1.0, bow_target="counts")
    batch = make_batch(SENTENCES, SEXES)
    history = train(model, batch, steps=60)
    assert history[-1]["bow"] < 0.5 * history[0]["bow"], (history[0]["bow"], history[-1]["bow"])
    with torch.no_grad():
        probs = torch.softmax(model.autoencoder.bow(model.encode(batch)), dim=-1)
    # Row 2 is one condition twice; row 0 four conditions once each.
    assert float(probs[2, 5]) > 0.8
    assert float(probs[0, [10, 200, 33, 7]].sum()) > 0.8 and float(probs[0, 10]) < 0.5
    # Validation sums carry it too (the loop logs val/bow per predicted token).
    with torch.no_grad():
        assert "bow" in model.eval_sums(batch)


def test_bow_presence_target_counts_each_condition_once():
    """bow_target "presence": a condition repeated week after week weighs what it weighs once
    (the truth is in which conditions a patient has, not how often chronic ones recur), while
    the "counts" bag weighs each repeat; words of the same condition at another age group are
    the same condition."""
    a, b = 3 + 24 * 5, 3 + 24 * 77
    repeated = make_batch([[(a + 12, 20), (a + 12, 21), (a + 13, 22), (b + 13, 23)]], [1.0])
    once = make_batch([[(a + 12, 20), (b + 13, 23)]], [1.0])
    presence, counts = (tiny_model("ae", bow_weight=1.0, bow_target=target) for target in ("presence", "counts"))
    counts.load_state_dict(presence.state_dict())
    z = torch.randn(1, presence.autoencoder.bow.in_features)
    with torch.no_grad():
        logp = torch.log_softmax(presence.autoencoder.bow(z), dim=-1)[0]
        expected_once = -(logp[5] + logp[77])
        assert presence.autoencoder.bow_nll(repeated, z).sum() == pytest.approx(float(expected_once), rel=1e-5)
        assert presence.autoencoder.bow_nll(once, z).sum() == pytest.approx(float(expected_once), rel=1e-5)
        assert counts.autoencoder.bow_nll(repeated, z).sum() == pytest.approx(float(-(3 * logp[5] + logp[77])), rel=1e-5)
    assert AEConfig.SAVED_BEFORE["bow_target"] == "counts"
    with pytest.raises(ConfigError, match="bow_target"):
        make_config("ae", {"bow_target": "tfidf"})


@pytest.mark.parametrize("name", ["ae", "wae"])
def test_encoder_bag_starts_as_the_model_without_it_and_learns_only_the_conditions_it_reads(name: str):
    """encoder_bag: zero-initialised, so z starts as the GRU heads' alone; under training only
    the rows of conditions the encoder reads move (a masked word's condition is not read)."""
    plain, bagged = tiny_model(name, encoder_bag=False), tiny_model(name, encoder_bag=True)
    assert AEConfig.SAVED_BEFORE["encoder_bag"] is False and plain.autoencoder.bag is None
    bagged.load_state_dict(plain.state_dict(), strict=False)
    only_masked = 3 + 24 * 404  # condition 404, in the new row 4 only, hidden from the encoder
    batch = make_batch(SENTENCES + [[(only_masked, 8), (3 + 24 * 33 + 7, 9)]], SEXES + [1.0], masked_words={4: [0]})
    with torch.no_grad():
        assert torch.equal(plain.encode(batch), bagged.encode(batch))
    train(bagged, batch, steps=3)
    moved = bagged.autoencoder.bag.proj.weight.abs().sum(0) > 0  # (N_CONDITIONS,)
    assert set(torch.flatten(moved.nonzero()).tolist()) == {10, 200, 33, 7, 400, 5, 600, 90, 91}
    with torch.no_grad():
        assert not torch.equal(plain.encode(batch), bagged.encode(batch))


def test_bow_weight_zero_builds_no_head_and_leaves_the_objective_alone():
    """bow_weight 0 (what runs saved before it read as): no head, no extra state in
    the checkpoint, the same loss; a positive weight changes the loss by exactly weight x NLL."""
    off, on = tiny_model("ae", bow_weight=0.0), tiny_model("ae", bow_weight=0.5)
    assert off.autoencoder.bow is None and not any("bow" in k for k in off.state_dict())
    assert AEConfig.SAVED_BEFORE["bow_weight"] == 0.0
    on.load_state_dict(off.state_dict(), strict=False)  # same weights but the head
    batch = make_batch(SENTENCES, SEXES)
    off_metrics = train(off, batch, steps=1)[0]
    on_metrics = train(on, batch, steps=1)[0]
    assert "bow" not in off_metrics
    assert on_metrics["loss"] == pytest.approx(off_metrics["loss"] + 0.5 * on_metrics["bow"], rel=1e-5)
    with pytest.raises(ConfigError, match="bow_weight"):
        make_config("ae", {"bow_weight": -1.0})
