"""The Ray Train driver (layer 2): datasets on the driver, one ``TorchTrainer`` fit.

The same function serves a single ``jobs/train.py`` run and every Tune trial (layer 3 passes
``callbacks=[TuneReportCallback()]``). Re-running with the same run name and storage path
resumes from the last checkpoint, in Ray Train and in MLflow alike.

Population-based training runs a trial as a chain of short fits (``mirror.tune.pbt``): each
starts from a given checkpoint (``resume_from``, possibly another trial's), stops after
``until_epoch`` and is stored under its own Ray Train name (``train_run_name``), while the
MLflow run stays the trial's one (``spec.run_name``).
"""

from __future__ import annotations

import hashlib
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from mirror import storage, tracking
from mirror.checkpoint import CHECKPOINT_TAG, upstream_checkpoint
from mirror.cluster import ensure_ray
from mirror.data.schema import TRAIN, TUNING, DatasetMetadata, split_files
from mirror.data.views.base import SplitReport
from mirror.guards import check_run_name
from mirror.models import get_model_spec
from mirror.models.base import ModelSpec
from mirror.train.loop import train_fn_per_worker
from mirror.train.spec import RunSpec

UPSTREAM_TAG = "mirror.upstream_run"  # lineage of a second-stage run


@dataclass(frozen=True)
class TrainingOutcome:
    run_id: str
    checkpoint_path: str
    metrics: dict[str, float]  # the last epoch's
    checkpoint: Checkpoint  # the last one, on the run's storage (local or remote)
    train_path: str  # the Ray Train run directory


def dataset_fingerprint(root: str | Path) -> str:
    """Short hash of dataset.json plus every shard's name and size: changes when data does."""
    root = Path(root)
    digest = hashlib.sha256((root / "metadata" / "dataset.json").read_bytes())
    for split in (TRAIN, TUNING, "held_out"):
        for path in split_files(root, split):
            digest.update(f"{split}/{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def filter_metrics(report: SplitReport) -> dict[str, float]:
    """The view filter's exact counts, logged so nothing is dropped silently."""
    prefix = f"data/{report.split}"
    dropped = {f"{prefix}/dropped_{reason}": n for reason, n in report.dropped_by_reason().items()}
    return {f"{prefix}/patients": report.patients, f"{prefix}/kept": report.kept, **dropped}


def storage_path(spec: RunSpec) -> str:
    return storage.absolute(spec.train.storage_path)


@contextmanager
def epoch_lines_printed():
    """A queue the rank-0 worker puts one summary line per epoch into, printed here by a
    thread. Ray's own worker logs stay in Ray's log files (``log_to_driver=False``)."""
    from ray.util.queue import Empty, Queue

    # No CPU for the queue's actor: inside a Tune trial it is placed in the trial's placement
    # group, whose driver bundle holds 0.05 CPU (a 1-CPU actor cannot be scheduled there).
    queue = Queue(actor_options={"num_cpus": 0})
    stop = threading.Event()

    def pump() -> None:
        while True:
            try:
                print(queue.get(timeout=0.5), flush=True)
            except Empty:
                if stop.is_set():
                    return
            except Exception:  # the queue actor is gone (Ray shut down): nothing more to print
                return

    thread = threading.Thread(target=pump, name="epoch-lines", daemon=True)
    thread.start()
    try:
        yield queue
    finally:
        stop.set()
        thread.join(timeout=5)
        queue.shutdown()


def run_training(
    spec: RunSpec,
    *,
    callbacks: list[Any] | None = None,
    parent_run_id: str | None = None,
    resume_from: Checkpoint | None = None,
    until_epoch: int | None = None,
    train_run_name: str | None = None,
    model_spec: ModelSpec | None = None,
) -> TrainingOutcome:
    """Train ``spec`` to ``train.epochs`` (or to ``until_epoch``, exclusive) and return the last
    checkpoint. ``resume_from`` seeds a run that has no checkpoint of its own yet; the model's
    weights, optimizer moments and schedule position come from it, the hyperparameters from
    ``spec``. ``model_spec`` defaults to the registry's entry for ``spec.model`` (tests pass
    models that are not registered)."""
    train = spec.train
    check_run_name(spec.run_name, "run name")  # it becomes a directory: never outside storage
    model_spec = model_spec or get_model_spec(spec.model)
    uri = tracking.tracking_uri()
    upstream = None
    if spec.upstream_run:  # checked before Ray starts: a wrong run id fails in one line
        upstream = upstream_checkpoint(spec.upstream_run, model_spec, uri)
    ensure_ray(min_logical_cpus=train.workers * train.cpus_per_worker + 2)
    meta = DatasetMetadata.read(spec.data)
    view = model_spec.view(spec.view_config_obj(model_spec), spec.data)
    train_ds, train_filter = view.read(TRAIN)
    tuning_ds, tuning_filter = view.read(TUNING)

    steps_per_epoch = max(1, view.steps_per_epoch(train_filter, train.workers, train.batch_size))
    if train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, train.max_steps_per_epoch)

    tags = {
        "model": spec.model,
        "view": view.name,
        "dataset.name": meta.name,
        "dataset.fingerprint": dataset_fingerprint(spec.data),
        "dataset.path": spec.data,
    }
    if spec.upstream_run:
        tags[UPSTREAM_TAG] = spec.upstream_run
    run_id = tracking.start_run(
        spec.run_name,
        params=spec.to_dict(),
        tags=tags,
        experiment=train.experiment,
        parent_run_id=parent_run_id,
        uri=uri,
    )
    tracking.log_metrics(
        run_id,
        {**filter_metrics(train_filter), **filter_metrics(tuning_filter), "train/steps_per_epoch": steps_per_epoch},
        uri=uri,
    )
    with epoch_lines_printed() as progress:
        trainer = TorchTrainer(
            train_fn_per_worker,
            train_loop_config={
                "spec": spec.to_dict(),
                "model_spec": model_spec,
                "view": view,
                "data_info": view.info(),
                "upstream": upstream,
                "steps_per_epoch": steps_per_epoch,
                "run_id": run_id,
                "tracking_uri": uri,
                "until_epoch": until_epoch,
                "progress": progress,
                # Train V2 dropped TorchTrainer(resume_from_checkpoint=...): the loop loads this
                # one itself while the run has no checkpoint of its own (ray-project/ray#49454).
                "initial_checkpoint": resume_from,
            },
            scaling_config=ScalingConfig(
                num_workers=train.workers,
                use_gpu=train.use_gpu,
                resources_per_worker={"CPU": train.cpus_per_worker, **({"GPU": 1} if train.use_gpu else {})},
            ),
            run_config=RunConfig(
                name=train_run_name or spec.run_name,
                storage_path=storage_path(spec),
                failure_config=FailureConfig(max_failures=train.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=train.checkpoints_to_keep),
                callbacks=callbacks,
            ),
            datasets={"train": train_ds, "tuning": tuning_ds},
            torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        )
        try:
            result = trainer.fit()
        except Exception:
            tracking.end_run(run_id, status="FAILED", uri=uri)
            raise
    if result.checkpoint is None:
        raise RuntimeError(f"run {spec.run_name}: training finished without a checkpoint")
    tracking.set_tags(run_id, {CHECKPOINT_TAG: result.checkpoint.path}, uri=uri)
    return TrainingOutcome(
        run_id, result.checkpoint.path, dict(result.metrics or {}), result.checkpoint, result.path
    )
