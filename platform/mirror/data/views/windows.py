"""The ``windows`` view: a patient's record cut into fixed windows (yearly by default), for
risk predictors and the causal-effect estimator (seed 003, Li et al.).

Window ``k`` of a patient covers weeks ``[start + k * window_weeks, start + (k + 1) *
window_weeks)`` of the enrollment (``start`` = ``enroll_start_week``); only full windows are
kept (the partial tail of an enrollment is counted, never silently lost). Each window holds:

* the latest value of each lab (the nine labs seed 003 works with), its week, and a
  missingness mask: a missing lab is NaN in the arrays and 0 with mask 0 in model input,
  never a silent 0;
* the treatment level per ladder (diabetes, lipids, hypertension: ``record.LADDERS``);
* demographics: sex and age at the window's start;
* what happens next: onset of diabetes (E11), coronary disease (I25), kidney disease (N18)
  or stroke (I63) in the next window, among patients who do not have it by the window's end,
  and the next window's LDL, SBP and TG.

Treatment level: a ladder's classes are given only by its ladder (never as acute or stay
medications, ``record`` B2/B5), but a class repeats across levels (A10B at diabetes levels
1-3), so rows alone cannot tell the levels apart. The level at a window is therefore the
number of the ladder's medication rows started by the window's end: the simulator's ladder
never steps back (a discontinued drug still counts, as its next addition is the next level),
so this equals the ground truth's ``addition_levels`` + 1 of the latest addition.

An example is (patient, window t) with a next window: input windows ``t - lookback + 1 .. t``
(left-padded with absent windows, flagged in the input), targets from window ``t + 1``. With
``view.delta`` set, Δ columns written by ``jobs/estimate_delta.py`` beside the data are read in
lockstep with the data rows: Δ_t (outcome window t) may be an input at window t, Δ_{t+1} is
the pretraining target, never an input.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mirror.config import require
from mirror.data import schema
from mirror.data.conditions import BY_CODE
from mirror.data.views.base import DataView
from mirror.data.vocab import WEEKS_PER_YEAR
from mirror.data.vocabularies import SIMULATED_LABS, drug_class_id

if TYPE_CHECKING:
    import ray.data
    import torch

# What a window carries (seed 003): the labs, the ladders, the onsets and the lab targets.
LAB_SHORTS = tuple(lab.short for lab in SIMULATED_LABS)
N_LABS = len(LAB_SHORTS)
_LAB_COLUMN = np.full(256, -1, np.int64)
_LAB_COLUMN[[lab.id for lab in SIMULATED_LABS]] = np.arange(N_LABS)
# Model input scale: (value - typical) / (LAB_SCALE_SHARE x typical), a healthy adult's value
# at 0 and a clinically large change (a quarter of the typical value) at 1.
LAB_SCALE_SHARE = 0.25
LAB_TYPICAL = np.array([lab.typical for lab in SIMULATED_LABS])
LAB_SCALE = LAB_SCALE_SHARE * LAB_TYPICAL
ONSET_CODES = ("E11", "I25", "N18", "I63")  # diabetes, coronary disease, kidney disease, stroke
ONSET_TARGETS = ("onset_dm", "onset_cad", "onset_ckd", "onset_stroke")
LAB_TARGET_SHORTS = ("LDL", "SBP", "TG")
LAB_TARGETS = tuple(f"next_{s.lower()}" for s in LAB_TARGET_SHORTS)
_LAB_TARGET_COLUMNS = np.array([LAB_SHORTS.index(s) for s in LAB_TARGET_SHORTS])
_ONSET_CONDITION = np.full(1024, -1, np.int64)
_ONSET_CONDITION[[BY_CODE[c].condition_id for c in ONSET_CODES]] = np.arange(len(ONSET_CODES))
NO_WEEK = np.iinfo(np.int32).max


def _ladders() -> tuple[tuple[str, ...], np.ndarray, np.ndarray, np.ndarray]:
    """Ladder names, medication id -> ladder index (-1: not a ladder class), levels per ladder,
    the column of each ladder's lab."""
    from mirror.data.record import LADDERS  # the ladders' definition; numpy-only module

    ids = drug_class_id()
    of_class = np.full(max(ids.values()) + 1, -1, np.int64)
    for li, ladder in enumerate(LADDERS):
        of_class[[ids[c] for c in ladder.classes]] = li
    return (tuple(ladder.name for ladder in LADDERS), of_class, np.array([len(ladder.classes) for ladder in LADDERS]),
            _LAB_COLUMN[[ladder.lab for ladder in LADDERS]])


