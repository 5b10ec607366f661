"""Evaluation metric math, tested against values computed by hand.

The model under test is :class:`ScriptedModel`, a complete ``SequenceDecoder`` whose every
prediction is written down below (the rank of the truth among its logits, its greedy
decodes, its generated sentences), so each expected metric is a fraction counted by hand
from those scripts, independent of any training.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from scipy import stats
from torch import nn

from mirror.data import schema
from mirror.data.batch import SequenceBatch, SequenceInfo
from mirror.data.collate import CollateConfig, MaskSpec, collate, make_mask
from mirror.data.vocab import (
    DIAG_AGE_VOCAB_SIZE,
    EOS,
    N_CONDITIONS,
    N_SPECIAL,
    PAD,
    SOS,
    age_group_at,
    diag_age_token,
)
from mirror.metrics.baselines import FrequencyBaseline, copy_previous_topk
from mirror.metrics.evaluate import (
    BASELINE_METRIC_NAMES,
    METRIC_GOALS,
    METRIC_NAMES,
    EvalConfig,
    GroundTruth,
    evaluate_model,
    load_ground_truth,
    model_metric_of,
)
from mirror.metrics.tasks import (
    LatentReservoir,
    generation_rule_failures,
    histogram_distances,
    imq_mmd2_unbiased,
    mask_encoder_input,
    pearson_r,
    ridge_r2_cv,
    ridge_r2_cv_by_dimension,
    sex_auroc_cv,
    word_positions,
)
from mirror.models.base import Encoder, SequenceDecoder

N_WEEKS = 70
WEEK_VOCAB = 3 + N_WEEKS
MAX_WORDS = 6  # the scripted generator's "no <EOS>" sentence has 7 words


def t(condition: int, age_group: int) -> int:
    return int(diag_age_token(condition, age_group))


def w(week: int) -> int:
    return 3 + week


# --------------------------------------------------------------------------------------------
# The fixed held-out set: subject id -> (sex, [(condition, age group, week), ...])

PATIENTS = {
    10: (1, [(5, 2, 10), (7, 2, 12), (5, 3, 20)]),
    11: (-1, [(1, 4, 0)]),
    12: (1, [(2, 1, 3), (3, 1, 3), (4, 1, 5), (2, 2, 60)]),
    13: (-1, [(9, 0, 1), (9, 0, 2), (8, 0, 2), (9, 0, 7), (1, 0, 8), (6, 0, 9)]),
}


def rows_table(patients: dict[int, tuple[int, list[tuple[int, int, int]]]]) -> pa.Table:
    ids = list(patients)
    events = [patients[i][1] for i in ids]
    return schema.fill_missing_modalities(pa.Table.from_pydict(
        {
            schema.SUBJECT_ID: ids,
            schema.SEX: [patients[i][0] for i in ids],
            schema.BIRTH_WEEK: [-600] * len(ids),
            schema.ENROLL_START: [0] * len(ids),
            schema.ENROLL_END: [N_WEEKS - 1] * len(ids),
            schema.N_EVENTS: [len(e) for e in events],
            schema.CONDITIONS: [[c for c, _, _ in e] for e in events],
            schema.AGE_GROUPS: [[a for _, a, _ in e] for e in events],
            schema.WEEKS: [[wk for _, _, wk in e] for e in events],
        },
        schema=schema.DIAGNOSIS_SCHEMA,
    ))


def held_out_batch() -> SequenceBatch:
    return collate(rows_table(PATIENTS), CollateConfig(n_weeks=N_WEEKS))


# --------------------------------------------------------------------------------------------
# The scripted model

# Rank (1 = top) of the true word among the teacher-forced logits, per word; 0 = not in top 5.
TF_RANK = {10: [1, 2, 1], 11: [1], 12: [1, 1, 0, 1], 13: [2, 1, 1, 1, 3, 1]}
# Rank of the true word wherever that word is masked in the encoder input (any mask).
MASKED_RANK = {10: 1, 11: 3, 12: 0, 13: 5}
# Whether the week head's argmax is the true week, per word.
TF_WEEK_OK = {10: [1, 1, 0], 11: [1], 12: [0, 0, 0, 0], 13: [1] * 6}
# Greedy decode from each patient's z: [(dx token, week token), ...].
GREEDY = {
    10: [(t(5, 2), w(10)), (t(7, 2), w(14)), (t(6, 3), w(20))],
    11: [(t(1, 4), SOS)],  # right word, but a special week token: no week pair
    12: [(t(3, 1), w(3)), (t(2, 1), w(3))],  # right words, swapped: nothing lines up
    13: [
        (t(9, 0), w(1)),
        (t(9, 0), w(5)),
        (t(8, 0), w(2)),
        (t(9, 0), w(7)),
        (t(1, 0), w(8)),
        (t(6, 0), w(9)),
        (t(6, 0), w(9)),
    ],  # one word too many
}
# Sentences decoded from prior z, cycled by row: [(dx, week token), ...] and the word count.
GENERATED = [
    ([(t(5, 2), w(10)), (t(7, 2), w(12))], 2),  # valid
    ([(t(1, 0), w(1))] * 7, 7),  # no <EOS> within MAX_WORDS
    ([(t(4, 3), w(10)), (t(4, 2), w(11))], 2),  # age goes back (so no birth week fits either)
    ([(t(3, 0), w(5)), (SOS, w(6))], 2),  # a special token among the words
    ([], 0),  # empty
]
ENCODED = 1000.0  # z[:, 3] of encoder outputs, so generate() tells recon from prior samples
DECOYS = [t(600, 23 - j) for j in range(5)]  # ids that outrank the truth when it is not first


@dataclass(frozen=True)
class ScriptedConfig:
    week_vocab_size: int = WEEK_VOCAB


class ScriptedModel(nn.Module):
    """Implements ``SequenceDecoder``; predictions follow the scripts above."""

    def __init__(self) -> None:
        super().__init__()
        self.config = ScriptedConfig()
        self.scale = nn.Parameter(torch.ones(()))

    # Training surface (exercised elsewhere; minimal but real).
    def parts(self) -> dict[str, nn.Module]:
        return {"scripted": self}

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"main": torch.optim.SGD(self.parameters(), lr=0.0)}

    def train_step(self, batch: SequenceBatch, ctx) -> dict[str, float]:
        return {"loss": 0.0}

    def eval_sums(self, batch: SequenceBatch) -> dict[str, torch.Tensor]:
        return {
            "nll_dx": self.patient_nll(batch).sum(),
            "tokens": torch.tensor(float(batch.n_tokens)),
        }

    def patient_nll(self, batch: SequenceBatch) -> torch.Tensor:
        return torch.zeros(batch.size)

    @property
    def latent_dim(self) -> int:
        return 4

    def sample_latent(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, generator=generator)

    # Inference surface.
    def encode(self, batch: SequenceBatch) -> torch.Tensor:
        sid = batch.subject_id.float()
        return torch.stack(
            [sid, batch.sex, torch.zeros_like(sid), torch.full_like(sid, ENCODED)], 1
        )

    def teacher_forced_logits(self, batch: SequenceBatch, z: torch.Tensor):
        b, width = batch.tgt_dx.shape
        dx = torch.zeros(b, width, DIAG_AGE_VOCAB_SIZE)
        wk = torch.zeros(b, width, self.config.week_vocab_size)
        for r in range(b):
            sid, n = int(batch.subject_id[r]), int(batch.lengths[r])
            for i in range(n):
                hidden = int(batch.enc_dx[r, n - i]) == PAD
                rank = MASKED_RANK[sid] if hidden else TF_RANK[sid][i]
                truth = int(batch.tgt_dx[r, i])
                dx[r, i, truth] = 5.0
                decoys = [d for d in DECOYS if d != truth][: (rank - 1 if rank else 5)]
                for j, d in enumerate(decoys):
                    dx[r, i, d] = 10.0 - j
                week = int(batch.tgt_wk[r, i])
                wk[r, i, week if TF_WEEK_OK[sid][i] else week + 1] = 1.0
            dx[r, n, EOS] = 1.0
        return dx, wk

    def generate(self, z: torch.Tensor, sex: torch.Tensor, max_words: int, **options):
        b = z.shape[0]
        dx = torch.full((b, max_words), PAD, dtype=torch.int64)
        wk = torch.full((b, max_words), PAD, dtype=torch.int64)
        n = torch.zeros(b, dtype=torch.int64)
        for r in range(b):
            encoded = bool(z[r, 3] == ENCODED)
            words = GREEDY[int(z[r, 0])] if encoded else GENERATED[r % len(GENERATED)][0]
            words = words[:max_words]
            for i, (d, k) in enumerate(words):
                dx[r, i], wk[r, i] = d, k
            n[r] = len(words)
        return dx, wk, n


def run_eval(**overrides) -> tuple:
    model = ScriptedModel()
    batch = held_out_batch()
    baseline = FrequencyBaseline.fit([batch], max_words=MAX_WORDS)
    cfg = EvalConfig(**{"n_generate": 10, "gen_batch_size": 5, **overrides})
    result = evaluate_model(
        model,
        [batch],
        data_info=SequenceInfo(week_vocab_size=WEEK_VOCAB, max_words=MAX_WORDS),
        baseline=baseline,
        config=cfg,
    )
    return result, batch


@pytest.fixture(scope="module")
def evaluated():
    return run_eval()


# --------------------------------------------------------------------------------------------
# The end-to-end evaluation on the fixed set


def test_scripted_model_implements_the_protocol():
    assert isinstance(ScriptedModel(), SequenceDecoder) and isinstance(ScriptedModel(), Encoder)


def test_every_metric_name_is_reported(evaluated):
    result, _ = evaluated
    assert list(result.metrics) == list(METRIC_NAMES)
    assert len(set(METRIC_NAMES)) == len(METRIC_NAMES)
    assert all(name.startswith(("eval/", "baseline/")) for name in METRIC_NAMES)
    assert {model_metric_of(n) for n in BASELINE_METRIC_NAMES} <= set(METRIC_NAMES)  # a floor each
    assert set(METRIC_GOALS) == {n for n in METRIC_NAMES if "/count/" not in n}


def test_reconstruction_matches_hand_counts(evaluated):
    m = evaluated[0].metrics
    # 14 words; truth ranked first at 2 + 1 + 3 + 4 of them.
    assert m["eval/recon/tf_acc"] == pytest.approx(10 / 14)
    assert m["eval/recon/tf_week_acc"] == pytest.approx(9 / 14)
    # Position-aligned greedy words: 2 (patient 10) + 1 (11) + 0 (12, swapped) + 6 (13).
    assert m["eval/recon/greedy_acc"] == pytest.approx(9 / 14)
    # Condition sets: {5,7} vs {5,6,7}; {1} vs {1}; {2,3,4} vs {2,3}; equal.
    assert m["eval/recon/jaccard"] == pytest.approx((2 / 3 + 1 + 2 / 3 + 1) / 4)
    # Week errors on correctly decoded words with a real week: |14-12| + |5-2| over 2 + 0 + 6.
    assert m["eval/recon/week_mae"] == pytest.approx(5 / 8)
    assert m["eval/recon/length_acc"] == pytest.approx(2 / 4)
    assert m["eval/recon/exact_match"] == pytest.approx(1 / 4)


def test_interpolation_and_extrapolation_topk_match_hand_counts(evaluated):
    m = evaluated[0].metrics
    # Interpolation masks one interior word of the 3 patients with >= 3 words (ranks 1, 0, 5).
    assert m["eval/count/interp_masked"] == 3
    assert m["eval/interp/top1"] == pytest.approx(1 / 3)
    assert m["eval/interp/top5"] == pytest.approx(2 / 3)
    # Extrapolation masks the last word of all 4 patients (ranks 1, 3, 0, 5).
    assert m["eval/count/extrap_masked"] == 4
    assert m["eval/extrap/top1"] == pytest.approx(1 / 4)
    assert m["eval/extrap/top5"] == pytest.approx(3 / 4)


def test_generation_matches_hand_counts(evaluated):
    result, _ = evaluated
    m = result.metrics
    assert m["eval/count/generated"] == 10
    assert m["eval/count/generated_valid"] == 2
    assert m["eval/gen/validity"] == pytest.approx(0.2)
    for rule, rate in {
        "no_eos": 0.2,
        "empty": 0.2,
        "token": 0.2,
        "age_order": 0.2,
        "week_order": 0.0,
        "age_time": 0.2,
    }.items():
        assert m[f"eval/gen/fail_{rule}"] == pytest.approx(rate), rule

    # Prevalence by hand: real {5,7}, {1}, {2,3,4}, {1,6,8,9} over 4 patients; generated
    # (unfiltered) {5,7}, {1}, {4}, {3}, {} twice over 10 sentences.
    real = np.zeros(N_CONDITIONS)
    for c in (5, 7, 2, 3, 4, 9, 8, 6):
        real[c] = 1 / 4
    real[1] = 2 / 4
    generated = np.zeros(N_CONDITIONS)
    generated[[5, 7, 1, 4, 3]] = 2 / 10
    np.testing.assert_allclose(result.prevalence["real"], real)
    np.testing.assert_allclose(result.prevalence["generated"], generated)
    dr, dg = real - real.mean(), generated - generated.mean()
    r_by_hand = (dr * dg).sum() / math.sqrt((dr**2).sum() * (dg**2).sum())
    assert m["eval/gen/prevalence_r"] == pytest.approx(r_by_hand)
    assert m["eval/gen/prevalence_mae"] == pytest.approx(np.abs(real - generated).mean())

    real_lengths = [3, 1, 4, 6]
    gen_lengths = [2, 7, 2, 2, 0] * 2  # the no-<EOS> sentence counts as max_words + 1
    assert m["eval/gen/length_w1"] == pytest.approx(
        stats.wasserstein_distance(real_lengths, gen_lengths)
    )
    assert m["eval/gen/length_ks"] == pytest.approx(
        stats.ks_2samp(real_lengths, gen_lengths).statistic
    )


def test_generated_samples_are_valid_rows(evaluated):
    samples = evaluated[0].samples
    assert samples.schema.equals(schema.ROW_SCHEMA)
    offset = schema.SYNTHETIC_ID_OFFSET  # generated ids never fall in the real-id range
    assert samples.column(schema.SUBJECT_ID).to_pylist() == [offset, offset + 5]  # draws 0, 5 valid
    assert samples.column(schema.CONDITIONS).to_pylist() == [[5, 7], [5, 7]]
    assert samples.column(schema.AGE_GROUPS).to_pylist() == [[2, 2], [2, 2]]
    assert samples.column(schema.WEEKS).to_pylist() == [[10, 12], [10, 12]]
    assert samples.column(schema.ENROLL_START).to_pylist() == [10, 10]
    assert samples.column(schema.ENROLL_END).to_pylist() == [12, 12]
    birth = np.asarray(samples.column(schema.BIRTH_WEEK).to_pylist())
    for row_birth in birth:
        np.testing.assert_array_equal(age_group_at(np.array([10, 12]), row_birth), [2, 2])


def test_baseline_is_scored_on_the_same_words(evaluated):
    result, batch = evaluated
    m = result.metrics
    # Fitted on the same 4 patients. Most frequent next word per context (ties broken by
    # overall frequency, then by id): <SOS> -> (9,0) [3 uses overall], age 2 -> (5,3),
    # age 1 -> (2,2), age 0 -> (9,0). Correct: patient 10 word 3; 12 word 4; 13 words 1,2,4.
    assert m["baseline/recon/tf_acc"] == pytest.approx(5 / 14)
    # Week: previous word's week, the first word gets the median first week (1): 12's second
    # word and 13's first and third.
    assert m["baseline/recon/tf_week_acc"] == pytest.approx(3 / 14)
    # Last words: right for 10 and 12; in the top 5 of their context for all four.
    assert m["baseline/extrap/top1"] == pytest.approx(2 / 4)
    assert m["baseline/extrap/top5"] == pytest.approx(1.0)
    # Interpolation: which interior word is masked is the mask's choice; count by hand.
    correct_top1 = {10: [0, 0, 1], 12: [0, 0, 0, 1], 13: [1, 1, 0, 1, 0, 0]}
    mask = make_mask(
        MaskSpec("interpolation", 0.1), batch.lengths.numpy(), batch.subject_id.numpy(), seed=0
    )
    hits = sum(
        correct_top1[int(s)][i]
        for r, s in enumerate(batch.subject_id)
        if int(s) in correct_top1
        for i in np.flatnonzero(mask[r])
    )
    assert m["baseline/interp/top1"] == pytest.approx(hits / 3)
    for name in ("validity", "prevalence_r", "length_w1", "length_ks"):
        assert math.isfinite(m[f"baseline/gen/{name}"])


def naive_copy_previous(dec_dx: torch.Tensor, k: int) -> list[list[list[int]]]:
    """The heuristic by hand: per position, the distinct words seen so far, newest first."""
    out = []
    for row in dec_dx.tolist():
        per_row = []
        for t in range(len(row)):
            seen: list[int] = []
            for token in reversed(row[: t + 1]):
                if token >= N_SPECIAL and token not in seen:
                    seen.append(token)
            per_row.append((seen + [PAD] * k)[:k])
        out.append(per_row)
    return out


def test_copy_previous_topk_matches_the_heuristic_by_hand():
    gen = torch.Generator().manual_seed(0)
    dec = torch.randint(N_SPECIAL, N_SPECIAL + 5, (6, 11), generator=gen)  # many repeats
    dec[:, 0] = SOS
    dec[2, 7:] = PAD
    top, week = copy_previous_topk(dec, dec + 100, 3)
    assert top.tolist() == naive_copy_previous(dec, 3)
    assert torch.equal(week, dec + 100)  # the previous word's week


def test_floors_are_scored_on_the_same_words(evaluated):
    result, batch = evaluated
    m = result.metrics
    # The scripted decoder ignores z, so its shuffled-z control reconstructs exactly as it
    # does (at masked positions the script reads the encoder input, which the control keeps
    # clean, so those differ).
    for name in ("recon/tf_acc", "recon/tf_week_acc"):
        assert m[f"baseline/shuffled_z/{name}"] == pytest.approx(m[f"eval/{name}"])
    naive = naive_copy_previous(batch.dec_dx, 1)
    hits = words = 0
    for row, n in enumerate(batch.lengths.tolist()):
        for i in range(n):
            words += 1
            hits += naive[row][i][0] == int(batch.tgt_dx[row, i])
    assert words == 14 and m["baseline/copy_prev/recon/tf_acc"] == pytest.approx(hits / words)
    assert m["baseline/copy_prev/recon/tf_week_acc"] == pytest.approx(
        float(((batch.dec_wk == batch.tgt_wk) & word_positions(batch.lengths, batch.tgt_dx.shape[1])).sum()) / 14
    )


def test_latent_metrics_on_the_fixed_set(evaluated):
    result, _ = evaluated
    m = result.metrics
    assert math.isnan(m["eval/latent/sex_auroc"])  # 2 patients per sex, 5 folds needed
    assert "fewer than 5 patients" in result.notes["eval/latent/sex_auroc"]
    assert m["eval/latent/z_mean_abs"] == pytest.approx((11.5 + 0 + 0 + ENCODED) / 4)
    assert m["eval/latent/z_var"] == pytest.approx((1.25 + 1.0) / 4)
    assert math.isnan(m["eval/latent/truth_r2"])
    assert "ground truth" in result.notes["eval/latent/truth_r2"]
    assert m["eval/count/latent_sample"] == 4


def test_splitting_batches_and_capping_patients_do_not_change_results(evaluated):
    split, _ = run_eval(max_logit_elements=1)  # one patient per decoder call
    for name, value in evaluated[0].metrics.items():
        assert split.metrics[name] == pytest.approx(value, nan_ok=True), name
    capped, _ = run_eval(max_patients=3)
    assert capped.metrics["eval/count/patients"] == 3
    assert capped.metrics["eval/recon/tf_acc"] == pytest.approx(6 / 8)  # patients 10, 11, 12


def test_ground_truth_is_read_from_parquet_and_scored(tmp_path):
    ids = np.arange(100, dtype=np.int64)
    latent = np.stack([ids * 0.5, -ids * 1.0], 1).astype(np.float32)
    path = tmp_path / schema.GROUND_TRUTH_DIR / schema.HELD_OUT / "part-00000.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                schema.SUBJECT_ID: ids,
                schema.LATENT: pa.array(list(latent), type=pa.list_(pa.float32())),
            }
        ),
        path,
    )
    truth = load_ground_truth(tmp_path, np.array([13, 10, 12, 11]))
    np.testing.assert_array_equal(truth.subject_id, [10, 11, 12, 13])
    np.testing.assert_allclose(truth.lookup(np.array([12, 10])), [[6.0, -12.0], [5.0, -10.0]])
    with pytest.raises(KeyError, match="subject_id \\[99\\]"):
        truth.lookup(np.array([99]))
    model = ScriptedModel()
    result = evaluate_model(
        model,
        [held_out_batch()],
        data_info=SequenceInfo(week_vocab_size=WEEK_VOCAB, max_words=MAX_WORDS),
        ground_truth=tmp_path,
        config=EvalConfig(n_generate=0, cv_folds=2),
    )
    assert math.isfinite(result.metrics["eval/latent/truth_r2"])
    # The floor probes the sentences' own summary; here z holds the subject id the truth is
    # a linear function of, and four sentences' condition counts do not.
    floor = result.metrics["baseline/latent/truth_r2"]
    assert math.isfinite(floor) and floor < result.metrics["eval/latent/truth_r2"]
    assert math.isnan(result.metrics["baseline/recon/tf_acc"])
    assert result.notes["baseline/recon/tf_acc"] == "no baseline given"
    assert result.samples.num_rows == 0
    # Per factor: unnamed without the simulator's params.json, named with it.
    assert list(result.truth_by_factor) == ["factor_0", "factor_1"]
    assert all(set(r) == {"z", "floor"} for r in result.truth_by_factor.values())
    params = tmp_path / schema.GROUND_TRUTH_DIR / "params.json"
    params.write_text(json.dumps({"latent_factors": ["frailty", "cardiometabolic"]}))
    assert load_ground_truth(tmp_path, np.array([10])).factor_names == ("frailty", "cardiometabolic")
    params.write_text(json.dumps({"latent_factors": ["frailty"]}))  # another width: not these
    assert load_ground_truth(tmp_path, np.array([10])).factor_names == ()


def test_evaluation_rejects_sentences_longer_than_max_words():
    with pytest.raises(ValueError, match="more than max_words=2"):
        evaluate_model(
            ScriptedModel(),
            [held_out_batch()],
            data_info=SequenceInfo(week_vocab_size=WEEK_VOCAB, max_words=2),
        )


# --------------------------------------------------------------------------------------------
# Pure pieces


def test_rebuilt_encoder_input_matches_collate_masking():
    rng = np.random.default_rng(3)
    patients = {}
    for sid in range(40):
        n = int(rng.integers(1, 30))
        weeks = np.sort(rng.integers(0, N_WEEKS, n))
        patients[sid] = (1, [(int(rng.integers(0, N_CONDITIONS)), 3, int(wk)) for wk in weeks])
    table = rows_table(patients)
    clean = collate(table, CollateConfig(n_weeks=N_WEEKS))
    for spec in (
        MaskSpec("training"),
        MaskSpec("interpolation", 0.2),
        MaskSpec("extrapolation", 0.3),
    ):
        masked = collate(table, CollateConfig(n_weeks=N_WEEKS, mask=spec, seed=7))
        assert masked.masked.any()
        rebuilt = mask_encoder_input(clean, masked.masked)
        assert torch.equal(rebuilt.enc_dx, masked.enc_dx), spec.kind
        assert torch.equal(rebuilt.masked, masked.masked)
        assert torch.equal(
            mask_encoder_input(masked, torch.zeros_like(masked.masked)).enc_dx, clean.enc_dx
        )


def test_histogram_distances_equal_scipy_on_expanded_samples():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 30, 500), rng.poisson(8, 300)
    w1, ks = histogram_distances(np.bincount(a), np.bincount(b))
    assert w1 == pytest.approx(stats.wasserstein_distance(a, b))
    assert ks == pytest.approx(stats.ks_2samp(a, b).statistic)
    assert histogram_distances(np.bincount(a), np.bincount(a)) == (0.0, 0.0)


def test_pearson_r_is_nan_for_a_constant_side():
    assert pearson_r(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 7.0])) == pytest.approx(
        np.corrcoef([1, 2, 3], [2, 4, 7])[0, 1]
    )
    assert math.isnan(pearson_r(np.array([1.0, 2.0]), np.array([3.0, 3.0])))


def test_mmd_matches_the_unbiased_formula_and_separates_distributions():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((7, 3)), rng.standard_normal((5, 3)) + 0.3
    scales = (0.5, 2.0)

    def k(a, b):
        d2 = ((a - b) ** 2).sum()
        return sum(2 * 3 * s / (2 * 3 * s + d2) for s in scales)

    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    xy = sum(k(x[i], y[j]) for i in range(7) for j in range(5)) / 35
    assert imq_mmd2_unbiased(x, y, scales, chunk=3) == pytest.approx(xx + yy - 2 * xy)

    null = imq_mmd2_unbiased(rng.standard_normal((1500, 8)), rng.standard_normal((1500, 8)))
    shifted = imq_mmd2_unbiased(
        rng.standard_normal((1500, 8)) + 1.0, rng.standard_normal((1500, 8))
    )
    assert abs(null) < 0.01
    assert shifted > 20 * max(abs(null), 1e-4)


def test_sex_probe_reads_sex_only_when_z_carries_it():
    rng = np.random.default_rng(2)
    sex = rng.choice([-1.0, 1.0], 2000)
    noise = rng.standard_normal((2000, 6))
    assert sex_auroc_cv(np.column_stack([sex + 0.3 * noise[:, 0], noise[:, 1:]]), sex) > 0.97
    assert abs(sex_auroc_cv(noise, sex) - 0.5) < 0.05
    assert math.isnan(sex_auroc_cv(noise[:6], np.array([1, 1, 1, 1, 1, -1.0])))


def test_linear_probe_recovers_a_linear_truth():
    rng = np.random.default_rng(4)
    z = rng.standard_normal((1000, 10))
    truth = z @ rng.standard_normal((10, 3)) + 0.01 * rng.standard_normal((1000, 3))
    assert ridge_r2_cv(z, truth) > 0.99
    assert ridge_r2_cv(z, rng.standard_normal((1000, 3))) < 0.05
    # Many sparse, irrelevant counts (the floor's bag of conditions): a probe regularised
    # enough scores about 0, not below (a grid stopping at 1e3 gave -0.08 here).
    counts = rng.poisson(0.02, (500, 400)).astype(float)
    assert ridge_r2_cv(counts, rng.standard_normal((500, 3))) > -0.02


def test_probe_by_dimension_names_the_recovered_factor_and_weights_the_whole():
    """One factor a linear function of z, one noise: the per-dimension R^2 tell them apart and
    the whole vector's is their variance-weighted mean (what ridge_r2_cv reports)."""
    rng = np.random.default_rng(5)
    z = rng.standard_normal((800, 6))
    truth = np.c_[z @ rng.standard_normal(6), 3.0 * rng.standard_normal(800)]
    whole, by_dim = ridge_r2_cv_by_dimension(z, truth)
    assert by_dim.shape == (2,) and by_dim[0] > 0.99 and abs(by_dim[1]) < 0.05
    weights = truth.var(0) / truth.var(0).sum()
    assert whole == pytest.approx(float(weights @ by_dim), abs=1e-9)
    assert whole == ridge_r2_cv(z, truth)
    nan_whole, nan_dims = ridge_r2_cv_by_dimension(z[:6], truth[:6])  # fewer rows than 2 x folds
    assert math.isnan(nan_whole) and np.isnan(nan_dims).all() and nan_dims.shape == (2,)


