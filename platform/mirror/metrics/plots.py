"""Scorecard plots (matplotlib Agg, PNG), logged as run artifacts next to the metrics."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mirror.data.vocab import N_CONDITIONS  # noqa: E402
from mirror.metrics.fidelity import FidelitySummary  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _identity(ax: plt.Axes, values: np.ndarray) -> None:
    lo, hi = values.min(), values.max()
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--")


def prevalence_scatter(
    real: FidelitySummary, others: Mapping[str, FidelitySummary], path: Path
) -> Path:
    """Condition prevalence, real training (x) vs each other set (y), log-log."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    floor = 0.5 / max(real.n_patients, 1)
    x = np.maximum(real.prevalence, floor)
    for name, s in others.items():
        ax.scatter(x, np.maximum(s.prevalence, floor), s=6, alpha=0.6, label=name)
    _identity(ax, x)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="real training prevalence",
        ylabel="prevalence",
        title="Condition prevalence (patients)",
    )
    ax.legend(fontsize=8)
    return _save(fig, path)


def cooccurrence_scatter(real: FidelitySummary, syn: FidelitySummary, path: Path) -> Path:
    upper = np.triu_indices(N_CONDITIONS, k=1)
    p = real.cooccurrence[upper] / max(real.n_patients, 1)
    q = syn.cooccurrence[upper] / max(syn.n_patients, 1)
    keep = (p > 0) | (q > 0)
    floor = 0.5 / max(real.n_patients, 1)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.scatter(np.maximum(p[keep], floor), np.maximum(q[keep], floor), s=2, alpha=0.3)
    _identity(ax, np.maximum(p[keep], floor))
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="real pair prevalence",
        ylabel="synthetic pair prevalence",
        title="Condition co-occurrence",
    )
    return _save(fig, path)


def length_histograms(sets: Mapping[str, FidelitySummary], path: Path) -> Path:
    """Words and distinct conditions per patient: share of patients per unit of the quantity,
    in log-spaced bins (the tails span three orders of magnitude)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, attr, label in (
        (axes[0], "length_hist", "words per patient"),
        (axes[1], "distinct_hist", "distinct conditions per patient"),
    ):
        for name, s in sets.items():
            h = getattr(s, attr).astype(float)
            if h[1:].sum() == 0:
                continue
            edges = np.unique(np.round(np.logspace(0, np.log10(len(h)), 30)).astype(int))
            edges = np.append(edges[edges < len(h)], len(h))
            density = np.add.reduceat(h, edges[:-1]) / h.sum() / np.diff(edges)
            ax.stairs(density, edges, label=name)
        ax.set(xscale="log", yscale="log", xlabel=label, ylabel="share of patients per unit")
        ax.legend(fontsize=8)
    return _save(fig, path)


def dcr_distributions(distances: Mapping[str, np.ndarray], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    top = max((np.percentile(d, 99) for d in distances.values() if len(d)), default=1)
    bins = np.arange(0, max(top, 1) + 2) - 0.5 if top < 200 else 60
    for name, d in distances.items():
        ax.hist(np.minimum(d, top), bins=bins, histtype="step", density=True, label=name)
    ax.set(
        xlabel="Hamming distance to closest record (99th percentile cap)",
        ylabel="density",
        title="Distance to closest record",
    )
    ax.legend(fontsize=8)
    return _save(fig, path)
