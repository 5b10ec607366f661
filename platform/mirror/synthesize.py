"""Synthetic patients from a trained generator, written in the platform's dataset layout.

The model (the ``generator`` capability) draws patients and returns only the valid ones as
rows, with how many draws failed each validity rule (for sentence models: z ~ N(0, I) and sex
from the training split's marginal, decoded, checked by the evaluation's validity definition).
Invalid draws are replaced by new ones, never written; the counts go into ``dataset.json``.

Synthetic subject ids start at ``SYNTHETIC_ID_OFFSET`` so they cannot collide with real ids;
being outside the split reservoir, they all land in ``train``.
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mirror.data import schema
from mirror.data.schema import TRAIN, DatasetMetadata
from mirror.models.base import CounterfactualGenerator, GenerationContext, Generator
from mirror.progress import progress

if TYPE_CHECKING:
    from mirror.data.views.base import DataView

SYNTHETIC_ID_OFFSET = schema.SYNTHETIC_ID_OFFSET
PATIENTS_PER_FILE = 250_000
PATIENTS_PER_READ = 16_384  # real rows decoded at a time when a generator twins them


class TooFewValidSentences(RuntimeError):
    """The model's sentences are almost all invalid (e.g. it never emits ``<EOS>`` yet)."""


@dataclass
class SampleReport:
    written: int
    drawn: int
    rejected: dict[str, int]

    @property
    def validity_rate(self) -> float:
        return self.written / max(1, self.drawn)


def female_fraction(real_root: str | Path) -> float:
    """Share of sex == 1 in the training split, reading only the 1-byte sex column."""
    females = total = 0
    for path in schema.split_files(real_root, TRAIN):
        sex = pq.read_table(path, columns=[schema.SEX]).column(0).to_numpy()
        females += int((sex == 1).sum())
        total += len(sex)
    if total == 0:
        raise ValueError(f"{real_root}: training split is empty")
    return females / total


class RealRowStream:
    """A split's real rows, ``take(n)`` at a time, read row group by row group (never the
    whole split). At the end it starts over: each pass twins every row again with new draws;
    ``passes`` counts the starts."""

    def __init__(self, files: list[Path], what: str) -> None:
        if not files:
            raise ValueError(f"{what}: no shards to twin")
        self.files, self.what, self.passes = files, what, 0
        self._batches = self._read()
        self._buffer: list[pa.Table] = []
        self._buffered = 0

    def _read(self):
        self.passes += 1
        rows = 0
        for file in self.files:
            for batch in pq.ParquetFile(file).iter_batches(batch_size=PATIENTS_PER_READ):
                rows += batch.num_rows
                yield pa.Table.from_batches([batch])
        if rows == 0:
            raise ValueError(f"{self.what}: the split has no rows to twin")

    def take(self, n: int) -> pa.Table:
        while self._buffered < n:
            try:
                block = next(self._batches)
            except StopIteration:
                self._batches = self._read()
                continue
            self._buffer.append(block)
            self._buffered += block.num_rows
        rows = pa.concat_tables(self._buffer).combine_chunks()
        self._buffer, self._buffered = [rows.slice(n)], rows.num_rows - n
        return rows.slice(0, n)


@dataclass(frozen=True)
class RecordLayout:
    """Where one record type's rows live in a dataset (``data/`` or ``trial/``), and whether
    its generator twins real rows of the training split rather than drawing from noise."""

    shard_path: Callable[[str | Path, str, int], Path]
    split_files: Callable[[str | Path, str], list[Path]]
    twins_real_rows: bool


RECORD_LAYOUTS = {
    "sentence": RecordLayout(schema.shard_path, schema.split_files, False),
    "code_set": RecordLayout(schema.shard_path, schema.split_files, False),
    "trial": RecordLayout(schema.trial_shard_path, schema.trial_split_files, True),
}
COUNTERFACTUAL_SAMPLE = schema.COUNTERFACTUAL_SAMPLE_DIR  # <out>/counterfactual/: the other-arm twins


