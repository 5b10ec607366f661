"""Dataset validation: every rule a mirror dataset must satisfy, checked in bounded memory.

Two entry points share one implementation:

* :func:`check_table` checks one in-memory batch of rows. It is pure and vectorised over Arrow
  list offsets and flat numpy values (no Python loop per row or token), so readers call it on
  every batch on the training hot path and raise :class:`DatasetValidationError` on the first
  violation.
* :func:`validate_dataset` checks a whole dataset directory (``jobs/validate.py``), streaming
  file by file and batch by batch, optionally with one Ray task per file.

A reader, per batch::

    if found := check_table(batch, n_weeks=meta.n_weeks, file=path, first_row=row, split=split):
        raise DatasetValidationError(found)

Rules (the closed set ``RULES``; every :class:`Violation` names one):

``metadata``         ``metadata/dataset.json`` is readable JSON with ``schema_version`` 2, all
                     required fields of the right types and no unknown ones; vocabulary sizes
                     match; per-split patient counts and length histograms add up and match
                     the rows and ``n_events`` actually found in ``data/<split>/``.
``codes``            ``metadata/codes.parquet`` has ``schema.CODES_SCHEMA``, no nulls in its
                     required columns, known modalities, and per modality ids ``0..size-1``
                     once each with unique, non-empty codes; conditions are exactly the 605;
                     every vocabulary size in ``dataset.json`` matches its rows.
``encoding``         every text value in ``metadata/codes.parquet`` is valid UTF-8 (Parquet
                     readers do not check it unless asked to; exports copy the file as is).
``unreadable``       a shard cannot be opened or decoded as Parquet.
``schema``           shard columns are exactly ``schema.ROW_SCHEMA`` (no missing or unknown
                     columns, exact Arrow dtypes) and hold no nulls, also inside lists.
``subject_order``    subject ids strictly increase within a file and across a split's files in
                     path order; with dense ids this gives global uniqueness in O(1) memory.
``split``            each subject sits in the split ``splits.split_codes`` assigns (which also
                     needs ids >= 0).
``sex``              sex is -1 (male) or 1 (female).
``list_lengths``     ``conditions``, ``age_groups`` and ``weeks`` all have ``n_events`` items.
``empty_sentence``   ``n_events == 0``: a patient without a word cannot be trained on.
``over_long``        ``n_events > schema.MAX_EVENTS``, the hard validity cap. Sentences longer
                     than ``schema.MAX_WORDS`` are valid: the training filter drops and counts
                     them (``ValidationReport`` reports how many).
``condition_range``  condition ids lie in ``[0, vocab.N_CONDITIONS)``.
``age_group_range``  age groups lie in ``[0, vocab.N_AGE_GROUPS)``.
``week_range``       event weeks lie in ``[0, n_weeks)`` (``n_weeks`` from ``dataset.json``).
``sorted_times``     weeks are non-decreasing within a patient.
``age_consistency``  the age group of each event equals ``vocab.age_group_at(week, birth_week)``
                     and no event precedes birth.
``enrollment``       ``enroll_start <= enroll_end``, both within ``[0, n_weeks)``, and every
                     event week inside ``[enroll_start, enroll_end]``.

One root cause gives one rule: the cross-column event rules (``age_consistency``,
``enrollment``) skip events whose week or age group already failed its range rule, and a batch
whose lists disagree in length (``list_lengths``) gets no per-event checks at all.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mirror.data import schema as S
from mirror.data.splits import SPLIT_CODES, split_codes
from mirror.data.vocab import (
    DIAG_AGE_VOCAB_SIZE,
    N_AGE_GROUPS,
    N_CONDITIONS,
    N_SPECIAL,
    WEEKS_PER_YEAR,
    age_group_at,
)

METADATA = "metadata"
CODES = "codes"
UNREADABLE = "unreadable"
SCHEMA = "schema"
SUBJECT_ORDER = "subject_order"
SPLIT = "split"
SEX = "sex"
LIST_LENGTHS = "list_lengths"
EMPTY_SENTENCE = "empty_sentence"
OVER_LONG = "over_long"
CONDITION_RANGE = "condition_range"
AGE_GROUP_RANGE = "age_group_range"
WEEK_RANGE = "week_range"
SORTED_TIMES = "sorted_times"
AGE_CONSISTENCY = "age_consistency"
ENROLLMENT = "enrollment"
ENCODING = "encoding"

RULES = (
    METADATA, CODES, ENCODING, UNREADABLE, SCHEMA, SUBJECT_ORDER, SPLIT, SEX, LIST_LENGTHS,
    EMPTY_SENTENCE, OVER_LONG, CONDITION_RANGE, AGE_GROUP_RANGE, WEEK_RANGE, SORTED_TIMES,
    AGE_CONSISTENCY, ENROLLMENT,
)

BATCH_ROWS = 65_536  # rows decoded at a time by validate_dataset: bounds memory per file
_REQUIRED_METADATA = ("name", "origin_date", "n_weeks", "patients", "vocab", "provenance",
                      "length_histogram", "schema_version")


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
        return pa.types.is_list(actual) and actual.value_type == expected.value_type
    return actual == expected


def _type_name(t: pa.DataType) -> str:
    return f"list<{t.value_type}>" if pa.types.is_list(t) else str(t)


def schema_violations(schema: pa.Schema, file: str) -> list[Violation]:
    """``schema`` rule, column level: missing, unknown or mistyped columns."""
    out = []
    names = set(schema.names)
    for f in S.ROW_SCHEMA:
        if f.name not in names:
            out.append(Violation(file, None, None, SCHEMA, f"missing column {f.name!r} ({_type_name(f.type)})"))
        elif not _same_type(schema.field(f.name).type, f.type):
            got, want = _type_name(schema.field(f.name).type), _type_name(f.type)
            out.append(Violation(file, None, None, SCHEMA, f"column {f.name!r} is {got}, expected {want}"))
    unknown = sorted(names - set(S.ROW_SCHEMA.names))
    if unknown:
        out.append(Violation(file, None, None, SCHEMA,
                             f"unknown columns {unknown}; valid columns are {S.ROW_SCHEMA.names}"))
    return out


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

    def add(self, rule: str, rows: np.ndarray, describe: Callable[[int], str]) -> None:
        """``describe(i)`` is the message for the i-th bad row (only called for reported ones)."""
        for i in range(min(len(rows), self.limit - len(self.found))):
            r = int(rows[i])
            sid = int(self.ids[r])
            self.found.append(Violation(self.file, self.first_row + r, sid, rule, describe(i)))


def _first_per_row(bad_flat: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows holding the flat indices ``bad_flat`` (sorted), and the first bad index per row."""
    rows = np.searchsorted(offsets, bad_flat, side="right") - 1
    rows, first = np.unique(rows, return_index=True)
    return rows, bad_flat[first]


