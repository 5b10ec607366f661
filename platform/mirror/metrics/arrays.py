"""Sort-based unique/count helpers for integer arrays.

``np.unique`` on large int64 arrays is pathologically slow in the numpy on this stack (its
hash-based path takes seconds for a few million values where one ``np.sort`` takes tens of
milliseconds), so every hot path uses these instead.
"""

from __future__ import annotations

import numpy as np


def unique(x: np.ndarray) -> np.ndarray:
    """Sorted distinct values."""
    s = np.sort(np.asarray(x), kind="stable")
    if s.size == 0:
        return s
    keep = np.empty(s.size, dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


def unique_inverse(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct values, index of each input value in them)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    s = x[order]
    starts = np.empty(s.size, dtype=bool)
    if s.size:
        starts[0] = True
        np.not_equal(s[1:], s[:-1], out=starts[1:])
    group = np.cumsum(starts) - 1
    inverse = np.empty(x.size, dtype=np.int64)
    inverse[order] = group
    return s[starts], inverse


def unique_counts(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct values, occurrences of each)."""
    s = np.sort(np.asarray(x), kind="stable")
    if s.size == 0:
        return s, np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate([[True], s[1:] != s[:-1]]))
    return s[starts], np.diff(np.append(starts, s.size))


def rows_flagged(row_of_item: np.ndarray, flags: np.ndarray, n_rows: int) -> np.ndarray:
    """Sorted rows having at least one flagged item."""
    return np.flatnonzero(np.bincount(row_of_item[flags], minlength=n_rows))


def isin(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``np.isin`` by sort + binary search (fast for large int64/uint64 sets)."""
    ref = unique(reference)
    if ref.size == 0:
        return np.zeros(np.shape(x), dtype=bool)
    pos = np.minimum(np.searchsorted(ref, x), ref.size - 1)
    return ref[pos] == x
