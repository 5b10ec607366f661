"""Exact nearest neighbours on sparse binary rows (Hamming = squared Euclidean), chunked, on Ray.

Rows are sets of int64 feature keys (``features.neighbour_keys``); the distance between rows
``q`` and ``r`` is ``|q| + |r| - 2 q.r``, exact integer arithmetic, no approximation.

How one query chunk is answered (metrics notes section 1, "sparse regime")
---------------------------------------------------------------------------
``G = Q @ R^T`` (one sparse product) holds ``q.r`` only for the pairs that share a key: the
*overlap set* of each query. Every other reference row is at distance ``|q| + |r|``, so the
best of those is ``|q|`` plus the smallest norm among rows outside the overlap set. Reference
rows are grouped into *levels* of equal norm; for each query we walk up the levels until one
has a row the query does not overlap (almost always the first level). The answer is exact,
and the work is proportional to the overlap count, never to ``n_query x n_reference``.

* Self-exclusion (``self_rows``) is by index, never by "distance > 0": true duplicates at
  distance 0 are real neighbours (the HALO pitfall, notes section 5).
* Ties: distances are integers, so ``nearest`` also returns how many reference rows share
  the minimum; ``k_nearest`` breaks ties by a seeded random rank of the reference rows.

Parallelism and memory
----------------------
:class:`NeighbourSearch` builds the index once, ``ray.put``\\ s it once (zero-copy numpy in
every task) and answers query chunks as independent Ray tasks. Chunks are sized by an upper
bound on their overlap count (``sum of document frequencies of the query's keys``), so each
task's transient memory is bounded (~``chunk_pairs`` x 30 bytes) whatever the reference size.
The reference is never subsampled; callers subsample queries only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray
import scipy.sparse as sp

from mirror.metrics import arrays

INF = np.iinfo(np.int64).max // 4  # per-query "no candidate"
PAIR_INF = np.iinfo(np.int32).max  # per-pair "excluded" (per-pair arrays are int32: ~15 B/pair)
DEFAULT_CHUNK_PAIRS = 2_000_000  # upper bound of overlap pairs per chunk (~60 MB transient)
MAX_CHUNK_ROWS = 16_384


@dataclass
class ReferenceIndex:
    """The searched side, prepared once. Columns are the distinct keys the reference uses."""

    keys: np.ndarray  # (n_cols,) int64, sorted: global feature key of each column
    t_indptr: np.ndarray  # (n_cols + 1,) int64: column -> reference rows (the transpose, CSR)
    t_indices: np.ndarray  # (nnz,) int32
    t_data: np.ndarray  # (nnz,) int16 ones (scipy needs a data array)
    norms: np.ndarray  # (n_ref,) int64, keys per reference row
    level_values: np.ndarray  # (n_levels,) sorted distinct norms
    level_counts: np.ndarray  # (n_levels,) reference rows per norm
    level_of_row: np.ndarray  # (n_ref,) int32
    rank: np.ndarray  # (n_ref,) int64 random tie-break rank
    order: np.ndarray  # (n_ref,) rows by (norm, rank): non-overlap candidates, best first

    @property
    def n_ref(self) -> int:
        return len(self.norms)

    @property
    def n_cols(self) -> int:
        return len(self.keys)

    @classmethod
    def build(cls, indptr: np.ndarray, keys: np.ndarray, seed: int = 0) -> ReferenceIndex:
        """From rows of distinct int64 keys (``indptr`` int64 (n + 1,), ``keys``)."""
        n_ref = len(indptr) - 1
        if n_ref < 1:
            raise ValueError("reference set is empty")
        uniq, cols = arrays.unique_inverse(keys)
        forward = sp.csr_matrix(
            (np.ones(len(keys), dtype=np.int16), cols.astype(np.int32), indptr),
            shape=(n_ref, len(uniq)),
        )
        del cols
        transposed = forward.tocsc()  # CSC of R == CSR of R^T, O(nnz) without sorting
        del forward
        norms = np.diff(indptr).astype(np.int64)
        level_values, level_of_row = arrays.unique_inverse(norms)
        level_counts = np.bincount(level_of_row, minlength=len(level_values))
        rank = np.random.default_rng(seed).permutation(n_ref).astype(np.int64)
        return cls(
            keys=uniq,
            t_indptr=transposed.indptr.astype(np.int64),
            t_indices=transposed.indices.astype(np.int32),
            t_data=transposed.data,
            norms=norms,
            level_values=level_values.astype(np.int64),
            level_counts=level_counts.astype(np.int64),
            level_of_row=level_of_row.astype(np.int32),
            rank=rank,
            order=np.lexsort((rank, norms)).astype(np.int64),
        )

    def transpose_matrix(self) -> sp.csr_matrix:
        return sp.csr_matrix(
            (self.t_data, self.t_indices, self.t_indptr), shape=(self.n_cols, self.n_ref)
        )

    def document_frequency(self) -> np.ndarray:
        return np.diff(self.t_indptr)

    def encode(self, q_indptr: np.ndarray, q_keys: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
        """Queries as CSR over this index's columns, plus their full norms. Keys the reference
        never uses cannot overlap but still count in ``|q|``."""
        n_q = len(q_indptr) - 1
        norms = np.diff(q_indptr).astype(np.int64)
        pos = np.searchsorted(self.keys, q_keys)
        found = pos < len(self.keys)
        found[found] = self.keys[pos[found]] == q_keys[found]
        rows = np.repeat(np.arange(n_q, dtype=np.int64), norms)[found]
        indptr = np.zeros(n_q + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n_q), out=indptr[1:])
        q = sp.csr_matrix(
            (np.ones(int(found.sum()), dtype=np.int16), pos[found].astype(np.int32), indptr),
            shape=(n_q, self.n_cols),
        )
        return q, norms


def _overlaps(q: sp.csr_matrix, q_norms: np.ndarray, ref: ReferenceIndex) -> tuple[np.ndarray, ...]:
    """(rows, cols, distances, row counts) of every query-reference pair sharing a key; the
    per-pair arrays are int32 (distances are at most 2 x 10,000 keys)."""
    g = q @ ref.transpose_matrix()
    counts = np.diff(g.indptr)
    rows = np.repeat(np.arange(q.shape[0], dtype=np.int32), counts)
    cols = g.indices.astype(np.int32, copy=False)
    d = (
        q_norms.astype(np.int32)[rows]
        + ref.norms.astype(np.int32)[cols]
        - 2 * g.data.astype(np.int32)
    )
    return rows, cols, d, counts


def nearest(
    q: sp.csr_matrix, q_norms: np.ndarray, ref: ReferenceIndex, self_rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact 1-NN distance of each query and the number of reference rows at that distance.

    ``self_rows[i]`` (or -1) is the reference row that *is* query ``i``: it is excluded by index.
    """
    c = q.shape[0]
    rows, cols, d, counts = _overlaps(q, q_norms, ref)
    member_rows, member_cols = rows, cols  # rows a query may not use as non-overlap candidates
    if self_rows is not None:
        self_rows = np.asarray(self_rows, dtype=np.int64)
        is_self = cols == self_rows[rows]
        d = np.where(is_self, PAIR_INF, d)
        has_self = np.zeros(c, dtype=bool)
        has_self[rows[is_self]] = True
        extra = np.flatnonzero(~has_self & (self_rows >= 0))
        member_rows = np.concatenate([rows, extra.astype(np.int32)])
        member_cols = np.concatenate([cols, self_rows[extra].astype(np.int32)])

    best = np.full(c, INF, dtype=np.int64)
    nonempty = counts > 0
    if d.size:
        g_starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        best[nonempty] = np.minimum.reduceat(d, g_starts[nonempty])
        best[best == PAIR_INF] = INF  # only the excluded self entry overlapped
    at_best = (d == best[rows]) & (d < PAIR_INF)
    ties = np.bincount(rows[at_best], minlength=c)

    # Smallest reference norm outside each query's overlap set, level by level.
    n_levels = len(ref.level_values)
    level = np.zeros(c, dtype=np.int64)
    free_dist = np.full(c, INF, dtype=np.int64)
    free_ties = np.zeros(c, dtype=np.int64)
    pending = np.ones(c, dtype=bool)
    m_rows, m_level = member_rows, ref.level_of_row[member_cols]
    while pending.any():
        keep = pending[m_rows]
        m_rows, m_level = m_rows[keep], m_level[keep]
        used = np.bincount(m_rows[m_level == level[m_rows]], minlength=c)
        free = ref.level_counts[np.minimum(level, n_levels - 1)] - used
        done = pending & (free > 0)
        free_dist[done] = q_norms[done] + ref.level_values[level[done]]
        free_ties[done] = free[done]
        pending &= ~done
        level[pending] += 1
        pending &= level < n_levels  # every reference row overlaps (or is self): none free

    dist = np.minimum(best, free_dist)
    if (dist >= INF).any():
        raise ValueError("a query has no reference row other than itself (reference too small)")
    n_ties = np.where(best == dist, ties, 0) + np.where(free_dist == dist, free_ties, 0)
    return dist, n_ties


