"""Shared fixtures of the scorecard tests (imported by the other test_metrics_* files).

``tiny_table``: three hand-written patients (ROW_SCHEMA, pyarrow) whose features, summaries
and metrics the tests compute by hand::

    patient  sex  birth  words (condition, age group, week)
    1         1   -1100  (5, 4, 10) (7, 4, 10) (5, 4, 20)         visits: w10 {5,7}, w20 {5}
    2        -1   -1100  (5, 4, 30)                               visits: w30 {5}
    3         1   -3000  (7, 11, 0) (9, 11, 5) (5, 11, 5) (7, 11, 40)   w0 {7}, w5 {9,5}, w40 {7}

Birth weeks make every age group consistent (week 0 is 21.1 and 57.5 years after birth);
enrollment covers every week of the 100-week dataset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from mirror.data import schema as S
from mirror.metrics.records import PatientBlock, block_from_arrow

N_WEEKS = 100
TINY = [
    # subject, sex, birth, [(condition, age group, week), ...]
    (1, 1, -1100, [(5, 4, 10), (7, 4, 10), (5, 4, 20)]),
    (2, -1, -1100, [(5, 4, 30)]),
    (3, 1, -3000, [(7, 11, 0), (9, 11, 5), (5, 11, 5), (7, 11, 40)]),
]


def table_of(patients, n_weeks: int = N_WEEKS, enroll: tuple[int, int] | None = None) -> pa.Table:
    """ROW_SCHEMA table from ``(subject, sex, birth, words)`` tuples."""
    start, end = enroll or (0, n_weeks - 1)
    return S.fill_missing_modalities(pa.Table.from_pydict(
        {
            S.SUBJECT_ID: [p[0] for p in patients],
            S.SEX: [p[1] for p in patients],
            S.BIRTH_WEEK: [p[2] for p in patients],
            S.ENROLL_START: [start] * len(patients),
            S.ENROLL_END: [end] * len(patients),
            S.N_EVENTS: [len(p[3]) for p in patients],
            S.CONDITIONS: [[w[0] for w in p[3]] for p in patients],
            S.AGE_GROUPS: [[w[1] for w in p[3]] for p in patients],
            S.WEEKS: [[w[2] for w in p[3]] for p in patients],
        },
        schema=S.DIAGNOSIS_SCHEMA,
    ))


def tiny_table() -> pa.Table:
    return table_of(TINY)


def tiny_block() -> PatientBlock:
    return block_from_arrow(tiny_table(), n_weeks=N_WEEKS)


def simulated_block(n: int, seed: int = 3, first_id: int = 0) -> tuple[PatientBlock, int]:
    """``n`` simulated patients (ids from ``first_id``) and the dataset's week span: patient i
    depends only on (seed, i), so disjoint id ranges are independent samples of one population."""
    from mirror.data.simulator import SimulatorParams, simulate_block

    params = SimulatorParams.from_seed(seed)
    rows, _ = simulate_block(params, seed, first_id, n)
    return block_from_arrow(rows, n_weeks=params.n_weeks), params.n_weeks


def shuffle_conditions(block: PatientBlock, seed: int = 0) -> PatientBlock:
    """Each condition's words move, as a unit per patient, to a random other patient: an
    independent permutation of patients per condition (column-wise shuffle of the patient x
    condition matrix). Patient-level prevalence is kept exactly; co-occurrence and sequence
    structure are destroyed."""
    rng = np.random.default_rng(seed)
    n = len(block)
    perms = rng.permuted(np.tile(np.arange(n), (605, 1)), axis=1)
    new_rows = perms[block.conditions.astype(np.int64), block.row_of_word()]
    order = np.lexsort((block.weeks, new_rows))
    lengths = np.bincount(new_rows, minlength=n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    weeks = block.weeks[order]
    has = lengths > 0
    first = np.where(has, weeks[np.minimum(offsets[:-1], block.n_words - 1)], 0)
    last = np.where(has, weeks[np.maximum(offsets[1:] - 1, 0)], 0)
    return PatientBlock(
        subject_id=block.subject_id,
        sex=block.sex,
        birth_week=block.birth_week,
        enroll_start=first.astype(np.int32),
        enroll_end=last.astype(np.int32),
        rule_failures=np.zeros(n, np.uint16),
        offsets=offsets,
        conditions=block.conditions[order],
        age_groups=block.age_groups[order],
        weeks=weeks,
    )


def write_synthetic(root: Path, blocks, real_root: Path, name: str = "synthetic") -> Path:
    from mirror.metrics.records import write_dataset

    write_dataset(
        root,
        blocks,
        like=S.DatasetMetadata.read(real_root),
        name=name,
        provenance={"test": name},
        real_root=real_root,
    )
    return root
