"""The ``visits`` view: a trial participant's visits (the dataset's ``trial/`` part) as
examples of three multi-hot vectors, for TWIN (seed 001, Das, Wang and Sun 2023).

One example per visit ``t`` of participant ``n``:

* ``treatment`` (l1), ``medication`` (l2), ``adverse_event`` (l3) multi-hots of visit t;
* the next visit's medication and AE multi-hots, with ``has_next`` False at the last visit
  (its targets are zeros and masked out of the next-visit loss);
* the participant's baseline features and arm;
* ``neighbours`` (K, l1 + l2 + l3): the K visits most similar to visit t by dot product on
  the whole multi-hot, never one of the participant's own visits, and ``neighbour_mask`` (K).

Retrieval scope (``view.retrieval``): ``global`` searches an index of every visit of the
TRAINING split (the paper's form: all other patients), ``in_batch`` the other participants'
visits of the same batch (PyTrial's form, minus its own-visit leak), ``none`` no neighbours
(the paper's TWIN-RAE ablation). The global index is a binary CSR matrix (visits x columns)
plus each visit's owner, built once per run on the driver from the training split (streamed
row group by row group; only the CSR arrays are kept, ~4 bytes per event) and shared with
the workers through the object store. A query is an exact top-K: ``index @ batch.T`` in
chunks of ``RETRIEVAL_CHUNK`` index rows (bounded memory: chunk x batch scores), the owner's
visits set to -inf, a running ``argpartition``. Ties go to the earlier index row.

Nothing is dropped: every visit of every participant is an example; the split's visit count
is read up front from the ``visit_days`` column alone. Rows are checked against the trial
rules (``validate.check_trial_table``) as they are read, naming file and row.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mirror.config import require
from mirror.data import schema
from mirror.data.views.base import DataView

if TYPE_CHECKING:
    import ray.data
    import torch

RETRIEVAL_SCOPES = ("global", "in_batch", "none")
RETRIEVAL_CHUNK = 65_536  # index rows (patterns) scored at a time: chunk x batch float32 scores
TRIAL_READ_ROWS = 16_384  # participants decoded and validated at a time inside a read task
_ROW_BITS = 40  # index rows < 2^40 (a trillion visits); the score sits above them in the key
_ROW_MASK = (1 << _ROW_BITS) - 1
_EXCLUDED = -(1 << 62)  # the key of an excluded row: below every real key (>= 0)

# Columns of one visit example (Arrow), in the order the read task writes them.
VISIT_ID, VISIT_INDEX, N_VISITS, HAS_NEXT = "visit_id", "visit", "n_visits", "has_next"
TREATMENTS, MEDICATIONS, ADVERSE_EVENTS = "treatments", "medications", "adverse_events"
NEXT_MEDICATIONS, NEXT_ADVERSE_EVENTS = "next_medications", "next_adverse_events"


# --------------------------------------------------------------------------------------------
# Participant rows -> visit rows, lists -> multi-hots (vectorised over a block)


def visit_rows(table: pa.Table) -> pa.Table:
    """One row per visit of ``TRIAL_SCHEMA`` participant rows, with the next visit's lists
    (empty at the last visit) and the participant's arm and baseline repeated."""
    n = table.num_rows
    outer = table.column(schema.VISIT_DAYS).combine_chunks()
    offsets = outer.offsets.to_numpy().astype(np.int64)
    n_visits = np.diff(offsets)
    total = int(offsets[-1] - offsets[0])
    owner = np.repeat(np.arange(n), n_visits)
    index = np.arange(total) - (offsets[:-1] - offsets[0])[owner]
    has_next = index < n_visits[owner] - 1
    nxt = np.where(has_next, np.arange(total) + 1, np.arange(total))
    take_owner = pa.array(owner)
    columns: dict[str, pa.Array] = {
        schema.SUBJECT_ID: table.column(schema.SUBJECT_ID).take(take_owner).combine_chunks(),
        schema.ARM: table.column(schema.ARM).take(take_owner).combine_chunks(),
        VISIT_INDEX: pa.array(index.astype(np.int16)),
        N_VISITS: pa.array(n_visits[owner].astype(np.int16)),
        HAS_NEXT: pa.array(has_next),
        schema.BASELINE: table.column(schema.BASELINE).take(take_owner).combine_chunks(),
    }
    for source, name, next_name in (
        (schema.VISIT_TREATMENTS, TREATMENTS, None),
        (schema.VISIT_MEDICATIONS, MEDICATIONS, NEXT_MEDICATIONS),
        (schema.VISIT_ADVERSE_EVENTS, ADVERSE_EVENTS, NEXT_ADVERSE_EVENTS),
    ):
        inner = table.column(source).combine_chunks().flatten()  # one list per visit
        columns[name] = inner
        if next_name is not None:
            nxt_lists = inner.take(pa.array(nxt))
            lengths = np.where(has_next, np.diff(nxt_lists.offsets.to_numpy()), 0)
            starts = nxt_lists.offsets.to_numpy()[:-1]
            keep = np.repeat(starts, lengths) + (np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths))
            values = nxt_lists.values.take(pa.array(keep.astype(np.int64)))
            new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            columns[next_name] = pa.ListArray.from_arrays(pa.array(new_offsets), values)
    return pa.table(columns)


