"""TSTR / TRTR utility: labelling, task panel, and the known answer TSTR == TRTR."""

from __future__ import annotations

import numpy as np
import pytest
from test_metrics_fixtures import shuffle_conditions, simulated_block, tiny_block

from mirror.metrics import utility
from mirror.metrics.errors import MetricError


def test_split_history_at_a_visit_boundary():
    split = utility.split_history(tiny_block())
    assert split.rows.tolist() == [0, 2]  # patient 2 has a single visit
    h = split.history
    assert h.lengths.tolist() == [2, 3]  # patient 1: visit w10; patient 3: visits w0, w5
    assert h.weeks.tolist() == [10, 10, 0, 5, 5]
    assert split.labels.shape == (2, 605)
    assert split.labels[0].indices.tolist() == [5] and split.labels[1].indices.tolist() == [7]


def test_panel_is_fixed_by_real_data_and_feasible():
    block, _ = simulated_block(4000)
    train = utility.split_history(block.take(np.arange(3000)))
    test = utility.split_history(block.take(np.arange(3000, 4000)))
    panel = utility.select_panel(train, [test], min_positives=10)
    assert panel == utility.select_panel(train, [test], min_positives=10)
    assert len(set(panel.conditions)) == len(panel.conditions) == len(utility.PANEL_PREVALENCES)
    assert list(panel.real_prevalence) == sorted(panel.real_prevalence, reverse=True)
    for c in panel.conditions:
        positives = test.labels[:, c].sum()
        assert 10 <= positives <= len(test) - 10
    with pytest.raises(MetricError, match="larger held-out split"):
        utility.select_panel(train, [test], min_positives=10_000)


def test_tstr_equals_trtr_when_synthetic_is_the_real_training_data():
    block, n_weeks = simulated_block(3000)
    train = utility.split_history(block.take(np.arange(2000)))
    test = utility.split_history(block.take(np.arange(2000, 3000)))
    panel = utility.select_panel(train, [test], min_positives=10)
    same = utility.utility_metrics(panel, train, train, test, n_weeks, max_train=2000)
    assert same["auroc_ratio"] == pytest.approx(1.0)
    assert same["trtr_auroc_mean"] > 0.6
    for slot in range(1, len(panel.conditions) + 1):
        assert same[f"task{slot}/tstr_auroc"] == same[f"task{slot}/trtr_auroc"]

    shuffled = utility.split_history(shuffle_conditions(block.take(np.arange(2000)), seed=1))
    worse = utility.utility_metrics(panel, train, shuffled, test, n_weeks, max_train=2000)
    assert worse["tstr_auroc_mean"] < same["tstr_auroc_mean"] - 0.05
    assert worse["n_train"] == min(len(train), len(shuffled))