def test_count_probe_unscaled_survives_rare_conditions_that_break_a_scaled_one():
    """Counts with rare columns (one patient once, another 50 times): scaled on a training
    fold holding only the single count, the other patient's value is enormous (R^2 ~ -20);
    the unscaled probe, the truth-recovery floor's, recovers the signal in the common columns."""
    rng = np.random.default_rng(0)
    common = rng.poisson(0.3, (500, 100)).astype(float)
    rare = np.zeros((500, 20))
    for j in range(20):
        once, often = rng.choice(500, 2, replace=False)
        rare[once, j], rare[often, j] = 1, 50
    truth = (common @ (0.3 * rng.standard_normal(100)))[:, None] + rng.standard_normal((500, 2))
    counts = np.hstack([common, rare])
    assert ridge_r2_cv(counts, truth) < 0
    assert ridge_r2_cv(counts, truth, standardize=False) > 0.5


def test_generation_rules_accept_real_sentences_and_flag_each_failure():
    birth = np.array([-700, -1500])
    weeks = np.array([[0, 5, 60, 300], [2, 2, 3, 40]])
    ages = age_group_at(weeks, birth[:, None])
    dx = torch.from_numpy(diag_age_token(np.full_like(ages, 17), ages))
    wk = torch.from_numpy(weeks + 3)
    ok = generation_rule_failures(
        dx, wk, torch.tensor([4, 4]), max_words=4, week_vocab_size=WEEK_VOCAB + 400
    )
    assert not any(bool(v.any()) for v in ok.values())
    late = generation_rule_failures(
        dx, wk, torch.tensor([4, 4]), max_words=4, week_vocab_size=WEEK_VOCAB
    )
    assert late["token"].tolist() == [True, False]  # week 300 is outside the week vocabulary
    backwards = generation_rule_failures(
        dx.flip(1), wk.flip(1), torch.tensor([4, 4]), max_words=4, week_vocab_size=WEEK_VOCAB + 400
    )
    assert backwards["week_order"].tolist() == [True, True]
    assert generation_rule_failures(
        dx, wk, torch.tensor([4, 0]), max_words=3, week_vocab_size=WEEK_VOCAB + 400
    )["no_eos"].tolist() == [True, False]


