"""End-of-run evaluation by capability (``jobs/evaluate.py``, the end of ``jobs/train.py`` and
of sweeps).

A model is evaluated by the suites of the capabilities it declares, never by its name:

* ``sequence_decoder``: the four tasks of seed 000, latent probes, white-box membership;
* ``predictor``: AUROC/AUPRC per risk target, MSE per value target;
* ``recommender``: ROC-AUC, PR-AUC, Jaccard, precision, recall, F1, DDI rate, the model's own
  outcomes (ELOS) and, on simulated data, the true expected length of stay;
* ``generator``: the synthetic-data scorecard behind the privacy gate (on request, since it
  samples and scores thousands of patients).

Every number is logged beside its floor (``baseline/...``) into the run's MLflow run, with the
resolved config, the training curve and each suite's artifacts; then the final model is logged
and the run is ended.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mirror import storage, tracking  # noqa: E402
from mirror.checkpoint import LoadedRun, load_run  # noqa: E402
from mirror.cluster import ensure_ray  # noqa: E402
from mirror.evaluation.recommender import recommender_suite  # noqa: E402
from mirror.evaluation.scores import predictor_suite  # noqa: E402
from mirror.evaluation.sequence import sequence_suite  # noqa: E402
from mirror.models.base import ModelSpec  # noqa: E402

Suite = Callable[[LoadedRun, Path], dict[str, float]]


# Capability -> its suite, in the order they run. The generator's scorecard is separate: it
# writes and scores a synthetic dataset (mirror.synthesize.score_run).
SUITES: dict[str, Suite] = {
    "sequence_decoder": sequence_suite,
    "predictor": predictor_suite,
    "recommender": recommender_suite,
}


def suites_for(loaded: LoadedRun) -> list[str]:
    return [capability for capability in SUITES if loaded.model_spec.can(capability)]


def training_curve(run_id: str, path: Path, uri: str | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("train/loss", "val/loss"):
        points = sorted(tracking.metric_history(run_id, key, uri=uri))
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title("training curve")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def evaluate_run(
    run_id: str, uri: str | None = None, log_model: bool = True, *, synthetic: bool = False,
    model_spec: ModelSpec | None = None,
) -> dict[str, float]:
    """Run every suite the model's capabilities call for and log it all to ``run_id``;
    ``synthetic`` adds the generator's scorecard (for models that are generators).
    ``model_spec`` defaults to the registry's entry for the run's model."""
    ensure_ray()
    uri = uri or tracking.tracking_uri()
    loaded = load_run(run_id, uri=uri, model_spec=model_spec)
    metrics: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for capability in suites_for(loaded):
            metrics.update(SUITES[capability](loaded, out))
        tracking.log_metrics(run_id, metrics, step=loaded.epoch, uri=uri)
        (out / "config.json").write_text(json.dumps(loaded.spec.to_dict(), indent=2, sort_keys=True) + "\n")
        training_curve(run_id, out / "training_curve.png", uri=uri)
        tracking.log_artifacts(run_id, out, "evaluation", uri=uri)
    if synthetic and loaded.model_spec.can("generator"):
        from mirror.synthesize import score_run

        work_dir = storage.absolute(loaded.spec.train.storage_path)
        scorecard = score_run(run_id, loaded.spec.train.n_generate, work_dir, seed=loaded.spec.train.seed, uri=uri)
        metrics.update(scorecard)
    if log_model:
        tracking.log_torch_model(run_id, loaded.model, uri=uri)
    tracking.end_run(run_id, uri=uri)
    return metrics