class _ShardWriter:
    """Rows -> shards of ``PATIENTS_PER_FILE`` under one dataset's ``train`` split."""

    def __init__(self, root: Path, layout: RecordLayout) -> None:
        self.root, self.layout = root, layout
        self.pending: list[pa.Table] = []
        self.rows = self.shard = 0

    def add(self, rows: pa.Table, last: bool) -> None:
        self.pending.append(rows)
        self.rows += rows.num_rows
        if self.rows >= PATIENTS_PER_FILE or last:
            path = self.layout.shard_path(self.root, TRAIN, self.shard)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.concat_tables(self.pending), path, compression="zstd")
            self.pending, self.rows, self.shard = [], 0, self.shard + 1


def _write_metadata(out_dir: Path, real_root: str | Path, real_meta: DatasetMetadata, written: int,
                    provenance: dict, lengths_hist: dict[int, int], record_type: str) -> None:
    """``dataset.json`` and ``codes.parquet`` of a sample (all of it in ``train``)."""
    for split in (schema.TUNING, schema.HELD_OUT):
        schema.split_dir(out_dir, split).mkdir(parents=True, exist_ok=True)
    counts = {TRAIN: written, schema.TUNING: 0, schema.HELD_OUT: 0}
    trial: dict = {}
    if record_type == "trial":  # a trial-only dataset: empty data/ splits, participants in trial/
        trial = {**{k: v for k, v in real_meta.trial.items() if k in ("baseline_features", "arm_names", "indication")},
                 "participants": counts, "twins_of": TRAIN}
    DatasetMetadata(
        name=f"{real_meta.name}-synthetic",
        origin_date=real_meta.origin_date,
        n_weeks=real_meta.n_weeks,
        patients=counts if not trial else dict.fromkeys(counts, 0),
        vocab=dict(real_meta.vocab),
        provenance={**provenance, "record_type": record_type},
        length_histogram={TRAIN: {str(k): v for k, v in sorted(lengths_hist.items())}, schema.TUNING: {}, schema.HELD_OUT: {}},
        modalities=real_meta.modalities if not trial else [],
        trial=trial,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    ).write(out_dir)
    shutil.copyfile(Path(real_root) / schema.CODES_PARQUET, out_dir / schema.CODES_PARQUET)


@torch.no_grad()
def sample_patients(
    model: Generator,
    real_root: str | Path,
    *,
    n_patients: int,
    out_dir: str | Path,
    female_share: float,
    seed: int = 0,
    batch_size: int = 1024,
    max_draw_factor: int = 4,
    provenance: dict | None = None,
    record_type: str = "sentence",
    view: DataView | None = None,
) -> SampleReport:
    """Draw until ``n_patients`` valid patients are written (or ``max_draw_factor`` x drawn).
    ``record_type`` (the generator's view's) goes into ``dataset.json``'s provenance: the
    scorecard compares the sample as that kind of record (``metrics.scorecard``), and it says
    where rows are written (``RECORD_LAYOUTS``). A generator of twins is handed each block of
    real training rows (and ``view``, the run's view) in its context; one that can also write
    counterfactual twins (``CounterfactualGenerator``) writes them to ``<out>/counterfactual/``,
    a dataset of its own, row for row with the twins."""
    if record_type not in RECORD_LAYOUTS:
        raise ValueError(f"record type {record_type!r}: expected one of {sorted(RECORD_LAYOUTS)}")
    layout = RECORD_LAYOUTS[record_type]
    out_dir = Path(out_dir)
    real_meta = DatasetMetadata.read(real_root)
    generator = torch.Generator().manual_seed(seed)
    context = GenerationContext(female_share=female_share, week_vocab_size=real_meta.vocab["week"], view=view)
    real = RealRowStream(layout.split_files(real_root, TRAIN), f"{real_root} ({record_type} records, {TRAIN})") \
        if layout.twins_real_rows else None
    counterfactual = isinstance(model, CounterfactualGenerator) and real is not None
    writers = [_ShardWriter(out_dir, layout)] + ([_ShardWriter(out_dir / COUNTERFACTUAL_SAMPLE, layout)] if counterfactual else [])
    written = drawn = 0
    rejected: dict[str, int] = {}
    lengths_hist: dict[int, int] = {}
    bar = progress(n_patients, "sampling synthetic patients")
    while written < n_patients:
        if drawn >= max_draw_factor * n_patients:
            raise TooFewValidSentences(
                f"sampling: only {written} valid of {drawn} drawn sentences (failed rules: "
                f"{rejected}); this model does not generate valid patients yet"
            )
        b = min(batch_size, max(64, n_patients - written))
        if real is not None:
            b = min(b, n_patients - written)  # twins: exactly the real rows asked for
            context = replace(context, real_rows=real.take(b))
        first_id = SYNTHETIC_ID_OFFSET + written
        rows, rej = model.sample_rows(b, rng=generator, first_id=first_id, context=context)
        drawn += b
        for key, value in rej.items():
            rejected[key] = rejected.get(key, 0) + value
        rows = rows.slice(0, n_patients - written)
        written += rows.num_rows
        bar.update(rows.num_rows)
        if schema.N_EVENTS in rows.column_names:
            for n, count in zip(*np.unique(rows.column(schema.N_EVENTS).to_numpy(), return_counts=True), strict=True):
                lengths_hist[int(n)] = lengths_hist.get(int(n), 0) + int(count)
        writers[0].add(rows, written >= n_patients)
        if counterfactual:
            cf, _ = model.counterfactual_rows(b, rng=generator, first_id=first_id, context=context)
            writers[1].add(cf.slice(0, rows.num_rows), written >= n_patients)
    bar.close()
    report = SampleReport(written, drawn, rejected)
    provenance = {**(provenance or {}), "drawn": drawn, "rejected": rejected, "validity_rate": report.validity_rate, "seed": seed}
    if real is not None:
        provenance["real_rows_passes"] = real.passes
    _write_metadata(out_dir, real_root, real_meta, written, provenance, lengths_hist, record_type)
    if counterfactual:
        _write_metadata(out_dir / COUNTERFACTUAL_SAMPLE, real_root, real_meta, written,
                        {**provenance, "counterfactual": True}, {}, record_type)
    return report


