"""Evaluation suites of predictors and recommenders: streaming over held-out batches, each
number beside a floor that uses no model.

* Predictor, per target: ``risk`` targets get AUROC and AUPRC (floors: 0.5 and the positive
  rate, what a constant score reaches); ``value`` targets get MSE (floor: the MSE of predicting
  the training split's mean).
* Recommender: sample-averaged Jaccard and F1 at a 0.5 threshold, and micro PR-AUC (floor: every
  example gets the training split's label frequencies as scores, thresholded the same way).

Scores are kept per example for the exact rank metrics: at most ``train.eval_patients``
examples (never the whole split), a few floats each.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from mirror.checkpoint import LoadedRun
from mirror.data.schema import HELD_OUT, TRAIN

FLOOR_EXAMPLES = 50_000  # training examples the floors are fitted on, at most


def _examples(loaded: LoadedRun, split: str, limit: int):
    view, train = loaded.view(), loaded.spec.train
    dataset, _ = view.read(split)
    if limit:
        dataset = dataset.limit(limit)
    return view.batches(dataset, train.eval_batch_size, training=False, device="cpu")


def _binary_metrics(score: np.ndarray, target: np.ndarray) -> dict[str, float]:
    if len(np.unique(target)) < 2:
        return {"auroc": float("nan"), "auprc": float("nan")}
    return {"auroc": float(roc_auc_score(target, score)), "auprc": float(average_precision_score(target, score))}


@torch.no_grad()
def predictor_suite(loaded: LoadedRun, artifacts: Path) -> dict[str, float]:
    """AUROC/AUPRC or MSE per declared target on held-out examples, beside constant floors."""
    model = loaded.model
    kinds = dict(model.prediction_targets)
    train_sum = {name: 0.0 for name in kinds}
    train_n = {name: 0 for name in kinds}
    for batch in _examples(loaded, TRAIN, FLOOR_EXAMPLES):
        for name, pred in model.predict(batch).items():
            seen = pred.observed.bool()
            train_sum[name] += float(pred.target[seen].double().sum())
            train_n[name] += int(seen.sum())
    scores: dict[str, list[np.ndarray]] = {name: [] for name in kinds}
    targets: dict[str, list[np.ndarray]] = {name: [] for name in kinds}
    for batch in _examples(loaded, HELD_OUT, loaded.spec.train.eval_patients):
        for name, pred in model.predict(batch).items():
            seen = pred.observed.bool()
            scores[name].append(pred.score[seen].double().cpu().numpy())
            targets[name].append(pred.target[seen].double().cpu().numpy())
    out: dict[str, float] = {}
    for name, kind in kinds.items():
        score = np.concatenate(scores[name]) if scores[name] else np.zeros(0)
        target = np.concatenate(targets[name]) if targets[name] else np.zeros(0)
        out[f"eval/{name}/examples"] = float(len(target))
        if kind == "risk":
            for metric, value in _binary_metrics(score, target).items():
                out[f"eval/{name}/{metric}"] = value
            out[f"baseline/{name}/auroc"] = 0.5
            out[f"baseline/{name}/auprc"] = float(target.mean()) if len(target) else float("nan")
        else:
            train_mean = train_sum[name] / max(1, train_n[name])
            out[f"eval/{name}/mse"] = float(np.mean((score - target) ** 2)) if len(target) else float("nan")
            out[f"baseline/{name}/mse"] = float(np.mean((train_mean - target) ** 2)) if len(target) else float("nan")
    return out


def multilabel_metrics(scores: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Sample-averaged Jaccard and F1 of ``scores >= threshold`` against ``truth``, and micro
    PR-AUC of the scores; examples with an empty truth and prediction count as perfect."""
    predicted = scores >= threshold
    truth = truth.astype(bool)
    both = (predicted & truth).sum(1)
    either = (predicted | truth).sum(1)
    sizes = predicted.sum(1) + truth.sum(1)
    jaccard = np.where(either > 0, both / np.maximum(either, 1), 1.0)
    f1 = np.where(sizes > 0, 2 * both / np.maximum(sizes, 1), 1.0)
    pr_auc = float(average_precision_score(truth.ravel(), scores.ravel())) if truth.any() else float("nan")
    return {"jaccard": float(jaccard.mean()), "f1": float(f1.mean()), "pr_auc": pr_auc}


@torch.no_grad()
def recommender_suite(loaded: LoadedRun, artifacts: Path) -> dict[str, float]:
    """Jaccard, F1 and PR-AUC on held-out examples, beside the label-frequency floor."""
    model = loaded.model
    counts: np.ndarray | None = None
    n_train = 0
    for batch in _examples(loaded, TRAIN, FLOOR_EXAMPLES):
        _, truth = model.recommend(batch)
        batch_counts = truth.double().sum(0).cpu().numpy()
        counts = batch_counts if counts is None else counts + batch_counts
        n_train += truth.shape[0]
    scores, truths = [], []
    for batch in _examples(loaded, HELD_OUT, loaded.spec.train.eval_patients):
        score, truth = model.recommend(batch)
        scores.append(score.double().cpu().numpy())
        truths.append(truth.cpu().numpy())
    score, truth = np.concatenate(scores), np.concatenate(truths)
    frequency = (counts if counts is not None else np.zeros(truth.shape[1])) / max(1, n_train)
    out = {f"eval/{k}": v for k, v in multilabel_metrics(score, truth).items()}
    floor = np.broadcast_to(frequency, truth.shape)
    out |= {f"baseline/{k}": v for k, v in multilabel_metrics(floor, truth).items()}
    out["eval/examples"] = float(len(truth))
    return out
