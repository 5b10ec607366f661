"""Δ by propensity matching: the windows view, matching by hand, and the estimator end to end
against the simulator's true effects."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from mirror.causal.delta import (
    N_BASE_FEATURES,
    N_PROPENSITY_FEATURES,
    DeltaConfig,
    Propensity,
    match_nearest,
    match_stratum,
)
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
    model = Propensity(key=0, coef=np.r_[1.0, np.zeros(N_BASE_FEATURES - 1)], intercept=0.0, caliper=1.0,
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
    assert pick.tolist() == [[-1]] and not ok.any()
    # with replacement: two treated rows may share the nearest control
    pick, ok = match_nearest(np.array([0.0, 0.01]), np.array([5.0, 0.005]), 0.1)
    assert pick.tolist() == [[1], [1]] and ok.all()
    # the treated patient's own earlier window is never its control: the next nearest is taken
    own = {"treated_owner": np.array([7]), "control_owner": np.array([7, 8]), "neighbours": 2}
    assert match_nearest(np.array([0.0]), np.array([0.0, 0.05]), 0.1, **own)[0].tolist() == [[1]]
    assert match_nearest(np.array([0.0]), np.array([0.0, 0.05]), 0.1)[0].tolist() == [[0]]
    # among the candidates within the caliper, the index lab decides (in caliper units)
    aux = {"treated_aux": np.array([1.0]), "control_aux": np.array([3.0, 1.1])}
    assert match_nearest(np.array([0.0]), np.array([0.01, 0.05]), 0.1, neighbours=2, **aux)[0].tolist() == [[1]]
    assert match_nearest(np.array([0.0]), np.array([0.01, 0.05]), 0.1, neighbours=1, **aux)[0].tolist() == [[0]]
    # only a control beyond the caliper: kept as the nearest, flagged outside
    pick, ok = match_nearest(np.array([0.0]), np.array([0.5, 0.9]), 0.1, neighbours=2)
    assert pick.tolist() == [[0]] and not ok.any()


def test_k_controls_average_those_within_the_caliper_where_the_outcome_was_measured():
    """1:k matching: a treated row's Δ is its outcome minus the mean of its k nearest controls
    within the caliper, each lab over the controls that measured it; a control beyond the
    caliper is never averaged in, and balance weighs each of a row's k controls 1/k."""
    model = Propensity(key=0, coef=np.r_[1.0, np.zeros(N_BASE_FEATURES - 1)], intercept=0.0, caliper=0.1,
                       fit_treated=1, fit_controls=5)
    x = np.zeros((6, N_PROPENSITY_FEATURES), np.float32)
    x[:, 0] = [0.0, 0.01, -0.02, 0.03, 0.5, 0.04]  # row 0 treated; 0.5 is beyond the caliper
    y = np.full((6, N_LABS), np.nan)
    y[:, 0] = [100.0, 130.0, 120.0, np.nan, 0.0, 110.0]
    y[:, 1] = [10.0, 1.0, 2.0, 3.0, 4.0, 5.0]

    def part(rows):
        n = len(rows)
        return {"subject_id": np.array(rows) + 1, "split": np.zeros(n, np.int8), "window": np.ones(n, np.int16),
                "window_start": np.zeros(n, np.int32), "ladder": np.zeros(n, np.int8),
                "from_level": np.zeros(n, np.int8), "to_level": np.ones(n, np.int8), "x": x[rows], "y": y[rows],
                "y_week": np.zeros((n, N_LABS), np.int32)}

    treated, controls = part([0]), part([1, 2, 3, 4, 5])
    for k, lab0, lab1, used in [(1, -30.0, 9.0, 1), (3, -25.0, 8.0, 3), (5, -20.0, 7.25, 4)]:
        config = DeltaConfig(controls=k, neighbours=1, index_lab_weight=0.0, exclude_own_windows=False)
        out, sums = match_stratum(model, treated, controls, config)
        assert out["delta"][0, 0] == pytest.approx(lab0)  # the unmeasured control drops out of lab 0 only
        assert out["delta"][0, 1] == pytest.approx(lab1)
        assert out["controls"].tolist() == [used] and sums.controls_used == used
        assert out["control_subject_id"].tolist() == [2]  # the nearest
        assert sums.x_matched_controls.n == pytest.approx(1.0)
        assert sums.x_matched_controls.mean[0] == pytest.approx(x[[1, 2, 3, 5][:used], 0].mean())


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
def test_outcome_is_measured_before_any_later_addition_of_its_ladder(dataset):
    """X_{t+1} = the ladder lab's first value of window t + 1: no addition made in t + 1 (by the
    treated or the control) has acted on it yet, which the latest value cannot promise."""
    from mirror.causal.delta import fixed, transition_rows
    from mirror.data.views.windows import _LADDER_LAB_COLUMN

    file = schema.split_files(dataset, schema.TRAIN)[0]
    rows = pq.read_table(file, columns=READ_COLUMNS)
    truth = pq.read_table(dataset / schema.GROUND_TRUTH_DIR / "treatments" / schema.TRAIN / file.name)
    ids = rows.column(schema.SUBJECT_ID).to_numpy()
    adds: dict[tuple[int, int], list[int]] = {}
    for sid, weeks, ladders in zip(truth.column(schema.SUBJECT_ID).to_pylist(), truth.column("addition_weeks").to_pylist(),
                                   truth.column("addition_ladders").to_pylist(), strict=True):
        for week, ladder in zip(weeks, ladders, strict=True):
            adds.setdefault((sid, ladder), []).append(week)

    def touched(outcome: str) -> tuple[int, int]:
        t = transition_rows(patient_windows(rows, 52), ids, schema.TRAIN, 1, outcome)
        lab = _LADDER_LAB_COLUMN[t.column("ladder").to_numpy().astype(np.int64)]
        y_week = fixed(t, "y_week", N_LABS)[np.arange(t.num_rows), lab]
        next_start = t.column("window_start").to_numpy() + 52
        hit = 0
        for sid, ladder, start, week in zip(t.column("subject_id").to_numpy(), t.column("ladder").to_numpy(), next_start, y_week,
                                            strict=True):
            hit += week >= 0 and any(start <= w < week for w in adds.get((int(sid), int(ladder)), []))
        return hit, int((y_week >= 0).sum())

    first, measured = touched("first")
    latest, _ = touched("latest")
    assert measured > 100 and first == 0 and latest > 0


