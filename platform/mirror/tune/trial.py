"""What every trial shares, whatever its scheduler: its run name, its end-of-trial work, the
storage listing, and the plain trainable (:func:`run_trial`) that ASHA and FIFO run.

PBT's trainable (``mirror.tune.pbt``) and the sweep driver both build on these, so they live
below both and import neither.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mirror.storage import is_remote
from mirror.tune.spec import SweepSpec

if TYPE_CHECKING:
    from mirror.train.driver import TrainingOutcome
    from mirror.train.spec import RunSpec


def trial_run_name(sweep_name: str, trial_id: str) -> str:
    """Ray Train run name and MLflow run name of one trial: stable across restores."""
    return f"{sweep_name}-{trial_id}"


def run_trial(
    config: dict[str, Any], *, sweep: SweepSpec, data: str, parent_run_id: str, uri: str
) -> None:
    """One trial: the sampled knobs on top of the sweep's fixed overrides, trained by the same
    driver as a single run; metrics reach Tune through ``TuneReportCallback``."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from mirror.train.driver import run_training

    os.environ["MLFLOW_TRACKING_URI"] = uri  # Tune moves the trial into its own working dir
    trial_id = tune.get_context().get_trial_id()
    spec = sweep.trial_spec(config, data, trial_run_name(sweep.name, trial_id))
    outcome = run_training(spec, callbacks=[TuneReportCallback()], parent_run_id=parent_run_id)
    finish_trial(sweep, outcome, spec)


def finish_trial(sweep: SweepSpec, outcome: TrainingOutcome, spec: RunSpec) -> None:
    """End-of-trial work shared by every scheduler: evaluation when the file asks for it, with
    a generator's scorecard when the trial's ``train.score_synthetic`` asks for it (as
    ``jobs/train.py`` does: without it a generator's sweep records no fidelity at all)."""
    if sweep.evaluate == "all":
        from mirror.evaluation import evaluate_run

        run_outside_placement_group(evaluate_run, outcome.run_id, synthetic=spec.train.score_synthetic)


def run_outside_placement_group(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` as a Ray task outside the caller's placement group, waited for.
    Tune makes a trial's tasks inherit its group, whose one bundle (a fraction of a CPU: the
    trainer holds the rest) cannot host the scorecard's one-CPU shard scans. The task itself
    asks for no CPU: it runs when the trial's trainer has finished, and its scans queue for
    theirs."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    outside = PlacementGroupSchedulingStrategy(placement_group=None)
    return ray.get(ray.remote(fn).options(num_cpus=0, scheduling_strategy=outside, max_retries=0).remote(*args, **kwargs))


def storage_dirs(storage: str) -> tuple[Any, dict[str, str]]:
    """The storage path's filesystem and its subdirectories (name -> path on it), local or
    remote alike."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(storage if is_remote(storage) else Path(storage).as_uri())
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return fs, {Path(i.path).name: i.path for i in infos if i.type == pafs.FileType.Directory}
