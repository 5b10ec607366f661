"""Layer 3: a Ray Tune sweep whose trials are Ray Train runs (Ray's Train V2 interop pattern).

Each trial is a small function trainable (``mirror.tune.trial.run_trial``) that builds the
trial's run spec and calls the same :func:`run_training` as a single ``jobs/train.py`` run,
with ``TuneReportCallback`` forwarding every epoch's metrics to Tune (ASHA stops weak trials
on them). The trial itself reserves almost nothing; its ``TorchTrainer`` reserves the workers.
What differs by scheduler (PBT's trainable, its fit slots and stop condition) comes from the
scheduler's strategy in ``mirror.tune.schedulers``; this driver never branches on its name.

Concurrency: one trial needs ``workers x cpus_per_worker`` CPUs (and ``workers`` GPUs with
``--gpu``) for its train workers plus one CPU for its Ray Data read tasks, which would
otherwise starve on a small machine and hang. ``max_concurrent_trials`` is what the cluster
fits of that, capped by the file's ``concurrency``: one trial at a time on a 2-core laptop,
many on a cluster.

Tracking: one MLflow parent run per sweep (the space file as an artifact), one nested child
run per trial named ``<sweep>-<trial id>``. Names come from the trial id, never from a clock,
so a restored sweep (``--resume``) finds the same Ray Train storage and the same MLflow run.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ray import tune

from mirror import tracking
from mirror.cluster import release_orphaned_placement_groups
from mirror.storage import is_remote
from mirror.storage import join as storage_join
from mirror.tune.fields import SpaceError, plain
from mirror.tune.report import TrialRow, record_summary
from mirror.tune.schedulers import SCHEDULERS
from mirror.tune.spec import SweepSpec
from mirror.tune.trial import storage_dirs, trial_run_name

TRIAL_DRIVER_CPUS = 0.05  # the trial process only waits on its TorchTrainer
DATA_CPUS_PER_TRIAL = 1.0  # headroom for the trial's Ray Data read tasks
SWEEP_TAG = "mirror.sweep"
TRIAL_TAG = "mirror.trial_id"
FAILURES_TAG = "tune.failures"
EARLY_STOP_TAG = "tune.early_stopped"
STAMP = "%Y%m%d-%H%M%S"
REAP_INTERVAL_S = 5.0  # how often the driver frees placement groups of stopped trials


@dataclass(frozen=True)
class SweepOutcome:
    name: str
    path: str  # the Tune experiment directory (local path or URI)
    parent_run_id: str
    best: TrialRow | None
    trials: int
    errors: int


def trial_resources(spec: SweepSpec) -> dict[str, float]:
    """Logical resources one running trial occupies: train workers, reads, the trial itself."""
    train = spec.base_spec().train
    cpus = train.workers * train.cpus_per_worker + DATA_CPUS_PER_TRIAL + TRIAL_DRIVER_CPUS
    return {"CPU": cpus, "GPU": float(train.workers if train.use_gpu else 0)}


def max_concurrent_trials(spec: SweepSpec, cluster: Mapping[str, float]) -> tuple[int, int]:
    """``(concurrency to use, trials the cluster fits right now)``. When nothing fits yet (an
    autoscaling cluster with no GPU nodes up) the file's ``concurrency`` is used and trials wait
    for the autoscaler."""
    need = trial_resources(spec)
    fits = min(
        math.floor(cluster.get(kind, 0.0) / amount + 1e-9)
        for kind, amount in need.items()
        if amount > 0
    )
    return (min(spec.concurrency, fits) if fits >= 1 else spec.concurrency), fits


# --------------------------------------------------------------------------------------------
# Driver-side bookkeeping.


class ChildRunBookkeeping(tune.Callback):
    """Driver-side Tune callback that keeps the nested MLflow runs truthful: tags each with its
    trial id, counts retries, and closes the runs of trials that ASHA stopped or that failed,
    which the stopped trial process cannot close itself."""

    def __init__(self, sweep_name: str, experiment: str, epochs: int, uri: str):
        self.sweep_name, self.experiment, self.epochs, self.uri = (
            sweep_name,
            experiment,
            epochs,
            uri,
        )
        self.run_ids: dict[str, str] = {}
        self.last_reap = 0.0
        self.reaped = 0

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        """Every few seconds, free the placement groups of Train runs whose trial Tune
        stopped (see :func:`mirror.cluster.release_orphaned_placement_groups`)."""
        if time.monotonic() - self.last_reap < REAP_INTERVAL_S:
            return
        self.last_reap = time.monotonic()
        freed = release_orphaned_placement_groups()
        if freed:
            self.reaped += freed
            print(f"released {freed} placement group(s) of stopped trials ({self.reaped} so far)")

    def _run_id(self, trial: Any) -> str | None:
        if trial.trial_id not in self.run_ids:
            run_id = tracking.find_run(
                trial_run_name(self.sweep_name, trial.trial_id), self.experiment, self.uri
            )
            if run_id is None:
                return None
            tracking.set_tags(
                run_id, {TRIAL_TAG: trial.trial_id, SWEEP_TAG: self.sweep_name}, uri=self.uri
            )
            self.run_ids[trial.trial_id] = run_id
        return self.run_ids[trial.trial_id]

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self._run_id(trial)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self._run_id(trial)
        if run_id:
            tracking.set_tags(run_id, {FAILURES_TAG: str(trial.num_failures)}, uri=self.uri)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self._run_id(trial)
        if run_id:
            tracking.set_tags(run_id, {FAILURES_TAG: str(trial.num_failures)}, uri=self.uri)
            tracking.end_run(run_id, status="FAILED", uri=self.uri)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self._run_id(trial)
        if run_id is None:
            return
        epochs = int((trial.last_result or {}).get("training_iteration", 0))
        tracking.set_tags(run_id, {EARLY_STOP_TAG: str(epochs < self.epochs).lower()}, uri=self.uri)
        if tracking.get_run(run_id, uri=self.uri).info.status == "RUNNING":
            tracking.end_run(run_id, status="FINISHED", uri=self.uri)


# --------------------------------------------------------------------------------------------
# The driver.


def run_sweep(
    spec: SweepSpec, *, data: str | None = None, resume: bool = False, name: str | None = None
) -> SweepOutcome:
    """Run (or with ``resume`` continue) a sweep to the end and record it in MLflow."""
    import ray

    from mirror.cluster import ensure_ray
    from mirror.train.driver import storage_path

    data = _resolve_data(spec, data)
    base = spec.base_spec(data)
    storage = storage_path(base)
    name = _resolve_name(spec, storage, name, resume)
    spec = replace(spec, name=name, fixed={**spec.fixed, "train.storage_path": storage})
    experiment_path = storage_join(storage, name)

    need = trial_resources(spec)
    ensure_ray(min_logical_cpus=need["CPU"])
    concurrency, fits = max_concurrent_trials(spec, ray.cluster_resources())
    print(
        f"sweep {name}: one trial needs {need['CPU']:g} CPU / {need['GPU']:g} GPU; the cluster "
        f"fits {fits} now; running up to {concurrency} at once"
        + ("" if fits >= 1 else " (waiting for the autoscaler to add nodes)")
    )
    strategy = SCHEDULERS[spec.scheduler]
    summary = strategy.summary(spec)
    if summary is not None:
        print(summary)

    uri = tracking.tracking_uri()
    parent_run_id = tracking.start_run(
        name,
        params=_parent_params(spec, data),
        tags={
            SWEEP_TAG: name,
            "mirror.kind": "sweep",
            "mirror.space_file": spec.source,
            "model": ",".join(spec.models),
        },
        experiment=base.train.experiment,
        uri=uri,
    )
    _log_space_file(spec, parent_run_id, uri)

    bookkeeping = ChildRunBookkeeping(name, base.train.experiment, base.train.epochs, uri)
    with strategy.during_sweep(name, concurrency) as extra_callbacks:
        trainable = tune.with_resources(
            tune.with_parameters(
                strategy.trainable, sweep=spec, data=data, parent_run_id=parent_run_id, uri=uri
            ),
            {"CPU": TRIAL_DRIVER_CPUS},
        )
        if resume:
            tuner = tune.Tuner.restore(
                experiment_path, trainable, resume_unfinished=True, resume_errored=True
            )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=spec.param_space(),
                tune_config=tune.TuneConfig(
                    metric=spec.metric,
                    mode=spec.mode,
                    scheduler=strategy.build(spec, base.train.epochs),
                    search_alg=_searcher(spec, concurrency),
                    num_samples=spec.samples,
                ),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=storage,
                    failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                    stop=strategy.stop(base.train.epochs),
                    callbacks=[bookkeeping, *extra_callbacks],
                    verbose=1,
                ),
            )
        try:
            tuner.fit()
            rows = _trial_rows(spec, experiment_path, base.train.experiment, uri)
        except BaseException:
            tracking.end_run(parent_run_id, status="KILLED", uri=uri)
            raise
    best = record_summary(spec, rows, parent_run_id, uri)
    if best is not None and best.run_id and spec.evaluate == "best":
        from mirror.evaluation import evaluate_run

        evaluate_run(best.run_id, synthetic=base.train.score_synthetic)
    errors = sum(r.status == "ERROR" for r in rows)
    tracking.end_run(parent_run_id, status="FINISHED" if best is not None else "FAILED", uri=uri)
    return SweepOutcome(name, experiment_path, parent_run_id, best, len(rows), errors)


def _searcher(spec: SweepSpec, concurrency: int) -> Any:
    """Random/grid search limits concurrency itself (Tune ignores ``max_concurrent_trials``
    for a ``BasicVariantGenerator`` instance); Optuna gets a ``ConcurrencyLimiter``.

    A strategy with ``whole_population_at_once`` (PBT) gets no limit: a paused member still
    counts against a searcher's limit, so a limit below the population would never start the
    rest. How many members train at once is bounded by fit slots instead
    (``mirror.tune.fit_slots.FitSlots``)."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if SCHEDULERS[spec.scheduler].whole_population_at_once:
        return BasicVariantGenerator(max_concurrent=0, random_state=spec.seed)

    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=spec.seed), max_concurrent=concurrency)
    return BasicVariantGenerator(max_concurrent=concurrency, random_state=spec.seed)


