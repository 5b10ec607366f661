"""MLflow tracking: the only module that imports ``mlflow``.

* The tracking URI defaults to ``sqlite:///<cwd>/mlflow.db`` (MLflow 3 refuses the plain file
  store); ``MLFLOW_TRACKING_URI`` overrides it, e.g. ``http://127.0.0.1:5000``. The URI is
  resolved once on the driver and passed to workers, so a relative path never depends on a
  worker's working directory.
* Every call takes an explicit ``run_id``: the driver creates the run, rank 0 of the training
  workers logs into it, evaluation and scoring add to it later. No active-run global state.
* Metric and param names are the platform's shared names (``train/loss``, ``val/loss``,
  ``eval/...``, ``fidelity/...``), so runs of different models line up in the compare view.
"""

from __future__ import annotations

import math
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

DEFAULT_EXPERIMENT = "mirror"
RUN_NAME_TAG = "mirror.run_name"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an absolute sqlite file in the working directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def _artifact_location(uri: str) -> str | None:
    """Artifacts beside a sqlite store (``<db dir>/mlartifacts``), not in the cwd of whichever
    process happened to create the experiment; a server chooses its own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


def client(uri: str | None = None) -> MlflowClient:
    """mlflow is imported here, on first use, not with this module: most processes that import
    the training loop (the rank > 0 workers, Ray Train's controller) never log, and the import
    costs them 1-2 CPU-seconds each per fit."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = uri or tracking_uri()
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys: ``{"model": {"lam": 1}}`` -> ``{"model.lam": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def find_run(run_name: str, experiment: str = DEFAULT_EXPERIMENT, uri: str | None = None) -> str | None:
    """Id of the newest run tagged with ``run_name``, so a resumed training logs into it."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = c.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def start_run(
    run_name: str,
    *,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    experiment: str = DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
    uri: str | None = None,
) -> str:
    """Create a run, or reopen the one with the same ``run_name`` (resume). Returns its id.

    A reopened run gets whichever params it lacks: a job stopped between creating a run and
    logging its params (a sweep stopped mid-trial) would otherwise leave that run without them
    for good."""
    c = client(uri)
    existing = find_run(run_name, experiment, uri)
    if existing is not None:
        logged = c.get_run(existing).data.params
        log_params(existing, {k: v for k, v in flatten(params).items() if k not in logged}, uri=uri)
        c.update_run(existing, status="RUNNING")
        return existing
    exp = c.get_experiment_by_name(experiment)
    experiment_id = exp.experiment_id if exp else c.create_experiment(
        experiment, artifact_location=_artifact_location(uri or tracking_uri())
    )
    all_tags = {RUN_NAME_TAG: run_name, "mlflow.runName": run_name, "git_commit": git_commit()}
    all_tags.update(tags)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(experiment_id, run_name=run_name, tags=all_tags)
    log_params(run.info.run_id, params, uri=uri)
    return run.info.run_id


def log_params(run_id: str, params: Mapping[str, Any], uri: str | None = None) -> None:
    """All params in one batch call (one transaction on a database store), not one per key."""
    from mlflow.entities import Param

    c = client(uri)
    batch = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in flatten(params).items()]
    for start in range(0, len(batch), 100):  # MLflow's batch limit is 100 params
        c.log_batch(run_id, params=batch[start : start + 100])


def set_tags(run_id: str, tags: Mapping[str, str], uri: str | None = None) -> None:
    c = client(uri)
    for key, value in tags.items():
        c.set_tag(run_id, key, str(value))


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int | None = None, uri: str | None = None) -> None:
    """Log finite numeric metrics in one batch call; non-finite values are logged as NaN by
    MLflow's rules, so they stay visible instead of being dropped."""
    from mlflow.entities import Metric

    c = client(uri)
    import time

    now = int(time.time() * 1000)
    batch = [
        Metric(key=k, value=float(v) if not math.isinf(float(v)) else float("nan"), timestamp=now, step=step or 0)
        for k, v in metrics.items()
    ]
    for start in range(0, len(batch), 900):  # MLflow's batch limit is 1000 metrics
        c.log_batch(run_id, metrics=batch[start : start + 900])


def log_artifact(run_id: str, path: str | Path, artifact_path: str | None = None, uri: str | None = None) -> None:
    client(uri).log_artifact(run_id, str(path), artifact_path)


def log_artifacts(run_id: str, directory: str | Path, artifact_path: str | None = None, uri: str | None = None) -> None:
    client(uri).log_artifacts(run_id, str(directory), artifact_path)


def log_scorecard(run_id: str, metrics: Mapping[str, float], artifacts_dir: str | Path | None = None, uri: str | None = None) -> None:
    """Synthetic-data scorecard metrics (``fidelity/…``, ``utility/…``, ``privacy/…``) and plots."""
    log_metrics(run_id, metrics, uri=uri)
    if artifacts_dir is not None and Path(artifacts_dir).exists():
        log_artifacts(run_id, artifacts_dir, "scorecard", uri=uri)


def log_torch_model(run_id: str, model: Any, name: str = "model", uri: str | None = None) -> None:
    """The final model as an MLflow PyTorch model (loadable with ``mlflow.pytorch.load_model``)."""
    import mlflow.pytorch

    client(uri)
    with mlflow.start_run(run_id=run_id, nested=False):
        mlflow.pytorch.log_model(
            model, name=name, serialization_format="pickle", pip_requirements=["torch", "mirror"]
        )


def end_run(run_id: str, status: str = "FINISHED", uri: str | None = None) -> None:
    client(uri).set_terminated(run_id, status=status)


def get_run(run_id: str, uri: str | None = None) -> Any:
    return client(uri).get_run(run_id)


def download_artifacts(run_id: str, path: str, dst: str | Path, uri: str | None = None) -> Path:
    import mlflow.artifacts

    client(uri)
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst)))


def child_runs(parent_run_id: str, uri: str | None = None) -> list[Any]:
    """Runs nested under ``parent_run_id`` (a sweep's trials), oldest first."""
    c = client(uri)
    parent = c.get_run(parent_run_id)
    return c.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=10_000,
    )


def metric_history(run_id: str, key: str, uri: str | None = None) -> list[tuple[int, float]]:
    """Every logged ``(step, value)`` of one metric, in logging order."""
    return [(m.step, m.value) for m in client(uri).get_metric_history(run_id, key)]


def list_artifacts(run_id: str, path: str | None = None, uri: str | None = None) -> list[str]:
    """Artifact paths directly under ``path`` of a run."""
    return [a.path for a in client(uri).list_artifacts(run_id, path)]


def logged_model_names(run_id: str, uri: str | None = None) -> list[str]:
    """Names of the MLflow models logged from this run (MLflow 3 keeps them as LoggedModels,
    outside the run's artifact tree)."""
    c = client(uri)
    run = c.get_run(run_id)
    models = c.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    return [m.name for m in models]


def log_table(run_id: str, rows: list[dict[str, Any]], artifact_file: str, uri: str | None = None) -> None:
    """A table (list of same-keyed dicts) as an MLflow table artifact (``artifact_file``: .json)."""
    columns = {k: [r.get(k) for r in rows] for k in (rows[0] if rows else {})}
    client(uri).log_table(run_id, data=columns, artifact_file=artifact_file)
