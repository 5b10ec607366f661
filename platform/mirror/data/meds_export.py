"""Export a mirror dataset (schema version 2, any provenance) to MEDS v0.4.

    export_meds("/data/claims", "/data/claims-meds")      # jobs/export_meds.py DIR OUT

Output layout (``meds`` package constants)::

    data/{split}/part-NNNNN.parquet         one per input shard, same name; the shard's patients
                                            and any trial participants whose ids fall in its range
    data/{split}/trial-part-NNNNN.parquet   one per trial shard: participants of no patient shard
    metadata/codes.parquet                  every code of the export vocabulary (a superset of the
                                            codes in data/), CodeMetadataSchema plus the columns
                                            below that map each code back to the platform
    metadata/subject_splits.parquet         SubjectSplitSchema; split names are the platform's
    metadata/dataset.json                   DatasetMetadataSchema plus ``mirror_export`` (counts
                                            per modality, source and written, which reconcile
                                            exactly) and ``mirror_source`` (the source's whole
                                            ``dataset.json``: origin date, n_weeks, vocab, trial)

Data columns: ``subject_id`` int64, ``time`` timestamp[us] (null for static codes), ``code``
string, ``numeric_value`` float32 (nullable), and ``stay_index`` int32 (nullable; listed in
``other_extension_columns``): the index of the admission (into the patient's admissions) an
event belongs to, null outside any stay. Rows are sorted by (subject_id, time), static rows
first; rows at one time follow ``CATEGORIES`` (birth, enrollment start, admission, diagnoses,
procedures, medication starts, labs, medication ends, discharge, enrollment end, then the
trial's), then list order.

Times: week ``w`` is ``origin_date + 7w`` days (the week's first day), day ``d`` is
``origin_date + d`` days, both at midnight. ``week = (time - origin) // 7 days`` reverses it.

Codes, per row of the source (``<code>`` is the vocabulary code in the source's codes.parquet)::

    code                                 time                            numeric_value; stay_index
    GENDER//M, GENDER//F                 null (static)                   -
    MEDS_BIRTH                           birth week                      -
    ENROLLMENT//START, ENROLLMENT//END   enroll start / end week         - (end week inclusive)
    ICD10CM//<code>                      diagnosis week                  -; condition_stays
    CCS-PR//<chapter.n>                  procedure week                  -; procedure_stays
    ATC//<class>//START, //END           start / end week (inclusive)    -; medication_stays (both)
    LOINC//<code>                        lab week                        lab value; lab_stays
    HOSPITAL_ADMISSION                   admit day                       -; its own index
    HOSPITAL_DISCHARGE                   discharge day                   length of stay (days); index
    TRIAL//ARM//<0|1>                    enroll day                      -
    TRIAL//BASELINE//<feature>           enroll day                      baseline value
    TRIAL//VISIT                         each visit day                  -
    TRIAL//TREATMENT//<code>             visit day                       - ("TX:" prefix dropped)
    TRIAL//MEDICATION//<code>            visit day                       -
    TRIAL//AE//<code>                    visit day                       - ("AE:" prefix dropped)
    TRIAL//END                           end day (last follow-up)        -
    TRIAL//SEVERE_OUTCOME                end day, only when true         -

Age groups (derived from birth and event weeks), ``n_events`` (the diagnosis count) and the
visit an item belongs to (its visit day: visit days are increasing) are not written; they
follow from the rows. ``codes.parquet`` holds, besides ``code``, ``description`` and
``parent_codes`` (``ICD10CM/E11``, ``CCS-PR/1``, ``ATC/C10``, ``LOINC/13457-7``): ``modality``
(a platform vocabulary, or ``record`` / ``trial`` for structural codes), ``source_id`` (the
platform id in that vocabulary; the ``sex`` value for ``GENDER``, the arm, the baseline index), ``source_code`` and ``unit``. An importer maps a MEDS code
back to (modality, id) by joining on ``code``.

Counts (``mirror_export``): the source side is list lengths (``sum(n_events)`` diagnoses, items
of every list), the written side is the rows actually written, per code category; the export
fails unless every category agrees, and unless every trial participant was exported exactly
once (merged into a patient shard or trial-only), so nothing is dropped silently. Data codes
are indices into the export vocabulary, so ``codes.parquet`` lists every code that occurs.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import meds
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mirror.data import schema as S
from mirror.data.ownership import check_output_dir, replace_directory
from mirror.data.validate import _column, _flat, check_codes

ETL_NAME = "mirror.export_meds"
ETL_VERSION = "1.0"
EXPORT_KEY = "mirror_export"  # dataset.json: counts, shards, timing
SOURCE_KEY = "mirror_source"  # dataset.json: the source dataset.json, for a round trip
STAY_INDEX = "stay_index"
PATIENTS_PER_BATCH = 8_192  # rows decoded at a time: bounds memory to one batch's events
COMPRESSION = "zstd"
DAY_US = 86_400_000_000
TRIAL_PREFIX = "trial-"

# Category of every code (the reconciliation unit), in tie-break order within a time.
RECORD_CATEGORIES = (
    "gender", "birth", "enrollment_start", "admissions", "diagnoses", "procedures",
    "medication_starts", "labs", "medication_ends", "discharges", "enrollment_end",
)  # fmt: skip
TRIAL_CATEGORIES = (
    "trial_arms", "trial_baseline", "trial_visits", "trial_treatments", "trial_medications",
    "trial_adverse_events", "trial_ends", "trial_severe_outcomes",
)  # fmt: skip
CATEGORIES = RECORD_CATEGORIES + TRIAL_CATEGORIES

DATA_SCHEMA = pa.schema(
    list(meds.DataSchema.schema().remove(meds.DataSchema.schema().get_field_index("text_value")))
    + [pa.field(STAY_INDEX, pa.int32())]
)


class MedsExportError(ValueError):
    """The source cannot be exported as is, or the output would not be valid MEDS: the
    message names the file, the row where one applies, and the rule."""


# --------------------------------------------------------------------------------------------
# The export vocabulary


@dataclass
class ExportVocabulary:
    """Every MEDS code the export may write, in one global index space: the event builders
    emit global indices, ``codes.take`` turns them into strings, ``category`` counts them."""

    codes: list[str] = field(default_factory=list)
    category: list[int] = field(default_factory=list)  # index into CATEGORIES, per code
    rows: list[dict[str, Any]] = field(default_factory=list)  # codes.parquet rows
    first: dict[str, int] = field(default_factory=dict)  # block name -> first global index
    size: dict[str, int] = field(default_factory=dict)

    def add_block(self, block: str, category: str, entries: list[dict[str, Any]]) -> None:
        self.first[block], self.size[block] = len(self.codes), len(entries)
        for e in entries:
            self.codes.append(e["code"])
            self.category.append(CATEGORIES.index(category))
            self.rows.append({"description": None, "parent_codes": None, "modality": None,
                              "source_id": None, "source_code": None, "unit": None} | e)

    def table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows, schema=CODES_SCHEMA)


CODES_SCHEMA = pa.schema(
    [
        pa.field("code", pa.string(), nullable=False),
        pa.field("description", pa.string()),
        pa.field("parent_codes", pa.list_(pa.string())),
        pa.field("modality", pa.string()),  # platform vocabulary, or "record" / "trial"
        pa.field("source_id", pa.int32()),  # id within that vocabulary
        pa.field("source_code", pa.string()),
        pa.field("unit", pa.string()),
    ]
)


# An ATC level-3 class (e.g. "N02B"): only such trial medication codes get an ATC parent; an
# imported trial's own medication tokens (PyTrial's) are not ATC codes.
_ATC3 = re.compile(r"[A-Z][0-9]{2}[A-Z]")


def _strip(code: str, prefix: str) -> str:
    return code[len(prefix):] if code.startswith(prefix) else code


def build_vocabulary(source_codes: pa.Table, meta: S.DatasetMetadata) -> ExportVocabulary:
    """The export vocabulary from the source's ``codes.parquet`` (already checked: ids
    ``0..n-1`` per modality) and ``dataset.json`` (trial arm and baseline feature names)."""
    by_modality: dict[str, list[dict[str, Any]]] = {m: [] for m in S.VOCABULARIES}
    for row in sorted(source_codes.to_pylist(), key=lambda r: (r["modality"], r["id"])):
        by_modality[row["modality"]].append(row)
    v = ExportVocabulary()

    def fixed(category: str, code: str, description: str, modality: str = "record") -> None:
        v.add_block(code, category, [{"code": code, "description": description, "modality": modality}])

    def vocab(block: str, category: str, modality: str, make_code, parents=None, describe=None) -> None:
        v.add_block(block, category, [
            {"code": make_code(r), "description": describe(r) if describe else r["name"],
             "parent_codes": parents(r) if parents else None, "modality": modality,
             "source_id": r["id"], "source_code": r["code"], "unit": r["unit"]}
            for r in by_modality[modality]
        ])

    v.add_block("gender", "gender", [
        {"code": "GENDER//M", "description": "Male (static)", "modality": "record", "source_id": -1},
        {"code": "GENDER//F", "description": "Female (static)", "modality": "record", "source_id": 1},
    ])
    fixed("birth", meds.birth_code, "Birth (week resolution: first day of the birth week)")
    fixed("enrollment_start", "ENROLLMENT//START", "First day of the first enrolled week")
    fixed("enrollment_end", "ENROLLMENT//END", "First day of the last enrolled week (inclusive)")
    fixed("admissions", "HOSPITAL_ADMISSION", "Inpatient admission (day)")
    fixed("discharges", "HOSPITAL_DISCHARGE", "Inpatient discharge (day); numeric_value: length of stay in days")
    vocab(S.CONDITION, "diagnoses", S.CONDITION, lambda r: f"ICD10CM//{r['code']}",
          parents=lambda r: [f"ICD10CM/{r['code']}"])
    vocab(S.PROCEDURE, "procedures", S.PROCEDURE, lambda r: f"CCS-PR//{_strip(r['code'], 'CCS-PR:')}",
          parents=lambda r: [r["parent_code"].replace(":", "/", 1)] if r["parent_code"] else None)
    atc_parent = lambda r: [f"ATC/{r['parent_code']}"] if r["parent_code"] else None  # noqa: E731
    vocab("medication_start", "medication_starts", S.MEDICATION, lambda r: f"ATC//{r['code']}//START",
          parents=atc_parent, describe=lambda r: f"Start of {r['name']}")
    vocab("medication_end", "medication_ends", S.MEDICATION, lambda r: f"ATC//{r['code']}//END",
          parents=atc_parent, describe=lambda r: f"Last week of {r['name']} (inclusive)")
    vocab(S.LAB, "labs", S.LAB, lambda r: f"LOINC//{r['code']}",
          parents=lambda r: [r["parent_code"]] if r["parent_code"] else [f"LOINC/{r['code']}"],
          describe=lambda r: f"{r['name']} [{r['unit']}]" if r["unit"] else r["name"])

    arms = meta.trial.get("arm_names") or meta.trial.get("arms") or ["control", "treatment"]
    v.add_block("trial_arm", "trial_arms", [
        {"code": f"TRIAL//ARM//{i}", "description": f"Randomised to arm {i} ({name}); time: enrollment day",
         "modality": "trial", "source_id": i} for i, name in enumerate(arms[:2])
    ])
    features = meta.trial.get("baseline_features") or []
    v.add_block("trial_baseline", "trial_baseline", [
        {"code": f"TRIAL//BASELINE//{name}", "description": f"Trial baseline feature {name!r}",
         "modality": "trial", "source_id": i} for i, name in enumerate(features)
    ])
    fixed("trial_visits", "TRIAL//VISIT", "Trial visit", "trial")
    vocab(S.TRIAL_TREATMENT, "trial_treatments", S.TRIAL_TREATMENT,
          lambda r: f"TRIAL//TREATMENT//{_strip(r['code'], 'TX:')}")
    vocab(S.TRIAL_MEDICATION, "trial_medications", S.TRIAL_MEDICATION,
          lambda r: f"TRIAL//MEDICATION//{r['code']}",
          parents=lambda r: [f"ATC/{r['code']}"] if _ATC3.fullmatch(r["code"]) else None)
    vocab(S.ADVERSE_EVENT, "trial_adverse_events", S.ADVERSE_EVENT,
          lambda r: f"TRIAL//AE//{_strip(r['code'], 'AE:')}")
    fixed("trial_ends", "TRIAL//END", "Last day of trial follow-up", "trial")
    fixed("trial_severe_outcomes", "TRIAL//SEVERE_OUTCOME", "Severe outcome during the trial; time: end day", "trial")

    dupes = sorted(c for c, n in Counter(v.codes).items() if n > 1)
    if dupes:
        raise MedsExportError(f"{S.CODES_PARQUET}: codes: the export vocabulary would hold "
                              f"duplicate MEDS codes {dupes[:5]}; source codes must be distinct")
    return v


# --------------------------------------------------------------------------------------------
# One batch of rows -> MEDS rows


class _Rows:
    """Parts of one output batch, concatenated, sorted and checked once at the end."""

    def __init__(self, vocab: ExportVocabulary, codes: pa.Array, origin_us: int) -> None:
        self.vocab, self.codes, self.origin_us = vocab, codes, origin_us
        self.parts: list[tuple[np.ndarray, ...]] = []

    def add(self, block: str, subjects: np.ndarray, time_us: np.ndarray | None, local_ids: np.ndarray | int,
            *, values: np.ndarray | None = None, stays: np.ndarray | None = None) -> None:
        """``time_us`` None: static rows; ``stays`` uses ``NO_STAY`` for none."""
        n = subjects.size
        code = self.vocab.first[block] + np.broadcast_to(np.asarray(local_ids, np.int64), (n,))
        t = np.full(n, np.iinfo(np.int64).min) if time_us is None else time_us
        val = np.full(n, np.nan, np.float32) if values is None else values.astype(np.float32)
        has_val = np.zeros(n, bool) if values is None else np.ones(n, bool)
        stay = np.full(n, S.NO_STAY, np.int32) if stays is None else stays.astype(np.int32)
        self.parts.append((subjects.astype(np.int64), t, code, val, has_val, stay))

    def weeks(self, weeks: np.ndarray) -> np.ndarray:
        return self.origin_us + weeks.astype(np.int64) * (S.DAYS_PER_WEEK * DAY_US)

    def days(self, days: np.ndarray) -> np.ndarray:
        return self.origin_us + days.astype(np.int64) * DAY_US

    def table(self) -> tuple[pa.Table, np.ndarray]:
        """The sorted MEDS table and the written rows per code (global index)."""
        cols = [np.concatenate(c) for c in zip(*self.parts, strict=True)] if self.parts else \
            [np.empty(0, d) for d in (np.int64, np.int64, np.int64, np.float32, bool, np.int32)]
        subject, t, code, val, has_val, stay = cols
        # Ties: category order (birth before the diagnoses of its week, starts before ends).
        order = np.lexsort((np.asarray(self.vocab.category, np.int64)[code], t, subject))
        subject, t, code, val, has_val, stay = (c[order] for c in cols)
        static = t == np.iinfo(np.int64).min
        table = pa.Table.from_arrays(
            [
                pa.array(subject, pa.int64()),
                pa.array(t, pa.timestamp("us"), mask=static),
                self.codes.take(pa.array(code)),
                pa.array(val, pa.float32(), mask=~has_val),
                pa.array(stay, pa.int32(), mask=stay == S.NO_STAY),
            ],
            schema=DATA_SCHEMA,
        )
        return table, np.bincount(code, minlength=len(self.vocab.codes))


def _lists(batch: pa.RecordBatch | pa.Table, columns: tuple[str, ...], file: str, first_row: int,
           ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """(items per row, flat numpy values per column) of parallel list columns; refuses lists
    of unequal length or null items, naming the row."""
    lengths, values = None, []
    for name in columns:
        offsets, flat = _flat(_column(batch, name))
        if flat.null_count:
            k = int(np.flatnonzero(np.asarray(flat.is_null()))[0])
            row = int(np.searchsorted(offsets, k, side="right")) - 1
            raise MedsExportError(f"{file} row {first_row + row} (subject {ids[row]}): schema: "
                                  f"null item in list column {name!r}")
        n = np.diff(offsets)
        if lengths is None:
            lengths = n
        elif (bad := np.flatnonzero(n != lengths)).size:
            r = int(bad[0])
            raise MedsExportError(
                f"{file} row {first_row + r} (subject {ids[r]}): list_lengths: {n[r]} {name} "
                f"but {lengths[r]} {columns[0]}; the modality's lists must be parallel")
        values.append(flat.to_numpy(zero_copy_only=False))
    return lengths, values


def _check_ids(name: str, ids: np.ndarray, size: int, subjects: np.ndarray, file: str) -> None:
    if (bad := np.flatnonzero((ids < 0) | (ids >= size))).size:
        k = int(bad[0])
        raise MedsExportError(f"{file} (subject {subjects[k]}): code_range: {name} id {ids[k]} "
                              f"outside its vocabulary [0, {size}) in {S.CODES_PARQUET}")


def _record_rows(rows: _Rows, batch: pa.RecordBatch | pa.Table, file: str, first_row: int,
                 counts: Counter[str]) -> None:
    """Patients' rows (ROW_SCHEMA) into ``rows``; ``counts`` gets the source list lengths."""
    ids = batch.column(S.SUBJECT_ID).to_numpy()
    sex = batch.column(S.SEX).to_numpy()
    if (bad := np.flatnonzero((sex != -1) & (sex != 1))).size:
        r = int(bad[0])
        raise MedsExportError(f"{file} row {first_row + r} (subject {ids[r]}): sex: {sex[r]}, "
                              "expected -1 (male) or 1 (female)")
    rows.add("gender", ids, None, (sex == 1).astype(np.int64))
    rows.add(meds.birth_code, ids, rows.weeks(batch.column(S.BIRTH_WEEK).to_numpy()), 0)
    rows.add("ENROLLMENT//START", ids, rows.weeks(batch.column(S.ENROLL_START).to_numpy()), 0)
    rows.add("ENROLLMENT//END", ids, rows.weeks(batch.column(S.ENROLL_END).to_numpy()), 0)
    for key in ("gender", "birth", "enrollment_start", "enrollment_end"):
        counts[key] += ids.size

    def lists(modality: str) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        n, values = _lists(batch, S.MODALITY_COLUMNS[modality], file, first_row, ids)
        return n, np.repeat(ids, n), values

    n, subj, (cond, _age, week, stay) = lists("diagnoses")
    n_events = batch.column(S.N_EVENTS).to_numpy()
    if (bad := np.flatnonzero(n != n_events)).size:
        r = int(bad[0])
        raise MedsExportError(f"{file} row {first_row + r} (subject {ids[r]}): list_lengths: "
                              f"n_events {n_events[r]} but {n[r]} conditions")
    _check_ids(S.CONDITION, cond, rows.vocab.size[S.CONDITION], subj, file)
    rows.add(S.CONDITION, subj, rows.weeks(week), cond, stays=stay)
    counts["diagnoses"] += int(n_events.sum())

    _, subj, (proc, week, stay) = lists("procedures")
    _check_ids(S.PROCEDURE, proc, rows.vocab.size[S.PROCEDURE], subj, file)
    rows.add(S.PROCEDURE, subj, rows.weeks(week), proc, stays=stay)
    counts["procedures"] += proc.size

    _, subj, (med, start, end, stay) = lists("medications")
    _check_ids(S.MEDICATION, med, rows.vocab.size["medication_start"], subj, file)
    rows.add("medication_start", subj, rows.weeks(start), med, stays=stay)
    rows.add("medication_end", subj, rows.weeks(end), med, stays=stay)
    counts["medication_starts"] += med.size
    counts["medication_ends"] += med.size

    _, subj, (lab, week, value, stay) = lists("labs")
    _check_ids(S.LAB, lab, rows.vocab.size[S.LAB], subj, file)
    rows.add(S.LAB, subj, rows.weeks(week), lab, values=value, stays=stay)
    counts["labs"] += lab.size

    n, subj, (admit, discharge, los) = lists("admissions")
    index = np.arange(admit.size) - np.repeat(np.cumsum(n) - n, n)  # admission index per patient
    rows.add("HOSPITAL_ADMISSION", subj, rows.days(admit), 0, stays=index)
    rows.add("HOSPITAL_DISCHARGE", subj, rows.days(discharge), 0, values=los, stays=index)
    counts["admissions"] += admit.size
    counts["discharges"] += discharge.size


