"""Sweep driver pieces that need no cluster: concurrency from resources, search algorithms over
the file's space, and the parent-run summary in a real sqlite MLflow store. The sweeps
themselves run end to end, as Ray jobs, in test_cluster_jobs.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from mirror import tracking
from mirror.tune.report import TrialRow, best_trial, record_summary
from mirror.tune.schedulers import SCHEDULERS
from mirror.tune.space import SpaceError, load_sweep
from mirror.tune.sweep import (
    DATA_CPUS_PER_TRIAL,
    TRIAL_DRIVER_CPUS,
    _resolve_name,
    _searcher,
    max_concurrent_trials,
    trial_resources,
)

ROOT = Path(__file__).resolve().parents[1]


def sweep_file(tmp_path: Path, **changes) -> Path:
    raw = {
        "model": "wae",
        "fixed": {"train.epochs": 3},
        "parameters": {
            "model.latent_dim": {"space": "choice", "values": [16, 32, 64]},
            "model.lam": {"space": "loguniform", "low": 0.1, "high": 100.0},
        },
        "metric": "val/loss",
        "mode": "min",
        "samples": 4,
        "concurrency": 8,
        "resources": {"workers": 2, "cpus_per_worker": 1},
    }
    raw.update(changes)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_trial_resources_count_workers_reads_and_the_trial_itself(tmp_path):
    need = trial_resources(load_sweep(sweep_file(tmp_path)))
    assert need["CPU"] == pytest.approx(2 * 1 + DATA_CPUS_PER_TRIAL + TRIAL_DRIVER_CPUS)
    assert need["GPU"] == 0


def test_two_core_box_runs_one_trial_at_a_time(tmp_path):
    spec = load_sweep(sweep_file(tmp_path))
    assert max_concurrent_trials(spec, {"CPU": 4.0}) == (1, 1)


def test_gpu_cluster_concurrency_is_gpus_over_gpus_per_trial_capped_by_the_file(tmp_path):
    spec = load_sweep(sweep_file(tmp_path), resources={"gpu": True})
    assert max_concurrent_trials(spec, {"CPU": 192.0, "GPU": 16.0}) == (8, 8)
    capped = load_sweep(sweep_file(tmp_path, concurrency=3), resources={"gpu": True})
    assert max_concurrent_trials(capped, {"CPU": 192.0, "GPU": 16.0}) == (3, 8)


def test_nothing_fits_yet_keeps_the_file_concurrency_for_the_autoscaler(tmp_path):
    spec = load_sweep(sweep_file(tmp_path), resources={"gpu": True})
    assert max_concurrent_trials(spec, {"CPU": 8.0}) == (8, 0)


def test_asha_stops_on_epochs_and_defaults_max_t_to_train_epochs(tmp_path):
    spec = load_sweep(sweep_file(tmp_path, scheduler={"type": "asha", "grace_period": 1}))
    asha = SCHEDULERS[spec.scheduler].build(spec, 3)
    assert type(asha).__name__ == "AsyncHyperBandScheduler"
    assert asha._time_attr == "training_iteration" and asha._max_t == 3


def test_optuna_suggests_configs_inside_the_file_space(tmp_path):
    spec = load_sweep(sweep_file(tmp_path, search={"type": "optuna", "seed": 1}))
    searcher = _searcher(spec, concurrency=2)
    assert searcher.max_concurrent == 2
    assert searcher.set_search_properties(spec.metric, spec.mode, spec.param_space())
    for i in range(4):
        config = searcher.suggest(f"trial_{i}")
        assert config["model.latent_dim"] in (16, 32, 64)
        assert 0.1 <= config["model.lam"] <= 100.0
        searcher.on_trial_complete(f"trial_{i}", {"val/loss": 2.0 - 0.1 * i})


def test_best_trial_respects_mode_and_skips_missing_values():
    rows = [
        TrialRow("a", "r1", {"model.lam": 1.0}, 2.0, 3, "TERMINATED"),
        TrialRow("b", "r2", {"model.lam": 2.0}, float("nan"), 1, "TERMINATED"),
        TrialRow("c", "r3", {"model.lam": 3.0}, 1.5, 3, "TERMINATED"),
        TrialRow("d", None, {"model.lam": 4.0}, None, 0, "ERROR"),
    ]
    assert best_trial(rows, "min").trial_id == "c"
    assert best_trial(rows, "max").trial_id == "a"
    assert best_trial(rows[3:], "min") is None


def test_parent_run_records_best_trial_table_and_knob_plot(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = load_sweep(sweep_file(tmp_path))
    parent = tracking.start_run("sweep-x", params={}, tags={}, experiment="test-sweep", uri=uri)
    rows = []
    for i, (dim, lam, value) in enumerate([(16, 0.3, 2.1), (32, 3.0, 1.7), (64, 30.0, 1.9)]):
        child = tracking.start_run(
            f"sweep-x-t{i}",
            params={},
            tags={},
            experiment="test-sweep",
            parent_run_id=parent,
            uri=uri,
        )
        rows.append(
            TrialRow(
                f"t{i}", child, {"model.latent_dim": dim, "model.lam": lam}, value, 3, "TERMINATED"
            )
        )

    best = record_summary(spec, rows, parent, uri)

    assert best.trial_id == "t1"
    run = tracking.get_run(parent, uri=uri)
    assert run.data.tags["best.run_id"] == rows[1].run_id
    assert json.loads(run.data.tags["best.config"]) == {"model.latent_dim": 32, "model.lam": 3.0}
    assert math.isclose(run.data.metrics["best/val/loss"], 1.7)
    assert run.data.metrics["sweep/trials"] == 3
    assert [r.info.run_id for r in tracking.child_runs(parent, uri=uri)] == [r.run_id for r in rows]
    assert "summary/plots/val_loss_vs_knobs.png" in tracking.list_artifacts(
        parent, "summary/plots", uri=uri
    )
    png = tracking.download_artifacts(
        parent, "summary/plots/val_loss_vs_knobs.png", tmp_path / "dl", uri=uri
    )
    assert png.read_bytes()[:4] == b"\x89PNG"
    table = tracking.download_artifacts(
        parent, "summary/trials.csv", tmp_path / "dl", uri=uri
    ).read_text()
    assert (
        table.splitlines()[0] == "trial_id,run_id,status,epochs,val/loss,model.latent_dim,model.lam"
    )
    assert len(table.splitlines()) == 4


def test_a_reopened_run_gets_the_params_a_stopped_job_never_logged(tmp_path):
    """A sweep stopped between creating a trial's run and logging its params (CI saw it) left
    the resumed trial's run with two params for good; reopening now fills in what is missing
    and leaves what was logged alone."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    experiment = client.create_experiment("test-reopen")
    stopped = client.create_run(experiment, tags={tracking.RUN_NAME_TAG: "trial-0"})
    tracking.log_params(stopped.info.run_id, {"data": "d", "model": "wae"}, uri=uri)

    params = {"data": "d", "model": "wae", "model_config": {"lam": 0.5}, "train": {"epochs": 2}}
    reopened = tracking.start_run("trial-0", params=params, tags={}, experiment="test-reopen", uri=uri)

    assert reopened == stopped.info.run_id
    assert client.get_run(reopened).data.params == {
        "data": "d", "model": "wae", "model_config.lam": "0.5", "train.epochs": "2"
    }  # fmt: skip


def test_resume_without_an_existing_sweep_is_an_error(tmp_path):
    spec = load_sweep(sweep_file(tmp_path))
    with pytest.raises(SpaceError, match="--resume: no sweep named s-<timestamp>"):
        _resolve_name(spec, str(tmp_path / "storage"), None, resume=True)
    with pytest.raises(SpaceError, match="no sweep 'mine'"):
        _resolve_name(spec, str(tmp_path / "storage"), "mine", resume=True)


def test_new_sweep_names_carry_the_file_name_and_a_timestamp(tmp_path):
    spec = load_sweep(sweep_file(tmp_path))
    name = _resolve_name(spec, str(tmp_path / "storage"), None, resume=False)
    assert name.startswith("s-") and len(name) == len("s-20260101-000000")
