"""Model registry: one line per model, from explicit imports (no discovery, no mutation).

Each model file declares its own :class:`~mirror.models.base.ModelSpec` (config, data view,
capabilities, default sweep) as ``MODEL``; adding a model is that file plus one entry here.
Import errors propagate: a broken model file fails loudly instead of disappearing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mirror.config import ConfigError, build_config
from mirror.models import ae, causal_rnn, miranda, scoehr, twin, wae
from mirror.models.base import CAPABILITIES, ModelSpec, TrainableModel

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (ae.MODEL, wae.MODEL, scoehr.AE_MODEL, scoehr.MODEL, causal_rnn.PRETRAIN, causal_rnn.MODEL,
                 twin.MODEL, miranda.MODEL)
}

# What each job needs, for refusals that say which models can do it instead.
JOB_CAPABILITY = {"embed": "encoder", "sample": "generator"}


class MissingCapability(ValueError):
    """A job asked a model for something it does not declare (e.g. ``embed`` on a predictor)."""


def get_model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def models_that_can(capability: str) -> list[str]:
    return sorted(name for name, spec in MODELS.items() if spec.can(capability))


def require_capability(spec: ModelSpec, capability: str, job: str) -> None:
    """Refuse, in one line, a job the model cannot do, naming the models that can."""
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}; valid: {sorted(CAPABILITIES)}")
    if not spec.can(capability):
        able = ", ".join(models_that_can(capability)) or "none yet"
        raise MissingCapability(
            f"{job}: model {spec.name!r} is not a {capability.replace('_', ' ')} "
            f"(it can: {', '.join(spec.capabilities) or 'train only'}); models that can: {able}"
        )


def make_config(name: str, config_overrides: Mapping[str, Any] | None = None) -> Any:
    """The model's resolved, validated config (fails before any data is read or trial starts)."""
    return build_config(get_model_spec(name).config_cls, config_overrides)


def build_model(
    name: str | ModelSpec, config_overrides: Mapping[str, Any] | None, info: Any, upstream: Any = None
) -> TrainableModel:
    """A fresh model from its registry name (or its spec), config overrides and the view's
    dataset facts; ``upstream`` is the frozen model of a first stage, for models that take one."""
    spec = name if isinstance(name, ModelSpec) else get_model_spec(name)
    config = build_config(spec.config_cls, config_overrides)
    if upstream is not None:
        return spec.build(config, info, upstream=upstream)
    return spec.build(config, info)


__all__ = [
    "JOB_CAPABILITY",
    "MODELS",
    "ConfigError",
    "MissingCapability",
    "ModelSpec",
    "TrainableModel",
    "build_model",
    "get_model_spec",
    "make_config",
    "models_that_can",
    "require_capability",
]