def _trial_rows(rows: _Rows, trial: pa.Table, file: str, counts: Counter[str]) -> None:
    """Trial participants' rows (TRIAL_SCHEMA) into ``rows``; ``counts`` gets source lengths."""
    if trial.num_rows == 0:
        return
    ids = trial.column(S.SUBJECT_ID).to_numpy()
    arm = trial.column(S.ARM).to_numpy().astype(np.int64)
    if (bad := np.flatnonzero((arm < 0) | (arm >= rows.vocab.size["trial_arm"]))).size:
        raise MedsExportError(f"{file} (subject {ids[bad[0]]}): arm: {arm[bad[0]]}, expected 0 or 1")
    enroll = rows.days(trial.column(S.ENROLL_DAY).to_numpy())
    end = rows.days(trial.column(S.END_DAY).to_numpy())
    rows.add("trial_arm", ids, enroll, arm)
    rows.add("TRIAL//END", ids, end, 0)
    counts["trial_arms"] += ids.size
    counts["trial_ends"] += ids.size

    width, (baseline,) = _lists(trial, (S.BASELINE,), file, 0, ids)
    if width.size and (bad := np.flatnonzero(width != rows.vocab.size["trial_baseline"])).size:
        raise MedsExportError(
            f"{file} (subject {ids[bad[0]]}): baseline: {width[bad[0]]} values, but dataset.json "
            f"trial.baseline_features names {rows.vocab.size['trial_baseline']}")
    rows.add("trial_baseline", np.repeat(ids, width), np.repeat(enroll, width),
             np.arange(baseline.size) - np.repeat(np.cumsum(width) - width, width), values=baseline)
    counts["trial_baseline"] += baseline.size

    visits, (visit_days,) = _lists(trial, (S.VISIT_DAYS,), file, 0, ids)
    visit_subject, visit_time = np.repeat(ids, visits), rows.days(visit_days)
    rows.add("TRIAL//VISIT", visit_subject, visit_time, 0)
    counts["trial_visits"] += visit_days.size
    for column, block, category in ((S.VISIT_TREATMENTS, S.TRIAL_TREATMENT, "trial_treatments"),
                                    (S.VISIT_MEDICATIONS, S.TRIAL_MEDICATION, "trial_medications"),
                                    (S.VISIT_ADVERSE_EVENTS, S.ADVERSE_EVENT, "trial_adverse_events")):
        outer_offsets, per_visit = _flat(_column(trial, column))
        n = np.diff(outer_offsets)
        if (bad := np.flatnonzero(n != visits)).size:
            raise MedsExportError(f"{file} (subject {ids[bad[0]]}): list_lengths: {n[bad[0]]} "
                                  f"{column} but {visits[bad[0]]} visit_days")
        inner_offsets, items = _flat(per_visit)
        if per_visit.null_count or items.null_count:
            raise MedsExportError(f"{file}: schema: null visit or item in list column {column!r}")
        per = np.diff(inner_offsets)
        codes = items.to_numpy(zero_copy_only=False)
        subj = np.repeat(visit_subject, per)
        _check_ids(block, codes, rows.vocab.size[block], subj, file)
        rows.add(block, subj, np.repeat(visit_time, per), codes)
        counts[category] += codes.size
    severe = trial.column(S.SEVERE_OUTCOME).to_numpy(zero_copy_only=False).astype(bool)
    rows.add("TRIAL//SEVERE_OUTCOME", ids[severe], end[severe], 0)
    counts["trial_severe_outcomes"] += int(severe.sum())


