"""Population-based training for sweeps (``scheduler: pbt``).

PBT copies a strong trial's weights into a weak one and perturbs the copy's hyperparameters,
so Tune must hold every trial's complete training state. In the Train V2 pattern a trial's
``TorchTrainer`` keeps its checkpoints inside Ray Train and reports only metrics to Tune, so a
PBT trial runs differently from an ASHA one: as a chain of one-epoch fits.

* Each fit starts from the trial's current checkpoint: none on the first epoch, its own after
  a pause, the donor's after an exploit. It trains one epoch under the trial's *current*
  config and returns its checkpoint, which the trial reports to Tune with the epoch's metrics.
  Whatever ``tune.get_checkpoint()`` returns on a restart is therefore a complete state:
  weights, optimizer moments and schedule position, whoever wrote it.
* The loop puts the trial's own optimizer settings back over the restored ones
  (``mirror.train.loop.reapply_hyperparameters``), so a perturbed learning rate takes effect
  instead of the donor's.
* Only knobs that leave every parameter's shape alone can be perturbed: the weights of one
  trial must load into another. That is checked when the file is loaded, by building the model
  at the knob's extreme values (:func:`mutation_problem`). Structural knobs such as
  ``model.latent_dim`` may still be searched: they are sampled once, and an exploit copies them
  from the donor together with its weights.
* A perturbed value stays inside the range the file declares (:class:`KeepInsideRanges`).
* A fit per epoch costs one worker-group start per epoch: seconds, against epochs that take
  hours at population scale. ``perturbation_interval`` is in epochs.
* Every member stays live (its trial process holds 0.05 CPU), but only as many fits run at
  once as the cluster fits (fit slots, ``mirror.tune.fit_slots``; first come first served).
  Members therefore take turns epoch by epoch and advance together, which is what PBT's
  comparisons need; a 2-core laptop trains one member at a time, a GPU cluster many.

The sweep-file loader, the scheduler table (``mirror.tune.schedulers``) and the driver reach
these pieces through the ``pbt`` strategy; this module imports only the layers below it.

MLflow: a trial keeps one child run for its whole history. Each epoch logs ``pbt/<knob>``
(the value trained with) and ``pbt/exploited`` (1 on the epoch after taking over another
trial's weights); the tag ``pbt.exploit.epoch_NNNN`` names the donor run and epoch and
gives the member's config from then on (its params keep the values first drawn).
"""

from __future__ import annotations

import difflib
import json
import os
import uuid
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from mirror.tune.fields import SpaceError, read_int, read_number
from mirror.tune.spec import Parameter, SweepSpec
from mirror.tune.trial import finish_trial, storage_dirs, trial_run_name

if TYPE_CHECKING:
    from mirror.train.driver import TrainingOutcome

PBT_OPTIONS = (  # the sweep file's scheduler options; intervals in epochs
    "perturbation_interval",
    "burn_in",
    "quantile_fraction",
    "resample_probability",
    "synch",
    "mutate",
)
MUTABLE_TRAIN_KEYS = ("train.grad_clip",)
EXPLOIT_TAG = "pbt.exploit.epoch_{epoch:04d}"
SEARCH_REFUSAL = (  # PBT accepts only search 'random'; the loader's error says why
    "PBT explores by perturbing its own population; use search 'random' (it draws the "
    "starting population)"
)


# --------------------------------------------------------------------------------------------
# Checks at load (called by the sweep-file loader through mirror.tune.schedulers).