@dataclass
class ReleaseResult:
    out_dir: Path | None  # None when the gate refused and nothing was exported
    sample: SampleReport
    scorecard: dict[str, float]
    gate_passed: bool
    gate_failures: list[str]
    unsafe_override: bool


def sample_and_score(
    run_id: str, *, n_patients: int, staging: Path, thresholds=None, seed: int = 0,
    max_queries: int = 20_000, uri: str | None = None, device: str = "cpu",
    sample_overrides: dict[str, Any] | None = None,
):
    """Sample ``n_patients`` into ``staging`` (drawn on ``device``, e.g. ``cuda``; with
    ``sample_overrides``, e.g. another sampler), score them against the run's real data, log
    the scorecard and the gate's verdict (``privacy/gate_passed``) to the run, tagged with the
    overrides it was drawn under (``mirror.sample_overrides``, empty for the run's own)."""
    from mirror import tracking
    from mirror.checkpoint import load_run
    from mirror.metrics.privacy import GateResult, privacy_gate
    from mirror.metrics.scorecard import COUNTERFACTUAL_PREFIX, compute_scorecard
    from mirror.models import require_capability

    loaded = load_run(run_id, uri=uri, sample_overrides=sample_overrides)
    require_capability(loaded.model_spec, "generator", "sample")
    record_type = loaded.model_spec.view.record_type
    twins = RECORD_LAYOUTS[record_type].twins_real_rows  # twins keep their real rows' sex, if any
    report = sample_patients(
        loaded.model.to(device), loaded.spec.data, n_patients=n_patients, out_dir=staging,
        female_share=float("nan") if twins else female_fraction(loaded.spec.data), seed=seed,
        provenance={"generator": loaded.spec.model, "mlflow_run_id": run_id},
        record_type=record_type, view=loaded.view() if twins else None,
    )
    plots = Path(tempfile.mkdtemp(prefix=f".{staging.name}-plots-", dir=staging.parent))  # ours alone
    try:
        undefined: dict[str, str] = {}
        scorecard = compute_scorecard(
            loaded.spec.data, staging, max_queries=max_queries, seed=seed, artifacts_dir=plots, undefined=undefined
        )
        gate = privacy_gate(scorecard, thresholds)
        if undefined:  # reported (NaN + flag), not fatal: the reasons go on the run
            reasons = "; ".join(f"{k}: {v}" for k, v in sorted(undefined.items()))
            tracking.set_tags(run_id, {"mirror.scorecard_undefined": reasons[:4900]}, uri=uri)
        if (staging / COUNTERFACTUAL_SAMPLE).is_dir():  # counterfactual twins are released too
            cf_gate = privacy_gate(scorecard, thresholds, prefix=COUNTERFACTUAL_PREFIX)
            gate = GateResult(gate.passed and cf_gate.passed, gate.failures + cf_gate.failures)
        drawn_under = " ".join(f"{k}={v}" for k, v in sorted((sample_overrides or {}).items())) or "none"
        tracking.set_tags(run_id, {"mirror.sample_overrides": drawn_under}, uri=uri)
        tracking.log_scorecard(run_id, {**scorecard, "privacy/gate_passed": float(gate.passed)}, plots, uri=uri)
    finally:
        shutil.rmtree(plots, ignore_errors=True)
    return report, scorecard, gate


