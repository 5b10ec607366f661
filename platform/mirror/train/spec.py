"""A training run's full, validated configuration (the "run spec").

A run spec has four parts, each validated at load with errors that name the key:

* ``model``: registry name (``ae``, ``wae``, ...);
* ``model_config``: that model's frozen config dataclass (``model.*`` keys);
* ``view_config``: the config of the data view the model reads (``view.*`` keys: for the
  sequence view the mask and the length filter);
* ``train``: :class:`TrainConfig`, the loop's settings, shared by every model and view.

``upstream_run`` names the MLflow run whose frozen model a second-stage model builds on.
A spec is built from defaults, then an optional YAML/JSON file, then ``--set key=value`` pairs
(``model.latent_dim=64``, ``view.max_words=50``, ``train.epochs=3``), in that order, and logged
whole to MLflow with dotted keys and into every checkpoint.
"""

from __future__ import annotations

import ast
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from mirror import storage
from mirror.config import build_config
from mirror.models import get_model_spec
from mirror.models.base import ModelSpec

SECTIONS = ("model", "view", "train")
# Keys that moved from the loop's config to the sequence view's (issue 9): old checkpoints are
# read with them moved; new overrides that still use them are refused with the new name.
MOVED_TO_VIEW = ("mask_rate", "mask_min_words", "min_words", "max_words")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of the generic loop. Sizes are per worker unless stated."""

    epochs: int = 2
    batch_size: int = 256  # patients per worker per step
    warmup_fraction: float = 0.05  # of all steps, linear warmup from 0
    min_lr_ratio: float = 0.1  # cosine decay floor, as a fraction of each optimizer's lr
    grad_clip: float = 1.0  # max global grad norm per optimizer step; 0 disables
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
    log_every_steps: int = 50  # training metrics to MLflow every this many steps (0: per epoch only)


# TrainConfig field -> (lowest allowed value, whether the bound is exclusive). Fields missing
# from the config are skipped, so the table outlives fields that move elsewhere.
TRAIN_MINIMUMS: dict[str, tuple[float, bool]] = {
    "epochs": (1, False),
    "batch_size": (1, False),
    "eval_batch_size": (1, False),
    "workers": (1, False),
    "cpus_per_worker": (0, True),
    "max_failures": (0, False),
    "checkpoints_to_keep": (1, False),
    "max_steps_per_epoch": (0, False),
    "val_max_batches": (0, False),
    "eval_patients": (0, False),
    "n_generate": (0, False),
    "grad_clip": (0, False),
}
TRAIN_FRACTIONS = ("warmup_fraction", "min_lr_ratio")  # each in [0, 1]


def check_train_numbers(train: Any) -> None:
    """Counts and sizes of the loop's config, checked before anything starts."""
    for name, (low, exclusive) in TRAIN_MINIMUMS.items():
        value = getattr(train, name, None)
        if value is None:
            continue
        if value < low or (exclusive and value == low):
            rule = f"> {low}" if exclusive else f">= {low}"
            raise ValueError(f"train.{name}: expected {rule}, received {value!r}")
    for name in TRAIN_FRACTIONS:
        value = getattr(train, name, None)
        if value is not None and not 0 <= value <= 1:
            raise ValueError(f"train.{name}: expected a fraction in [0, 1], received {value!r}")


@dataclass(frozen=True)
class RunSpec:
    model: str
    data: str
    run_name: str
    model_config: dict[str, Any] = field(default_factory=dict)  # resolved, all fields
    view_config: dict[str, Any] = field(default_factory=dict)  # resolved, all fields
    train: TrainConfig = field(default_factory=TrainConfig)
    upstream_run: str | None = None  # MLflow run id of the frozen first stage, if any

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "data": self.data,
            "run_name": self.run_name,
            "model_config": dict(self.model_config),
            "view_config": dict(self.view_config),
            "train": asdict(self.train),
            "upstream_run": self.upstream_run,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any], model_spec: ModelSpec | None = None) -> RunSpec:
        """A saved spec (checkpoint, MLflow); specs written before views existed carry the
        sequence view's keys under ``train`` and are read with them moved."""
        train = dict(raw.get("train", {}))
        view = dict(raw.get("view_config", {}))
        if "view_config" not in raw:
            view.update({k: train.pop(k) for k in MOVED_TO_VIEW if k in train})
        train.pop("crash_once_at_step", None)  # fault injection moved out of the loop
        model_spec = model_spec or get_model_spec(raw["model"])
        # A saved config holds every field of its day; a field added since gets the value that
        # reproduces the old behaviour (the config class's ``SAVED_BEFORE``), not today's default.
        model = getattr(model_spec.config_cls, "SAVED_BEFORE", {}) | raw.get("model_config", {})
        return build_run_spec(
            model_spec,
            raw["data"],
            raw["run_name"],
            {**_prefixed("model", model), **_prefixed("view", view), **_prefixed("train", train)},
            upstream_run=raw.get("upstream_run"),
        )

    def view_config_obj(self, model_spec: ModelSpec | None = None) -> Any:
        spec = model_spec or get_model_spec(self.model)
        return build_config(spec.view.config_cls, self.view_config)


