"""Δ by propensity matching: the windows view, matching by hand, and the estimator end to end
against the simulator's true effects."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from mirror.causal.delta import N_PROPENSITY_FEATURES, Propensity, match_nearest, match_stratum
from mirror.data import schema
from mirror.data.views.windows import (
    DELTA_SCHEMA,
    LADDER_NAMES,
    N_DELTA,
    N_LABS,
    READ_COLUMNS,
    count_examples,
    patient_windows,
    window_examples,
)


def test_six_patients_match_by_hand():
    """Treated A1..A3, controls B1..B3 on a logit that is the first covariate: A1 (0.10) takes
    B1 (0.12), A2 (0.50) takes B2 (0.45, nearer than B1), A3 (3.0) is 1.5 from B3 (1.5) and
    beyond the caliper (1.0): dropped. Δ = y_A - y_B where both are measured."""
    model = Propensity(key=0, coef=np.r_[1.0, np.zeros(N_PROPENSITY_FEATURES - 1)], intercept=0.0, caliper=1.0,
                       fit_treated=3, fit_controls=3)

    def rows(ids, logits, y):
        x = np.zeros((len(ids), N_PROPENSITY_FEATURES), np.float32)
        x[:, 0] = logits
        yy = np.full((len(ids), N_LABS), np.nan)
        yy[:, 0] = y
        n = len(ids)
        return {"subject_id": np.array(ids), "split": np.zeros(n, np.int8), "window": np.ones(n, np.int16),
                "window_start": np.zeros(n, np.int32), "ladder": np.zeros(n, np.int8),
                "from_level": np.zeros(n, np.int8), "to_level": np.ones(n, np.int8), "x": x, "y": yy,
                "y_week": np.zeros((n, N_LABS), np.int32)}

    treated = rows([1, 2, 3], [0.10, 0.50, 3.0], [100.0, 90.0, 80.0])
    controls = rows([11, 12, 13], [0.12, 0.45, 1.5], [130.0, np.nan, 120.0])
    out, sums = match_stratum(model, treated, controls)
    assert out["matched"].tolist() == [True, True, False]
    assert out["control_subject_id"].tolist() == [11, 12, -1]
    assert out["delta"][0, 0] == pytest.approx(-30.0)
    assert np.isnan(out["delta"][1, 0])  # B2's outcome is missing: Δ unobserved, not 0
    assert np.isnan(out["delta"][2, 0])
    assert (sums.treated, sums.matched, sums.caliper_drops, sums.no_controls) == (3, 2, 1, 0)
    assert sums.delta_n[0] == 1 and sums.delta_sum[0] == pytest.approx(-30.0)
    # no controls at all: every treated row is counted as such
    pick, ok = match_nearest(np.array([0.1]), np.array([]), 1.0)
    assert pick.tolist() == [-1] and not ok.any()
    # with replacement: two treated rows may share the nearest control
    pick, ok = match_nearest(np.array([0.0, 0.01]), np.array([5.0, 0.005]), 0.1)
    assert pick.tolist() == [1, 1] and ok.all()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ray_cluster):
    from mirror.data.simulator import generate_dataset

    root = tmp_path_factory.mktemp("delta") / "data"
    generate_dataset(root, 3000, seed=5, workers=1)
    return root


@pytest.mark.slow
def test_windows_levels_equal_the_true_ladder_levels(dataset):
    file = schema.split_files(dataset, schema.TRAIN)[0]
    rows = pq.read_table(file, columns=READ_COLUMNS)
    truth = pq.read_table(dataset / schema.GROUND_TRUTH_DIR / "treatments" / schema.TRAIN / file.name)
    w = patient_windows(rows, 52)
    # truth: additions per (patient, ladder) started by each window's end
    add_w = truth.column("addition_weeks").combine_chunks()
    owner = np.repeat(np.arange(truth.num_rows), np.diff(add_w.offsets.to_numpy()))
    weeks = add_w.flatten().to_numpy()
    ladders = truth.column("addition_ladders").combine_chunks().flatten().to_numpy()
    end_week = w.start_week + 51
    expected = np.zeros_like(w.level)
    for li in range(len(LADDER_NAMES)):
        for p, wk in zip(owner[ladders == li], weeks[ladders == li], strict=True):
            sel = w.owner == p
            expected[sel, li] += wk <= end_week[sel]
    assert (w.level == expected).all() and w.level.max() >= 1
    lab_ok = ~np.isnan(w.lab_value)
    assert lab_ok.any() and (w.lab_week[lab_ok] >= w.start_week[:, None].repeat(N_LABS, 1)[lab_ok]).all()
    ex = window_examples(w, rows.column(schema.SUBJECT_ID).to_numpy(), 3)
    report = count_examples(dataset, schema.TRAIN, 52)
    assert len(ex["window"]) <= report.kept and ex["x"].shape[1:] == (3, 24)
    assert (ex["x"][ex["window"] == 0, 0] == 0).all()  # padded look-back: absent, flagged by 'present' = 0
    assert (ex["onset"][~ex["at_risk"]] >= 0).all() and ex["delta_target"].shape[1] == N_DELTA


@pytest.mark.slow
def test_estimate_delta_end_to_end_writes_aligned_columns_and_checks_truth(dataset):
    from mirror.causal.delta import DeltaConfig
    from mirror.causal.estimate import estimate_delta
    from mirror.data.views.windows import WindowsView, WindowsViewConfig

    report = estimate_delta(dataset, "psm", DeltaConfig(block_patients=1000, min_treated=5))
    assert report.blocks == 3
    fitted = [r for r in report.strata if r.get("fitted")]
    assert fitted and all(r["matched"] + r["caliper_drops"] + r["no_controls"] == r["treated"] for r in fitted)
    assert all("true_psm" in r and "naive_bias" in r for r in fitted)
    assert report.totals["written_patients"] == 3000 and report.totals["written_delta_entries"] == report.totals["matched"]
    for split in schema.SPLITS:
        for file in schema.split_files(dataset, split):
            d = pq.read_table(dataset / "delta" / "psm" / split / file.name)
            assert d.schema.equals(DELTA_SCHEMA)
            data_ids = pq.read_table(file, columns=[schema.SUBJECT_ID]).column(0)
            assert d.column(schema.SUBJECT_ID).equals(data_ids)
    assert (dataset / "delta" / "psm" / "balance.png").stat().st_size > 0
    assert not (dataset / "delta" / "psm" / "_work").exists()
    # the windows view reads Δ in: Δ inputs and targets are non-zero somewhere
    view = WindowsView(WindowsViewConfig(lookback=2, delta="psm"), str(dataset))
    ds, rep = view.read(schema.TRAIN)
    batch = next(iter(view.batches(ds, 100_000, training=False, device="cpu")))
    assert batch.size == rep.kept
    assert batch.delta_target.abs().sum() > 0 and batch.delta_observed.any()
    assert batch.delta_in.abs().sum() > 0