# --------------------------------------------------------------------------------------------
# One shard (a Ray task)


@dataclass
class ShardJob:
    split: str
    source: str  # path relative to the source root: data/... or trial/...
    out: str  # path relative to the output root
    trial_files: list[str] = field(default_factory=list)  # data shards: the split's trial shards
    exclude: list[tuple[int, int]] = field(default_factory=list)  # trial shards: data id ranges


@dataclass
class ShardResult:
    job: ShardJob
    patients: int = 0
    participants: int = 0
    rows: int = 0
    source_counts: dict[str, int] = field(default_factory=dict)
    code_counts: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # rows per code
    subject_ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))


def _check_increasing(ids: np.ndarray, previous: int | None, file: str, first_row: int) -> None:
    prev = np.empty_like(ids)
    prev[1:] = ids[:-1]
    if ids.size:
        prev[0] = ids[0] - 1 if previous is None else previous
    if (bad := np.flatnonzero(ids <= prev)).size:
        r = int(bad[0])
        raise MedsExportError(f"{file} row {first_row + r} (subject {ids[r]}): subject_order: "
                              f"follows {prev[r]}; subject ids must strictly increase in a shard")


def export_shard(source_root: str, out_root: str, job: ShardJob, vocab: ExportVocabulary,
                 origin_us: int) -> ShardResult:
    """Write one output shard, one batch of input rows at a time; checks each batch with
    ``meds.DataSchema`` before it is written."""
    result = ShardResult(job)
    codes = pa.array(vocab.codes, pa.string())
    source, written = Counter(), np.zeros(len(vocab.codes), np.int64)
    out = Path(out_root) / job.out
    out.parent.mkdir(parents=True, exist_ok=True)
    pieces: list[np.ndarray] = []
    trial_paths = [str(Path(source_root) / f) for f in job.trial_files]
    is_trial = not job.source.startswith(S.DATA_DIR + "/")
    exclude = np.asarray(job.exclude, np.int64).reshape(-1, 2)
    with pq.ParquetFile(Path(source_root) / job.source) as pf, \
            pq.ParquetWriter(out, DATA_SCHEMA, compression=COMPRESSION) as writer:
        first_row, last = 0, None
        for batch in pf.iter_batches(batch_size=PATIENTS_PER_BATCH):
            rows = _Rows(vocab, codes, origin_us)
            ids = batch.column(S.SUBJECT_ID).to_numpy()
            _check_increasing(ids, last, job.source, first_row)
            if is_trial:
                # Participants inside a patient shard's id range are written with that shard.
                inside = np.zeros(ids.size, bool)
                for lo, hi in exclude:
                    inside |= (ids >= lo) & (ids <= hi)
                kept = pa.Table.from_batches([batch]).filter(pa.array(~inside))
                _trial_rows(rows, kept, job.source, source)
                result.participants += kept.num_rows
            else:
                _record_rows(rows, batch, job.source, first_row, source)
                result.patients += ids.size
                if trial_paths and ids.size:
                    lo = ids[0] if last is None else last + 1
                    trial = pq.read_table(trial_paths, schema=S.TRIAL_SCHEMA,
                                          filters=[(S.SUBJECT_ID, ">=", int(lo)), (S.SUBJECT_ID, "<=", int(ids[-1]))])
                    trial = trial.sort_by(S.SUBJECT_ID)
                    _check_increasing(trial.column(S.SUBJECT_ID).to_numpy(), None,
                                      f"{S.TRIAL_DIR}/{job.split}/", 0)
                    _trial_rows(rows, trial, f"{S.TRIAL_DIR}/{job.split}/", source)
                    result.participants += trial.num_rows
            table, n = rows.table()
            _validate(meds.DataSchema, table, f"{job.out} rows {result.rows}..{result.rows + table.num_rows}")
            writer.write_table(table)
            written += n
            result.rows += table.num_rows
            subjects = table.column(S.SUBJECT_ID).to_numpy()
            if subjects.size:
                pieces.append(subjects[np.r_[True, subjects[1:] != subjects[:-1]]])
            first_row += ids.size
            last = int(ids[-1]) if ids.size else last
    result.source_counts = {c: int(source[c]) for c in CATEGORIES}
    result.code_counts = written
    result.subject_ids = np.concatenate(pieces) if pieces else np.empty(0, np.int64)
    return result


