"""The ``admissions`` view: one example per inpatient admission, for medication recommenders
(MiranDa, seed 004).

An example is admission ``j`` of a patient. It carries:

* the visit history: admissions ``j, j-1, ..., j-max_visits+1`` of the patient (position 0 is
  the current one, so a model that pools position 0 reads the current admission; upstream
  pooled the *oldest*), each a set of diagnoses (``condition_stays``), procedures
  (``procedure_stays``) and lab flags (``lab_stays``: lab id x {in range, out of range}, out
  of range = more than ``LAB_FLAG_SHARE`` of the lab's typical value away from it). Older
  admissions are cut and counted (``history_truncated``), never silently;
* demographics as separate features: female, age at admission / 100, log1p(admission index);
* the target: the multi-hot of the ATC-3 classes given during the stay (``medication_stays``);
* the length of stay (days);
* the retrieval candidates of MiranDa's ELOS: up to ``pool_size`` admissions of the TRAINING
  split that share the admission's procedure set (a 64-bit set hash) and whose patients were
  within ``age_window`` years of age, never the query's own patient (so never the query
  itself); with ``fallback = "age"`` an admission whose procedure block has no candidate
  falls back to the age window over the whole pool (counted); with ``"nearest"`` it first
  tries the block whose procedure set is nearest (Jaccard) to its own, then age alone. Candidates are the pool size
  nearest in age inside the block; the model ranks them by cosine similarity to its
  prediction.

The retrieval index (``RetrievalIndex``) is built once per view (so once per run, on the
driver) from the training split only, and put in the Ray object store: every read task of
every worker gets the same arrays, zero-copy. Scaling: the index is blocking by procedure set
plus an in-block binary search on age, sorted once; memory is 8 + 8 + 8 + 8 + 4 + ceil(n/8)
bytes per training admission (sort key, age, age order, subject, LOS, packed regimen): 67 B
with 243 classes, 6.2 GiB at 100M admissions; a query is two binary searches and a gather
(``bench/bench_retrieval.py``: at 1M admissions, built in 0.74 s, ~820K queries/s, 1,750x
brute force).

Admissions of patients under ``min_age`` (seed 004: adults) are dropped and counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mirror.config import require
from mirror.data import schema
from mirror.data.views.base import DataView
from mirror.data.vocab import WEEKS_PER_YEAR
from mirror.data.vocabularies import LABS

if TYPE_CHECKING:
    import ray
    import ray.data
    import torch

LAB_FLAG_SHARE = 0.25  # out of range: |value - typical| > 25 % of typical (as windows' scale)
_LAB_TYPICAL = np.array([lab.typical for lab in LABS])
N_DEMOGRAPHICS = 3
READ_COLUMNS = [
    schema.SUBJECT_ID, schema.SEX, schema.BIRTH_WEEK, schema.CONDITIONS, schema.CONDITION_STAYS,
    schema.PROCEDURES, schema.PROCEDURE_STAYS, schema.MEDICATIONS, schema.MEDICATION_STAYS,
    schema.LABS, schema.LAB_VALUES, schema.LAB_STAYS, schema.ADMIT_DAYS, schema.LENGTH_OF_STAY,
]  # fmt: skip
_AGE_SPAN = 1000.0  # sort key = block * _AGE_SPAN + age (ages < 1000 years)


def _flat(table: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column's values and each value's row."""
    arr = table.column(column).combine_chunks()
    offsets = arr.offsets.to_numpy()
    return arr.flatten().to_numpy(zero_copy_only=False), np.repeat(np.arange(len(arr)), np.diff(offsets))


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a well-spread 64-bit value per code, summed into a set hash."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@dataclass
class Admissions:
    """Every admission of a block of patients (flat, patient-major) and its per-stay sets."""

    owner: np.ndarray  # (A,) patient row
    index: np.ndarray  # (A,) admission index within the patient
    n_of_patient: np.ndarray  # (A,) admissions of that patient
    subject: np.ndarray  # (A,) int64
    age: np.ndarray  # (A,) years at admission
    female: np.ndarray  # (A,) 0/1
    los: np.ndarray  # (A,) days
    sets: dict[str, tuple[np.ndarray, np.ndarray]]  # feature -> (admission, code) unique pairs
    procedure_key: np.ndarray  # (A,) uint64 hash of the procedure set (0: no procedure)