def check_pbt(spec: SweepSpec, concurrency_given: bool) -> SweepSpec:
    """PBT's options, with ``mutate`` resolved to the knobs PBT perturbs: the listed ones, each
    checked to be perturbable, or by default every searched knob that is. ``concurrency``
    defaults to the whole population unless the file sets it."""
    where, opts = spec.source, dict(spec.scheduler_options)
    epochs = spec.base_spec().train.epochs
    if spec.samples < 2:
        raise SpaceError(
            f"{where}: samples: PBT needs a population of at least 2 trials, received {spec.samples}"
        )
    interval = read_int(
        where, "scheduler.perturbation_interval", opts.get("perturbation_interval", 1), minimum=1
    )
    if interval >= epochs:
        raise SpaceError(
            f"{where}: scheduler.perturbation_interval: expected fewer epochs than the run's "
            f"{epochs} (train.epochs), or PBT never perturbs; received {interval}"
        )
    read_int(where, "scheduler.burn_in", opts.get("burn_in", 0), minimum=0)
    quantile = read_number(
        where, "scheduler.quantile_fraction", opts.get("quantile_fraction", 0.25)
    )
    if not 0 < quantile <= 0.5:
        raise SpaceError(
            f"{where}: scheduler.quantile_fraction: expected a number in (0, 0.5], received {quantile!r}"
        )
    resample = read_number(
        where, "scheduler.resample_probability", opts.get("resample_probability", 0.25)
    )
    if not 0 <= resample <= 1:
        raise SpaceError(
            f"{where}: scheduler.resample_probability: expected a number in [0, 1], received {resample!r}"
        )
    if not isinstance(opts.get("synch", True), bool):
        raise SpaceError(
            f"{where}: scheduler.synch: expected true or false, received {opts['synch']!r}"
        )

    searched = {p.key: p for p in spec.parameters}
    if "train.epochs" in searched:
        raise SpaceError(
            f"{where}: parameters.train.epochs: PBT compares members epoch by epoch, so all of "
            "them train the same number of epochs; set it in 'fixed'"
        )
    listed = opts.get("mutate")
    if listed is not None:
        if (
            not isinstance(listed, list)
            or not listed
            or not all(isinstance(k, str) for k in listed)
        ):
            raise SpaceError(
                f"{where}: scheduler.mutate: expected a non-empty list of parameter keys, received {listed!r}"
            )
        for key in listed:
            if key not in searched:
                close = difflib.get_close_matches(key, list(searched), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise SpaceError(
                    f"{where}: scheduler.mutate: {key!r} is not a searched parameter{hint}; "
                    f"searched: {', '.join(searched)}"
                )
    problems = {  # builds models, so only for the knobs that could be perturbed
        key: problem
        for key in (listed if listed is not None else searched)
        for model in spec.models
        if (problem := mutation_problem(model, key, searched[key].probes(), spec.fixed)) is not None
    }
    if listed is not None:
        for key in listed:
            if key in problems:
                raise SpaceError(
                    f"{where}: scheduler.mutate: PBT cannot perturb {key}: {problems[key]}"
                )
        mutate = tuple(listed)
    else:
        mutate = tuple(key for key in searched if key not in problems)
        if not mutate:
            raise SpaceError(
                f"{where}: scheduler: PBT has no parameter it can perturb: "
                + "; ".join(f"{k}: {v}" for k, v in problems.items())
            )
    return replace(
        spec,
        scheduler_options={**opts, "mutate": mutate},
        # members training at once (the rest wait their turn, live); default: all of them
        concurrency=spec.concurrency if concurrency_given else spec.samples,
    )


def mutation_problem(
    model: str, key: str, values: tuple[Any, ...], fixed: Mapping[str, Any]
) -> str | None:
    """Why PBT cannot perturb ``key`` mid-run for ``model``, or None when it can.

    Model knobs are tried at each of ``values`` (the ends of a range, or every choice): a
    knob is mutable when every value builds a model with the same parameter names and shapes
    and the same optimizer layout, so a checkpoint taken under one value loads under another.
    """
    from mirror.models import build_model, get_model_spec
    from mirror.train.spec import build_run_spec

    if key == "model":
        return "the model itself cannot change in the middle of a run"
    view = get_model_spec(model).view
    if key.startswith("view."):
        if key.partition(".")[2] in view.perturbable:
            return None
        keys = ", ".join(f"view.{k}" for k in view.perturbable) or "none"
        return f"it changes what data an epoch holds; the {view.name} view keys PBT may perturb are {keys}"
    if key.startswith("train."):
        if key in MUTABLE_TRAIN_KEYS:
            return None
        return (
            "it fixes the run's data, schedule or size; the train keys PBT may perturb are "
            + ", ".join(MUTABLE_TRAIN_KEYS)
        )
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in values):
        return "PBT perturbs numbers only"
    layouts: list[tuple[Any, dict[str, tuple[int, ...]], dict[str, list[int]]]] = []
    for value in values:
        spec = build_run_spec(model, ".", "probe", {**fixed, key: value})
        net = build_model(model, spec.model_config, view.probe_info())
        shapes = {name: tuple(t.shape) for name, t in net.state_dict().items()}
        optimizers = {
            name: [len(group["params"]) for group in opt.param_groups]
            for name, opt in net.make_optimizers().items()
        }
        layouts.append((value, shapes, optimizers))
    first_value, first_shapes, first_optimizers = layouts[0]
    for value, shapes, optimizers in layouts[1:]:
        if shapes.keys() != first_shapes.keys():
            added = sorted(shapes.keys() ^ first_shapes.keys())[0]
            return (
                f"{key}={first_value!r} and {key}={value!r} build different parameters "
                f"({added} exists in only one), so one trial's checkpoint cannot load into another"
            )
        for name, shape in shapes.items():
            if shape != first_shapes[name]:
                return (
                    f"it changes the shape of {name}: {first_shapes[name]} at {first_value!r}, "
                    f"{shape} at {value!r}, so one trial's checkpoint cannot load into another"
                )
        if optimizers != first_optimizers:
            return f"{key}={first_value!r} and {key}={value!r} build different optimizers"
    return None


