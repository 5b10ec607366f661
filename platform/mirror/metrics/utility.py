"""Utility: train on synthetic, test on real (TSTR) against train on real (TRTR).

Task family: *does condition c appear in the final part of the sentence, given the earlier
part?* A patient with ``n_v >= 2`` visits (words grouped by week) is split after
``h = clip(ceil(n_v * HISTORY_FRACTION), 1, n_v - 1)`` visits: the history (visits ``< h``)
gives the features, the rest the labels. Splitting at a visit boundary keeps words of one week
on one side, so nothing recorded at the index week leaks into the features. The same labelling
function is applied to real and synthetic records.

The panel is fixed by the real data alone: for each target prevalence in
``PANEL_PREVALENCES`` the condition whose final-part prevalence in real training data is
closest (log scale) among those with enough positives and negatives in every real test set,
distinct conditions. Every model evaluated against the same real dataset is therefore scored
on the same tasks, under slot names ``task1`` (most common) ... ``task5``.

Model: L2 logistic regression (C = 1, liblinear) on ``features.patient_features`` of the
history, the same for every arm. TRTR trains on n real training patients and TSTR on n
synthetic ones (n matched, logged); both are tested on all eligible held-out patients. A
training set with one class gives the constant predictor, whose AUROC is 0.5 (counted in
``tstr_single_class_tasks``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from mirror.data.vocab import N_CONDITIONS
from mirror.metrics import features as F
from mirror.metrics.errors import MetricError
from mirror.metrics.records import PatientBlock

HISTORY_FRACTION = 2 / 3
PANEL_PREVALENCES = (0.20, 0.10, 0.05, 0.02, 0.01)


@dataclass(frozen=True)
class LabelledSplit:
    """Eligible patients of a block: history (features side) and final-part labels."""

    rows: np.ndarray  # (m,) rows of the source block
    history: PatientBlock  # (m,) patients, history words only
    labels: sp.csr_matrix  # (m, 605) int8: condition in the final part

    def __len__(self) -> int:
        return len(self.rows)


def split_history(block: PatientBlock) -> LabelledSplit:
    v = F.visits(block)
    n_visits = F.visits_per_patient(block, v)
    eligible = n_visits >= 2
    first_visit = np.zeros(len(block) + 1, dtype=np.int64)
    np.cumsum(n_visits, out=first_visit[1:])
    cut = np.clip(
        np.ceil(n_visits * HISTORY_FRACTION).astype(np.int64), 1, np.maximum(n_visits - 1, 1)
    )
    rows_w = block.row_of_word()
    visit_in_patient = v.of_word - first_visit[rows_w]
    in_history = visit_in_patient < cut[rows_w]
    rows = np.flatnonzero(eligible)
    sub = block.take(rows)  # rows ascending: the sub-block's words are the eligible words, in order
    sub_hist = in_history[eligible[rows_w]]
    history = _keep_words(sub, sub_hist)
    future = _keep_words(sub, ~sub_hist)
    return LabelledSplit(rows=rows, history=history, labels=F.condition_matrix(future))


def _keep_words(block: PatientBlock, keep: np.ndarray) -> PatientBlock:
    lengths = np.bincount(block.row_of_word()[keep], minlength=len(block))
    offsets = np.zeros(len(block) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return PatientBlock(
        subject_id=block.subject_id,
        sex=block.sex,
        birth_week=block.birth_week,
        enroll_start=block.enroll_start,
        enroll_end=block.enroll_end,
        rule_failures=block.rule_failures,
        offsets=offsets,
        conditions=block.conditions[keep],
        age_groups=block.age_groups[keep],
        weeks=block.weeks[keep],
    )


@dataclass(frozen=True)
class TaskPanel:
    conditions: tuple[int, ...]
    real_prevalence: tuple[float, ...]


def select_panel(
    real_train: LabelledSplit,
    test_sets: Sequence[LabelledSplit],
    min_positives: int = 10,
    targets: Sequence[float] = PANEL_PREVALENCES,
) -> TaskPanel:
    """Fixed task panel from real data only (see module docstring)."""
    if len(real_train) == 0:
        raise MetricError("utility/panel", "no real training patient has >= 2 visits")
    train_pos = np.diff(real_train.labels.tocsc().indptr)
    prevalence = train_pos / len(real_train)
    feasible = train_pos >= min_positives
    for test in test_sets:
        pos = np.diff(test.labels.tocsc().indptr)
        feasible &= (pos >= min_positives) & (len(test) - pos >= min_positives)
    chosen: list[int] = []
    for target in targets:
        candidates = np.flatnonzero(feasible & ~np.isin(np.arange(N_CONDITIONS), chosen))
        if len(candidates) == 0:
            break
        gap = np.abs(np.log(prevalence[candidates]) - np.log(target))
        chosen.append(int(candidates[np.argmin(gap)]))
    if not chosen:
        raise MetricError(
            "utility/panel",
            f"no condition has >= {min_positives} positives and negatives "
            "in every real test set; use a larger held-out split",
        )
    chosen.sort(key=lambda c: -prevalence[c])
    return TaskPanel(tuple(chosen), tuple(float(prevalence[c]) for c in chosen))


def _fit_auroc(
    x_train: sp.csr_matrix, y_train: np.ndarray, x_test: sp.csr_matrix, y_test: np.ndarray
) -> tuple[float, bool]:
    """(test AUROC, whether training labels had a single class)."""
    if len(np.unique(y_train)) < 2:
        return float(roc_auc_score(y_test, np.zeros(len(y_test)))), True  # constant predictor
    model = LogisticRegression(C=1.0, solver="liblinear", max_iter=1000)
    model.fit(x_train, y_train)
    return float(roc_auc_score(y_test, model.decision_function(x_test))), False


def utility_metrics(
    panel: TaskPanel,
    real_train: LabelledSplit,
    syn_train: LabelledSplit,
    test: LabelledSplit,
    n_weeks: int,
    max_train: int,
) -> dict[str, float]:
    """Names relative to ``utility/``. Inputs are already in random order (prefixes are
    random samples)."""
    n = min(len(real_train), len(syn_train), max_train)
    if n < 10:
        raise MetricError(
            "utility/tstr_auroc_mean",
            f"needs >= 10 training patients with >= 2 visits per arm, "
            f"got {len(real_train)} real and {len(syn_train)} synthetic",
        )
    for c in panel.conditions:
        pos = test.labels[:, c].sum()
        if pos == 0 or pos == len(test):
            raise MetricError(
                "utility/tstr_auroc_mean", f"test set has a single class for condition {c}"
            )
    x_test = F.patient_features(test.history, n_weeks)
    # Each arm fits on the columns its training set uses (an all-zero column gets no weight,
    # and liblinear is much slower with them).
    x_real = F.patient_features(_head(real_train.history, n), n_weeks)
    used = F.used_columns(x_real)
    x_real, x_test_real = x_real[:, used].tocsr(), x_test[:, used].tocsr()
    x_syn = F.patient_features(_head(syn_train.history, n), n_weeks)
    used = F.used_columns(x_syn)
    x_syn, x_test_syn = x_syn[:, used].tocsr(), x_test[:, used].tocsr()
    out: dict[str, float] = {}
    tstr, trtr, single = [], [], 0
    for slot, (c, prev) in enumerate(
        zip(panel.conditions, panel.real_prevalence, strict=True), start=1
    ):
        y_test = test.labels[:, c].toarray().ravel()
        a_real, _ = _fit_auroc(
            x_real, real_train.labels[:n, c].toarray().ravel(), x_test_real, y_test
        )
        a_syn, one_class = _fit_auroc(
            x_syn, syn_train.labels[:n, c].toarray().ravel(), x_test_syn, y_test
        )
        single += one_class
        out[f"task{slot}/condition_id"] = float(c)
        out[f"task{slot}/real_prevalence"] = prev
        out[f"task{slot}/trtr_auroc"] = a_real
        out[f"task{slot}/tstr_auroc"] = a_syn
        out[f"task{slot}/auroc_ratio"] = a_syn / a_real
        tstr.append(a_syn)
        trtr.append(a_real)
    mean_tstr, mean_trtr = float(np.mean(tstr)), float(np.mean(trtr))
    out["tstr_auroc_mean"] = mean_tstr
    out["trtr_auroc_mean"] = mean_trtr
    out["auroc_ratio"] = mean_tstr / mean_trtr
    if mean_trtr <= 0.5:
        raise MetricError(
            "utility/auroc_ratio_chance_corrected", f"TRTR AUROC {mean_trtr:.3f} <= 0.5"
        )
    out["auroc_ratio_chance_corrected"] = (mean_tstr - 0.5) / (mean_trtr - 0.5)
    out["n_tasks"] = float(len(panel.conditions))
    out["n_train"] = float(n)
    out["n_test"] = float(len(test))
    out["tstr_single_class_tasks"] = float(single)
    return out


def _head(block: PatientBlock, n: int) -> PatientBlock:
    return block.take(np.arange(min(n, len(block))))
