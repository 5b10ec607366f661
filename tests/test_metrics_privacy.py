"""Privacy metrics and the privacy gate, against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from mirror.metrics import privacy
from mirror.metrics.errors import MetricError


def test_exact_match_rates_by_hand():
    train = np.array([1, 2, 3, 4, 5, 6, 7, 8], dtype=np.uint64)
    holdout = np.array([9, 10, 1, 11], dtype=np.uint64)  # 1 also occurs in train
    syn = np.array([1, 2, 2, 9, 42], dtype=np.uint64)
    words = np.array([1, 7, 7, 3, 9])
    m = privacy.exact_match_metrics(syn, train, holdout)
    assert m["exact_match/synthetic_in_train"] == pytest.approx(3 / 5)
    assert m["exact_match/synthetic_in_holdout"] == pytest.approx(2 / 5)
    long = privacy.exact_match_long(syn, words, train)
    assert long == {"exact_match/synthetic_in_train_min5words": pytest.approx(2 / 3)}
    assert m["exact_match/train_reproduced"] == pytest.approx(2 / 8)
    assert m["exact_match/holdout_reproduced"] == pytest.approx(2 / 4)
    assert m["exact_match/holdout_in_train"] == pytest.approx(1 / 4)
    assert m["exact_match/synthetic_duplicates"] == pytest.approx(1 / 5)
    pooled = 4 / 12
    assert m["exact_match/reproduced_excess_se"] == pytest.approx(
        np.sqrt(pooled * (1 - pooled) * (1 / 8 + 1 / 4))
    )
    with pytest.raises(MetricError, match=">= 5 words"):
        privacy.exact_match_long(syn, np.ones(5, int), train)


def test_dcr_share_splits_ties_by_neighbour_counts():
    d_t, d_h = np.array([0, 3, 5, 2]), np.array([4, 3, 2, 2])
    ties_t, ties_h = np.array([1, 3, 1, 1]), np.array([1, 1, 1, 3])
    m = privacy.dcr_metrics(
        d_t, ties_t, d_h, ties_h, n_train=90, n_holdout=10, d_real_to_train=np.array([2, 4, 6])
    )
    assert m["dcr/closer_to_train_share"] == pytest.approx((1 + 3 / 4 + 0 + 1 / 4) / 4)
    assert m["dcr/closer_to_train_expected"] == pytest.approx(0.9)
    assert m["dcr/median_ratio"] == pytest.approx(2.5 / 2.5)
    assert m["dcr/median_ratio_to_real"] == pytest.approx(2.5 / 4)
    assert m["dcr/train_zero_fraction"] == 0.25
    with pytest.raises(MetricError, match="median synthetic distance to held-out"):
        privacy.dcr_metrics(d_t, ties_t, np.zeros(4, int), ties_h, 90, 10, np.array([2]))


def test_membership_auc_and_low_fpr_tpr():
    auc, tpr = privacy.membership_auc(np.array([3.0, 2.0]), np.array([1.0, 0.0]))
    assert auc == 1.0 and tpr == 1.0
    auc, tpr = privacy.membership_auc(np.zeros(50), np.zeros(50))
    assert auc == 0.5 and tpr == pytest.approx(0.01)  # one tied threshold: the diagonal
    members = np.r_[np.full(10, 5.0), np.zeros(90)]  # 10% of members stand out
    auc, tpr = privacy.membership_auc(members, np.zeros(100))
    assert auc == pytest.approx(0.5 + 0.1 / 2) and tpr == pytest.approx(0.1 + 0.9 * 0.01)
    with pytest.raises(MetricError, match="NaN"):
        privacy.membership_auc(np.array([np.nan]), np.array([1.0]))


def test_white_box_membership_from_losses():
    m = privacy.membership_from_losses(np.array([0.1, 0.2, 0.3]), np.array([0.4, 0.5, 0.6]))
    assert m == {"privacy/mia/loss_auc": 1.0, "privacy/mia/loss_tpr_at_1pct_fpr": 1.0}
    m = privacy.membership_from_losses(np.array([0.6, 0.5]), np.array([0.1, 0.2]))
    assert m["privacy/mia/loss_auc"] == 0.0


def test_adversarial_accuracy_by_hand():
    d_ab, d_aa = np.array([1, 2, 3, 4]), np.array([2, 2, 1, 1])  # farther: 3rd, 4th; tie: 2nd
    d_ba, d_bb = np.array([5, 5]), np.array([1, 9])
    assert privacy.adversarial_accuracy(d_ab, d_aa, d_ba, d_bb) == pytest.approx(
        0.5 * (2 / 4 + 1 / 2)
    )
    assert privacy.adversarial_accuracy(d_ab, d_aa, d_ba, d_bb, 0.5) == pytest.approx(
        0.5 * (2.5 / 4 + 1 / 2)
    )


def _rows(sets):
    indptr = np.r_[0, np.cumsum([len(s) for s in sets])].astype(np.int64)
    return indptr, np.concatenate([np.asarray(s, np.int64) for s in sets])


def test_nnaa_flags_a_full_copy(ray_cluster):
    rng = np.random.default_rng(0)
    train = [np.unique(rng.integers(0, 400, rng.integers(3, 9))) for _ in range(60)]
    holdout = [np.unique(rng.integers(0, 400, rng.integers(3, 9))) for _ in range(60)]
    m = privacy.nnaa_metrics(_rows(train), _rows(holdout), _rows(train), block_size=60, seed=0)
    assert (
        m["nnaa/aa_train"] == 0.0 == m["nnaa/aa_train_half_ties"]
    )  # the nearest record is the copy
    assert abs(m["nnaa/aa_holdout_half_ties"] - 0.5) < 0.1
    assert m["nnaa/privacy_loss_half_ties"] > 0.4 and m["nnaa/train_blocks"] == 1
    fresh = [np.unique(rng.integers(0, 400, rng.integers(3, 9))) for _ in range(60)]
    clean = privacy.nnaa_metrics(_rows(train), _rows(holdout), _rows(fresh), block_size=60, seed=0)
    assert abs(clean["nnaa/privacy_loss_half_ties"]) < 0.15


def test_presence_disclosure_by_hand():
    known_t = (np.array([10, 11, 12, 13], np.uint64), np.array([0, 0, 1, 2]))  # 3 known patients
    known_h = (np.array([20, 11], np.uint64), np.array([0, 1]))  # 2 control patients
    syn_visits = np.array([11, 99], np.uint64)
    m = privacy.presence_metrics(
        known_t,
        np.array([100, 101, 102], np.uint64),
        known_h,
        np.array([200, 201], np.uint64),
        syn_visits,
        np.array([101, 300], np.uint64),
    )
    assert m["presence/sensitivity"] == pytest.approx(1 / 3)
    assert m["presence/holdout_sensitivity"] == 0.0
    assert m["presence/risk_band"] == 1.0  # 1/3 is the lower edge of "medium"
    assert m["presence/visit_sensitivity"] == pytest.approx(1 / 3)  # patient 0 via visit 11
    assert m["presence/visit_holdout_sensitivity"] == pytest.approx(1 / 2)


def test_risk_bands():
    assert [privacy.risk_band(v) for v in (0.0, 0.33, 1 / 3, 0.5, 0.66, 0.67, 0.9)] == [
        0,
        0,
        1,
        1,
        1,
        2,
        2,
    ]


def test_attribute_disclosure_recovers_unknown_conditions_from_copies(ray_cluster):
    rng = np.random.default_rng(1)
    known = sp.random(
        40, 605, density=0.05, format="csr", random_state=rng, data_rvs=np.ones
    ).astype(np.int8)
    copies = sp.vstack([known] * 5, format="csr")  # five copies: the 5-NN vote is unanimous
    unrelated = sp.csr_matrix((200, 605), dtype=np.int8)
    m = privacy.attribute_metrics(known, copies, unrelated, seed=0)
    assert m["attribute/sensitivity"] == 1.0 and m["attribute/risk_band"] == 2.0
    assert m["attribute/holdout_sensitivity"] == 0.0 and m["attribute/excess"] == 1.0
    assert set(k for k in m if "known" in k) == {
        f"attribute/{s}sensitivity_known{p:02d}"
        for s in ("", "holdout_")
        for p in privacy.ATTRIBUTE_KNOWN_PERCENTS
    }


def test_attribute_disclosure_on_visit_records_of_another_width(ray_cluster):
    """Trial visits (medications + AEs, 66 columns) are attacked at their own width; a width
    that does not fit the multi-hots is an error, not a silent truncation."""
    rng = np.random.default_rng(2)
    known = sp.random(30, 66, density=0.15, format="csr", random_state=rng, data_rvs=np.ones).astype(np.int8)
    copies = sp.vstack([known] * 5, format="csr")
    unrelated = sp.csr_matrix((100, 66), dtype=np.int8)
    m = privacy.attribute_metrics(known, copies, unrelated, seed=0, width=66)
    # Few known columns of 66: records tie in the 5-NN, so the copies win most votes, not all.
    assert m["attribute/sensitivity"] > 0.5 and m["attribute/holdout_sensitivity"] == 0.0
    with pytest.raises(MetricError, match="width 605"):
        privacy.attribute_metrics(known, copies, unrelated, seed=0)


def _card(**overrides):
    card = {
        "privacy/exact_match/train_reproduced": 0.001,
        "privacy/exact_match/holdout_reproduced": 0.001,
        "privacy/exact_match/reproduced_excess_se": 0.0005,
        "privacy/mia/distance_auc": 0.51,
        "privacy/presence/sensitivity": 0.01,
    }
    card.update(overrides)
    return card


def test_gate_passes_clean_and_refuses_each_failure():
    assert privacy.privacy_gate(_card()).passed
    result = privacy.privacy_gate(
        _card(
            **{
                "privacy/exact_match/train_reproduced": 1.0,
                "privacy/mia/distance_auc": 0.99,
                "privacy/presence/sensitivity": 0.5,
            }
        )
    )
    assert not result.passed and len(result.failures) == 3
    assert "exact match" in result.failures[0] and "AUC 0.990 > 0.6" in result.failures[1]
    assert not privacy.privacy_gate(
        _card(**{"privacy/presence/sensitivity": 1 / 3})
    ).passed  # strictly below
    within_noise = _card(**{"privacy/exact_match/train_reproduced": 0.0024})  # +2.8 SE
    assert privacy.privacy_gate(within_noise).passed
    assert not privacy.privacy_gate(within_noise, privacy.GateThresholds(exact_match_z=1.0)).passed
    loose = privacy.GateThresholds(
        max_mia_auc=0.995, max_presence_sensitivity=0.9, exact_match_z=10_000
    )
    assert privacy.privacy_gate(_card(**{"privacy/mia/distance_auc": 0.99}), loose).passed


def test_gate_refuses_missing_or_nan_evidence():
    card = _card()
    del card["privacy/mia/distance_auc"]
    result = privacy.privacy_gate(card)
    assert not result.passed and "missing" in result.failures[0]
    assert not privacy.privacy_gate(_card(**{"privacy/presence/sensitivity": float("nan")})).passed
    prefixed = {f"reference/floor/{k}": v for k, v in _card().items()}
    assert privacy.privacy_gate(prefixed, prefix="reference/floor/").passed
    with pytest.raises(ValueError, match="max_mia_auc"):
        privacy.GateThresholds(max_mia_auc=1.5)