def block_admissions(table: pa.Table, n_labs: int) -> Admissions:
    """Admissions of ``table``'s patients (rows with ``READ_COLUMNS``), vectorised."""
    admit, owner = _flat(table, schema.ADMIT_DAYS)
    counts = np.bincount(owner, minlength=table.num_rows)
    first = np.concatenate([[0], np.cumsum(counts)])[:-1]
    index = np.arange(len(owner)) - first[owner]
    birth = table.column(schema.BIRTH_WEEK).to_numpy().astype(np.float64)
    subject = table.column(schema.SUBJECT_ID).to_numpy()
    female = (table.column(schema.SEX).to_numpy() == 1).astype(np.float32)

    def stay_pairs(code_col: str, stay_col: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        codes, row = _flat(table, code_col)
        stays = _flat(table, stay_col)[0].astype(np.int64)
        inside = stays >= 0
        bad = inside & (stays >= counts[row])
        if bad.any():
            r = int(row[np.argmax(bad)])
            raise ValueError(f"{stay_col}: subject {int(subject[r])} links an event to admission "
                             f"{int(stays[np.argmax(bad)])} but has {int(counts[r])} admissions")
        return first[row[inside]] + stays[inside], codes[inside].astype(np.int64), np.flatnonzero(inside)

    sets = {}
    for name, code_col, stay_col in (("diagnoses", schema.CONDITIONS, schema.CONDITION_STAYS),
                                     ("procedures", schema.PROCEDURES, schema.PROCEDURE_STAYS),
                                     ("medications", schema.MEDICATIONS, schema.MEDICATION_STAYS)):
        adm, code, _ = stay_pairs(code_col, stay_col)
        sets[name] = _unique_pairs(adm, code)
    adm, lab, where = stay_pairs(schema.LABS, schema.LAB_STAYS)
    values = _flat(table, schema.LAB_VALUES)[0][where]
    typical = _LAB_TYPICAL[np.minimum(lab, len(_LAB_TYPICAL) - 1)]
    flag = np.abs(values - typical) > LAB_FLAG_SHARE * typical
    sets["labs"] = _unique_pairs(adm, lab * 2 + flag)
    proc_adm, proc = sets["procedures"]
    key = np.zeros(len(owner), np.uint64)
    np.add.at(key, proc_adm, _mix64(proc))  # wraps modulo 2^64: a set hash
    age = (admit / schema.DAYS_PER_WEEK - birth[owner]) / WEEKS_PER_YEAR
    los = _flat(table, schema.LENGTH_OF_STAY)[0].astype(np.float32)
    return Admissions(owner, index, counts[owner], subject[owner].astype(np.int64), age, female[owner], los, sets, key)


def _unique_pairs(adm: np.ndarray, code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(adm) == 0:
        return adm.astype(np.int64), code.astype(np.int64)
    width = int(code.max()) + 1
    pair = np.unique(adm.astype(np.int64) * width + code)
    return pair // width, pair % width


# --------------------------------------------------------------------------------------------
# Retrieval index: the training split's admissions, blocked by procedure set, sorted by age


@dataclass
class RetrievalIndex:
    """Training admissions sorted by (procedure-set block, age). Plain numpy, zero-copy from
    the object store."""

    block_keys: np.ndarray  # (K,) uint64 sorted distinct procedure-set hashes
    sort_key: np.ndarray  # (N,) float64 block * _AGE_SPAN + age, sorted
    age: np.ndarray  # (N,) float64 age, for the age-only fallback (sorted copy: age_order)
    age_order: np.ndarray  # (N,) int64 positions sorted by age alone
    subject: np.ndarray  # (N,) int64
    los: np.ndarray  # (N,) float32
    regimen: np.ndarray  # (N, ceil(n_labels / 8)) uint8 packed multi-hot
    n_labels: int
    block_sets: np.ndarray | None = None  # (K, ceil(n_procedures / 8)) packed procedure set per block

    @property
    def size(self) -> int:
        return len(self.subject)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self) if isinstance(getattr(self, f.name), np.ndarray))

    @classmethod
    def build(cls, key: np.ndarray, age: np.ndarray, subject: np.ndarray, los: np.ndarray,
              regimen: np.ndarray, n_labels: int, set_keys: np.ndarray | None = None,
              sets: np.ndarray | None = None) -> RetrievalIndex:
        """``set_keys``/``sets``: the packed procedure set of each procedure-set hash (any
        order, duplicates allowed), for nearest-set matching; without them it is off."""
        block_keys, block = np.unique(key, return_inverse=True)
        sort_key = block.astype(np.float64) * _AGE_SPAN + np.clip(age, 0, _AGE_SPAN - 1)
        order = np.argsort(sort_key, kind="stable")
        age_sorted = age[order]
        block_sets = None
        if set_keys is not None and sets is not None:
            at = np.searchsorted(block_keys, set_keys)
            ok = (at < len(block_keys)) & (block_keys[np.minimum(at, max(len(block_keys) - 1, 0))] == set_keys)
            block_sets = np.zeros((len(block_keys), sets.shape[1]), np.uint8)
            block_sets[at[ok]] = sets[ok]
        return cls(block_keys, sort_key[order], age_sorted, np.argsort(age_sorted, kind="stable"),
                   subject[order], los[order].astype(np.float32), regimen[order], n_labels, block_sets)

    def nearest_blocks(self, query_sets: np.ndarray, exclude: np.ndarray, chunk: int = 256) -> np.ndarray:
        """Per query, the block whose procedure set has the highest Jaccard similarity to the
        query's packed set (ties: the smaller set), never block ``exclude`` (-1: none)."""
        blocks = np.unpackbits(self.block_sets, axis=1).astype(np.float32)
        sizes = blocks.sum(1)
        out = np.zeros(len(query_sets), np.int64)
        for lo in range(0, len(query_sets), chunk):  # (chunk x K) scores at a time
            q = np.unpackbits(query_sets[lo:lo + chunk], axis=1, count=blocks.shape[1]).astype(np.float32)
            inter = q @ blocks.T
            union = q.sum(1, keepdims=True) + sizes[None, :] - inter
            score = inter / np.maximum(union, 1) - 1e-6 * sizes[None, :]
            rows = np.arange(len(q))
            ex = exclude[lo:lo + chunk]
            score[rows[ex >= 0], ex[ex >= 0]] = -np.inf
            out[lo:lo + chunk] = score.argmax(1)
        return out

    def _in_blocks(self, b: np.ndarray, found: np.ndarray, age: np.ndarray, subject: np.ndarray,
                   pool_size: int, age_window: float) -> tuple[np.ndarray, np.ndarray]:
        """The ``pool_size`` admissions nearest in age within ± ``age_window`` in block ``b``
        (none where not ``found``), never the query's own patient."""
        offs = np.arange(pool_size)
        centre = b.astype(np.float64) * _AGE_SPAN + np.clip(age, 0, _AGE_SPAN - 1)
        lo = np.searchsorted(self.sort_key, centre - age_window, side="left")
        hi = np.searchsorted(self.sort_key, centre + age_window, side="right")
        mid = np.searchsorted(self.sort_key, centre)
        hi = np.where(found, hi, lo)
        start = np.clip(mid - pool_size // 2, lo, np.maximum(lo, hi - pool_size))
        pos = np.minimum(start[:, None] + offs, self.size - 1)
        valid = (start[:, None] + offs < hi[:, None]) & (self.subject[pos] != subject[:, None])
        return pos, valid

    def query(self, key: np.ndarray, age: np.ndarray, subject: np.ndarray, pool_size: int,
              age_window: float, fallback: bool,
              query_sets: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Candidates per query: positions (Q, P) into the index, valid (Q, P), and whether a
        fallback was used (Q,). Same-patient candidates are never valid. A query whose own
        block has no candidate tries, with ``query_sets`` (its packed procedure set), the block
        of the nearest procedure set (Jaccard), then with ``fallback`` the age window alone."""
        q = len(key)
        offs = np.arange(pool_size)
        pos = np.zeros((q, pool_size), np.int64)
        valid = np.zeros((q, pool_size), bool)
        fell_back = np.zeros(q, bool)
        if self.size == 0 or q == 0:
            return pos, valid, fell_back
        b = np.searchsorted(self.block_keys, key)
        found = (b < len(self.block_keys)) & (self.block_keys[np.minimum(b, len(self.block_keys) - 1)] == key)
        pos, valid = self._in_blocks(b, found, age, subject, pool_size, age_window)
        if query_sets is not None:
            if self.block_sets is None:
                raise ValueError("RetrievalIndex.query: nearest-set matching needs an index built with procedure sets")
            empty = ~valid.any(1)
            if empty.any():
                near = self.nearest_blocks(query_sets[empty], np.where(found[empty], b[empty], -1))
                p2, v2 = self._in_blocks(near, np.ones(len(near), bool), age[empty], subject[empty], pool_size, age_window)
                pos[empty], valid[empty], fell_back[empty] = p2, v2, v2.any(1)
        if fallback:
            empty = ~valid.any(1)
            if empty.any():
                ages = self.age[self.age_order]
                a = np.clip(age[empty], 0, _AGE_SPAN - 1)
                lo2 = np.searchsorted(ages, a - age_window, side="left")
                hi2 = np.searchsorted(ages, a + age_window, side="right")
                mid2 = np.searchsorted(ages, a)
                start2 = np.clip(mid2 - pool_size // 2, lo2, np.maximum(lo2, hi2 - pool_size))
                p2 = self.age_order[np.minimum(start2[:, None] + offs, self.size - 1)]
                v2 = (start2[:, None] + offs < hi2[:, None]) & (self.subject[p2] != subject[empty, None])
                pos[empty], valid[empty], fell_back[empty] = p2, v2, v2.any(1)
        return pos, valid, fell_back


def pack_regimen(adm: np.ndarray, code: np.ndarray, n_admissions: int, n_labels: int) -> np.ndarray:
    dense = np.zeros((n_admissions, n_labels), bool)
    dense[adm, code] = True
    return np.packbits(dense, axis=1)


def build_index(root: str | Path, n_labels: int, n_labs: int, min_age: float,
                n_procedures: int = 0) -> tuple[RetrievalIndex, dict[str, int]]:
    """The retrieval index from the TRAINING split only, streamed file by file, batch by batch;
    with ``n_procedures``, one packed procedure set per block too (nearest-set matching)."""
    keys, ages, subjects, loss, regimens = [], [], [], [], []
    set_keys, sets = [], []
    counts = {"admissions": 0, "under_min_age": 0}
    for file in schema.split_files(root, schema.TRAIN):
        for batch in pq.ParquetFile(file).iter_batches(columns=READ_COLUMNS, batch_size=8192):
            adm = block_admissions(pa.Table.from_batches([batch]), n_labs)
            adult = adm.age >= min_age
            counts["admissions"] += int(adult.sum())
            counts["under_min_age"] += int((~adult).sum())
            med_adm, med = adm.sets["medications"]
            packed = pack_regimen(med_adm, med, len(adm.owner), n_labels)
            keys.append(adm.procedure_key[adult])
            ages.append(adm.age[adult])
            subjects.append(adm.subject[adult])
            loss.append(adm.los[adult])
            regimens.append(packed[adult])
            if n_procedures:  # one set per distinct hash of the batch
                distinct, first = np.unique(adm.procedure_key[adult], return_index=True)
                proc_adm, proc = adm.sets["procedures"]
                set_keys.append(distinct)
                sets.append(pack_regimen(proc_adm, proc, len(adm.owner), n_procedures)[np.flatnonzero(adult)[first]])
    nbytes = (n_labels + 7) // 8
    cat = (lambda parts, dtype, *shape: np.concatenate(parts) if parts else np.zeros((0, *shape), dtype))  # noqa: E731
    index = RetrievalIndex.build(cat(keys, np.uint64), cat(ages, np.float64), cat(subjects, np.int64),
                                 cat(loss, np.float32), cat(regimens, np.uint8, nbytes), n_labels,
                                 cat(set_keys, np.uint64) if n_procedures else None,
                                 cat(sets, np.uint8, (n_procedures + 7) // 8) if n_procedures else None)
    counts["blocks"] = len(index.block_keys)
    return index, counts


# --------------------------------------------------------------------------------------------
# Admissions -> examples


def admission_examples(table: pa.Table, *, vocab: dict[str, int], max_visits: int, min_age: float,
                       index: RetrievalIndex | None, pool_size: int, age_window: float,
                       fallback: bool, nearest: bool = False) -> dict[str, Any]:
    """One example per admission of an adult: history tokens (position x vocab + code, per
    feature), demographics, target, LOS and retrieval candidates."""
    adm = block_admissions(table, vocab["lab"])
    keep = np.flatnonzero(adm.age >= min_age)
    n = len(adm.owner)
    new_id = np.full(n, -1, np.int64)
    new_id[keep] = np.arange(len(keep))
    out: dict[str, Any] = {
        "subject_id": adm.subject[keep], "stay": adm.index[keep].astype(np.int64),
        "n_visits": np.minimum(adm.index[keep] + 1, max_visits).astype(np.int64),
        "history_truncated": adm.index[keep] + 1 > max_visits,
        "demographics": np.stack([adm.female[keep], adm.age[keep] / 100.0,
                                  np.log1p(adm.index[keep])], axis=1).astype(np.float32),
        "los": adm.los[keep],
    }
    sizes = {"diagnoses": vocab["condition"], "procedures": vocab["procedure"], "labs": 2 * vocab["lab"]}
    for name, width in sizes.items():
        a, code = adm.sets[name]
        ex_parts, tok_parts = [], []
        for back in range(max_visits):  # a handful of history positions, vectorised over pairs
            later = a + back  # the admission `back` visits later of the same patient
            ok = adm.index[a] + back < adm.n_of_patient[a]
            target_ex = new_id[later[ok]]
            has = target_ex >= 0
            ex_parts.append(target_ex[has])
            tok_parts.append(back * width + code[ok][has])
        out[name] = _ragged(np.concatenate(ex_parts), np.concatenate(tok_parts), len(keep))
    med_adm, med = adm.sets["medications"]
    sel = new_id[med_adm] >= 0
    out["target"] = _ragged(new_id[med_adm[sel]], med[sel], len(keep))
    n_labels = vocab["medication"]
    nbytes = (n_labels + 7) // 8
    if index is not None:
        query_sets = None
        if nearest:
            proc_adm, proc = adm.sets["procedures"]
            query_sets = pack_regimen(proc_adm, proc, n, vocab["procedure"])[keep]
        pos, valid, fell_back = index.query(adm.procedure_key[keep], adm.age[keep], adm.subject[keep],
                                            pool_size, age_window, fallback, query_sets)
        out["candidate_regimens"] = index.regimen[pos].reshape(len(keep), pool_size * nbytes)
        out["candidate_los"] = index.los[pos]
        out["candidate_valid"] = valid
        out["fell_back"] = fell_back
    else:
        out["candidate_regimens"] = np.zeros((len(keep), pool_size * nbytes), np.uint8)
        out["candidate_los"] = np.zeros((len(keep), pool_size), np.float32)
        out["candidate_valid"] = np.zeros((len(keep), pool_size), bool)
        out["fell_back"] = np.zeros(len(keep), bool)
    return out


def _ragged(example: np.ndarray, token: np.ndarray, n: int) -> pa.Array:
    order = np.argsort(example, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(example, minlength=n))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(token[order].astype(np.int32)))


def _to_arrow(examples: dict[str, Any]) -> pa.Table:
    columns = {}
    for name, arr in examples.items():
        if isinstance(arr, pa.Array):
            columns[name] = arr
        elif arr.ndim == 1:
            columns[name] = pa.array(arr)
        else:
            columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), int(arr.shape[1]))
    return pa.table(columns)


# --------------------------------------------------------------------------------------------
# The view


@dataclass(frozen=True)
class AdmissionsViewConfig:
    """The ``view.*`` keys of admission models."""

    max_visits: int = 8  # history: the current admission and up to 7 earlier ones (cut: counted)
    min_age: float = 18.0  # seed 004: adults
    pool_size: int = 64  # retrieval candidates per admission handed to the model (>= its K)
    age_window: float = 5.0  # ± years (upstream 5)
    fallback: str = "age"  # age: an empty procedure block falls back to age alone; nearest:
    # first to the block of the nearest procedure set (Jaccard), then to age alone; none

    def __post_init__(self) -> None:
        require(self, "max_visits", 1 <= self.max_visits <= 64, "an int in [1, 64]")
        require(self, "min_age", 0 <= self.min_age < 130, "years in [0, 130)")
        require(self, "pool_size", 1 <= self.pool_size <= 1024, "an int in [1, 1024]")
        require(self, "age_window", self.age_window >= 0, "years >= 0")
        require(self, "fallback", self.fallback in ("age", "nearest", "none"), "age, nearest or none")


@dataclass(frozen=True)
class AdmissionsInfo:
    """What an admission model is built from."""

    n_conditions: int = 605
    n_procedures: int = 206
    n_lab_flags: int = 32
    n_labels: int = 243  # ATC-3 classes
    n_demographics: int = N_DEMOGRAPHICS
    max_visits: int = 8
    pool_size: int = 64


@dataclass(frozen=True)
class AdmissionsReport:
    """Admissions of one split: kept (adults), dropped (under ``min_age``), and counts of what
    was cut or is missing."""

    split: str
    patients: int
    kept: int  # examples (admissions)
    admissions: int
    dropped_under_min_age: int
    history_truncated: int  # kept admissions whose earlier visits beyond max_visits were cut
    empty_regimen: int  # kept admissions with no medication class (target all zero)

    def dropped_by_reason(self) -> dict[str, int]:
        return {"admissions_under_min_age": self.dropped_under_min_age}

    def as_dict(self) -> dict[str, int | str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def count_admissions(root: str | Path, split: str, config: AdmissionsViewConfig) -> AdmissionsReport:
    """Exact counts from the admission, birth and medication-stay columns (one cheap pass)."""
    patients = admissions = kept = truncated = empty = 0
    cols = [schema.BIRTH_WEEK, schema.ADMIT_DAYS, schema.MEDICATION_STAYS]
    for file in schema.split_files(root, split):
        for batch in pq.ParquetFile(file).iter_batches(columns=cols, batch_size=65536):
            t = pa.Table.from_batches([batch])
            admit, owner = _flat(t, schema.ADMIT_DAYS)
            counts = np.bincount(owner, minlength=t.num_rows)
            index = np.arange(len(owner)) - np.concatenate([[0], np.cumsum(counts)])[:-1][owner]
            age = (admit / schema.DAYS_PER_WEEK - t.column(0).to_numpy()[owner]) / WEEKS_PER_YEAR
            adult = age >= config.min_age
            stays, srow = _flat(t, schema.MEDICATION_STAYS)
            given = np.zeros(len(owner), bool)
            inside = stays >= 0
            given[(np.concatenate([[0], np.cumsum(counts)])[:-1][srow] + stays)[inside]] = True
            patients += t.num_rows
            admissions += len(owner)
            kept += int(adult.sum())
            truncated += int((adult & (index + 1 > config.max_visits)).sum())
            empty += int((adult & ~given).sum())
    return AdmissionsReport(split, patients, kept, admissions, admissions - kept, truncated, empty)


class _ExamplesFn:
    """Ray Data UDF: patient rows -> admission examples, with candidates from the shared index."""

    def __init__(self, vocab: dict[str, int], config: AdmissionsViewConfig, index_ref: ray.ObjectRef | None) -> None:
        self.vocab, self.config, self.index_ref = vocab, config, index_ref
        self._index: RetrievalIndex | None = None

    def __call__(self, table: pa.Table) -> pa.Table:
        if self._index is None and self.index_ref is not None:
            import ray

            self._index = ray.get(self.index_ref)
        c = self.config
        return _to_arrow(admission_examples(table, vocab=self.vocab, max_visits=c.max_visits, min_age=c.min_age,
                                            index=self._index, pool_size=c.pool_size, age_window=c.age_window,
                                            fallback=c.fallback in ("age", "nearest"),
                                            nearest=c.fallback == "nearest"))


class _AdmissionsCollate:
    """Example rows -> a dict of tensors of :class:`AdmissionBatch` (dense per-visit multi-hots)."""

    def __init__(self, info: AdmissionsInfo) -> None:
        self.info = info

    def __call__(self, table: pa.Table) -> dict[str, torch.Tensor]:
        import torch

        info, b = self.info, table.num_rows
        v = info.max_visits
        out: dict[str, torch.Tensor] = {}

        def multi_hot(name: str, width: int, shape: tuple[int, ...]) -> np.ndarray:
            tokens, row = _flat(table, name)
            dense = np.zeros((b, int(np.prod(shape)) if shape else width), np.float32)
            dense[row, tokens] = 1.0
            return dense.reshape((b, *shape) if shape else (b, width))

        out["diagnoses"] = torch.from_numpy(multi_hot("diagnoses", 0, (v, info.n_conditions)))
        out["procedures"] = torch.from_numpy(multi_hot("procedures", 0, (v, info.n_procedures)))
        out["labs"] = torch.from_numpy(multi_hot("labs", 0, (v, info.n_lab_flags)))
        out["target"] = torch.from_numpy(multi_hot("target", info.n_labels, ()))
        n_visits = table.column("n_visits").to_numpy()
        out["visit_mask"] = torch.from_numpy(np.arange(v)[None, :] < n_visits[:, None])
        for name in ("subject_id", "stay", "los", "fell_back"):
            out[name] = torch.from_numpy(np.array(table.column(name).to_numpy(zero_copy_only=False), copy=True))
        fixed = {"demographics": (info.n_demographics,), "candidate_los": (info.pool_size,),
                 "candidate_valid": (info.pool_size,)}
        for name, shape in fixed.items():
            col = table.column(name).combine_chunks()
            out[name] = torch.from_numpy(np.array(col.flatten().to_numpy(zero_copy_only=False), copy=True).reshape(b, *shape))
        packed = table.column("candidate_regimens").combine_chunks().flatten().to_numpy().reshape(b, info.pool_size, -1)
        regimens = np.unpackbits(packed, axis=2, count=info.n_labels).astype(np.float32)
        out["candidate_regimens"] = torch.from_numpy(regimens)
        return out


@dataclass
class AdmissionBatch:
    """Examples of the admissions view (B admissions, V history positions, P candidates)."""

    subject_id: torch.Tensor  # (B,) int64
    stay: torch.Tensor  # (B,) admission index within the patient
    diagnoses: torch.Tensor  # (B, V, n_conditions) multi-hot; position 0 = this admission
    procedures: torch.Tensor  # (B, V, n_procedures)
    labs: torch.Tensor  # (B, V, 2 x n_labs) lab x {in range, out of range}
    visit_mask: torch.Tensor  # (B, V) bool: the position holds an admission
    demographics: torch.Tensor  # (B, 3) female, age / 100, log1p(admission index)
    target: torch.Tensor  # (B, n_labels) ATC-3 multi-hot given during the stay
    los: torch.Tensor  # (B,) days
    candidate_regimens: torch.Tensor  # (B, P, n_labels) training admissions' regimens
    candidate_los: torch.Tensor  # (B, P) their lengths of stay
    candidate_valid: torch.Tensor  # (B, P) bool
    fell_back: torch.Tensor  # (B,) bool: candidates from the age-only fallback

    def __post_init__(self) -> None:
        b = self.subject_id.shape[0]
        for f in fields(self):
            if getattr(self, f.name).shape[0] != b:
                raise ValueError(f"AdmissionBatch.{f.name}: {b} examples expected, got shape {tuple(getattr(self, f.name).shape)}")

    @property
    def size(self) -> int:
        return int(self.subject_id.shape[0])

    def to(self, device: Any, non_blocking: bool = True) -> AdmissionBatch:
        return AdmissionBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})


class AdmissionsView(DataView):
    name = "admissions"
    config_cls = AdmissionsViewConfig
    info_cls = AdmissionsInfo
    unit = "admissions"

    config: AdmissionsViewConfig

    def __init__(self, config: AdmissionsViewConfig, root: str) -> None:
        super().__init__(config, root)
        self.metadata = schema.DatasetMetadata.read(root)
        missing = sorted({"admissions", "medications"} - set(self.metadata.modalities))
        if missing:
            raise ValueError(f"{Path(root) / schema.DATASET_JSON}: the admissions view needs modalities "
                             f"{missing}, the dataset has {self.metadata.modalities}")
        self.vocab = {k: int(self.metadata.vocab[k]) for k in ("condition", "procedure", "lab", "medication")}
        self._index_ref: Any = None
        self.index_counts: dict[str, int] = {}

    def info(self) -> AdmissionsInfo:
        v, c = self.vocab, self.config
        return AdmissionsInfo(v["condition"], v["procedure"], 2 * v["lab"], v["medication"], N_DEMOGRAPHICS,
                              c.max_visits, c.pool_size)

    def index_ref(self) -> Any:
        """The training split's retrieval index in the object store, built on first use."""
        if self._index_ref is None:
            import ray

            n_procedures = self.vocab["procedure"] if self.config.fallback == "nearest" else 0
            index, self.index_counts = build_index(self.root, self.vocab["medication"], self.vocab["lab"],
                                                   self.config.min_age, n_procedures)
            self.index_counts["bytes"] = index.nbytes
            self._index_ref = ray.put(index)
        return self._index_ref

    def read(self, split: str, *, purpose: str = "train") -> tuple[ray.data.Dataset, AdmissionsReport]:
        from mirror.data.stream import read_split

        ref = self.index_ref()
        dataset, _ = read_split(self.root, split, columns=READ_COLUMNS, min_words=0, max_words=schema.MAX_EVENTS)
        dataset = dataset.map_batches(_ExamplesFn(self.vocab, self.config, ref), batch_format="pyarrow",
                                      batch_size=None, num_cpus=0.25)
        return dataset, count_admissions(self.root, split, self.config)

    def batches(self, source: Any, batch_size: int, *, training: bool, epoch: int = 0, seed: int = 0,
                device: Any = "auto") -> Iterator[AdmissionBatch]:
        from ray.data.collate_fn import ArrowBatchCollateFn

        from mirror.data.stream import iter_batches

        class Collate(_AdmissionsCollate, ArrowBatchCollateFn):
            pass

        return iter_batches(source, batch_size, collate_fn=Collate(self.info()),
                            make_batch=lambda t: AdmissionBatch(**t), device=device)
