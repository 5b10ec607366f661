"""MEDS export: every modality and the trial part become MEDS rows that pass the meds
package's own schema checks, counts reconcile exactly with the source's list lengths, every
code is listed, splits are kept, and the job refuses what it must with one line."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import meds
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mirror.data import schema as S
from mirror.data import vocabularies as V
from mirror.data.meds_export import MedsExportError, build_vocabulary, export_meds
from mirror.data.simulator import generate_dataset
from mirror.data.splits import SPLIT_CODES, split_codes
from mirror.data.vocab import DIAG_AGE_VOCAB_SIZE, N_CONDITIONS, N_SPECIAL, age_group_at

REPO = Path(__file__).resolve().parents[1]
ORIGIN = "2010-01-04"
N_WEEKS = 520
BASELINE_FEATURES = ["age", "ecog", "tumour_size"]
SPLIT_NAMES = {code: name for name, code in SPLIT_CODES.items()}

# Output code -> reconciliation category, written independently of the exporter.
PREFIXES = (
    ("GENDER//", "gender"), ("MEDS_BIRTH", "birth"), ("ENROLLMENT//START", "enrollment_start"),
    ("ENROLLMENT//END", "enrollment_end"), ("ICD10CM//", "diagnoses"), ("CCS-PR//", "procedures"),
    ("LOINC//", "labs"), ("HOSPITAL_ADMISSION", "admissions"), ("HOSPITAL_DISCHARGE", "discharges"),
    ("TRIAL//ARM//", "trial_arms"), ("TRIAL//BASELINE//", "trial_baseline"),
    ("TRIAL//VISIT", "trial_visits"), ("TRIAL//TREATMENT//", "trial_treatments"),
    ("TRIAL//MEDICATION//", "trial_medications"), ("TRIAL//AE//", "trial_adverse_events"),
    ("TRIAL//END", "trial_ends"), ("TRIAL//SEVERE_OUTCOME", "trial_severe_outcomes"),
)  # fmt: skip


def category(code: str) -> str:
    if code.startswith("ATC//"):
        return "medication_starts" if code.endswith("//START") else "medication_ends"
    return next(cat for prefix, cat in PREFIXES if code.startswith(prefix))


# --- A small full-record dataset, built by hand -------------------------------------------------


def _patient(rng: np.random.Generator, sid: int) -> dict:
    birth = int(rng.integers(-3000, -500))
    start, end = int(rng.integers(0, 100)), int(rng.integers(300, N_WEEKS))
    n_adm = int(rng.integers(0, 3))
    admit = np.sort(rng.choice(np.arange(start * 7, end * 7, 30), n_adm, replace=False)).tolist()
    discharge = [a + int(rng.integers(0, 5)) for a in admit]

    def weeks(n: int) -> list[int]:
        return np.sort(rng.integers(start, end + 1, n)).tolist()

    def stays(n: int) -> list[int]:
        return [int(rng.integers(-1, n_adm)) if n_adm else -1 for _ in range(n)]

    n_dx, n_pr, n_med, n_lab = (int(rng.integers(lo, 6)) for lo in (1, 0, 0, 0))
    dx_weeks = weeks(n_dx)
    med_start = weeks(n_med)
    return {
        S.SUBJECT_ID: sid, S.SEX: int(rng.choice([-1, 1])), S.BIRTH_WEEK: birth,
        S.ENROLL_START: start, S.ENROLL_END: end, S.N_EVENTS: n_dx,
        S.CONDITIONS: rng.integers(0, N_CONDITIONS, n_dx).tolist(),
        S.AGE_GROUPS: [age_group_at(w, birth) for w in dx_weeks], S.WEEKS: dx_weeks,
        S.CONDITION_STAYS: stays(n_dx),
        S.PROCEDURES: rng.integers(0, len(V.procedure_categories()), n_pr).tolist(),
        S.PROCEDURE_WEEKS: weeks(n_pr), S.PROCEDURE_STAYS: stays(n_pr),
        S.MEDICATIONS: rng.integers(0, len(V.drug_classes()), n_med).tolist(),
        S.MEDICATION_START_WEEKS: med_start,
        S.MEDICATION_END_WEEKS: [min(w + int(rng.integers(0, 20)), end) for w in med_start],
        S.MEDICATION_STAYS: stays(n_med),
        S.LABS: rng.integers(0, len(V.LABS), n_lab).tolist(), S.LAB_WEEKS: weeks(n_lab),
        S.LAB_VALUES: rng.uniform(1, 200, n_lab).round(1).tolist(), S.LAB_STAYS: stays(n_lab),
        S.ADMIT_DAYS: admit, S.DISCHARGE_DAYS: discharge,
        S.LENGTH_OF_STAY: [d - a + 0.5 for a, d in zip(admit, discharge, strict=True)],
    }  # fmt: skip


def _participant(rng: np.random.Generator, sid: int) -> dict:
    enroll = int(rng.integers(100, 2000))
    n_visits = int(rng.integers(1, 5))
    days = (enroll + np.cumsum(rng.integers(7, 30, n_visits))).tolist()

    def per_visit(size: int) -> list[list[int]]:
        return [rng.choice(size, int(rng.integers(0, 3)), replace=False).tolist() for _ in days]

    return {
        S.SUBJECT_ID: sid, S.ARM: int(rng.integers(0, 2)), S.ENROLL_DAY: enroll,
        S.END_DAY: days[-1] + 10, S.BASELINE: rng.normal(size=len(BASELINE_FEATURES)).tolist(),
        S.VISIT_DAYS: days, S.VISIT_TREATMENTS: per_visit(len(V.TRIAL_TREATMENTS)),
        S.VISIT_MEDICATIONS: per_visit(len(V.TRIAL_MEDICATIONS)),
        S.VISIT_ADVERSE_EVENTS: per_visit(len(V.ADVERSE_EVENTS)),
        S.SEVERE_OUTCOME: bool(rng.random() < 0.4),
    }  # fmt: skip


def write_full_record(root: Path, n_patients: int = 60, seed: int = 1) -> S.DatasetMetadata:
    """Patients 0..n-1 with every modality (train in two shards), and trial participants:
    some are patients (merged into their patient's shard), some are not (ids >= 10**5)."""
    rng = np.random.default_rng(seed)
    ids = np.arange(n_patients)
    codes = split_codes(ids)
    patients, histogram = {}, {}
    for split in S.SPLITS:
        rows = [_patient(rng, int(i)) for i in ids[codes == SPLIT_CODES[split]]]
        shards = [rows[: len(rows) // 2], rows[len(rows) // 2 :]] if split == S.TRAIN else [rows]
        for k, part in enumerate(shards):
            S.shard_path(root, split, k).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(part, schema=S.ROW_SCHEMA), S.shard_path(root, split, k),
                           row_group_size=7)  # several row groups per shard
        patients[split] = len(rows)
        histogram[split] = {str(k): v for k, v in Counter(r[S.N_EVENTS] for r in rows).items()}
    trial_ids = np.r_[ids[::4], 10**5 + np.arange(0, 40, 3)]
    trial_codes = split_codes(trial_ids)
    participants = {}
    for split in S.SPLITS:
        rows = [_participant(rng, int(i)) for i in trial_ids[trial_codes == SPLIT_CODES[split]]]
        S.trial_shard_path(root, split, 0).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=S.TRIAL_SCHEMA), S.trial_shard_path(root, split, 0))
        participants[split] = len(rows)
    (root / S.METADATA_DIR).mkdir()
    pq.write_table(V.codes_table(), root / S.CODES_PARQUET)
    meta = S.DatasetMetadata(
        name="full-record-test", origin_date=ORIGIN, n_weeks=N_WEEKS, patients=patients,
        vocab={"diag_age": DIAG_AGE_VOCAB_SIZE, "week": N_SPECIAL + N_WEEKS} | V.vocabulary_sizes(),
        provenance={"built_by": "tests/test_export_meds.py"}, length_histogram=histogram,
        modalities=list(S.MODALITIES),
        trial={"participants": participants, "arms": ["AC", "AC-T"], "baseline_features": BASELINE_FEATURES},
    )  # fmt: skip
    meta.write(root)
    return meta


