"""MEDS import on real data (the MIMIC-IV demo in MEDS, reconciled against its CSV tables),
the round trip import -> export -> import, and bad MEDS input refused with file, row, rule."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import meds
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from mirror.data import schema as S
from mirror.data.meds_export import export_meds
from mirror.data.meds_import import MedsImportError, drug_name_candidates, import_meds

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
MEDS_DEMO = FIXTURES / "mimic-iv-demo-meds-0.0.1"
CSV_DEMO = FIXTURES / "mimic-iv-demo-2.2"
BROKEN = REPO / "tests" / "data" / "broken_meds"

needs_fixtures = pytest.mark.skipif(
    not (MEDS_DEMO / "data").is_dir() or not CSV_DEMO.is_dir(),
    reason=f"real fixtures absent: {FIXTURES} (see make fixtures)")


def _rows(root: Path) -> dict[str, pa.Table]:
    return {s: pq.read_table(S.split_dir(root, s)) if S.split_files(root, s) else None for s in S.SPLITS}


@pytest.fixture(scope="module")
def mimic(tmp_path_factory, ray_cluster) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("mimic") / "imported"
    report = import_meds(MEDS_DEMO, out)  # one Ray task per shard
    return out, report.summary()


@needs_fixtures
def test_mimic_demo_subjects_admissions_and_length_of_stay(mimic):
    out, summary = mimic
    meta = S.DatasetMetadata.read(out)
    assert meta.patients == {"train": 80, "tuning": 10, "held_out": 10}
    splits = pq.read_table(MEDS_DEMO / meds.subject_splits_filepath).to_pylist()
    for split, table in _rows(out).items():  # the source splits are kept
        assert sorted(table.column(S.SUBJECT_ID).to_pylist()) == sorted(
            r["subject_id"] for r in splits if r["split"] == split)
    rows = pa.concat_tables(_rows(out).values())
    assert sum(len(x) for x in rows.column(S.ADMIT_DAYS).to_pylist()) == 275

    adm = pacsv.read_csv(CSV_DEMO / "hosp" / "admissions.csv.gz").to_pandas()
    expected = ((adm.dischtime - adm.admittime).dt.total_seconds() / 86400).to_numpy()
    assert np.median(expected) == pytest.approx(4.85, abs=0.005)
    by_subject = adm.sort_values(["subject_id", "admittime"]).groupby("subject_id")
    origin = np.datetime64(meta.origin_date, "D")
    for sid, los, admit in zip(rows.column(S.SUBJECT_ID).to_pylist(), rows.column(S.LENGTH_OF_STAY).to_pylist(),
                               rows.column(S.ADMIT_DAYS).to_pylist(), strict=True):
        source = by_subject.get_group(sid)
        want = ((source.dischtime - source.admittime).dt.total_seconds() / 86400).to_numpy(np.float32)
        np.testing.assert_array_equal(np.array(los, np.float32), want)
        days = (source.admittime.to_numpy().astype("datetime64[D]") - origin).astype(np.int64)
        np.testing.assert_array_equal(admit, days)
    all_los = np.concatenate([np.array(x, np.float32) for x in rows.column(S.LENGTH_OF_STAY).to_pylist()])
    assert np.median(all_los) == pytest.approx(4.85, abs=0.005)


@needs_fixtures
def test_mimic_demo_diagnoses_reconcile_with_diagnoses_icd(mimic):
    out, summary = mimic
    with gzip.open(CSV_DEMO / "hosp" / "diagnoses_icd.csv.gz", "rt") as f:
        source_rows = sum(1 for _ in f) - 1
    assert source_rows == 4506
    diag = summary["provenance"]["modalities"]["diagnoses"]
    assert diag["events"] == source_rows
    assert diag["mapped"] + diag["unmapped"] == source_rows
    unplaced = sum(v for k, v in diag.items() if k not in ("events", "mapped", "unmapped", "placed", "mapped_share"))
    assert diag["placed"] + unplaced == diag["mapped"]
    rows = pa.concat_tables(_rows(out).values())
    assert sum(rows.column(S.N_EVENTS).to_pylist()) == diag["placed"]
    unmapped = summary["provenance"]["unmapped"]
    assert unmapped["diagnoses:ICD9CM"]["events"] + unmapped["diagnoses:ICD10CM"]["events"] == diag["unmapped"]
    for kind in ("diagnoses", "medication_starts", "labs"):
        share = summary["provenance"]["modalities"][kind]["mapped_share"]
        assert 0 < share <= 1, kind
    meta = json.loads((out / S.DATASET_JSON).read_text())
    assert meta["provenance"]["unmapped"]["diagnoses:ICD10CM"]["top"][0][1] > 0
    assert set(meta["modalities"]) == set(S.MODALITIES)


@needs_fixtures
def test_mimic_demo_medications_are_linked_to_their_stays(mimic):
    """The demo's medication starts carry no hadm_id: they are linked to stays by time, so
    medication recommenders (the admissions view) get regimens."""
    from mirror.data.views.admissions import AdmissionsViewConfig, count_admissions

    out, summary = mimic
    assert summary["provenance"]["modalities"]["medication_starts"]["stay_key_outside_stay"] == 0
    report = count_admissions(out, S.TRAIN, AdmissionsViewConfig())
    assert report.kept > 200 and report.empty_regimen < 0.2 * report.kept


@needs_fixtures
def test_mimic_demo_validates(mimic):
    """Every rule passes (source splits are kept, so the id-based split rule is skipped). Events
    keyed to a stay but timed outside it lose the link, counted."""
    from mirror.data.validate import validate_dataset

    out, summary = mimic
    report = validate_dataset(out, parallel=False)
    assert report.ok, report.violations
    outside = {k: v["stay_key_outside_stay"] for k, v in summary["provenance"]["modalities"].items()
               if "stay_key_outside_stay" in v}
    assert outside == {"diagnoses": 0, "procedures": 4, "medication_starts": 0, "labs": 24}


@needs_fixtures
def test_round_trip_import_export_import(mimic, tmp_path):
    out, _ = mimic
    exported = tmp_path / "meds"
    export_meds(out, exported)  # checks every table with the meds schemas as it writes
    for path in sorted((exported / "data").rglob("*.parquet")):
        meds.DataSchema.validate(pq.read_table(path))
    meds.CodeMetadataSchema.validate(pq.read_table(exported / meds.code_metadata_filepath))
    again = tmp_path / "again"
    report = import_meds(exported, again)
    before, after = _rows(out), _rows(again)
    for split in S.SPLITS:
        assert after[split].equals(before[split]), split
    meta_a, meta_b = S.DatasetMetadata.read(out), S.DatasetMetadata.read(again)
    assert (meta_a.origin_date, meta_a.n_weeks, meta_a.patients) == (meta_b.origin_date, meta_b.n_weeks, meta_b.patients)
    assert report.provenance["unmapped"] == {}


def test_drug_names_reach_atc_substances():
    assert drug_name_candidates("Metoprolol Tartrate", {})[-1] == "metoprolol"
    assert "sodium chloride" in drug_name_candidates("Sodium Chloride 0.9%  Flush", {})
    assert drug_name_candidates("Acetaminophen IV", {"acetaminophen": "paracetamol"})[-2:] == ["paracetamol", "acetaminophen"]


CASES = {
    "missing_column": "schema: missing column 'code'",
    "wrong_dtype": "schema: column 'time' is timestamp[ns]",
    "null_code": "row 3: null_code",
    "time_order": "row 9: time_order: subject 2",
    "two_splits": "split: subject 3 is listed twice",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_meds_refused_with_file_row_and_rule(case, tmp_path):
    root = BROKEN / case
    assert root.is_dir(), f"run python tests/data/make_broken_meds.py ({root} missing)"
    with pytest.raises(MedsImportError, match=CASES[case].replace("[", r"\[").replace("]", r"\]")) as err:
        import_meds(root, tmp_path / "out", parallel=False)
    assert "Traceback" not in str(err.value)
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "import_meds.py"), str(root), str(tmp_path / "o2"),
                           "--no-ray"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
