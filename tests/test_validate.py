"""Dataset validation: a valid dataset passes, and every rule catches its broken shard with an
error naming the right file, row and rule (``tests/data/broken/``, see make_broken_corpus.py)."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mirror.data import schema as S
from mirror.data import validate as V
from mirror.data.vocab import age_group_at
from mirror.data.vocabularies import LABS, vocabulary_sizes

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).parent / "data" / "broken"
_spec = importlib.util.spec_from_file_location(
    "make_broken_corpus", Path(__file__).parent / "data" / "make_broken_corpus.py"
)
corpus = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = corpus  # dataclasses look their module up
_spec.loader.exec_module(corpus)
_spec = importlib.util.spec_from_file_location("full_records", Path(__file__).parent / "data" / "full_records.py")
full_records = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(full_records)


@pytest.fixture
def valid_dataset(tmp_path: Path) -> Path:
    """The corpus base: 80 hand-built patients in three splits, train in two shards."""
    root = tmp_path / "valid"
    corpus.write(corpus.base(), root)
    return root


def write_variant(tmp_path: Path, change) -> Path:
    """The base dataset with ``change(corpus)`` applied, written under ``tmp_path``."""
    c = copy.deepcopy(corpus.BASE)
    change(c)
    corpus.write(c, tmp_path / "variant")
    return tmp_path / "variant"


def base_rows(n: int = 20) -> list[dict]:
    """The first ``n`` patients of the base train shard, as editable Python rows."""
    return copy.deepcopy(corpus.BASE.shards[S.TRAIN][0][:n])


def to_table(rows: list[dict], schema: pa.Schema = S.ROW_SCHEMA) -> pa.Table:
    rows = [corpus.complete_row(r) | {S.N_EVENTS: len(r[S.CONDITIONS])} for r in rows]
    return pa.Table.from_pylist(rows, schema=schema)


def base_table(n: int = 20) -> pa.Table:
    return to_table(base_rows(n))


def with_column(table: pa.Table, name: str, values: list) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))


def check(table: pa.Table, **kwargs) -> list[V.Violation]:
    return V.check_table(table, n_weeks=corpus.N_WEEKS, file="f.parquet", **kwargs)


# --- Whole datasets ----------------------------------------------------------------------------


def test_valid_dataset_passes_with_counts(valid_dataset: Path) -> None:
    report = V.validate_dataset(valid_dataset)
    assert report.ok, report.violations
    assert not report.truncated
    got = {name: (s.files, s.patients, s.rows_checked) for name, s in report.splits.items()}
    assert got == {S.TRAIN: (2, 72, 72), S.TUNING: (1, 4, 4), S.HELD_OUT: (1, 4, 4)}
    trial = {name: (s.files, s.patients, s.rows_checked) for name, s in report.trial_splits.items()}
    assert trial == {S.TRAIN: (1, 6, 6), S.TUNING: (1, 2, 2), S.HELD_OUT: (1, 2, 2)}
    # The long patient is valid data; the report says the training filter will drop it.
    assert report.splits[S.TRAIN].longer_than_max_words == 1
    assert sum(s.longer_than_max_words for s in report.splits.values()) == 1
    report.raise_if_invalid()


def test_corpus_covers_every_rule() -> None:
    assert set(corpus.BREAKAGES) == set(V.RULES)
    assert {p.name for p in CORPUS.iterdir() if p.is_dir()} == set(V.RULES)
    size = sum(p.stat().st_size for p in CORPUS.rglob("*") if p.is_file())
    assert size < 1_500_000


@pytest.mark.parametrize("rule", V.RULES)
def test_broken_shard_triggers_exactly_its_rule(rule: str) -> None:
    root = CORPUS / rule
    expected = json.loads((root / "BROKEN.json").read_text())
    report = V.validate_dataset(root)
    assert not report.ok
    assert {v.rule for v in report.violations} == {rule}, [str(v) for v in report.violations]
    at = [(v.file, v.row, v.subject_id) for v in report.violations]
    assert (expected["file"], expected["row"], expected["subject_id"]) in at
    first = str(report.violations[0])
    assert first.startswith(expected["file"]) and f": {rule}: " in first
    if expected["row"] is not None and expected["subject_id"] is not None:
        assert f" row {expected['row']} (subject {expected['subject_id']}): " in first
    elif expected["row"] is not None:  # a metadata file's row (codes.parquet)
        assert f" row {expected['row']}: " in first
    with pytest.raises(V.DatasetValidationError, match=rule):
        report.raise_if_invalid()


def test_corpus_is_what_the_script_writes(tmp_path: Path) -> None:
    """The committed corpus is current: regenerating it gives the same files and contents."""
    corpus.main(tmp_path)
    committed = sorted(p.relative_to(CORPUS) for p in CORPUS.rglob("*") if p.is_file())
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()) == committed
    for rel in committed:
        a, b = CORPUS / rel, tmp_path / rel
        if rel.suffix == ".parquet" and rel.parts[0] != "unreadable":
            assert pq.read_table(a).equals(pq.read_table(b)), rel
        else:
            assert a.read_bytes() == b.read_bytes(), rel


def test_subject_order_across_files(tmp_path: Path) -> None:
    def swap_train_shards(c) -> None:
        c.shards[S.TRAIN].reverse()

    report = V.validate_dataset(write_variant(tmp_path, swap_train_shards))
    (v,) = report.violations
    assert (v.file, v.row, v.rule) == ("data/train/part-00001.parquet", 0, V.SUBJECT_ORDER)
    assert v.subject_id == 0 and "part-00000.parquet" in v.message


def test_validate_stops_at_max_violations(tmp_path: Path) -> None:
    def no_sex(c) -> None:
        for row in c.shards[S.TRAIN][0]:
            row[S.SEX] = 0

    report = V.validate_dataset(write_variant(tmp_path, no_sex), max_violations=5)
    assert len(report.violations) == 5 and report.truncated
    assert [v.row for v in report.violations] == [0, 1, 2, 3, 4]


def edit_json(root: Path, change) -> Path:
    path = root / S.DATASET_JSON
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))
    return root


def move_histogram_bucket(meta: dict) -> None:
    """Same sum, so only the comparison with the rows can catch it."""
    train = meta["length_histogram"][S.TRAIN]
    train["4999"] = train.pop("1")


METADATA_CASES = {
    "missing": (lambda root: (root / S.DATASET_JSON).unlink(), "missing"),
    "not json": (lambda root: (root / S.DATASET_JSON).write_text("{"), "not readable JSON"),
    "version": (lambda r: edit_json(r, lambda m: m.update(schema_version=3)), "schema_version 3"),
    "version 1": (lambda r: edit_json(r, lambda m: m.update(schema_version=1)), "schema version 1 holds diagnoses only"),
    "unknown key": (lambda r: edit_json(r, lambda m: m.update(colour=1)), "unknown keys ['colour']"),
    "missing field": (lambda r: edit_json(r, lambda m: m.pop("n_weeks")), "['n_weeks']"),
    "n_weeks": (lambda r: edit_json(r, lambda m: m.update(n_weeks=0)), "n_weeks must be"),
    "week vocab": (lambda r: edit_json(r, lambda m: m["vocab"].update(week=9)), "vocab must"),
    "split names": (lambda r: edit_json(r, lambda m: m["patients"].pop("tuning")), "patients must"),
    "histogram sum": (
        lambda r: edit_json(r, lambda m: m["length_histogram"]["tuning"].update({"1": 99})),
        "sums to",
    ),
    "histogram vs data": (
        lambda root: edit_json(root, move_histogram_bucket),
        "length_histogram['train'] disagrees with the data; n_events: declared vs found "
        "patients: 1: 0 vs",
    ),
    "unknown split dir": (
        lambda root: (root / S.DATA_DIR / "test").mkdir(),
        "unknown split directories ['test']",
    ),
    "unknown modality": (
        lambda r: edit_json(r, lambda m: m.update(modalities=["diagnoses", "notes"])),
        "modalities must list each modality at most once",
    ),
    "record vocab size": (
        lambda r: edit_json(r, lambda m: m["vocab"].update(procedure=300)),
        "vocab sizes {'procedure': 300} differ from the platform's vocabularies {'procedure': 206}",
    ),
    "trial participants vs rows": (
        lambda r: edit_json(r, lambda m: m["trial"]["participants"].update(tuning=3)),
        "trial['participants']['tuning'] is 3, but trial/tuning/ holds 2 rows",
    ),
    "trial without baseline features": (
        lambda r: edit_json(r, lambda m: m["trial"].pop("baseline_features")),
        "trial['baseline_features'] must list unique, non-empty feature names",
    ),
    "trial part without trial": (
        lambda r: edit_json(r, lambda m: m.update(trial={})),
        "trial/ holds a trial part, but dataset.json's trial is empty",
    ),
    "trial vocabulary": (
        lambda r: edit_json(r, lambda m: m["vocab"].pop("adverse_event")),
        "a trial part needs the trial vocabulary sizes in vocab: missing ['adverse_event']",
    ),
}


@pytest.mark.parametrize("case", METADATA_CASES)
def test_metadata_rule(valid_dataset: Path, case: str) -> None:
    change, message = METADATA_CASES[case]
    change(valid_dataset)
    report = V.validate_dataset(valid_dataset)
    assert {v.rule for v in report.violations} == {V.METADATA}
    assert all(v.file == S.DATASET_JSON for v in report.violations)
    assert any(message in v.message for v in report.violations), report.violations


def test_codes_missing(valid_dataset: Path) -> None:
    (valid_dataset / S.CODES_PARQUET).unlink()
    (v,) = V.validate_dataset(valid_dataset).violations
    assert (v.file, v.rule, v.message) == (S.CODES_PARQUET, V.CODES, "missing")


# --- One batch: check_table ----------------------------------------------------------------------


def test_violation_format() -> None:
    v = V.Violation("data/train/part-00003.parquet", 17, 123, V.SORTED_TIMES, "week 40 follows week 52")
    assert str(v) == "data/train/part-00003.parquet row 17 (subject 123): sorted_times: week 40 follows week 52"
    assert str(V.Violation("x.parquet", None, None, V.SCHEMA, "m")) == "x.parquet: schema: m"
    err = V.DatasetValidationError([v] * 12)
    assert isinstance(err, ValueError) and str(v) in str(err) and "and 2 more" in str(err)


def test_valid_batch_and_long_sentences_pass() -> None:
    table = base_table()
    assert check(table, split=S.TRAIN) == []
    long = table.filter(pc.greater(table[S.N_EVENTS], S.MAX_WORDS))
    assert long.num_rows == 1  # > MAX_WORDS is valid data: the training filter drops it
    assert check(table.slice(0, 0)) == []


def test_row_numbers_through_slices_and_chunks() -> None:
    rows = base_rows()
    k = next(k for k in range(12, 20) if len(set(rows[k][S.WEEKS])) > 1)
    for name in S.MODALITY_COLUMNS["diagnoses"]:  # reverse whole events: only the time order breaks
        rows[k][name].reverse()
    broken = to_table(rows)
    (v,) = check(broken)
    assert (v.row, v.subject_id, v.rule) == (k, rows[k][S.SUBJECT_ID], V.SORTED_TIMES)
    # A slice keeps its Arrow offsets; first_row says where it starts in the file.
    (v,) = check(broken.slice(10), first_row=10)
    assert v.row == k
    chunked = pa.concat_tables([broken.slice(0, 11), broken.slice(11)])
    assert chunked[S.WEEKS].num_chunks == 2
    (v,) = check(chunked, first_row=100)
    assert v.row == 100 + k


def test_sorted_times_ignores_patient_boundaries() -> None:
    """Weeks fall from one patient to the next (and across an empty one): not a violation."""
    rows = [
        {**corpus.make_patient(np.random.default_rng(i), i, 3, full=False), S.ENROLL_START: 0, S.ENROLL_END: 519}
        for i in range(3)
    ]
    rows[0][S.WEEKS] = [400, 500, 510]
    rows[1].update({S.CONDITIONS: [], S.AGE_GROUPS: [], S.WEEKS: []})
    rows[2][S.WEEKS] = [3, 4, 4]
    for row in rows:
        row[S.AGE_GROUPS] = age_group_at(np.array(row[S.WEEKS]), row[S.BIRTH_WEEK]).tolist()
        row[S.N_EVENTS] = len(row[S.WEEKS])
    found = check(to_table(rows))
    assert [(v.row, v.rule) for v in found] == [(1, V.EMPTY_SENTENCE)]


def test_row_rules_on_a_batch() -> None:
    table = base_table()
    ids = table[S.SUBJECT_ID].to_pylist()
    (v,) = check(table, previous_subject_id=ids[0])
    assert (v.row, v.rule, v.message) == (0, V.SUBJECT_ORDER, f"duplicate subject id {ids[0]}")
    (v,) = check(with_column(table, S.SUBJECT_ID, [-1] + ids[1:]), split=S.TRAIN)
    assert (v.row, v.rule) == (0, V.SPLIT) and "negative" in v.message
    start = table[S.ENROLL_START].to_pylist()
    end = table[S.ENROLL_END].to_pylist()
    found = check(with_column(table, S.ENROLL_END, [start[0] - 1] + end[1:]))
    assert {(v.row, v.rule) for v in found} == {(0, V.ENROLLMENT)}
    assert "start after end" in found[0].message
    births = table[S.BIRTH_WEEK].to_pylist()
    first_week = table[S.WEEKS][2].as_py()[0]
    (v,) = check(with_column(table, S.BIRTH_WEEK, births[:2] + [first_week + 1] + births[3:]))
    assert (v.row, v.rule) == (2, V.AGE_CONSISTENCY) and "precedes birth" in v.message


def test_max_violations_caps_a_batch() -> None:
    table = base_table()
    found = check(with_column(table, S.SEX, [0] * table.num_rows), max_violations=3)
    assert [(v.row, v.rule) for v in found] == [(0, V.SEX), (1, V.SEX), (2, V.SEX)]


def test_schema_rule_variants() -> None:
    table = base_table()
    (v,) = check(table.drop_columns([S.SEX]))
    assert (v.rule, v.row) == (V.SCHEMA, None) and "missing column 'sex'" in v.message
    (v,) = check(table.append_column("split", pa.array(["train"] * table.num_rows)))
    assert "unknown columns ['split']" in v.message
    (v,) = check(table.set_column(1, S.SEX, table[S.SEX].cast(pa.int32())))
    assert "column 'sex' is int32, expected int8" in v.message
    nullable = pa.schema([f.with_nullable(True) for f in S.ROW_SCHEMA])
    ids = table[S.SUBJECT_ID].to_pylist()
    with_null = table.cast(nullable).set_column(0, nullable.field(0), pa.array([*ids[:4], None, *ids[5:]], pa.int64()))
    (v,) = check(with_null)
    assert (v.rule, v.row) == (V.SCHEMA, 4) and "null values in column 'subject_id'" in v.message
    weeks = table[S.WEEKS].to_pylist()
    weeks[6][0] = None
    (v,) = check(with_column(table.cast(nullable), S.WEEKS, weeks))
    assert (v.rule, v.row) == (V.SCHEMA, 6) and "inside lists of column 'weeks'" in v.message


def test_check_file_numbers_rows_across_batches(tmp_path: Path) -> None:
    root = CORPUS / V.SORTED_TIMES
    expected = json.loads((root / "BROKEN.json").read_text())
    for batch_rows in (2, 7, 1000):
        result = V.check_file(root, expected["file"], n_weeks=corpus.N_WEEKS, split=S.TRAIN,
                              batch_rows=batch_rows)
        assert [(v.row, v.rule) for v in result.violations] == [(expected["row"], V.SORTED_TIMES)]
        assert result.rows == 36 and result.complete
    # A duplicate id exactly at a batch boundary is still caught.
    table = base_table()
    ids = table[S.SUBJECT_ID].to_pylist()
    ids[7] = ids[6]
    pq.write_table(with_column(table, S.SUBJECT_ID, ids), tmp_path / "dup.parquet")
    result = V.check_file(tmp_path, "dup.parquet", n_weeks=corpus.N_WEEKS, split=None, batch_rows=7)
    assert [(v.row, v.rule) for v in result.violations] == [(7, V.SUBJECT_ORDER)]
    # Nulls (in a file written with a nullable schema) are a schema violation at their row.
    nullable = pa.schema([f.with_nullable(True) for f in S.ROW_SCHEMA])
    n_events = table[S.N_EVENTS].to_pylist()
    n_events[9] = None
    pq.write_table(with_column(table.cast(nullable), S.N_EVENTS, n_events), tmp_path / "null.parquet")
    result = V.check_file(tmp_path, "null.parquet", n_weeks=corpus.N_WEEKS, split=None, batch_rows=7)
    assert [(v.row, v.rule) for v in result.violations] == [(9, V.SCHEMA)] and not result.complete


# --- Ray and the CLI -----------------------------------------------------------------------------


def test_parallel_matches_sequential(ray_cluster, valid_dataset: Path) -> None:
    assert V.validate_dataset(valid_dataset, parallel=True).ok
    for rule in (V.SUBJECT_ORDER, V.METADATA, V.UNREADABLE, V.ENROLLMENT):
        sequential = V.validate_dataset(CORPUS / rule)
        parallel = V.validate_dataset(CORPUS / rule, parallel=True)
        assert parallel.violations == sequential.violations
        assert parallel.splits == sequential.splits


def test_simulated_dataset_validates_clean(ray_cluster, tmp_path: Path) -> None:
    simulator = pytest.importorskip("mirror.data.simulator")
    from mirror.data.splits import expected_counts

    meta = simulator.generate_dataset(tmp_path / "sim", 3000, seed=0)
    report = V.validate_dataset(tmp_path / "sim")
    assert report.ok, [str(v) for v in report.violations[:10]]
    assert {s: r.rows_checked for s, r in report.splits.items()} == expected_counts(3000)
    for split, r in report.splits.items():
        long = sum(v for k, v in meta.length_histogram[split].items() if int(k) > S.MAX_WORDS)
        assert r.longer_than_max_words == long


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "validate.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_cli_valid_dataset_exits_zero(valid_dataset: Path) -> None:
    out = run_cli(str(valid_dataset))
    assert out.returncode == 0, out.stdout + out.stderr
    assert ": OK" in out.stdout
    train = next(line for line in out.stdout.splitlines() if line.startswith("train"))
    assert train.split() == ["train", "2", "72", "72", "1", "0"]


def test_cli_broken_dataset_lists_errors(tmp_path: Path) -> None:
    out = run_cli(str(CORPUS / V.SORTED_TIMES))
    assert out.returncode == 1
    assert "data/train/part-00000.parquet row 5 (subject 5): sorted_times: week" in out.stdout

    def many(c) -> None:
        for row in c.shards[S.HELD_OUT][0]:
            row[S.SEX] = 2

    out = run_cli(str(write_variant(tmp_path, many)), "--max-errors", "2")
    assert out.returncode == 1
    lines = [line for line in out.stdout.splitlines() if ": sex: " in line]
    assert lines == [f"data/held_out/part-00000.parquet row {r} (subject {s}): sex: sex 2, expected -1 "
                     f"(male) or 1 (female)" for r, s in ((0, 19), (1, 32))]
    assert "there may be more" in out.stdout

    out = run_cli(str(CORPUS / V.STAY_WINDOW))
    expected = json.loads((CORPUS / V.STAY_WINDOW / "BROKEN.json").read_text())
    assert out.returncode == 1
    assert (f"{expected['file']} row {expected['row']} (subject {expected['subject_id']}): stay_window: "
            f"lab_stays links the event at week ") in out.stdout
    trial = out.stdout.splitlines().index(next(line for line in out.stdout.splitlines() if line.startswith("trial")))
    assert out.stdout.splitlines()[trial + 1].split() == ["train", "1", "6", "6", "0"]

    out = run_cli(str(tmp_path / "nowhere"))
    assert out.returncode == 1 and "metadata/dataset.json: metadata: missing" in out.stdout


def test_validation_error_survives_pickling_with_its_message():
    """Readers raise it inside Ray tasks; the driver must see the same file/row/rule text."""
    import pickle

    error = V.DatasetValidationError([V.Violation("f.parquet", 3, 7, "sex", "sex 0 not in {-1, 1}")])
    restored = pickle.loads(pickle.dumps(error))
    assert str(restored) == str(error) and restored.violations == error.violations


# --- Whole records -------------------------------------------------------------------------------


def test_whole_record_batches_pass() -> None:
    """Random valid whole records (every modality, stays linked) give no violation, also
    diagnosis-only and as a projected read of the diagnosis columns."""
    table = full_records.full_record_table(3000, seed=1)
    assert len(table[S.ADMIT_DAYS].combine_chunks().values) > 500  # stays to link to
    assert np.asarray(table[S.LAB_STAYS].combine_chunks().values).max() >= 1
    assert check(table, split=None, modalities=S.MODALITIES) == []
    assert check(full_records.diagnosis_only(table), modalities=["diagnoses"]) == []
    read = V.columns_to_read(S.MODEL_COLUMNS)
    assert check(table.select(read), columns=read) == []


def test_projected_read_checks_what_it_read() -> None:
    table = full_records.full_record_table(50, seed=2)
    rows = table.to_pylist()
    k = next(i for i, r in enumerate(rows) if r[S.LAB_VALUES])
    rows[k][S.LAB_VALUES][0] = float("nan")
    rows[k + 1][S.WEEKS][-1] = corpus.N_WEEKS
    broken = pa.Table.from_pylist(rows, schema=S.ROW_SCHEMA)
    read = V.columns_to_read(S.MODEL_COLUMNS)
    assert [(v.row, v.rule) for v in check(broken.select(read), columns=read)] == [(k + 1, V.WEEK_RANGE)]
    labs = V.columns_to_read([S.LABS, S.LAB_VALUES, S.LAB_STAYS])
    assert S.ADMIT_DAYS in labs and S.WEEKS not in labs  # stays are checked against admissions
    (v,) = check(broken.select(labs), columns=labs)
    assert (v.row, v.rule) == (k, V.LAB_VALUE_RANGE) and "value nan" in v.message
    with pytest.raises(ValueError, match="must include"):
        check(broken.select([S.SUBJECT_ID, S.WEEKS]), columns=[S.SUBJECT_ID, S.WEEKS])
    (v,) = check(broken.select(read), columns=[*read, S.LABS])
    assert v.rule == V.SCHEMA and "missing column 'labs'" in v.message


def _first(rows: list[dict], test) -> int:
    return next(i for i, r in enumerate(rows) if test(r))


def _procedure_lengths(rows):
    k = _first(rows, lambda r: r[S.PROCEDURES])
    rows[k][S.PROCEDURE_WEEKS].pop()
    n = len(rows[k][S.PROCEDURES])
    return k, V.LIST_LENGTHS, f"procedures: {n} procedures, {n - 1} procedure_weeks, {n} procedure_stays"


def _unsorted_procedures(rows):
    k = _first(rows, lambda r: len(set(r[S.PROCEDURE_WEEKS])) > 1)
    for name in S.MODALITY_COLUMNS["procedures"]:
        rows[k][name].reverse()
    return k, V.SORTED_TIMES, "procedure_weeks: week"


def _medication_after_enrollment(rows):
    k = _first(rows, lambda r: r[S.MEDICATIONS] and r[S.ENROLL_END] < corpus.N_WEEKS - 1)
    rows[k][S.MEDICATION_END_WEEKS][-1] = rows[k][S.ENROLL_END] + 1
    return k, V.ENROLLMENT, "medication_end_weeks: week"


def _admission_before_enrollment(rows):
    k = _first(rows, lambda r: r[S.ADMIT_DAYS] and r[S.ENROLL_START] > 0)
    row = rows[k]
    shift = row[S.ADMIT_DAYS][0] - (row[S.ENROLL_START] * 7 - 1)
    row[S.ADMIT_DAYS][0] -= shift
    row[S.LENGTH_OF_STAY][0] += shift  # keep the stay's length consistent: one rule
    return k, V.ENROLLMENT, "admit_days: day"


def _discharge_before_admit(rows):
    k = _first(rows, lambda r: r[S.ADMIT_DAYS] and r[S.DISCHARGE_DAYS][0] > r[S.ADMIT_DAYS][0])
    row = rows[k]
    row[S.ADMIT_DAYS][0], row[S.DISCHARGE_DAYS][0] = row[S.DISCHARGE_DAYS][0], row[S.ADMIT_DAYS][0]
    return k, V.ADMISSION_ORDER, "stay 0: discharge day"


def _negative_length_of_stay(rows):
    k = _first(rows, lambda r: r[S.ADMIT_DAYS])
    rows[k][S.LENGTH_OF_STAY][0] = -0.5
    return k, V.LENGTH_OF_STAY, "not a finite number >= 0"


def _stay_below_no_stay(rows):
    k = _first(rows, lambda r: r[S.MEDICATIONS])
    rows[k][S.MEDICATION_STAYS][0] = -2
    return k, V.STAY_LINK, "medication_stays: stay -2"


def _linked_week_out_of_range(rows):
    """A linked diagnosis at week n_weeks: only week_range (not its stay, order, age or
    enrollment)."""
    k = _first(rows, lambda r: max(r[S.CONDITION_STAYS]) >= 0)
    row = rows[k]
    row[S.WEEKS][row[S.CONDITION_STAYS].index(0)] = corpus.N_WEEKS
    return k, V.WEEK_RANGE, f"week {corpus.N_WEEKS} outside"


def _lab_outside_vocabulary(rows):
    """An unknown lab id: only vocab_range (its plausible range is unknown)."""
    k = _first(rows, lambda r: r[S.LABS])
    rows[k][S.LABS][0] = len(LABS)
    return k, V.VOCAB_RANGE, f"lab id {len(LABS)} outside [0, {len(LABS)})"


def _medication_outside_vocabulary(rows):
    k = _first(rows, lambda r: r[S.MEDICATIONS])
    rows[k][S.MEDICATIONS][-1] = -1
    return k, V.VOCAB_RANGE, f"medication id -1 outside [0, {vocabulary_sizes()[S.MEDICATION]})"


WHOLE_RECORD_CASES = {f.__name__.strip("_"): f for f in (
    _procedure_lengths, _unsorted_procedures, _medication_after_enrollment,
    _admission_before_enrollment, _discharge_before_admit, _negative_length_of_stay,
    _stay_below_no_stay, _linked_week_out_of_range, _lab_outside_vocabulary,
    _medication_outside_vocabulary,
)}


@pytest.mark.parametrize("case", WHOLE_RECORD_CASES)
def test_whole_record_rule(case: str) -> None:
    """One breakage in a valid whole-record batch gives exactly one violation, at its row."""
    rows = full_records.full_record_table(60, seed=3).to_pylist()
    k, rule, message = WHOLE_RECORD_CASES[case](rows)
    found = check(pa.Table.from_pylist(rows, schema=S.ROW_SCHEMA), first_row=100)
    assert [(v.row, v.subject_id, v.rule) for v in found] == [(100 + k, rows[k][S.SUBJECT_ID], rule)], found
    assert message in found[0].message


def test_unlisted_modality_counts_rows() -> None:
    table = full_records.full_record_table(200, seed=4)
    with_labs = np.flatnonzero(np.diff(np.asarray(table[S.LABS].combine_chunks().offsets)) > 0)
    (v,) = check(table, modalities=["diagnoses", "procedures", "medications", "admissions"])
    assert (v.row, v.rule) == (with_labs[0], V.UNLISTED_MODALITY)
    assert f"labs hold items in {len(with_labs)} row(s) of this batch" in v.message
    assert "leave out 'labs'" in v.message


def test_age_group_arithmetic_matches_the_vocabulary() -> None:
    """check_table's integer age group equals vocab.age_group_at wherever either is a valid
    group (so the age_consistency verdict is the same)."""
    weeks = np.arange(-40_000, 40_000)
    exact, vocab = V._age_group(weeks, np.zeros_like(weeks)), age_group_at(weeks, 0)
    in_range = (vocab >= 0) & (vocab < 24)
    assert np.array_equal(exact[in_range], vocab[in_range])
    assert not ((exact >= 0) & (exact < 24) & ~in_range).any()


def test_trial_table_rules() -> None:
    rows = copy.deepcopy(corpus.BASE.trial[S.TRAIN])
    table = pa.Table.from_pylist(rows, schema=S.TRIAL_SCHEMA)
    assert V.check_trial_table(table, file="t.parquet", split=S.TRAIN, baseline_width=3) == []
    rows[1][S.VISIT_ADVERSE_EVENTS].pop()
    rows[2][S.VISIT_TREATMENTS][0] = [99]
    rows[4][S.END_DAY] = rows[4][S.ENROLL_DAY] - 1
    found = V.check_trial_table(pa.Table.from_pylist(rows, schema=S.TRIAL_SCHEMA), file="t.parquet")
    assert [(v.row, v.rule) for v in found] == [(1, V.LIST_LENGTHS), (4, V.TRIAL_VISITS)]
    assert "visits: " in found[0].message and "after end_day" in found[1].message
    rows[1][S.VISIT_ADVERSE_EVENTS].append([])
    rows[4][S.END_DAY] = rows[4][S.ENROLL_DAY] + 180
    (v,) = V.check_trial_table(pa.Table.from_pylist(rows, schema=S.TRIAL_SCHEMA), file="t.parquet")
    assert (v.row, v.rule) == (2, V.VOCAB_RANGE) and "visit_treatments: trial_treatment id 99" in v.message
    (v,) = V.check_trial_table(table.drop_columns([S.ARM]), file="t.parquet")
    assert v.rule == V.SCHEMA and "missing column 'arm'" in v.message