def check_table(
    table: pa.Table | pa.RecordBatch,
    *,
    n_weeks: int,
    file: str,
    first_row: int = 0,
    split: str | None = None,
    max_violations: int = 20,
    previous_subject_id: int | None = None,
) -> list[Violation]:
    """All row-level rules on one batch of patients (``ROW_SCHEMA`` rows).

    ``first_row`` is the row of the batch's first patient within ``file`` (so violations name
    the file's row); ``split`` enables the ``split`` rule; ``previous_subject_id`` is the id
    just before this batch in the same file, so ordering is checked across batches. Returns at
    most ``max_violations`` violations, grouped by rule in docstring order.
    """
    out = schema_violations(table.schema, file)
    if out:
        return out[:max_violations]
    n_rows = table.num_rows
    cols = {name: _column(table, name) for name in S.ROW_SCHEMA.names}
    for name, arr in cols.items():
        if arr.null_count:
            row = int(np.flatnonzero(np.asarray(arr.is_null()))[0])
            out.append(Violation(file, first_row + row, None, SCHEMA,
                                 f"null values in column {name!r} ({arr.null_count} rows)"))
        elif pa.types.is_list(arr.type) and (items := _flat(arr)[1]).null_count:
            offsets = _flat(arr)[0]
            k = int(np.flatnonzero(np.asarray(items.is_null()))[0])
            row = int(np.searchsorted(offsets, k, side="right")) - 1
            out.append(Violation(file, first_row + row, None, SCHEMA,
                                 f"null values inside lists of column {name!r} "
                                 f"({items.null_count} items)"))
    if out or n_rows == 0:
        return out[:max_violations]

    ids = cols[S.SUBJECT_ID].to_numpy()
    found = _Collector(file, first_row, ids, max_violations)

    # subject_order: strictly increasing, also across the batch boundary.
    prev = np.empty_like(ids)
    prev[1:] = ids[:-1]
    prev[0] = ids[0] - 1 if previous_subject_id is None else previous_subject_id
    bad = np.flatnonzero(ids <= prev)
    found.add(SUBJECT_ORDER, bad, lambda i: (
        f"duplicate subject id {ids[bad[i]]}" if ids[bad[i]] == prev[bad[i]]
        else f"subject id {ids[bad[i]]} follows {prev[bad[i]]}; ids must strictly increase"))

    # split: deterministic assignment by id.
    if split is not None:
        negative = ids < 0
        wrong = (split_codes(np.where(negative, 0, ids)) != SPLIT_CODES[split]) | negative
        bad = np.flatnonzero(wrong)
        names = {code: name for name, code in SPLIT_CODES.items()}
        found.add(SPLIT, bad, lambda i: (
            "negative subject id: split assignment needs ids >= 0" if ids[bad[i]] < 0
            else f"in {split!r} but split_codes assigns it to "
                 f"{names[int(split_codes(ids[bad[i]:bad[i] + 1])[0])]!r}"))

    sex = cols[S.SEX].to_numpy()
    bad = np.flatnonzero((sex != -1) & (sex != 1))
    found.add(SEX, bad, lambda i: f"sex {sex[bad[i]]}, expected -1 (male) or 1 (female)")

    # Sentence lengths.
    n_events = cols[S.N_EVENTS].to_numpy().astype(np.int64)
    flat = {name: _flat(cols[name]) for name in S.EVENT_COLUMNS}
    lens = {name: np.diff(off) for name, (off, _) in flat.items()}
    mismatch = np.zeros(n_rows, dtype=bool)
    for name in S.EVENT_COLUMNS:
        mismatch |= lens[name] != n_events
    bad = np.flatnonzero(mismatch)
    found.add(LIST_LENGTHS, bad, lambda i: f"n_events {n_events[bad[i]]} but " + ", ".join(
        f"{lens[c][bad[i]]} {c}" for c in S.EVENT_COLUMNS))
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

    if mismatch.any() or len(found.found) >= max_violations:
        return found.found  # lists disagree: per-event rules would compare unrelated events

    offsets = flat[S.WEEKS][0]
    cond = flat[S.CONDITIONS][1].to_numpy()
    age = flat[S.AGE_GROUPS][1].to_numpy()
    week = flat[S.WEEKS][1].to_numpy()
    row_of_event = np.repeat(np.arange(n_rows), n_events)

    def add_events(rule: str, bad_events: np.ndarray, describe: Callable[[int], str]) -> None:
        rows, first = _first_per_row(np.flatnonzero(bad_events), offsets)
        found.add(rule, rows, lambda i: describe(int(first[i])))

    add_events(CONDITION_RANGE, (cond < 0) | (cond >= N_CONDITIONS),
               lambda k: f"condition id {cond[k]} outside [0, {N_CONDITIONS})")
    age_ok = (age >= 0) & (age < N_AGE_GROUPS)
    add_events(AGE_GROUP_RANGE, ~age_ok, lambda k: f"age group {age[k]} outside [0, {N_AGE_GROUPS})")
    week_ok = (week >= 0) & (week < n_weeks)
    add_events(WEEK_RANGE, ~week_ok, lambda k: f"week {week[k]} outside [0, {n_weeks})")

    # sorted_times: flat diffs, ignoring the ones that cross into the next patient.
    backwards = np.zeros(week.size, dtype=bool)
    if week.size > 1:
        backwards[1:] = week[1:] < week[:-1]
        backwards[offsets[:-1][n_events > 0]] = False  # first event of each patient
    add_events(SORTED_TIMES, backwards, lambda k: f"week {week[k]} follows week {week[k - 1]}")

    birth = cols[S.BIRTH_WEEK].to_numpy()[row_of_event]
    expected = age_group_at(week, birth)
    add_events(AGE_CONSISTENCY, week_ok & age_ok & (expected != age), lambda k: (
        f"event at week {week[k]} precedes birth at week {birth[k]}" if week[k] < birth[k]
        else f"age group {age[k]} at week {week[k]}, but birth at week {birth[k]} gives "
             f"{expected[k]} (age {(week[k] - birth[k]) / WEEKS_PER_YEAR:.2f} years)"))

    ev_start, ev_end = start[row_of_event], end[row_of_event]
    outside = week_ok & ~bad_window[row_of_event] & ((week < ev_start) | (week > ev_end))
    add_events(ENROLLMENT, outside, lambda k: (
        f"event at week {week[k]} outside enrollment [{ev_start[k]}, {ev_end[k]}]"))
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
               max_violations: int = 100, batch_rows: int = BATCH_ROWS) -> FileResult:
    """All row rules on one shard (``file`` relative to ``root``), one batch at a time."""
    result = FileResult(file)
    try:
        pf = pq.ParquetFile(Path(root) / file)
    except (pa.ArrowException, OSError) as e:
        result.violations.append(Violation(file, None, None, UNREADABLE, f"not a Parquet file: {e}"))
        result.complete = False
        return result
    with pf:
        if problems := schema_violations(pf.schema_arrow, file):
            result.violations += problems[:max_violations]
            result.complete = False
            return result
        counts: Counter[int] = Counter()
        try:
            for batch in pf.iter_batches(batch_size=batch_rows):
                found = check_table(batch, n_weeks=n_weeks, file=file, first_row=result.rows,
                                    split=split, max_violations=max_violations - len(result.violations),
                                    previous_subject_id=result.last_subject)
                result.violations += found
                if any(v.rule == SCHEMA for v in found):  # nulls: nothing below is well defined
                    result.complete = False
                    break
                if batch.num_rows:
                    ids = batch.column(S.SUBJECT_ID)
                    if result.first_subject is None:
                        result.first_subject = ids[0].as_py()
                    result.last_subject = ids[-1].as_py()
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
    patients: int = 0  # dataset.json
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
    unknown = sorted(p.name for p in (root / S.DATA_DIR).glob("*") if p.name not in S.SPLITS)
    if unknown:
        report.violations.append(_meta(f"unknown split directories {unknown} under "
                                       f"{S.DATA_DIR}/; splits are {list(S.SPLITS)}"))

    jobs = [(s, p.relative_to(root).as_posix()) for s in S.SPLITS for p in S.split_files(root, s)]
    if parallel:
        import ray

        if not ray.is_initialized():
            ray.init()
        remote = ray.remote(check_file)
        refs = [remote.remote(str(root.resolve()), f, n_weeks=meta.n_weeks, split=s,
                              max_violations=max_violations) for s, f in jobs]
        results = list(zip([s for s, _ in jobs], ray.get(refs), strict=True))
    else:
        results = []
        budget = max_violations - len(report.violations)
        for split, f in jobs:
            if budget <= 0:
                break
            result = check_file(root, f, n_weeks=meta.n_weeks, split=split, max_violations=budget)
            budget -= len(result.violations)
            results.append((split, result))

    for split in S.SPLITS:
        files = [r for s, r in results if s == split]
        complete = len(files) == sum(s == split for s, _ in jobs) and all(r.complete for r in files)
        _merge_split(report, meta, split, files, complete=complete)
    report.truncated = len(report.violations) >= max_violations
    report.violations = report.violations[:max_violations]
    return report


def _merge_split(report: ValidationReport, meta: S.DatasetMetadata, split: str,
                 files: list[FileResult], *, complete: bool) -> None:
    """Add one split's file results to ``report``: order across files, counts vs metadata."""
    summary = report.splits[split]
    summary.patients = meta.patients[split]
    summary.files = len(S.split_files(report.root, split))
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
    if summary.rows_checked != meta.patients[split]:
        report.violations.append(_meta(f"patients[{split!r}] is {meta.patients[split]}, but "
                                       f"data/{split}/ holds {summary.rows_checked} rows"))
    declared = {int(k): v for k, v in meta.length_histogram[split].items() if v}
    if declared != dict(counts):
        diff = sorted(k for k in declared.keys() | counts.keys() if declared.get(k) != counts.get(k))
        shown = ", ".join(f"{k}: {declared.get(k, 0)} vs {counts.get(k, 0)}" for k in diff[:5])
        report.violations.append(_meta(f"length_histogram[{split!r}] disagrees with the data; "
                                       f"n_events: declared vs found patients: {shown}"))
