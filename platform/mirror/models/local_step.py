"""A minimal plain-PyTorch :class:`~mirror.models.base.StepContext`: one process, no DDP.

Used by the Ray loop (``mirror.train.loop``, with DDP-wrapped parts), by the model tests and by
``bench/`` as the "plain PyTorch loop" baseline against which the Ray training loop is measured.
It does what the protocol says and nothing more: ``step`` is backward, clip, optimizer step,
zero grad; ``train_step`` is one ``model.train_step`` followed by one step of *every* LR
schedule and of ``global_step``.

Schedules advance once per training step, never per optimizer step: a WAE's critic steps 5 to
100 times per autoencoder step, and a schedule advanced on each of those would run through its
warm-up and decay (sized in training steps) 5 to 100 times too fast. So every schedule is a
function of the global step alone, which is also what a resumed or PBT-exploited run restores.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from mirror.models.base import TrainableModel


class LocalStepContext:
    """Drives ``model.train_step``: backward, clipping and optimizer steps per ``step``; LR
    schedules and ``global_step`` once per ``train_step``.

    ``parts``: the modules ``train_step`` calls; the model's own by default (a plain loop), or
    their DDP wrappers (the Ray loop in ``mirror.train.loop`` passes those).

    ``grad_clip``: max global L2 norm of each optimizer's gradients (0 or None disables).
    bf16 autocast is used on CUDA, as the Ray loop does; on CPU autocast is a no-op.
    """

    def __init__(
        self,
        model: TrainableModel,
        optimizers: dict[str, torch.optim.Optimizer],
        grad_clip: float | None,
        schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] | None = None,
        device: torch.device | None = None,
        parts: dict[str, nn.Module] | None = None,
        global_step: int = 0,
    ):
        self.model = model
        self.parts: dict[str, nn.Module] = parts if parts is not None else model.parts()
        self.optimizers = optimizers
        self.grad_clip = grad_clip or 0.0
        self.schedulers = schedulers or {}
        first = next(iter(self.parts.values()))
        self.device = device or next(first.parameters()).device
        self.global_step = global_step
        self.grad_norms: dict[str, float] = {}  # last pre-clip gradient norm per optimizer

    def autocast(self) -> AbstractContextManager[Any]:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, loss: torch.Tensor, optimizer: str) -> float:
        opt = self.optimizers[optimizer]
        loss.backward()
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # pre-clip norm
        opt.step()  # no schedule step here: schedules follow the global step (end_step)
        opt.zero_grad(set_to_none=True)
        self.grad_norms[optimizer] = float(grad_norm)
        return float(grad_norm)

    def end_step(self) -> None:
        """After one training step: every LR schedule and ``global_step`` advance by one, so
        after N steps each optimizer's rate is ``base_lr * lr_lambda(N)``."""
        for schedule in self.schedulers.values():
            schedule.step()
        self.global_step += 1

    def train_step(self, batch: Any) -> dict[str, float]:
        """One ``model.train_step`` on ``batch``, then :meth:`end_step`."""
        metrics = self.model.train_step(batch, self)
        self.end_step()
        return metrics