def multi_hot(lists: pa.Array | pa.ChunkedArray, width: int) -> np.ndarray:
    """A list<int> column as a (rows, width) float32 multi-hot."""
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    offsets = lists.offsets.to_numpy()
    values = lists.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    out = np.zeros((len(lists), width), np.float32)
    out[np.repeat(np.arange(len(lists)), np.diff(offsets)), values.astype(np.int64)] = 1.0
    return out


def visit_matrix(table: pa.Table, widths: tuple[int, int, int], columns: tuple[str, str, str] = (TREATMENTS, MEDICATIONS, ADVERSE_EVENTS)) -> np.ndarray:
    """The whole visit [treatment | medication | AE] multi-hot (rows, l1 + l2 + l3)."""
    return np.concatenate([multi_hot(table.column(c), w) for c, w in zip(columns, widths, strict=True)], axis=1)


# --------------------------------------------------------------------------------------------
# Retrieval


@dataclass
class VisitPatterns:
    """The index's distinct visits (trial visits repeat: few patterns for many visits), each
    with its member rows in ascending order; the unit a query is scored against. Patterns are
    numbered in the order of their first (lowest) member row."""

    indptr: np.ndarray  # (P + 1,) int64: CSR of the distinct multi-hots
    indices: np.ndarray  # (nnz_P,) int32
    member_offsets: np.ndarray  # (P + 1,) int64 into members
    members: np.ndarray  # (N,) int64 index rows, grouped by pattern, ascending within one
    max_own: int  # the most index rows one participant owns (the exclusion's reach)
    width: int

    @property
    def size(self) -> int:
        return len(self.member_offsets) - 1

    @cached_property
    def matrix(self) -> Any:
        import scipy.sparse as sp

        return sp.csr_matrix((np.ones(len(self.indices), np.float32), self.indices, self.indptr), shape=(self.size, self.width))


