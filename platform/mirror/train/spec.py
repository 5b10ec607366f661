"""A training run's full, validated configuration (the "run spec").

A run spec has three parts, each validated at load with errors that name the key:

* ``model``: registry name (``ae``, ``wae``, ...);
* ``model_config``: overrides of that model's frozen config dataclass;
* ``train``: :class:`TrainConfig`, the loop's settings, shared by every model.

It is built from defaults, then an optional YAML/JSON file, then ``--set key=value`` pairs
(``model.latent_dim=64``, ``train.epochs=3``), in that order, and logged whole to MLflow with
dotted keys and into every checkpoint.
"""

from __future__ import annotations

import ast
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from mirror.guards import check_train_numbers
from mirror.models import get_model_spec
from mirror.models.config import build_config


@dataclass(frozen=True)
class TrainConfig:
    """Settings of the generic loop. Sizes are per worker unless stated."""

    epochs: int = 2
    batch_size: int = 256  # patients per worker per step
    warmup_fraction: float = 0.05  # of all steps, linear warmup from 0
    min_lr_ratio: float = 0.1  # cosine decay floor, as a fraction of each optimizer's lr
    grad_clip: float = 1.0  # max global grad norm per optimizer step; 0 disables
    mask_rate: float = 0.1  # seed 000: 10% of diagnosis-age words masked in training input
    mask_min_words: int = 10  # ... in sentences longer than this
    min_words: int = 1  # training filter (seed 000: 1-100 words); dropped counts are logged
    max_words: int = 100
    max_steps_per_epoch: int = 0  # 0 = a full pass; >0 caps steps (smoke runs, demo)
    val_max_batches: int = 0  # 0 = the whole tuning split
    seed: int = 0
    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0  # logical CPUs reserved per train worker
    storage_path: str = "ray_results"  # local dir or s3://...; checkpoints live here
    max_failures: int = 2  # worker-failure retries, each resuming from the last checkpoint
    checkpoints_to_keep: int = 2
    eval_patients: int = 5_000  # held_out patients scored at the end (0 = all)
    eval_batch_size: int = 512
    n_generate: int = 2_000  # sentences decoded from z ~ N(0, I) for generation metrics
    score_synthetic: bool = True  # run the synthetic-data scorecard at the end of the run
    experiment: str = "mirror"
    # Fault injection for the resilience tests: rank ``workers - 1`` calls os._exit(1) once,
    # at this global step, the first time the run reaches it (-1 = never).
    crash_once_at_step: int = -1


@dataclass(frozen=True)
class RunSpec:
    model: str
    data: str
    run_name: str
    model_config: dict[str, Any] = field(default_factory=dict)  # resolved, all fields
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "data": self.data,
            "run_name": self.run_name,
            "model_config": dict(self.model_config),
            "train": asdict(self.train),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunSpec:
        return build_run_spec(
            raw["model"],
            raw["data"],
            raw["run_name"],
            {**_prefixed("model", raw.get("model_config", {})), **_prefixed("train", raw.get("train", {}))},
        )


def _prefixed(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}.{k}": v for k, v in values.items()}


def parse_set(pairs: list[str]) -> dict[str, Any]:
    """``["train.epochs=3", "model.lam=0.5"]`` -> dict; values parsed as Python literals when
    they are one (numbers, booleans), else kept as strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {pair!r}: expected key=value, e.g. train.epochs=3")
        try:
            value: Any = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = {"true": True, "false": False}.get(raw.lower(), raw)
        out[key.strip()] = value
    return out


def load_overrides(path: str | Path) -> dict[str, Any]:
    """A YAML/JSON file ``{model: {...}, train: {...}}`` as dotted overrides."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping with 'model' and/or 'train' sections")
    unknown = sorted(set(raw) - {"model", "train"})
    if unknown:
        raise ValueError(f"{path}: unknown sections {unknown}; valid sections are ['model', 'train']")
    return {**_prefixed("model", raw.get("model") or {}), **_prefixed("train", raw.get("train") or {})}


def build_run_spec(model: str, data: str, run_name: str, overrides: dict[str, Any]) -> RunSpec:
    """Validate everything up front: an unknown key or a bad type fails before Ray starts."""
    model_spec = get_model_spec(model)
    model_overrides: dict[str, Any] = {}
    train_overrides: dict[str, Any] = {}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section == "model" and name:
            model_overrides[name] = value
        elif section == "train" and name:
            train_overrides[name] = value
        else:
            raise ValueError(
                f"override {key!r}: keys must start with 'model.' or 'train.' "
                f"(e.g. model.latent_dim, train.epochs)"
            )
    model_config = build_config(model_spec.config_cls, model_overrides)
    train = build_config(TrainConfig, train_overrides)
    if train.min_words < 1 or train.max_words < train.min_words:
        raise ValueError(
            f"train.min_words/max_words: expected 1 <= min_words <= max_words, got "
            f"{train.min_words}/{train.max_words}"
        )
    if train.workers < 1:
        raise ValueError(f"train.workers: expected >= 1, got {train.workers}")
    check_train_numbers(train)  # epochs, batch sizes, fractions: before any worker starts
    return RunSpec(
        model=model,
        data=str(Path(data).resolve()) if "://" not in data else data,
        run_name=run_name,
        model_config=asdict(model_config),
        train=train,
    )


def train_field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]
