"""Model registry: a literal dict built from explicit imports (no discovery, no mutation).

Adding a model is one file under ``models/`` plus one entry in ``MODELS``. Import errors
propagate: a broken model file fails loudly instead of disappearing from the list.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mirror.models.ae import AEConfig, ConditionalAutoencoder
from mirror.models.base import DataInfo, MirrorModel
from mirror.models.config import ConfigError, build_config
from mirror.models.wae import WAEConfig, WassersteinAutoencoder


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config_cls: type  # frozen config dataclass; overrides are checked against its fields
    build: Callable[[Any, DataInfo], MirrorModel]  # (config, data_info) -> model
    data_view: str = "sequence"  # which batch the model reads ("sequence": SequenceBatch)
    # Per-epoch metrics the model makes the loop report (``train/<train_step key>``,
    # ``train/grad_norm/<optimizer>``, ``val/<eval_sums key>``): a sweep's ``metric`` must be
    # one of these or of the loop's own (``mirror.guards.LOOP_METRICS``), checked at load.
    metric_names: tuple[str, ...] = ()


_RECONSTRUCTION = ("train/loss", "train/nll_dx", "train/nll_wk", "train/grad_norm/autoencoder",
                   "val/loss", "val/nll_dx", "val/nll_wk")  # fmt: skip
MODELS: dict[str, ModelSpec] = {
    "ae": ModelSpec("ae", AEConfig, ConditionalAutoencoder, metric_names=_RECONSTRUCTION),
    "wae": ModelSpec("wae", WAEConfig, WassersteinAutoencoder, metric_names=_RECONSTRUCTION + (
        "train/recon_loss", "train/gen_loss", "train/w1_estimate", "train/critic_steps",
        "train/grad_norm/critic",
    )),  # fmt: skip
}


def get_model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def make_config(name: str, config_overrides: Mapping[str, Any] | None = None) -> Any:
    """The model's resolved, validated config (fails before any data is read or trial starts)."""
    return build_config(get_model_spec(name).config_cls, config_overrides)


def build_model(
    name: str, config_overrides: Mapping[str, Any] | None, data_info: DataInfo
) -> MirrorModel:
    return get_model_spec(name).build(make_config(name, config_overrides), data_info)


__all__ = [
    "MODELS",
    "ConfigError",
    "DataInfo",
    "MirrorModel",
    "ModelSpec",
    "build_model",
    "get_model_spec",
    "make_config",
]
