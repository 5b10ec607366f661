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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from mirror import tracking
from mirror.cluster import ensure_ray
from mirror.data.schema import TRAIN, TUNING, DatasetMetadata, split_files
from mirror.data.stream import FilterReport, read_split
from mirror.guards import check_run_name
from mirror.models.base import DataInfo
from mirror.train.loop import train_fn_per_worker
from mirror.train.spec import RunSpec

CHECKPOINT_TAG = "mirror.checkpoint"


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


def filter_metrics(report: FilterReport) -> dict[str, float]:
    """The length filter's exact counts, logged so nothing is dropped silently."""
    prefix = f"data/{report.split}"
    return {
        f"{prefix}/patients": report.patients,
        f"{prefix}/kept": report.kept,
        f"{prefix}/dropped_too_short": report.dropped_too_short,
        f"{prefix}/dropped_too_long": report.dropped_too_long,
    }


def storage_path(spec: RunSpec) -> str:
    path = spec.train.storage_path
    return path if "://" in path else str(Path(path).expanduser().resolve())


def run_training(
    spec: RunSpec,
    *,
    callbacks: list[Any] | None = None,
    parent_run_id: str | None = None,
    resume_from: Checkpoint | None = None,
    until_epoch: int | None = None,
    train_run_name: str | None = None,
) -> TrainingOutcome:
    """Train ``spec`` to ``train.epochs`` (or to ``until_epoch``, exclusive) and return the last
    checkpoint. ``resume_from`` seeds a run that has no checkpoint of its own yet; the model's
    weights, optimizer moments and schedule position come from it, the hyperparameters from
    ``spec``."""
    train = spec.train
    check_run_name(spec.run_name, "run name")  # it becomes a directory: never outside storage
    ensure_ray(min_logical_cpus=train.workers * train.cpus_per_worker + 2)
    meta = DatasetMetadata.read(spec.data)
    data_info = DataInfo(week_vocab_size=meta.vocab["week"], max_words=train.max_words)
    train_ds, train_filter = read_split(spec.data, TRAIN, min_words=train.min_words, max_words=train.max_words)
    tuning_ds, tuning_filter = read_split(spec.data, TUNING, min_words=train.min_words, max_words=train.max_words)

    steps_per_epoch = max(1, train_filter.steps_per_epoch(train.workers, train.batch_size))
    if train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, train.max_steps_per_epoch)

    uri = tracking.tracking_uri()
    run_id = tracking.start_run(
        spec.run_name,
        params=spec.to_dict(),
        tags={
            "model": spec.model,
            "dataset.name": meta.name,
            "dataset.fingerprint": dataset_fingerprint(spec.data),
            "dataset.path": spec.data,
        },
        experiment=train.experiment,
        parent_run_id=parent_run_id,
        uri=uri,
    )
    tracking.log_metrics(
        run_id,
        {**filter_metrics(train_filter), **filter_metrics(tuning_filter), "train/steps_per_epoch": steps_per_epoch},
        uri=uri,
    )
    storage = storage_path(spec)
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={
            "spec": spec.to_dict(),
            "data_info": data_info.__dict__,
            "steps_per_epoch": steps_per_epoch,
            "run_id": run_id,
            "tracking_uri": uri,
            "crash_marker": str(Path(storage) / f"{spec.run_name}.crashed") if "://" not in storage else None,
            "until_epoch": until_epoch,
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
            storage_path=storage,
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