# --------------------------------------------------------------------------------------------
# The scheduler, and what the sweep driver adds for it.


class KeepInsideRanges:
    """PBT's ``custom_explore_fn``: Tune perturbs continuous knobs by factors (x0.8, x1.2)
    without regard to bounds; this clips each back into the range the sweep file declares, so
    a trial never runs with, e.g., a mask rate above 1. A class, not a closure, because Tune
    pickles its scheduler into the experiment state for ``--resume``."""

    def __init__(self, ranges: Mapping[str, tuple[float, float, bool]]):
        self.ranges = dict(ranges)  # key -> (low, high, integer)

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        for key, (low, high, integer) in self.ranges.items():
            if key in config:
                value = min(max(config[key], low), high)
                config[key] = int(round(value)) if integer else float(value)
        return config


def mutation_domain(param: Parameter) -> Any:
    """What PBT resamples ``param`` from: the list of choices, or the range's Tune domain."""
    if param.space in ("choice", "grid"):
        return list(param.values)
    return param.domain()


def pbt_scheduler(spec: SweepSpec, epochs: int) -> Any:
    """Tune's PBT scheduler over the knobs ``mutate`` names. ``epochs`` goes unused: PBT's
    intervals are its own options, and each member ends at its last epoch through the stop
    condition (:func:`stop_at_last_epoch`)."""
    from ray.tune.schedulers import PopulationBasedTraining

    opts = spec.scheduler_options
    mutated = [p for p in spec.parameters if p.key in opts["mutate"]]
    ranges = {
        p.key: (p.low, p.high - 1 if p.space == "randint" else p.high, p.space == "randint")
        for p in mutated
        if p.low is not None
    }
    return PopulationBasedTraining(
        time_attr="training_iteration",  # one Tune iteration per epoch
        perturbation_interval=opts.get("perturbation_interval", 1),
        burn_in_period=opts.get("burn_in", 0),
        hyperparam_mutations={p.key: mutation_domain(p) for p in mutated},
        quantile_fraction=opts.get("quantile_fraction", 0.25),
        resample_probability=opts.get("resample_probability", 0.25),
        custom_explore_fn=KeepInsideRanges(ranges),
        # Synchronous by default: members take turns on fit slots, so in Tune's asynchronous
        # mode a member reaching a perturbation point first compares against nobody, and the
        # weakest member may never exploit (measured: 4 members, 4 epochs, 0 exploits).
        synch=opts.get("synch", True),
    )


def stop_at_last_epoch(epochs: int) -> dict[str, Any]:
    """Tune's ``stop``: end a member at its last epoch before the scheduler sees that result,
    so it is never "exploited" into a run with no epochs left to train."""
    return {"training_iteration": epochs}


def pbt_summary(spec: SweepSpec) -> str:
    """The driver's one line on what PBT perturbs and what members only inherit."""
    mutate = spec.scheduler_options["mutate"]
    inherited = [p.key for p in spec.parameters if p.key not in mutate]
    return f"PBT over a population of {spec.samples}: perturbs {', '.join(mutate)}" + (
        f"; draws once and inherits on exploit: {', '.join(inherited)}" if inherited else ""
    )


