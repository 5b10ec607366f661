"""Write ``tests/data/broken/``: one tiny dataset per validation rule, each broken in one way.

    .venv/bin/python tests/data/make_broken_corpus.py [OUT_DIR]

Every ``broken/<rule>/`` directory is the same valid base dataset (:func:`base`, 80 patients
in three splits, train in two shards, each a small whole record: diagnoses, procedures,
medications, labs and admissions with stays; and a 10-participant trial part) with one
breakage from ``BREAKAGES`` applied, plus a
``BROKEN.json`` naming the rule and the file, row and subject where the validator must report
it. ``tests/test_validate.py`` uses :func:`base` as its valid dataset and checks that the
corpus covers every rule in ``mirror.data.validate.RULES``. Deterministic: rerunning it
rewrites the same corpus.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mirror.data import schema as S
from mirror.data.splits import SPLIT_CODES, split_codes
from mirror.data.vocab import (
    DIAG_AGE_VOCAB_SIZE,
    N_CONDITIONS,
    N_SPECIAL,
    WEEKS_PER_YEAR,
    age_group_at,
)
from mirror.data.vocabularies import LABS, SIMULATED_LABS, vocabulary_sizes

OUT_DIR = Path(__file__).parent / "broken"
N_PATIENTS = 80  # ids 0..79: 72 train, 4 tuning, 4 held_out
N_WEEKS = 520
TRAIN_SHARDS = 2
LONG_PATIENT = 5  # MAX_WORDS + 20 events: valid data that the training filter drops
Row = dict  # one patient: ROW_SCHEMA column -> value (n_events derived when written)
SIZES = vocabulary_sizes()
MODALITIES = list(S.MODALITIES)
TRIAL = {"participants": None, "baseline_features": ["age_years", "ecog", "tumour_size_mm"],
         "arms": ["AC-T", "AC-TH"], "indication": "breast cancer"}  # participants: derived
TRIAL_PER_SPLIT = {S.TRAIN: 6, S.TUNING: 2, S.HELD_OUT: 2}


@dataclass
class Corpus:
    """A dataset in memory, as plain Python rows, so that breaking it is one readable line."""

    shards: dict[str, list[list[Row]]]  # split -> shard -> patients in id order
    codes: list[dict]
    trial: dict[str, list[Row]] = field(default_factory=dict)  # split -> participants (one shard)
    file_schemas: dict[str, pa.Schema] = field(default_factory=dict)  # relpath -> override
    raw_files: dict[str, bytes] = field(default_factory=dict)  # relpath -> bytes written as is
    metadata_patch: dict = field(default_factory=dict)  # applied over the derived dataset.json

    def locate(self, subject_id: int) -> tuple[str, int, Row]:
        """(shard path, row within the shard, row) of a patient."""
        for split, shards in self.shards.items():
            for i, rows in enumerate(shards):
                for r, row in enumerate(rows):
                    if row[S.SUBJECT_ID] == subject_id:
                        return shard_name(split, i), r, row
        raise KeyError(subject_id)

    def first_with(self, test: Callable[[Row], bool], after: int = 0) -> tuple[str, int, Row]:
        """(shard path, row, row) of the first patient with id >= ``after`` passing ``test``."""
        for split, shards in self.shards.items():
            for i, rows in enumerate(shards):
                for r, row in enumerate(rows):
                    if row[S.SUBJECT_ID] >= after and test(row):
                        return shard_name(split, i), r, row
        raise KeyError("no such patient in the base")


def shard_name(split: str, index: int) -> str:
    return S.shard_path("", split, index).as_posix()


def make_patient(rng: np.random.Generator, subject_id: int, n_events: int, *, full: bool = True) -> Row:
    """A valid patient: events sorted in time, inside enrollment, ages from the birth week;
    with ``full``, the whole record (:func:`add_record`), else diagnoses only."""
    birth = int(rng.integers(-80 * 52, -52))
    start = int(rng.integers(0, 200))
    end = int(rng.integers(start + 100, N_WEEKS))
    weeks = np.sort(rng.integers(start, end + 1, n_events))
    row = {
        S.SUBJECT_ID: subject_id,
        S.SEX: int(rng.choice([-1, 1])),
        S.BIRTH_WEEK: birth,
        S.ENROLL_START: start,
        S.ENROLL_END: end,
        S.CONDITIONS: rng.integers(0, N_CONDITIONS, n_events).tolist(),
        S.AGE_GROUPS: age_group_at(weeks, birth).tolist(),
        S.WEEKS: weeks.tolist(),
    }
    return add_record(rng, row) if full else row


def _stay_of(week: int, spans: list[tuple[int, int]]) -> int:
    return next((i for i, (lo, hi) in enumerate(spans) if lo <= week <= hi), S.NO_STAY)


def add_record(rng: np.random.Generator, row: Row) -> Row:
    """``row`` (diagnoses) with a small valid rest of the record: 0-2 admissions in separate
    halves of the enrollment window (the first diagnosis moved into the first stay), a few
    procedures, medications and labs, and every event linked to the stay its week is in."""
    start, end = row[S.ENROLL_START], row[S.ENROLL_END]
    n_adm = int(rng.integers(0, 3))
    slot = (end - start + 1) * S.DAYS_PER_WEEK // max(n_adm, 1)
    admit = [start * S.DAYS_PER_WEEK + i * slot + int(rng.integers(0, 20)) for i in range(n_adm)]
    discharge = [a + int(rng.integers(0, 9)) for a in admit]
    los = [max(d - a + round(float(rng.uniform(-0.4, 0.4)), 2), 0.0) for a, d in zip(admit, discharge, strict=True)]
    spans = [(a // S.DAYS_PER_WEEK, d // S.DAYS_PER_WEEK) for a, d in zip(admit, discharge, strict=True)]
    if spans and row[S.WEEKS]:
        weeks = sorted([spans[0][0], *row[S.WEEKS][1:]])
        row[S.WEEKS] = weeks
        row[S.AGE_GROUPS] = age_group_at(np.array(weeks), row[S.BIRTH_WEEK]).tolist()

    def weeks(n: int) -> list[int]:
        w = rng.integers(start, end + 1, n).tolist()
        if spans and n:
            w[0] = spans[-1][1]  # one event in the last stay
        return sorted(w)

    procedure_weeks, medication_starts, lab_weeks = weeks(int(rng.integers(0, 4))), \
        weeks(int(rng.integers(0, 4))), weeks(int(rng.integers(0, 5)))
    lab_ids = rng.integers(0, len(SIMULATED_LABS), len(lab_weeks)).tolist()
    return row | {
        S.CONDITION_STAYS: [_stay_of(w, spans) for w in row[S.WEEKS]],
        S.PROCEDURES: rng.integers(0, SIZES[S.PROCEDURE], len(procedure_weeks)).tolist(),
        S.PROCEDURE_WEEKS: procedure_weeks,
        S.PROCEDURE_STAYS: [_stay_of(w, spans) for w in procedure_weeks],
        S.MEDICATIONS: rng.integers(0, SIZES[S.MEDICATION], len(medication_starts)).tolist(),
        S.MEDICATION_START_WEEKS: medication_starts,
        S.MEDICATION_END_WEEKS: [min(w + int(rng.integers(0, 12)), end) for w in medication_starts],
        S.MEDICATION_STAYS: [_stay_of(w, spans) for w in medication_starts],
        S.LABS: lab_ids,
        S.LAB_WEEKS: lab_weeks,
        S.LAB_VALUES: [round(LABS[i].typical * float(rng.uniform(0.8, 1.25)), 1) for i in lab_ids],
        S.LAB_STAYS: [_stay_of(w, spans) for w in lab_weeks],
        S.ADMIT_DAYS: admit,
        S.DISCHARGE_DAYS: discharge,
        S.LENGTH_OF_STAY: los,
    }


def make_participant(rng: np.random.Generator, subject_id: int) -> Row:
    """A valid trial participant: 3-4 visits inside [enroll_day, end_day]."""
    enroll = int(rng.integers(1000, 2000))
    visits = np.sort(rng.choice(np.arange(enroll, enroll + 180, 7), int(rng.integers(3, 5)), replace=False))

    def ids(vocabulary: str, most: int) -> list[list[int]]:
        return [rng.integers(0, SIZES[vocabulary], int(rng.integers(0, most + 1))).tolist() for _ in visits]

    return {
        S.SUBJECT_ID: subject_id,
        S.ARM: subject_id % 2,
        S.ENROLL_DAY: enroll,
        S.END_DAY: enroll + 180,
        S.BASELINE: [round(float(x), 1) for x in rng.uniform(0, 60, len(TRIAL["baseline_features"]))],
        S.VISIT_DAYS: visits.tolist(),
        S.VISIT_TREATMENTS: ids(S.TRIAL_TREATMENT, 2),
        S.VISIT_MEDICATIONS: ids(S.TRIAL_MEDICATION, 2),
        S.VISIT_ADVERSE_EVENTS: ids(S.ADVERSE_EVENT, 2),
        S.SEVERE_OUTCOME: bool(subject_id % 3 == 0),
    }


def base() -> Corpus:
    rng = np.random.default_rng(0)
    ids = np.arange(N_PATIENTS)
    codes = split_codes(ids)
    patients = [
        make_patient(rng, int(i), S.MAX_WORDS + 20 if i == LONG_PATIENT else int(rng.integers(1, 12)))
        for i in ids
    ]
    shards = {}
    for split, code in SPLIT_CODES.items():
        mine = [p for p, c in zip(patients, codes, strict=True) if c == code]
        n = TRAIN_SHARDS if split == S.TRAIN else 1
        shards[split] = [list(part) for part in np.array_split(np.array(mine, dtype=object), n)]
    trial = {split: [make_participant(rng, int(i)) for i in ids[codes == SPLIT_CODES[split]][:n]]
             for split, n in TRIAL_PER_SPLIT.items()}
    codes = [
        {"modality": modality, "id": i, "code": f"{modality[0].upper()}{i:03d}", "name": f"{modality} {i}",
         "parent_code": None, "unit": LABS[i].unit if modality == S.LAB else None,
         "severe": (i % 5 == 0) if modality == S.ADVERSE_EVENT else None}
        for modality in S.VOCABULARIES for i in range(SIZES[modality])
    ]
    return Corpus(shards, codes, trial)


def derived_metadata(corpus: Corpus) -> dict:
    """dataset.json as a writer would derive it from the rows."""
    patients, histogram = {}, {}
    for split, shards in corpus.shards.items():
        rows = [row for rows in shards for row in rows]
        patients[split] = len(rows)
        lengths = Counter(len(row[S.CONDITIONS]) for row in rows)
        histogram[split] = {str(k): v for k, v in sorted(lengths.items())}
    trial = TRIAL | {"participants": {split: len(rows) for split, rows in corpus.trial.items()}}
    meta = S.DatasetMetadata(
        name="broken-corpus-base",
        origin_date="2010-01-04",
        n_weeks=N_WEEKS,
        patients=patients,
        modalities=MODALITIES,
        trial=trial,
        vocab={"diag_age": DIAG_AGE_VOCAB_SIZE, "week": N_SPECIAL + N_WEEKS} | SIZES,
        provenance={"source": "tests/data/make_broken_corpus.py", "seed": 0},
        length_histogram=histogram,
        created_at="2024-01-01T00:00:00+00:00",
    )
    return asdict(meta)


def codes_table(rows: list[dict]) -> pa.Table:
    """``CODES_SCHEMA`` rows; a ``bytes`` value in a text column is written as is (Arrow does
    not check UTF-8 when a binary column is viewed as string), so the encoding rule can be
    broken on purpose."""
    columns = {}
    for f in S.CODES_SCHEMA:
        values = [row[f.name] for row in rows]
        if pa.types.is_string(f.type):
            raw = [v if isinstance(v, bytes) or v is None else v.encode() for v in values]
            columns[f.name] = pa.array(raw, pa.binary()).view(pa.string())
        else:
            columns[f.name] = pa.array(values, f.type)
    return pa.Table.from_arrays(list(columns.values()), schema=S.CODES_SCHEMA)


def complete_row(row: Row) -> Row:
    """A diagnosis-only row with every other modality empty (and no diagnosis in a stay)."""
    filled = {name: [] for name in S.ROW_SCHEMA.names if name not in S.DIAGNOSIS_COLUMNS}
    filled[S.CONDITION_STAYS] = [S.NO_STAY] * len(row[S.CONDITIONS])
    return filled | row


# Tiny files: no statistics and no embedded Arrow schema (Parquet's own types give back the
# same Arrow types), which halves a 24-column shard of four patients.
SMALL = {"write_statistics": False, "store_schema": False}


def write(corpus: Corpus, root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    meta = derived_metadata(corpus) | corpus.metadata_patch
    (root / S.DATASET_JSON).parent.mkdir(parents=True, exist_ok=True)
    (root / S.DATASET_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    pq.write_table(codes_table(corpus.codes), root / S.CODES_PARQUET, **SMALL, compression="zstd")
    for split, shards in corpus.shards.items():
        for i, rows in enumerate(shards):
            name = shard_name(split, i)
            rows = [row | {S.N_EVENTS: len(row[S.CONDITIONS])} for row in rows]
            rows = [complete_row(row) for row in rows]
            table = pa.Table.from_pylist(rows, schema=corpus.file_schemas.get(name, S.ROW_SCHEMA))
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, root / name, **SMALL, compression="none")
    for split, rows in corpus.trial.items():
        name = S.trial_shard_path("", split, 0).as_posix()
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=S.TRIAL_SCHEMA), root / name, **SMALL,
                       compression="none")
    for name, data in corpus.raw_files.items():
        (root / name).write_bytes(data)


# --- Breakages: each breaks one rule and returns where it must be reported. ---------------------

Expected = dict  # file, row, subject_id, what
HELD_OUT_ID, TUNING_ID = 32, 11  # ids split_codes assigns to held_out and tuning


def _at(corpus: Corpus, subject_id: int, what: str) -> tuple[Row, Expected]:
    file, row_index, row = corpus.locate(subject_id)
    return row, {"file": file, "row": row_index, "subject_id": subject_id, "what": what}


def _metadata(c: Corpus) -> Expected:
    c.metadata_patch = {k: derived_metadata(c)[k] for k in ("patients", "length_histogram")}
    c.shards[S.TRAIN][1].pop()
    return {"file": S.DATASET_JSON, "row": None, "subject_id": None,
            "what": "a train patient was deleted after dataset.json was written"}


def _codes(c: Corpus) -> Expected:
    c.codes[-1]["id"] = N_CONDITIONS - 2
    return {"file": S.CODES_PARQUET, "row": None, "subject_id": None,
            "what": f"condition id {N_CONDITIONS - 2} twice, {N_CONDITIONS - 1} missing"}


def _encoding(c: Corpus) -> Expected:
    c.codes[7]["name"] = c.codes[7]["name"].encode()[:4] + b"\xe9" + c.codes[7]["name"].encode()[4:]
    return {"file": S.CODES_PARQUET, "row": 7, "subject_id": None,
            "what": "a latin-1 byte inside a condition name"}


def _unreadable(c: Corpus) -> Expected:
    name = shard_name(S.TUNING, 0)
    c.raw_files[name] = b"PAR1 this shard was truncated in transfer"
    return {"file": name, "row": None, "subject_id": None, "what": "not a Parquet file"}


def _schema(c: Corpus) -> Expected:
    name = shard_name(S.HELD_OUT, 0)
    c.file_schemas[name] = S.ROW_SCHEMA.set(
        S.ROW_SCHEMA.get_field_index(S.WEEKS), pa.field(S.WEEKS, pa.list_(pa.int64()))
    )
    return {"file": name, "row": None, "subject_id": None, "what": "weeks written as list<int64>"}


def _subject_order(c: Corpus) -> Expected:
    rows = c.shards[S.TRAIN][0]
    rows[3], rows[4] = rows[4], rows[3]
    return {"file": shard_name(S.TRAIN, 0), "row": 4, "subject_id": rows[4][S.SUBJECT_ID],
            "what": "rows 3 and 4 swapped"}


def _split(c: Corpus) -> Expected:
    _, index, row = c.locate(TUNING_ID)
    c.shards[S.TUNING][0].pop(index)
    train = c.shards[S.TRAIN][0]
    train.insert(next(i for i, r in enumerate(train) if r[S.SUBJECT_ID] > TUNING_ID), row)
    return _at(c, TUNING_ID, "a tuning patient written to the train split")[1]


def _sex(c: Corpus) -> Expected:
    row, expected = _at(c, HELD_OUT_ID, "sex 0")
    row[S.SEX] = 0
    return expected


def _list_lengths(c: Corpus) -> Expected:
    row, expected = _at(c, 20, "age_groups one item short")
    row[S.AGE_GROUPS].pop()
    return expected


def _empty_sentence(c: Corpus) -> Expected:
    row, expected = _at(c, 21, "no events")
    for name in S.MODALITY_COLUMNS["diagnoses"]:
        row[name] = []
    return expected


def _over_long(c: Corpus) -> Expected:
    row, expected = _at(c, 22, f"{S.MAX_EVENTS + 1} events")
    long = make_patient(np.random.default_rng(1), 22, S.MAX_EVENTS + 1)
    row.update({k: v for k, v in long.items() if k not in (S.SUBJECT_ID, S.SEX)})
    return expected


def _condition_range(c: Corpus) -> Expected:
    row, expected = _at(c, 23, f"condition id {N_CONDITIONS}")
    row[S.CONDITIONS][0] = N_CONDITIONS
    return expected


def _age_group_range(c: Corpus) -> Expected:
    row, expected = _at(c, 24, "120 years old at the last event: age group 24")
    row[S.BIRTH_WEEK] = row[S.WEEKS][-1] - int(120.5 * WEEKS_PER_YEAR)
    row[S.AGE_GROUPS] = age_group_at(np.array(row[S.WEEKS]), row[S.BIRTH_WEEK]).tolist()
    return expected


def _week_range(c: Corpus) -> Expected:
    row, expected = _at(c, 25, f"last event at week {N_WEEKS}")
    row[S.WEEKS][-1] = N_WEEKS
    row[S.AGE_GROUPS][-1] = int(age_group_at(N_WEEKS, row[S.BIRTH_WEEK]))
    return expected


def _sorted_times(c: Corpus) -> Expected:
    row, expected = _at(c, LONG_PATIENT, "two events swapped")
    k = next(k for k in range(len(row[S.WEEKS]) - 1) if row[S.WEEKS][k] < row[S.WEEKS][k + 1])
    for name in S.MODALITY_COLUMNS["diagnoses"]:  # swap whole events: ages stay consistent
        row[name][k], row[name][k + 1] = row[name][k + 1], row[name][k]
    return expected


def _age_consistency(c: Corpus) -> Expected:
    row, expected = _at(c, 26, "age group one too high")
    row[S.AGE_GROUPS][0] += 1
    return expected


def _enrollment(c: Corpus) -> Expected:
    row, expected = _at(c, LONG_PATIENT, "enrollment starts after the first event")
    row[S.ENROLL_START] = row[S.WEEKS][0] + 1
    return expected


def _found(c: Corpus, column: str, what: str, n: int = 1, after: int = 0,
           test: Callable[[Row], bool] = lambda row: True) -> tuple[Row, Expected]:
    """The first patient (id >= ``after``) with ``n`` items in ``column`` (and passing
    ``test``), and where to report it."""
    file, index, row = c.first_with(lambda row: len(row[column]) >= n and test(row), after)
    return row, {"file": file, "row": index, "subject_id": row[S.SUBJECT_ID], "what": what}


def _trial_at(c: Corpus, split: str, index: int, what: str) -> tuple[Row, Expected]:
    row = c.trial[split][index]
    return row, {"file": S.trial_shard_path("", split, 0).as_posix(), "row": index,
                 "subject_id": row[S.SUBJECT_ID], "what": what}


def _unlisted_modality(c: Corpus) -> Expected:
    c.metadata_patch = {"modalities": [m for m in MODALITIES if m != "labs"]}
    return _found(c, S.LABS, "dataset.json's modalities leave out labs, which rows hold")[1]


def _vocab_range(c: Corpus) -> Expected:
    row, expected = _found(c, S.PROCEDURES, f"procedure id {SIZES[S.PROCEDURE]}", after=30)
    row[S.PROCEDURES][0] = SIZES[S.PROCEDURE]
    return expected


def _medication_period(c: Corpus) -> Expected:
    row, expected = _found(c, S.MEDICATIONS, "a medication ending the week before it starts", after=30)
    row[S.MEDICATION_END_WEEKS][0] = row[S.MEDICATION_START_WEEKS][0] - 1
    return expected


def _admission_order(c: Corpus) -> Expected:
    row, expected = _found(c, S.ADMIT_DAYS, "the second stay admitted a day before the first's discharge", n=2)
    row[S.ADMIT_DAYS][1] = row[S.DISCHARGE_DAYS][0] - 1
    row[S.LENGTH_OF_STAY][1] = float(row[S.DISCHARGE_DAYS][1] - row[S.ADMIT_DAYS][1])
    return expected


def _length_of_stay(c: Corpus) -> Expected:
    row, expected = _found(c, S.ADMIT_DAYS, "length_of_stay 3 days longer than discharge - admit", after=30)
    row[S.LENGTH_OF_STAY][0] += 3
    return expected


def _stay_link(c: Corpus) -> Expected:
    row, expected = _found(c, S.ADMIT_DAYS, "a diagnosis linked to an admission one past the last")
    row[S.CONDITION_STAYS][-1] = len(row[S.ADMIT_DAYS])
    return expected


def _stay_window(c: Corpus) -> Expected:
    row, expected = _found(c, S.ADMIT_DAYS, "a lab linked to a stay months away", n=2, after=10,
                           test=lambda row: 1 in row[S.LAB_STAYS])
    row[S.LAB_STAYS][row[S.LAB_STAYS].index(1)] = 0  # its week is in stay 1, months after stay 0
    return expected


def _lab_value_range(c: Corpus) -> Expected:
    row, expected = _found(c, S.LABS, "LDL 2.9: mmol/L where mg/dL is the unit", after=40)
    row[S.LABS][0], row[S.LAB_VALUES][0] = 0, 2.9
    return expected


def _trial_arm(c: Corpus) -> Expected:
    row, expected = _trial_at(c, S.TRAIN, 3, "arm 2")
    row[S.ARM] = 2
    return expected


def _trial_baseline(c: Corpus) -> Expected:
    row, expected = _trial_at(c, S.HELD_OUT, 1, "baseline one value short")
    row[S.BASELINE].pop()
    return expected


def _trial_visits(c: Corpus) -> Expected:
    row, expected = _trial_at(c, S.TUNING, 0, "last visit the day after end_day")
    row[S.VISIT_DAYS][-1] = row[S.END_DAY] + 1
    return expected


BREAKAGES: dict[str, Callable[[Corpus], Expected]] = {
    "metadata": _metadata,
    "codes": _codes,
    "encoding": _encoding,
    "unreadable": _unreadable,
    "schema": _schema,
    "subject_order": _subject_order,
    "split": _split,
    "sex": _sex,
    "list_lengths": _list_lengths,
    "empty_sentence": _empty_sentence,
    "over_long": _over_long,
    "condition_range": _condition_range,
    "age_group_range": _age_group_range,
    "week_range": _week_range,
    "sorted_times": _sorted_times,
    "age_consistency": _age_consistency,
    "enrollment": _enrollment,
    "unlisted_modality": _unlisted_modality,
    "vocab_range": _vocab_range,
    "medication_period": _medication_period,
    "admission_order": _admission_order,
    "length_of_stay": _length_of_stay,
    "stay_link": _stay_link,
    "stay_window": _stay_window,
    "lab_value_range": _lab_value_range,
    "trial_arm": _trial_arm,
    "trial_baseline": _trial_baseline,
    "trial_visits": _trial_visits,
}


def write_broken(rule: str, root: Path) -> Expected:
    """Write the base dataset broken for ``rule`` to ``root``, with its BROKEN.json."""
    corpus = copy.deepcopy(BASE)
    expected = {"rule": rule} | BREAKAGES[rule](corpus)
    write(corpus, root)
    (root / "BROKEN.json").write_text(json.dumps(expected, indent=2) + "\n")
    return expected


BASE = base()


def main(out: Path = OUT_DIR) -> None:
    if out.exists():
        shutil.rmtree(out)
    for rule in BREAKAGES:
        write_broken(rule, out / rule)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {len(BREAKAGES)} broken datasets to {out} ({size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR)
