"""ScoEHR's four metrics (DDM, PCD, log-cluster U, SRA) on known answers, the code-set reduction
the scorecard applies to code-vector generators, and jobs/score.py on a copy of the training
split (the log-cluster of identical data is reported at its limit; the gate refuses)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from mirror.data import schema as S
from mirror.metrics import code_vector as CV
from mirror.metrics.records import PatientBlock
from mirror.metrics.views import as_code_sets, reduce_to


def correlated(n: int, seed: int, independent: bool = False) -> sp.csr_matrix:
    """Binary vectors over 12 codes: codes 0-5 follow one latent switch each pair, 6-11 rare."""
    rng = np.random.default_rng(seed)
    switch = rng.random((n, 3)) < 0.4
    x = np.zeros((n, 12), bool)
    x[:, 0:3] = switch
    x[:, 3:6] = switch if not independent else rng.random((n, 3)) < 0.4
    x[:, 6:] = rng.random((n, 6)) < 0.05
    return sp.csr_matrix(x.astype(np.float32))


def test_ddm_and_pcd_are_zero_for_identical_sets_and_see_lost_correlations():
    real, twin, broken = correlated(4000, 0), correlated(4000, 1), correlated(4000, 2, independent=True)
    assert CV.ddm(real, real) == 0.0 and CV.pcd(real, real) == 0.0
    assert CV.ddm(real, twin) < 0.02 and CV.ddm(real, broken) < 0.02  # marginals agree
    assert CV.pcd(real, broken) > 5 * CV.pcd(real, twin)  # correlations do not
    assert CV.pcd(real, broken, max_features=6) == pytest.approx(CV.pcd(real, broken), rel=0.2)  # top-6 hold it
    constant = sp.csr_matrix(np.zeros((10, 12), np.float32))
    assert np.all(CV.correlation(constant) == 0)  # NaN -> 0, as the paper


def test_log_cluster_reports_identical_sets_at_its_limit():
    real = correlated(500, 0)
    value, at_limit = CV.log_cluster(real, real, 20, seed=0)
    assert at_limit and value == CV.LOG_CLUSTER_LIMIT and json.dumps(value)  # JSON-safe
    other, flag = CV.log_cluster(real, correlated(500, 9, independent=True), 20, seed=0)
    assert not flag and CV.LOG_CLUSTER_LIMIT < other < 0
    # Several seeds: the mean of each seed's own U, and the limit only when every seed is at it.
    runs = CV.log_cluster_runs(real, correlated(500, 9, independent=True), 20, seed=0, seeds=3)
    assert runs[0] == other and len(set(runs)) > 1  # k-means lands differently per seed
    mean, flag = CV.log_cluster(real, correlated(500, 9, independent=True), 20, seed=0, seeds=3)
    assert not flag and mean == pytest.approx(np.mean(runs))
    assert CV.mean_of_runs([CV.LOG_CLUSTER_LIMIT, -3.0]) == (pytest.approx((CV.LOG_CLUSTER_LIMIT - 3) / 2), False)
    assert CV.log_cluster(real, real, 20, seed=0, seeds=2) == (CV.LOG_CLUSTER_LIMIT, True)


def noisy(n: int, seed: int) -> sp.csr_matrix:
    """Code 0 = (code 1 XOR code 2) flipped 10% of the time, plus noisy copies: classifiers of
    different capacity (linear, naive Bayes, trees) reach clearly different AUROCs."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 10)) < 0.5
    x[:, 0] = (x[:, 1] ^ x[:, 2]) ^ (rng.random(n) < 0.1)
    x[:, 3] = x[:, 0] ^ (rng.random(n) < 0.3)
    return sp.csr_matrix(x.astype(np.float32))


