"""Jobs against a real Ray head: `ray job submit` of training and sweeps, retries, resume,
connection errors, and cluster.yaml through Ray's own validator.

One head per module, started like `make cluster-up` (token auth on) but on free ports, its own
temp dir and its own token file, so it never meets a developer's cluster; it is stopped at the
end. Jobs go through the Makefile's submit targets where they can, so those are tested too.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from chaos import WorkerKiller, first_checkpoint_under

from mirror import tracking
from mirror.cluster import Head, free_port, job_runtime_env, start_head, stop_head
from mirror.tune.sweep import FAILURES_TAG, TRIAL_TAG

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
JOB_TIMEOUT_S = 420
TINY_MODEL = {  # a few seconds per epoch on 2 cores
    "model.head_hidden": 16, "model.dx_emb_dim": 16, "model.wk_emb_dim": 8, "model.out_hidden": 32,
    "model.critic_hidden": 16, "model.critic_layers": 1, "model.cnn_channels": 4,
    "model.n_critic": 1, "model.n_critic_warmup": 1, "model.critic_warmup_steps": 0,
}  # fmt: skip
TINY_TRAIN = {
    "train.epochs": 1, "train.max_steps_per_epoch": 2, "train.batch_size": 64,
    "train.val_max_batches": 2, "train.eval_patients": 200, "train.n_generate": 50,
    "train.score_synthetic": False,
}  # fmt: skip

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Cluster:
    head: Head
    env: dict[str, str]  # a client's environment: token, dashboard address, tracking URI
    root: Path
    uri: str
    data: Path

    @property
    def storage(self) -> Path:
        return self.root / "ray_results"


def run(
    cmd: list[str], env: dict[str, str], timeout: float = JOB_TIMEOUT_S
) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def submit(cluster: Cluster, entrypoint: list[str], *extra: str) -> subprocess.CompletedProcess:
    runtime_env = json.dumps(job_runtime_env(cluster.uri))
    cmd = [RAY, "job", "submit", "--address", cluster.head.dashboard_url, "--working-dir", str(ROOT),
           "--runtime-env-json", runtime_env, *extra, "--", *entrypoint]  # fmt: skip
    return run(cmd, cluster.env)


def make(cluster: Cluster, target: str, **variables: str) -> subprocess.CompletedProcess:
    assigns = [f"{k}={v}" for k, v in {
        "RAY_ADDRESS": cluster.head.dashboard_url, "MLFLOW_TRACKING_URI": cluster.uri,
        "JOB_DATA": str(cluster.data), "JOB_STORAGE": str(cluster.storage), **variables,
    }.items()]  # fmt: skip
    # -o: never rebuild the venv from inside a test, whatever pyproject.toml's mtime says.
    return run(
        ["make", "--no-print-directory", "-o", ".venv/.installed", target, *assigns], cluster.env
    )


def pairs(overrides: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in overrides.items())


def write_space(cluster: Cluster, name: str, **changes) -> Path:
    raw = {
        "model": "wae",
        "fixed": {**TINY_MODEL, **TINY_TRAIN},
        "parameters": {"model.lam": {"space": "loguniform", "low": 0.1, "high": 10.0}},
        "metric": "val/loss",
        "mode": "min",
        "scheduler": "fifo",
        "samples": 2,
        "concurrency": 4,
        "resources": {"workers": 2, "cpus_per_worker": 0.5},
        "max_failures": 1,
        "evaluate": "none",
    }
    raw.update(changes)
    path = cluster.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in last, last


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Cluster:
    root = tmp_path_factory.mktemp("cluster")
    token_env = {"RAY_AUTH_TOKEN_PATH": str(root / "auth_token")}
    temp_dir = tempfile.mkdtemp(prefix="rmt", dir="/tmp")  # short: Ray's socket paths are limited
    head = start_head(
        num_cpus=5, port=free_port(), dashboard_port=free_port(), temp_dir=temp_dir, env=token_env
    )
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {**os.environ, **token_env, "RAY_AUTH_MODE": "token", "MLFLOW_TRACKING_URI": uri}
    env.pop("RAY_ADDRESS", None)
    try:
        data = root / "data"
        gen = Cluster(head, env, root, uri, data)
        result = submit(
            gen,
            ["python", "jobs/generate.py", "--patients", "2000", "--out", str(data), "--seed", "3"],
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        yield gen
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(config)  # the schema `ray up` checks, before defaults are merged
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert types[prepared["head_node_type"]]["resources"] == {"CPU": 0}
    assert types["gpu_worker"]["max_workers"] >= types["gpu_worker"]["min_workers"]
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert any("pip install" in c and "mirror" in c for c in config["setup_commands"])
    assert all(
        "RAY_AUTH_MODE=token" in c and "MLFLOW_TRACKING_URI" in c
        for c in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]
    )


def test_head_listens_on_loopback_only(cluster):
    """`make cluster-up` without RAY_EXPOSE: GCS, raylet and agent gRPC, Ray client, runtime-env
    agent, metrics export and dashboard all listen on 127.0.0.1, nothing on another address."""
    import ipaddress

    import psutil

    head = psutil.Process(cluster.head.pid)
    listening = []
    for proc in [head, *head.children(recursive=True)]:
        try:
            sockets = proc.net_connections(kind="inet")
            name = proc.name()
        except psutil.Error:  # a worker that exited meanwhile
            continue
        listening += [(name, s.laddr.ip, s.laddr.port) for s in sockets if s.status == psutil.CONN_LISTEN]
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, listening
    assert any(port == int(cluster.head.gcs_address.rpartition(":")[2]) for _, _, port in listening)
    exposed = []
    for name, ip, port in listening:
        address = ipaddress.ip_address(ip.split("%")[0])
        address = getattr(address, "ipv4_mapped", None) or address
        if not address.is_loopback:
            exposed.append((name, ip, port))
    assert not exposed, f"listening outside loopback: {exposed}"


def test_a_local_driver_runs_against_the_loopback_head(cluster):
    """`RAY_ADDRESS=127.0.0.1:<port>` (what `make cluster-up` prints for drivers) still works
    although the head's node IP is 127.0.0.1: ensure_ray puts the driver on loopback too."""
    code = (
        "import ray; from mirror.cluster import ensure_ray; ensure_ray(); "
        "print('answer', ray.get(ray.remote(lambda: 6 * 7).remote()))"
    )
    env = {**cluster.env, "RAY_ADDRESS": cluster.head.gcs_address}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    result = run([sys.executable, "-c", code], env, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "answer 42" in result.stdout


def test_job_imports_mirror_from_the_uploaded_copy_and_excludes_heavy_paths(cluster):
    probe = (
        "import mirror, mirror.data.schema, os; print('MIRROR_AT', mirror.__file__); "
        "print('VENV_UPLOADED', os.path.exists('.venv')); print('URI', os.environ['MLFLOW_TRACKING_URI'])"
    )
    result = submit(cluster, ["python", "-c", probe])
    assert result.returncode == 0, result.stderr
    lines = dict(
        line.split(" ", 1)
        for line in result.stdout.splitlines()
        if line.startswith(("MIRROR_AT", "VENV_UPLOADED", "URI"))
    )
    assert not lines["MIRROR_AT"].startswith(str(ROOT)), (
        "the job must not depend on this checkout's install"
    )
    assert lines["MIRROR_AT"].endswith("platform/mirror/__init__.py")
    assert lines["VENV_UPLOADED"] == "False"
    assert lines["URI"] == cluster.uri


def test_unreachable_address_and_missing_token_are_one_line_errors(cluster):
    closed = f"127.0.0.1:{free_port()}"
    check = [sys.executable, "-m", "mirror.cluster", "check", "--address"]
    assert_one_line_error(run([*check, f"http://{closed}"], cluster.env), "cannot reach", closed)
    no_token = {**cluster.env, "RAY_AUTH_TOKEN_PATH": str(cluster.root / "missing_token")}
    assert_one_line_error(
        run([*check, cluster.head.dashboard_url], no_token), "requires a token", "missing_token"
    )
    wrong = {**cluster.env, "RAY_AUTH_TOKEN": "0" * 64}
    assert_one_line_error(run([*check, cluster.head.dashboard_url], wrong), "rejected the token")

    space = write_space(cluster, "errors")
    sweep = [
        sys.executable,
        "jobs/sweep.py",
        str(space),
        "--data",
        str(cluster.data),
        "--storage-path",
        str(cluster.storage),
    ]
    assert_one_line_error(
        run(sweep, {**cluster.env, "RAY_ADDRESS": closed}), "cannot reach", closed
    )
    driver_no_token = {**no_token, "RAY_ADDRESS": cluster.head.gcs_address}
    assert_one_line_error(run(sweep, driver_no_token), "token", "missing_token")
    result = make(cluster, "submit-train", RAY_ADDRESS=f"http://{closed}")
    assert result.returncode != 0 and "error: cannot reach the Ray job server" in result.stderr


def test_submit_train_job_succeeds_and_logs_its_run(cluster):
    args = (
        f"--model wae --workers 2 --cpus-per-worker 0.5 --run-name job-train --no-eval "
        f"--set {pairs({**TINY_MODEL, **TINY_TRAIN})}"
    )  # evaluation has its own tests
    result = make(cluster, "submit-train", TRAIN_ARGS=args)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "succeeded" in result.stdout
    run_id = tracking.find_run("job-train", uri=cluster.uri)
    assert run_id is not None
    run = tracking.get_run(run_id, uri=cluster.uri)
    assert "val/loss" in run.data.metrics and run.data.params["train.workers"] == "2"


def trial_statuses(experiment_dir: Path) -> dict[str, str]:
    """Trial id -> status from Tune's newest experiment-state file."""
    states = sorted(experiment_dir.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except json.JSONDecodeError:  # being rewritten
        return {}
    trials = [json.loads(entry[0]) for entry in data["trial_data"]]
    return {t["trial_id"]: t["status"] for t in trials}


@dataclass(frozen=True)
class SweepLifecycle:
    parent: str
    finished_before_stop: set[str]  # trial ids TERMINATED when the first job was stopped
    runs_before: dict[str, Any]  # trial id -> MLflow child run, at the stop
    history_before: dict[str, list]  # trial id -> val/loss history, at the stop
    statuses_after: dict[str, str]
    resumed: subprocess.CompletedProcess
    killed_run: str | None  # the run name of the trial whose worker was killed


@pytest.fixture(scope="module")
def sweep_lifecycle(cluster) -> SweepLifecycle:
    """One 2-trial sweep of 2 epochs, one trial at a time. Once the first trial has stored its
    first epoch, one of its train workers is killed from outside (SIGKILL); with
    ``train.max_failures=0`` Ray Train hands the failure to Tune, which retries the trial. The
    first job is stopped as soon as one trial is recorded finished; ``make submit-sweep ...
    --resume`` then finishes it."""
    space = write_space(
        cluster, "lifecycle",
        fixed={**TINY_MODEL, **TINY_TRAIN, "train.epochs": 2, "train.max_failures": 0},
        parameters={"model.lam": {"space": "loguniform", "low": 0.1, "high": 10.0}},
        samples=2, concurrency=1,
        resources={"workers": 1, "cpus_per_worker": 1},  # DDP is covered by the train job
    )  # fmt: skip
    name = "lifecycle-sweep"
    entry = ["python", "jobs/sweep.py", str(space), "--name", name, "--data", str(cluster.data),
             "--storage-path", str(cluster.storage)]  # fmt: skip
    first_epoch_stored = first_checkpoint_under(cluster.storage, f"{name}-*/epoch_0000")
    with WorkerKiller(first_epoch_stored, cluster.head.temp_dir) as killer:
        first = submit(cluster, entry, "--submission-id", "lifecycle-first", "--no-wait")
        assert first.returncode == 0, first.stderr
        experiment = cluster.storage / name
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while "TERMINATED" not in trial_statuses(experiment).values():  # one finished, on disk
            assert time.monotonic() < deadline, "no trial finished"
            time.sleep(2)
    stop = run(
        [RAY, "job", "stop", "--address", cluster.head.dashboard_url, "lifecycle-first"],
        cluster.env,
    )
    assert stop.returncode == 0, stop.stderr
    finished = {t for t, s in trial_statuses(experiment).items() if s == "TERMINATED"}

    parent = tracking.find_run(name, uri=cluster.uri)
    runs = {
        c.data.tags[TRIAL_TAG]: c
        for c in tracking.child_runs(parent, uri=cluster.uri)
        if TRIAL_TAG in c.data.tags
    }
    history = {
        t: tracking.metric_history(runs[t].info.run_id, "val/loss", uri=cluster.uri)
        for t in finished
    }
    resumed = make(
        cluster, "submit-sweep", SWEEP_SPACE=str(space), SWEEP_ARGS=f"--name {name} --resume"
    )
    killed = killer.trigger.parent.name if killer.killed_pid else None
    return SweepLifecycle(parent, finished, runs, history, trial_statuses(experiment), resumed, killed)


def test_resumed_sweep_job_succeeds_without_rerunning_finished_trials(cluster, sweep_lifecycle):
    life = sweep_lifecycle
    assert life.resumed.returncode == 0, life.resumed.stdout[-4000:] + life.resumed.stderr[-2000:]
    assert "succeeded" in life.resumed.stdout
    assert len(life.finished_before_stop) == 1  # the other trial was still to run
    assert set(life.statuses_after.values()) == {"TERMINATED"} and len(life.statuses_after) == 2
    children = {
        c.data.tags[TRIAL_TAG]: c for c in tracking.child_runs(life.parent, uri=cluster.uri)
    }
    assert set(children) == set(life.statuses_after)
    for trial_id in life.finished_before_stop:  # not re-run: same run, no epoch logged again
        assert children[trial_id].info.run_id == life.runs_before[trial_id].info.run_id
        history = tracking.metric_history(
            children[trial_id].info.run_id, "val/loss", uri=cluster.uri
        )
        assert history == life.history_before[trial_id]


def test_a_trial_whose_worker_is_killed_is_retried_by_tune(cluster, sweep_lifecycle):
    assert sweep_lifecycle.killed_run is not None, "no train worker was killed"
    children = tracking.child_runs(sweep_lifecycle.parent, uri=cluster.uri)
    crashed = [c for c in children if c.data.tags["mirror.run_name"] == sweep_lifecycle.killed_run]
    assert len(crashed) == 1
    assert crashed[0].info.status == "FINISHED" and crashed[0].data.tags[FAILURES_TAG] == "1"
    assert crashed[0].data.metrics["epoch"] == 1.0  # it went on to finish both epochs


def test_sweep_parent_run_records_children_best_trial_and_plot(cluster, sweep_lifecycle):
    parent = sweep_lifecycle.parent
    children = tracking.child_runs(parent, uri=cluster.uri)
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    for child in children:  # the same params and metrics as a single training run
        assert {"model_config.lam", "train.epochs", "model"} <= set(child.data.params)
        assert "val/loss" in child.data.metrics
    run = tracking.get_run(parent, uri=cluster.uri)
    assert run.info.status == "FINISHED"
    assert run.data.tags["best.run_id"] in {c.info.run_id for c in children}
    assert json.loads(run.data.tags["best.config"]).keys() == {"model.lam"}
    assert run.data.metrics["best/val/loss"] == min(c.data.metrics["val/loss"] for c in children)
    assert "summary/plots/val_loss_vs_knobs.png" in tracking.list_artifacts(
        parent, "summary/plots", uri=cluster.uri
    )
    assert "sweep/lifecycle.yaml" in tracking.list_artifacts(parent, "sweep", uri=cluster.uri)