@pytest.fixture(scope="module")
def full_record(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("full") / "dataset"
    write_full_record(root)
    return root


# --- Independent checks on a written export ----------------------------------------------------


def source_counts(root: Path) -> dict[str, int]:
    """Expected rows per category, from the source's list lengths (pyarrow compute)."""
    counts: Counter[str] = Counter()

    def items(table: pa.Table, column: str) -> int:
        return int(pc.sum(pc.list_value_length(table.column(column))).as_py() or 0)

    for split in S.SPLITS:
        for path in S.split_files(root, split):
            t = pq.read_table(path)
            for key in ("gender", "birth", "enrollment_start", "enrollment_end"):
                counts[key] += t.num_rows
            counts["diagnoses"] += int(pc.sum(t.column(S.N_EVENTS)).as_py() or 0)
            counts["procedures"] += items(t, S.PROCEDURES)
            counts["medication_starts"] += items(t, S.MEDICATION_START_WEEKS)
            counts["medication_ends"] += items(t, S.MEDICATION_END_WEEKS)
            counts["labs"] += items(t, S.LAB_VALUES)
            counts["admissions"] += items(t, S.ADMIT_DAYS)
            counts["discharges"] += items(t, S.DISCHARGE_DAYS)
        for path in S.trial_split_files(root, split):
            t = pq.read_table(path)
            counts["trial_arms"] += t.num_rows
            counts["trial_ends"] += t.num_rows
            counts["trial_baseline"] += items(t, S.BASELINE)
            counts["trial_visits"] += items(t, S.VISIT_DAYS)
            for column, key in ((S.VISIT_TREATMENTS, "trial_treatments"),
                                (S.VISIT_MEDICATIONS, "trial_medications"),
                                (S.VISIT_ADVERSE_EVENTS, "trial_adverse_events")):
                counts[key] += int(pc.sum(pc.list_value_length(pc.list_flatten(t.column(column)))).as_py() or 0)
            counts["trial_severe_outcomes"] += int(pc.sum(t.column(S.SEVERE_OUTCOME).cast(pa.int64())).as_py() or 0)
    return {k: v for k, v in counts.items() if v}


def source_splits(root: Path) -> dict[int, str]:
    out = {}
    for split in S.SPLITS:
        for path in S.split_files(root, split) + S.trial_split_files(root, split):
            out |= dict.fromkeys(pq.read_table(path, columns=[S.SUBJECT_ID]).column(0).to_pylist(), split)
    return out


def check_export(src: Path, out: Path) -> dict[str, int]:
    """Every MEDS rule the export promises, checked from the files alone; returns the
    written rows per category."""
    codes = pq.read_table(out / meds.code_metadata_filepath)
    meds.CodeMetadataSchema.validate(codes)
    listed = set(codes.column("code").to_pylist())
    assert len(listed) == codes.num_rows
    splits = pq.read_table(out / meds.subject_splits_filepath)
    meds.SubjectSplitSchema.validate(splits)
    dataset = json.loads((out / meds.dataset_metadata_filepath).read_text())
    meds.DatasetMetadataSchema.validate(dataset)
    assert dataset["etl_name"] == "mirror.export_meds" and dataset["meds_version"] == meds.__version__

    written: Counter[str] = Counter()
    home: dict[int, str] = {}
    files = sorted((out / "data").glob("*/*.parquet"))
    source_files = [p for s in S.SPLITS for p in S.split_files(src, s) + S.trial_split_files(src, s)]
    assert len(files) == len(source_files)  # one output shard per input shard
    for path in files:
        t = pq.read_table(path)
        meds.DataSchema.validate(t)
        assert t.schema.field("numeric_value").type == pa.float32()
        assert t.schema.field("time").type == pa.timestamp("us")
        subject = t.column("subject_id").to_numpy()
        t_us = pc.fill_null(t.column("time").cast(pa.int64()), np.iinfo(np.int64).min).to_numpy()
        key = np.lexsort((t_us, subject))
        assert np.array_equal(key, np.arange(t.num_rows)), f"{path}: not sorted by (subject_id, time)"
        for sid in np.unique(subject).tolist():
            assert home.setdefault(sid, path.name + path.parent.name) == path.name + path.parent.name, \
                f"subject {sid} in two files"
        code_list = t.column("code").to_pylist()
        assert set(code_list) <= listed, sorted(set(code_list) - listed)[:5]
        written.update(category(c) for c in code_list)
    assert dict(written) == source_counts(src)
    assert dict(zip(splits.column("subject_id").to_pylist(), splits.column("split").to_pylist(),
                    strict=True)) == source_splits(src)
    assert set(home) == set(splits.column("subject_id").to_pylist())
    report = dataset["mirror_export"]
    assert report["written_counts"] == report["source_counts"]
    assert {k: v for k, v in report["written_counts"].items() if v} == dict(written)
    return dict(written)


# --- Tests -------------------------------------------------------------------------------------


def test_full_record_export_every_modality(full_record: Path, tmp_path: Path) -> None:
    out = tmp_path / "meds"
    report = export_meds(full_record, out, parallel=False)
    written = check_export(full_record, out)
    assert set(written) == {category(p) for p, _ in PREFIXES} | {"medication_starts", "medication_ends"}
    assert report.participants == json.loads((full_record / S.DATASET_JSON).read_text())["trial"]["participants"]
    assert not list(tmp_path.glob(".meds.staging-*"))

    # One patient, row by row: times, values and stays as the module docstring maps them.
    patient = pq.read_table(S.shard_path(full_record, S.TRAIN, 0)).slice(1, 1).to_pylist()[0]
    sid, origin = patient[S.SUBJECT_ID], np.datetime64(ORIGIN, "D")
    rows = pq.read_table(out / "data" / S.TRAIN / "part-00000.parquet",
                         filters=[("subject_id", "=", sid)]).to_pylist()
    assert rows[0]["code"] == ("GENDER//F" if patient[S.SEX] == 1 else "GENDER//M") and rows[0]["time"] is None

    def at(code: str) -> list[tuple]:
        return [(np.datetime64(r["time"], "D"), r["numeric_value"], r["stay_index"]) for r in rows
                if r["code"].startswith(code)]

    assert at("MEDS_BIRTH") == [(origin + 7 * patient[S.BIRTH_WEEK], None, None)]
    assert at("ENROLLMENT//END") == [(origin + 7 * patient[S.ENROLL_END], None, None)]
    labs = sorted((origin + 7 * w, float(np.float32(v)), None if s < 0 else s) for w, v, s in
                  zip(patient[S.LAB_WEEKS], patient[S.LAB_VALUES], patient[S.LAB_STAYS], strict=True))
    assert sorted(at("LOINC//")) == labs and labs
    assert [r[0] for r in at("HOSPITAL_DISCHARGE")] == [origin + d for d in patient[S.DISCHARGE_DAYS]]
    assert [r[1] for r in at("HOSPITAL_DISCHARGE")] == patient[S.LENGTH_OF_STAY]
    assert [r[2] for r in at("HOSPITAL_ADMISSION")] == list(range(len(patient[S.ADMIT_DAYS])))
    dx = Counter(f"ICD10CM//{c}" for c in
                 pc.take(V.codes_table().filter(pc.field("modality") == S.CONDITION).column("code"),
                         pa.array(patient[S.CONDITIONS], pa.int64())).to_pylist())
    assert Counter(r["code"] for r in rows if r["code"].startswith("ICD10CM//")) == dx


def test_trial_participants_merge_into_their_patient_shard(full_record: Path, tmp_path: Path) -> None:
    out = tmp_path / "meds"
    export_meds(full_record, out, parallel=False)
    trial_ids = pq.read_table(S.trial_shard_path(full_record, S.TRAIN, 0)).column(S.SUBJECT_ID).to_pylist()
    merged = [i for i in trial_ids if i < 10**5]
    patient_shard = pq.read_table(out / "data" / S.TRAIN / "part-00000.parquet")
    trial_shard = pq.read_table(out / "data" / S.TRAIN / "trial-part-00000.parquet")
    in_patient = set(patient_shard.filter(pc.starts_with(patient_shard.column("code"), "TRIAL//ARM")
                                          ).column("subject_id").to_pylist())
    assert merged and in_patient and in_patient <= set(merged)
    assert set(trial_shard.column("subject_id").to_pylist()) == {i for i in trial_ids if i >= 10**5}
    codes = pq.read_table(out / meds.code_metadata_filepath).to_pylist()
    by_code = {r["code"]: r for r in codes}
    assert by_code["TRIAL//AE//Febrile neutropenia"]["source_code"] == "AE:Febrile neutropenia"
    assert by_code["ATC//C10A//START"]["parent_codes"] == ["ATC/C10"]
    assert by_code["LOINC//13457-7"]["parent_codes"] == ["LOINC/13457-7"]
    assert by_code["LOINC//13457-7"]["unit"] == "mg/dL"
    assert by_code["TRIAL//MEDICATION//N02B"]["parent_codes"] == ["ATC/N02B"]


def test_only_atc_trial_medications_get_an_atc_parent() -> None:
    """An imported trial's own medication tokens (PyTrial's) are not ATC classes."""
    codes = V.codes_table().to_pylist()
    for row in codes:
        if row["modality"] == S.TRIAL_MEDICATION and row["id"] == 0:
            row["code"] = "MED:ondansetron"
    vocabulary = build_vocabulary(pa.Table.from_pylist(codes, schema=S.CODES_SCHEMA),
                                  S.DatasetMetadata(name="trial", origin_date="2020-01-01", n_weeks=1,
                                                    patients={}, vocab={}, provenance={}))
    parents = {r["code"]: r["parent_codes"] for r in vocabulary.rows}
    assert parents["TRIAL//MEDICATION//MED:ondansetron"] is None
    assert parents["TRIAL//MEDICATION//H02A"] == ["ATC/H02A"]


def test_trial_only_dataset(tmp_path: Path) -> None:
    """An imported trial: empty patient splits, participants only."""
    src = tmp_path / "trial-only"
    write_full_record(src, n_patients=0)
    report = export_meds(src, tmp_path / "meds", parallel=False)
    written = check_export(src, tmp_path / "meds")
    assert report.patients == dict.fromkeys(S.SPLITS, 0) and written["trial_arms"] == 14
    assert "diagnoses" not in written


def test_bad_input_names_file_row_and_rule(tmp_path: Path) -> None:
    src = tmp_path / "bad"
    write_full_record(src, n_patients=30)
    path = S.shard_path(src, S.TUNING, 0)
    table = pq.read_table(path)
    procedures = table.column(S.PROCEDURES).to_pylist()
    row = next(i for i, p in enumerate(procedures) if p)
    procedures[row] = [9999] * len(procedures[row])
    table = table.set_column(table.schema.get_field_index(S.PROCEDURES), S.PROCEDURES,
                             pa.array(procedures, pa.list_(pa.int16())))
    pq.write_table(table, path)
    sid = table.column(S.SUBJECT_ID)[row].as_py()
    with pytest.raises(MedsExportError, match=rf"data/tuning/part-00000.parquet \(subject {sid}\): "
                                              r"code_range: procedure id 9999"):
        export_meds(src, tmp_path / "out", parallel=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.staging-*"))


def test_job_refuses_existing_out_and_non_dataset(full_record: Path, tmp_path: Path, capsys) -> None:
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        import export_meds as job
    finally:
        sys.path.remove(str(REPO / "jobs"))
    out = tmp_path / "meds"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        job.main([str(full_record), str(out)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    with pytest.raises(SystemExit):  # --overwrite never deletes what the export did not write
        job.main([str(full_record), str(out), "--overwrite", "--no-ray"])
    assert "refusing to delete" in capsys.readouterr().err and (out / "notes.txt").exists()

    fresh = tmp_path / "fresh"
    first = job.main([str(full_record), str(fresh), "--no-ray"])
    before = (fresh / meds.dataset_metadata_filepath).stat().st_mtime_ns
    with pytest.raises(SystemExit):
        job.main([str(full_record), str(fresh), "--no-ray"])
    assert "pass --overwrite" in capsys.readouterr().err
    second = job.main([str(full_record), str(fresh), "--overwrite", "--no-ray"])
    assert second["written_counts"] == first["written_counts"]
    assert (fresh / meds.dataset_metadata_filepath).stat().st_mtime_ns != before

    result = subprocess.run(  # a directory that is not a dataset: one line, exit 2
        [sys.executable, str(REPO / "jobs" / "export_meds.py"), str(tmp_path), str(tmp_path / "x")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: DIR {tmp_path}: {S.DATASET_JSON} is missing; is it a mirror dataset directory?"
    ]


@pytest.mark.parametrize("n_patients", [10_000])
def test_acceptance_10k_patients(ray_cluster, tmp_path: Path, n_patients: int) -> None:
    """The issue's acceptance: 10K simulated patients export to MEDS that passes the meds
    schema checks, with counts per modality reconciling exactly."""
    src = tmp_path / "sim"
    generate_dataset(src, n_patients, seed=0, workers=2)
    began = time.perf_counter()
    report = export_meds(src, tmp_path / "meds", parallel=True)
    seconds = time.perf_counter() - began
    written = check_export(src, tmp_path / "meds")
    assert report.patients == S.DatasetMetadata.read(src).patients
    assert written["diagnoses"] == report.source_counts["diagnoses"] > n_patients
    print(f"\n{n_patients} patients: {report.rows} rows in {seconds:.2f} s "
          f"({report.rows / seconds:,.0f} rows/s, {report.source_events_per_s:,.0f} source events/s)")