def test_sra_agrees_for_a_faithful_set_and_counts_unlearnable_targets():
    real, test = noisy(3000, 0), noisy(2000, 1)
    same = CV.sra(real, real, test, n_targets=10, min_positives=20, seed=0)  # the copy: B = A
    assert same["sra"] == 1.0 and same["sra/n_targets"] == 10 and same["sra/targets_unlearnable"] == 0
    assert same["sra/tstr_auroc"] == same["sra/trtr_auroc"]
    empty = sp.csr_matrix((3000, 10), dtype=np.float32)
    none = CV.sra(real, empty, test, n_targets=3, min_positives=20, seed=0)
    assert none["sra"] == 0.0 and none["sra/targets_unlearnable"] == 3  # B all ½: no agreement
    assert CV.ranking_agreement(np.array([0.6, 0.7, 0.8]), np.array([0.5, 0.6, 0.9])) == 1.0


def test_code_set_reduction_keeps_only_distinct_conditions():
    block = PatientBlock(
        subject_id=np.array([1, 2]), sex=np.array([-1, 1], np.int8), birth_week=np.array([-500, 3], np.int32),
        enroll_start=np.zeros(2, np.int32), enroll_end=np.array([90, 10], np.int32), rule_failures=np.array([0, 4], np.uint16),
        offsets=np.array([0, 3, 4]), conditions=np.array([7, 2, 7, 5], np.int16),
        age_groups=np.array([1, 2, 3, 0], np.int8), weeks=np.array([1, 5, 9, 3], np.int32),
    )  # fmt: skip
    reduced = as_code_sets(block)
    assert reduced.offsets.tolist() == [0, 2, 3] and reduced.conditions.tolist() == [2, 7, 5]
    assert not reduced.weeks.any() and not reduced.age_groups.any() and (reduced.sex == 1).all()
    assert reduce_to(block, "sentence") is block
    with pytest.raises(ValueError, match="record type 'visits'"):
        reduce_to(block, "visits")


@pytest.mark.slow
def test_score_job_on_a_copy_of_train_reports_the_limit_and_the_gate_refuses(ray_cluster, tmp_path, capsys):
    from mirror.data.simulator import generate_dataset

    real = tmp_path / "real"
    generate_dataset(real, 5000, seed=2, workers=1)
    copy = tmp_path / "copy"  # what a new user tries: the training Parquet files as "synthetic"
    shutil.copytree(real, copy)
    for split in (S.TUNING, S.HELD_OUT):
        shutil.rmtree(S.split_dir(copy, split))
        S.split_dir(copy, split).mkdir()
    spec = importlib.util.spec_from_file_location("score_job", Path(__file__).parents[1] / "jobs" / "score.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = tmp_path / "card.json"
    assert job.main(["--real", str(real), "--synthetic", str(copy), "--out", str(out), "--max-queries", "500"]) == 0
    card = json.loads(out.read_text())
    assert card["fidelity/log_cluster/at_limit"] == 1.0 and card["fidelity/log_cluster"] == CV.LOG_CLUSTER_LIMIT
    assert card["fidelity/code_vector/log_cluster/at_limit"] == 1.0
    assert card["fidelity/code_vector/ddm"] == 0.0 and card["fidelity/code_vector/pcd"] == 0.0
    for prefix in ("reference/ceiling/", "reference/floor/"):
        assert card[prefix + "fidelity/code_vector/log_cluster/at_limit"] == 0.0
        assert card[prefix + "utility/code_vector/sra/n_targets"] >= 1
    assert "privacy gate: REFUSED" in capsys.readouterr().out
    # The same copy compared as code sets (a code-vector generator's record type): time and
    # visit metrics are not computed, the copy is still found and refused.
    from mirror.metrics import privacy
    from mirror.metrics.scorecard import compute_scorecard

    as_sets = compute_scorecard(real, copy, max_queries=500, seed=0, record_type="code_set")
    assert as_sets["meta/record_type_code_set"] == 1.0
    assert not any(k.startswith(("fidelity/visits", "fidelity/gap_weeks", "utility/auroc")) for k in as_sets)
    assert as_sets["privacy/exact_match/synthetic_in_train"] == 1.0
    assert as_sets["fidelity/code_vector/ddm"] == 0.0 and as_sets["utility/code_vector/sra"] == 1.0
    assert not privacy.privacy_gate(as_sets).passed