LADDER_NAMES, _LADDER_OF_CLASS, LADDER_LEVELS, _LADDER_LAB_COLUMN = _ladders()
N_LADDERS = len(LADDER_NAMES)
# Model input per window: scaled labs, their masks, levels / max level, sex, age / 100, present.
N_WINDOW_FEATURES = 2 * N_LABS + N_LADDERS + 3
N_DELTA = N_LADDERS * N_LABS  # Δ per ladder on every lab (zero where no addition)
READ_COLUMNS = [
    schema.SUBJECT_ID, schema.SEX, schema.BIRTH_WEEK, schema.ENROLL_START, schema.ENROLL_END,
    schema.N_EVENTS, schema.CONDITIONS, schema.WEEKS, schema.MEDICATIONS, schema.MEDICATION_START_WEEKS,
    schema.MEDICATION_END_WEEKS, schema.LABS, schema.LAB_WEEKS, schema.LAB_VALUES,
]  # fmt: skip

# Δ column set (``<root>/delta/<name>/<split>/part-NNNNN.parquet``, row-aligned with the data
# shard of the same name): per patient, one entry per (outcome window, ladder) with an addition.
DELTA_DIR = "delta"
DELTA_WINDOWS = "delta_windows"  # list<int16>: the outcome window t + 1
DELTA_LADDERS = "delta_ladders"  # list<int8>
DELTA_VALUES = "delta_values"  # list<float32>, N_LABS per entry: X^A_{t+1} - X^B_{t+1} (lab units)
DELTA_OBSERVED = "delta_observed"  # list<bool>, N_LABS per entry: both values measured
DELTA_SCHEMA = pa.schema([
    pa.field(schema.SUBJECT_ID, pa.int64(), nullable=False),
    pa.field(DELTA_WINDOWS, pa.list_(pa.int16()), nullable=False),
    pa.field(DELTA_LADDERS, pa.list_(pa.int8()), nullable=False),
    pa.field(DELTA_VALUES, pa.list_(pa.float32()), nullable=False),
    pa.field(DELTA_OBSERVED, pa.list_(pa.bool_()), nullable=False),
])  # fmt: skip


def delta_split_dir(root: str | Path, name: str, split: str) -> Path:
    if split not in schema.SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {schema.SPLITS}")
    return Path(root) / DELTA_DIR / name / split


# --------------------------------------------------------------------------------------------
# Patient rows -> windows (vectorised over a block of patients)


