"""The model plug-in surface: what the generic training loop and evaluation need from a model.

A model is an ``nn.Module`` made of named *parts* (``parts()``), e.g. ``{"autoencoder": ...}``
or ``{"autoencoder": ..., "critic": ...}``. The loop moves each part to the device and wraps it
in DDP separately (a WAE's critic and autoencoder step on different optimisers), and hands the
wrapped parts back through :class:`StepContext`. The model owns *what* a step does
(``train_step``: critic steps, loss terms); the loop owns *how* (devices, DDP, autocast,
gradient clipping, LR schedule, checkpoints, logging).

Inference methods (``encode``, ``teacher_forced_logits``, ``generate``, ``patient_nll``) run on
the unwrapped model, under ``torch.no_grad`` by the caller.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from mirror.data.batch import SequenceBatch
from mirror.data.schema import MAX_WORDS
from mirror.data.vocab import DIAG_AGE_VOCAB_SIZE


@dataclass(frozen=True)
class DataInfo:
    """Dataset facts a model is built from (read from ``metadata/dataset.json``)."""

    week_vocab_size: int
    diag_age_vocab_size: int = DIAG_AGE_VOCAB_SIZE
    max_words: int = MAX_WORDS


class StepContext(Protocol):
    """Given by the training loop to ``train_step``."""

    device: torch.device
    global_step: int
    parts: dict[str, nn.Module]  # DDP-wrapped parts: call these in train_step

    def autocast(self) -> AbstractContextManager[Any]:
        """bf16 autocast on GPU, a no-op on CPU."""
        ...

    def step(self, loss: torch.Tensor, optimizer: str) -> float:
        """Backward ``loss``, clip the gradients of that optimizer's parameters, step it and
        its LR schedule, zero its gradients. Returns the pre-clip gradient norm."""
        ...


@runtime_checkable
class MirrorModel(Protocol):
    config: Any

    def parts(self) -> dict[str, nn.Module]:
        """Named sub-modules, each wrapped in DDP on its own by the loop."""
        ...

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One optimizer per name used in ``train_step``; the first is the main one."""
        ...

    def train_step(self, batch: SequenceBatch, ctx: StepContext) -> dict[str, float]:
        """One optimisation step on ``batch``; returns scalar metrics for logging."""
        ...

    def eval_sums(self, batch: SequenceBatch) -> dict[str, torch.Tensor]:
        """Validation sums for one batch (e.g. ``{"nll_dx": ..., "nll_wk": ..., "tokens": ...}``);
        the loop adds them across batches and ranks, then divides by ``tokens``."""
        ...

    def encode(self, batch: SequenceBatch) -> torch.Tensor:
        """Latent z, shape (B, latent_dim), from the (possibly masked) encoder input."""
        ...

    def teacher_forced_logits(
        self, batch: SequenceBatch, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder logits under teacher forcing: (B, T, V_dx) and (B, T, V_wk)."""
        ...

    def generate(
        self, z: torch.Tensor, sex: torch.Tensor, max_words: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Greedy free-running decode: dx ids (B, max_words), week ids (B, max_words), and the
        number of words before ``<EOS>`` (B,). Positions past a sentence's end hold ``<PAD>``."""
        ...

    def patient_nll(self, batch: SequenceBatch) -> torch.Tensor:
        """Per-patient reconstruction negative log-likelihood (B,), for white-box privacy tests."""
        ...

    @property
    def latent_dim(self) -> int: ...


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
