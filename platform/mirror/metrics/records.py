"""Patient records as flat columnar arrays, read shard by shard from a dataset directory.

Every metric works on :class:`PatientBlock`: the per-patient columns of ``schema.ROW_SCHEMA``
plus the three event lists as one flat array each and an ``offsets`` array (words of patient
``i`` are ``[offsets[i], offsets[i + 1])``), so all per-word work is vectorised numpy.

Reading is strict about what would make a record meaningless (wrong dtypes, nulls, event lists
of different lengths, condition or age-group ids outside the vocabulary, negative weeks): it
raises ``ValueError`` naming the file, row and rule. Rules that a well-formed but implausible
record breaks (the *validity* rules of ``mirror.data.validate``: sex, empty or over-long
sentences, week range, time order, age consistency, enrollment) are recorded per patient in
``rule_failures`` and reported by the validity metric; such records are still scored. A
patient whose weeks go backwards is re-sorted by week (stable) so visits are well defined.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mirror.data import schema as S
from mirror.data import validate as V
from mirror.data.vocab import (
    DIAG_AGE_VOCAB_SIZE,
    N_AGE_GROUPS,
    N_CONDITIONS,
    N_SPECIAL,
    age_group_at,
)
from mirror.metrics import arrays

# Validity rules checked per patient (names shared with mirror.data.validate); bit i of
# ``PatientBlock.rule_failures`` is VALIDITY_RULES[i].
VALIDITY_RULES: tuple[str, ...] = (
    V.SEX,
    V.EMPTY_SENTENCE,
    V.OVER_LONG,
    V.WEEK_RANGE,
    V.SORTED_TIMES,
    V.AGE_CONSISTENCY,
    V.ENROLLMENT,
)
MAX_WEEK = 1 << 20  # weeks must lie in [0, MAX_WEEK) to be encoded in feature keys
READ_BATCH_ROWS = 65_536
_ROW_TYPES = {f.name: f.type for f in S.DIAGNOSIS_SCHEMA}  # what metrics score


@dataclass
class PatientBlock:
    """A set of patients (rows) with their words, flat. All arrays are numpy."""

    subject_id: np.ndarray  # (n,) int64
    sex: np.ndarray  # (n,) int8
    birth_week: np.ndarray  # (n,) int32
    enroll_start: np.ndarray  # (n,) int32
    enroll_end: np.ndarray  # (n,) int32
    rule_failures: np.ndarray  # (n,) uint16 bitmask over VALIDITY_RULES
    offsets: np.ndarray  # (n + 1,) int64
    conditions: np.ndarray  # (W,) int16
    age_groups: np.ndarray  # (W,) int8
    weeks: np.ndarray  # (W,) int32, non-decreasing within each patient

    _ROW_FIELDS = ("subject_id", "sex", "birth_week", "enroll_start", "enroll_end", "rule_failures")
    _WORD_FIELDS = ("conditions", "age_groups", "weeks")

    def __len__(self) -> int:
        return len(self.subject_id)

    @property
    def lengths(self) -> np.ndarray:
        """Words per patient (int64)."""
        return np.diff(self.offsets)

    @property
    def n_words(self) -> int:
        return int(self.offsets[-1])

    def row_of_word(self) -> np.ndarray:
        return np.repeat(np.arange(len(self), dtype=np.int64), self.lengths)

    def take(self, rows: np.ndarray) -> PatientBlock:
        """The patients at ``rows`` (any order, repeats allowed), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        lens = self.lengths[rows]
        new_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lens, out=new_offsets[1:])
        word_idx = np.repeat(self.offsets[rows] - new_offsets[:-1], lens) + np.arange(
            new_offsets[-1]
        )
        return PatientBlock(
            **{f: getattr(self, f)[rows] for f in self._ROW_FIELDS},
            offsets=new_offsets,
            **{f: getattr(self, f)[word_idx] for f in self._WORD_FIELDS},
        )

    @classmethod
    def concat(cls, blocks: Sequence[PatientBlock]) -> PatientBlock:
        if not blocks:
            return cls.empty()
        ends = np.cumsum([b.n_words for b in blocks])
        starts = np.concatenate([[0], ends[:-1]])
        offsets = np.concatenate(
            [np.zeros(1, np.int64)]
            + [b.offsets[1:] + s for b, s in zip(blocks, starts, strict=True)]
        )
        return cls(
            **{f: np.concatenate([getattr(b, f) for b in blocks]) for f in cls._ROW_FIELDS},
            offsets=offsets,
            **{f: np.concatenate([getattr(b, f) for b in blocks]) for f in cls._WORD_FIELDS},
        )

    @classmethod
    def empty(cls) -> PatientBlock:
        dtypes = {
            "subject_id": np.int64,
            "sex": np.int8,
            "birth_week": np.int32,
            "enroll_start": np.int32,
            "enroll_end": np.int32,
            "rule_failures": np.uint16,
            "conditions": np.int16,
            "age_groups": np.int8,
            "weeks": np.int32,
        }
        return cls(**{k: np.zeros(0, v) for k, v in dtypes.items()}, offsets=np.zeros(1, np.int64))

    def to_table(self) -> pa.Table:
        """Rows in ``schema.ROW_SCHEMA`` (for writing datasets)."""
        offsets = pa.array(self.offsets.astype(np.int32))
        return S.fill_missing_modalities(pa.Table.from_arrays(
            [
                pa.array(self.subject_id.astype(np.int64)),
                pa.array(self.sex.astype(np.int8)),
                pa.array(self.birth_week.astype(np.int32)),
                pa.array(self.enroll_start.astype(np.int32)),
                pa.array(self.enroll_end.astype(np.int32)),
                pa.array(self.lengths.astype(np.int32)),
                pa.ListArray.from_arrays(offsets, pa.array(self.conditions.astype(np.int16))),
                pa.ListArray.from_arrays(offsets, pa.array(self.age_groups.astype(np.int8))),
                pa.ListArray.from_arrays(offsets, pa.array(self.weeks.astype(np.int32))),
            ],
            schema=S.DIAGNOSIS_SCHEMA,
        ))

    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self))


