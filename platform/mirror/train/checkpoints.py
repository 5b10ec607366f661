"""Load a trained model back from its run: MLflow run id -> checkpoint -> model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirror import tracking
from mirror.models import build_model
from mirror.models.base import DataInfo, MirrorModel
from mirror.train.driver import CHECKPOINT_TAG
from mirror.train.loop import load_state
from mirror.train.spec import RunSpec


@dataclass
class LoadedRun:
    run_id: str
    spec: RunSpec
    data_info: DataInfo
    model: MirrorModel
    epoch: int


def checkpoint_dir(run_id: str, uri: str | None = None) -> Path:
    run = tracking.get_run(run_id, uri=uri)
    path = run.data.tags.get(CHECKPOINT_TAG)
    if not path:
        raise ValueError(f"run {run_id} has no '{CHECKPOINT_TAG}' tag: did its training finish?")
    if "://" in path:
        raise ValueError(f"run {run_id}: checkpoint {path} is on remote storage; download it first")
    return Path(path)


def model_from_state(state: dict[str, Any]) -> tuple[MirrorModel, RunSpec, DataInfo]:
    spec = RunSpec.from_dict(state["spec"])
    data_info = DataInfo(**state["data_info"])
    model = build_model(spec.model, spec.model_config, data_info)
    model.load_state_dict(state["model"])
    model.eval()
    return model, spec, data_info


def load_run(run_id: str, uri: str | None = None) -> LoadedRun:
    state = load_state(checkpoint_dir(run_id, uri))
    model, spec, data_info = model_from_state(state)
    return LoadedRun(run_id, spec, data_info, model, int(state["epoch"]))
