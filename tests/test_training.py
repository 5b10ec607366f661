"""End to end on real Ray and a real sqlite MLflow store: DDP training with a worker crash,
resume by run name, evaluation, embedding export and sampling.

One small population, one run: the steps build on each other (module-scoped fixtures), which
keeps the whole file to a few minutes on a 2-core machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from chaos import WorkerKiller, current_session_dir, first_checkpoint_under

from mirror import tracking
from mirror.checkpoint import load_state
from mirror.data import schema
from mirror.data.simulator import generate_dataset
from mirror.metrics.evaluate import METRIC_NAMES
from mirror.models import get_model_spec
from mirror.train.driver import run_training
from mirror.train.spec import build_run_spec

pytestmark = pytest.mark.slow

SMALL_WAE = {
    "model.dx_emb_dim": 16,
    "model.wk_emb_dim": 8,
    "model.head_hidden": 16,
    "model.latent_dim": 8,
    "model.out_hidden": 32,
    "model.critic_hidden": 16,
    "model.n_critic_warmup": 2,
    "model.critic_warmup_steps": 1,
}
STEPS_PER_EPOCH = 3


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("training")
    data = root / "data"
    generate_dataset(data, 3000, seed=5, workers=2)
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    yield root, data
    mp.undo()


def spec_for(root, data, epochs: int, **extra):
    overrides = {
        **SMALL_WAE,
        "train.workers": 2,
        "train.epochs": epochs,
        "train.batch_size": 32,
        "train.eval_batch_size": 256,
        "train.max_steps_per_epoch": STEPS_PER_EPOCH,
        "train.storage_path": str(root / "ray_results"),
        "train.eval_patients": 200,
        "train.n_generate": 100,
        **extra,
    }
    return build_run_spec("wae", str(data), "crash-then-resume", overrides)


@pytest.fixture(scope="module")
def crashed_run(workdir):
    """2 workers, 2 epochs; once epoch 0 is checkpointed a worker process is killed from
    outside (SIGKILL), and the run recovers from that checkpoint."""
    root, data = workdir
    spec = spec_for(root, data, epochs=2, **{"train.max_failures": 1})
    first_epoch_stored = first_checkpoint_under(root / "ray_results", "crash-then-resume/epoch_0000")
    with WorkerKiller(first_epoch_stored, current_session_dir()) as killer:
        outcome = run_training(spec)
    return spec, outcome, killer


def test_worker_crash_resumes_from_checkpoint_and_finishes(crashed_run):
    _, outcome, killer = crashed_run
    assert killer.killed_pid is not None, "no train worker was killed"
    assert outcome.metrics["epoch"] == 1.0
    assert outcome.metrics["global_step"] == 2 * STEPS_PER_EPOCH
    epochs = [step for step, _ in tracking.metric_history(outcome.run_id, "val/loss")]
    assert sorted(set(epochs)) == [0, 1]


def test_ddp_ranks_end_with_identical_parameters(crashed_run):
    _, outcome, _ = crashed_run
    assert outcome.metrics["ddp/param_divergence"] == 0.0
    assert outcome.metrics["train/steps_per_rank"] == STEPS_PER_EPOCH


def test_wae_critic_weights_stay_within_clip(crashed_run):
    spec, outcome, _ = crashed_run
    state = load_state(outcome.checkpoint_path)
    clip = spec.model_config["clip"]
    critic = [v for k, v in state["model"].items() if k.startswith("critic.")]
    assert critic, "checkpoint has no critic parameters"
    assert max(float(t.abs().max()) for t in critic) <= clip + 1e-7


@pytest.fixture(scope="module")
def resumed_run(workdir, crashed_run):
    """The same run name with one more epoch: Ray resumes from the last checkpoint and MLflow
    logs into the same run."""
    root, data = workdir
    return run_training(spec_for(root, data, epochs=3))


def test_resume_by_run_name_continues_the_same_run(crashed_run, resumed_run):
    _, first, _ = crashed_run
    assert resumed_run.run_id == first.run_id
    assert resumed_run.metrics["epoch"] == 2.0
    assert resumed_run.metrics["global_step"] == 3 * STEPS_PER_EPOCH  # not retrained from 0
    epochs = [step for step, _ in tracking.metric_history(first.run_id, "val/loss")]
    assert sorted(set(epochs)) == [0, 1, 2]


@pytest.fixture(scope="module")
def evaluated(resumed_run):
    from mirror.evaluation import evaluate_run

    return resumed_run.run_id, evaluate_run(resumed_run.run_id)


def test_evaluation_logs_every_metric_and_artifact(evaluated, tmp_path):
    run_id, metrics = evaluated
    assert set(METRIC_NAMES) <= set(metrics)
    assert 0.0 <= metrics["privacy/mia/loss_auc"] <= 1.0  # white-box membership test
    run = tracking.get_run(run_id)
    assert set(METRIC_NAMES) <= set(run.data.metrics)
    assert run.data.tags["model"] == "wae" and run.data.tags["dataset.fingerprint"]
    assert run.data.params["model_config.lam"] == "10.0"
    # The registry's declared metric names (what sweeps are checked against) are really logged.
    assert set(get_model_spec("wae").metric_names) <= set(run.data.metrics)
    artifacts = {a.path for a in tracking.client().list_artifacts(run_id, "evaluation")}
    for name in ("config.json", "training_curve.png", "prevalence_scatter.png", "truth_by_factor.json"):
        assert f"evaluation/{name}" in artifacts
    # Simulated data: each of the simulator's named factors, from z and from the floor's counts.
    local = tracking.client().download_artifacts(run_id, "evaluation/truth_by_factor.json", str(tmp_path))
    by_factor = json.loads(Path(local).read_text())
    assert list(by_factor)[:2] == ["frailty", "cardiometabolic"]
    assert all(set(r) == {"z", "floor"} for r in by_factor.values())
    assert "evaluation/generated_sample.parquet" not in artifacts  # ungated model output
    assert "model" in tracking.logged_model_names(run_id)


def test_embedding_export_covers_every_patient(workdir, evaluated, tmp_path):
    from mirror.checkpoint import checkpoint_dir
    from mirror.embed import export_embeddings

    _, data = workdir
    run_id, _ = evaluated
    report = export_embeddings(str(checkpoint_dir(run_id)), data, tmp_path / "z", actors=1, batch_size=256)
    meta = schema.DatasetMetadata.read(data)
    assert report.patients == meta.patients
    assert report.latent_dim == SMALL_WAE["model.latent_dim"]
    table = pq.read_table(tmp_path / "z" / schema.TRAIN)
    assert table.num_rows == meta.patients[schema.TRAIN]
    real_ids = pq.read_table(schema.split_dir(data, schema.TRAIN), columns=["subject_id"]).column(0)
    assert sorted(table.column("subject_id").to_pylist()) == sorted(real_ids.to_pylist())
    z = torch.tensor(table.column("z").combine_chunks().flatten().to_numpy()).reshape(table.num_rows, -1)
    assert torch.isfinite(z).all()
