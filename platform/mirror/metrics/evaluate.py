"""Evaluate a trained model on ``held_out``: the four tasks of seed 000 plus latent probes,
each beside the frequency baseline's floor.

One streaming pass over held-out batches does reconstruction, interpolation and
extrapolation and collects the real-data statistics (condition prevalence, lengths, sex
marginal) and a bounded reservoir of z; then z ~ N(0, I) is decoded for generation and the
latent probes run on the reservoir. Memory is O(batch + reservoir + n_generate samples),
never O(held-out patients). Metric definitions are in ``mirror.metrics.tasks``.

Floors, all under ``baseline/...`` (``mirror.metrics.baselines``):

* ``baseline/<task>/...``: the age-conditioned unigram model fitted on train (every task);
* ``baseline/copy_prev/...``: the copy-previous-word heuristic (teacher-forced accuracy, week
  accuracy, top-k at masked positions: the k most recent distinct words of the prefix);
* ``baseline/shuffled_z/...``: the model's own decoder under teacher forcing with z rolled by
  one row across the batch (each patient decoded with another patient's z): what the decoder
  gets from the prefix alone. At masked positions the decoder input is the true prefix, so
  the control there is the same shuffled-z prediction;
* ``baseline/latent/truth_r2``: the ridge probe's R² from the observed sentence itself
  (bag-of-conditions counts, length, first age group) to the true latent state: z should
  recover at least what these summary features do.

Masks come from ``mirror.data.collate.make_mask`` (a pure function of seed, subject id and
word index), so two models evaluated with the same seed are scored on the same words.
Every metric in :data:`METRIC_NAMES` is always present; one that cannot be computed is NaN
and ``EvalResult.notes`` says why.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from mirror.data import schema
from mirror.data.batch import SequenceBatch, SequenceInfo
from mirror.data.collate import MaskSpec, make_mask
from mirror.data.simulator import latent_factor_names
from mirror.data.vocab import N_AGE_GROUPS, N_CONDITIONS, N_SPECIAL
from mirror.metrics.baselines import FrequencyBaseline, copy_previous_topk
from mirror.metrics.tasks import (
    GENERATION_RULES,
    ConditionPrevalence,
    LatentReservoir,
    LengthHistogram,
    Sums,
    birth_week_bounds,
    condition_sets,
    generation_rule_failures,
    greedy_sums,
    histogram_distances,
    imq_mmd2_unbiased,
    mask_encoder_input,
    pearson_r,
    ridge_r2_cv_by_dimension,
    sex_auroc_cv,
    teacher_forced_sums,
    topk_hits,
    word_positions,
)
from mirror.progress import progress

if TYPE_CHECKING:
    from mirror.models.base import SequenceDecoder

# --------------------------------------------------------------------------------------------
# Metric names: shared by every model, so runs line up in MLflow's compare view.

TOPK = (1, 5)
RECON_METRICS = (
    "tf_acc",
    "tf_week_acc",
    "greedy_acc",
    "jaccard",
    "week_mae",
    "length_acc",
    "exact_match",
)
MASKED_METRICS = tuple(f"top{k}" for k in TOPK)
GEN_METRICS = ("validity", "prevalence_r", "prevalence_mae", "length_w1", "length_ks") + tuple(
    f"fail_{rule}" for rule in GENERATION_RULES
)
LATENT_METRICS = ("sex_auroc", "mmd", "truth_r2", "z_mean_abs", "z_var")
COUNT_METRICS = (
    "patients",
    "words",
    "interp_masked",
    "extrap_masked",
    "generated",
    "generated_valid",
    "latent_sample",
)


def _task_names(prefix: str) -> tuple[str, ...]:
    return (
        tuple(f"{prefix}/recon/{m}" for m in RECON_METRICS)
        + tuple(f"{prefix}/interp/{m}" for m in MASKED_METRICS)
        + tuple(f"{prefix}/extrap/{m}" for m in MASKED_METRICS)
        + tuple(f"{prefix}/gen/{m}" for m in GEN_METRICS)
    )


MODEL_METRIC_NAMES: tuple[str, ...] = (
    _task_names("eval")
    + tuple(f"eval/latent/{m}" for m in LATENT_METRICS)
    + tuple(f"eval/count/{m}" for m in COUNT_METRICS)
)
# The unigram floor of every task (needs a fitted FrequencyBaseline).
UNIGRAM_METRIC_NAMES: tuple[str, ...] = _task_names("baseline")
# Teacher-forced floors that need no fitting: "baseline/<floor>/<task>/<metric>".
TEACHER_FORCED_FLOORS = ("copy_prev", "shuffled_z")
FLOOR_TASK_METRICS = ("recon/tf_acc", "recon/tf_week_acc") + tuple(
    f"{task}/{m}" for task in ("interp", "extrap") for m in MASKED_METRICS
)
FLOOR_METRIC_NAMES: tuple[str, ...] = tuple(
    f"baseline/{floor}/{m}" for floor in TEACHER_FORCED_FLOORS for m in FLOOR_TASK_METRICS
) + ("baseline/latent/truth_r2",)
BASELINE_METRIC_NAMES: tuple[str, ...] = UNIGRAM_METRIC_NAMES + FLOOR_METRIC_NAMES
METRIC_NAMES: tuple[str, ...] = MODEL_METRIC_NAMES + BASELINE_METRIC_NAMES


def model_metric_of(baseline_name: str) -> str:
    """The ``eval/...`` metric a floor stands beside: ``baseline/copy_prev/recon/tf_acc`` ->
    ``eval/recon/tf_acc``."""
    parts = baseline_name.split("/")[1:]
    if parts[0] in TEACHER_FORCED_FLOORS:
        parts = parts[1:]
    return "/".join(["eval", *parts])

# Which way is better, per metric suffix: "max", "min", or a target value ("0.5", "1.0").
_GOALS = {
    **dict.fromkeys(
        RECON_METRICS + MASKED_METRICS + ("validity", "prevalence_r", "truth_r2"), "max"
    ),
    **dict.fromkeys(
        ("week_mae", "prevalence_mae", "length_w1", "length_ks", "mmd", "z_mean_abs"), "min"
    ),
    **dict.fromkeys(tuple(f"fail_{rule}" for rule in GENERATION_RULES), "min"),
    "sex_auroc": "0.5",
    "z_var": "1.0",
}
METRIC_GOALS: dict[str, str] = {
    name: _GOALS[name.rsplit("/", 1)[1]] for name in METRIC_NAMES if "/count/" not in name
}


# --------------------------------------------------------------------------------------------
# Inputs and outputs


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation settings; all sizes are per evaluation run.

    max_patients: held-out patients scored (None = the whole iterable).
    n_generate: sentences decoded from z ~ N(0, I) (and sampled from the baseline).
    latent_reservoir: patients whose z is kept (uniform sample) for the latent probes.
    mmd_samples: z (and prior) samples in the O(n^2) MMD estimate.
    max_logit_elements: cap on B * T * V_dx per decoder call; larger batches are split by rows
        (a (512, 101, 14523) float32 logit tensor alone is 3 GB).
    """

    interp_rate: float = 0.1
    extrap_rate: float = 0.1
    max_patients: int | None = None
    n_generate: int = 2_000
    gen_batch_size: int = 512
    latent_reservoir: int = 20_000
    mmd_samples: int = 4_000
    cv_folds: int = 5
    seed: int = 0
    max_logit_elements: int = 2**27

    def __post_init__(self) -> None:
        for name in ("n_generate", "mmd_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"EvalConfig.{name}: expected >= 0, got {getattr(self, name)}")
        for name in ("gen_batch_size", "latent_reservoir", "max_logit_elements"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvalConfig.{name}: expected >= 1, got {getattr(self, name)}")
        if self.cv_folds < 2:
            raise ValueError(f"EvalConfig.cv_folds: expected >= 2, got {self.cv_folds}")
        if self.max_patients is not None and self.max_patients < 1:
            raise ValueError(
                f"EvalConfig.max_patients: expected None or >= 1, got {self.max_patients}"
            )


@dataclass(frozen=True)
class GroundTruth:
    """True latent health state per patient (simulated data), sorted by subject id."""

    subject_id: np.ndarray  # (n,) int64, sorted, unique
    latent: np.ndarray  # (n, k) float32
    source: str = "arrays"
    factor_names: tuple[str, ...] = ()  # one per latent column (the simulator's); () -> factor_<k>

    def factor_name(self, k: int) -> str:
        return self.factor_names[k] if k < len(self.factor_names) else f"factor_{k}"

    @classmethod
    def from_arrays(
        cls, subject_id: np.ndarray, latent: np.ndarray, source: str = "arrays",
        factor_names: tuple[str, ...] = (),
    ) -> GroundTruth:
        ids = np.asarray(subject_id, dtype=np.int64)
        latent = np.asarray(latent, dtype=np.float32)
        if latent.ndim == 1:
            latent = latent[:, None]
        if latent.shape[0] != ids.shape[0]:
            raise ValueError(
                f"{source}: {ids.shape[0]} subject ids but {latent.shape[0]} latent rows"
            )
        order = np.argsort(ids, kind="stable")
        ids, latent = ids[order], latent[order]
        dup = np.flatnonzero(ids[1:] == ids[:-1])
        if dup.size:
            raise ValueError(
                f"{source}: subject_id {ids[dup[0]]} appears twice (rule: one row per patient)"
            )
        if factor_names and len(factor_names) != latent.shape[1]:
            raise ValueError(
                f"{source}: {len(factor_names)} factor names for {latent.shape[1]} latent columns"
            )
        return cls(ids, latent, source, tuple(factor_names))

    def lookup(self, subject_id: np.ndarray) -> np.ndarray:
        """Latent rows of ``subject_id`` in that order; raises naming missing ids."""
        ids = np.asarray(subject_id, dtype=np.int64)
        if self.subject_id.size == 0:
            pos, missing = np.zeros_like(ids), ids
        else:
            pos = np.searchsorted(self.subject_id, ids).clip(0, self.subject_id.size - 1)
            missing = ids[self.subject_id[pos] != ids]
        if missing.size:
            raise KeyError(
                f"{self.source}: no ground truth for {missing.size} of {ids.size} patients, "
                f"e.g. subject_id {missing[:5].tolist()}"
            )
        return self.latent[pos]


def load_ground_truth(dataset_dir: str | Path, subject_ids: np.ndarray) -> GroundTruth:
    """Latent state of ``subject_ids`` from ``<dataset_dir>/ground_truth/**/*.parquet``.

    Reads only the two columns and keeps only the requested rows, one file at a time, so
    memory is bounded by the request, not by the dataset.
    """
    root = Path(dataset_dir) / schema.GROUND_TRUTH_DIR
    files = sorted(
        p
        for p in root.rglob("*.parquet")
        if {schema.SUBJECT_ID, schema.LATENT} <= set(pq.read_schema(p).names)
    )
    if not files:
        raise FileNotFoundError(
            f"{root}: no parquet file with columns {schema.SUBJECT_ID!r} and {schema.LATENT!r}"
        )
    wanted = pa.array(np.unique(np.asarray(subject_ids, dtype=np.int64)))
    ids, rows = [], []
    for path in files:
        table = pq.read_table(path, columns=[schema.SUBJECT_ID, schema.LATENT])
        table = table.filter(pc.is_in(table[schema.SUBJECT_ID], value_set=wanted))
        if table.num_rows == 0:
            continue
        latent = table[schema.LATENT].combine_chunks()
        widths = np.diff(latent.offsets.to_numpy())
        if widths.min() != widths.max():
            raise ValueError(
                f"{path}: column {schema.LATENT!r} has rows of different widths (rule: fixed width)"
            )
        ids.append(table[schema.SUBJECT_ID].to_numpy())
        rows.append(
            latent.flatten().to_numpy(zero_copy_only=False).reshape(table.num_rows, int(widths[0]))
        )
    if not ids:
        return GroundTruth.from_arrays(
            np.empty(0, np.int64), np.empty((0, 1), np.float32), str(root)
        )
    latent = np.concatenate(rows)
    return GroundTruth.from_arrays(
        np.concatenate(ids), latent, str(root), latent_factor_names(root, latent.shape[1])
    )


@dataclass
class EvalResult:
    metrics: dict[str, float]  # every name in METRIC_NAMES
    notes: dict[str, str]  # metric name -> why it is NaN, and other caveats
    samples: pa.Table  # valid generated sentences in schema.ROW_SCHEMA (ids from SYNTHETIC_ID_OFFSET)
    prevalence: dict[str, np.ndarray]  # "real", "generated", "baseline": (N_CONDITIONS,)
    length_histograms: dict[str, np.ndarray]  # same keys: counts of lengths 0..max_words+1
    # Simulated data: per latent factor, the R^2 of the probe from z ("z") and of the floor's
    # probe from the sentence's counts ("floor"): which factors each recovers. {} without truth.
    truth_by_factor: dict[str, dict[str, float]] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Helpers


def _rows(batch: SequenceBatch, start: int, stop: int) -> SequenceBatch:
    return SequenceBatch(
        **{f.name: getattr(batch, f.name)[start:stop] for f in fields(SequenceBatch)}
    )


def _limited(batches: Iterable[SequenceBatch], max_patients: int | None) -> Iterator[SequenceBatch]:
    """Batches up to exactly ``max_patients`` patients (the last one sliced)."""
    seen = 0
    for batch in batches:
        if max_patients is not None and seen + batch.size > max_patients:
            if max_patients > seen:
                yield _rows(batch, 0, max_patients - seen)
            return
        seen += batch.size
        yield batch


def _sub_batches(
    batch: SequenceBatch, max_elements: int, vocab_size: int
) -> Iterator[SequenceBatch]:
    rows = max(1, max_elements // (batch.enc_dx.shape[1] * vocab_size))
    for start in range(0, batch.size, rows):
        yield batch if rows >= batch.size else _rows(batch, start, start + rows)


def _mask_like(kind: str, rate: float, batch: SequenceBatch, seed: int) -> torch.Tensor:
    """(B, L) mask of ``kind`` for this batch, identical to what collate would draw."""
    lengths = batch.lengths.cpu().numpy()
    mask = make_mask(
        MaskSpec(kind=kind, rate=rate), lengths, batch.subject_id.cpu().numpy(), seed=seed
    )
    width = batch.masked.shape[1]
    out = np.zeros((batch.size, width), dtype=bool)
    out[:, : mask.shape[1]] = mask[:, :width]
    return torch.from_numpy(out).to(batch.lengths.device)


def _model_topk(
    model: SequenceDecoder, batch: SequenceBatch, z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k diagnosis-age ids (B, T, k) and argmax week ids (B, T) under teacher forcing;
    the full logits are freed at once."""
    dx_logits, wk_logits = model.teacher_forced_logits(batch, z)
    top = dx_logits.topk(max(TOPK), dim=-1).indices
    week = wk_logits.argmax(-1)
    return top, week


def _masked_select(mask: torch.Tensor, width: int) -> torch.Tensor:
    """(B, L) word mask -> (B, T) selection of target positions."""
    select = torch.zeros(mask.shape[0], width, dtype=torch.bool, device=mask.device)
    select[:, : mask.shape[1]] = mask
    return select


def generated_rows(
    dx: torch.Tensor, wk: torch.Tensor, n: torch.Tensor, sex: torch.Tensor, ids: np.ndarray
) -> pa.Table:
    """Valid generated sentences (no rule of ``generation_rule_failures`` failed) as
    ``schema.ROW_SCHEMA`` rows; birth week = middle of the feasible range, enrolment = first to
    last word (the model decodes no enrolment dates)."""
    width = dx.shape[1]
    words = torch.arange(width)[None, :] < n[:, None]
    age = (dx - N_SPECIAL).clamp(min=0) % N_AGE_GROUPS
    week = wk - N_SPECIAL
    lo, hi = birth_week_bounds(age, week, words)
    flat_dx, flat_age, flat_week = dx[words].numpy(), age[words].numpy(), week[words].numpy()
    offsets = np.concatenate([[0], np.cumsum(n.numpy())]).astype(np.int32)
    return schema.fill_missing_modalities(pa.Table.from_arrays(
        [
            pa.array(np.asarray(ids).astype(np.int64)),
            pa.array(sex.numpy().astype(np.int8)),
            pa.array(((lo + hi) // 2).numpy().astype(np.int32)),
            pa.array(flat_week[offsets[:-1]].astype(np.int32)),
            pa.array(flat_week[offsets[1:] - 1].astype(np.int32)),
            pa.array(n.numpy().astype(np.int32)),
            pa.ListArray.from_arrays(
                pa.array(offsets),
                pa.array(((flat_dx - N_SPECIAL) // N_AGE_GROUPS).astype(np.int16)),
            ),
            pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat_age.astype(np.int8))),
            pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat_week.astype(np.int32))),
        ],
        schema=schema.DIAGNOSIS_SCHEMA,
    ))


class _GenerationScore:
    """Streaming scores of generated sentences: rule failures, prevalence, lengths, rows."""

    def __init__(self, prefix: str, max_words: int, week_vocab_size: int, keep_rows: bool) -> None:
        self.prefix = prefix
        self.max_words = max_words
        self.week_vocab_size = week_vocab_size
        self.sums = Sums()
        self.prevalence = ConditionPrevalence()
        self.lengths = LengthHistogram(max_words + 1)
        self.keep_rows = keep_rows
        self.tables: list[pa.Table] = []
        self.next_id = 0

    def add(
        self, dx: torch.Tensor, wk: torch.Tensor, n_words: torch.Tensor, sex: torch.Tensor
    ) -> None:
        dx, wk, n_words, sex = dx.cpu(), wk.cpu(), n_words.cpu().long(), sex.cpu()
        fails = generation_rule_failures(
            dx, wk, n_words, max_words=self.max_words, week_vocab_size=self.week_vocab_size
        )
        valid = torch.ones_like(n_words, dtype=torch.bool)
        for rule, failed in fails.items():
            self.sums.add({f"fail_{rule}": float(failed.sum())})
            valid &= ~failed
        self.sums.add({"valid": float(valid.sum()), "generated": float(n_words.shape[0])})
        n_clipped = n_words.clamp(0, dx.shape[1])
        self.prevalence.add(condition_sets(dx, n_clipped))
        self.lengths.add(n_clipped)
        if self.keep_rows:
            ids = schema.SYNTHETIC_ID_OFFSET + self.next_id + np.flatnonzero(valid.numpy())
            self.tables.append(generated_rows(dx[valid], wk[valid], n_words[valid], sex[valid], ids))
        self.next_id += int(n_words.shape[0])

    def metrics(self, real_prevalence: np.ndarray, real_lengths: np.ndarray) -> dict[str, float]:
        p = self.prefix
        out = {f"{p}/gen/validity": self.sums.ratio("valid", "generated")}
        for rule in GENERATION_RULES:
            out[f"{p}/gen/fail_{rule}"] = self.sums.ratio(f"fail_{rule}", "generated")
        generated = self.prevalence.prevalence()
        out[f"{p}/gen/prevalence_r"] = pearson_r(real_prevalence, generated)
        out[f"{p}/gen/prevalence_mae"] = float(np.mean(np.abs(real_prevalence - generated)))
        w1, ks = histogram_distances(real_lengths, self.lengths.counts)
        out[f"{p}/gen/length_w1"] = w1
        out[f"{p}/gen/length_ks"] = ks
        return out

    def samples(self) -> pa.Table:
        return pa.concat_tables(self.tables) if self.tables else schema.ROW_SCHEMA.empty_table()


def _floor_metrics(sums: Sums) -> dict[str, float]:
    out = {}
    for floor in TEACHER_FORCED_FLOORS:
        p = f"baseline/{floor}"
        out[f"{p}/recon/tf_acc"] = sums.ratio(f"{p}/tf/tf_correct", f"{p}/tf/words")
        out[f"{p}/recon/tf_week_acc"] = sums.ratio(f"{p}/tf/tf_week_correct", f"{p}/tf/words")
        for task in ("interp", "extrap"):
            for k in TOPK:
                out[f"{p}/{task}/top{k}"] = sums.ratio(f"{p}/{task}/top{k}", f"{p}/{task}/masked")
    return out


def sentence_features(batch: SequenceBatch) -> torch.Tensor:
    """(B, N_CONDITIONS + 2) float: how often each condition occurs in the sentence, its
    length and its first word's age group: the summary the truth-recovery floor probes."""
    words = word_positions(batch.lengths, batch.tgt_dx.shape[1]) & (batch.tgt_dx >= N_SPECIAL)
    cond = torch.where(words, (batch.tgt_dx - N_SPECIAL) // N_AGE_GROUPS, torch.full_like(batch.tgt_dx, N_CONDITIONS))
    counts = torch.zeros(batch.size, N_CONDITIONS + 1, device=cond.device).scatter_add_(
        1, cond, torch.ones_like(cond, dtype=torch.float32)
    )[:, :N_CONDITIONS]
    first_age = ((batch.tgt_dx[:, 0] - N_SPECIAL).clamp(min=0) % N_AGE_GROUPS).float()
    return torch.cat([counts, batch.lengths.float()[:, None], first_age[:, None]], dim=1)


def _task_metrics(sums: Sums, prefix: str) -> dict[str, float]:
    tf, gr = f"{prefix}/tf/", f"{prefix}/greedy/"
    out = {
        f"{prefix}/recon/tf_acc": sums.ratio(tf + "tf_correct", tf + "words"),
        f"{prefix}/recon/tf_week_acc": sums.ratio(tf + "tf_week_correct", tf + "words"),
        f"{prefix}/recon/greedy_acc": sums.ratio(gr + "greedy_correct", gr + "words"),
        f"{prefix}/recon/jaccard": sums.ratio(gr + "jaccard", gr + "patients"),
        f"{prefix}/recon/week_mae": sums.ratio(gr + "week_abs_err", gr + "week_pairs"),
        f"{prefix}/recon/length_acc": sums.ratio(gr + "length_match", gr + "patients"),
        f"{prefix}/recon/exact_match": sums.ratio(gr + "exact", gr + "patients"),
    }
    for task in ("interp", "extrap"):
        for k in TOPK:
            out[f"{prefix}/{task}/top{k}"] = sums.ratio(
                f"{prefix}/{task}/top{k}", f"{prefix}/{task}/masked"
            )
    return out


# --------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate_model(
    model: SequenceDecoder,
    held_out: Iterable[SequenceBatch],
    *,
    data_info: SequenceInfo,
    baseline: FrequencyBaseline | None = None,
    ground_truth: GroundTruth | str | Path | None = None,
    config: EvalConfig | None = None,
    device: torch.device | str = "cpu",
) -> EvalResult:
    """Score ``model`` on unmasked held-out batches (collate with ``mask=None``; any mask a
    batch carries is ignored, since the encoder input is rebuilt from the targets).

    ``baseline``: a :class:`FrequencyBaseline` fitted on train, scored on the same batches
    and the same masks (``baseline/...``). ``ground_truth``: a :class:`GroundTruth`, or the
    dataset directory of a simulated dataset, for ``eval/latent/truth_r2``. The model must
    already be on ``device``; it is put in eval mode for the call and restored after.
    """
    cfg = config or EvalConfig()
    device = torch.device(device)
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    try:
        return _evaluate(model, held_out, data_info, baseline, ground_truth, cfg, device)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()


def _score_masked(
    sums: Sums, prefix: str, topk: torch.Tensor, batch: SequenceBatch, select: torch.Tensor
) -> None:
    hits = topk_hits(topk, batch.tgt_dx, select, TOPK)
    sums.add({f"top{k}": h for k, h in hits.items()} | {"masked": float(select.sum())}, prefix)


def _score_model_batch(
    model: SequenceDecoder,
    batch: SequenceBatch,
    masks: dict[str, torch.Tensor],
    sums: Sums,
    reservoir: LatentReservoir,
) -> None:
    """Reconstruction from the unmasked input; interpolation and extrapolation from the
    masked one (a fresh z each), scored at the masked words."""
    width = batch.tgt_dx.shape[1]
    clean = mask_encoder_input(batch, torch.zeros_like(batch.masked))
    z = model.encode(clean)
    top, week = _model_topk(model, clean, z)
    sums.add(teacher_forced_sums(top[..., 0], week, batch), "eval/tf/")
    # Floors that need the batch only (copy the prefix) or the model's decoder with another
    # patient's z (rolled by one row: no patient keeps its own when B >= 2).
    floors = {
        "copy_prev": copy_previous_topk(batch.dec_dx, batch.dec_wk, max(TOPK)),
        "shuffled_z": _model_topk(model, clean, z.roll(1, dims=0)),
    }
    for floor, (floor_top, floor_week) in floors.items():
        sums.add(teacher_forced_sums(floor_top[..., 0], floor_week, batch), f"baseline/{floor}/tf/")
        for task, select in masks.items():
            _score_masked(sums, f"baseline/{floor}/{task}/", floor_top, batch, select)
    # Decoding L + 1 words (L: the longest true sentence here) shows whether each <EOS> comes
    # in the right place; decoding on to max_words would only cost time.
    gen_dx, gen_wk, gen_len = model.generate(z, batch.sex, width)
    sums.add(greedy_sums(gen_dx, gen_wk, gen_len, batch), "eval/greedy/")
    reservoir.add(z, batch.sex, batch.subject_id, features=sentence_features(batch))
    for task, select in masks.items():
        masked = mask_encoder_input(batch, select[:, : width - 1])
        top_masked, _ = _model_topk(model, masked, model.encode(masked))
        _score_masked(sums, f"eval/{task}/", top_masked, batch, select)


def _score_baseline_batch(
    baseline: FrequencyBaseline,
    greedy: tuple[torch.Tensor, torch.Tensor, int],
    batch: SequenceBatch,
    masks: dict[str, torch.Tensor],
    sums: Sums,
) -> None:
    """The same words scored by the frequency floor (it ignores the encoder input, so one
    teacher-forced prediction serves all three tasks)."""
    top, week = baseline.teacher_forced(batch, max(TOPK))
    sums.add(teacher_forced_sums(top[..., 0], week, batch), "baseline/tf/")
    dx, wk, length = greedy
    rows, device = batch.size, batch.tgt_dx.device
    sums.add(
        greedy_sums(
            dx.to(device).expand(rows, -1),
            wk.to(device).expand(rows, -1),
            torch.full((rows,), length, device=device),
            batch,
        ),
        "baseline/greedy/",
    )
    for task, select in masks.items():
        _score_masked(sums, f"baseline/{task}/", top, batch, select)


def _generate(
    model: SequenceDecoder,
    baseline: FrequencyBaseline | None,
    score: _GenerationScore,
    base_score: _GenerationScore,
    female_share: float,
    cfg: EvalConfig,
    device: torch.device,
) -> None:
    """Decode z from the model's generation prior (``sample_latent``) by ancestral sampling (the model's configured temperature and top-p,
    the same decoding as the scorecard's ``sample_rows``) with sex drawn from the held-out
    marginal, and sample the baseline,
    in chunks of ``gen_batch_size``; decoding runs one word past max_words to see <EOS>."""
    steps = score.max_words + 1
    torch_gen = torch.Generator().manual_seed(cfg.seed)
    draws = torch.Generator(device=device).manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    for start in range(0, cfg.n_generate, cfg.gen_batch_size):
        b = min(cfg.gen_batch_size, cfg.n_generate - start)
        z = model.sample_latent(b, torch_gen)
        sex = torch.where(torch.rand(b, generator=torch_gen) < female_share, 1.0, -1.0)
        # Ancestral sampling, as the Generator capability samples for the scorecard.
        decoded = model.generate(z.to(device), sex.to(device), steps, greedy=False, generator=draws)
        score.add(*decoded, sex)
        if baseline is not None:
            base_score.add(*baseline.sample(b, rng, steps), torch.zeros(b))


def _evaluate(
    model: SequenceDecoder,
    held_out: Iterable[SequenceBatch],
    data_info: SequenceInfo,
    baseline: FrequencyBaseline | None,
    ground_truth: GroundTruth | str | Path | None,
    cfg: EvalConfig,
    device: torch.device,
) -> EvalResult:
    max_words = data_info.max_words
    sums = Sums()
    real_prevalence = ConditionPrevalence()
    real_lengths = LengthHistogram(max_words + 1)
    reservoir = LatentReservoir(cfg.latent_reservoir, seed=cfg.seed)
    females = 0
    base_greedy = baseline.greedy_sentence(max_words + 1) if baseline is not None else None
    bar = progress(cfg.max_patients, "evaluating held-out patients")
    for full_batch in _limited(held_out, cfg.max_patients):
        bar.update(full_batch.size)
        longest = int(full_batch.lengths.max())
        if longest > max_words:
            raise ValueError(
                f"evaluate_model: a held-out sentence has {longest} words, more than "
                f"max_words={max_words} (rule: filter held_out like train)"
            )
        full_batch = full_batch.to(device)
        vocab_size = data_info.diag_age_vocab_size
        for batch in _sub_batches(full_batch, cfg.max_logit_elements, vocab_size):
            width = batch.tgt_dx.shape[1]
            real_prevalence.add(condition_sets(batch.tgt_dx, batch.lengths))
            real_lengths.add(batch.lengths)
            females += int((batch.sex > 0).sum())
            masks = {
                "interp": _mask_like("interpolation", cfg.interp_rate, batch, cfg.seed),
                "extrap": _mask_like("extrapolation", cfg.extrap_rate, batch, cfg.seed),
            }
            masks = {task: _masked_select(mask, width) for task, mask in masks.items()}
            _score_model_batch(model, batch, masks, sums, reservoir)
            if baseline is not None:
                _score_baseline_batch(baseline, base_greedy, batch, masks, sums)
    patients = real_prevalence.patients
    if patients == 0:
        raise ValueError("evaluate_model: the held-out iterable yielded no patients")

    gen = _GenerationScore("eval", max_words, data_info.week_vocab_size, keep_rows=True)
    base_gen = _GenerationScore("baseline", max_words, data_info.week_vocab_size, keep_rows=False)
    _generate(model, baseline, gen, base_gen, females / patients, cfg, device)

    notes: dict[str, str] = {}
    if cfg.n_generate == 0:
        notes.update(dict.fromkeys((n for n in METRIC_NAMES if "/gen/" in n), "n_generate = 0"))
    if baseline is None:
        notes.update(dict.fromkeys(UNIGRAM_METRIC_NAMES, "no baseline given"))
    metrics = _task_metrics(sums, "eval") | _task_metrics(sums, "baseline") | _floor_metrics(sums)
    metrics |= gen.metrics(real_prevalence.prevalence(), real_lengths.counts)
    metrics |= base_gen.metrics(real_prevalence.prevalence(), real_lengths.counts)
    latent_metrics, truth_by_factor = _latent_metrics(reservoir, ground_truth, cfg, notes)
    metrics |= latent_metrics
    counts = {
        "patients": patients,
        "words": int(sums["eval/tf/words"]),
        "interp_masked": int(sums["eval/interp/masked"]),
        "extrap_masked": int(sums["eval/extrap/masked"]),
        "generated": int(gen.sums["generated"]),
        "generated_valid": int(gen.sums["valid"]),
        "latent_sample": len(reservoir),
    }
    metrics |= {f"eval/count/{k}": float(v) for k, v in counts.items()}
    for name in METRIC_NAMES:
        metrics.setdefault(name, math.nan)
        if math.isnan(metrics[name]) and name not in notes:
            notes[name] = "nothing to count (no eligible positions or patients)"
    return EvalResult(
        metrics={name: metrics[name] for name in METRIC_NAMES},
        notes=notes,
        samples=gen.samples(),
        prevalence={
            "real": real_prevalence.prevalence(),
            "generated": gen.prevalence.prevalence(),
            "baseline": base_gen.prevalence.prevalence(),
        },
        length_histograms={
            "real": real_lengths.counts,
            "generated": gen.lengths.counts,
            "baseline": base_gen.lengths.counts,
        },
        truth_by_factor=truth_by_factor,
    )


def _latent_metrics(
    reservoir: LatentReservoir,
    ground_truth: GroundTruth | str | Path | None,
    cfg: EvalConfig,
    notes: dict[str, str],
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The latent metrics, and (simulated data) each truth factor's R^2 from z and the floor."""
    z, sex = reservoir.z.astype(np.float64), reservoir.sex
    out = {
        "eval/latent/sex_auroc": sex_auroc_cv(z, sex, folds=cfg.cv_folds, seed=cfg.seed),
        "eval/latent/z_mean_abs": float(np.abs(z.mean(0)).mean()),
        "eval/latent/z_var": float(z.var(0).mean()),
    }
    if math.isnan(out["eval/latent/sex_auroc"]):
        notes["eval/latent/sex_auroc"] = (
            f"fewer than {cfg.cv_folds} patients of one sex in the sample"
        )
    rng = np.random.default_rng(cfg.seed)
    n = min(cfg.mmd_samples, len(reservoir))
    pick = rng.choice(len(reservoir), size=n, replace=False)
    prior = rng.standard_normal((n, z.shape[1]))
    out["eval/latent/mmd"] = imq_mmd2_unbiased(z[pick], prior)
    if ground_truth is None:
        out["eval/latent/truth_r2"] = math.nan
        notes["eval/latent/truth_r2"] = "no ground truth (only simulated datasets have one)"
        notes["baseline/latent/truth_r2"] = notes["eval/latent/truth_r2"]
        return out, {}
    truth = (
        ground_truth
        if isinstance(ground_truth, GroundTruth)
        else load_ground_truth(ground_truth, reservoir.subject_id)
    )
    latent = truth.lookup(reservoir.subject_id)
    out["eval/latent/truth_r2"], from_z = ridge_r2_cv_by_dimension(
        z, latent, folds=cfg.cv_folds, seed=cfg.seed
    )
    # The floor: the same probe on what the sentence shows directly, same patients, folds;
    # counts unscaled (ridge_r2_cv: scaling sparse counts makes the probe unstable).
    out["baseline/latent/truth_r2"], from_counts = ridge_r2_cv_by_dimension(
        reservoir.features.astype(np.float64), latent, folds=cfg.cv_folds, seed=cfg.seed, standardize=False
    )
    by_factor = {
        truth.factor_name(k): {"z": float(from_z[k]), "floor": float(from_counts[k])}
        for k in range(latent.shape[1])
    }
    return out, by_factor


__all__ = [
    "BASELINE_METRIC_NAMES",
    "FLOOR_METRIC_NAMES",
    "METRIC_GOALS",
    "METRIC_NAMES",
    "MODEL_METRIC_NAMES",
    "EvalConfig",
    "EvalResult",
    "GroundTruth",
    "evaluate_model",
    "load_ground_truth",
    "model_metric_of",
]
