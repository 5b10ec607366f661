"""Evaluation suites of predictors and recommenders: streaming over held-out batches, each
number beside a floor that uses no model.

* Predictor, per target: ``risk`` targets get AUROC and AUPRC (floors: 0.5 and the positive
  rate, what a constant score reaches); ``value`` targets get MSE (floor: the MSE of predicting
  the training split's mean). When the view's batches offer ``floor_features()`` (a plain
  per-example feature matrix, e.g. the windows view's last window), a second floor is a GLM on
  them (logistic or ridge regression, scikit-learn, fitted on training examples):
  ``baseline/glm/<target>/...``. A model has to beat a regression on the same inputs.
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


def _fit_glm_floor(kind: str, features: np.ndarray, target: np.ndarray):
    """Logistic (risk) or ridge (value) regression on standardised features; None when the
    training examples cannot fit one (a single class, or none)."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(target) < 2 or (kind == "risk" and len(np.unique(target)) < 2):
        return None
    estimator = LogisticRegression(max_iter=1000) if kind == "risk" else Ridge(alpha=1.0)
    return make_pipeline(StandardScaler(), estimator).fit(features, target)


def _glm_scores(glm, kind: str, features: np.ndarray) -> np.ndarray:
    return glm.predict_proba(features)[:, 1] if kind == "risk" else glm.predict(features)


def binary_metrics(score: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """AUROC and AUPRC; NaN for both when the target has one class only."""
    if len(np.unique(target)) < 2:
        return {"auroc": float("nan"), "auprc": float("nan")}
    return {"auroc": float(roc_auc_score(target, score)), "auprc": float(average_precision_score(target, score))}


@torch.no_grad()
def predictor_suite(loaded: LoadedRun, artifacts: Path) -> dict[str, float]:
    """AUROC/AUPRC or MSE per declared target on held-out examples, beside constant floors and,
    where the view offers floor features, a GLM floor."""
    model = loaded.model
    kinds = dict(model.prediction_targets)
    train_sum = {name: 0.0 for name in kinds}
    train_n = {name: 0 for name in kinds}
    floor_x: dict[str, list[np.ndarray]] = {name: [] for name in kinds}
    floor_y: dict[str, list[np.ndarray]] = {name: [] for name in kinds}
    for batch in _examples(loaded, TRAIN, FLOOR_EXAMPLES):
        features = _floor_features(batch)
        for name, pred in model.predict(batch).items():
            seen = pred.observed.bool()
            train_sum[name] += float(pred.target[seen].double().sum())
            train_n[name] += int(seen.sum())
            if features is not None:
                floor_x[name].append(features[seen.cpu().numpy()])
                floor_y[name].append(pred.target[seen].double().cpu().numpy())
    glms = {name: _fit_glm_floor(kinds[name], np.concatenate(floor_x[name]), np.concatenate(floor_y[name]))
            for name in kinds if floor_x[name]}
    scores: dict[str, list[np.ndarray]] = {name: [] for name in kinds}
    glm_scores: dict[str, list[np.ndarray]] = {name: [] for name in kinds}
    targets: dict[str, list[np.ndarray]] = {name: [] for name in kinds}
    for batch in _examples(loaded, HELD_OUT, loaded.spec.train.eval_patients):
        features = _floor_features(batch)
        for name, pred in model.predict(batch).items():
            seen = pred.observed.bool()
            scores[name].append(pred.score[seen].double().cpu().numpy())
            targets[name].append(pred.target[seen].double().cpu().numpy())
            if glms.get(name) is not None and features is not None:
                glm_scores[name].append(_glm_scores(glms[name], kinds[name], features[seen.cpu().numpy()]))
    out: dict[str, float] = {}
    for name, kind in kinds.items():
        score = np.concatenate(scores[name]) if scores[name] else np.zeros(0)
        target = np.concatenate(targets[name]) if targets[name] else np.zeros(0)
        out[f"eval/{name}/examples"] = float(len(target))
        if kind == "risk":
            for metric, value in binary_metrics(score, target).items():
                out[f"eval/{name}/{metric}"] = value
            out[f"baseline/{name}/auroc"] = 0.5
            out[f"baseline/{name}/auprc"] = float(target.mean()) if len(target) else float("nan")
        else:
            train_mean = train_sum[name] / max(1, train_n[name])
            out[f"eval/{name}/mse"] = _mse(score, target)
            out[f"baseline/{name}/mse"] = _mse(np.full(len(target), train_mean), target)
        if glm_scores[name]:
            glm_score = np.concatenate(glm_scores[name])
            glm_metrics = binary_metrics(glm_score, target) if kind == "risk" else {"mse": _mse(glm_score, target)}
            out |= {f"baseline/glm/{name}/{metric}": value for metric, value in glm_metrics.items()}
    return out


def _floor_features(batch) -> np.ndarray | None:
    """The batch's plain features for the GLM floor, if its view offers them."""
    make = getattr(batch, "floor_features", None)
    return make().double().cpu().numpy() if make is not None else None


def _mse(score: np.ndarray, target: np.ndarray) -> float:
    return float(np.mean((score - target) ** 2)) if len(target) else float("nan")

