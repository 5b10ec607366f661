"""Valid whole-record batches (schema version 2) fabricated with numpy, for validation tests
and the ``check_table`` timing in ``bench/bench_validate.py``.

Every modality is filled: diagnoses, procedures, medications and labs inside enrollment and
sorted in time, up to three non-overlapping admissions per patient, and ``*_stays`` links for
the events that fall inside an admission's weeks. Vectorised over patients and events, so a
65,536-patient batch takes about a second to build.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from mirror.data import schema as S
from mirror.data.vocab import N_CONDITIONS, age_group_at
from mirror.data.vocabularies import LABS, SIMULATED_LABS, vocabulary_sizes

MAX_ADMISSIONS = 3


def _offsets(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)


def _lists(counts: np.ndarray, values: np.ndarray, dtype) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(_offsets(counts)), pa.array(values.astype(dtype)))


def _timed_events(rng, start, end, counts, stay_lo, stay_hi, n_adm):
    """Sorted weeks inside [start, end] per patient, a third of a patient's events moved into
    one of its admissions, and the index of the admission (or NO_STAY) each week falls in."""
    row = np.repeat(np.arange(len(counts)), counts)
    weeks = start[row] + (rng.random(row.size) * (end[row] - start[row] + 1)).astype(np.int64)
    has_stay = n_adm[row] > 0
    move = has_stay & (rng.random(row.size) < 0.33)
    pick = (rng.random(row.size) * np.maximum(n_adm[row], 1)).astype(np.int64)
    weeks = np.where(move, stay_lo[row, np.minimum(pick, MAX_ADMISSIONS - 1)], weeks)
    weeks = weeks[np.lexsort((weeks, row))]
    inside = (weeks[:, None] >= stay_lo[row]) & (weeks[:, None] <= stay_hi[row])
    inside &= np.arange(MAX_ADMISSIONS)[None, :] < n_adm[row][:, None]
    stays = np.where(inside.any(axis=1), inside.argmax(axis=1), S.NO_STAY)
    return row, weeks, stays


def full_record_table(n: int, *, seed: int = 0, n_weeks: int = 520, first_id: int = 0,
                      mean_events: float = 12.0) -> pa.Table:
    """``n`` valid whole-record patients (``ROW_SCHEMA``), ids ``first_id..first_id+n-1``."""
    rng = np.random.default_rng(seed)
    ids = np.arange(first_id, first_id + n, dtype=np.int64)
    birth = rng.integers(-80 * 52, -52, n)
    start = rng.integers(0, n_weeks // 3, n)
    end = np.minimum(start + rng.integers(100, n_weeks, n), n_weeks - 1)

    # Admissions: up to three, each in its own slice of the enrollment window (in days).
    n_adm = np.minimum(rng.poisson(0.4, n), MAX_ADMISSIONS)
    slot = (end - start + 1) * S.DAYS_PER_WEEK // np.maximum(n_adm, 1)
    adm_row = np.repeat(np.arange(n), n_adm)
    index = np.arange(adm_row.size) - _offsets(n_adm)[adm_row]
    admit = start[adm_row] * S.DAYS_PER_WEEK + index * slot[adm_row] + rng.integers(0, 30, adm_row.size)
    discharge = admit + rng.integers(0, 12, adm_row.size)
    los = np.maximum(discharge - admit + rng.uniform(-0.5, 0.5, adm_row.size), 0)
    stay_lo = np.full((n, MAX_ADMISSIONS), -1, np.int64)
    stay_hi = np.full((n, MAX_ADMISSIONS), -2, np.int64)
    stay_lo[adm_row, index] = admit // S.DAYS_PER_WEEK
    stay_hi[adm_row, index] = discharge // S.DAYS_PER_WEEK

    n_events = rng.integers(1, int(2 * mean_events), n)
    row, weeks, cond_stays = _timed_events(rng, start, end, n_events, stay_lo, stay_hi, n_adm)
    ages = age_group_at(weeks, birth[row])
    n_proc = rng.poisson(mean_events / 4, n)
    _, proc_weeks, proc_stays = _timed_events(rng, start, end, n_proc, stay_lo, stay_hi, n_adm)
    n_med = rng.poisson(mean_events / 4, n)
    med_row, med_start, med_stays = _timed_events(rng, start, end, n_med, stay_lo, stay_hi, n_adm)
    med_end = np.minimum(med_start + rng.integers(0, 26, med_row.size), end[med_row])
    n_lab = rng.poisson(mean_events / 2, n)
    _, lab_weeks, lab_stays = _timed_events(rng, start, end, n_lab, stay_lo, stay_hi, n_adm)
    lab_ids = rng.integers(0, len(SIMULATED_LABS), lab_weeks.size)
    typical = np.array([lab.typical for lab in LABS])[lab_ids]
    low, high = np.array([lab.low for lab in LABS]), np.array([lab.high for lab in LABS])
    lab_values = np.clip(typical * rng.lognormal(0, 0.2, lab_ids.size), low[lab_ids], high[lab_ids])

    sizes = vocabulary_sizes()
    columns = {
        S.SUBJECT_ID: pa.array(ids),
        S.SEX: pa.array(rng.choice(np.array([-1, 1], np.int8), n)),
        S.BIRTH_WEEK: pa.array(birth.astype(np.int32)),
        S.ENROLL_START: pa.array(start.astype(np.int32)),
        S.ENROLL_END: pa.array(end.astype(np.int32)),
        S.N_EVENTS: pa.array(n_events.astype(np.int32)),
        S.CONDITIONS: _lists(n_events, rng.integers(0, N_CONDITIONS, weeks.size), np.int16),
        S.AGE_GROUPS: _lists(n_events, ages, np.int8),
        S.WEEKS: _lists(n_events, weeks, np.int32),
        S.CONDITION_STAYS: _lists(n_events, cond_stays, np.int16),
        S.PROCEDURES: _lists(n_proc, rng.integers(0, sizes[S.PROCEDURE], proc_weeks.size), np.int16),
        S.PROCEDURE_WEEKS: _lists(n_proc, proc_weeks, np.int32),
        S.PROCEDURE_STAYS: _lists(n_proc, proc_stays, np.int16),
        S.MEDICATIONS: _lists(n_med, rng.integers(0, sizes[S.MEDICATION], med_row.size), np.int16),
        S.MEDICATION_START_WEEKS: _lists(n_med, med_start, np.int32),
        S.MEDICATION_END_WEEKS: _lists(n_med, med_end, np.int32),
        S.MEDICATION_STAYS: _lists(n_med, med_stays, np.int16),
        S.LABS: _lists(n_lab, lab_ids, np.int8),
        S.LAB_WEEKS: _lists(n_lab, lab_weeks, np.int32),
        S.LAB_VALUES: _lists(n_lab, lab_values, np.float32),
        S.LAB_STAYS: _lists(n_lab, lab_stays, np.int16),
        S.ADMIT_DAYS: _lists(n_adm, admit, np.int32),
        S.DISCHARGE_DAYS: _lists(n_adm, discharge, np.int32),
        S.LENGTH_OF_STAY: _lists(n_adm, los, np.float32),
    }
    return pa.Table.from_arrays(list(columns.values()), schema=S.ROW_SCHEMA)


def diagnosis_only(table: pa.Table) -> pa.Table:
    """The same patients with every modality but diagnoses empty (and no diagnosis in a stay)."""
    return S.fill_missing_modalities(table.select(S.DIAGNOSIS_COLUMNS))