@dataclass
class Windows:
    """Every full window of a block of patients, flat; ``offsets`` (n + 1) into them."""

    offsets: np.ndarray  # (n + 1,) int64
    owner: np.ndarray  # (W,) patient row
    index: np.ndarray  # (W,) window index within the patient
    start_week: np.ndarray  # (W,) first week of the window
    lab_value: np.ndarray  # (W, N_LABS) float64, latest value, NaN where not measured
    lab_week: np.ndarray  # (W, N_LABS) int64, week of that value, -1 where not measured
    level: np.ndarray  # (W, N_LADDERS) int64, treatment level at the window's end
    female: np.ndarray  # (W,) float 0/1
    age: np.ndarray  # (W,) years at the window's start
    has_by_end: np.ndarray  # (W, 4) bool: onset condition diagnosed by the window's end
    onset_in: np.ndarray  # (W, 4) bool: first diagnosed inside the window
    index_value: np.ndarray  # (W, N_LADDERS) the ladder's lab at its decision in the window (NaN: none)
    tail_weeks: int  # enrolled weeks after the last full window (not in any window)
    first_value: np.ndarray  # (W, N_LABS) float64, first value in the window, NaN where not measured
    first_week: np.ndarray  # (W, N_LABS) int64, week of that value, -1 where not measured
    active: np.ndarray  # (W, N_LADDERS) int64, the ladder's medications still taken at the window's end
    stopped: np.ndarray  # (W, N_LADDERS) int64, taken at the previous window's end, not at this one's
    stopped_before_index: np.ndarray  # (W, N_LADDERS) int64, of those, stopped before the index lab's week

    @property
    def n_windows(self) -> np.ndarray:
        return np.diff(self.offsets)

    def carried_forward(self) -> np.ndarray:
        """(W, N_LABS) latest value of each lab by each window's end, from this or any earlier
        window of the patient (NaN where never measured yet): the information a clinician has."""
        position = np.arange(len(self.owner))[:, None]
        last = np.maximum.accumulate(np.where(np.isnan(self.lab_value), -1, position), axis=0)
        known = last >= self.offsets[self.owner][:, None]
        return np.where(known, np.take_along_axis(self.lab_value, np.maximum(last, 0), axis=0), np.nan)

    def features(self, rows: np.ndarray | None = None, *, labs: np.ndarray | None = None) -> np.ndarray:
        """Model input of windows ``rows`` (default all): (R, N_WINDOW_FEATURES) float32. ``labs``
        replaces each window's own lab values, e.g. with ``carried_forward()`` (mask: ever
        measured)."""
        rows = np.arange(len(self.owner)) if rows is None else rows
        scaled, measured = scaled_lab((self.lab_value if labs is None else labs)[rows], LAB_TYPICAL, LAB_SCALE)
        return np.concatenate([
            scaled, measured, self.level[rows] / LADDER_LEVELS, self.female[rows, None],
            self.age[rows, None] / 100.0, np.ones((len(rows), 1)),
        ], axis=1).astype(np.float32)  # fmt: skip