def k_nearest(
    q: sp.csr_matrix, q_norms: np.ndarray, ref: ReferenceIndex, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN: (distances (c, k), reference rows (c, k)); ties broken by ``ref.rank``."""
    if k > ref.n_ref:
        raise ValueError(f"k={k} but the reference has only {ref.n_ref} rows")
    c = q.shape[0]
    rows, cols, d, _ = _overlaps(q, q_norms, ref)
    rows, cols, d = rows.astype(np.int64), cols.astype(np.int64), d.astype(np.int64)
    member = np.sort(rows * ref.n_ref + cols)

    # The first k rows of ref.order outside each query's overlap set, scanned in windows.
    width = k + 8
    need = np.full(c, k, dtype=np.int64)
    pos = np.zeros(c, dtype=np.int64)
    active = np.arange(c, dtype=np.int64)
    free_rows, free_cols = [], []
    while active.size:
        p = pos[active][:, None] + np.arange(width)
        valid = p < ref.n_ref
        cand = ref.order[np.minimum(p, ref.n_ref - 1)]
        key = active[:, None] * ref.n_ref + cand
        in_member = np.zeros(key.shape, dtype=bool)
        if len(member):
            at = np.minimum(np.searchsorted(member, key), len(member) - 1)
            in_member = member[at] == key
        ok = valid & ~in_member
        take = ok & (np.cumsum(ok, axis=1) <= need[active][:, None])
        r, j = np.nonzero(take)
        free_rows.append(active[r])
        free_cols.append(cand[r, j])
        need[active] -= take.sum(axis=1)
        pos[active] += width
        active = active[(need[active] > 0) & (pos[active] < ref.n_ref)]
    fr = np.concatenate(free_rows) if free_rows else np.zeros(0, np.int64)
    fc = np.concatenate(free_cols) if free_cols else np.zeros(0, np.int64)

    all_rows = np.concatenate([rows, fr])
    all_cols = np.concatenate([cols, fc])
    all_d = np.concatenate([d, q_norms[fr] + ref.norms[fc]])
    order = np.lexsort((ref.rank[all_cols], all_d, all_rows))
    all_rows, all_cols, all_d = all_rows[order], all_cols[order], all_d[order]
    starts = np.searchsorted(all_rows, np.arange(c))
    within = np.arange(len(all_rows)) - starts[all_rows]
    keep = within < k
    dist = np.full((c, k), INF, dtype=np.int64)
    idx = np.full((c, k), -1, dtype=np.int64)
    dist[all_rows[keep], within[keep]] = all_d[keep]
    idx[all_rows[keep], within[keep]] = all_cols[keep]
    return dist, idx


# ---------------------------------------------------------------------------------------------
# Ray orchestration


@ray.remote(num_cpus=1)
def _nearest_task(
    ref: ReferenceIndex, q: sp.csr_matrix, q_norms: np.ndarray, self_rows: np.ndarray | None
):
    return nearest(q, q_norms, ref, self_rows)


@ray.remote(num_cpus=1)
def _k_nearest_task(ref: ReferenceIndex, q: sp.csr_matrix, q_norms: np.ndarray, k: int):
    return k_nearest(q, q_norms, ref, k)


def chunk_bounds(work: np.ndarray, budget: int, max_rows: int = MAX_CHUNK_ROWS) -> np.ndarray:
    """Greedy contiguous chunks whose summed ``work`` stays under ``budget`` (a single heavier
    query gets a chunk of its own); returns boundaries ``[0, ..., n]``."""
    n = len(work)
    bounds = [0]
    cum = np.cumsum(np.asarray(work, dtype=np.int64) + 1)
    while bounds[-1] < n:
        start = bounds[-1]
        base = cum[start - 1] if start else 0
        end = int(np.searchsorted(cum, base + budget, side="right"))
        bounds.append(min(max(end, start + 1), start + max_rows, n))
    return np.asarray(bounds, dtype=np.int64)


class NeighbourSearch:
    """Exact nearest-neighbour queries against one reference, answered by parallel Ray tasks.

    The index lives only in the Ray object store (put once); the driver reads it zero-copy.
    """

    def __init__(
        self,
        indptr: np.ndarray,
        keys: np.ndarray,
        *,
        seed: int = 0,
        chunk_pairs: int = DEFAULT_CHUNK_PAIRS,
    ) -> None:
        self._ref = ray.put(ReferenceIndex.build(indptr, keys, seed))
        self.chunk_pairs = chunk_pairs

    @property
    def index(self) -> ReferenceIndex:
        return ray.get(self._ref)

    @property
    def n_ref(self) -> int:
        return self.index.n_ref

    def _chunks(self, q_indptr: np.ndarray, q_keys: np.ndarray):
        index = self.index
        q, norms = index.encode(q_indptr, q_keys)
        work = q @ index.document_frequency()
        bounds = chunk_bounds(work, self.chunk_pairs)
        return q, norms, list(zip(bounds[:-1], bounds[1:], strict=True))

    def nearest(
        self, q_indptr: np.ndarray, q_keys: np.ndarray, self_rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(distance, ties) per query; see :func:`nearest`."""
        q, norms, chunks = self._chunks(q_indptr, q_keys)
        refs = [
            _nearest_task.remote(
                self._ref, q[a:b], norms[a:b], None if self_rows is None else self_rows[a:b]
            )
            for a, b in chunks
        ]
        parts = ray.get(refs)
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def k_nearest(
        self, q_indptr: np.ndarray, q_keys: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(distances, reference rows), each (n_query, k); see :func:`k_nearest`."""
        q, norms, chunks = self._chunks(q_indptr, q_keys)
        parts = ray.get(
            [_k_nearest_task.remote(self._ref, q[a:b], norms[a:b], k) for a, b in chunks]
        )
        if not parts:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def close(self) -> None:
        """Release the object-store copy (also happens when this object is garbage collected)."""
        self._ref = None


def select_rows(
    indptr: np.ndarray, keys: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``rows`` (in that order) of a (indptr, keys) row set."""
    rows = np.asarray(rows, dtype=np.int64)
    lens = indptr[rows + 1] - indptr[rows]
    out = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lens, out=out[1:])
    idx = np.repeat(indptr[rows] - out[:-1], lens) + np.arange(out[-1])
    return out, keys[idx]


def local_nearest(
    a_indptr: np.ndarray,
    a_keys: np.ndarray,
    b_indptr: np.ndarray,
    b_keys: np.ndarray,
    self_match: bool = False,
    chunk_pairs: int = DEFAULT_CHUNK_PAIRS,
) -> tuple[np.ndarray, np.ndarray]:
    """1-NN of every row of A in B, in this process (for blocks inside a Ray task), chunked
    like the Ray path so memory stays bounded. ``self_match``: A is B, exclude each row."""
    ref = ReferenceIndex.build(b_indptr, b_keys)
    q, norms = ref.encode(a_indptr, a_keys)
    self_rows = np.arange(len(a_indptr) - 1) if self_match else None
    bounds = chunk_bounds(q @ ref.document_frequency(), chunk_pairs)
    parts = [
        nearest(q[a:b], norms[a:b], ref, None if self_rows is None else self_rows[a:b])
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
