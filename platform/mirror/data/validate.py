"""Dataset validation: every rule a mirror dataset must satisfy, checked in bounded memory.

Two entry points share one implementation:

* :func:`check_table` checks one in-memory batch of rows. It is pure and vectorised over Arrow
  list offsets and flat numpy values (no Python loop per row or token), so readers call it on
  every batch on the training hot path and raise :class:`DatasetValidationError` on the first
  violation. A projected read passes ``columns`` (what it read, see :func:`columns_to_read`):
  the rules on those columns run, the others are skipped.
* :func:`validate_dataset` checks a whole dataset directory (``jobs/validate.py``), streaming
  file by file and batch by batch, optionally with one Ray task per file; the trial part
  (``trial/<split>/``) is checked the same way by :func:`check_trial_table`.

A reader, per batch::

    if found := check_table(batch, n_weeks=meta.n_weeks, file=path, first_row=row, split=split,
                            vocab=meta.vocab, modalities=meta.modalities):
        raise DatasetValidationError(found)

Rules (the closed set ``RULES``; every :class:`Violation` names one):

``metadata``         ``metadata/dataset.json`` is readable JSON with ``schema_version`` 2, all
                     required fields of the right types and no unknown ones; vocabulary sizes
                     match (the record's vocabularies, when listed, are the platform's);
                     ``modalities`` is a subset of ``schema.MODALITIES``; per-split patient
                     counts and length histograms add up and match the rows and ``n_events``
                     actually found in ``data/<split>/``. With a trial part, ``trial`` holds
                     ``participants`` per split (matching the rows in ``trial/<split>/``) and
                     ``baseline_features``, and ``vocab`` sizes the trial vocabularies.
``codes``            ``metadata/codes.parquet`` has ``schema.CODES_SCHEMA``, no nulls in its
                     required columns, known modalities, and per modality ids ``0..size-1``
                     once each with unique, non-empty codes; conditions are exactly the 605;
                     every vocabulary size in ``dataset.json`` matches its rows.
``encoding``         every text value in ``metadata/codes.parquet`` is valid UTF-8 (Parquet
                     readers do not check it unless asked to; exports copy the file as is).
``unreadable``       a shard cannot be opened or decoded as Parquet.
``schema``           shard columns are exactly ``schema.ROW_SCHEMA`` (``TRIAL_SCHEMA`` under
                     ``trial/``): no missing or unknown columns, exact Arrow dtypes, and no
                     nulls, also inside (nested) lists.
``subject_order``    subject ids strictly increase within a file and across a split's files in
                     path order; with dense ids this gives global uniqueness in O(1) memory.
``split``            each subject sits in the split ``splits.split_codes`` assigns (which also
                     needs ids >= 0); trial participants too. Not applied to imported
                     datasets that keep their source splits (``provenance["splits"] == "source"``).
``sex``              sex is -1 (male) or 1 (female).
``list_lengths``     the lists of each modality are parallel: ``conditions``, ``age_groups``,
                     ``weeks`` and ``condition_stays`` have ``n_events`` items; every other
                     modality's lists as many as its first (``procedures``, ``medications``,
                     ``labs``, ``admit_days``); a trial's per-visit lists as many as
                     ``visit_days``. The message names the modality.
``unlisted_modality`` a modality missing from ``dataset.json``'s ``modalities`` holds items; one
                     violation per batch and modality, at its first such row, with the count
                     of such rows in the batch.
``empty_sentence``   ``n_events == 0``: a patient without a word cannot be trained on.
``over_long``        ``n_events > schema.MAX_EVENTS``, the hard validity cap. Sentences longer
                     than ``schema.MAX_WORDS`` are valid: the training filter drops and counts
                     them (``ValidationReport`` reports how many).
``condition_range``  condition ids lie in ``[0, vocab.N_CONDITIONS)``.
``age_group_range``  age groups lie in ``[0, vocab.N_AGE_GROUPS)``.
``vocab_range``      procedure, medication and lab ids (and a trial's treatment, medication
                     and adverse-event ids) lie in ``[0, size)``, sizes from ``dataset.json``'s
                     ``vocab`` (the platform's vocabularies when not listed).
``week_range``       every modality's weeks lie in ``[0, n_weeks)`` (``n_weeks`` from
                     ``dataset.json``), admission days in ``[0, 7 * n_weeks)``.
``sorted_times``     weeks (``weeks``, ``procedure_weeks``, ``medication_start_weeks``,
                     ``lab_weeks``) are non-decreasing within a patient; the message names the
                     column.
``medication_period`` a medication's end week is not before its start week.
``age_consistency``  the age group of each event equals ``vocab.age_group_at(week, birth_week)``
                     and no event precedes birth.
``enrollment``       ``enroll_start <= enroll_end``, both within ``[0, n_weeks)``; every event
                     week (and medication start) inside ``[enroll_start, enroll_end]``, every
                     medication end week ``<= enroll_end``, every admission and discharge day
                     inside the window in days, ``[7 * enroll_start, 7 * enroll_end + 6]``.
``admission_order``  a stay's discharge day is not before its admit day, and stays do not
                     overlap: each admission is on or after the previous stay's discharge (so
                     admissions are sorted).
``length_of_stay``   ``length_of_stay`` is finite, ``>= 0`` and within a day of
                     ``discharge_day - admit_day``.
``stay_link``        each ``*_stays`` value is ``schema.NO_STAY`` or an index into the patient's
                     admissions.
``stay_window``      an event linked to a stay lies inside it: its week (a medication's start
                     week) within ``[admit_day // 7, discharge_day // 7]`` of that stay.
``lab_value_range``  lab values are finite and inside the lab's plausible ``[low, high]`` in
                     its unit (``vocabularies.LABS``): a value in the wrong unit fails here.
``trial_arm``        a trial participant's arm is 0 (control) or 1 (treatment).
``trial_baseline``   every participant's ``baseline`` has one value per
                     ``trial["baseline_features"]``.
``trial_visits``     ``enroll_day <= end_day``, visit days strictly increase and lie inside
                     ``[enroll_day, end_day]`` ("trial visits inside enrollment").

One root cause gives one rule: the cross-column event rules (``age_consistency``,
``enrollment``, ``sorted_times``, ``medication_period``, ``admission_order``, ``stay_window``,
the ``length_of_stay`` comparison, ``lab_value_range``) skip items whose week, day, id or link
already failed its own rule, and a batch whose lists disagree in length (``list_lengths``) gets
no per-item checks at all.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mirror.data import schema as S
from mirror.data.splits import SPLIT_CODES, split_codes
from mirror.data.vocab import (
    AGE_GROUP_YEARS,
    DIAG_AGE_VOCAB_SIZE,
    N_AGE_GROUPS,
    N_CONDITIONS,
    N_SPECIAL,
    WEEKS_PER_YEAR,
)
from mirror.data.vocabularies import LABS as LAB_VOCABULARY
from mirror.data.vocabularies import vocabulary_sizes

METADATA = "metadata"
CODES = "codes"
UNREADABLE = "unreadable"
SCHEMA = "schema"
SUBJECT_ORDER = "subject_order"
SPLIT = "split"
SEX = "sex"
LIST_LENGTHS = "list_lengths"
UNLISTED_MODALITY = "unlisted_modality"
EMPTY_SENTENCE = "empty_sentence"
OVER_LONG = "over_long"
CONDITION_RANGE = "condition_range"
AGE_GROUP_RANGE = "age_group_range"
VOCAB_RANGE = "vocab_range"
WEEK_RANGE = "week_range"
SORTED_TIMES = "sorted_times"
MEDICATION_PERIOD = "medication_period"
AGE_CONSISTENCY = "age_consistency"
ENROLLMENT = "enrollment"
ADMISSION_ORDER = "admission_order"
LENGTH_OF_STAY = "length_of_stay"
STAY_LINK = "stay_link"
STAY_WINDOW = "stay_window"
LAB_VALUE_RANGE = "lab_value_range"
TRIAL_ARM = "trial_arm"
TRIAL_BASELINE = "trial_baseline"
TRIAL_VISITS = "trial_visits"
ENCODING = "encoding"

RULES = (
    METADATA, CODES, ENCODING, UNREADABLE, SCHEMA, SUBJECT_ORDER, SPLIT, SEX, LIST_LENGTHS,
    UNLISTED_MODALITY, EMPTY_SENTENCE, OVER_LONG, CONDITION_RANGE, AGE_GROUP_RANGE, VOCAB_RANGE,
    WEEK_RANGE, SORTED_TIMES, MEDICATION_PERIOD, AGE_CONSISTENCY, ENROLLMENT, ADMISSION_ORDER,
    LENGTH_OF_STAY, STAY_LINK, STAY_WINDOW, LAB_VALUE_RANGE, TRIAL_ARM, TRIAL_BASELINE,
    TRIAL_VISITS,
)

BATCH_ROWS = 65_536  # rows decoded at a time by validate_dataset: bounds memory per file
_REQUIRED_METADATA = ("name", "origin_date", "n_weeks", "patients", "vocab", "provenance",
                      "length_histogram", "schema_version")
# dataset.json's trial dict: keys the validator reads (the writer may add others).
TRIAL_PARTICIPANTS, TRIAL_BASELINE_FEATURES = "participants", "baseline_features"

# Per-patient scalar columns: every read that validates reads them (they are tiny).
ROW_COLUMNS = tuple(f.name for f in S.ROW_SCHEMA if not pa.types.is_list(f.type))
_ID_VOCABULARY = {S.PROCEDURES: S.PROCEDURE, S.MEDICATIONS: S.MEDICATION, S.LABS: S.LAB}
_WEEK_COLUMNS = (S.WEEKS, S.PROCEDURE_WEEKS, S.MEDICATION_START_WEEKS, S.MEDICATION_END_WEEKS,
                 S.LAB_WEEKS)
_DAY_COLUMNS = (S.ADMIT_DAYS, S.DISCHARGE_DAYS)
_SORTED_COLUMNS = (S.WEEKS, S.PROCEDURE_WEEKS, S.MEDICATION_START_WEEKS, S.LAB_WEEKS)
# Each ``*_stays`` column and the week of the event it links to a stay.
_STAY_WEEK = {S.CONDITION_STAYS: S.WEEKS, S.PROCEDURE_STAYS: S.PROCEDURE_WEEKS,
              S.MEDICATION_STAYS: S.MEDICATION_START_WEEKS, S.LAB_STAYS: S.LAB_WEEKS}
_MODALITY_OF = {c: m for m, cols in S.MODALITY_COLUMNS.items() for c in cols}
_TRIAL_VOCABULARY = {S.VISIT_TREATMENTS: S.TRIAL_TREATMENT, S.VISIT_MEDICATIONS: S.TRIAL_MEDICATION,
                     S.VISIT_ADVERSE_EVENTS: S.ADVERSE_EVENT}
_LAB_LOW = np.array([lab.low for lab in LAB_VOCABULARY])
_LAB_HIGH = np.array([lab.high for lab in LAB_VOCABULARY])


@dataclass(frozen=True)
class Violation:
    """One broken rule at one place. ``row`` is the 0-based row within ``file`` (None for
    file-level problems such as a wrong dtype or a bad ``dataset.json``)."""

    file: str
    row: int | None
    subject_id: int | None
    rule: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.row is None else f"{self.file} row {self.row}"
        if self.subject_id is not None:
            where += f" (subject {self.subject_id})"
        return f"{where}: {self.rule}: {self.message}"


class DatasetValidationError(ValueError):
    """Raised by readers (and ``ValidationReport.raise_if_invalid``) on invalid data."""

    SHOWN = 10

    def __init__(self, violations: Iterable[Violation], *, truncated: bool = False) -> None:
        self.violations = list(violations)
        self.truncated = truncated
        more = len(self.violations) - self.SHOWN
        lines = [str(v) for v in self.violations[: self.SHOWN]]
        if more > 0 or truncated:
            lines.append(f"... and {max(more, 0)} more" + (" (stopped counting)" if truncated else ""))
        super().__init__(
            f"invalid dataset: {len(self.violations)} violation(s)\n  " + "\n  ".join(lines)
        )

    def __reduce__(self):
        """Rebuild from the violations, so the error crosses Ray's process boundaries intact."""
        return (_rebuild_validation_error, (self.violations, self.truncated))


