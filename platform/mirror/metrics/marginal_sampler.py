"""The independent-marginal sampler: the scorecard's floor reference row.

Each synthetic patient's number of words is drawn from the real training length distribution;
each word's condition, age group and week are drawn independently from their real word-level
marginals; words are then ordered by week. Sex and birth week come from their marginals.
There is no joint structure at all, and no record depends on any one real patient (only on
aggregate counts), so it shows what co-occurrence, bigram, detection and TSTR give without
learned structure while reading as safe on every privacy metric (metrics notes 4.8).
Records are mostly *invalid* (age groups ignore the birth week): that is part of the floor.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mirror.data import schema as S
from mirror.metrics.fidelity import FidelitySummary, summarise
from mirror.metrics.records import PatientBlock, dataset_files, iter_shard_blocks, write_dataset

FLOOR_ID_OFFSET = 2 * 10**12  # outside real and model-synthetic id ranges
PATIENTS_PER_FILE = 100_000


def _draw(
    rng: np.random.Generator, counts: np.ndarray, size: int, values: np.ndarray | None = None
) -> np.ndarray:
    idx = rng.choice(len(counts), size=size, p=counts / counts.sum())
    return idx if values is None else values[idx]


def sample_block(
    summary: FidelitySummary, n: int, first_id: int, rng: np.random.Generator
) -> PatientBlock:
    """``n`` independent-marginal patients with ids from ``first_id``."""
    lengths = _draw(rng, summary.length_hist, n).astype(np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    conditions = _draw(rng, summary.condition_words, total)
    ages = _draw(rng, summary.age_words, total)
    weeks = _draw(rng, summary.week_words, total)
    order = np.lexsort((weeks, np.repeat(np.arange(n), lengths)))  # words by week within a patient
    weeks = weeks[order]
    first = np.where(lengths > 0, weeks[np.minimum(offsets[:-1], max(total - 1, 0))], 0)
    last = np.where(lengths > 0, weeks[np.maximum(offsets[1:] - 1, 0)], 0)
    return PatientBlock(
        subject_id=first_id + np.arange(n, dtype=np.int64),
        sex=np.where(_draw(rng, summary.sex_counts, n) == 1, 1, -1).astype(np.int8),
        birth_week=_draw(rng, summary.birth_counts, n, summary.birth_values).astype(np.int32),
        enroll_start=first.astype(np.int32),
        enroll_end=last.astype(np.int32),
        rule_failures=np.zeros(n, np.uint16),  # recomputed when the written dataset is read
        offsets=offsets,
        conditions=conditions[order].astype(np.int16),
        age_groups=ages[order].astype(np.int8),
        weeks=weeks.astype(np.int32),
    )


def write_independent_marginal_sample(
    real_root: str | Path,
    out_root: str | Path,
    n: int,
    seed: int,
    summary: FidelitySummary | None = None,
) -> S.DatasetMetadata:
    """Write ``n`` independent-marginal patients as a dataset (all in ``train``) under
    ``out_root``, from the marginals of ``real_root``'s training split (``summary`` if the
    caller already has it, else one streaming pass). Bounded memory: one file at a time."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    real_meta = S.DatasetMetadata.read(real_root)
    if summary is None:
        shards = dataset_files(real_root, [S.TRAIN])
        summary = summarise(
            b for shard in shards for _, b in iter_shard_blocks(shard, real_meta.n_weeks)
        )
    if summary.n_patients == 0:
        raise ValueError(f"{real_root}: training split is empty")
    rng = np.random.default_rng(seed)

    def blocks() -> Iterator[PatientBlock]:
        for first in range(0, n, PATIENTS_PER_FILE):
            yield sample_block(
                summary, min(PATIENTS_PER_FILE, n - first), FLOOR_ID_OFFSET + first, rng
            )

    return write_dataset(
        out_root,
        blocks(),
        like=real_meta,
        name=f"independent-marginal floor of {real_meta.name}",
        provenance={
            "sampler": "mirror.metrics.marginal_sampler",
            "real_dataset": real_meta.name,
            "seed": seed,
            "source_patients": summary.n_patients,
        },
        real_root=real_root,
    )
