"""Fit slots: how many PBT members train at once (a named Ray actor per sweep).

Kept apart from ``mirror.tune.pbt`` because this module needs Ray at import (the driver-side
callback subclasses Tune's ``Callback``), while ``pbt`` is imported by the sweep-file loader,
which must not start Ray. ``pbt`` imports this module only where a sweep runs.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray
from ray.tune import Callback


class FitSlots:
    """A first-come-first-served semaphore shared by a sweep's members (a named Ray actor).

    Tune cannot bound PBT's running members by resources: a member's trial process holds
    almost nothing, and its ``TorchTrainer`` reserves workers only while a fit runs. Left
    alone, every member would start a fit at once and their worker groups would time out
    waiting for each other. A member holds a slot for the length of one fit.

    Slots are keyed by trial id, so a restarted member first gives back what its previous
    attempt held, and the sweep driver gives back the slot of a member that fails
    (:class:`ReleaseFitSlots`).
    """

    def __init__(self, slots: int):
        self.slots = slots
        self.holders: set[str] = set()
        self.waiting: deque[tuple[str, asyncio.Future]] = deque()

    async def acquire(self, holder: str) -> None:
        self.holders.discard(holder)
        granted = asyncio.get_running_loop().create_future()
        self.waiting.append((holder, granted))
        self._grant()
        await granted

    async def release(self, holder: str) -> None:
        self.holders.discard(holder)
        self._grant()

    async def held(self) -> list[str]:
        return sorted(self.holders)

    def _grant(self) -> None:
        while self.waiting and len(self.holders) < self.slots:
            holder, granted = self.waiting.popleft()
            if not granted.done():  # a waiter whose caller has gone is skipped
                self.holders.add(holder)
                granted.set_result(None)


def fit_slots_name(sweep_name: str) -> str:
    return f"mirror-fit-slots-{sweep_name}"


def start_fit_slots(sweep_name: str, slots: int) -> Any:
    """The sweep's :class:`FitSlots` actor; it lives as long as the sweep driver."""
    actor = ray.remote(num_cpus=0)(FitSlots)
    return actor.options(name=fit_slots_name(sweep_name), get_if_exists=True).remote(slots)


@contextmanager
def fit_slot(sweep_name: str, trial_id: str) -> Iterator[None]:
    """Hold one of the sweep's slots for the length of the ``with`` block (one fit)."""
    slots = ray.get_actor(fit_slots_name(sweep_name))
    ray.get(slots.acquire.remote(trial_id))
    try:
        yield
    finally:
        ray.get(slots.release.remote(trial_id))


class ReleaseFitSlots(Callback):
    """Driver-side Tune callback: a member that failed mid-fit cannot give its slot back."""

    def __init__(self, sweep_name: str):
        self.sweep_name = sweep_name

    def _release(self, trial: Any) -> None:
        ray.get(ray.get_actor(fit_slots_name(self.sweep_name)).release.remote(trial.trial_id))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._release(trial)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._release(trial)


@contextmanager
def fit_slots_during_sweep(sweep_name: str, slots: int) -> Iterator[list[Callback]]:
    """The driver's side of fit slots: the actor for as long as the sweep runs, and the Tune
    callback that frees a failed member's slot (yielded, for the Tuner's ``callbacks``)."""
    actor = start_fit_slots(sweep_name, slots)
    try:
        yield [ReleaseFitSlots(sweep_name)]
    finally:
        ray.kill(actor)
