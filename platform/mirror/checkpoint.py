"""The checkpoint format, and loading a trained model back from its run.

A checkpoint is a directory holding ``checkpoint.pt`` (weights, optimizer and schedule state,
epoch, step, the run spec and the view's dataset facts) and ``origin.json`` (which run wrote it
at which epoch, readable without torch). The training loop writes it; evaluation, embedding,
sampling and second-stage models read it through this module, never through the loop.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mirror import storage, tracking
from mirror.models import build_model, get_model_spec
from mirror.models.base import ModelSpec, TrainableModel
from mirror.train.spec import RunSpec, sample_time_overrides

CHECKPOINT_FILE = "checkpoint.pt"
ORIGIN_FILE = "origin.json"
CHECKPOINT_TAG = "mirror.checkpoint"  # MLflow tag: the run's last checkpoint directory


class UpstreamRunError(ValueError):
    """An ``--upstream-run`` that cannot serve as this model's first stage."""


def write_checkpoint(
    directory: Path,
    *,
    model: torch.nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, Any],
    epoch: int,
    global_step: int,
    spec: RunSpec,
    info: Any,
) -> None:
    origin = {"run_name": spec.run_name, "epoch": epoch, "global_step": global_step}
    (directory / ORIGIN_FILE).write_text(json.dumps(origin))
    torch.save(
        {
            "model": model.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
            "epoch": epoch,
            "global_step": global_step,
            "spec": spec.to_dict(),
            "data_info": asdict(info),
        },
        directory / CHECKPOINT_FILE,
    )


def load_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint directory's saved state (model, optimizers, schedules, spec), on CPU."""
    file = Path(path) / CHECKPOINT_FILE
    if not file.exists():
        raise FileNotFoundError(f"{file}: checkpoint file missing")
    return torch.load(file, map_location="cpu", weights_only=False)


@dataclass
class LoadedRun:
    run_id: str
    spec: RunSpec
    model_spec: ModelSpec
    data_info: Any  # the view's dataset facts the model was built with
    model: TrainableModel
    epoch: int

    def view(self, root: str | None = None) -> Any:
        """The run's data view over ``root`` (default: the data it trained on)."""
        return self.model_spec.view(self.spec.view_config_obj(self.model_spec), root or self.spec.data)


def checkpoint_dir(run_id: str, uri: str | None = None) -> Path:
    run = tracking.get_run(run_id, uri=uri)
    path = run.data.tags.get(CHECKPOINT_TAG)
    if not path:
        raise ValueError(f"run {run_id} has no '{CHECKPOINT_TAG}' tag: did its training finish?")
    if storage.is_remote(path):
        raise ValueError(f"run {run_id}: checkpoint {path} is on remote storage; download it first")
    return Path(path)


def model_from_state(
    state: dict[str, Any], model_spec: ModelSpec | None = None, upstream: Any = None,
    sample_overrides: dict[str, Any] | None = None,
) -> tuple[TrainableModel, RunSpec, Any]:
    """The model a checkpoint holds, in eval mode, with its spec and dataset facts.
    ``model_spec`` defaults to the registry's entry for the saved model name;
    ``sample_overrides`` (``model.*`` keys) change how it draws (``sample_time_overrides``)."""
    model_spec = model_spec or get_model_spec(state["spec"]["model"])
    raw = state["spec"]
    if sample_overrides:
        model_config = sample_time_overrides(model_spec, sample_overrides, raw.get("model_config", {}))
        raw = {**raw, "model_config": model_config}
    spec = RunSpec.from_dict(raw, model_spec)
    info = model_spec.view.info_cls(**state["data_info"])
    model = build_model(model_spec, spec.model_config, info, upstream=upstream)
    model.load_state_dict(state["model"])
    model.eval()
    return model, spec, info


def load_run(
    run_id: str, uri: str | None = None, model_spec: ModelSpec | None = None,
    sample_overrides: dict[str, Any] | None = None,
) -> LoadedRun:
    state = load_state(checkpoint_dir(run_id, uri))
    model_spec = model_spec or get_model_spec(state["spec"]["model"])
    upstream = None
    if model_spec.upstream:
        first_stage, path = upstream_checkpoint(state["spec"]["upstream_run"], model_spec, uri)
        upstream = load_frozen(path, first_stage)
    model, spec, info = model_from_state(state, model_spec, upstream, sample_overrides)
    return LoadedRun(run_id, spec, model_spec, info, model, int(state["epoch"]))


def upstream_checkpoint(upstream_run: str, model_spec: ModelSpec, uri: str | None = None) -> tuple[ModelSpec, Path]:
    """Which of ``model_spec.upstream`` the run ``upstream_run`` trained, and its checkpoint
    directory; refuses, naming both, a run whose model or data view does not fit."""
    try:
        path = checkpoint_dir(upstream_run, uri)
        saved = load_state(path)["spec"]
    except Exception as err:  # MLflow's own error for an unknown id, a missing file
        raise UpstreamRunError(f"--upstream-run {upstream_run}: cannot load its checkpoint ({err})") from None
    name = saved["model"]
    fits = {spec.name: spec for spec in model_spec.upstream}
    if name not in fits:
        raise UpstreamRunError(
            f"--upstream-run {upstream_run}: it trained model {name!r}, but {model_spec.name!r} "
            f"builds on {', '.join(fits) or 'no model'}"
        )
    if fits[name].view is not model_spec.view:
        raise UpstreamRunError(
            f"--upstream-run {upstream_run}: its model reads the {fits[name].view.name!r} view, "
            f"{model_spec.name!r} reads {model_spec.view.name!r}"
        )
    return fits[name], path


def load_frozen(path: str | Path, model_spec: ModelSpec) -> torch.nn.Module:
    """A first stage's model, frozen: eval mode and no gradients, so a second stage can neither
    train it nor change its batch statistics."""
    model, _, _ = model_from_state(load_state(path), model_spec)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()
