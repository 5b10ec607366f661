"""The platform end to end on real data: the MIMIC-IV demo in MEDS imported, validated, a
short AE trained on it and evaluated (scorecard against its own held-out split). 100 patients
is tiny: this shows the path works on data nobody here wrote, not that the model is good."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from mirror import tracking
from mirror.data.meds_import import import_meds

REPO = Path(__file__).resolve().parents[1]
MEDS_DEMO = REPO.parent / "shared" / "fixtures" / "mimic-iv-demo-meds-0.0.1"
TINY_AE = ["model.dx_emb_dim=16", "model.wk_emb_dim=8", "model.head_hidden=16", "model.latent_dim=8",
           "model.out_hidden=32", "train.max_steps_per_epoch=2", "train.batch_size=16",
           "train.val_max_batches=1", "train.eval_patients=0", "train.n_generate=20"]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (MEDS_DEMO / "data").is_dir(), reason=f"real fixtures absent: {MEDS_DEMO} (see make fixtures)")]


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mimic_demo_import_validate_train_and_score(tmp_path, ray_cluster, monkeypatch):
    data = tmp_path / "mimic"
    report = import_meds(MEDS_DEMO, data)
    assert report.patients == {"train": 80, "tuning": 10, "held_out": 10}
    validate = subprocess.run([sys.executable, str(REPO / "jobs" / "validate.py"), str(data)],
                              capture_output=True, text=True, timeout=120)
    assert validate.returncode == 0, validate.stdout[-3000:]

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    rc = _job("train").main(["--model", "ae", "--data", str(data), "--workers", "1", "--cpus-per-worker", "1",
                             "--epochs", "1", "--storage-path", str(tmp_path / "ray_results"),
                             "--run-name", "mimic-ae", "--set", *TINY_AE])
    assert rc == 0
    run = tracking.get_run(tracking.find_run("mimic-ae", uri=uri), uri=uri)
    metrics = run.data.metrics
    assert "val/loss" in metrics
    # The evaluation ran on the held-out split, and the scorecard against the real data: on 100
    # patients some metrics are undefined (recorded with their reasons), the others are logged.
    assert any(k.startswith("fidelity/") for k in metrics), sorted(metrics)
    assert "privacy/gate_passed" in metrics
    # Undefined fidelity is reported (NaN, flag, reason tag), not fatal.
    reasons = run.data.tags.get("mirror.scorecard_undefined", "") + run.data.tags.get("mirror.scorecard_incomplete", "")
    assert "no age group has >= 100 real patients" in reasons
