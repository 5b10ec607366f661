"""Write ``tests/data/broken/``: one tiny dataset per validation rule, each broken in one way.

    .venv/bin/python tests/data/make_broken_corpus.py [OUT_DIR]

Every ``broken/<rule>/`` directory is the same valid base dataset (:func:`base`, 80 patients
in three splits, train in two shards) with one breakage from ``BREAKAGES`` applied, plus a
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

OUT_DIR = Path(__file__).parent / "broken"
N_PATIENTS = 80  # ids 0..79: 72 train, 4 tuning, 4 held_out
N_WEEKS = 520
TRAIN_SHARDS = 2
LONG_PATIENT = 5  # MAX_WORDS + 20 events: valid data that the training filter drops
Row = dict  # one patient: ROW_SCHEMA column -> value (n_events derived when written)


@dataclass
class Corpus:
    """A dataset in memory, as plain Python rows, so that breaking it is one readable line."""

    shards: dict[str, list[list[Row]]]  # split -> shard -> patients in id order
    codes: list[dict]
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


def shard_name(split: str, index: int) -> str:
    return S.shard_path("", split, index).as_posix()


def make_patient(rng: np.random.Generator, subject_id: int, n_events: int) -> Row:
    """A valid patient: events sorted in time, inside enrollment, ages from the birth week."""
    birth = int(rng.integers(-80 * 52, -52))
    start = int(rng.integers(0, 200))
    end = int(rng.integers(start + 100, N_WEEKS))
    weeks = np.sort(rng.integers(start, end + 1, n_events))
    return {
        S.SUBJECT_ID: subject_id,
        S.SEX: int(rng.choice([-1, 1])),
        S.BIRTH_WEEK: birth,
        S.ENROLL_START: start,
        S.ENROLL_END: end,
        S.CONDITIONS: rng.integers(0, N_CONDITIONS, n_events).tolist(),
        S.AGE_GROUPS: age_group_at(weeks, birth).tolist(),
        S.WEEKS: weeks.tolist(),
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
    condition_codes = [
        {"modality": S.CONDITION, "id": i, "code": f"C{i:03d}", "name": f"condition {i}",
         "parent_code": None, "unit": None, "severe": None}
        for i in range(N_CONDITIONS)
    ]
    return Corpus(shards, condition_codes)


def derived_metadata(corpus: Corpus) -> dict:
    """dataset.json as a writer would derive it from the rows."""
    patients, histogram = {}, {}
    for split, shards in corpus.shards.items():
        rows = [row for rows in shards for row in rows]
        patients[split] = len(rows)
        lengths = Counter(len(row[S.CONDITIONS]) for row in rows)
        histogram[split] = {str(k): v for k, v in sorted(lengths.items())}
    meta = S.DatasetMetadata(
        name="broken-corpus-base",
        origin_date="2010-01-04",
        n_weeks=N_WEEKS,
        patients=patients,
        vocab={"diag_age": DIAG_AGE_VOCAB_SIZE, "week": N_SPECIAL + N_WEEKS},
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


def write(corpus: Corpus, root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    meta = derived_metadata(corpus) | corpus.metadata_patch
    (root / S.DATASET_JSON).parent.mkdir(parents=True, exist_ok=True)
    (root / S.DATASET_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    pq.write_table(codes_table(corpus.codes), root / S.CODES_PARQUET, compression="zstd")
    for split, shards in corpus.shards.items():
        for i, rows in enumerate(shards):
            name = shard_name(split, i)
            rows = [row | {S.N_EVENTS: len(row[S.CONDITIONS])} for row in rows]
            rows = [complete_row(row) for row in rows]
            table = pa.Table.from_pylist(rows, schema=corpus.file_schemas.get(name, S.ROW_SCHEMA))
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, root / name, compression="zstd")
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
    for name in S.EVENT_COLUMNS:
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
    for name in S.EVENT_COLUMNS:  # swap whole events: ages stay consistent
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