def release_synthetic(
    run_id: str,
    *,
    n_patients: int,
    out_dir: str | Path,
    thresholds=None,
    allow_unsafe: bool = False,
    seed: int = 0,
    max_queries: int = 20_000,
    uri: str | None = None,
    device: str = "cpu",
    sample_overrides: dict[str, Any] | None = None,
) -> ReleaseResult:
    """Sample into a staging directory, score it, and export only if the privacy gate passes
    (or ``allow_unsafe``, which tags the run). Nothing unscored ever reaches ``out_dir``."""
    from mirror import tracking

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: output directory is not empty")
    # A staging directory this call creates (unique name beside out_dir): a user's
    # ``out.staging`` is never touched, and only this one is ever removed.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    try:
        report, scorecard, gate = sample_and_score(
            run_id, n_patients=n_patients, staging=staging, thresholds=thresholds, seed=seed,
            max_queries=max_queries, uri=uri, device=device, sample_overrides=sample_overrides,
        )
        if gate.passed or allow_unsafe:
            if not gate.passed:
                tracking.set_tags(run_id, {"mirror.unsafe_export": "; ".join(gate.failures)}, uri=uri)
            if out_dir.exists():
                out_dir.rmdir()
            staging.rename(out_dir)
            return ReleaseResult(out_dir, report, scorecard, gate.passed, gate.failures, not gate.passed)
        return ReleaseResult(None, report, scorecard, False, gate.failures, False)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when it became out_dir


def score_run(run_id: str, n_patients: int, work_dir: str | Path, seed: int = 0, uri: str | None = None) -> dict[str, float]:
    """The end-of-training scorecard of a generative run; the sample is scored, then deleted.

    A model that cannot yet generate valid patients has no scorecard: that is recorded on the
    run (tag ``mirror.scorecard_skipped`` with the reason, ``privacy/gate_passed`` = 0) and
    returned as an empty dict, so a short training run still finishes. Fidelity or utility
    metrics undefined on the run's data (a small real dataset: 100 MIMIC-IV demo patients) are
    logged as NaN with a flag and their reasons in the tag ``mirror.scorecard_undefined``.
    Privacy metrics that cannot be computed leave an incomplete scorecard: what was computed is
    logged and returned, the reasons go to the tag ``mirror.scorecard_incomplete``, and the
    gate counts as failed.
    """
    from mirror import tracking
    from mirror.metrics.scorecard import ScorecardError

    Path(work_dir).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"scorecard-{run_id}-", dir=work_dir))  # ours alone
    try:
        _, scorecard, _ = sample_and_score(run_id, n_patients=n_patients, staging=staging, seed=seed, uri=uri)
    except TooFewValidSentences as err:
        tracking.set_tags(run_id, {"mirror.scorecard_skipped": str(err)}, uri=uri)
        tracking.log_metrics(run_id, {"privacy/gate_passed": 0.0}, uri=uri)
        print(f"scorecard skipped: {err}")
        return {}
    except ScorecardError as err:
        reasons = "; ".join(f"{k}: {v}" for k, v in sorted(err.errors.items()))
        tracking.set_tags(run_id, {"mirror.scorecard_incomplete": reasons[:4900]}, uri=uri)
        tracking.log_metrics(run_id, {**err.partial, "privacy/gate_passed": 0.0}, uri=uri)
        print(f"scorecard incomplete (gate counted as failed): {err}")
        return dict(err.partial)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return scorecard