def test_reservoir_is_bounded_and_uniform():
    reservoir = LatentReservoir(capacity=500, seed=0)
    for start in range(0, 10_000, 1000):
        ids = torch.arange(start, start + 1000)
        reservoir.add(ids[:, None].float(), torch.ones(1000), ids)
    assert len(reservoir) == 500 and reservoir.seen == 10_000
    assert len(np.unique(reservoir.subject_id)) == 500
    np.testing.assert_array_equal(reservoir.z[:, 0].astype(np.int64), reservoir.subject_id)
    # Each tenth of the stream holds ~50 of the 500 kept (binomial sd ~6.7).
    per_tenth = np.bincount(reservoir.subject_id // 1000, minlength=10)
    assert per_tenth.min() > 25 and per_tenth.max() < 75


def test_baseline_samples_follow_training_marginals():
    batch = held_out_batch()
    baseline = FrequencyBaseline.fit([batch], max_words=MAX_WORDS)
    dx, wk, n = baseline.sample(4000, np.random.default_rng(0))
    assert dx.shape == (4000, MAX_WORDS + 1)
    freq = np.bincount(n.numpy(), minlength=7) / 4000
    np.testing.assert_allclose(freq, [0, 0.25, 0, 0.25, 0.25, 0, 0.25, 0][:7], atol=0.03)
    words = torch.arange(dx.shape[1])[None, :] < n[:, None]
    assert bool((dx[words] >= 3).all()) and bool((dx[~words] == PAD).all())
    age = (dx - 3) % 24
    pairs = words[:, 1:] & words[:, :-1]
    assert not bool((pairs & (age[:, 1:] < age[:, :-1])).any())  # real transitions never age back
    fails = generation_rule_failures(
        dx, wk, n, max_words=MAX_WORDS, week_vocab_size=WEEK_VOCAB + 100
    )
    assert not bool(fails["week_order"].any()) and not bool(fails["no_eos"].any())


def test_ground_truth_rejects_duplicates():
    with pytest.raises(ValueError, match="subject_id 3 appears twice"):
        GroundTruth.from_arrays(np.array([3, 1, 3]), np.zeros((3, 2)))