def _validate(schema: type, table: Any, where: str) -> None:
    """``schema.validate`` (the meds package), failing with the file and the broken rule."""
    try:
        schema.validate(table)
    except Exception as err:  # noqa: BLE001 (flexible_schema raises several types)
        cause = f" ({err.__cause__})" if err.__cause__ else ""
        raise MedsExportError(f"{where}: meds.{schema.__name__}: {err}{cause}") from None


# --------------------------------------------------------------------------------------------
# Whole datasets


@dataclass
class ExportReport:
    source: str
    out: str
    patients: dict[str, int]
    participants: dict[str, int]
    shards: int
    rows: int
    codes: int  # in metadata/codes.parquet
    codes_used: int  # distinct codes in data/
    source_counts: dict[str, int]
    written_counts: dict[str, int]
    seconds: float
    rows_per_s: float
    source_events_per_s: float  # list items of the source (what a user counts as events)

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def _id_range(path: Path) -> tuple[int, int] | None:
    """(first, last) subject id of a shard, from the footer when it has statistics."""
    with pq.ParquetFile(path) as pf:
        if pf.metadata.num_rows == 0:
            return None
        column = pf.schema_arrow.get_field_index(S.SUBJECT_ID)
        groups = [g for g in range(pf.num_row_groups) if pf.metadata.row_group(g).num_rows]
        stats = [pf.metadata.row_group(g).column(column).statistics for g in groups]
        if all(s is not None and s.has_min_max for s in stats):
            return int(stats[0].min), int(stats[-1].max)
        first = pf.read_row_group(groups[0], columns=[S.SUBJECT_ID]).column(0)
        final = pf.read_row_group(groups[-1], columns=[S.SUBJECT_ID]).column(0)
        return int(first[0].as_py()), int(final[-1].as_py())


