"""The data contract, defined once: dataset layout, per-patient row schema and splits.

Dataset directory (one per dataset)::

    metadata/dataset.json        name, schema version, origin date, split counts, vocab sizes,
                                 provenance (simulator parameters and seed, or importer)
    metadata/codes.parquet       condition_id, code, name
    data/{train,tuning,held_out}/part-NNNNN.parquet     one row per patient (ROW_SCHEMA)
    ground_truth/                simulated datasets only: latent health state per patient and
                                 the simulator's parameters (never read by training)

Every other module imports column names from here; no column-name literals elsewhere.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 1

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
CONDITIONS = "conditions"  # list<int16> condition id per event
AGE_GROUPS = "age_groups"  # list<int8> five-year age group per event
WEEKS = "weeks"  # list<int32> week index per event, non-decreasing

EVENT_COLUMNS = (CONDITIONS, AGE_GROUPS, WEEKS)

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

METADATA_DIR, DATA_DIR, GROUND_TRUTH_DIR = "metadata", "data", "ground_truth"
DATASET_JSON = f"{METADATA_DIR}/dataset.json"
CODES_PARQUET = f"{METADATA_DIR}/codes.parquet"

CODES_SCHEMA = pa.schema(
    [
        pa.field("condition_id", pa.int16(), nullable=False),
        pa.field("code", pa.string(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
    ]
)


def split_dir(root: str | Path, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return Path(root) / DATA_DIR / split


def shard_path(root: str | Path, split: str, shard_index: int) -> Path:
    return split_dir(root, split) / f"part-{shard_index:05d}.parquet"


def split_files(root: str | Path, split: str) -> list[Path]:
    """Shards of one split, in shard order (the order the writer numbered them)."""
    return sorted(split_dir(root, split).glob("*.parquet"))


@dataclass
class DatasetMetadata:
    """``metadata/dataset.json``: what a reader needs before it opens a shard."""

    name: str
    origin_date: str  # ISO date of week 0
    n_weeks: int  # week vocabulary span: weeks are in [0, n_weeks)
    patients: dict[str, int]  # per split
    vocab: dict[str, int]  # diag_age and week vocabulary sizes
    provenance: dict[str, Any]  # simulator params and seed, or source and importer version
    # Per split, histogram of words per patient {str(n_events): patients}. Readers report how
    # many patients the length filter drops from it without a pass over the data.
    length_histogram: dict[str, dict[str, int]] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
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