def fit_slots_during_sweep(sweep_name: str, slots: int) -> AbstractContextManager[list[Any]]:
    """The fit-slot actor for as long as the sweep runs, plus its driver-side Tune callback
    (:func:`mirror.tune.fit_slots.fit_slots_during_sweep`)."""
    from mirror.tune import fit_slots  # needs Ray; this module is imported by the loader

    return fit_slots.fit_slots_during_sweep(sweep_name, slots)


# --------------------------------------------------------------------------------------------
# The trainable (runs in a Tune trial actor).


def run_pbt_trial(
    config: dict[str, Any], *, sweep: SweepSpec, data: str, parent_run_id: str, uri: str
) -> None:
    """One PBT trial: one ``run_training`` fit per epoch, each reported to Tune with its
    checkpoint (see the module docstring)."""
    import ray.train
    from ray import tune

    from mirror import tracking
    from mirror.train.driver import run_training, storage_path
    from mirror.tune.fit_slots import fit_slot

    os.environ["MLFLOW_TRACKING_URI"] = uri  # Tune moves the trial into its own working dir
    trial_id = tune.get_context().get_trial_id()
    run_name = trial_run_name(sweep.name, trial_id)
    spec = sweep.trial_spec(config, data, run_name)
    storage = storage_path(spec)
    _remove_fits(storage, run_name)  # an earlier attempt's; Tune holds the state now

    checkpoint = tune.get_checkpoint()
    origin = read_origin(checkpoint) if checkpoint is not None else None
    epoch = origin["epoch"] + 1 if origin else 0
    knobs = {key: float(config[key]) for key in sweep.scheduler_options["mutate"]}
    previous_fit: TrainingOutcome | None = None
    while epoch < spec.train.epochs:
        with fit_slot(sweep.name, trial_id):
            outcome = run_training(
                spec,
                parent_run_id=parent_run_id,
                resume_from=None
                if checkpoint is None
                else ray.train.Checkpoint(checkpoint.path, checkpoint.filesystem),
                until_epoch=epoch + 1,
                train_run_name=f"{run_name}-e{epoch:04d}-{uuid.uuid4().hex[:8]}",
            )
        exploited = origin is not None and origin["run_name"] != run_name
        tracking.log_metrics(
            outcome.run_id,
            {**{f"pbt/{k}": v for k, v in knobs.items()}, "pbt/exploited": float(exploited)},
            step=epoch,
            uri=uri,
        )
        if exploited:
            # Params stay as first drawn; this records what the member trains with from here,
            # inherited structural knobs included.
            searched = {p.key: config[p.key] for p in sweep.parameters}
            donor = f"{origin['run_name']} (epoch {origin['epoch']}); config {json.dumps(searched)}"
            tracking.set_tags(outcome.run_id, {EXPLOIT_TAG.format(epoch=epoch): donor}, uri=uri)
        if previous_fit is not None:  # superseded, and already copied into Tune's storage
            previous_fit.checkpoint.filesystem.delete_dir(previous_fit.train_path)
        previous_fit = outcome
        checkpoint = tune.Checkpoint(outcome.checkpoint.path, outcome.checkpoint.filesystem)
        origin = None
        epoch += 1
        if epoch == spec.train.epochs:  # Tune stops the trial at this report (stop_at_last_epoch)
            finish_trial(sweep, outcome, spec)
        tune.report(outcome.metrics, checkpoint=checkpoint)  # PBT may pause or exploit here


def read_origin(checkpoint: Any) -> dict[str, Any]:
    """``origin.json`` of a checkpoint (run name, epoch, step) without downloading the weights."""
    from mirror.checkpoint import ORIGIN_FILE

    path = f"{checkpoint.path.rstrip('/')}/{ORIGIN_FILE}"
    with checkpoint.filesystem.open_input_stream(path) as stream:
        return json.loads(stream.read())


def _remove_fits(storage: str, run_name: str) -> None:
    fs, dirs = storage_dirs(storage)
    for name, path in dirs.items():
        if name.startswith(f"{run_name}-e"):
            fs.delete_dir(path)
