"""Trial import on real data (PyTrial's demo visits) and bad trial input refused with file,
participant, visit and rule."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mirror.data import schema as S
from mirror.data.trial_import import TrialImportConfig, TrialImportError, import_trial
from mirror.data.validate import validate_dataset
from mirror.guards import GuardError

REPO = Path(__file__).resolve().parents[1]
PYTRIAL = REPO.parent / "shared" / "fixtures" / "pytrial-demo"
SEQUENCE = PYTRIAL / "trial_patient_sequence"

needs_fixtures = pytest.mark.skipif(not (SEQUENCE / "visits.json.gz").is_file(),
                                    reason=f"real fixtures absent: {PYTRIAL} (see ../shared/fixtures/README.md)")


def _trial(root: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(f) for s in S.SPLITS for f in S.trial_split_files(root, s))


@pytest.fixture(scope="module")
def pytrial(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pytrial") / "imported"
    run = subprocess.run([sys.executable, str(REPO / "jobs" / "import_trial.py"), str(PYTRIAL), str(out)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr
    return out, json.loads(run.stdout)


@needs_fixtures
def test_pytrial_demo_participants_visits_and_vocabularies(pytrial):
    out, summary = pytrial
    raw = json.loads(gzip.decompress((SEQUENCE / "visits.json.gz").read_bytes()))
    voc = json.loads((SEQUENCE / "voc.json").read_text())
    assert sum(summary["participants"].values()) == len(raw["visits"]) == 977
    visits = summary["visits"]
    assert visits["read"] == sum(map(len, raw["visits"])) == 9092
    # Same-day visits merged, nothing else lost: read = written + merged + dropped.
    assert visits["written"] + visits["merged_same_day"] + visits["dropped_no_day"] \
        + visits["dropped_before_day_0"] == 9092
    day = raw["order"].index("timestamp")
    same_day = sum(a[day] == b[day] for p in raw["visits"] for a, b in zip(p, p[1:], strict=False))
    assert visits["merged_same_day"] == same_day == 7
    assert summary["vocabulary_sizes"] == {"trial_treatment": len(voc["treatment"]) - 1,
                                           "trial_medication": len(voc["medication"]) - 1,
                                           "adverse_event": len(voc["adverse_event"]) - 1}

    rows = _trial(out)
    assert rows.num_rows == 977
    assert sum(len(v) for v in rows.column(S.VISIT_DAYS).to_pylist()) == visits["written"]
    for counts in summary["trial"]["items"].values():  # every item read is accounted for
        assert counts["items_read"] == sum(v for k, v in counts.items() if k not in ("items_read",
                                                                                     "tokens_not_in_adverse_events"))
    placed = sum(len(x) for visit in rows.column(S.VISIT_ADVERSE_EVENTS).to_pylist() for x in visit)
    assert placed == summary["trial"]["items"]["adverse_event"]["placed"]

    # Severe outcome (TWIN's "death and other severe adverse events"): a serious-AE token other
    # than [PAD]/NO at any visit, or death in feature.csv, recomputed from the source.
    col = raw["order"].index("ae_serious")
    serious = [any(voc["ae_serious"][t] not in ("[PAD]", "NO") for v in p for t in v[col]) for p in raw["visits"]]
    death = (np.loadtxt(SEQUENCE / "feature.csv", delimiter=",", skiprows=1, usecols=4, dtype=float) != 0).tolist()
    by_id = dict(zip(rows.column(S.SUBJECT_ID).to_pylist(), rows.column(S.SEVERE_OUTCOME).to_pylist(), strict=True))
    assert [by_id[S.TRIAL_ID_OFFSET + i] for i in range(977)] == [a or b for a, b in zip(serious, death, strict=True)]
    assert summary["trial"]["severe_reasons"] == {"serious_adverse_event": sum(serious), "death": sum(death),
                                                  "death_only": sum(b and not a for a, b in zip(serious, death, strict=True))}
    codes = pq.read_table(out / S.CODES_PARQUET).to_pandas()
    ae = codes[codes.modality == S.ADVERSE_EVENT]
    assert ae.severe.sum() == len(set(voc["ae_serious"]) - {"[PAD]", "NO"}) == 75


@needs_fixtures
def test_pytrial_demo_arms_baseline_and_validation(pytrial):
    out, summary = pytrial
    trial = summary["trial"]
    derivation = trial["arm_derivation"]
    assert trial["arm_names"] == ["DOXORUBICIN", "DOXORUBICIN+CYCLOPHOSPHAMIDE"]
    assert derivation["marker"] == ["CYCLOPHOSPHAMIDE"]
    assert derivation["first_regimens"]["DOXORUBICIN"] == derivation["first_regimens"]["DOXORUBICIN+CYCLOPHOSPHAMIDE"] == 485
    rows = _trial(out)
    arm = rows.column(S.ARM).to_numpy()
    assert int((arm == 1).sum()) == 485 + derivation["first_regimen_not_an_arm"]  # the 2 CMF-first hold C
    assert int((arm == 0).sum()) == 485 + derivation["never_treated_arm_0"]
    width = {len(b) for b in rows.column(S.BASELINE).to_pylist()}
    assert width == {len(trial["baseline_features"])}
    assert "death" not in trial["baseline_features"] and "RACE=Caucasian" in trial["baseline_features"]
    assert np.isfinite(np.concatenate(rows.column(S.BASELINE).to_numpy(zero_copy_only=False))).all()
    assert trial["baseline"]["censored_at_bound"] == {"weight": 3}
    meta = S.DatasetMetadata.read(out)
    assert meta.patients == dict.fromkeys(S.SPLITS, 0) and meta.modalities == []
    report = validate_dataset(out)
    assert report.ok, report.violations
    assert {s: r.rows_checked for s, r in report.trial_splits.items()} == summary["participants"]


def _source(root: Path, visits: list, features: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    order = ["treatment", "medication", "adverse_event", "ae_serious", "visit_stage", "timestamp"]
    (root / "visits.json").write_text(json.dumps({"order": order, "visits": visits}))
    (root / "voc.json").write_text(json.dumps({
        "treatment": ["[PAD]", "A", "B"], "medication": ["[PAD]", "m1", "m2"],
        "adverse_event": ["[PAD]", "e1", "e2"], "ae_serious": ["[PAD]", "NO", "e2"]}))
    if features is not None:
        (root / "feature.csv").write_text(features)
    return root


def test_small_trial_merges_same_day_drops_negative_days_and_counts(tmp_path):
    visits = [
        [[[1], [1], [1], [1], 0, 3.0], [[1], [2], [2], [2], 0, 3.0], [[0], [0], [0], [0], 1, 40.0]],
        [[[1, 2], [1, 1], [1], [1], 0, -2.0], [[1, 2], [0], [0], [0], 0, 5.0]],
        [[[1, 2], [2], [2], [1], 0, 1.0]],
    ]
    src = _source(tmp_path / "src", visits, "RUSUBJID,age,death\nx,50,0\ny,,1\nz,70,0\n")
    report = import_trial(src, tmp_path / "out")
    assert report.visits | {"reordered_by_day": False} == {
        "read": 6, "written": 4, "merged_same_day": 1, "dropped_no_day": 0, "dropped_before_day_0": 1,
        "fractional_days_floored": 0, "reordered_by_day": False, "participants_without_visits": 0}
    rows = _trial(tmp_path / "out").sort_by(S.SUBJECT_ID).to_pylist()
    assert rows[0][S.VISIT_DAYS] == [3, 40] and rows[0][S.VISIT_MEDICATIONS] == [[0, 1], []]
    # serious e2 / death in feature.csv (its serious e2 was in the dropped visit) / neither
    assert [r[S.SEVERE_OUTCOME] for r in rows] == [True, True, False]
    assert report.trial["severe_reasons"] == {"serious_adverse_event": 1, "death": 1, "death_only": 1}
    assert [r[S.ARM] for r in rows] == [0, 1, 1]  # first regimens A, A+B, A+B: marker B
    assert [r[S.BASELINE] for r in rows] == [[50.0], [60.0], [70.0]]  # median imputed; death left out
    assert report.trial["baseline"]["imputed_median"] == {"age": 1}
    assert report.trial["items"]["medication"]["repeats_in_visit"] == 0  # [1, 1] was in the dropped visit
    assert validate_dataset(tmp_path / "out").ok
    with pytest.raises(GuardError, match="already exists"):
        import_trial(src, tmp_path / "out")
    import_trial(src, tmp_path / "out", overwrite=True)  # an earlier trial import may be replaced


def test_severe_columns_absent_are_listed_and_held_out_share_widens_the_split(tmp_path):
    visits = [[[[1 + d % 2], [1], [1], [1], 0, 1.0]] for d in range(200)]  # two arms: A, B
    src = _source(tmp_path / "src", visits)  # no feature.csv: death cannot mark anyone
    report = import_trial(src, tmp_path / "out", config=TrialImportConfig(held_out_share=0.3))
    assert report.trial["severe_reasons"] == {"serious_adverse_event": 0, "columns_absent": ["death"]}
    assert 0.2 < report.participants[S.HELD_OUT] / 200 < 0.4 and report.participants[S.TUNING] < 20
    meta = S.DatasetMetadata.read(tmp_path / "out")
    assert meta.provenance["splits"] == "source"  # the id rule alone no longer re-derives it
    assert validate_dataset(tmp_path / "out").ok
    with pytest.raises(TrialImportError, match="held_out_share: range"):
        import_trial(src, tmp_path / "out2", config=TrialImportConfig(held_out_share=0.95))


@pytest.mark.parametrize("visits, features, rule", [
    ([[[[1], [1], [7], [1], 0, 1.0]]], None, r"visits.json participant 0 visit 0: token_range: adverse_event token 7"),
    ([[[[1], [1], [1], [1], 0, 1.0]], [[[1], [1], [1], 0, 2.0]]], None, r"participant 1 visit 0: shape: expected a list of 6"),
    ([[[[1], [1], [1], [1], 0, 1.0]]], "RUSUBJID,age\nx,1\ny,2\n", r"feature.csv: rows: 2 baseline rows, but .* 1 participants"),
    ([[[[1], [1], [1], [1], 0, 1.0]]], "RUSUBJID,death\nx,yes\n", r"feature.csv row 2: severe_value: severe column 'death' holds 'yes'"),
])
def test_bad_trial_input_is_refused_with_place_and_rule(tmp_path, visits, features, rule):
    src = _source(tmp_path / "src", visits, features)
    with pytest.raises(TrialImportError, match=rule):
        import_trial(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
