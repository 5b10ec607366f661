"""One streaming pass over a set of patients yields everything the scorecard needs from it.

A :class:`DatasetView` holds, for every patient, only compact derived data (neighbour keys,
hashes, the 605-column condition multi-hot) plus the fidelity summary and a random sample of
full records for the record-based metrics. Shards are scanned in parallel Ray tasks, each
reading its file batch by batch, so no process ever holds a whole dataset's raw records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import scipy.sparse as sp

from mirror.data.vocab import N_CONDITIONS
from mirror.metrics import arrays
from mirror.metrics import features as F
from mirror.metrics.fidelity import FidelitySummary
from mirror.metrics.neighbours import select_rows
from mirror.metrics.records import PatientBlock, ShardFile, dataset_files, iter_shard_blocks


@dataclass
class DatasetView:
    name: str
    summary: FidelitySummary
    nn_indptr: np.ndarray  # (n + 1,) int64: neighbour keys of patient i
    nn_keys: np.ndarray  # int64
    record_hash: np.ndarray  # (n,) uint64, exact-match canonical form
    visit_set_hash: np.ndarray  # (n,) uint64, presence-disclosure record form
    n_words: np.ndarray  # (n,) int64
    conditions: sp.csr_matrix  # (n, 605) int8 multi-hot
    visit_hashes: np.ndarray | None  # sorted distinct visit hashes of all patients (if collected)
    sample: PatientBlock  # random sample of full records, in random order
    sample_rows: np.ndarray  # (m,) row of each sampled patient in this view

    @property
    def n(self) -> int:
        return len(self.record_hash)

    def rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Neighbour keys of ``rows`` as (indptr, keys)."""
        return select_rows(self.nn_indptr, self.nn_keys, rows)


@dataclass
class _Piece:
    summary: FidelitySummary
    nn_indptr: np.ndarray
    nn_keys: np.ndarray
    record_hash: np.ndarray
    visit_set_hash: np.ndarray
    n_words: np.ndarray
    conditions: sp.csr_matrix
    visit_hashes: np.ndarray | None
    sample: PatientBlock
    sample_rank: np.ndarray  # position of each sampled patient in the view's sample order
    sample_rows: np.ndarray  # view rows of the sampled patients


def _piece(
    block: PatientBlock,
    first_row: int,
    sample_local: np.ndarray,
    sample_rank: np.ndarray,
    collect_visits: bool,
) -> _Piece:
    indptr, keys = F.neighbour_keys(block)
    visit_hashes, _ = F.visit_hashes(block) if collect_visits else (None, None)
    return _Piece(
        summary=FidelitySummary.from_block(block),
        nn_indptr=indptr,
        nn_keys=keys,
        record_hash=F.record_hashes(block),
        visit_set_hash=F.visit_set_hashes(block),
        n_words=block.lengths,
        conditions=F.condition_matrix(block),
        visit_hashes=None if visit_hashes is None else arrays.unique(visit_hashes),
        sample=block.take(sample_local),
        sample_rank=sample_rank,
        sample_rows=sample_local + first_row,
    )


def _join(pieces: Sequence[_Piece]) -> _Piece:
    summary = pieces[0].summary
    for p in pieces[1:]:
        summary = summary.merge(p.summary)
    key_offsets = np.cumsum([0] + [len(p.nn_keys) for p in pieces[:-1]])
    visits = (
        None
        if pieces[0].visit_hashes is None
        else arrays.unique(np.concatenate([p.visit_hashes for p in pieces]))
    )
    return _Piece(
        summary=summary,
        nn_indptr=np.concatenate(
            [pieces[0].nn_indptr[:1]]
            + [p.nn_indptr[1:] + o for p, o in zip(pieces, key_offsets, strict=True)]
        ),
        nn_keys=np.concatenate([p.nn_keys for p in pieces]),
        record_hash=np.concatenate([p.record_hash for p in pieces]),
        visit_set_hash=np.concatenate([p.visit_set_hash for p in pieces]),
        n_words=np.concatenate([p.n_words for p in pieces]),
        conditions=sp.vstack([p.conditions for p in pieces], format="csr"),
        visit_hashes=visits,
        sample=PatientBlock.concat([p.sample for p in pieces]),
        sample_rank=np.concatenate([p.sample_rank for p in pieces]),
        sample_rows=np.concatenate([p.sample_rows for p in pieces]),
    )