@pytest.mark.slow
def test_history_covariate_is_the_index_labs_latest_value_by_the_end_of_t_minus_2(dataset):
    """The propensity's trend input, recomputed from the raw lab lists: the ladder lab's latest
    enrolled measurement before window t - 1 starts; unknown (0, flag 0) at t = 1 or before any."""
    from mirror.causal.delta import FEATURE_NAMES, fixed, transition_rows
    from mirror.data.views.windows import _LAB_COLUMN, _LADDER_LAB_COLUMN, LAB_SCALE, LAB_TYPICAL

    rows = pq.read_table(schema.split_files(dataset, schema.TRAIN)[0], columns=READ_COLUMNS)
    t = transition_rows(patient_windows(rows, 52), rows.column(schema.SUBJECT_ID).to_numpy(), schema.TRAIN, 1)
    x = fixed(t, "x", N_PROPENSITY_FEATURES)
    prior, known = x[:, FEATURE_NAMES.index("index_lab_prior")], x[:, FEATURE_NAMES.index("index_lab_prior_known")]
    row_of = {sid: i for i, sid in enumerate(rows.column(schema.SUBJECT_ID).to_pylist())}
    labs, weeks, values = (rows.column(c).to_pylist() for c in (schema.LABS, schema.LAB_WEEKS, schema.LAB_VALUES))
    enrolled = rows.column(schema.ENROLL_START).to_pylist()
    checked = 0
    for i in range(0, t.num_rows, 7):  # every 7th row: a few thousand, both known and not
        r = row_of[int(t.column("subject_id")[i].as_py())]
        column = _LADDER_LAB_COLUMN[int(t.column("ladder")[i].as_py())]
        before = int(t.column("window_start")[i].as_py()) - 52
        seen = [v for code, w, v in zip(labs[r], weeks[r], values[r], strict=True)
                if _LAB_COLUMN[code] == column and enrolled[r] <= w < before]
        if int(t.column("window")[i].as_py()) < 2 or not seen:
            assert known[i] == 0 and prior[i] == 0
        else:
            assert known[i] == 1
            assert prior[i] == pytest.approx((seen[-1] - LAB_TYPICAL[column]) / LAB_SCALE[column], abs=1e-5)
            checked += 1
    assert checked > 100


