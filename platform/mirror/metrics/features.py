"""Per-patient features built from a :class:`PatientBlock`: sparse multi-hot, hashes, visits.

Everything here is a pure, vectorised function of one block, so a dataset of any size is
featurised shard by shard and only sparse results are kept (a 1M-patient reference is a CSR
of ~25M int32 column ids, never a dense N x 605 array).

Feature spaces
--------------
* condition multi-hot: 605 columns, condition ever recorded;
* token multi-hot: the 14,520 diagnosis-age tokens (condition x age group) of seed 000, ids
  ``condition * 24 + age_group`` (the model's token id minus the 3 specials);
* neighbour keys (privacy distances): the patient's distinct tokens **and** distinct words
  ``(token, week)``. Hamming distance on this binary representation equals squared Euclidean
  distance, counts shared diagnoses-at-age, and adds the time of each word, so an exact copy
  of a record is at distance 0 while two patients who merely share a common diagnosis are not.
  Keys are int64 (``TOKEN_KEYS + token * MAX_WEEK + week`` for words); the neighbour index
  compresses them to the columns the reference actually uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from mirror.data.vocab import N_AGE_GROUPS, N_CONDITIONS
from mirror.metrics import arrays
from mirror.metrics.records import MAX_WEEK, PatientBlock

N_TOKENS = N_CONDITIONS * N_AGE_GROUPS  # 14,520
TOKEN_KEYS = N_TOKENS  # word keys start after the token keys
_KEY_SPACE = TOKEN_KEYS + N_TOKENS * MAX_WEEK  # exclusive upper bound of a neighbour key

# Numeric columns appended to the sparse multi-hot in patient_features().
NUMERIC_FEATURES = (
    "log1p_words",
    "log1p_visits",
    "log1p_span_weeks",
    "sex",
    "first_age_group",
    "last_age_group",
    "first_week",
    "last_week",
)
N_PATIENT_FEATURES = N_CONDITIONS + N_TOKENS + len(NUMERIC_FEATURES)


def tokens(block: PatientBlock) -> np.ndarray:
    """Diagnosis-age token per word, in [0, N_TOKENS) (int64)."""
    return block.conditions.astype(np.int64) * N_AGE_GROUPS + block.age_groups.astype(np.int64)


def binary_csr(
    rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int], dtype=np.int8
) -> sp.csr_matrix:
    """Multi-hot CSR with sorted column ids and 1s (duplicates collapsed)."""
    m = sp.csr_matrix((np.ones(len(rows), dtype=np.int32), (rows, cols)), shape=shape)
    m.sum_duplicates()
    m.data = np.ones(len(m.data), dtype=dtype)
    return m


def condition_matrix(block: PatientBlock) -> sp.csr_matrix:
    """(n, 605) int8 multi-hot: condition ever recorded."""
    return binary_csr(
        block.row_of_word(), block.conditions.astype(np.int64), (len(block), N_CONDITIONS)
    )


def token_matrix(block: PatientBlock) -> sp.csr_matrix:
    """(n, 14,520) int8 multi-hot of diagnosis-age tokens."""
    return binary_csr(block.row_of_word(), tokens(block), (len(block), N_TOKENS))


def row_unique(
    rows: np.ndarray, keys: np.ndarray, n_rows: int, key_space: int
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct keys per row, sorted: (indptr int64 (n_rows + 1,), keys int64)."""
    combined = arrays.unique(rows.astype(np.int64) * key_space + keys.astype(np.int64))
    out_rows = combined // key_space
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(out_rows, minlength=n_rows), out=indptr[1:])
    return indptr, combined - out_rows * key_space


def neighbour_keys(block: PatientBlock) -> tuple[np.ndarray, np.ndarray]:
    """Distinct tokens and distinct (token, week) words per patient: (indptr, int64 keys)."""
    tok = tokens(block)
    words = TOKEN_KEYS + tok * MAX_WEEK + block.weeks.astype(np.int64)
    rows = block.row_of_word()
    return row_unique(
        np.concatenate([rows, rows]), np.concatenate([tok, words]), len(block), _KEY_SPACE
    )


# ---------------------------------------------------------------------------------------------
# Hashes: exact-match and presence-disclosure canonical forms

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised (uint64 arithmetic wraps mod 2^64 by design)."""
    x = np.asarray(x, dtype=np.uint64) + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _segment_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Sum of uint64 ``values`` per segment (mod 2^64); empty segments give 0."""
    cs = np.zeros(len(values) + 1, dtype=np.uint64)
    np.cumsum(values, out=cs[1:])
    return cs[offsets[1:]] - cs[offsets[:-1]]