def _trial_rows(spec: SweepSpec, experiment_path: str, experiment: str, uri: str) -> list[TrialRow]:
    from ray.tune import ExperimentAnalysis

    rows = []
    for trial in ExperimentAnalysis(experiment_path).trials:
        last = trial.last_result or {}
        value = last.get(spec.metric)
        rows.append(
            TrialRow(
                trial_id=trial.trial_id,
                run_id=tracking.find_run(
                    trial_run_name(spec.name, trial.trial_id), experiment, uri
                ),
                config={k: plain(v) for k, v in trial.config.items()},
                value=None if value is None else float(value),
                epochs=int(last.get("training_iteration", 0)),
                status=str(trial.status),
            )
        )
    return sorted(rows, key=lambda r: r.trial_id)


def _parent_params(spec: SweepSpec, data: str) -> dict[str, Any]:
    return {
        "sweep": {
            "name": spec.name,
            "metric": spec.metric,
            "mode": spec.mode,
            "scheduler": spec.scheduler,
            "search": spec.search,
            "seed": spec.seed,
            "samples": spec.samples,
            "concurrency": spec.concurrency,
            "max_failures": spec.max_failures,
            "models": ",".join(spec.models),
            "data": data,
        },
        "space": {p.key: p.describe() for p in spec.parameters},
        "fixed": dict(spec.fixed),
    }