@pytest.mark.slow
def test_stop_covariates_count_the_ladders_drugs_taken_and_stopped(dataset):
    """Windows' ``active``, ``stopped`` and ``stopped_before_index``, recomputed from the raw
    medication lists: drugs taken at a window's end; of those taken at the previous window's
    end, the ones no longer taken at this one's; and of those, the ones whose last week comes
    before the decision (the window's first addition, else its latest index-lab measurement)."""
    from mirror.data.views.windows import _LAB_COLUMN, _LADDER_LAB_COLUMN, _LADDER_OF_CLASS

    rows = pq.read_table(schema.split_files(dataset, schema.TRAIN)[0], columns=READ_COLUMNS)
    w = patient_windows(rows, 52)
    meds, starts, ends = (rows.column(c).to_pylist() for c in
                          (schema.MEDICATIONS, schema.MEDICATION_START_WEEKS, schema.MEDICATION_END_WEEKS))
    labs, lab_weeks = rows.column(schema.LABS).to_pylist(), rows.column(schema.LAB_WEEKS).to_pylist()
    seen_stops = 0
    for g in range(0, len(w.owner), 3):
        p, first, last = int(w.owner[g]), int(w.start_week[g]), int(w.start_week[g]) + 51
        for li in range(len(LADDER_NAMES)):
            drugs = [(s, e) for m, s, e in zip(meds[p], starts[p], ends[p], strict=True) if _LADDER_OF_CLASS[m] == li]
            added = [s for s, _ in drugs if first <= s <= last]
            measured = [wk for code, wk in zip(labs[p], lab_weeks[p], strict=True)
                        if _LAB_COLUMN[code] == _LADDER_LAB_COLUMN[li] and first <= wk <= last]
            decision = min(added) if added else (measured[-1] if measured else last)
            stopped = [e for s, e in drugs if s <= first - 1 <= e < last]
            assert w.active[g, li] == sum(s <= last <= e for s, e in drugs)
            if w.index[g] >= 1:
                assert w.stopped[g, li] == len(stopped)
                assert w.stopped_before_index[g, li] == sum(e < decision for e in stopped)
                seen_stops += len(stopped)
    assert seen_stops > 10


@pytest.mark.parametrize("group", [{"history": True}, {"stops": "decision"}, {"stops": "window"}])
def test_a_propensity_sees_an_optional_covariate_group_only_when_asked(group):
    from mirror.causal.delta import FEATURE_NAMES, HISTORY_NAMES, STOP_NAMES, fit_propensity

    columns = [FEATURE_NAMES.index(n) for n in HISTORY_NAMES + STOP_NAMES]
    rng = np.random.default_rng(0)
    treated = rng.normal(0.5, 1.0, (200, N_PROPENSITY_FEATURES))
    controls = rng.normal(0.0, 1.0, (400, N_PROPENSITY_FEATURES))
    model = fit_propensity(0, treated, controls, 0.2, design="quadratic")
    shuffled = treated.copy()
    shuffled[:, columns] = rng.normal(size=(200, len(columns)))
    np.testing.assert_array_equal(model.logit(treated), model.logit(shuffled))
    with_group = fit_propensity(0, treated, controls, 0.2, design="quadratic", **group)
    assert not np.allclose(with_group.logit(treated), with_group.logit(shuffled))


