"""The data contract, defined once: dataset layout, per-patient row schema and splits.

Dataset directory (one per dataset)::

    metadata/dataset.json        name, schema version, origin date, split counts, vocab sizes,
                                 modalities present, provenance (simulator or importer)
    metadata/codes.parquet       every vocabulary: modality, id, code, name, parent code,
                                 unit (labs), severe (adverse events)   (CODES_SCHEMA)
    data/{train,tuning,held_out}/part-NNNNN.parquet     one row per patient (ROW_SCHEMA)
    trial/{train,tuning,held_out}/part-NNNNN.parquet    optional: one row per participant of
                                 a two-arm trial (TRIAL_SCHEMA); a trial-only dataset (an
                                 imported trial) has empty data/ splits
    ground_truth/                simulated datasets only: latent health state, true treatment
                                 effects and counterfactuals, the simulator's parameters
                                 (never read by training)

Schema version 2 is the whole record. One row per patient holds time-sorted parallel lists per
modality, so a reader projects only the modalities its view needs:

    diagnoses      conditions / age_groups / weeks (+ condition_stays)        as in version 1
    procedures     procedures (category id) / procedure_weeks / procedure_stays
    medications    medications (ATC level-3 class id) / medication_start_weeks /
                   medication_end_weeks (inclusive) / medication_stays; sorted by start week
    labs           labs (lab id) / lab_weeks / lab_values (units in codes.parquet) / lab_stays
    admissions     admit_days / discharge_days (days since the origin date) /
                   length_of_stay (days, float: exact where the source has times)

Weeks and days count from ``origin_date``; week w covers days [7w, 7w + 7). A ``*_stays``
list holds, per event, the index of the admission (into the patient's admission lists) it
belongs to, or ``NO_STAY`` (-1) for an event outside any admission.

Every other module imports column names from here; no column-name literals elsewhere.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 2
# What a reader says about a dataset written before the whole record existed.
VERSION_1_HINT = (
    "schema version 1 holds diagnoses only; this platform reads version 2 (the whole record: "
    "procedures, medications, labs, admissions, trials). Regenerate it with jobs/generate.py "
    "or re-import it with jobs/import_meds.py"
)

# MEDS split names.
TRAIN, TUNING, HELD_OUT = "train", "tuning", "held_out"
SPLITS = (TRAIN, TUNING, HELD_OUT)

# Per-patient row columns.
SUBJECT_ID = "subject_id"
SEX = "sex"  # int8: -1 male, 1 female (seed 000)
BIRTH_WEEK = "birth_week"  # int32 week index of birth relative to the origin; may be negative
ENROLL_START = "enroll_start_week"  # int32, inclusive
ENROLL_END = "enroll_end_week"  # int32, inclusive
N_EVENTS = "n_events"  # int32, == len(conditions); lets readers filter lengths without lists
# Diagnoses.
CONDITIONS = "conditions"  # list<int16> condition id per event
AGE_GROUPS = "age_groups"  # list<int8> five-year age group per event
WEEKS = "weeks"  # list<int32> week index per event, non-decreasing
CONDITION_STAYS = "condition_stays"  # list<int16> admission index per diagnosis, or NO_STAY
# Procedures.
PROCEDURES = "procedures"  # list<int16> procedure category id
PROCEDURE_WEEKS = "procedure_weeks"  # list<int32>, non-decreasing
PROCEDURE_STAYS = "procedure_stays"  # list<int16>
# Medications (drug classes, ATC level 3).
MEDICATIONS = "medications"  # list<int16> ATC level-3 class id
MEDICATION_START_WEEKS = "medication_start_weeks"  # list<int32>, non-decreasing
MEDICATION_END_WEEKS = "medication_end_weeks"  # list<int32>, inclusive, >= start
MEDICATION_STAYS = "medication_stays"  # list<int16>
# Labs and vitals.
LABS = "labs"  # list<int8> lab id
LAB_WEEKS = "lab_weeks"  # list<int32>, non-decreasing
LAB_VALUES = "lab_values"  # list<float32>, in the lab's unit (codes.parquet)
LAB_STAYS = "lab_stays"  # list<int16>
# Admissions (inpatient stays), day resolution.
ADMIT_DAYS = "admit_days"  # list<int32> day index of admission, increasing
DISCHARGE_DAYS = "discharge_days"  # list<int32>, >= admit day, <= the next admission's day
LENGTH_OF_STAY = "length_of_stay"  # list<float32> days; within a day of discharge - admit

NO_STAY = -1
DAYS_PER_WEEK = 7

EVENT_COLUMNS = (CONDITIONS, AGE_GROUPS, WEEKS)

# Each modality: its columns, the first being the one every other is parallel to.
MODALITY_COLUMNS: dict[str, tuple[str, ...]] = {
    "diagnoses": (CONDITIONS, AGE_GROUPS, WEEKS, CONDITION_STAYS),
    "procedures": (PROCEDURES, PROCEDURE_WEEKS, PROCEDURE_STAYS),
    "medications": (MEDICATIONS, MEDICATION_START_WEEKS, MEDICATION_END_WEEKS, MEDICATION_STAYS),
    "labs": (LABS, LAB_WEEKS, LAB_VALUES, LAB_STAYS),
    "admissions": (ADMIT_DAYS, DISCHARGE_DAYS, LENGTH_OF_STAY),
}
MODALITIES = tuple(MODALITY_COLUMNS)

ROW_SCHEMA = pa.schema(
    [
        pa.field(SUBJECT_ID, pa.int64(), nullable=False),
        pa.field(SEX, pa.int8(), nullable=False),
        pa.field(BIRTH_WEEK, pa.int32(), nullable=False),
        pa.field(ENROLL_START, pa.int32(), nullable=False),
        pa.field(ENROLL_END, pa.int32(), nullable=False),
        pa.field(N_EVENTS, pa.int32(), nullable=False),
        pa.field(CONDITIONS, pa.list_(pa.int16()), nullable=False),
        pa.field(AGE_GROUPS, pa.list_(pa.int8()), nullable=False),
        pa.field(WEEKS, pa.list_(pa.int32()), nullable=False),
        pa.field(CONDITION_STAYS, pa.list_(pa.int16()), nullable=False),
        pa.field(PROCEDURES, pa.list_(pa.int16()), nullable=False),
        pa.field(PROCEDURE_WEEKS, pa.list_(pa.int32()), nullable=False),
        pa.field(PROCEDURE_STAYS, pa.list_(pa.int16()), nullable=False),
        pa.field(MEDICATIONS, pa.list_(pa.int16()), nullable=False),
        pa.field(MEDICATION_START_WEEKS, pa.list_(pa.int32()), nullable=False),
        pa.field(MEDICATION_END_WEEKS, pa.list_(pa.int32()), nullable=False),
        pa.field(MEDICATION_STAYS, pa.list_(pa.int16()), nullable=False),
        pa.field(LABS, pa.list_(pa.int8()), nullable=False),
        pa.field(LAB_WEEKS, pa.list_(pa.int32()), nullable=False),
        pa.field(LAB_VALUES, pa.list_(pa.float32()), nullable=False),
        pa.field(LAB_STAYS, pa.list_(pa.int16()), nullable=False),
        pa.field(ADMIT_DAYS, pa.list_(pa.int32()), nullable=False),
        pa.field(DISCHARGE_DAYS, pa.list_(pa.int32()), nullable=False),
        pa.field(LENGTH_OF_STAY, pa.list_(pa.float32()), nullable=False),
    ]
)
# Diagnosis-only rows (what generators of sentences produce) gain the other modalities as
# empty lists through ``fill_missing_modalities``.
DIAGNOSIS_COLUMNS = [SUBJECT_ID, SEX, BIRTH_WEEK, ENROLL_START, ENROLL_END, N_EVENTS,
                     CONDITIONS, AGE_GROUPS, WEEKS]
DIAGNOSIS_SCHEMA = pa.schema([ROW_SCHEMA.field(name) for name in DIAGNOSIS_COLUMNS])


def fill_missing_modalities(table: pa.Table) -> pa.Table:
    """``table`` in ``ROW_SCHEMA`` order, every absent list column filled with empty lists
    (a diagnosis-only table: sampled sentences, version-1-shaped test rows). ``condition_stays``
    is filled with ``NO_STAY`` per diagnosis. Non-list columns must be present."""
    n = table.num_rows
    columns = []
    for f in ROW_SCHEMA:
        if f.name in table.column_names:
            columns.append(table.column(f.name).cast(f.type))
        elif f.name == CONDITION_STAYS and CONDITIONS in table.column_names:
            conditions = table.column(CONDITIONS).combine_chunks()
            stays = pa.array(np.full(len(conditions.values), NO_STAY, np.int16))
            offsets = conditions.offsets
            if conditions.offset:  # a sliced array: rebase the offsets
                offsets = pa.array(offsets.to_numpy() - offsets[0].as_py())
                stays = stays.slice(0, offsets.to_numpy()[-1])
            columns.append(pa.ListArray.from_arrays(offsets, stays))
        elif pa.types.is_list(f.type):
            columns.append(pa.array([[]] * n, f.type))
        else:
            raise ValueError(f"fill_missing_modalities: column {f.name!r} is required")
    return pa.Table.from_arrays(columns, schema=ROW_SCHEMA)


# Trial participants (``trial/<split>/``): one row per participant of a two-arm trial.
ARM = "arm"  # int8: 0 control, 1 treatment
ENROLL_DAY = "enroll_day"  # int32 day of randomisation (days since the origin date)
END_DAY = "end_day"  # int32 last day of follow-up, inclusive
BASELINE = "baseline"  # list<float32>, fixed width; names in dataset.json trial.baseline_features
VISIT_DAYS = "visit_days"  # list<int32> per visit, increasing, inside [enroll_day, end_day]
VISIT_TREATMENTS = "visit_treatments"  # list<list<int16>> trial-treatment ids per visit
VISIT_MEDICATIONS = "visit_medications"  # list<list<int16>> trial-medication ids per visit
VISIT_ADVERSE_EVENTS = "visit_adverse_events"  # list<list<int16>> adverse-event ids per visit
SEVERE_OUTCOME = "severe_outcome"  # bool

TRIAL_SCHEMA = pa.schema(
    [
        pa.field(SUBJECT_ID, pa.int64(), nullable=False),
        pa.field(ARM, pa.int8(), nullable=False),
        pa.field(ENROLL_DAY, pa.int32(), nullable=False),
        pa.field(END_DAY, pa.int32(), nullable=False),
        pa.field(BASELINE, pa.list_(pa.float32()), nullable=False),
        pa.field(VISIT_DAYS, pa.list_(pa.int32()), nullable=False),
        pa.field(VISIT_TREATMENTS, pa.list_(pa.list_(pa.int16())), nullable=False),
        pa.field(VISIT_MEDICATIONS, pa.list_(pa.list_(pa.int16())), nullable=False),
        pa.field(VISIT_ADVERSE_EVENTS, pa.list_(pa.list_(pa.int16())), nullable=False),
        pa.field(SEVERE_OUTCOME, pa.bool_(), nullable=False),
    ]
)

# Columns the sequence models read (ground truth and enrollment stay on disk).
MODEL_COLUMNS = [SUBJECT_ID, SEX, N_EVENTS, CONDITIONS, AGE_GROUPS, WEEKS]

# Ground-truth columns (simulated datasets only).
LATENT = "latent"  # list<float32> fixed width: the patient's true latent health state

# Training filter (seed 000 kept sentences of 1-100 words). Longer sentences are valid data:
# readers filter them and report the count. MAX_EVENTS is the hard validity cap.
MIN_WORDS, MAX_WORDS = 1, 100
MAX_EVENTS = 5_000

# Generated patients' ids start here (jobs/sample.py, evaluation): never a real patient's id.
SYNTHETIC_ID_OFFSET = 10**12
# Simulated trial participants' ids start here (``mirror.data.trial``): never a patient's id,
# never a generated patient's id.
TRIAL_ID_OFFSET = 2 * 10**12

METADATA_DIR, DATA_DIR, TRIAL_DIR, GROUND_TRUTH_DIR = "metadata", "data", "trial", "ground_truth"
# A sample of trial twins keeps its counterfactual twins (the other arm) as a dataset of their
# own under this directory, row for row with the twins (jobs/sample.py).
COUNTERFACTUAL_SAMPLE_DIR = "counterfactual"
DATASET_JSON = f"{METADATA_DIR}/dataset.json"
CODES_PARQUET = f"{METADATA_DIR}/codes.parquet"

# Vocabularies in codes.parquet (the ``modality`` column). Ids are 0-based within a modality
# and are the values the row columns hold.
CONDITION, PROCEDURE, MEDICATION, LAB = "condition", "procedure", "medication", "lab"
TRIAL_TREATMENT, TRIAL_MEDICATION, ADVERSE_EVENT = "trial_treatment", "trial_medication", "adverse_event"
VOCABULARIES = (CONDITION, PROCEDURE, MEDICATION, LAB, TRIAL_TREATMENT, TRIAL_MEDICATION, ADVERSE_EVENT)

CODES_SCHEMA = pa.schema(
    [
        pa.field("modality", pa.string(), nullable=False),  # one of VOCABULARIES
        pa.field("id", pa.int32(), nullable=False),  # 0..size-1 within the modality
        pa.field("code", pa.string(), nullable=False),  # e.g. ICD-10-CM E11, ATC C10A, LOINC
        pa.field("name", pa.string(), nullable=False),
        pa.field("parent_code", pa.string(), nullable=True),  # e.g. ATC level 2, CCS chapter
        pa.field("unit", pa.string(), nullable=True),  # labs only (UCUM)
        pa.field("severe", pa.bool_(), nullable=True),  # adverse events only
    ]
)


def _part_split_dir(root: str | Path, part: str, split: str) -> Path:
    """``<root>/<part>/<split>``: ``part`` is DATA_DIR (patients) or TRIAL_DIR (participants)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return Path(root) / part / split


