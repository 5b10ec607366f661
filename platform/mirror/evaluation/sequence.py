"""The evaluation suite of sequence decoders (the ``sequence_decoder`` capability).

Fits the frequency baseline on ``train``, scores the model and the baseline on the same
``held_out`` patients (``mirror.metrics.evaluate``: the four tasks of seed 000 and the latent
probes), runs the white-box membership test from per-patient NLL, and leaves its artifacts
(prevalence scatter and arrays, notes) in the folder it is given. Generated sentences are
kept as aggregates only (prevalence, lengths): this evaluation runs no privacy gate, and
per-patient model output leaves the platform only through ``jobs/sample.py``, behind it.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from mirror.checkpoint import LoadedRun  # noqa: E402
from mirror.data.schema import GROUND_TRUTH_DIR, HELD_OUT, TRAIN  # noqa: E402
from mirror.metrics.baselines import FrequencyBaseline  # noqa: E402
from mirror.metrics.evaluate import EvalConfig, EvalResult, evaluate_model  # noqa: E402
from mirror.metrics.privacy import membership_from_losses  # noqa: E402

BASELINE_TRAIN_PATIENTS = 50_000  # enough for stable word frequencies; counted in the run
NO_SAMPLE_NOTE = "not logged: per-patient output is released only by jobs/sample.py's privacy gate"


def evaluate_loaded(loaded: LoadedRun) -> EvalResult:
    """The model and the frequency baseline on the same held-out patients; batches unmasked
    (evaluation builds its own masks)."""
    spec, train, view = loaded.spec, loaded.spec.train, loaded.view()
    train_ds, _ = view.read(TRAIN)
    baseline = FrequencyBaseline.fit(
        view.batches(train_ds.limit(BASELINE_TRAIN_PATIENTS), train.eval_batch_size, training=False),
        max_words=loaded.data_info.max_words,
    )
    held_out, _ = view.read(HELD_OUT)
    if train.eval_patients:
        held_out = held_out.limit(train.eval_patients)
    ground_truth = spec.data if (Path(spec.data) / GROUND_TRUTH_DIR).exists() else None
    return evaluate_model(
        loaded.model,
        view.batches(held_out, train.eval_batch_size, training=False),
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
    train, view = loaded.spec.train, loaded.view()
    sides = []
    for split in (TRAIN, HELD_OUT):
        ds, _ = view.read(split)
        batches = view.batches(ds.limit(n_patients), train.eval_batch_size, training=False)
        sides.append(patient_losses(loaded.model, batches, n_patients))
    n = min(len(sides[0]), len(sides[1]))
    return membership_from_losses(sides[0][:n], sides[1][:n])


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


def sequence_suite(loaded: LoadedRun, artifacts: Path) -> dict[str, float]:
    """The four tasks and latent probes beside their floors, plus white-box membership."""
    result = evaluate_loaded(loaded)
    membership = white_box_membership(loaded, loaded.spec.train.eval_patients or 5_000)
    notes = {**result.notes, "generated_sample": NO_SAMPLE_NOTE}
    (artifacts / "eval_notes.json").write_text(json.dumps(notes, indent=2, sort_keys=True) + "\n")
    prevalence_scatter(result, artifacts / "prevalence_scatter.png")
    if result.truth_by_factor:  # which of the simulator's factors z recovers, beside the floor
        (artifacts / "truth_by_factor.json").write_text(json.dumps(result.truth_by_factor, indent=2) + "\n")
    np.savez(artifacts / "prevalence.npz", **result.prevalence)
    return {**result.metrics, **membership}