def test_bias_correction_removes_what_a_residual_imbalance_is_worth():
    """Controls' outcome = 5 + 10 x1 (+ noise); the treated's is that minus 20. Matching on a
    logit of x0 alone leaves x1 unbalanced (treated +0.3): the raw Δ is -20 + 10 x 0.3, the
    bias-corrected one (mu0 fitted on the controls) is -20 again."""
    from mirror.causal.delta import fit_outcome_model

    rng = np.random.default_rng(0)
    model = Propensity(key=0, coef=np.r_[1.0, np.zeros(N_BASE_FEATURES - 1)], intercept=0.0, caliper=0.05,
                       fit_treated=500, fit_controls=20_000)

    def rows(n, x1_shift, effect):
        x = np.zeros((n, N_PROPENSITY_FEATURES))
        x[:, 0] = rng.normal(0.0, 1.0, n)
        x[:, 1] = rng.normal(x1_shift, 1.0, n)
        y = np.full((n, N_LABS), np.nan)
        y[:, 0] = 5.0 + 10.0 * x[:, 1] + effect + rng.normal(0.0, 0.1, n)
        y[: n // 10, 0] = np.nan  # unmeasured outcomes are left out of the fit, not read as 0
        return {"subject_id": np.arange(n) + (0 if effect else 10**6), "split": np.zeros(n, np.int8),
                "window": np.ones(n, np.int16), "window_start": np.zeros(n, np.int32),
                "ladder": np.zeros(n, np.int8), "from_level": np.zeros(n, np.int8), "to_level": np.ones(n, np.int8),
                "x": x, "y": y, "y_week": np.zeros((n, N_LABS), np.int32)}

    treated, controls = rows(500, 0.3, -20.0), rows(20_000, 0.0, 0.0)
    corrected = fit_outcome_model(model, controls["x"], controls["y"])
    assert corrected.outcome_coef[1, 0] == pytest.approx(10.0, abs=0.05)
    assert not corrected.outcome_coef[:, 1:].any()  # labs never measured: no correction
    raw_rows, raw = match_stratum(model, treated, controls)
    rows_bc, bc = match_stratum(corrected, treated, controls)
    np.testing.assert_array_equal(raw_rows["control_subject_id"], rows_bc["control_subject_id"])  # same pairs
    assert raw.delta_sum[0] / raw.delta_n[0] == pytest.approx(-17.0, abs=1.0)
    assert bc.delta_sum[0] / bc.delta_n[0] == pytest.approx(-20.0, abs=0.1)
    # a fit carried by a handful of effective controls is shrunk towards no correction
    few = rows(80, 0.0, 0.0)
    shrunk = fit_outcome_model(model, few["x"], few["y"])
    assert shrunk.outcome_effective_controls < 80
    assert 2.0 < shrunk.outcome_coef[1, 0] < 9.0


@pytest.fixture(scope="module")
def estimated(dataset):
    """Δ of the 3,000 patients, written once as the column set ``psm`` (and the true effects of
    the same treated rows as ``truth``)."""
    from mirror.causal.delta import DeltaConfig
    from mirror.causal.estimate import estimate_delta

    return estimate_delta(dataset, "psm", DeltaConfig(block_patients=1000, min_treated=5), truth_name="truth")


@pytest.mark.slow
def test_estimate_delta_end_to_end_writes_aligned_columns_and_checks_truth(dataset, estimated):
    from mirror.data.views.windows import WindowsView, WindowsViewConfig

    report = estimated
    assert report.blocks == 3
    fitted = [r for r in report.strata if r.get("fitted")]
    assert fitted and all(r["matched"] + r["caliper_drops"] + r["no_controls"] == r["treated"] for r in fitted)
    assert all("true_psm" in r and "naive_bias" in r for r in fitted)
    # 1:8 by default: a matched row averages up to 8 controls, more than one wherever the pool allows
    assert all(1 <= r["controls_per_matched"] <= 8 for r in fitted if r["matched"])
    assert max(r["controls_per_matched"] for r in fitted) > 1
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


@pytest.mark.slow
def test_true_delta_column_set_covers_every_treated_row_and_agrees_with_psm(dataset, estimated):
    """``truth``: τ for every treated row of the fitted strata (matched or not), so more entries
    than PSM's matched ones; where both exist, the PSM Δ of the ladder's own lab tracks τ."""
    from mirror.data.views.windows import _LADDER_LAB_COLUMN

    psm_rows = truth_rows = 0
    pairs = []
    for split in schema.SPLITS:
        for file in schema.split_files(dataset, split):
            psm = pq.read_table(dataset / "delta" / "psm" / split / file.name).to_pylist()
            truth = pq.read_table(dataset / "delta" / "truth" / split / file.name)
            assert truth.schema.equals(DELTA_SCHEMA)
            assert truth.column(schema.SUBJECT_ID).equals(pq.read_table(file, columns=[schema.SUBJECT_ID]).column(0))
            for p, t in zip(psm, truth.to_pylist(), strict=True):
                psm_rows += len(p["delta_windows"])
                truth_rows += len(t["delta_windows"])
                true_of = {(w, ld): i for i, (w, ld) in enumerate(zip(t["delta_windows"], t["delta_ladders"], strict=True))}
                for i, key in enumerate(zip(p["delta_windows"], p["delta_ladders"], strict=True)):
                    j, lab = true_of[key], _LADDER_LAB_COLUMN[key[1]]  # every matched row has its truth row
                    if p["delta_observed"][i * N_LABS + lab] and t["delta_observed"][j * N_LABS + lab]:
                        pairs.append((p["delta_values"][i * N_LABS + lab], t["delta_values"][j * N_LABS + lab]))
    assert truth_rows > psm_rows > 0
    pairs = np.array(pairs)
    assert len(pairs) >= 20 and pairs[:, 1].mean() < 0  # treatment lowers its ladder's lab
    assert np.corrcoef(pairs.T)[0, 1] > 0.1
    assert json.loads((dataset / "delta" / "truth" / "delta.json").read_text())["truth_of"] == "psm"


@pytest.mark.slow
def test_two_stage_pretrain_then_fine_tune(dataset, estimated):
    """Stage 1 learns Δ_{t+1}; stage 2 starts from its RNN and fine-tunes on the onsets and
    labs (in process; through the jobs and DDP in the next test)."""
    import torch

    from mirror.data.views.windows import WindowsView, WindowsViewConfig
    from mirror.models import build_model

    view = WindowsView(WindowsViewConfig(lookback=2, delta="psm"), str(dataset))
    ds, _ = view.read(schema.TRAIN)
    batch = next(iter(view.batches(ds, 100_000, training=True, device="cpu")))
    torch.manual_seed(0)
    stage1 = build_model("causal_rnn_delta", {"cell": "lstm", "hidden": 8}, view.info())
    opt = stage1.make_optimizers()["model"]
    first = float(stage1(batch)["loss"])
    for _ in range(30):
        opt.zero_grad()
        (stage1(batch)["loss"] / batch.size).backward()
        opt.step()
    assert float(stage1(batch)["loss"]) < first
    stage2 = build_model("causal_rnn", {"cell": "lstm", "hidden": 8, "mode": "pretrain"}, view.info(), upstream=stage1)
    for a, b in zip(stage2.encoder.parameters(), stage1.encoder.parameters(), strict=True):
        assert torch.equal(a, b) and a is not b
    out = stage2.predict(batch)
    assert set(out) == {"onset_dm", "onset_cad", "onset_ckd", "onset_stroke", "next_ldl", "next_sbp", "next_tg"}
    assert ((out["onset_dm"].score > 0) & (out["onset_dm"].score < 1)).all()
    with pytest.raises(ValueError, match="upstream-run"):
        build_model("causal_rnn", {"mode": "pretrain"}, view.info())
    with pytest.raises(ValueError, match="view.delta"):
        build_model("causal_rnn", {"mode": "augment"}, WindowsView(WindowsViewConfig(), str(dataset)).info())


def test_paired_t_test_matches_scipy():
    from scipy.stats import ttest_rel

    from mirror.causal.stats import paired_t_one_sided, stars

    pretrain = np.array([0.8069, 0.8012, 0.8101, 0.7990, 0.8044])
    none = np.array([0.7846, 0.7901, 0.7855, 0.7950, 0.7832])
    t, p = paired_t_one_sided(pretrain, none)
    ref = ttest_rel(pretrain, none, alternative="greater")
    assert t == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    t2, p2 = paired_t_one_sided(np.array([750.0, 760, 745]), np.array([1006.0, 990, 1010]), greater=False)
    ref2 = ttest_rel([750.0, 760, 745], [1006.0, 990, 1010], alternative="less")
    assert t2 == pytest.approx(ref2.statistic) and p2 == pytest.approx(ref2.pvalue)
    assert (stars(0.0005), stars(0.005), stars(0.05), stars(0.2)) == ("***", "**", "*", "")
    with pytest.raises(ValueError, match="paired splits"):
        paired_t_one_sided(np.array([1.0]), np.array([0.0]))


def _load_job(name: str):
    import importlib.util
    import sys
    from pathlib import Path

    if f"job_{name}" in sys.modules:
        return sys.modules[f"job_{name}"]
    spec = importlib.util.spec_from_file_location(f"job_{name}", Path(__file__).resolve().parents[1] / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"job_{name}"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_two_stage_through_jobs_train_on_two_ddp_workers(dataset, estimated, tmp_path, monkeypatch):
    """jobs/train.py: causal_rnn_delta on Δ, then causal_rnn --upstream-run with mode=pretrain,
    each on 2 DDP workers; the fine-tune starts from stage 1's RNN (at a negligible learning
    rate its weights stay stage 1's), and the predictor suite logs AUROC/AUPRC/MSE beside the
    constant and the GLM floors."""
    import torch

    from mirror import tracking
    from mirror.checkpoint import load_state

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    train = _load_job("train")
    common = ["--data", str(dataset), "--workers", "2", "--epochs", "1", "--storage-path", str(tmp_path / "ray_results"),
              "--set", "view.delta=psm", "view.lookback=2", "model.cell=gru", "model.hidden=8", "train.batch_size=64",
              "train.max_steps_per_epoch=2", "train.eval_patients=300"]
    assert train.main(["--model", "causal_rnn_delta", "--run-name", "delta-stage-1", "--no-eval", *common]) == 0
    first = tracking.find_run("delta-stage-1")
    assert train.main(["--model", "causal_rnn", "--run-name", "delta-stage-2", "--upstream-run", first, *common,
                       "model.mode=pretrain", "model.lr=1e-12"]) == 0
    second = tracking.find_run("delta-stage-2")
    run = tracking.get_run(second)
    assert run.data.tags["mirror.upstream_run"] == first and run.data.params["model_config.mode"] == "pretrain"
    before = load_state(tracking.get_run(first).data.tags["mirror.checkpoint"])["model"]
    after = load_state(run.data.tags["mirror.checkpoint"])["model"]
    encoder = [k for k in before if k.startswith("encoder.")]
    assert encoder and all(torch.allclose(after[k], before[k], atol=1e-6) for k in encoder)
    assert not any(k.startswith("upstream.") for k in after)  # copied, not kept frozen beside
    m = run.data.metrics
    for task in ("onset_dm", "onset_cad"):
        assert 0.0 <= m[f"eval/{task}/auroc"] <= 1.0 and m[f"baseline/{task}/auroc"] == 0.5
        assert 0.0 <= m[f"baseline/glm/{task}/auroc"] <= 1.0 and m[f"baseline/glm/{task}/auprc"] > 0
    assert m["eval/next_ldl/mse"] > 0 and m["baseline/next_ldl/mse"] > 0
    assert m["baseline/glm/next_ldl/mse"] < m["baseline/next_ldl/mse"]  # last LDL predicts the next


def test_results_table_stars_follow_the_paired_t_test():
    """Three draws where GRU+pre beats GRU by 0.02 ± 0.001 AUROC (significant) and GRU+aug is
    no better: only +pre is starred; the lab task is tested for a lower MSE."""
    from scipy.stats import ttest_rel

    from mirror.causal.protocol import ProtocolConfig, gain_by_size, markdown, results_table

    config = ProtocolConfig(sizes=(250,), splits=(3,), tasks=("onset_dm", "next_ldl"), lookbacks=(1,), cells=("gru",),
                            glm=False, pool_patients=250)
    base = [0.70, 0.72, 0.71]
    trials = []
    for split, b in enumerate(base):
        for mode, auroc, mse in (("none", b, 900.0 + split), ("augment", b - 0.01 * (split - 1), 905.0 + split),
                                 ("pretrain", b + 0.02 + 0.001 * split, 800.0 + split)):
            common = {"size": 250, "split": split, "lookback": 1, "cell": "gru", "mode": mode}
            trials += [{**common, "task": "onset_dm", "auroc": auroc}, {**common, "task": "next_ldl", "mse": mse}]
    table = results_table(trials, config)
    dm = next(r for r in table.rows if r["task"] == "onset_dm")
    p = ttest_rel([b + 0.02 + 0.001 * s for s, b in enumerate(base)], base, alternative="greater").pvalue
    assert dm["GRU"] == "0.7100" and dm["GRU+pre"].startswith("0.7310") and dm["GRU+pre"].endswith("*" if p > 0.01 else "**")
    assert dm["GRU+aug"] == "0.7100"  # a mean gain of 0: no star
    ldl = next(r for r in table.rows if r["task"] == "next_ldl")
    assert ldl["GRU+pre"].endswith("***") and not ldl["GRU+aug"].endswith("*")
    gains = gain_by_size(table)
    assert gains == [{"size": 250, "cell": "gru", "mode": "pretrain", "mean_auroc_gain": pytest.approx(0.021),
                      "significant_wins": 1, "rows": 1}]
    assert "| onset_dm | 1 |" in markdown(table)


def test_size_trend_tests_the_smallest_size_against_the_largest_with_welch():
    """Per draw, the onset gain is averaged over tasks and look-backs (``all``: also over cells);
    the smallest and largest sizes' draws are compared by a one-sided Welch test, the middle size
    is only reported, and a lab task or a NaN fit never enters."""
    from dataclasses import replace

    from scipy.stats import ttest_ind

    from mirror.causal.protocol import ProtocolConfig, size_trend, trend_markdown

    config = ProtocolConfig(sizes=(250, 1000, 5000), splits=(3,), tasks=("onset_dm", "onset_cad", "next_ldl"), lookbacks=(1,),
                            cells=("gru", "lstm"), modes=("none", "pretrain"), glm=False, pool_patients=5000)
    gain = {250: [0.05, 0.03, 0.04], 1000: [0.02, 0.01, 0.03], 5000: [0.00, 0.01, -0.01]}
    trials = []
    for size, gains in gain.items():
        for split, g in enumerate(gains):
            for cell, extra in (("gru", 0.0), ("lstm", 0.01)):
                common = {"size": size, "split": split, "lookback": 1, "cell": cell}
                for task, shift in (("onset_dm", 0.002), ("onset_cad", -0.002)):  # task mean: g + extra
                    trials += [{**common, "task": task, "mode": "none", "auroc": 0.7},
                               {**common, "task": task, "mode": "pretrain", "auroc": 0.7 + g + extra + shift}]
                trials.append({**common, "task": "next_ldl", "mode": "pretrain", "mse": 1.0})
    trials.append({"size": 250, "split": 0, "lookback": 1, "cell": "gru", "task": "onset_dm", "mode": "none", "auroc": float("nan")})
    trend = {r["cell"]: r for r in size_trend(trials[:-1], config)}
    assert set(trend) == {"gru", "lstm", "all"}
    for cell, extra in (("gru", 0.0), ("lstm", 0.01), ("all", 0.005)):
        r = trend[cell]
        expected = ttest_ind([g + extra for g in gain[250]], [g + extra for g in gain[5000]], equal_var=False, alternative="greater")
        assert r["p"] == pytest.approx(expected.pvalue) and r["t"] == pytest.approx(expected.statistic)
        assert r["small_minus_large"] == pytest.approx(0.04)
        assert [s["mean_gain"] for s in r["by_size"]] == pytest.approx([0.04 + extra, 0.02 + extra, 0.0 + extra])
        assert [s["draws"] for s in r["by_size"]] == [3, 3, 3]
    # A NaN no-Δ fit (DM, GRU, 250, draw 0) drops that pair only: the draw keeps CAD's gain.
    with_nan = {r["cell"]: r for r in size_trend(trials, config)}["gru"]
    dm_dropped = [gain[250][0] - 0.002, *gain[250][1:]]
    assert with_nan["by_size"][0]["draws"] == 3 and with_nan["by_size"][0]["mean_gain"] == pytest.approx(np.mean(dm_dropped))
    assert with_nan["p"] == pytest.approx(ttest_ind(dm_dropped, gain[5000], equal_var=False, alternative="greater").pvalue)
    assert "| pretrain | all | +0.0450 (" in trend_markdown(list(trend.values()))
    one_size = size_trend([r for r in trials[:-1] if r["size"] == 250], replace(config, sizes=(250,), pool_patients=250))
    assert all(np.isnan(r["p"]) and np.isnan(r["small_minus_large"]) for r in one_size)  # nothing to compare


def test_draws_are_one_count_for_every_size_or_one_per_size():
    from mirror.causal.protocol import ProtocolConfig

    assert [ProtocolConfig(sizes=(250, 5000), splits=(4,)).draws_at(n) for n in (250, 5000)] == [4, 4]
    assert [ProtocolConfig(sizes=(250, 5000), splits=(100, 20)).draws_at(n) for n in (250, 5000)] == [100, 20]
    for splits in ((100, 20, 5), (100, 1)):
        with pytest.raises(ValueError, match="splits: .*one per size"):
            ProtocolConfig(sizes=(250, 5000), splits=splits)


@pytest.mark.slow
def test_protocol_job_runs_the_grid_on_paired_draws(dataset, estimated, tmp_path, monkeypatch):
    """jobs/causal_protocol.py at a toy size: every (size, draw, task, look-back, cell, mode) is
    fitted once, the modes of a draw share its patients, and the parent run holds the table."""
    from mirror import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    job = _load_job("causal_protocol")
    assert job.main(["--data", str(dataset), "--delta", "psm", "--sizes", "40", "80", "--splits", "3", "2", "--tasks", "onset_dm",
                     "next_ldl", "--lookbacks", "1", "2", "--pool-patients", "200", "--test-patients", "60", "--steps", "4", "--eval-every", "2",
                     "--run-name", "protocol", "--out", str(tmp_path / "out")]) == 0

    trials = json.loads((tmp_path / "out" / "trials.json").read_text())
    assert len(trials) == (3 + 2) * 2 * 2 * (2 * 3 + 2)  # draws (3 at 40, 2 at 80) x tasks x look-backs x (RNN modes + GLM)
    assert sorted({(r["size"], r["split"]) for r in trials}) == [(40, 0), (40, 1), (40, 2), (80, 0), (80, 1)]
    for size in (40, 80):
        for split in (0, 1):
            draw = {r["train_examples"] for r in trials if (r["size"], r["split"]) == (size, split)}
            assert len(draw) == 1  # one set of patients per draw
    assert all(0 <= r["auroc"] <= 1 for r in trials if r["task"] == "onset_dm" and r["auroc"] == r["auroc"])
    assert all(r["mse"] > 0 and r["mean_mse"] > 0 for r in trials if r["task"] == "next_ldl")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(results) == 2 * 2 * 2 and {"GRU", "GRU+aug", "GRU+pre", "LSTM+pre", "GLM", "GLM+aug"} <= set(results[0])
    parent = tracking.find_run("protocol")
    assert {"results.json", "results.md", "tests.json", "trials.json"} <= set(tracking.list_artifacts(parent))
    assert len(tracking.child_runs(parent)) == 5
    trend = json.loads((tmp_path / "out" / "size_trend.json").read_text())  # 40 vs 80 patients
    assert {(r["mode"], r["cell"]) for r in trend} == {(m, c) for m in ("pretrain", "augment") for c in ("gru", "lstm", "all")}
    assert all([s["draws"] for s in r["by_size"]] == [3, 2] and 0 <= r["p"] <= 1 for r in trend)
    # a stopped run's tables: rebuilt from trials.json alone (here: only the n=40 draws)
    part = tmp_path / "part"
    part.mkdir()
    (part / "trials.json").write_text(json.dumps([r for r in trials if r["size"] == 40]))
    assert job.main(["--data", str(dataset), "--delta", "psm", "--sizes", "40", "--splits", "2", "--tasks", "onset_dm", "next_ldl",
                     "--lookbacks", "1", "2", "--tables-from", str(part)]) == 0
    rebuilt = json.loads((part / "results.json").read_text())
    assert rebuilt == [r for r in results if r["size"] == 40]
    assert job.main(["--data", str(dataset), "--delta", "nope"]) == 2
