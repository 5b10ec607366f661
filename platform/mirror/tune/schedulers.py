"""Sweep schedulers as a table of strategies, one per ``scheduler:`` a sweep file may name.

Everything that differs between schedulers, from loading the file to the end of the sweep,
is a field of its :class:`SchedulerStrategy`: the options it takes, how they are checked, the
Tune scheduler, the trainable, what the driver holds open while Tune runs, the stop
condition, the line the driver prints and the search algorithms it works with. The loader
(``space``) and the driver (``sweep``) ask the strategy and never branch on a scheduler's
name. A new scheduler is one more entry in :data:`SCHEDULERS`; a large one (``pbt``) keeps its
pieces in its own module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

from mirror.tune.fields import SpaceError, read_int, read_number
from mirror.tune.pbt import (
    PBT_OPTIONS,
    SEARCH_REFUSAL,
    check_pbt,
    fit_slots_during_sweep,
    pbt_scheduler,
    pbt_summary,
    run_pbt_trial,
    stop_at_last_epoch,
)
from mirror.tune.spec import SEARCH_OPTIONS, SweepSpec
from mirror.tune.trial import run_trial


@dataclass(frozen=True)
class SchedulerStrategy:
    """What one scheduler contributes to a sweep. Every field is set for every scheduler (no
    defaults), so the table shows each one whole."""

    options: tuple[str, ...]  # the keys the file may set under ``scheduler:``
    searches: tuple[str, ...]  # the search algorithms it works with
    search_refusal: str  # why any other search is refused (the load error); "" if none is
    # (spec, whether the file set concurrency) -> the spec, options resolved; raises SpaceError
    check: Callable[[SweepSpec, bool], SweepSpec]
    build: Callable[[SweepSpec, int], Any]  # (spec, train.epochs) -> Tune's scheduler
    trainable: Callable[..., None]  # Tune function trainable (config, *, sweep, data, ...)
    # (sweep name, concurrency) -> extra Tune callbacks, held open while Tune runs
    during_sweep: Callable[[str, int], AbstractContextManager[list[Any]]]
    stop: Callable[[int], dict[str, Any] | None]  # (train.epochs) -> Tune's ``stop``
    summary: Callable[[SweepSpec], str | None]  # a line the driver prints, or None
    # True: the searcher creates every trial at once, unlimited; the strategy bounds how many
    # train (PBT: a paused member would hold a searcher's slot, so fit slots bound fits).
    whole_population_at_once: bool


# --------------------------------------------------------------------------------------------
# ASHA and FIFO (PBT's pieces are in mirror.tune.pbt).


def check_asha(spec: SweepSpec, concurrency_given: bool) -> SweepSpec:
    """ASHA's options against the run's epochs; the spec comes back unchanged."""
    where, options = spec.source, spec.scheduler_options
    epochs = spec.base_spec().train.epochs
    grace = read_int(where, "scheduler.grace_period", options.get("grace_period", 1), minimum=1)
    max_t = read_int(where, "scheduler.max_t", options.get("max_t", epochs), minimum=1)
    factor = read_number(where, "scheduler.reduction_factor", options.get("reduction_factor", 2))
    if factor <= 1:
        raise SpaceError(
            f"{where}: scheduler.reduction_factor: expected a number > 1, received {factor!r}"
        )
    if grace > max_t:
        raise SpaceError(
            f"{where}: scheduler.grace_period: expected <= max_t ({max_t} epochs), received {grace}"
        )
    return spec


def asha_scheduler(spec: SweepSpec, epochs: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler

    opts = spec.scheduler_options
    return ASHAScheduler(
        time_attr="training_iteration",  # one Tune iteration per epoch
        max_t=opts.get("max_t", epochs),
        grace_period=opts.get("grace_period", 1),
        reduction_factor=opts.get("reduction_factor", 2),
        stop_last_trials=False,  # a trial at max_t ends by itself, releasing its workers
    )


def fifo_scheduler(spec: SweepSpec, epochs: int) -> Any:
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


def no_options_to_check(spec: SweepSpec, concurrency_given: bool) -> SweepSpec:
    return spec


@contextmanager
def no_extra_callbacks(sweep_name: str, concurrency: int) -> Iterator[list[Any]]:
    yield []


def no_stop(epochs: int) -> None:
    """Trials end by themselves after their last epoch."""
    return None


def no_summary(spec: SweepSpec) -> None:
    return None


SCHEDULERS: dict[str, SchedulerStrategy] = {  # in the order the load error lists them
    "asha": SchedulerStrategy(  # early stopping; options in epochs
        options=("grace_period", "reduction_factor", "max_t"),
        searches=tuple(SEARCH_OPTIONS),
        search_refusal="",
        check=check_asha,
        build=asha_scheduler,
        trainable=run_trial,
        during_sweep=no_extra_callbacks,
        stop=no_stop,
        summary=no_summary,
        whole_population_at_once=False,
    ),
    "fifo": SchedulerStrategy(  # run every trial to the end
        options=(),
        searches=tuple(SEARCH_OPTIONS),
        search_refusal="",
        check=no_options_to_check,
        build=fifo_scheduler,
        trainable=run_trial,
        during_sweep=no_extra_callbacks,
        stop=no_stop,
        summary=no_summary,
        whole_population_at_once=False,
    ),
    "pbt": SchedulerStrategy(  # population-based training (mirror.tune.pbt)
        options=PBT_OPTIONS,
        searches=("random",),
        search_refusal=SEARCH_REFUSAL,
        check=check_pbt,
        build=pbt_scheduler,
        trainable=run_pbt_trial,
        during_sweep=fit_slots_during_sweep,
        stop=stop_at_last_epoch,
        summary=pbt_summary,
        whole_population_at_once=True,
    ),
}
