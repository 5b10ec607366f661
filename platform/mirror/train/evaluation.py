"""End-of-run evaluation (``jobs/evaluate.py`` and the end of ``jobs/train.py``).

Loads the run's final checkpoint, fits the frequency baseline on ``train``, scores the model
and the baseline on the same ``held_out`` patients (``mirror.metrics.evaluate``), and logs
to the same MLflow run: every ``eval/...`` and ``baseline/...`` metric, the resolved config,
the training curve, a real-vs-synthetic prevalence scatter and the final model as an MLflow
PyTorch model. Generated sentences are logged as aggregates only (prevalence, lengths): this
evaluation runs no privacy gate, and per-patient model output leaves the platform only through
``jobs/sample.py``, behind it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from mirror import tracking  # noqa: E402
from mirror.cluster import ensure_ray  # noqa: E402
from mirror.data.collate import CollateConfig  # noqa: E402
from mirror.data.schema import GROUND_TRUTH_DIR, HELD_OUT, TRAIN, DatasetMetadata  # noqa: E402
from mirror.data.stream import iter_sequence_batches, read_split  # noqa: E402
from mirror.metrics.baselines import FrequencyBaseline  # noqa: E402
from mirror.metrics.evaluate import EvalConfig, EvalResult, evaluate_model  # noqa: E402
from mirror.metrics.privacy import membership_from_losses  # noqa: E402
from mirror.train.checkpoints import LoadedRun, load_run  # noqa: E402

BASELINE_TRAIN_PATIENTS = 50_000  # enough for stable word frequencies; counted in the run
NO_SAMPLE_NOTE = "not logged: per-patient output is released only by jobs/sample.py's privacy gate"


def evaluate_loaded(loaded: LoadedRun) -> EvalResult:
    spec, train = loaded.spec, loaded.spec.train
    meta = DatasetMetadata.read(spec.data)
    collate_config = CollateConfig(meta.n_weeks)  # unmasked: evaluation builds its own masks
    train_ds, _ = read_split(spec.data, TRAIN, min_words=train.min_words, max_words=train.max_words)
    baseline = FrequencyBaseline.fit(
        iter_sequence_batches(train_ds.limit(BASELINE_TRAIN_PATIENTS), train.eval_batch_size, config=collate_config),
        max_words=train.max_words,
    )
    held_out, _ = read_split(spec.data, HELD_OUT, min_words=train.min_words, max_words=train.max_words)
    if train.eval_patients:
        held_out = held_out.limit(train.eval_patients)
    ground_truth = spec.data if (Path(spec.data) / GROUND_TRUTH_DIR).exists() else None
    return evaluate_model(
        loaded.model,
        iter_sequence_batches(held_out, train.eval_batch_size, config=collate_config),
        data_info=loaded.data_info,
        baseline=baseline,
        ground_truth=ground_truth,
        config=EvalConfig(n_generate=train.n_generate, seed=train.seed),
    )


@torch.no_grad()
def patient_losses(model, batches, max_patients: int) -> np.ndarray:
    """Per-patient reconstruction NLL (``model.patient_nll``) of up to ``max_patients``."""
    losses: list[np.ndarray] = []
    seen = 0
    for batch in batches:
        losses.append(model.patient_nll(batch).float().cpu().numpy())
        seen += batch.size
        if seen >= max_patients:
            break
    return np.concatenate(losses)[:max_patients] if losses else np.zeros(0)


def white_box_membership(loaded: LoadedRun, n_patients: int) -> dict[str, float]:
    """Membership inference from the model's own loss: train members vs held-out non-members,
    the same number of each (the smaller split sets it), unmasked input."""
    spec, train = loaded.spec, loaded.spec.train
    config = CollateConfig(DatasetMetadata.read(spec.data).n_weeks)
    sides = []
    for split in (TRAIN, HELD_OUT):
        ds, _ = read_split(spec.data, split, min_words=train.min_words, max_words=train.max_words)
        sides.append(patient_losses(loaded.model, iter_sequence_batches(ds.limit(n_patients), train.eval_batch_size, config=config), n_patients))
    n = min(len(sides[0]), len(sides[1]))
    return membership_from_losses(sides[0][:n], sides[1][:n])


def training_curve(run_id: str, path: Path, uri: str | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("train/loss", "val/loss"):
        points = sorted(tracking.metric_history(run_id, key, uri=uri))
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (nats per token)")
    ax.legend()
    ax.set_title("training curve")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def prevalence_scatter(result: EvalResult, path: Path) -> Path:
    real = result.prevalence["real"]
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, marker in (("generated", "o"), ("baseline", "x")):
        if name in result.prevalence:
            ax.scatter(real, result.prevalence[name], s=8, marker=marker, alpha=0.6, label=name)
    top = float(max(real.max(initial=0), *(v.max(initial=0) for v in result.prevalence.values())))
    ax.plot([0, top], [0, top], color="grey", linewidth=0.8)
    ax.set_xlabel("real held-out prevalence")
    ax.set_ylabel("synthetic prevalence")
    ax.set_title("condition prevalence, real vs synthetic")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def evaluate_run(run_id: str, uri: str | None = None, log_model: bool = True) -> dict[str, float]:
    ensure_ray()
    uri = uri or tracking.tracking_uri()
    loaded = load_run(run_id, uri=uri)
    result = evaluate_loaded(loaded)
    membership = white_box_membership(loaded, loaded.spec.train.eval_patients or 5_000)
    tracking.log_metrics(run_id, {**result.metrics, **membership}, step=loaded.epoch, uri=uri)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "config.json").write_text(json.dumps(loaded.spec.to_dict(), indent=2, sort_keys=True) + "\n")
        notes = {**result.notes, "generated_sample": NO_SAMPLE_NOTE}
        (out / "eval_notes.json").write_text(json.dumps(notes, indent=2, sort_keys=True) + "\n")
        training_curve(run_id, out / "training_curve.png", uri=uri)
        prevalence_scatter(result, out / "prevalence_scatter.png")
        np.savez(out / "prevalence.npz", **result.prevalence)
        tracking.log_artifacts(run_id, out, "evaluation", uri=uri)
    if log_model:
        tracking.log_torch_model(run_id, loaded.model, uri=uri)
    tracking.end_run(run_id, uri=uri)
    return {**result.metrics, **membership}