# ---------------------------------------------------------------------------------------------
# Arrow -> PatientBlock


def _column(batch: pa.RecordBatch | pa.Table, name: str) -> pa.Array:
    col = batch.column(name)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    return col


def _list_parts(arr: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets from 0, int64; flat values) of a possibly sliced list array."""
    offsets = np.asarray(arr.offsets, dtype=np.int64)
    start = int(offsets[0])
    values = arr.values.slice(start, int(offsets[-1]) - start).to_numpy(zero_copy_only=False)
    return offsets - start, values


def block_from_arrow(
    batch: pa.RecordBatch | pa.Table, *, n_weeks: int, file: str = "<memory>", first_row: int = 0
) -> PatientBlock:
    """Convert one batch of ``ROW_SCHEMA`` rows; raises ``ValueError`` naming file/row/rule for
    records that cannot be scored, and records validity-rule failures per patient."""
    for name, expected in _ROW_TYPES.items():
        if name not in batch.schema.names:
            raise ValueError(f"{file}: schema: missing column {name!r} ({expected})")
        got = batch.schema.field(name).type
        ok = (
            (pa.types.is_list(got) and got.value_type == expected.value_type)
            if pa.types.is_list(expected)
            else got == expected
        )
        if not ok:
            raise ValueError(f"{file}: schema: column {name!r} is {got}, expected {expected}")
    cols = {name: _column(batch, name) for name in _ROW_TYPES}
    for name, arr in cols.items():
        nulls = arr.null_count + (arr.values.null_count if pa.types.is_list(arr.type) else 0)
        if nulls:
            raise ValueError(
                f"{file}: schema: {nulls} null value(s) in column {name!r} (rows from {first_row})"
            )

    def bad(rule: str, rows: np.ndarray, what: str) -> ValueError:
        return ValueError(
            f"{file} row {first_row + int(rows[0])}: {rule}: {what} "
            f"({len(rows)} row(s) in this batch)"
        )

    n = batch.num_rows
    offsets, conditions = _list_parts(cols[S.CONDITIONS])
    age_off, age_groups = _list_parts(cols[S.AGE_GROUPS])
    week_off, weeks = _list_parts(cols[S.WEEKS])
    n_events = cols[S.N_EVENTS].to_numpy().astype(np.int64)
    lengths = np.diff(offsets)
    mismatch = (
        (lengths != n_events) | (np.diff(age_off) != lengths) | (np.diff(week_off) != lengths)
    )
    if mismatch.any():
        rows = np.flatnonzero(mismatch)
        raise bad(
            V.LIST_LENGTHS,
            rows,
            f"n_events {n_events[rows[0]]} but lists of lengths "
            f"{lengths[rows[0]]}/{np.diff(age_off)[rows[0]]}/{np.diff(week_off)[rows[0]]}",
        )
    row_of_word = np.repeat(np.arange(n, dtype=np.int64), lengths)
    for rule, values, lo, hi in (
        (V.CONDITION_RANGE, conditions, 0, N_CONDITIONS),
        (V.AGE_GROUP_RANGE, age_groups, 0, N_AGE_GROUPS),
        ("week_encodable", weeks, 0, MAX_WEEK),
    ):
        outside = (values < lo) | (values >= hi)
        if outside.any():
            k = np.flatnonzero(outside)
            raise bad(
                rule,
                arrays.rows_flagged(row_of_word, outside, n),
                f"value {values[k[0]]} outside [{lo}, {hi}); "
                "the record cannot be encoded, so it cannot be scored",
            )

    sex = cols[S.SEX].to_numpy()
    birth = cols[S.BIRTH_WEEK].to_numpy()
    start = cols[S.ENROLL_START].to_numpy()
    end = cols[S.ENROLL_END].to_numpy()
    week64 = weeks.astype(np.int64)
    failures = np.zeros(n, dtype=np.uint16)

    def mark(rule: str, rows_bad: np.ndarray) -> None:
        failures[rows_bad] |= np.uint16(1 << VALIDITY_RULES.index(rule))

    def rows_with(event_mask: np.ndarray) -> np.ndarray:
        return arrays.rows_flagged(row_of_word, event_mask, n)

    mark(V.SEX, np.flatnonzero((sex != -1) & (sex != 1)))
    mark(V.EMPTY_SENTENCE, np.flatnonzero(lengths == 0))
    mark(V.OVER_LONG, np.flatnonzero(lengths > S.MAX_EVENTS))
    mark(V.WEEK_RANGE, rows_with(week64 >= n_weeks))
    backwards = np.zeros(len(weeks), dtype=bool)
    if len(weeks) > 1:
        backwards[1:] = (week64[1:] < week64[:-1]) & (row_of_word[1:] == row_of_word[:-1])
    unsorted_rows = rows_with(backwards)
    mark(V.SORTED_TIMES, unsorted_rows)
    expected_age = age_group_at(week64, birth[row_of_word].astype(np.int64))
    mark(V.AGE_CONSISTENCY, rows_with(expected_age != age_groups))
    bad_window = (start > end) | (start < 0) | (end >= n_weeks)
    mark(V.ENROLLMENT, np.flatnonzero(bad_window))
    mark(V.ENROLLMENT, rows_with((week64 < start[row_of_word]) | (week64 > end[row_of_word])))

    if len(unsorted_rows):  # stable re-sort by week within each patient
        order = np.lexsort((week64, row_of_word))
        conditions, age_groups, weeks = conditions[order], age_groups[order], weeks[order]

    return PatientBlock(
        subject_id=cols[S.SUBJECT_ID].to_numpy().astype(np.int64),
        sex=sex.astype(np.int8),
        birth_week=birth.astype(np.int32),
        enroll_start=start.astype(np.int32),
        enroll_end=end.astype(np.int32),
        rule_failures=failures,
        offsets=offsets,
        conditions=conditions.astype(np.int16),
        age_groups=age_groups.astype(np.int8),
        weeks=weeks.astype(np.int32),
    )


# ---------------------------------------------------------------------------------------------
# Datasets on disk


@dataclass(frozen=True)
class ShardFile:
    split: str
    path: Path
    n_rows: int
    first_row: int  # global row index of the file's first patient within the dataset view


def dataset_files(root: str | Path, splits: Sequence[str]) -> list[ShardFile]:
    """The shards of ``splits`` in order, with row counts from the Parquet footers."""
    out: list[ShardFile] = []
    first = 0
    for split in splits:
        for path in S.split_files(root, split):
            n_rows = pq.ParquetFile(path).metadata.num_rows
            out.append(ShardFile(split, path, n_rows, first))
            first += n_rows
    return out


def iter_shard_blocks(
    shard: ShardFile, n_weeks: int, batch_rows: int = READ_BATCH_ROWS
) -> Iterator[tuple[int, PatientBlock]]:
    """(global first row, block) for each batch of one shard; bounded memory per batch."""
    file = pq.ParquetFile(shard.path)
    row = 0
    for batch in file.iter_batches(batch_size=batch_rows, columns=list(_ROW_TYPES)):
        yield (
            shard.first_row + row,
            block_from_arrow(batch, n_weeks=n_weeks, file=str(shard.path), first_row=row),
        )
        row += batch.num_rows


def read_block(root: str | Path, splits: Sequence[str], n_weeks: int) -> PatientBlock:
    """A whole (small) dataset view in memory; for held-out splits and tests."""
    blocks = [
        b for shard in dataset_files(root, splits) for _, b in iter_shard_blocks(shard, n_weeks)
    ]
    return PatientBlock.concat(blocks)


def write_block(block: PatientBlock, path: str | Path, row_group_rows: int = 20_000) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(block.to_table(), path, row_group_size=row_group_rows, compression="zstd")


def write_dataset(
    out_root: str | Path,
    blocks: Iterable[PatientBlock],
    *,
    like: S.DatasetMetadata,
    name: str,
    provenance: dict,
    real_root: str | Path | None = None,
) -> S.DatasetMetadata:
    """Write patient blocks as a dataset whose patients are all in ``train`` (the layout of a
    synthetic dataset), one shard per block, with the week span and origin of ``like``. Copies
    ``codes.parquet`` from ``real_root`` when given."""
    out_root = Path(out_root)
    if (out_root / S.DATA_DIR).exists():
        shutil.rmtree(out_root / S.DATA_DIR)
    histogram: dict[str, int] = {}
    n = 0
    for i, block in enumerate(blocks):
        write_block(block, S.shard_path(out_root, S.TRAIN, i))
        values, counts = arrays.unique_counts(block.lengths)
        for k, v in zip(values, counts, strict=True):
            histogram[str(int(k))] = histogram.get(str(int(k)), 0) + int(v)
        n += len(block)
    if real_root is not None and (Path(real_root) / S.CODES_PARQUET).exists():
        (out_root / S.METADATA_DIR).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(real_root) / S.CODES_PARQUET, out_root / S.CODES_PARQUET)
    meta = S.DatasetMetadata(
        name=name,
        origin_date=like.origin_date,
        n_weeks=like.n_weeks,
        patients={S.TRAIN: n, S.TUNING: 0, S.HELD_OUT: 0},
        vocab={"diag_age": DIAG_AGE_VOCAB_SIZE, "week": N_SPECIAL + like.n_weeks},
        provenance=provenance,
        length_histogram={S.TRAIN: histogram, S.TUNING: {}, S.HELD_OUT: {}},
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    meta.write(out_root)
    return meta