def _to_view(name: str, piece: _Piece) -> DatasetView:
    order = np.argsort(piece.sample_rank, kind="stable")
    return DatasetView(
        name=name,
        summary=piece.summary,
        nn_indptr=piece.nn_indptr,
        nn_keys=piece.nn_keys,
        record_hash=piece.record_hash,
        visit_set_hash=piece.visit_set_hash,
        n_words=piece.n_words,
        conditions=piece.conditions,
        visit_hashes=piece.visit_hashes,
        sample=piece.sample.take(order),
        sample_rows=piece.sample_rows[order],
    )


RECORD_TYPES = ("sentence", "code_set")


def as_code_sets(block: PatientBlock) -> PatientBlock:
    """Each patient as the set of conditions it holds: distinct conditions, no ages, weeks,
    sex or enrollment (all 0 or 1), no validity failures (a time rule has nothing to check).
    How the scorecard compares a code-vector generator's samples with real patients: every
    set is reduced alike, so neighbours, hashes and fidelity see only codes."""
    n = len(block)
    indptr, codes = F.row_unique(block.row_of_word(), block.conditions, n, N_CONDITIONS)
    zeros = np.zeros(n, np.int32)
    return PatientBlock(
        subject_id=block.subject_id, sex=np.ones(n, np.int8), birth_week=zeros, enroll_start=zeros.copy(),
        enroll_end=zeros.copy(), rule_failures=np.zeros(n, block.rule_failures.dtype), offsets=indptr,
        conditions=codes.astype(np.int16), age_groups=np.zeros(len(codes), np.int8), weeks=np.zeros(len(codes), np.int32),
    )


def reduce_to(block: PatientBlock, record_type: str) -> PatientBlock:
    if record_type not in RECORD_TYPES:
        raise ValueError(f"record type {record_type!r}: expected one of {RECORD_TYPES}")
    return as_code_sets(block) if record_type == "code_set" else block


def _sample_plan(n: int, sample_size: int, seed: int) -> np.ndarray:
    """Rows of the sample, in sample order (a uniformly random subset in random order)."""
    return np.random.default_rng(seed).permutation(n)[: min(sample_size, n)]


def _scan_shard(
    shard: ShardFile, n_weeks: int, plan: np.ndarray, collect_visits: bool, record_type: str = "sentence"
) -> _Piece:
    pieces = []
    for first_row, block in iter_shard_blocks(shard, n_weeks):
        block = reduce_to(block, record_type)
        rank = np.flatnonzero((plan >= first_row) & (plan < first_row + len(block)))
        pieces.append(_piece(block, first_row, plan[rank] - first_row, rank, collect_visits))
    if not pieces:  # a shard with zero rows
        empty = PatientBlock.empty()
        return _piece(
            empty, shard.first_row, np.zeros(0, np.int64), np.zeros(0, np.int64), collect_visits
        )
    return _join(pieces)


_scan_shard_task = ray.remote(num_cpus=1)(_scan_shard)


def scan_view(
    name: str,
    root: str | Path,
    splits: Sequence[str],
    n_weeks: int,
    sample_size: int,
    seed: int,
    collect_visits: bool = False,
    record_type: str = "sentence",
) -> DatasetView:
    """Scan the shards of ``splits`` under ``root``, one Ray task per shard, each patient
    reduced to ``record_type`` (``as_code_sets``) as it is read."""
    shards = dataset_files(root, splits)
    if not shards:
        raise FileNotFoundError(f"{root}: no Parquet shards under data/{{{','.join(splits)}}}/")
    n = sum(s.n_rows for s in shards)
    if n == 0:
        raise ValueError(f"{root}: splits {list(splits)} hold no patients")
    plan = _sample_plan(n, sample_size, seed)
    plan_ref = ray.put(plan)
    pieces = ray.get(
        [_scan_shard_task.remote(s, n_weeks, plan_ref, collect_visits, record_type) for s in shards]
    )
    return _to_view(name, _join(pieces))


def view_from_block(
    name: str, block: PatientBlock, sample_size: int, seed: int, collect_visits: bool = False
) -> DatasetView:
    """A view of an in-memory block (held-out halves, tests), in this process."""
    plan = _sample_plan(len(block), sample_size, seed)
    rank = np.arange(len(plan))
    return _to_view(name, _piece(block, 0, plan, rank, collect_visits))