@dataclass
class RetrievalIndex:
    """The training split's visits: binary CSR rows (``indptr``, ``indices``) over the
    concatenated columns, the participant each visit belongs to, and the distinct patterns
    (``patterns``, made once per run by :meth:`dedupe`, shipped with the index)."""

    indptr: np.ndarray  # (N + 1,) int64
    indices: np.ndarray  # (nnz,) int32
    owner: np.ndarray  # (N,) int64 subject id
    width: int
    patterns: VisitPatterns | None = None

    @property
    def size(self) -> int:
        return len(self.owner)

    @cached_property
    def matrix(self) -> Any:
        """The index as a scipy CSR (made once per process)."""
        import scipy.sparse as sp

        data = np.ones(len(self.indices), np.float32)
        return sp.csr_matrix((data, self.indices, self.indptr), shape=(self.size, self.width))

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Dense multi-hots of index rows ``ids`` (any shape) -> (*ids.shape, width)."""
        flat = ids.reshape(-1)
        out = np.zeros((len(flat), self.width), np.float32)
        starts, ends = self.indptr[flat], self.indptr[flat + 1]
        lengths = ends - starts
        take = np.repeat(starts, lengths) + (np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths))
        out[np.repeat(np.arange(len(flat)), lengths), self.indices[take]] = 1.0
        return out.reshape(*ids.shape, self.width)

    def dedupe(self, chunk: int = RETRIEVAL_CHUNK) -> RetrievalIndex:
        """Group the rows by distinct multi-hot (bit-packed rows, ``np.unique``); sets
        ``patterns`` and returns self."""
        packed = np.concatenate([np.packbits(self.rows(np.arange(lo, min(self.size, lo + chunk))).astype(bool), axis=1)
                                 for lo in range(0, self.size, chunk)]) if self.size else np.zeros((0, 1), np.uint8)
        keys = np.ascontiguousarray(packed).view(np.dtype((np.void, packed.shape[1]))).ravel()
        _, first, pattern_of = np.unique(keys, return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")  # number patterns by their first member
        first, pattern_of = first[order], np.argsort(order)[pattern_of.ravel()]
        members = np.argsort(pattern_of, kind="stable").astype(np.int64)  # ascending rows within a pattern
        counts = np.bincount(pattern_of, minlength=len(first))
        lengths = self.indptr[first + 1] - self.indptr[first]
        take = np.repeat(self.indptr[first], lengths) + (np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths))
        _, own_counts = np.unique(self.owner, return_counts=True)
        self.patterns = VisitPatterns(
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), self.indices[take],
            np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), members,
            int(own_counts.max()) if len(own_counts) else 0, self.width)
        return self


def build_index(root: str | Path, widths: tuple[int, int, int], split: str = "train") -> RetrievalIndex:
    """The retrieval index of one split's visits, read row group by row group, deduplicated."""
    indptr_parts, index_parts, owners = [np.zeros(1, np.int64)], [], []
    nnz = 0
    columns = [schema.SUBJECT_ID, schema.VISIT_DAYS, schema.VISIT_TREATMENTS, schema.VISIT_MEDICATIONS,
               schema.VISIT_ADVERSE_EVENTS, schema.ARM, schema.BASELINE]
    for file in schema.trial_split_files(root, split):
        for batch in pq.ParquetFile(file).iter_batches(batch_size=TRIAL_READ_ROWS, columns=columns):
            visits = visit_rows(pa.Table.from_batches([batch]))
            x = visit_matrix(visits, widths)
            rows, cols = np.nonzero(x)
            counts = np.bincount(rows, minlength=len(x))
            indptr_parts.append(nnz + np.cumsum(counts))
            index_parts.append(cols.astype(np.int32))
            owners.append(visits.column(schema.SUBJECT_ID).to_numpy())
            nnz += len(cols)
    if not owners:
        raise FileNotFoundError(f"{schema.trial_split_dir(root, split)}: no trial shards to build the retrieval index from")
    return RetrievalIndex(np.concatenate(indptr_parts), np.concatenate(index_parts), np.concatenate(owners), sum(widths)).dedupe()


def _top_keys(keys: np.ndarray, m: int) -> np.ndarray:
    """The ``m`` largest keys of each row (unordered), all of them if fewer."""
    if keys.shape[1] <= m:
        return keys
    return np.take_along_axis(keys, np.argpartition(-keys, m - 1, axis=1)[:, :m], 1)


def _per_query_top(query: np.ndarray, keys: np.ndarray, b: int, m: int) -> np.ndarray:
    """The ``m`` largest of each query's keys, (b, m), padded with ``_EXCLUDED``."""
    order = np.lexsort((-keys, query))
    query, keys = query[order], keys[order]
    starts = np.searchsorted(query, np.arange(b))
    rank = np.arange(len(query)) - starts[query]
    keep = rank < m
    out = np.full((b, m), _EXCLUDED, np.int64)
    out[query[keep], rank[keep]] = keys[keep]
    return out