def record_hashes(block: PatientBlock) -> np.ndarray:
    """64-bit hash of each record's canonical form: sex plus the multiset of words
    (condition, age group, week). Order-free (a sum of word hashes), so words recorded in a
    different order within a week still match; collisions ~ n^2 / 2^64."""
    packed = (
        (block.weeks.astype(np.uint64) << np.uint64(15))
        | (block.conditions.astype(np.uint64) << np.uint64(5))
        | block.age_groups.astype(np.uint64)
    )
    sums = _segment_sums(mix64(packed), block.offsets)
    header = mix64(
        block.lengths.astype(np.uint64) * np.uint64(4)
        + (block.sex.astype(np.int64) + 2).astype(np.uint64)
    )
    return mix64(sums ^ header)


@dataclass(frozen=True)
class Visits:
    """Visits are a patient's words grouped by week (weeks are sorted within a patient)."""

    of_word: np.ndarray  # (W,) visit index of each word
    row: np.ndarray  # (n_visits,) patient row of each visit
    week: np.ndarray  # (n_visits,) week of each visit
    offsets: np.ndarray  # (n_visits + 1,) word offsets of each visit


def visits(block: PatientBlock) -> Visits:
    rows = block.row_of_word()
    starts = np.ones(block.n_words, dtype=bool)
    if block.n_words > 1:
        starts[1:] = (rows[1:] != rows[:-1]) | (block.weeks[1:] != block.weeks[:-1])
    first = np.flatnonzero(starts)
    of_word = np.cumsum(starts) - 1
    offsets = np.append(first, block.n_words).astype(np.int64)
    return Visits(
        of_word=of_word, row=rows[first], week=block.weeks[first].astype(np.int64), offsets=offsets
    )


def visits_per_patient(block: PatientBlock, v: Visits) -> np.ndarray:
    """(n,) number of visits of each patient."""
    return np.bincount(v.row, minlength=len(block))


def visit_hashes(block: PatientBlock, v: Visits | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(hash per visit, patient row per visit). A visit's canonical form is its week and the
    *set* of diagnosis-age tokens recorded that week (TWIN's visit, order ignored)."""
    v = visits(block) if v is None else v
    n_visits = len(v.row)
    vis_idx, tok = row_unique(v.of_word, tokens(block), n_visits, N_TOKENS)
    sums = _segment_sums(mix64(tok.astype(np.uint64)), vis_idx)
    return mix64(sums ^ mix64(v.week.astype(np.uint64) + np.uint64(1 << 40))), v.row


def visit_set_hashes(block: PatientBlock) -> np.ndarray:
    """(n,) hash of each patient's set of visits (order-free): two records with the same
    visits, whatever the order or repetition of words inside a visit, hash alike."""
    hashes, rows = visit_hashes(block)
    offsets = np.zeros(len(block) + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=len(block)), out=offsets[1:])  # visits are row-ordered
    return mix64(_segment_sums(hashes, offsets) + np.uint64(0x5EED))


# ---------------------------------------------------------------------------------------------
# Patient feature matrix (detection, log-cluster, utility models)


def patient_features(block: PatientBlock, n_weeks: int) -> sp.csr_matrix:
    """(n, N_PATIENT_FEATURES) float64 CSR: condition multi-hot, token multi-hot, and the
    NUMERIC_FEATURES (scaled to O(1)). The same function featurises real and synthetic records,
    so a classifier cannot separate them by encoding artefacts."""
    n = len(block)
    lengths = block.lengths
    has = lengths > 0
    first_idx = np.minimum(block.offsets[:-1], max(block.n_words - 1, 0))
    last_idx = np.maximum(block.offsets[1:] - 1, 0)
    v = visits(block)
    if block.n_words:
        weeks = block.weeks.astype(np.float64)
        ages = block.age_groups.astype(np.float64)
        first_w, last_w = weeks[first_idx], weeks[last_idx]
        first_a, last_a = ages[first_idx], ages[last_idx]
    else:
        first_w = last_w = first_a = last_a = np.zeros(n)
    numeric = np.column_stack(
        [
            np.log1p(lengths),
            np.log1p(visits_per_patient(block, v)),
            np.log1p(np.where(has, last_w - first_w, 0.0)),
            block.sex.astype(np.float64),
            np.where(has, first_a / N_AGE_GROUPS, 0.0),
            np.where(has, last_a / N_AGE_GROUPS, 0.0),
            np.where(has, first_w / n_weeks, 0.0),
            np.where(has, last_w / n_weeks, 0.0),
        ]
    )
    return sp.hstack(  # float64: what liblinear and TruncatedSVD compute in (no copy per fit)
        [
            condition_matrix(block).astype(np.float64),
            token_matrix(block).astype(np.float64),
            sp.csr_matrix(numeric),
        ],
        format="csr",
    )


def used_columns(x: sp.csr_matrix) -> np.ndarray:
    """Columns with at least one non-zero. liblinear is ~30x slower with the ~6,000 all-zero
    token columns of a typical sample than without them (measured), so models fit on these."""
    return np.flatnonzero(np.diff(x.tocsc().indptr))