def _rebuild_validation_error(violations: list[Violation], truncated: bool) -> DatasetValidationError:
    return DatasetValidationError(violations, truncated=truncated)


# ---------------------------------------------------------------------------------------------
# One batch of rows


def _same_type(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Exact dtype match; list item field names and nullability are ignored (nulls are
    checked on the data itself)."""
    if pa.types.is_list(expected):
        return pa.types.is_list(actual) and _same_type(actual.value_type, expected.value_type)
    return actual == expected


def _type_name(t: pa.DataType) -> str:
    return f"list<{_type_name(t.value_type)}>" if pa.types.is_list(t) else str(t)


def schema_violations(schema: pa.Schema, file: str, expected: pa.Schema = S.ROW_SCHEMA,
                      columns: Collection[str] | None = None) -> list[Violation]:
    """``schema`` rule, column level: missing, unknown or mistyped columns against ``expected``
    (``columns``: only these of its columns are expected, for a projected read)."""
    out = []
    names = set(schema.names)
    wanted = [f for f in expected if columns is None or f.name in columns]
    for f in wanted:
        if f.name not in names:
            out.append(Violation(file, None, None, SCHEMA, f"missing column {f.name!r} ({_type_name(f.type)})"))
        elif not _same_type(schema.field(f.name).type, f.type):
            got, want = _type_name(schema.field(f.name).type), _type_name(f.type)
            out.append(Violation(file, None, None, SCHEMA, f"column {f.name!r} is {got}, expected {want}"))
    unknown = sorted(names - {f.name for f in wanted})
    if unknown:
        out.append(Violation(file, None, None, SCHEMA,
                             f"unknown columns {unknown}; valid columns are {[f.name for f in wanted]}"))
    return out


def columns_to_read(columns: Iterable[str]) -> list[str]:
    """What a validating reader reads to keep ``columns``: those, every per-patient scalar
    column (``ROW_COLUMNS``), and the admission days when a ``*_stays`` column is kept (its
    links are checked against them); in ``ROW_SCHEMA`` order. Pass the result to
    :func:`check_table` as ``columns``."""
    wanted = set(columns) | set(ROW_COLUMNS)
    if unknown := sorted(wanted - set(S.ROW_SCHEMA.names)):
        raise ValueError(f"columns: unknown {unknown}; valid columns are {S.ROW_SCHEMA.names}")
    if wanted & set(_STAY_WEEK):
        wanted |= set(_DAY_COLUMNS)
    return [name for name in S.ROW_SCHEMA.names if name in wanted]


def _column(table: pa.Table | pa.RecordBatch, name: str) -> pa.Array:
    col = table.column(name)
    if not isinstance(col, pa.ChunkedArray):
        return col
    if col.num_chunks == 1:
        return col.chunk(0)
    return pa.concat_arrays(col.chunks) if col.num_chunks else pa.array([], col.type)


def _flat(arr: pa.ListArray) -> tuple[np.ndarray, pa.Array]:
    """(offsets starting at 0 as int64, flat child values) of a possibly sliced list array."""
    offsets = np.asarray(arr.offsets, dtype=np.int64)
    start = int(offsets[0]) if offsets.size else 0
    values = arr.values.slice(start, int(offsets[-1]) - start if offsets.size else 0)
    return offsets - start, values


class _Collector:
    """Turns bad local row indices into Violations, stopping at ``limit``."""

    def __init__(self, file: str, first_row: int, subject_ids: np.ndarray, limit: int) -> None:
        self.file, self.first_row, self.ids, self.limit = file, first_row, subject_ids, limit
        self.found: list[Violation] = []

    @property
    def full(self) -> bool:
        return len(self.found) >= self.limit

    def add(self, rule: str, rows: np.ndarray, describe: Callable[[int], str]) -> None:
        """``describe(i)`` is the message for the i-th bad row (only called for reported ones)."""
        for i in range(min(len(rows), self.limit - len(self.found))):
            r = int(rows[i])
            sid = int(self.ids[r])
            self.found.append(Violation(self.file, self.first_row + r, sid, rule, describe(i)))

    def add_items(self, rule: str, bad_items: np.ndarray, offsets: np.ndarray,
                  describe: Callable[[int], str]) -> None:
        """One violation per row holding a True in ``bad_items`` (a mask over the flat items
        of lists with ``offsets``), described by its first bad item's flat index."""
        if not self.full and bad_items.any():
            self.add_at(rule, np.flatnonzero(bad_items), offsets, describe)

    def add_at(self, rule: str, bad_flat: np.ndarray, offsets: np.ndarray,
               describe: Callable[[int], str]) -> None:
        """As :meth:`add_items`, given the bad items' sorted flat indices."""
        if not self.full and bad_flat.size:
            rows, first = _first_per_row(bad_flat, offsets)
            self.add(rule, rows, lambda i: describe(int(first[i])))


def _first_per_row(bad_flat: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows holding the flat indices ``bad_flat`` (sorted), and the first bad index per row."""
    rows = np.searchsorted(offsets, bad_flat, side="right") - 1
    rows, first = np.unique(rows, return_index=True)
    return rows, bad_flat[first]


def _null_violations(cols: Mapping[str, pa.Array], file: str, first_row: int) -> list[Violation]:
    """``schema`` rule on the data: nulls in a column or inside its (nested) lists."""
    out = []
    for name, arr in cols.items():
        if arr.null_count:
            row = int(np.flatnonzero(np.asarray(arr.is_null()))[0])
            out.append(Violation(file, first_row + row, None, SCHEMA,
                                 f"null values in column {name!r} ({arr.null_count} rows)"))
            continue
        offsets, items = None, arr
        while pa.types.is_list(items.type):  # rows of the outermost list, items of the inner
            inner_offsets, items = _flat(items)
            offsets = inner_offsets if offsets is None else inner_offsets[offsets]
            if items.null_count:
                k = int(np.flatnonzero(np.asarray(items.is_null()))[0])
                row = int(np.searchsorted(offsets, k, side="right")) - 1
                out.append(Violation(file, first_row + row, None, SCHEMA,
                                     f"null values inside lists of column {name!r} "
                                     f"({items.null_count} items)"))
                break
    return out


def _check_ids(found: _Collector, ids: np.ndarray, previous_subject_id: int | None,
               split: str | None) -> None:
    """``subject_order`` (also across the batch boundary) and ``split`` on a batch's ids."""
    prev = np.empty_like(ids)
    prev[1:] = ids[:-1]
    prev[0] = ids[0] - 1 if previous_subject_id is None else previous_subject_id
    bad = np.flatnonzero(ids <= prev)
    found.add(SUBJECT_ORDER, bad, lambda i: (
        f"duplicate subject id {ids[bad[i]]}" if ids[bad[i]] == prev[bad[i]]
        else f"subject id {ids[bad[i]]} follows {prev[bad[i]]}; ids must strictly increase"))
    if split is not None:
        negative = ids < 0
        wrong = (split_codes(np.where(negative, 0, ids)) != SPLIT_CODES[split]) | negative
        bad = np.flatnonzero(wrong)
        names = {code: name for name, code in SPLIT_CODES.items()}
        found.add(SPLIT, bad, lambda i: (
            "negative subject id: split assignment needs ids >= 0" if ids[bad[i]] < 0
            else f"in {split!r} but split_codes assigns it to "
                 f"{names[int(split_codes(ids[bad[i]:bad[i] + 1])[0])]!r}"))


def _label(column: str) -> str:
    """How a message names a time: diagnoses' plain "week", others prefixed by their column."""
    unit = "day" if column in _DAY_COLUMNS else "week"
    return unit if column == S.WEEKS else f"{column}: {unit}"


def check_table(
    table: pa.Table | pa.RecordBatch,
    *,
    n_weeks: int,
    file: str,
    first_row: int = 0,
    split: str | None = None,
    max_violations: int = 20,
    previous_subject_id: int | None = None,
    vocab: Mapping[str, int] | None = None,
    modalities: Collection[str] | None = None,
    columns: Collection[str] | None = None,
) -> list[Violation]:
    """All row-level rules on one batch of patients (``ROW_SCHEMA`` rows).

    ``first_row`` is the row of the batch's first patient within ``file`` (so violations name
    the file's row); ``split`` enables the ``split`` rule; ``previous_subject_id`` is the id
    just before this batch in the same file, so ordering is checked across batches. ``vocab``
    is ``dataset.json``'s vocabulary sizes (missing ones: the platform's); ``modalities``
    enables ``unlisted_modality``. ``columns`` says what a projected read read (it must include
    ``ROW_COLUMNS``; :func:`columns_to_read`): the batch must hold exactly those, and rules on
    other columns are skipped; None means the whole row. Returns at most ``max_violations``
    violations, grouped by rule in docstring order.
    """
    if columns is not None and (missing := [c for c in ROW_COLUMNS if c not in columns]):
        raise ValueError(f"check_table: a projected read must include {missing} (ROW_COLUMNS)")
    out = schema_violations(table.schema, file, columns=columns)
    if out:
        return out[:max_violations]
    n_rows = table.num_rows
    cols = {name: _column(table, name) for name in table.column_names}
    if (out := _null_violations(cols, file, first_row)) or n_rows == 0:
        return out[:max_violations]

    ids = cols[S.SUBJECT_ID].to_numpy()
    found = _Collector(file, first_row, ids, max_violations)
    _check_ids(found, ids, previous_subject_id, split)
    sex = cols[S.SEX].to_numpy()
    bad = np.flatnonzero((sex != -1) & (sex != 1))
    found.add(SEX, bad, lambda i: f"sex {sex[bad[i]]}, expected -1 (male) or 1 (female)")

    # Lengths: every list column's offsets, compared within its modality.
    n_events = cols[S.N_EVENTS].to_numpy().astype(np.int64)
    flat = {name: _flat(arr) for name, arr in cols.items() if pa.types.is_list(arr.type)}
    lens = {name: np.diff(off) for name, (off, _) in flat.items()}
    mismatch = np.zeros(n_rows, dtype=bool)
    lengths: dict[str, np.ndarray] = {}  # modality -> items per row (its first column's)
    for modality, names in S.MODALITY_COLUMNS.items():
        present = [c for c in names if c in lens]
        if modality == "diagnoses":
            reference = n_events
        elif present:
            reference = lens[present[0]]
        else:
            continue
        lengths[modality] = reference
        bad_rows = np.zeros(n_rows, dtype=bool)
        for c in present:
            bad_rows |= lens[c] != reference
        mismatch |= bad_rows
        bad = np.flatnonzero(bad_rows)
        found.add(LIST_LENGTHS, bad, lambda i, m=modality, p=present, r=reference, b=bad: (
            (f"{m}: n_events {r[b[i]]} but " if m == "diagnoses" else f"{m}: ")
            + ", ".join(f"{lens[c][b[i]]} {c}" for c in p)))
    if modalities is not None:
        for modality in S.MODALITIES:
            if modality in modalities or modality not in lengths:
                continue
            holding = lengths[modality] > 0
            for c in S.MODALITY_COLUMNS[modality]:
                if c in lens:
                    holding |= lens[c] > 0
            bad = np.flatnonzero(holding)[:1]
            count = int(holding.sum())
            found.add(UNLISTED_MODALITY, bad, lambda i, m=modality, n=count: (
                f"{m} hold items in {n} row(s) of this batch, but dataset.json's modalities "
                f"{list(modalities)} leave out {m!r}"))
    bad = np.flatnonzero(n_events == 0)
    found.add(EMPTY_SENTENCE, bad, lambda i: "patient has no events (n_events == 0)")
    bad = np.flatnonzero(n_events > S.MAX_EVENTS)
    found.add(OVER_LONG, bad, lambda i: f"{n_events[bad[i]]} events, more than MAX_EVENTS = {S.MAX_EVENTS}")

    # Enrollment window, per row.
    start = cols[S.ENROLL_START].to_numpy().astype(np.int64)
    end = cols[S.ENROLL_END].to_numpy().astype(np.int64)
    bad_window = (start > end) | (start < 0) | (end >= n_weeks)
    bad = np.flatnonzero(bad_window)
    found.add(ENROLLMENT, bad, lambda i: (
        f"enrollment weeks [{start[bad[i]]}, {end[bad[i]]}] "
        + ("start after end" if start[bad[i]] > end[bad[i]] else f"outside [0, {n_weeks})")))

    if mismatch.any() or found.full:
        return found.found  # lists disagree: per-event rules would compare unrelated events
    _check_items(found, cols, flat, n_weeks=n_weeks, start=start, end=end, bad_window=bad_window,
                 sizes=vocabulary_sizes() | dict(vocab or {}))
    return found.found


def _in_range(v: np.ndarray, lo: float, hi: float) -> np.ndarray | None:
    """Mask of ``lo <= v < hi``, or None when every value is (two passes in the common case)."""
    if v.size == 0 or (v.min() >= lo and v.max() < hi):
        return None
    return (v >= lo) & (v < hi)


def _masked(bad: np.ndarray, *oks: np.ndarray | None) -> np.ndarray:
    """``bad`` restricted to items whose other checks passed (``None``: all passed)."""
    if bad.any():
        for ok in oks:
            if ok is not None:
                bad &= ok
    return bad


def _age_group(week: np.ndarray, birth: np.ndarray) -> np.ndarray:
    """``vocab.age_group_at`` in exact integer arithmetic, five times faster: a year is
    1461 / 4 days, so the group is ``floor(7 * 4 * weeks / (1461 * AGE_GROUP_YEARS))``; the
    float version agrees wherever a group is in range (no week lands on a group boundary
    before 140 years; tests/test_validate.py checks it)."""
    weeks = week.astype(np.int64) - birth
    return weeks * (S.DAYS_PER_WEEK * 4) // (1461 * AGE_GROUP_YEARS)


def _check_items(found: _Collector, cols: Mapping[str, pa.Array],
                 flat: Mapping[str, tuple[np.ndarray, pa.Array]], *, n_weeks: int,
                 start: np.ndarray, end: np.ndarray, bad_window: np.ndarray,
                 sizes: Mapping[str, int]) -> None:
    """The per-item rules of :func:`check_table` on lists known to be parallel. Valid data
    takes the fast paths (global min/max, a sorted list's first and last items, only the
    items linked to a stay); the item-level masks are built only where something fails."""
    values = {name: arr.to_numpy() for name, (_, arr) in flat.items()}
    offsets = {name: off for name, (off, _) in flat.items()}
    rows: dict[str, np.ndarray] = {}
    row_ok = ~bad_window

    def row_of(name: str) -> np.ndarray:
        """The row of every item of column ``name`` (once per modality: its lists are parallel)."""
        modality = _MODALITY_OF[name]
        if modality not in rows:
            rows[modality] = np.repeat(np.arange(len(offsets[name]) - 1), np.diff(offsets[name]))
        return rows[modality]

    def add(rule: str, name: str, bad: np.ndarray, describe: Callable[[int], str]) -> None:
        found.add_items(rule, bad, offsets[name], describe)

    if S.CONDITIONS in values:
        cond = values[S.CONDITIONS]
        if (ok := _in_range(cond, 0, N_CONDITIONS)) is not None:
            add(CONDITION_RANGE, S.CONDITIONS, ~ok, lambda k: f"condition id {cond[k]} outside [0, {N_CONDITIONS})")
    age_ok = None
    if S.AGE_GROUPS in values:
        age = values[S.AGE_GROUPS]
        if (age_ok := _in_range(age, 0, N_AGE_GROUPS)) is not None:
            add(AGE_GROUP_RANGE, S.AGE_GROUPS, ~age_ok,
                lambda k: f"age group {age[k]} outside [0, {N_AGE_GROUPS})")
    id_ok: dict[str, np.ndarray | None] = {}
    for name, vocabulary in _ID_VOCABULARY.items():
        if name in values:
            v, size = values[name], sizes[vocabulary]
            id_ok[name] = ok = _in_range(v, 0, size)
            if ok is not None:
                add(VOCAB_RANGE, name, ~ok, lambda k, v=v, size=size, c=vocabulary: (
                    f"{c} id {v[k]} outside [0, {size})"))

    # Times: range, order, enrollment.
    time_ok: dict[str, np.ndarray | None] = {}
    for name in _WEEK_COLUMNS + _DAY_COLUMNS:
        if name in values:
            v = values[name]
            limit = n_weeks * (S.DAYS_PER_WEEK if name in _DAY_COLUMNS else 1)
            time_ok[name] = ok = _in_range(v, 0, limit)
            if ok is not None:
                add(WEEK_RANGE, name, ~ok, lambda k, v=v, name=name, limit=limit: (
                    f"{_label(name)} {v[k]} outside [0, {limit})"))
    in_order: set[str] = set()  # sorted columns whose every item is in range and in order
    for name in _SORTED_COLUMNS:
        if name not in values:
            continue
        v, ok = values[name], time_ok[name]
        backwards = np.zeros(v.size, dtype=bool)
        if v.size > 1:
            backwards[1:] = v[1:] < v[:-1]
            first = offsets[name][:-1]
            backwards[first[first < v.size]] = False  # a patient's first item follows nothing
            if ok is not None and backwards.any():
                backwards[1:] &= ok[1:] & ok[:-1]
        if ok is None and not backwards.any():
            in_order.add(name)
        add(SORTED_TIMES, name, backwards, lambda k, v=v, name=name: (
            f"{_label(name)} {v[k]} follows week {v[k - 1]}"))
    med_start, med_end = S.MEDICATION_START_WEEKS, S.MEDICATION_END_WEEKS
    if med_start in values and med_end in values:
        s, e = values[med_start], values[med_end]
        add(MEDICATION_PERIOD, med_start, _masked(e < s, time_ok[med_start], time_ok[med_end]),
            lambda k: f"medication ends at week {e[k]}, before its start at week {s[k]}")
    if S.WEEKS in values and S.AGE_GROUPS in values:
        week, age = values[S.WEEKS], values[S.AGE_GROUPS]
        birth = np.repeat(cols[S.BIRTH_WEEK].to_numpy().astype(np.int64), np.diff(offsets[S.WEEKS]))
        expected = _age_group(week, birth)
        add(AGE_CONSISTENCY, S.WEEKS, _masked(expected != age, time_ok[S.WEEKS], age_ok), lambda k: (
            f"event at week {week[k]} precedes birth at week {birth[k]}" if week[k] < birth[k]
            else f"age group {age[k]} at week {week[k]}, but birth at week {birth[k]} gives "
                 f"{expected[k]} (age {(week[k] - birth[k]) / WEEKS_PER_YEAR:.2f} years)"))
    for name in _WEEK_COLUMNS + _DAY_COLUMNS:
        if name not in values:
            continue
        v, off = values[name], offsets[name]
        scale = S.DAYS_PER_WEEK if name in _DAY_COLUMNS else 1
        lo_row, hi_row = start * scale, end * scale + (scale - 1)
        if name in in_order:  # sorted and in range: the first and last items bound the rest
            nonempty = np.flatnonzero(off[1:] > off[:-1])
            first, last = v[off[nonempty]], v[off[nonempty + 1] - 1]
            if not ((first < lo_row[nonempty]) | (last > hi_row[nonempty])).any():
                continue
        row = row_of(name)
        lo, hi = lo_row[row], hi_row[row]
        # A medication's end only bounds from above: its start is checked, end >= start too.
        outside = (v > hi) if name == med_end else (v < lo) | (v > hi)
        add(ENROLLMENT, name, _masked(outside, time_ok[name], row_ok[row]),
            lambda k, v=v, name=name, lo=lo, hi=hi, scale=scale: (
                f"{'event at ' if name == S.WEEKS else ''}{_label(name)} {v[k]} outside enrollment "
                + (f"[{lo[k]}, {hi[k]}]" if scale == 1
                   else f"in days [{lo[k]}, {hi[k]}] (weeks [{lo[k] // scale}, {hi[k] // scale}])")))

    # Admissions (a few per patient: plain masks).
    stay_ok = None
    if S.ADMIT_DAYS in values and S.DISCHARGE_DAYS in values:
        adm_off = offsets[S.ADMIT_DAYS]
        a, d = values[S.ADMIT_DAYS].astype(np.int64), values[S.DISCHARGE_DAYS].astype(np.int64)
        both = np.ones(a.size, dtype=bool)
        for ok in (time_ok[S.ADMIT_DAYS], time_ok[S.DISCHARGE_DAYS]):
            if ok is not None:
                both &= ok
        stay_ok = both & (d >= a)
        add(ADMISSION_ORDER, S.ADMIT_DAYS, both & (d < a),
            lambda k: f"stay {k - adm_off[row_of(S.ADMIT_DAYS)[k]]}: discharge day "
                      f"{d[k]} before admit day {a[k]}")
        overlap = np.zeros(a.size, dtype=bool)
        if a.size > 1:
            overlap[1:] = (a[1:] < d[:-1]) & both[1:] & both[:-1]
            first = adm_off[:-1]
            overlap[first[first < a.size]] = False
        add(ADMISSION_ORDER, S.ADMIT_DAYS, overlap,
            lambda k: f"admission at day {a[k]} before the previous stay's discharge at day {d[k - 1]}")
        if S.LENGTH_OF_STAY in values:
            los = values[S.LENGTH_OF_STAY].astype(np.float64)
            own = np.isfinite(los) & (los >= 0)
            far = own & stay_ok & (np.abs(los - (d - a)) > 1)
            add(LENGTH_OF_STAY, S.ADMIT_DAYS, ~own | far, lambda k: (
                f"length_of_stay {los[k]} days, not a finite number >= 0" if not own[k]
                else f"length_of_stay {los[k]:g} days, but discharge - admit is {d[k] - a[k]} days"))

    # Stays: the link, then the linked event inside its stay; only linked items are visited.
    if S.ADMIT_DAYS in values:
        adm_off = offsets[S.ADMIT_DAYS]
        n_adm = np.diff(adm_off)
        for name, week_name in _STAY_WEEK.items():
            if name not in values or values[name].size == 0:
                continue
            s, off = values[name], offsets[name]
            linked = np.flatnonzero(s != S.NO_STAY)
            # Few links: binary-search their rows; many: one pass over the modality is cheaper.
            row = row_of(name)[linked] if 8 * linked.size > s.size else \
                np.searchsorted(off, linked, side="right") - 1
            link = s[linked].astype(np.int64)
            bad = (link < 0) | (link >= n_adm[row])
            found.add_at(STAY_LINK, linked[bad], off, lambda k, s=s, off=off, name=name: (
                f"{name}: stay {s[k]}, but the patient has "
                f"{n_adm[np.searchsorted(off, k, side='right') - 1]} admission(s) "
                f"(valid: {S.NO_STAY} for none, or an index into the patient's admissions)"))
            if stay_ok is None or week_name not in values:
                continue
            keep = ~bad
            if (ok := time_ok[week_name]) is not None:
                keep &= ok[linked]
            linked, stay = linked[keep], (adm_off[row] + link)[keep]
            keep = stay_ok[stay]
            linked, stay = linked[keep], stay[keep]
            w = values[week_name][linked]
            outside = (w < a[stay] // S.DAYS_PER_WEEK) | (w > d[stay] // S.DAYS_PER_WEEK)
            where = dict(zip(linked[outside].tolist(), stay[outside].tolist(), strict=True))
            found.add_at(STAY_WINDOW, linked[outside], off, lambda k, s=s, name=name, week_name=week_name, where=where: (
                f"{name} links the event at week {values[week_name][k]} ({week_name}) to stay "
                f"{s[k]}, which spans days {a[where[k]]}..{d[where[k]]} (weeks "
                f"[{a[where[k]] // S.DAYS_PER_WEEK}, {d[where[k]] // S.DAYS_PER_WEEK}])"))

    # Labs: values plausible in the lab's unit.
    if S.LABS in values and S.LAB_VALUES in values:
        lab, value = values[S.LABS].astype(np.int64), values[S.LAB_VALUES]
        known = _in_range(lab, 0, min(sizes[S.LAB], len(LAB_VOCABULARY)))
        which = lab if known is None else np.where(known, lab, 0)
        low, high = _LAB_LOW[which], _LAB_HIGH[which]
        with np.errstate(invalid="ignore"):
            implausible = _masked(~((value >= low) & (value <= high)), known)  # NaN fails both
        add(LAB_VALUE_RANGE, S.LABS, implausible, lambda k: (
            f"{LAB_VOCABULARY[lab[k]].short} (lab {lab[k]}) value {value[k]:g} outside its "
            f"plausible [{low[k]:g}, {high[k]:g}] {LAB_VOCABULARY[lab[k]].unit}"))


def check_trial_table(
    table: pa.Table | pa.RecordBatch,
    *,
    file: str,
    first_row: int = 0,
    split: str | None = None,
    baseline_width: int | None = None,
    vocab: Mapping[str, int] | None = None,
    max_violations: int = 20,
    previous_subject_id: int | None = None,
) -> list[Violation]:
    """All row-level rules on one batch of trial participants (``TRIAL_SCHEMA`` rows).

    ``baseline_width`` is ``len(trial["baseline_features"])`` (None: only a fixed width within
    the batch is checked); ``vocab`` sizes the trial vocabularies (missing: the simulated
    trial's). Arguments otherwise as for :func:`check_table`.
    """
    out = schema_violations(table.schema, file, S.TRIAL_SCHEMA)
    if out:
        return out[:max_violations]
    n_rows = table.num_rows
    cols = {name: _column(table, name) for name in S.TRIAL_SCHEMA.names}
    if (out := _null_violations(cols, file, first_row)) or n_rows == 0:
        return out[:max_violations]
    ids = cols[S.SUBJECT_ID].to_numpy()
    found = _Collector(file, first_row, ids, max_violations)
    _check_ids(found, ids, previous_subject_id, split)

    arm = cols[S.ARM].to_numpy()
    bad = np.flatnonzero((arm != 0) & (arm != 1))
    found.add(TRIAL_ARM, bad, lambda i: f"arm {arm[bad[i]]}, expected 0 (control) or 1 (treatment)")
    width = np.diff(_flat(cols[S.BASELINE])[0])
    expected_width = int(width[0]) if baseline_width is None else baseline_width
    bad = np.flatnonzero(width != expected_width)
    found.add(TRIAL_BASELINE, bad, lambda i: (
        f"baseline has {width[bad[i]]} values, expected {expected_width}"
        + (" (one per trial['baseline_features'])" if baseline_width is not None else
           " (the first participant's width)")))

    visit_offsets, visit_days = _flat(cols[S.VISIT_DAYS])
    n_visits = np.diff(visit_offsets)
    per_visit = {name: _flat(cols[name]) for name in _TRIAL_VOCABULARY}
    mismatch = np.zeros(n_rows, dtype=bool)
    for _name, (off, _) in per_visit.items():
        mismatch |= np.diff(off) != n_visits
    bad = np.flatnonzero(mismatch)
    found.add(LIST_LENGTHS, bad, lambda i: f"visits: {n_visits[bad[i]]} visit_days, " + ", ".join(
        f"{np.diff(off)[bad[i]]} {name}" for name, (off, _) in per_visit.items()))

    enroll = cols[S.ENROLL_DAY].to_numpy().astype(np.int64)
    last = cols[S.END_DAY].to_numpy().astype(np.int64)
    bad = np.flatnonzero(enroll > last)
    found.add(TRIAL_VISITS, bad, lambda i: f"enroll_day {enroll[bad[i]]} after end_day {last[bad[i]]}")
    if mismatch.any() or found.full:
        return found.found

    day = visit_days.to_numpy().astype(np.int64)
    row = np.repeat(np.arange(n_rows), n_visits)
    repeated = np.zeros(day.size, dtype=bool)
    if day.size > 1:
        repeated[1:] = day[1:] <= day[:-1]
        first = visit_offsets[:-1]
        repeated[first[first < day.size]] = False
    found.add_items(TRIAL_VISITS, repeated, visit_offsets,
                    lambda k: f"visit day {day[k]} follows visit day {day[k - 1]}; days must strictly increase")
    outside = ((day < enroll[row]) | (day > last[row])) & (enroll <= last)[row]
    found.add_items(TRIAL_VISITS, outside, visit_offsets, lambda k: (
        f"visit day {day[k]} outside the trial enrollment [{enroll[row[k]]}, {last[row[k]]}]"))

    sizes = vocabulary_sizes() | dict(vocab or {})
    for name, vocabulary in _TRIAL_VOCABULARY.items():
        outer, visits = per_visit[name]
        inner, items = _flat(visits)
        v, size = items.to_numpy(), sizes[vocabulary]
        found.add_items(VOCAB_RANGE, (v < 0) | (v >= size), inner[outer],
                        lambda k, v=v, size=size, vocabulary=vocabulary, name=name: (
                            f"{name}: {vocabulary} id {v[k]} outside [0, {size})"))
    return found.found


# ---------------------------------------------------------------------------------------------
# Metadata


def _meta(message: str) -> Violation:
    return Violation(S.DATASET_JSON, None, None, METADATA, message)


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def check_metadata(root: str | Path) -> tuple[S.DatasetMetadata | None, list[Violation]]:
    """``metadata`` rule on ``dataset.json`` alone; the metadata is None when unusable."""
    path = Path(root) / S.DATASET_JSON
    if not path.is_file():
        return None, [_meta(f"missing; is {root} a mirror dataset directory?")]
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, [_meta(f"not readable JSON: {e}")]
    if not isinstance(raw, dict):
        return None, [_meta(f"expected a JSON object, got {type(raw).__name__}")]
    if raw.get("schema_version") == 1:
        return None, [_meta(S.VERSION_1_HINT)]
    if raw.get("schema_version") != S.SCHEMA_VERSION:
        return None, [_meta(f"schema_version {raw.get('schema_version')!r}, "
                            f"this validator needs {S.SCHEMA_VERSION}")]
    known = set(S.DatasetMetadata.__dataclass_fields__)
    out = []
    if unknown := sorted(set(raw) - known):
        out.append(_meta(f"unknown keys {unknown}; valid keys are {sorted(known)}"))
    if missing := [k for k in _REQUIRED_METADATA if k not in raw]:
        out.append(_meta(f"missing required fields {missing}"))
    if out:
        return None, out

    if not isinstance(raw["name"], str) or not raw["name"]:
        out.append(_meta(f"name must be a non-empty string, got {raw['name']!r}"))
    try:
        date.fromisoformat(raw["origin_date"])
    except (TypeError, ValueError):
        out.append(_meta(f"origin_date must be an ISO date, got {raw['origin_date']!r}"))
    n_weeks = raw["n_weeks"]
    if not _is_count(n_weeks) or n_weeks < 1:
        out.append(_meta(f"n_weeks must be an integer >= 1, got {n_weeks!r}"))
        n_weeks = None
    patients = raw["patients"]
    if not isinstance(patients, dict) or set(patients) != set(S.SPLITS) or not all(
        _is_count(v) for v in patients.values()
    ):
        out.append(_meta(f"patients must map each of {list(S.SPLITS)} to a count, got {patients!r}"))
        patients = None
    vocab = raw["vocab"]
    expected_vocab = {"diag_age": DIAG_AGE_VOCAB_SIZE}
    if n_weeks is not None:
        expected_vocab["week"] = N_SPECIAL + n_weeks
    if not isinstance(vocab, dict) or any(vocab.get(k) != v for k, v in expected_vocab.items()):
        out.append(_meta(f"vocab must include {expected_vocab}, got {vocab!r}"))
        vocab = {}
    record_sizes = vocabulary_sizes(trial=False)  # ids are the contract's: sizes are fixed
    if wrong := {k: vocab[k] for k, v in record_sizes.items() if k in vocab and vocab[k] != v}:
        out.append(_meta(f"vocab sizes {wrong} differ from the platform's vocabularies "
                         f"{ {k: record_sizes[k] for k in wrong} }"))
    trial_vocab = (S.TRIAL_TREATMENT, S.TRIAL_MEDICATION, S.ADVERSE_EVENT)
    if wrong := {k: vocab[k] for k in trial_vocab if k in vocab and not (_is_count(vocab[k]) and vocab[k])}:
        out.append(_meta(f"vocab sizes {wrong} must be integers >= 1"))
    modalities = raw.get("modalities", ["diagnoses"])
    if not isinstance(modalities, list) or not set(modalities) <= set(S.MODALITIES) \
            or len(set(modalities)) != len(modalities):
        out.append(_meta(f"modalities must list each modality at most once, from "
                         f"{list(S.MODALITIES)}; got {modalities!r}"))
    out += _trial_metadata_violations(root, raw.get("trial", {}), vocab)
    for key, kind in (("provenance", dict), ("extra", dict), ("created_at", str)):
        if key in raw and not isinstance(raw[key], kind):
            out.append(_meta(f"{key} must be a {kind.__name__}, got {raw[key]!r}"))
    hist = raw["length_histogram"]
    if not isinstance(hist, dict) or set(hist) != set(S.SPLITS):
        out.append(_meta(f"length_histogram must have one histogram per split {list(S.SPLITS)}"))
    else:
        for split in S.SPLITS:
            h = hist[split]
            if not isinstance(h, dict) or not all(
                isinstance(k, str) and k.isascii() and k.isdigit() and _is_count(v) for k, v in h.items()
            ):
                out.append(_meta(f"length_histogram[{split!r}] must map str(n_events) to counts"))
            elif patients is not None and sum(h.values()) != patients[split]:
                out.append(_meta(f"length_histogram[{split!r}] sums to {sum(h.values())}, "
                                 f"but patients[{split!r}] is {patients[split]}"))
    if out:
        return None, out
    return S.DatasetMetadata(**raw), []


def has_trial_part(root: str | Path) -> bool:
    """Whether ``root`` has a ``trial/`` directory (the optional trial part)."""
    return (Path(root) / S.TRIAL_DIR).is_dir()


def _trial_metadata_violations(root: str | Path, trial: object, vocab: dict) -> list[Violation]:
    """``metadata`` rule on ``dataset.json``'s ``trial``: a dict; when there is a trial part
    (or the dict says so), ``participants`` per split, ``baseline_features`` and the trial
    vocabulary sizes."""
    if not isinstance(trial, dict):
        return [_meta(f"trial must be a dict, got {trial!r}")]
    if not trial and not has_trial_part(root):
        return []
    out = []
    if not trial:
        return [_meta(f"{S.TRIAL_DIR}/ holds a trial part, but dataset.json's trial is empty; it "
                      f"needs {TRIAL_PARTICIPANTS!r} per split and {TRIAL_BASELINE_FEATURES!r}")]
    participants = trial.get(TRIAL_PARTICIPANTS)
    if not isinstance(participants, dict) or set(participants) != set(S.SPLITS) or not all(
        _is_count(v) for v in participants.values()
    ):
        out.append(_meta(f"trial[{TRIAL_PARTICIPANTS!r}] must map each of {list(S.SPLITS)} to a "
                         f"count, got {participants!r}"))
    features = trial.get(TRIAL_BASELINE_FEATURES)
    if not isinstance(features, list) or not all(isinstance(f, str) and f for f in features) \
            or len(set(features)) != len(features):
        out.append(_meta(f"trial[{TRIAL_BASELINE_FEATURES!r}] must list unique, non-empty feature "
                         f"names, got {features!r}"))
    if missing := [k for k in (S.TRIAL_TREATMENT, S.TRIAL_MEDICATION, S.ADVERSE_EVENT) if k not in vocab]:
        out.append(_meta(f"a trial part needs the trial vocabulary sizes in vocab: missing {missing}"))
    return out


def check_codes(root: str | Path, sizes: dict[str, int] | None = None) -> list[Violation]:
    """``codes`` rule on ``metadata/codes.parquet``; ``sizes`` are ``dataset.json``'s
    vocabulary sizes, when known."""
    sizes = {k: v for k, v in (sizes or {}).items() if k in S.VOCABULARIES}
    file = S.CODES_PARQUET

    def bad(message: str) -> list[Violation]:
        return [Violation(file, None, None, CODES, message)]

    path = Path(root) / file
    if not path.is_file():
        return bad("missing")
    try:
        codes = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        return bad(f"not readable Parquet: {e}")
    got = [(f.name, f.type) for f in codes.schema]
    want = [(f.name, f.type) for f in S.CODES_SCHEMA]
    if got != want:
        return bad(f"columns {got}, expected {want}")
    if broken := encoding_violations(codes, file):
        return broken
    for name in codes.column_names:
        if not S.CODES_SCHEMA.field(name).nullable and codes.column(name).null_count:
            return bad(f"null values in column {name!r}")
    out = []
    modality = np.asarray(codes.column("modality").to_pylist(), dtype=object)
    if unknown := sorted(set(modality) - set(S.VOCABULARIES)):
        out += bad(f"unknown modalities {unknown}; expected some of {list(S.VOCABULARIES)}")
    ids_all = codes.column("id").to_numpy()
    code_all = np.asarray(codes.column("code").to_pylist(), dtype=object)
    for name in S.VOCABULARIES:
        rows = modality == name
        ids = ids_all[rows]
        size = N_CONDITIONS if name == S.CONDITION else ids.size
        unique = np.unique(ids)
        if name in sizes and sizes[name] != ids.size:
            out += bad(f"{ids.size} {name} rows, but dataset.json's vocab says {sizes[name]}")
        if ids.size != size or unique.size != size or (size and (unique[0] != 0 or unique[-1] != size - 1)):
            dupes = sorted(k for k, n in Counter(ids.tolist()).items() if n > 1)[:5]
            out += bad(f"{ids.size} {name} rows with {unique.size} unique ids "
                       f"(range {ids.min() if ids.size else None}..{ids.max() if ids.size else None}, "
                       f"duplicates {dupes}); expected exactly ids 0..{size - 1} once each")
        code = code_all[rows].tolist()
        if len(set(code)) != len(code) or not all(code):
            out += bad(f"{name} codes must be unique and non-empty")
    return out


def encoding_violations(table: pa.Table, file: str, limit: int = 5) -> list[Violation]:
    """``encoding`` rule: string columns hold valid UTF-8 (Arrow trusts the bytes it reads
    until ``validate(full=True)``); each bad value is reported with its row and column."""
    try:
        table.validate(full=True)
        return []
    except pa.ArrowInvalid:
        pass
    out = []
    for name in table.column_names:
        if not pa.types.is_string(table.schema.field(name).type):
            continue
        raw = _column(table, name).view(pa.binary()).to_pylist()
        for row, value in enumerate(raw):
            if value is None:
                continue
            try:
                value.decode("utf-8")
            except UnicodeDecodeError as err:
                out.append(Violation(file, row, None, ENCODING,
                                     f"column {name!r} is not valid UTF-8: {value!r} ({err.reason} at byte {err.start})"))
                if len(out) >= limit:
                    return out
    return out


# ---------------------------------------------------------------------------------------------
# Files and whole datasets


@dataclass
class FileResult:
    """What checking one shard found; small, so Ray tasks can return it."""

    file: str
    rows: int = 0
    first_subject: int | None = None
    last_subject: int | None = None
    length_counts: dict[int, int] = field(default_factory=dict)  # n_events -> patients
    longer_than_max_words: int = 0
    violations: list[Violation] = field(default_factory=list)
    complete: bool = True  # False: unreadable, wrong schema, or stopped at the violation cap


def check_file(root: str | Path, file: str, *, n_weeks: int, split: str | None,
               max_violations: int = 100, batch_rows: int = BATCH_ROWS,
               vocab: Mapping[str, int] | None = None, modalities: Collection[str] | None = None,
               trial: bool = False, baseline_width: int | None = None) -> FileResult:
    """All row rules on one shard (``file`` relative to ``root``), one batch at a time.
    ``trial``: a trial part shard (``TRIAL_SCHEMA``, :func:`check_trial_table`)."""
    result = FileResult(file)
    try:
        pf = pq.ParquetFile(Path(root) / file)
    except (pa.ArrowException, OSError) as e:
        result.violations.append(Violation(file, None, None, UNREADABLE, f"not a Parquet file: {e}"))
        result.complete = False
        return result
    with pf:
        expected = S.TRIAL_SCHEMA if trial else S.ROW_SCHEMA
        if problems := schema_violations(pf.schema_arrow, file, expected):
            result.violations += problems[:max_violations]
            result.complete = False
            return result
        counts: Counter[int] = Counter()
        try:
            for batch in pf.iter_batches(batch_size=batch_rows):
                common = dict(file=file, first_row=result.rows, split=split, vocab=vocab,
                              max_violations=max_violations - len(result.violations),
                              previous_subject_id=result.last_subject)
                if trial:
                    found = check_trial_table(batch, baseline_width=baseline_width, **common)
                else:
                    found = check_table(batch, n_weeks=n_weeks, modalities=modalities, **common)
                result.violations += found
                if any(v.rule == SCHEMA for v in found):  # nulls: nothing below is well defined
                    result.complete = False
                    break
                if batch.num_rows:
                    ids = batch.column(S.SUBJECT_ID)
                    if result.first_subject is None:
                        result.first_subject = ids[0].as_py()
                    result.last_subject = ids[-1].as_py()
                    if not trial:
                        n_events = batch.column(S.N_EVENTS).to_numpy()
                        values, n = np.unique(n_events, return_counts=True)
                        counts.update(dict(zip(values.tolist(), n.tolist(), strict=True)))
                        result.longer_than_max_words += int((n_events > S.MAX_WORDS).sum())
                result.rows += batch.num_rows
                if len(result.violations) >= max_violations:
                    result.complete = False
                    break
        except (pa.ArrowException, OSError) as e:
            result.violations.append(Violation(file, result.rows, None, UNREADABLE,
                                               f"cannot decode rows from here on: {e}"))
            result.complete = False
    result.length_counts = dict(counts)
    return result


@dataclass
class SplitReport:
    patients: int = 0  # dataset.json (trial participants for a trial split)
    files: int = 0
    rows_checked: int = 0
    longer_than_max_words: int = 0  # valid, but the training filter drops them (> MAX_WORDS)
    violations: int = 0


@dataclass
class ValidationReport:
    root: str
    splits: dict[str, SplitReport] = field(default_factory=lambda: {s: SplitReport() for s in S.SPLITS})
    violations: list[Violation] = field(default_factory=list)
    truncated: bool = False  # stopped at max_violations: there may be more
    # The trial part's splits (participants), when the dataset has one.
    trial_splits: dict[str, SplitReport] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    def raise_if_invalid(self) -> None:
        if not self.ok:
            raise DatasetValidationError(self.violations, truncated=self.truncated)

    def summary(self) -> str:
        """Human-readable table of counts per split (the CLI prints it)."""
        n = len(self.violations)
        status = "OK" if self.ok else f"INVALID: {n}{'+' if self.truncated else ''} violation(s)"
        lines = [f"dataset {self.root}: {status}",
                 f"{'split':<10}{'files':>7}{'patients':>11}{'rows checked':>14}"
                 f"{f'> {S.MAX_WORDS} words':>15}{'violations':>12}"]
        for name, s in self.splits.items():
            lines.append(f"{name:<10}{s.files:>7}{s.patients:>11}{s.rows_checked:>14}"
                         f"{s.longer_than_max_words:>15}{s.violations:>12}")
        if self.trial_splits:
            lines.append(f"{'trial':<10}{'files':>7}{'participants':>13}{'rows checked':>14}"
                         f"{'violations':>12}")
            for name, s in self.trial_splits.items():
                lines.append(f"{name:<10}{s.files:>7}{s.patients:>13}{s.rows_checked:>14}{s.violations:>12}")
        other = sum(v.file.startswith(S.METADATA_DIR) for v in self.violations)
        if other:
            lines.append(f"metadata and codes: {other} violation(s)")
        return "\n".join(lines)


def validate_dataset(
    root: str | Path, *, max_violations: int = 100, parallel: bool = False
) -> ValidationReport:
    """Check every rule on a dataset directory in bounded memory (one batch per file at a time).

    Stops after ``max_violations`` (``report.truncated``). ``parallel=True`` checks files as
    Ray tasks, connecting with ``ray.init()`` unless Ray is already initialised; the report is
    the same, except that every file is checked before the cap is applied.
    """
    root = Path(root)
    report = ValidationReport(str(root))
    meta, problems = check_metadata(root)
    report.violations += problems + check_codes(root, meta.vocab if meta else None)
    if meta is None:
        return report  # no n_weeks and no split counts: nothing to check the rows against
    trial = bool(meta.trial) or has_trial_part(root)
    for part in (S.DATA_DIR, S.TRIAL_DIR) if trial else (S.DATA_DIR,):
        unknown = sorted(p.name for p in (root / part).glob("*") if p.name not in S.SPLITS)
        if unknown:
            report.violations.append(_meta(f"unknown split directories {unknown} under "
                                           f"{part}/; splits are {list(S.SPLITS)}"))

    # (is trial, split, file), data first.
    jobs = [(False, s, p.relative_to(root).as_posix()) for s in S.SPLITS for p in S.split_files(root, s)]
    if trial:
        jobs += [(True, s, p.relative_to(root).as_posix()) for s in S.SPLITS
                 for p in S.trial_split_files(root, s)]
    # Imported datasets keep their source's splits: the id rule of splits.py does not apply.
    assigned = meta.provenance.get("splits") != "source"
    options = dict(n_weeks=meta.n_weeks, vocab=meta.vocab, modalities=meta.modalities,
                   baseline_width=len(meta.trial.get(TRIAL_BASELINE_FEATURES, [])) if trial else None)
    if parallel:
        import ray

        if not ray.is_initialized():
            ray.init()
        remote = ray.remote(check_file)
        refs = [remote.remote(str(root.resolve()), f, split=s if assigned else None, trial=t,
                              max_violations=max_violations,
                              **options) for t, s, f in jobs]
        results = list(zip([(t, s) for t, s, _ in jobs], ray.get(refs), strict=True))
    else:
        results = []
        budget = max_violations - len(report.violations)
        for t, split, f in jobs:
            if budget <= 0:
                break
            result = check_file(root, f, split=split if assigned else None, trial=t,
                                max_violations=budget, **options)
            budget -= len(result.violations)
            results.append(((t, split), result))

    for t in (False, True) if trial else (False,):
        for split in S.SPLITS:
            files = [r for key, r in results if key == (t, split)]
            expected = sum((jt, js) == (t, split) for jt, js, _ in jobs)
            complete = len(files) == expected and all(r.complete for r in files)
            _merge_split(report, meta, split, files, complete=complete, trial=t)
    report.truncated = len(report.violations) >= max_violations
    report.violations = report.violations[:max_violations]
    return report


def _merge_split(report: ValidationReport, meta: S.DatasetMetadata, split: str,
                 files: list[FileResult], *, complete: bool, trial: bool = False) -> None:
    """Add one split's file results to ``report``: order across files, counts vs metadata."""
    if trial:
        summary = report.trial_splits.setdefault(split, SplitReport())
        declared_rows = meta.trial.get(TRIAL_PARTICIPANTS, {}).get(split, 0)
        summary.files = len(S.trial_split_files(report.root, split))
        part = S.TRIAL_DIR
    else:
        summary = report.splits[split]
        declared_rows = meta.patients[split]
        summary.files = len(S.split_files(report.root, split))
        part = S.DATA_DIR
    summary.patients = declared_rows
    counts: Counter[int] = Counter()
    previous: FileResult | None = None
    for r in files:
        summary.rows_checked += r.rows
        summary.longer_than_max_words += r.longer_than_max_words
        counts.update(r.length_counts)
        found = list(r.violations)
        if previous is not None and r.first_subject is not None \
                and r.first_subject <= previous.last_subject:
            found.insert(0, Violation(
                r.file, 0, r.first_subject, SUBJECT_ORDER,
                f"subject id {r.first_subject} follows {previous.last_subject}, the last in "
                f"{previous.file}; ids must strictly increase across a split's files"))
        if r.last_subject is not None:
            previous = r
        summary.violations += len(found)
        report.violations += found
    if not complete:
        return  # not every row was seen: the counts cannot be compared
    if summary.rows_checked != declared_rows:
        key = f"trial[{TRIAL_PARTICIPANTS!r}]" if trial else "patients"
        report.violations.append(_meta(f"{key}[{split!r}] is {declared_rows}, but "
                                       f"{part}/{split}/ holds {summary.rows_checked} rows"))
    if trial:
        return
    declared = {int(k): v for k, v in meta.length_histogram[split].items() if v}
    if declared != dict(counts):
        diff = sorted(k for k in declared.keys() | counts.keys() if declared.get(k) != counts.get(k))
        shown = ", ".join(f"{k}: {declared.get(k, 0)} vs {counts.get(k, 0)}" for k in diff[:5])
        report.violations.append(_meta(f"length_histogram[{split!r}] disagrees with the data; "
                                       f"n_events: declared vs found patients: {shown}"))