def _prefixed(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}.{k}": v for k, v in values.items()}


def sample_time_overrides(model_spec: ModelSpec, overrides: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """A trained run's model config (``saved``) with ``model.*`` overrides for drawing from it
    (``jobs/sample.py --set``). Only the fields its config class lists in ``SAMPLE_TIME`` may
    change: how draws are made (sampler, steps, temperature), never what was learned. The
    result is validated like any config, so a bad value names its field."""
    allowed = getattr(model_spec.config_cls, "SAMPLE_TIME", ())
    changes = {}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section != "model" or name not in allowed:
            options = ", ".join(f"model.{k}" for k in allowed) or "none"
            raise ValueError(f"--set {key}: not a sampling option of {model_spec.name!r} (these are: {options})")
        changes[name] = value
    merged = getattr(model_spec.config_cls, "SAVED_BEFORE", {}) | saved | changes
    build_config(model_spec.config_cls, merged)  # raises naming the field
    return merged


def parse_set(pairs: list[str]) -> dict[str, Any]:
    """``["train.epochs=3", "model.lam=0.5"]`` -> dict; values parsed as Python literals when
    they are one (numbers, booleans), else kept as strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {pair!r}: expected key=value, e.g. train.epochs=3")
        try:
            value: Any = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = {"true": True, "false": False}.get(raw.lower(), raw)
        out[key.strip()] = value
    return out


def load_overrides(path: str | Path) -> dict[str, Any]:
    """A YAML/JSON file ``{model: {...}, view: {...}, train: {...}}`` as dotted overrides; every
    way the file can be wrong is one ``ValueError`` line naming it."""
    path = Path(path)
    kind = "YAML" if path.suffix in (".yaml", ".yml") else "JSON"
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file")
    try:
        text = path.read_text()
        raw = yaml.safe_load(text) if kind == "YAML" else json.loads(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, json.JSONDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"--config {path}: not valid {kind}: {first}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"--config {path}: expected a mapping with {_sections_list()} sections, received {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown sections {unknown}; valid sections are {list(SECTIONS)}")
    for section in SECTIONS:
        value = raw.get(section)
        if value is not None and not isinstance(value, dict):
            raise ValueError(
                f"--config {path}: section '{section}' must be a mapping of keys to values "
                f"(e.g. '{section}: {{...}}'), received {type(value).__name__}"
            )
    return {key: value for section in SECTIONS for key, value in _prefixed(section, raw.get(section) or {}).items()}


def _sections_list() -> str:
    return ", ".join(f"'{s}'" for s in SECTIONS)


def build_run_spec(
    model: str | ModelSpec,
    data: str,
    run_name: str,
    overrides: dict[str, Any],
    *,
    upstream_run: str | None = None,
) -> RunSpec:
    """Validate everything up front: an unknown key or a bad type fails before Ray starts.
    ``model`` is a registry name, or a spec (a model that is not registered, e.g. in a test)."""
    model_spec = model if isinstance(model, ModelSpec) else get_model_spec(model)
    by_section: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section not in by_section or not name:
            raise ValueError(
                f"override {key!r}: keys must start with 'model.', 'view.' or 'train.' "
                f"(e.g. model.latent_dim, view.max_words, train.epochs)"
            )
        if section == "train" and name in MOVED_TO_VIEW:
            raise ValueError(f"override {key!r}: this setting belongs to the data view now; use view.{name}")
        by_section[section][name] = value
    model_config = build_config(model_spec.config_cls, by_section["model"])
    view_config = build_config(model_spec.view.config_cls, by_section["view"])
    train = build_config(TrainConfig, by_section["train"])
    if train.workers < 1:
        raise ValueError(f"train.workers: expected >= 1, got {train.workers}")
    check_train_numbers(train)  # epochs, batch sizes, fractions: before any worker starts
    if upstream_run is not None and not model_spec.upstream:
        raise ValueError(f"--upstream-run: model {model_spec.name!r} does not build on another run's model")
    if upstream_run is None and model_spec.upstream:
        names = ", ".join(s.name for s in model_spec.upstream)
        raise ValueError(f"model {model_spec.name!r} is a second stage: pass --upstream-run RUN_ID of a {names} run")
    return RunSpec(
        model=model_spec.name,
        data=storage.absolute(data),
        run_name=run_name,
        model_config=asdict(model_config),
        view_config=asdict(view_config),
        train=train,
        upstream_run=upstream_run,
    )


def train_field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]