def scaled_lab(
    value: np.ndarray, typical: float | np.ndarray, scale: float | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A lab in typical-value units, 0 where missing, and the mask of where it was measured:
    a missing lab is never exported as a number on its own."""
    measured = ~np.isnan(value)
    return np.where(measured, (value - typical) / scale, 0.0), measured


def _flat(table: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column's values and each value's row."""
    arr = table.column(column).combine_chunks()
    offsets = arr.offsets.to_numpy()
    values = arr.flatten().to_numpy(zero_copy_only=False)
    owner = np.repeat(np.arange(len(arr)), np.diff(offsets))
    return values, owner


def _last_per_key(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct keys and the position of each one's last occurrence."""
    uniq, first_rev = np.unique(key[::-1], return_index=True)
    return uniq, len(key) - 1 - first_rev


def patient_windows(table: pa.Table, window_weeks: int) -> Windows:
    """Full windows of every patient of ``table`` (rows with ``READ_COLUMNS``)."""
    n = table.num_rows
    start = table.column(schema.ENROLL_START).to_numpy().astype(np.int64)
    end = table.column(schema.ENROLL_END).to_numpy().astype(np.int64)
    birth = table.column(schema.BIRTH_WEEK).to_numpy().astype(np.int64)
    n_win = (end - start + 1) // window_weeks
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(n_win, out=offsets[1:])
    total = int(offsets[-1])
    owner = np.repeat(np.arange(n), n_win)
    index = np.arange(total) - offsets[owner]
    start_week = start[owner] + index * window_weeks
    end_week = start_week + window_weeks - 1

    # Labs: latest value per (window, lab). Labs are sorted by week within a patient.
    lab, lab_owner = _flat(table, schema.LABS)
    lab_w = _flat(table, schema.LAB_WEEKS)[0].astype(np.int64)
    lab_v = _flat(table, schema.LAB_VALUES)[0].astype(np.float64)
    rel = (lab_w - start[lab_owner]) // window_weeks
    col = _LAB_COLUMN[lab.astype(np.int64)]
    keep = (rel >= 0) & (rel < n_win[lab_owner]) & (col >= 0)
    key = (offsets[lab_owner[keep]] + rel[keep]) * N_LABS + col[keep]
    uniq, last = _last_per_key(key)
    lab_value = np.full((total, N_LABS), np.nan)
    lab_week = np.full((total, N_LABS), -1, np.int64)
    lab_value.flat[uniq] = lab_v[keep][last]
    lab_week.flat[uniq] = lab_w[keep][last]
    uniq, first_of_key = np.unique(key, return_index=True)
    lab_first_value = np.full((total, N_LABS), np.nan)
    lab_first_week = np.full((total, N_LABS), -1, np.int64)
    lab_first_value.flat[uniq] = lab_v[keep][first_of_key]
    lab_first_week.flat[uniq] = lab_w[keep][first_of_key]

    # Ladder levels: ladder medications started by each window's end, cumulated per patient.
    med, med_owner = _flat(table, schema.MEDICATIONS)
    med_w = _flat(table, schema.MEDICATION_START_WEEKS)[0].astype(np.int64)
    ladder = _LADDER_OF_CLASS[med.astype(np.int64)]
    rel = np.maximum((med_w - start[med_owner]) // window_weeks, 0)
    keep = (ladder >= 0) & (rel < n_win[med_owner])
    started = np.bincount((offsets[med_owner[keep]] + rel[keep]) * N_LADDERS + ladder[keep],
                          minlength=total * N_LADDERS).reshape(total, N_LADDERS)
    cum = np.cumsum(started, axis=0)
    first = offsets[owner]
    level = cum - cum[first] + started[first] if total else cum

    # Index lab per ladder: the ladder's lab at the decision (the week its first addition in
    # the window starts: the simulator adds a level at a measurement, with effect from the
    # next week, so the value is pre-treatment), else the window's latest value.
    index_value = lab_value[:, _LADDER_LAB_COLUMN].copy()
    lab_key = lab_owner.astype(np.int64) * (1 << 32) + lab_w
    first_add = np.full((total, N_LADDERS), NO_WEEK, np.int64)
    g_add = offsets[med_owner[keep]] + rel[keep]
    np.minimum.at(first_add, (g_add, ladder[keep]), med_w[keep])
    for li in range(N_LADDERS):  # three ladders
        w_rows = np.flatnonzero(first_add[:, li] < NO_WEEK)
        of_lab = np.flatnonzero(col == _LADDER_LAB_COLUMN[li])
        key = owner[w_rows].astype(np.int64) * (1 << 32) + first_add[w_rows, li]
        pos = np.searchsorted(lab_key[of_lab], key, side="right") - 1
        ok = (pos >= 0) & (lab_key[of_lab][np.maximum(pos, 0)] == key) if len(of_lab) else np.zeros(len(key), bool)
        index_value[w_rows[ok], li] = lab_v[of_lab][pos[ok]]
    index_week = np.where(first_add < NO_WEEK, first_add, lab_week[:, _LADDER_LAB_COLUMN])
    index_week = np.where(index_week >= 0, index_week, end_week[:, None])  # no measurement: the window's end
    med_end = _flat(table, schema.MEDICATION_END_WEEKS)[0].astype(np.int64)
    active, stopped, stopped_before_index = _stops(ladder, med_owner, rel, med_end, offsets, start, n_win,
                                                   window_weeks, index_week)

    # Onsets: first diagnosis week of each onset condition per patient.
    cond, cond_owner = _flat(table, schema.CONDITIONS)
    cond_w = _flat(table, schema.WEEKS)[0].astype(np.int64)
    k = _ONSET_CONDITION[cond.astype(np.int64)]
    sel = k >= 0
    first_week = np.full((n, len(ONSET_CODES)), NO_WEEK, np.int64)
    ok, pos = np.unique((cond_owner[sel] * len(ONSET_CODES) + k[sel]), return_index=True)
    first_week.flat[ok] = cond_w[sel][pos]  # weeks are sorted within a patient
    fw = first_week[owner]
    has_by_end = fw <= end_week[:, None]
    onset_in = has_by_end & (fw >= start_week[:, None])

    female = (table.column(schema.SEX).to_numpy() == 1).astype(np.float64)[owner]
    age = (start_week - birth[owner]) / WEEKS_PER_YEAR
    tail = int(((end - start + 1) - n_win * window_weeks).sum())
    return Windows(offsets, owner, index, start_week, lab_value, lab_week, level, female, age,
                   has_by_end, onset_in, index_value, tail, lab_first_value, lab_first_week, active, stopped,
                   stopped_before_index)


def _stops(ladder: np.ndarray, owner: np.ndarray, first: np.ndarray, med_e: np.ndarray, offsets: np.ndarray,
           start: np.ndarray, n_win: np.ndarray, window_weeks: int,
           index_week: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per (window, ladder): the ladder's medications taken at the window's end (``level``
    counts those ever started, and chronic drugs are stopped); those taken at the previous
    window's end and stopped in this window; and those of them stopped before ``index_week``
    (the window's decision: its first addition, else the index lab's measurement). A stop
    raises the ladder's lab, so it prompts additions. Per medication: its ``ladder`` (-1: none),
    patient row ``owner``, ``first`` window (of its start, 0 if before enrolment) and end week."""
    total = int(offsets[-1])
    active = np.zeros((total, N_LADDERS), np.int64)
    stopped = np.zeros((total, N_LADDERS), np.int64)
    stopped_before_index = np.zeros((total, N_LADDERS), np.int64)
    lad = ladder >= 0
    owner, first, med_e, ladder = owner[lad], first[lad], med_e[lad], ladder[lad]
    # the first window whose end the drug is no longer taken at
    gone = np.minimum((med_e - start[owner] + 1) // window_weeks, n_win[owner])
    for k in range(int((gone - first).max(initial=0))):  # windows a drug spans: a few
        w = first + k
        on = w < gone
        np.add.at(active, (offsets[owner[on]] + w[on], ladder[on]), 1)
    stop = (gone >= first + 1) & (gone < n_win[owner])  # taken at window gone - 1's end, not at gone's
    g = offsets[owner[stop]] + gone[stop]
    np.add.at(stopped, (g, ladder[stop]), 1)
    before = med_e[stop] < index_week[g, ladder[stop]]
    np.add.at(stopped_before_index, (g[before], ladder[stop][before]), 1)
    return active, stopped, stopped_before_index


# --------------------------------------------------------------------------------------------
# Windows -> examples


def delta_per_window(windows: Windows, delta: pa.Table | None) -> tuple[np.ndarray, np.ndarray]:
    """Dense Δ (W, N_DELTA) scaled like the labs (0 where none) and its mask, from the Δ
    columns of the same patients (in the same order), or zeros without them."""
    total = len(windows.owner)
    values = np.zeros((total, N_LADDERS, N_LABS), np.float32)
    observed = np.zeros((total, N_LADDERS, N_LABS), bool)
    if delta is not None:
        win, owner = _flat(delta, DELTA_WINDOWS)
        lad = _flat(delta, DELTA_LADDERS)[0].astype(np.int64)
        vals = _flat(delta, DELTA_VALUES)[0].reshape(-1, N_LABS)
        obs = _flat(delta, DELTA_OBSERVED)[0].reshape(-1, N_LABS)
        inside = win < windows.n_windows[owner]
        g = windows.offsets[owner[inside]] + win[inside].astype(np.int64)
        values[g, lad[inside]] = np.where(obs[inside], vals[inside] / LAB_SCALE, 0.0)
        observed[g, lad[inside]] = obs[inside]
    return values.reshape(total, N_DELTA), observed.reshape(total, N_DELTA)


def window_examples(windows: Windows, subject_id: np.ndarray, lookback: int,
                    delta: pa.Table | None = None) -> dict[str, np.ndarray]:
    """One example per (patient, window t) with a next window: inputs of windows
    t - lookback + 1 .. t (absent ones zero, ``present`` feature 0), Δ_t inputs, Δ_{t+1} and
    window t + 1 targets."""
    n_win = windows.n_windows[windows.owner]
    t = np.flatnonzero(windows.index <= n_win - 2)  # windows with a next one
    feats = windows.features()
    d_val, d_obs = delta_per_window(windows, delta)
    x = np.zeros((len(t), lookback, N_WINDOW_FEATURES), np.float32)
    d_in = np.zeros((len(t), lookback, N_DELTA), np.float32)
    for back in range(lookback):  # a handful of look-back steps, vectorised over examples
        src = t - back
        ok = windows.index[t] - back >= 0
        x[ok, lookback - 1 - back] = feats[src[ok]]
        d_in[ok, lookback - 1 - back] = d_val[src[ok]]
    nxt = t + 1
    # Δ_{t+1} is 0 by definition (seed 003) where no level was added at t (t >= 1: the
    # estimator needs window t - 1); an addition without an estimate stays unknown (mask 0).
    no_addition = (windows.index[t] >= 1)[:, None] & (windows.level[t] == windows.level[np.maximum(t - 1, 0)])
    lab_next = windows.lab_value[nxt][:, _LAB_TARGET_COLUMNS]
    return {
        "subject_id": subject_id[windows.owner[t]].astype(np.int64),
        "window": windows.index[t].astype(np.int64),
        "x": x,
        "delta_in": d_in,
        "delta_target": d_val[nxt],
        "delta_observed": d_obs[nxt],
        "delta_zero": np.repeat(no_addition, N_LABS, axis=1) & ~d_obs[nxt],
        "onset": windows.onset_in[nxt].astype(np.float32),
        "at_risk": ~windows.has_by_end[t],
        "lab_target": np.nan_to_num((lab_next - LAB_TYPICAL[_LAB_TARGET_COLUMNS]) / LAB_SCALE[_LAB_TARGET_COLUMNS]).astype(np.float32),
        "lab_observed": ~np.isnan(lab_next),
    }


def _to_arrow(examples: dict[str, np.ndarray]) -> pa.Table:
    """Examples as Arrow: 2-D and 3-D arrays as flat fixed-size lists."""
    columns = {}
    for name, arr in examples.items():
        if arr.ndim == 1:
            columns[name] = pa.array(arr)
        else:
            width = int(np.prod(arr.shape[1:]))
            columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), width)
    return pa.table(columns)


# --------------------------------------------------------------------------------------------
# The view


@dataclass(frozen=True)
class WindowsViewConfig:
    """The ``view.*`` keys of window models."""

    window_weeks: int = 52  # yearly windows by default (seed 003)
    lookback: int = 1  # input windows per example: 1-4 as on real data, 5/10/15 as in the synthetic study
    delta: str = ""  # Δ column set under <root>/delta/<name>/ (jobs/estimate_delta.py); "" none

    def __post_init__(self) -> None:
        require(self, "window_weeks", 1 <= self.window_weeks <= 522, "an int in [1, 522] weeks")
        require(self, "lookback", 1 <= self.lookback <= 52, "an int in [1, 52] windows")


@dataclass(frozen=True)
class WindowsInfo:
    """What a window model is built from."""

    n_features: int = N_WINDOW_FEATURES
    n_delta: int = N_DELTA
    lookback: int = 1
    has_delta: bool = False


@dataclass(frozen=True)
class WindowsReport:
    """Examples of one split: patients with two or more full windows give one per window that
    has a next one; the others give none (counted)."""

    split: str
    patients: int
    kept: int  # examples
    patients_with_examples: int
    dropped_under_two_windows: int  # patients
    tail_weeks: int  # enrolled weeks after the last full window, in no window

    def dropped_by_reason(self) -> dict[str, int]:
        return {"patients_under_two_windows": self.dropped_under_two_windows}

    def as_dict(self) -> dict[str, int | str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def count_examples(root: str | Path, split: str, window_weeks: int) -> WindowsReport:
    """Exact example counts from the two enrollment columns (a cheap pass, no lists decoded)."""
    patients = kept = with_examples = tail = 0
    for file in schema.split_files(root, split):
        for batch in pq.ParquetFile(file).iter_batches(columns=[schema.ENROLL_START, schema.ENROLL_END]):
            duration = batch.column(1).to_numpy().astype(np.int64) - batch.column(0).to_numpy() + 1
            n_win = duration // window_weeks
            patients += len(duration)
            kept += int(np.maximum(n_win - 1, 0).sum())
            with_examples += int((n_win >= 2).sum())
            tail += int((duration - n_win * window_weeks).sum())
    return WindowsReport(split, patients, kept, with_examples, patients - with_examples, tail)


class _ExamplesFn:
    """Ray Data UDF: patient rows (with Δ columns when present) -> example rows."""

    def __init__(self, window_weeks: int, lookback: int, with_delta: bool) -> None:
        self.window_weeks, self.lookback, self.with_delta = window_weeks, lookback, with_delta

    def __call__(self, table: pa.Table) -> pa.Table:
        windows = patient_windows(table, self.window_weeks)
        delta = table.select(DELTA_SCHEMA.names) if self.with_delta else None
        ids = table.column(schema.SUBJECT_ID).to_numpy()
        return _to_arrow(window_examples(windows, ids, self.lookback, delta))


class _WindowsCollate:
    """Example rows -> a dict of tensors of :class:`WindowBatch` (in Ray's prefetch threads)."""

    def __init__(self, lookback: int) -> None:
        self.lookback = lookback

    def __call__(self, table: pa.Table) -> dict[str, torch.Tensor]:
        import torch

        out = {}
        shapes = {"x": (self.lookback, N_WINDOW_FEATURES), "delta_in": (self.lookback, N_DELTA)}
        for name in table.column_names:
            col = table.column(name).combine_chunks()
            if pa.types.is_fixed_size_list(col.type):
                arr = col.flatten().to_numpy(zero_copy_only=False).reshape((len(col), *shapes.get(name, (col.type.list_size,))))
            else:
                arr = col.to_numpy(zero_copy_only=False)
            out[name] = torch.from_numpy(np.array(arr, copy=True))
        return out


@dataclass
class WindowBatch:
    """Examples of the windows view (B examples, L look-back windows)."""

    subject_id: torch.Tensor  # (B,) int64
    window: torch.Tensor  # (B,) int64, window t
    x: torch.Tensor  # (B, L, N_WINDOW_FEATURES) float32
    delta_in: torch.Tensor  # (B, L, N_DELTA) Δ_{t-L+1..t}, scaled, 0 where none
    delta_target: torch.Tensor  # (B, N_DELTA) Δ_{t+1}
    delta_observed: torch.Tensor  # (B, N_DELTA) bool: an estimate of Δ_{t+1}
    delta_zero: torch.Tensor  # (B, N_DELTA) bool: no addition at t, so Δ_{t+1} = 0 by definition
    onset: torch.Tensor  # (B, 4) float 0/1: onset in window t + 1
    at_risk: torch.Tensor  # (B, 4) bool: free of the condition by the end of window t
    lab_target: torch.Tensor  # (B, 3) scaled next LDL, SBP, TG
    lab_observed: torch.Tensor  # (B, 3) bool

    def __post_init__(self) -> None:
        b = self.subject_id.shape[0]
        for f in fields(self):
            if getattr(self, f.name).shape[0] != b:
                raise ValueError(f"WindowBatch.{f.name}: {b} examples expected, got shape {tuple(getattr(self, f.name).shape)}")

    @property
    def size(self) -> int:
        return int(self.subject_id.shape[0])

    def floor_features(self) -> torch.Tensor:
        """The last window's features, no Δ: what the predictor suite's GLM floor reads (the
        paper's GLM without Δ)."""
        return self.x[:, -1]

    def to(self, device: Any, non_blocking: bool = True) -> WindowBatch:
        return WindowBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})


class WindowsView(DataView):
    name = "windows"
    config_cls = WindowsViewConfig
    info_cls = WindowsInfo
    unit = "windows"

    config: WindowsViewConfig

    def __init__(self, config: WindowsViewConfig, root: str) -> None:
        super().__init__(config, root)
        self.metadata = schema.DatasetMetadata.read(root)
        if config.delta and not (Path(root) / DELTA_DIR / config.delta).is_dir():
            raise FileNotFoundError(
                f"view.delta={config.delta!r}: {Path(root) / DELTA_DIR / config.delta} does not exist; "
                "write it with jobs/estimate_delta.py --data ROOT --name NAME"
            )

    @classmethod
    def probe_info(cls) -> WindowsInfo:
        return WindowsInfo(has_delta=True)  # so every mode of every window model can be built

    def info(self) -> WindowsInfo:
        return WindowsInfo(lookback=self.config.lookback, has_delta=bool(self.config.delta))

    def read(self, split: str, *, purpose: str = "train") -> tuple[ray.data.Dataset, WindowsReport]:
        dataset = read_rows(self.root, split, delta=self.config.delta)
        dataset = dataset.map_batches(
            _ExamplesFn(self.config.window_weeks, self.config.lookback, bool(self.config.delta)),
            batch_format="pyarrow", batch_size=None, num_cpus=0.25,
        )
        return dataset, count_examples(self.root, split, self.config.window_weeks)

    def batches(self, source: Any, batch_size: int, *, training: bool, epoch: int = 0, seed: int = 0,
                device: Any = "auto") -> Iterator[WindowBatch]:
        from ray.data.collate_fn import ArrowBatchCollateFn

        from mirror.data.stream import iter_batches

        class Collate(_WindowsCollate, ArrowBatchCollateFn):
            pass

        return iter_batches(source, batch_size, collate_fn=Collate(self.config.lookback),
                            make_batch=lambda t: WindowBatch(**t), device=device)


def read_rows(root: str | Path, split: str, *, columns: list[str] | None = None, delta: str = "") -> ray.data.Dataset:
    """Patient rows of a split (validated on the columns read), with the Δ columns of the
    column set ``delta`` zipped in row by row when given."""
    from mirror.data.stream import read_split

    columns = columns or READ_COLUMNS
    dataset, _ = read_split(root, split, columns=columns, min_words=0, max_words=schema.MAX_EVENTS)
    if not delta:
        return dataset
    return dataset.map_batches(_JoinDelta(str(root), split, delta), batch_format="pyarrow", batch_size=None, num_cpus=0.25)


class _JoinDelta:
    """Adds a patient's Δ columns to its row. The Δ column set holds one row per patient of the
    split, sorted by subject id like the data, so a block's rows are found by a sorted search
    on an id index read once per worker."""

    def __init__(self, root: str, split: str, name: str) -> None:
        self.root, self.split, self.name = root, split, name
        self._index: tuple[list[Path], np.ndarray, np.ndarray] | None = None

    def _files(self) -> tuple[list[Path], np.ndarray, np.ndarray]:
        if self._index is None:
            files = sorted(delta_split_dir(self.root, self.name, self.split).glob("*.parquet"))
            if not files:
                raise FileNotFoundError(f"{delta_split_dir(self.root, self.name, self.split)}: no Δ shards")
            lo, hi = [], []
            for f in files:
                ids = pq.read_table(f, columns=[schema.SUBJECT_ID]).column(0).to_numpy()
                lo.append(ids.min() if len(ids) else 0)
                hi.append(ids.max() if len(ids) else -1)
            self._index = (files, np.array(lo), np.array(hi))
        return self._index

    def __call__(self, table: pa.Table) -> pa.Table:
        files, lo, hi = self._files()
        ids = table.column(schema.SUBJECT_ID).to_numpy()
        parts = [pq.read_table(f, filters=[(schema.SUBJECT_ID, ">=", int(ids.min())), (schema.SUBJECT_ID, "<=", int(ids.max()))])
                 for f, a, b in zip(files, lo, hi, strict=True) if len(ids) and a <= ids.max() and b >= ids.min()]
        delta = pa.concat_tables(parts) if parts else DELTA_SCHEMA.empty_table()
        index = pc.index_in(pa.array(ids), value_set=delta.column(schema.SUBJECT_ID))
        missing = index.is_null().to_numpy(zero_copy_only=False)
        found = pc.fill_null(index, 0).to_numpy()
        if missing.any():
            raise ValueError(f"{delta_split_dir(self.root, self.name, self.split)}: no Δ row for subject "
                             f"{int(ids[np.argmax(missing)])} ({int(missing.sum())} of {len(ids)} rows in this block); "
                             "rerun jobs/estimate_delta.py on this dataset")
        delta = delta.take(pa.array(found.astype(np.int64)))
        for name in DELTA_SCHEMA.names[1:]:
            table = table.append_column(name, delta.column(name))
        return table