def plan(root: Path) -> list[ShardJob]:
    """One job per data shard and per trial shard; id ranges of a split's data shards decide
    which trial participants are merged into which shard (MEDS: one file per subject)."""
    jobs = []
    for split in S.SPLITS:
        data = S.split_files(root, split)
        trial = [p.relative_to(root).as_posix() for p in S.trial_split_files(root, split)]
        ranges: list[tuple[int, int]] = []
        for path in data:
            rel = path.relative_to(root).as_posix()
            if (r := _id_range(path)) is not None:
                if ranges and r[0] <= ranges[-1][1]:
                    raise MedsExportError(f"{rel}: subject_order: first subject {r[0]} does not "
                                          f"follow {ranges[-1][1]} of the previous shard")
                ranges.append(r)
            jobs.append(ShardJob(split, rel, f"{meds.data_subdirectory}/{split}/{path.name}", trial))
        for rel in trial:
            jobs.append(ShardJob(split, rel, f"{meds.data_subdirectory}/{split}/{TRIAL_PREFIX}{Path(rel).name}",
                                 exclude=list(ranges)))
    return jobs


def check_output(source: str | Path, out: str | Path, overwrite: bool) -> None:
    """OUT must be new or empty, or (with ``overwrite``) an earlier export of this ETL holding
    nothing else; never the source or inside it. Raises ``guards.GuardError``."""
    check_output_dir(source, out, overwrite, owner=ETL_NAME, parts=(meds.data_subdirectory, "metadata"),
                     written_by=lambda d: json.loads((d / meds.dataset_metadata_filepath).read_text())["etl_name"])


