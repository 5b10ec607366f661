"""Learning-rate schedules, sized in training steps: a module of its own, free of Ray, so that
the plain-PyTorch benches (``bench/``, a GPU machine with no Ray installed) run the loop's
schedule exactly."""

from __future__ import annotations

import math

import torch


def lr_lambda(total_steps: int, warmup_fraction: float, min_lr_ratio: float):
    """Linear warmup, then cosine decay to ``min_lr_ratio``: a pure function of the step."""
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_schedulers(
    optimizers: dict[str, torch.optim.Optimizer], total_steps: int, warmup_fraction: float,
    min_lr_ratio: float,
) -> dict[str, torch.optim.lr_scheduler.LambdaLR]:
    """One warm-up + cosine schedule per optimizer, all sized in training steps: the step
    context advances each once per training step, so they stay in step with each other."""
    factor = lr_lambda(total_steps, warmup_fraction, min_lr_ratio)
    return {name: torch.optim.lr_scheduler.LambdaLR(opt, factor) for name, opt in optimizers.items()}
