"""Exact chunked nearest neighbours, against brute force on dense arrays."""

from __future__ import annotations

import numpy as np
import pytest

from mirror.metrics.neighbours import (
    NeighbourSearch,
    ReferenceIndex,
    chunk_bounds,
    k_nearest,
    local_nearest,
    nearest,
    select_rows,
)


def random_rows(rng: np.random.Generator, n: int, vocab: int, max_len: int):
    rows = [np.unique(rng.integers(0, vocab, rng.integers(0, max_len))) for _ in range(n)]
    indptr = np.r_[0, np.cumsum([len(r) for r in rows])].astype(np.int64)
    keys = np.concatenate(rows).astype(np.int64) * 1_000_003  # sparse, large key ids
    dense = np.zeros((n, vocab), dtype=np.int64)
    for i, r in enumerate(rows):
        dense[i, r] = 1
    return indptr, keys, dense


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a[:, None, :] != b[None, :, :]).sum(-1)


@pytest.mark.parametrize("trial", range(12))
def test_nearest_matches_brute_force(trial):
    rng = np.random.default_rng(trial)
    vocab = int(rng.integers(3, 30))
    qi, qk, q = random_rows(rng, int(rng.integers(1, 40)), vocab, 8)
    ri, rk, r = random_rows(rng, int(rng.integers(2, 40)), vocab, 8)
    ref = ReferenceIndex.build(ri, rk, seed=trial)
    dist, ties = nearest(*ref.encode(qi, qk), ref)
    d = hamming(q, r)
    assert dist.tolist() == d.min(1).tolist()
    assert ties.tolist() == (d == d.min(1)[:, None]).sum(1).tolist()

    k = min(3, len(r))
    kd, ki = k_nearest(*ref.encode(qi, qk), ref, k)
    for i in range(len(q)):
        expected = sorted(range(len(r)), key=lambda j: (d[i, j], ref.rank[j]))[
            :k
        ]  # ties by seeded rank
        assert ki[i].tolist() == expected
        assert kd[i].tolist() == d[i, expected].tolist()


@pytest.mark.parametrize("trial", range(6))
def test_self_exclusion_is_by_index(trial):
    rng = np.random.default_rng(100 + trial)
    ri, rk, r = random_rows(rng, 30, 6, 4)  # small vocabulary: many duplicate rows
    ref = ReferenceIndex.build(ri, rk)
    dist, ties = nearest(*ref.encode(ri, rk), ref, self_rows=np.arange(30))
    d = hamming(r, r).astype(float)
    np.fill_diagonal(d, np.inf)
    assert dist.tolist() == d.min(1).astype(int).tolist()
    assert ties.tolist() == (d == d.min(1)[:, None]).sum(1).tolist()


def test_true_duplicates_stay_at_distance_zero():
    # rows 0 and 1 are identical; row 2 is empty. HALO's "ignore distance 0" would hide this.
    indptr, keys = np.array([0, 2, 4, 4]), np.array([7, 9, 7, 9])
    dist, ties = local_nearest(indptr, keys, indptr, keys, self_match=True)
    assert dist.tolist() == [0, 0, 2]
    assert ties.tolist() == [1, 1, 2]


def test_query_keys_missing_from_the_reference_still_count():
    ref = ReferenceIndex.build(np.array([0, 1, 3]), np.array([1, 1, 2]))
    q, norms = ref.encode(np.array([0, 3]), np.array([1, 50, 60]))
    assert norms.tolist() == [3]
    dist, ties = nearest(q, norms, ref)
    assert dist.tolist() == [2] and ties.tolist() == [1]  # {1,50,60} vs {1}: 2; vs {1,2}: 3


def test_k_larger_than_reference_is_an_error():
    ref = ReferenceIndex.build(np.array([0, 1]), np.array([1]))
    with pytest.raises(ValueError, match="only 1 rows"):
        k_nearest(*ref.encode(np.array([0, 1]), np.array([1])), ref, 2)


def test_chunk_bounds_respect_the_budget():
    work = np.array([5, 5, 5, 100, 1, 1, 1])
    bounds = chunk_bounds(work, budget=12)
    assert bounds[0] == 0 and bounds[-1] == len(work)
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        assert b > a
        assert (work[a:b] + 1).sum() <= 12 or b - a == 1  # a heavy query gets a chunk alone


def test_select_rows():
    indptr, keys = np.array([0, 2, 3, 6]), np.array([1, 2, 3, 4, 5, 6])
    out_ptr, out_keys = select_rows(indptr, keys, np.array([2, 0]))
    assert out_ptr.tolist() == [0, 3, 5] and out_keys.tolist() == [4, 5, 6, 1, 2]


def test_ray_search_equals_local_kernel_with_many_chunks(ray_cluster):
    rng = np.random.default_rng(7)
    qi, qk, q = random_rows(rng, 300, 25, 10)
    ri, rk, r = random_rows(rng, 500, 25, 10)
    search = NeighbourSearch(ri, rk, seed=3, chunk_pairs=200)  # forces dozens of Ray tasks
    dist, ties = search.nearest(qi, qk)
    d = hamming(q, r)
    assert dist.tolist() == d.min(1).tolist()
    assert ties.tolist() == (d == d.min(1)[:, None]).sum(1).tolist()
    self_dist, _ = search.nearest(ri, rk, self_rows=np.arange(500))
    local, _ = local_nearest(ri, rk, ri, rk, self_match=True)
    assert self_dist.tolist() == local.tolist()
    kd, ki = search.k_nearest(qi, qk, 4)
    assert kd.tolist() == np.sort(d, axis=1)[:, :4].tolist()
    assert (d[np.arange(300)[:, None], ki] == kd).all()
    search.close()