def _log_space_file(spec: SweepSpec, run_id: str, uri: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(spec.source).name
        path.write_text(spec.raw_text)
        (Path(tmp) / "resolved.json").write_text(
            json.dumps(_parent_params(spec, ""), indent=2, default=str)
        )
        tracking.log_artifacts(run_id, tmp, "sweep", uri=uri)


def _resolve_data(spec: SweepSpec, data: str | None) -> str:
    data = data or spec.data
    if not data:
        raise SpaceError(f"{spec.source}: data: no dataset; set 'data' in the file or pass --data")
    if is_remote(data):
        return data
    path = Path(data).expanduser().resolve()
    if not (path / "metadata" / "dataset.json").exists():
        raise SpaceError(
            f"{spec.source}: data: {path} is not a dataset (no metadata/dataset.json); pass --data"
        )
    return str(path)


def _resolve_name(spec: SweepSpec, storage: str, name: str | None, resume: bool) -> str:
    """``--name``, else ``<file name>-<timestamp>`` for a new sweep, or the newest such sweep
    under ``storage`` for ``--resume``. A new sweep never silently reuses an existing one."""
    if name is None and resume:
        existing = sorted(
            n
            for n in storage_dirs(storage)[1]
            if n.startswith(f"{spec.name}-") and _is_stamp(n[len(spec.name) + 1 :])
        )
        if not existing:
            raise SpaceError(
                f"--resume: no sweep named {spec.name}-<timestamp> under {storage}; pass --name"
            )
        name = existing[-1]
    name = name or f"{spec.name}-{time.strftime(STAMP)}"
    exists = tune.Tuner.can_restore(storage_join(storage, name))
    if resume and not exists:
        raise SpaceError(f"--resume: no sweep {name!r} under {storage} to continue")
    if not resume and exists:
        raise SpaceError(
            f"sweep {name!r} already exists under {storage}; add --resume to continue it"
        )
    return name


def _is_stamp(text: str) -> bool:
    try:
        time.strptime(text, STAMP)
        return True
    except ValueError:
        return False