def export_meds(source: str | Path, out: str | Path, *, overwrite: bool = False,
                parallel: bool = True) -> ExportReport:
    """Export the dataset at ``source`` to a MEDS dataset at ``out`` (see the module docstring).

    Writes into a staging directory beside ``out`` and renames it into place when every shard,
    count and schema check passed, so ``out`` is never half-written. ``parallel`` runs one Ray
    task per shard (``ray.init()`` unless Ray is running); otherwise a plain loop.
    """
    began = time.perf_counter()
    root = Path(source)
    meta = S.DatasetMetadata.read(root)
    check_output(root, out, overwrite)
    if problems := check_codes(root, meta.vocab):
        raise MedsExportError(f"{root}: {problems[0]}")
    vocab = build_vocabulary(pq.read_table(root / S.CODES_PARQUET), meta)
    origin_us = int(np.datetime64(date.fromisoformat(meta.origin_date), "us").astype(np.int64))
    jobs = plan(root)

    dst = Path(out).resolve()
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.staging-", dir=dst.parent))
    try:
        results = _run(root.resolve(), staging, jobs, vocab, origin_us, parallel)
        report = _finish(root, meta, staging, dst, vocab, results, began)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_directory(staging, dst)  # an earlier export, if any, only once this one is complete
    return report


