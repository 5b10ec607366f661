"""Evaluation suites of predictors and recommenders: streaming over held-out batches, each
number beside a floor that uses no model.

* Predictor, per target: ``risk`` targets get AUROC and AUPRC (floors: 0.5 and the positive
  rate, what a constant score reaches); ``value`` targets get MSE (floor: the MSE of predicting
  the training split's mean).
* Recommender: ``mirror.evaluation.recommender``.

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