def split_dir(root: str | Path, split: str) -> Path:
    return _part_split_dir(root, DATA_DIR, split)


def shard_path(root: str | Path, split: str, shard_index: int) -> Path:
    return split_dir(root, split) / f"part-{shard_index:05d}.parquet"


def split_files(root: str | Path, split: str) -> list[Path]:
    """Shards of one split, in shard order (the order the writer numbered them)."""
    return sorted(split_dir(root, split).glob("*.parquet"))


def trial_split_dir(root: str | Path, split: str) -> Path:
    return _part_split_dir(root, TRIAL_DIR, split)


def trial_shard_path(root: str | Path, split: str, shard_index: int) -> Path:
    return trial_split_dir(root, split) / f"part-{shard_index:05d}.parquet"


def trial_split_files(root: str | Path, split: str) -> list[Path]:
    return sorted(trial_split_dir(root, split).glob("*.parquet"))


@dataclass
class DatasetMetadata:
    """``metadata/dataset.json``: what a reader needs before it opens a shard."""

    name: str
    origin_date: str  # ISO date of week 0
    n_weeks: int  # week vocabulary span: weeks are in [0, n_weeks)
    patients: dict[str, int]  # per split
    vocab: dict[str, int]  # diag_age and week token counts, and the size of each vocabulary
    provenance: dict[str, Any]  # simulator params and seed, or source and importer version
    # Per split, histogram of words per patient {str(n_events): patients}. Readers report how
    # many patients the length filter drops from it without a pass over the data.
    length_histogram: dict[str, dict[str, int]] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    # Modalities that hold data (MODALITIES); the others' lists are empty in every row.
    modalities: list[str] = field(default_factory=lambda: ["diagnoses"])
    # The trial part, when present: participants per split, indication, arm names, baseline
    # feature names, and anything its writer reports. Empty when the dataset has no trial.
    trial: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def write(self, root: str | Path) -> Path:
        path = Path(root) / DATASET_JSON
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def read(cls, root: str | Path) -> DatasetMetadata:
        path = Path(root) / DATASET_JSON
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing; is {root} a mirror dataset directory?")
        try:
            raw = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        if raw.get("schema_version") == 1:
            raise ValueError(f"{path}: {VERSION_1_HINT}")
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"{path}: schema_version {raw.get('schema_version')!r}, this reader needs {SCHEMA_VERSION}"
            )
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; valid keys are {sorted(known)}")
        try:
            return cls(**raw)
        except TypeError as err:  # a required key is missing
            raise ValueError(f"{path}: {err}") from None
