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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mirror.data import schema
from mirror.data.schema import TRAIN, DatasetMetadata
from mirror.models.base import GenerationContext, Generator
from mirror.progress import progress

SYNTHETIC_ID_OFFSET = schema.SYNTHETIC_ID_OFFSET
PATIENTS_PER_FILE = 250_000


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
) -> SampleReport:
    """Draw until ``n_patients`` valid patients are written (or ``max_draw_factor`` x drawn).
    ``record_type`` (the generator's view's) goes into ``dataset.json``'s provenance: the
    scorecard compares the sample as that kind of record (``metrics.scorecard``)."""
    out_dir = Path(out_dir)
    real_meta = DatasetMetadata.read(real_root)
    generator = torch.Generator().manual_seed(seed)
    context = GenerationContext(female_share=female_share, week_vocab_size=real_meta.vocab["week"])
    written = drawn = 0
    rejected: dict[str, int] = {}
    pending: list[pa.Table] = []
    pending_rows = shard = 0
    lengths_hist: dict[int, int] = {}
    bar = progress(n_patients, "sampling synthetic patients")
    while written < n_patients:
        if drawn >= max_draw_factor * n_patients:
            raise TooFewValidSentences(
                f"sampling: only {written} valid of {drawn} drawn sentences (failed rules: "
                f"{rejected}); this model does not generate valid patients yet"
            )
        b = min(batch_size, max(64, n_patients - written))
        rows, rej = model.sample_rows(b, rng=generator, first_id=SYNTHETIC_ID_OFFSET + written, context=context)
        drawn += b
        for key, value in rej.items():
            rejected[key] = rejected.get(key, 0) + value
        rows = rows.slice(0, n_patients - written)
        written += rows.num_rows
        bar.update(rows.num_rows)
        for n, count in zip(*np.unique(rows.column(schema.N_EVENTS).to_numpy(), return_counts=True), strict=True):
            lengths_hist[int(n)] = lengths_hist.get(int(n), 0) + int(count)
        pending.append(rows)
        pending_rows += rows.num_rows
        if pending_rows >= PATIENTS_PER_FILE or written >= n_patients:
            path = schema.shard_path(out_dir, TRAIN, shard)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.concat_tables(pending), path, compression="zstd")
            pending, pending_rows, shard = [], 0, shard + 1
    bar.close()
    for split in (schema.TUNING, schema.HELD_OUT):
        schema.split_dir(out_dir, split).mkdir(parents=True, exist_ok=True)
    report = SampleReport(written, drawn, rejected)
    DatasetMetadata(
        name=f"{real_meta.name}-synthetic",
        origin_date=real_meta.origin_date,
        n_weeks=real_meta.n_weeks,
        patients={TRAIN: written, schema.TUNING: 0, schema.HELD_OUT: 0},
        vocab=dict(real_meta.vocab),
        provenance={**(provenance or {}), "record_type": record_type, "drawn": drawn, "rejected": rejected, "validity_rate": report.validity_rate, "seed": seed},
        length_histogram={TRAIN: {str(k): v for k, v in sorted(lengths_hist.items())}, schema.TUNING: {}, schema.HELD_OUT: {}},
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    ).write(out_dir)
    shutil.copyfile(Path(real_root) / schema.CODES_PARQUET, out_dir / schema.CODES_PARQUET)
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
):
    """Sample ``n_patients`` into ``staging`` (drawn on ``device``, e.g. ``cuda``), score them
    against the run's real data, log the scorecard and the gate's verdict
    (``privacy/gate_passed``) to the run."""
    from mirror import tracking
    from mirror.checkpoint import load_run
    from mirror.metrics.privacy import privacy_gate
    from mirror.metrics.scorecard import compute_scorecard
    from mirror.models import require_capability

    loaded = load_run(run_id, uri=uri)
    require_capability(loaded.model_spec, "generator", "sample")
    report = sample_patients(
        loaded.model.to(device), loaded.spec.data, n_patients=n_patients, out_dir=staging,
        female_share=female_fraction(loaded.spec.data), seed=seed, provenance={"generator": loaded.spec.model, "mlflow_run_id": run_id},
        record_type=loaded.model_spec.view.record_type,
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
            max_queries=max_queries, uri=uri, device=device,
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