def _run(root: Path, staging: Path, jobs: list[ShardJob], vocab: ExportVocabulary, origin_us: int,
         parallel: bool):
    """Shard results in job order, as a generator: the driver holds one result at a time."""
    if not parallel:
        return (export_shard(str(root), str(staging), j, vocab, origin_us) for j in jobs)
    import ray

    if not ray.is_initialized():
        ray.init()
    task = ray.remote(num_cpus=1, max_retries=0)(export_shard)
    vocab_ref = ray.put(vocab)
    refs = [task.remote(str(root), str(staging), j, vocab_ref, origin_us) for j in jobs]

    def results():
        try:
            for ref in refs:
                yield ray.get(ref)
        except BaseException as err:
            for ref in refs:  # stop the others before the caller removes the staging directory
                ray.cancel(ref)
            ray.wait(refs, num_returns=len(refs), timeout=60)
            cause = getattr(err, "cause", None)
            if isinstance(cause, MedsExportError):  # one clear line, not a remote traceback
                raise MedsExportError(*cause.args) from None
            raise

    return results()


def _finish(root: Path, meta: S.DatasetMetadata, staging: Path, dst: Path, vocab: ExportVocabulary,
            results, began: float) -> ExportReport:
    """Subject splits (streamed from the shard results), reconciliation, code coverage,
    codes.parquet and dataset.json."""
    (staging / "metadata").mkdir(exist_ok=True)
    split_schema = meds.SubjectSplitSchema.schema()
    patients = dict.fromkeys(S.SPLITS, 0)
    participants = dict.fromkeys(S.SPLITS, 0)
    source_counts, code_counts = Counter(), np.zeros(len(vocab.codes), np.int64)
    shards = rows = 0
    with pq.ParquetWriter(staging / meds.subject_splits_filepath, split_schema) as writer:
        for result in results:
            ids = result.subject_ids
            table = pa.table({"subject_id": pa.array(ids, pa.int64()),
                              "split": pa.array(np.full(ids.size, result.job.split, object), pa.string())},
                             schema=split_schema)
            _validate(meds.SubjectSplitSchema, table, meds.subject_splits_filepath)
            writer.write_table(table)
            patients[result.job.split] += result.patients
            participants[result.job.split] += result.participants
            source_counts.update(result.source_counts)
            code_counts += result.code_counts
            shards += 1
            rows += result.rows
    per_category = np.bincount(vocab.category, weights=code_counts, minlength=len(CATEGORIES))
    written_counts = {c: int(n) for c, n in zip(CATEGORIES, per_category, strict=True)}
    trial_rows = {s: sum(pq.ParquetFile(p).metadata.num_rows for p in S.trial_split_files(root, s))
                  for s in S.SPLITS}
    if trial_rows != participants:  # each participant exported once: merged or trial-only
        raise MedsExportError(f"{root / S.TRIAL_DIR}: reconciliation: the trial shards hold "
                              f"{trial_rows} participants, but {participants} were exported")
    if patients != meta.patients:
        raise MedsExportError(f"{S.DATASET_JSON}: metadata: patients {meta.patients}, but the "
                              f"shards hold {patients}")
    declared = meta.trial.get("participants")
    if isinstance(declared, dict) and {s: declared.get(s, 0) for s in S.SPLITS} != participants:
        raise MedsExportError(f"{S.DATASET_JSON}: metadata: trial participants {declared}, but "
                              f"the trial shards hold {participants}")
    if mismatched := {c: (source_counts[c], written_counts[c]) for c in CATEGORIES
                      if source_counts[c] != written_counts[c]}:
        raise MedsExportError(f"{dst}: reconciliation: source vs written rows differ for "
                              f"{mismatched}; nothing may be dropped")

    code_table = vocab.table()
    _validate(meds.CodeMetadataSchema, code_table, meds.code_metadata_filepath)
    pq.write_table(code_table, staging / meds.code_metadata_filepath, compression=COMPRESSION)
    seconds = time.perf_counter() - began
    events = sum(source_counts[c] for c in CATEGORIES)
    report = ExportReport(
        source=str(root), out=str(dst), patients=patients, participants=participants,
        shards=shards, rows=rows, codes=code_table.num_rows, codes_used=int((code_counts > 0).sum()),
        source_counts={c: source_counts[c] for c in CATEGORIES},
        written_counts={c: written_counts[c] for c in CATEGORIES},
        seconds=round(seconds, 3), rows_per_s=round(rows / seconds, 1),
        source_events_per_s=round(events / seconds, 1),
    )
    dataset = {
        "dataset_name": meta.name,
        "dataset_version": f"mirror-schema-{meta.schema_version}" + (f"@{meta.created_at}" if meta.created_at else ""),
        "etl_name": ETL_NAME,
        "etl_version": ETL_VERSION,
        "meds_version": meds.__version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "other_extension_columns": [STAY_INDEX],
        EXPORT_KEY: report.summary(),
        SOURCE_KEY: asdict(meta),
    }
    _validate(meds.DatasetMetadataSchema, dataset, meds.dataset_metadata_filepath)
    (staging / meds.dataset_metadata_filepath).write_text(json.dumps(dataset, indent=2) + "\n")
    return report


__all__ = [
    "CATEGORIES",
    "ETL_NAME",
    "ExportReport",
    "MedsExportError",
    "build_vocabulary",
    "check_output",
    "export_meds",
    "export_shard",
    "plan",
]
