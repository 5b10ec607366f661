"""Known-answer tests of the whole scorecard on a simulated population (real Ray, Parquet, MLflow).

* synthetic = a copy of train: exact match 1.0, MIA AUC ~ 1, the gate refuses;
* synthetic = an independent sample of the same population (same simulator seed, other
  patient ids): fidelity near the ceiling row, privacy clean, the gate passes;
* synthetic = conditions shuffled across patients: prevalence stays, structure collapses.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from test_metrics_fixtures import shuffle_conditions, simulated_block, write_synthetic

from mirror.data import schema as S
from mirror.metrics import privacy
from mirror.metrics.fidelity import FidelitySummary
from mirror.metrics.marginal_sampler import write_independent_marginal_sample
from mirror.metrics.records import read_block
from mirror.metrics.scorecard import (
    CEILING,
    FLOOR,
    ScorecardConfig,
    compute_scorecard,
)

SEED = 11
N_REAL = 8_000
CONFIG = ScorecardConfig(
    record_sample=1_500,
    utility_train_size=1_500,
    nnaa_block_size=400,
    min_attribute_queries=300,
    min_task_positives=5,
)
WITHOUT_REFERENCE_ROWS = replace(CONFIG, reference_rows=False)  # the known-answer cases


@pytest.fixture(scope="module")
def real_root(ray_cluster, tmp_path_factory):
    from mirror.data.simulator import generate_dataset

    root = tmp_path_factory.mktemp("real")
    generate_dataset(root, N_REAL, seed=SEED)
    return root


@pytest.fixture(scope="module")
def independent_root(real_root, tmp_path_factory):
    block, _ = simulated_block(
        3_000, seed=SEED, first_id=5_000_000
    )  # same population, new patients
    return write_synthetic(
        tmp_path_factory.mktemp("independent"), [block], real_root, "independent"
    )


@pytest.fixture(scope="module")
def independent_card(real_root, independent_root, tmp_path_factory):
    plots = tmp_path_factory.mktemp("plots")
    card = compute_scorecard(
        real_root, independent_root, max_queries=2_000, seed=0, config=CONFIG, artifacts_dir=plots
    )
    return card, plots


def test_copy_of_train_is_flagged_and_refused(real_root, tmp_path):
    train = read_block(real_root, [S.TRAIN], S.DatasetMetadata.read(real_root).n_weeks)
    copy = write_synthetic(tmp_path / "copy", [train], real_root, "copy")
    card = compute_scorecard(
        real_root,
        copy,
        max_queries=2_000,
        seed=0,
        config=WITHOUT_REFERENCE_ROWS,
    )
    assert card["privacy/exact_match/synthetic_in_train"] == 1.0
    assert card["privacy/exact_match/train_reproduced"] == 1.0
    assert card["privacy/mia/distance_auc"] > 0.97
    assert card["privacy/mia/distance_tpr_at_1pct_fpr"] > 0.9
    assert card["privacy/dcr/closer_to_train_share"] > 0.99
    assert card["privacy/dcr/train_zero_fraction"] == 1.0
    assert card["privacy/presence/sensitivity"] == 1.0 and card["privacy/presence/risk_band"] == 2.0
    assert card["fidelity/prevalence/r2"] == 1.0  # copying is perfect fidelity: read privacy too
    gate = privacy.privacy_gate(card)
    assert not gate.passed and len(gate.failures) == 3


def test_independent_sample_scores_near_the_ceiling_and_passes_the_gate(independent_card):
    card, plots = independent_card
    main = sorted(k for k in card if not k.startswith("reference/"))
    for prefix in (CEILING, FLOOR):  # every metric exists in every row, under the same name
        assert sorted(k[len(prefix) :] for k in card if k.startswith(prefix)) == main
    for prefix in ("", CEILING, FLOOR):
        assert privacy.privacy_gate(card, prefix=prefix).passed, prefix

    def near_ceiling(name: str, tolerance: float, higher_is_better: bool = True) -> None:
        value, ceiling = card[name], card[CEILING + name]
        assert (
            (value >= ceiling - tolerance) if higher_is_better else (value <= ceiling + tolerance)
        ), (name, value, ceiling)

    near_ceiling("fidelity/prevalence/pearson_r", 0.02)
    near_ceiling("fidelity/cooccurrence/phi_r2_top100", 0.1)
    near_ceiling("fidelity/sequential_bigram/r2", 0.05)
    near_ceiling("fidelity/detection/auc", 0.05, higher_is_better=False)
    assert card["fidelity/detection/auc"] < 0.6 < card[FLOOR + "fidelity/detection/auc"]
    assert (
        card["fidelity/cooccurrence/phi_r2_top100"]
        > card[FLOOR + "fidelity/cooccurrence/phi_r2_top100"] + 0.3
    )
    assert card["fidelity/validity/rate"] == 1.0 > card[FLOOR + "fidelity/validity/rate"]
    assert card["utility/auroc_ratio"] > 0.85

    assert 0.4 < card["privacy/mia/distance_auc"] < 0.6
    assert abs(card["privacy/dcr/closer_to_train_excess"]) < 0.05
    assert card["privacy/presence/sensitivity"] < 0.05
    assert card["meta/n_synthetic"] == 3_000 and card[FLOOR + "meta/n_synthetic"] == 3_000
    assert {p.name for p in plots.iterdir()} == {
        "prevalence_scatter.png",
        "cooccurrence_scatter.png",
        "length_histograms.png",
        "dcr_distributions.png",
    }


def test_shuffled_conditions_keep_prevalence_and_lose_structure(
    real_root, independent_card, tmp_path
):
    block, _ = simulated_block(3_000, seed=SEED, first_id=5_000_000)
    shuffled = write_synthetic(
        tmp_path / "shuffled", [shuffle_conditions(block)], real_root, "shuffled"
    )
    card = compute_scorecard(
        real_root,
        shuffled,
        max_queries=2_000,
        seed=0,
        config=WITHOUT_REFERENCE_ROWS,
    )
    good, _ = independent_card
    assert card["fidelity/prevalence/pearson_r"] == pytest.approx(
        good["fidelity/prevalence/pearson_r"]
    )
    assert (
        card["fidelity/cooccurrence/phi_r2_top100"]
        < 0
        < good["fidelity/cooccurrence/phi_r2_top100"] - 0.3
    )
    assert (
        card["fidelity/sequential_bigram/transition_r2"]
        < good["fidelity/sequential_bigram/transition_r2"] - 0.2
    )
    assert card["fidelity/detection/auc"] > good["fidelity/detection/auc"] + 0.1


def test_floor_sampler_writes_the_real_marginals_in_the_platform_layout(real_root, tmp_path):
    meta = write_independent_marginal_sample(real_root, tmp_path / "floor", 4_000, seed=5)
    assert meta.patients == {S.TRAIN: 4_000, S.TUNING: 0, S.HELD_OUT: 0}
    assert S.DatasetMetadata.read(tmp_path / "floor").n_weeks == meta.n_weeks
    block = read_block(tmp_path / "floor", S.SPLITS, meta.n_weeks)
    floor, real = (
        FidelitySummary.from_block(block),
        FidelitySummary.from_block(read_block(real_root, [S.TRAIN], meta.n_weeks)),
    )
    assert (
        floor.n_patients == 4_000 and floor.rule_failures[1:5].sum() == 0
    )  # sorted, in range, non-empty
    word_share = lambda s: s.condition_words / s.condition_words.sum()  # noqa: E731
    assert 0.5 * np.abs(word_share(floor) - word_share(real)).sum() < 0.1
    length = lambda s: np.cumsum(s.length_hist) / s.length_hist.sum()  # noqa: E731
    size = max(len(floor.length_hist), len(real.length_hist))
    pad = lambda c: np.pad(c, (0, size - len(c)), constant_values=1.0)  # noqa: E731
    assert np.abs(pad(length(floor)) - pad(length(real))).max() < 0.05


def test_uncomputable_metrics_are_reported_with_reasons_and_the_rest_computed(real_root, tmp_path):
    one_word = [(i, 1, -2000, [(5, 9, 10)]) for i in range(50)]
    from test_metrics_fixtures import table_of

    from mirror.metrics.records import block_from_arrow

    n_weeks = S.DatasetMetadata.read(real_root).n_weeks
    root = write_synthetic(
        tmp_path / "tiny",
        [block_from_arrow(table_of(one_word, n_weeks), n_weeks=n_weeks)],
        real_root,
        "tiny",
    )
    undefined: dict[str, str] = {}
    card = compute_scorecard(
        real_root,
        root,
        max_queries=500,
        seed=0,
        config=WITHOUT_REFERENCE_ROWS,
        undefined=undefined,
    )
    assert "privacy/exact_match/synthetic_in_train_min5words" in undefined  # no record has 5 words
    assert "constant" in undefined["fidelity/cooccurrence/pearson_r"]  # no synthetic pair co-occurs
    assert (
        "constant" in undefined["fidelity/prevalence/band1/pearson_r"]
    )  # none of the rarest conditions
    assert "empty" in undefined["fidelity/gap_weeks"]  # nobody has two visits
    assert all(np.isnan(card[k]) and card[k + "/undefined"] == 1.0 for k in undefined)
    assert card["meta/undefined_metrics"] == len(undefined)
    for name in (
        "fidelity/prevalence/r2",
        "fidelity/sentence_length/ks",
        "fidelity/cooccurrence/r2",
        "privacy/exact_match/train_reproduced",
        "privacy/mia/distance_auc",
    ):
        assert np.isfinite(card[name]), name


def test_only_missing_gate_evidence_fails_the_scorecard():
    from mirror.metrics.scorecard import GATE_METRICS, fails_scorecard

    for name in GATE_METRICS:
        assert fails_scorecard(name) and not fails_scorecard(CEILING + name), name
    assert fails_scorecard("privacy/mia") and fails_scorecard("synthetic")  # a whole group / set
    for name in ("privacy/dcr/median_ratio", "fidelity/prevalence/band1/pearson_r", "utility/panel"):
        assert not fails_scorecard(name), name
    # The gate never passes on a NaN input, so "reported as undefined" cannot open it.
    card = {name: 0.0 for name in GATE_METRICS} | {"privacy/exact_match/reproduced_excess_se": 0.01}
    assert privacy.privacy_gate(card).passed
    assert not privacy.privacy_gate(card | {"privacy/mia/distance_auc": float("nan")}).passed


def test_score_job_writes_json_and_logs_to_mlflow(
    real_root, independent_root, tmp_path, monkeypatch
):
    from mirror import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = tracking.start_run("score-test", params={}, tags={})
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "score_job", Path(__file__).parents[1] / "jobs" / "score.py"
    )
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = tmp_path / "card.json"
    assert (
        job.main(
            [
                "--real",
                str(real_root),
                "--synthetic",
                str(independent_root),
                "--out",
                str(out),
                "--run",
                run_id,
                "--max-queries",
                "1000",
            ]
        )
        == 0
    )
    card = json.loads(out.read_text())
    assert all(isinstance(v, float) for v in card.values())
    assert {"fidelity/prevalence/r2", "utility/auroc_ratio", "privacy/mia/distance_auc"} <= set(
        card
    )
    logged = tracking.get_run(run_id).data.metrics
    assert logged["privacy/mia/distance_auc"] == pytest.approx(card["privacy/mia/distance_auc"])
    assert logged[CEILING + "fidelity/detection/auc"] == pytest.approx(
        card[CEILING + "fidelity/detection/auc"]
    )
    assert (tmp_path / "card_plots" / "dcr_distributions.png").exists()


def test_undefined_fidelity_metrics_are_reported_not_fatal(real_root, tmp_path):
    """A generator that never emits the rarest conditions (ScoEHR's decoder) leaves the
    rare-band prevalence r undefined: the scorecard reports it (NaN, a flag, a count, a reason),
    the JSON job output is strict JSON with null there, and the job exits 0."""
    from mirror.metrics.fidelity import prevalence_bands
    from mirror.metrics.records import PatientBlock
    from mirror.metrics.scorecard import json_safe

    n_weeks = S.DatasetMetadata.read(real_root).n_weeks
    rarest = prevalence_bands(FidelitySummary.from_block(read_block(real_root, [S.TRAIN], n_weeks)))[0]
    block, _ = simulated_block(3_000, seed=SEED, first_id=5_000_000)
    keep = ~np.isin(block.conditions, rarest)
    lengths = np.add.reduceat(keep, block.offsets[:-1]) if block.n_words else np.zeros(len(block), int)
    rows = np.flatnonzero(lengths > 0)
    kept = PatientBlock(
        **{f: getattr(block, f)[rows] for f in PatientBlock._ROW_FIELDS},
        offsets=np.concatenate([[0], np.cumsum(lengths[rows])]).astype(np.int64),
        **{f: getattr(block, f)[keep] for f in PatientBlock._WORD_FIELDS},
    )
    assert len(kept) > 2_900 and not np.isin(kept.conditions, rarest).any()
    root = write_synthetic(tmp_path / "no_rare", [kept], real_root, "no_rare")

    undefined: dict[str, str] = {}
    card = compute_scorecard(
        real_root, root, max_queries=2_000, seed=0, config=WITHOUT_REFERENCE_ROWS, undefined=undefined
    )
    name = "fidelity/prevalence/band1/pearson_r"
    assert "constant" in undefined[name]
    assert np.isnan(card[name]) and card[name + "/undefined"] == 1.0
    assert card["meta/undefined_metrics"] == len(undefined) >= 1
    assert np.isfinite(card["fidelity/prevalence/band2/pearson_r"])  # the others are computed
    assert json.loads(json.dumps(json_safe(card), allow_nan=False))[name] is None
    assert privacy.privacy_gate(card).passed  # undefined fidelity does not touch the gate