def top_k_global(index: RetrievalIndex, queries: np.ndarray, subjects: np.ndarray, k: int,
                 chunk: int = RETRIEVAL_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` index rows by dot product for each query row, never a row owned by the
    query's subject. Returns ids (B, k) and a validity mask (B, k) (False: fewer candidates).

    Scores of binary rows are integers, so (score, -row) is packed into one int64 key: exact
    and deterministic (ties: the earlier row). Queries are scored against the distinct
    patterns (sparse patterns x dense queries in chunks of ``chunk`` patterns: measured faster
    than a dense GEMM at ~3% density, ``bench/bench_twin.py``), and only patterns at or above
    a query's m-th best score (a histogram of the integer scores) are kept as candidates. With m = k + the most rows one
    participant owns, the top-m rows overall hold the top-k rows not the query's own, and lie
    among the m patterns whose first (lowest) member ranks best, within their first m members:
    so only m x m candidates per query are ranked, and the owner is excluded there."""
    if index.patterns is None:
        index.dedupe()
    pat = index.patterns
    b = len(queries)
    m = k + pat.max_own
    q_t = np.ascontiguousarray(queries.T, dtype=np.float32)  # (L, B)
    query_of, found = [], []  # per chunk: (query, key) of the patterns at or above its m-th best score
    for lo in range(0, pat.size, chunk):
        hi = min(pat.size, lo + chunk)
        # (chunk, B) exact small integers: sparse patterns x dense queries
        scores = np.rint(pat.matrix[lo:hi] @ q_t).astype(np.int32)
        # Each query's m-th best score from a histogram of its scores; every pattern at or
        # above it is a candidate, ties included.
        top = int(scores.max(initial=0)) + 1
        hist = np.bincount((scores + top * np.arange(b)).ravel(), minlength=b * top).reshape(b, top)
        at_least = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]  # [:, v]: patterns scoring >= v
        cut = np.maximum((at_least >= m).sum(1) - 1, 0)
        c, r = np.nonzero(scores >= cut)
        # Patterns are numbered in order of their first member: -pattern ranks like -first row.
        query_of.append(r)
        found.append((scores[c, r].astype(np.int64) << _ROW_BITS) + (_ROW_MASK - (lo + c)))
    keys = _per_query_top(np.concatenate(query_of or [np.zeros(0, np.int64)]),
                          np.concatenate(found or [np.zeros(0, np.int64)]), b, m)
    # Expand each chosen pattern to its first m members, rank (score, -row), drop own rows.
    real = keys != _EXCLUDED  # fewer than m patterns: padding
    pattern = np.where(real, _ROW_MASK - (keys & _ROW_MASK), 0)
    score = np.where(real, keys >> _ROW_BITS, 0)
    offset = np.arange(m)
    start, count = pat.member_offsets[pattern], np.diff(pat.member_offsets)[pattern]
    member_at = np.minimum(start[..., None] + offset, len(pat.members) - 1)
    rows = pat.members[member_at]  # (B, m_patterns, m)
    cand = (score[..., None] << _ROW_BITS) + (_ROW_MASK - rows)
    excluded = (offset >= count[..., None]) | ~real[..., None] | (index.owner[rows] == subjects[:, None, None])
    cand = np.where(excluded, _EXCLUDED, cand).reshape(b, -1)
    return _rows_of_keys(_top_keys(cand, k), k)


def _rows_of_keys(best: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top keys (B, <= k) -> index rows (B, k), best first, and which are real neighbours."""
    best = -np.sort(-best, axis=1)
    valid = best != _EXCLUDED
    ids = _ROW_MASK - (best & _ROW_MASK)
    pad = k - best.shape[1]
    if pad > 0:
        ids, valid = np.pad(ids, ((0, 0), (0, pad))), np.pad(valid, ((0, 0), (0, pad)))
    return np.where(valid, ids, 0), valid


def top_k_global_csr(index: RetrievalIndex, queries: np.ndarray, subjects: np.ndarray, k: int,
                     chunk: int = RETRIEVAL_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """The previous exact search (scipy CSR over every index row, owner masked per chunk):
    the benchmark's reference for :func:`top_k_global`, same results."""
    b = len(queries)
    best = np.full((b, 0), _EXCLUDED, np.int64)
    matrix = index.matrix
    q = np.ascontiguousarray(queries.T, dtype=np.float32)  # (L, B)
    for lo in range(0, index.size, chunk):
        hi = min(index.size, lo + chunk)
        scores = np.rint(np.asarray(matrix[lo:hi] @ q).T).astype(np.int64)  # (B, chunk)
        keys = (scores << _ROW_BITS) + (_ROW_MASK - np.arange(lo, hi))
        keys[index.owner[lo:hi][None, :] == subjects[:, None]] = _EXCLUDED
        best = _top_keys(np.concatenate([best, keys], axis=1), k)
    return _rows_of_keys(best, k)


def top_k_in_batch(x: np.ndarray, subjects: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows of the batch itself by dot product, never the same subject's."""
    scores = x @ x.T
    scores[subjects[:, None] == subjects[None, :]] = -np.inf
    keep = min(k, len(x))
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :keep]
    valid = np.isfinite(np.take_along_axis(scores, ids, 1))
    pad = k - keep
    if pad > 0:
        ids, valid = np.pad(ids, ((0, 0), (0, pad))), np.pad(valid, ((0, 0), (0, pad)))
    return np.where(valid, ids, 0), valid


# --------------------------------------------------------------------------------------------
# Batches


@dataclass
class VisitBatch:
    """B visits of the visits view."""

    subject_id: torch.Tensor  # (B,) int64
    arm: torch.Tensor  # (B,) int64
    visit: torch.Tensor  # (B,) int64 index within the participant
    treatment: torch.Tensor  # (B, l1) float 0/1
    medication: torch.Tensor  # (B, l2)
    adverse_event: torch.Tensor  # (B, l3)
    next_medication: torch.Tensor  # (B, l2), zeros where not has_next
    next_adverse_event: torch.Tensor  # (B, l3)
    has_next: torch.Tensor  # (B,) bool
    baseline: torch.Tensor  # (B, n_baseline) float32
    neighbours: torch.Tensor  # (B, K, l1 + l2 + l3) float 0/1
    neighbour_mask: torch.Tensor  # (B, K) bool

    def __post_init__(self) -> None:
        b = self.subject_id.shape[0]
        for f in fields(self):
            if getattr(self, f.name).shape[0] != b:
                raise ValueError(f"VisitBatch.{f.name}: {b} visits expected, got shape {tuple(getattr(self, f.name).shape)}")

    @property
    def size(self) -> int:
        return int(self.subject_id.shape[0])

    @property
    def visit_vector(self) -> torch.Tensor:
        """The whole visit multi-hot (B, l1 + l2 + l3), the retrieval similarity's input."""
        import torch

        return torch.cat([self.treatment, self.medication, self.adverse_event], dim=1)

    def to(self, device: Any, non_blocking: bool = True) -> VisitBatch:
        return VisitBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class VisitsCollate:
    """Visit rows -> a dict of tensors of :class:`VisitBatch`, neighbours retrieved here (in
    Ray's prefetch threads; the global index is fetched from the object store once)."""

    def __init__(self, widths: tuple[int, int, int], k: int, scope: str, index: Any = None) -> None:
        self.widths, self.k, self.scope = widths, k, scope
        self._index_ref = index  # ObjectRef, a RetrievalIndex, or None
        self._index: RetrievalIndex | None = index if isinstance(index, RetrievalIndex) else None

    def index(self) -> RetrievalIndex:
        if self._index is None:
            import ray

            self._index = ray.get(self._index_ref)
        return self._index

    def arrays(self, table: pa.Table) -> dict[str, np.ndarray]:
        l1, l2, l3 = self.widths
        has_next = table.column(HAS_NEXT).to_numpy(zero_copy_only=False).astype(bool)
        subjects = table.column(schema.SUBJECT_ID).to_numpy()
        x = visit_matrix(table, self.widths)
        b = len(x)
        if self.scope == "global":
            ids, valid = top_k_global(self.index(), x, subjects, self.k)
            neighbours = self.index().rows(ids) * valid[..., None]
        elif self.scope == "in_batch":
            ids, valid = top_k_in_batch(x, subjects, self.k)
            neighbours = x[ids] * valid[..., None]
        else:
            valid = np.zeros((b, self.k), bool)
            neighbours = np.zeros((b, self.k, x.shape[1]), np.float32)
        baseline = table.column(schema.BASELINE).combine_chunks()
        width = len(baseline[0]) if b else 0
        return {
            "subject_id": subjects.astype(np.int64),
            "arm": table.column(schema.ARM).to_numpy().astype(np.int64),
            "visit": table.column(VISIT_INDEX).to_numpy().astype(np.int64),
            "treatment": x[:, :l1], "medication": x[:, l1 : l1 + l2], "adverse_event": x[:, l1 + l2 :],
            "next_medication": multi_hot(table.column(NEXT_MEDICATIONS), l2),
            "next_adverse_event": multi_hot(table.column(NEXT_ADVERSE_EVENTS), l3),
            "has_next": has_next,
            "baseline": baseline.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(b, width),
            "neighbours": neighbours.astype(np.float32), "neighbour_mask": valid,
        }

    def __call__(self, table: pa.Table) -> dict[str, torch.Tensor]:
        import torch

        return {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in self.arrays(table).items()}


# --------------------------------------------------------------------------------------------
# Reading the trial part


class _ReadTrialVisits:
    """The read task: trial row groups -> validated participant rows -> visit rows."""

    def __init__(self, split: str | None, baseline_width: int | None, vocab: dict[str, int]) -> None:
        self.split, self.baseline_width, self.vocab = split, baseline_width, vocab

    def __call__(self, units: pa.Table) -> Iterator[pa.Table]:
        from mirror.data import validate

        for unit in units.column("pieces").to_pylist():
            for piece in unit:
                first_row, previous = piece["first_row"], None
                batches = pq.ParquetFile(piece["path"]).iter_batches(
                    batch_size=TRIAL_READ_ROWS, row_groups=[piece["row_group"]])
                for batch in batches:
                    found = validate.check_trial_table(
                        batch, file=piece["file"], first_row=first_row, split=self.split,
                        baseline_width=self.baseline_width, vocab=self.vocab, previous_subject_id=previous)
                    if found:
                        raise validate.DatasetValidationError(found)
                    previous = batch.column(schema.SUBJECT_ID)[-1].as_py() if batch.num_rows else previous
                    first_row += batch.num_rows
                    if batch.num_rows:
                        yield visit_rows(pa.Table.from_batches([batch]))


@dataclass(frozen=True)
class VisitsReport:
    """Visits of one trial split: every visit is an example (nothing is filtered)."""

    split: str
    patients: int  # participants
    kept: int  # visits
    visits_with_next: int

    def dropped_by_reason(self) -> dict[str, int]:
        return {}

    def as_dict(self) -> dict[str, int | str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def count_visits(root: str | Path, split: str) -> VisitsReport:
    """Participants and visits of a split from the ``visit_days`` column alone."""
    participants = visits = 0
    for file in schema.trial_split_files(root, split):
        for batch in pq.ParquetFile(file).iter_batches(columns=[schema.VISIT_DAYS]):
            lengths = np.diff(batch.column(0).offsets.to_numpy())
            participants += len(lengths)
            visits += int(lengths.sum())
    return VisitsReport(split, participants, visits, visits - participants)


@dataclass(frozen=True)
class VisitsViewConfig:
    """The ``view.*`` keys of visit models."""

    k: int = 3  # neighbours retrieved per visit (PyTrial: self + 3)
    retrieval: str = "global"  # global | in_batch | none (TWIN-RAE)

    def __post_init__(self) -> None:
        require(self, "k", 1 <= self.k <= 64, "an int in [1, 64]")
        require(self, "retrieval", self.retrieval in RETRIEVAL_SCOPES, f"one of {RETRIEVAL_SCOPES}")


@dataclass(frozen=True)
class VisitsInfo:
    """What a visit model is built from: the three vocabulary sizes, baseline width, K."""

    n_treatments: int = 4
    n_medications: int = 20
    n_adverse_events: int = 46
    n_baseline: int = 13
    k: int = 3

    @property
    def widths(self) -> tuple[int, int, int]:
        return (self.n_treatments, self.n_medications, self.n_adverse_events)


class VisitsView(DataView):
    name = "visits"
    config_cls = VisitsViewConfig
    info_cls = VisitsInfo
    normaliser = "visits"
    unit = "visits"
    record_type = "trial"  # generated records are trial participants (TRIAL_SCHEMA, trial/<split>/)

    config: VisitsViewConfig

    def __init__(self, config: VisitsViewConfig, root: str) -> None:
        super().__init__(config, root)
        self.metadata = schema.DatasetMetadata.read(root)
        if not self.metadata.trial:
            raise ValueError(f"{Path(root) / schema.DATASET_JSON}: no trial part; the visits view reads trial/<split>/ "
                             "(jobs/generate.py --trial-participants N, or jobs/import_trial.py)")
        self.index_ref: Any = None  # the global retrieval index in the object store (read())

    def info(self) -> VisitsInfo:
        v = self.metadata.vocab
        return VisitsInfo(v[schema.TRIAL_TREATMENT], v[schema.TRIAL_MEDICATION], v[schema.ADVERSE_EVENT],
                          len(self.metadata.trial.get("baseline_features", [])), self.config.k)

    def ensure_index(self) -> Any:
        """Build the training split's index once per run and put it in the object store."""
        if self.index_ref is None and self.config.retrieval == "global":
            import ray

            self.index_ref = ray.put(build_index(self.root, self.info().widths))
        return self.index_ref

    def read(self, split: str, *, purpose: str = "train") -> tuple[ray.data.Dataset, VisitsReport]:
        import ray
        import ray.data

        from mirror.data.stream import read_units

        files = schema.trial_split_files(self.root, split)
        if not files:
            raise FileNotFoundError(f"{schema.trial_split_dir(self.root, split)}: no trial shards for {split!r}")
        self.ensure_index()
        units = read_units(self.root, files)
        own_splits = self.metadata.provenance.get("splits") != "source"
        read = _ReadTrialVisits(split if own_splits else None, self.info().n_baseline or None, dict(self.metadata.vocab))
        dataset = ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
            read, batch_format="pyarrow", batch_size=1, num_cpus=0.25,
            compute=ray.data.TaskPoolStrategy(size=max(1, min(len(units), int(ray.cluster_resources().get("CPU", 1))))),
        )
        dataset.context.raise_original_map_exception = True
        return dataset, count_visits(self.root, split)

    def collate(self) -> VisitsCollate:
        return VisitsCollate(self.info().widths, self.config.k, self.config.retrieval, self.ensure_index())

    def batches(self, source: Any, batch_size: int, *, training: bool, epoch: int = 0, seed: int = 0,
                device: Any = "auto") -> Iterator[VisitBatch]:
        from ray.data.collate_fn import ArrowBatchCollateFn

        from mirror.data.stream import iter_batches

        class Collate(VisitsCollate, ArrowBatchCollateFn):
            pass

        c = self.collate()
        # drop_last in training: the CPM's BatchNorm cannot take a batch of one visit.
        return iter_batches(source, batch_size, collate_fn=Collate(c.widths, c.k, c.scope, c._index_ref),
                            make_batch=lambda t: VisitBatch(**t), device=device, drop_last=training)

    def inference_batch(self, table: pa.Table) -> tuple[VisitBatch, np.ndarray]:
        """Participant rows (``TRIAL_SCHEMA``) as one batch of all their visits; nothing is cut."""
        import torch

        arrays = self.collate().arrays(visit_rows(table))
        return VisitBatch(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}), np.zeros(table.num_rows, bool)
