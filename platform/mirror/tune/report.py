"""The sweep's parent-run summary: the best trial, a table of every trial, and one plot of the
metric against each knob, all recorded on the parent MLflow run.

Kept apart from the Tuner so it runs on plain rows (``TrialRow``), which the Tuner builds
from Tune's ``ResultGrid`` and which tests can build by hand.
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirror import tracking
from mirror.tune.spec import Parameter, SweepSpec

BEST_TAG = "best"  # parent tags: best.run_id, best.trial_id, best.config, best.<knob>


@dataclass(frozen=True)
class TrialRow:
    """One trial as the summary sees it: its knobs, child run, last metric and status."""

    trial_id: str
    run_id: str | None  # the nested MLflow run (None if the trial failed before creating it)
    config: dict[str, Any]  # sampled knobs, dotted keys
    value: float | None  # the sweep metric at the trial's last reported epoch
    epochs: int  # epochs reported (fewer than train.epochs when ASHA stopped it)
    status: str  # TERMINATED | ERROR


def best_trial(rows: Sequence[TrialRow], mode: str) -> TrialRow | None:
    """The trial with the best finite last-epoch metric; None if no trial reported one."""
    scored = [r for r in rows if r.value is not None and math.isfinite(r.value)]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored, key=lambda r: r.value)


def record_summary(
    spec: SweepSpec, rows: Sequence[TrialRow], parent_run_id: str, uri: str
) -> TrialRow | None:
    """Log the best trial (run id, value, config), ``trials.csv`` and the knob plots."""
    best = best_trial(rows, spec.mode)
    metric_key = f"best/{spec.metric}"
    counts = {
        "sweep/trials": float(len(rows)),
        "sweep/errors": float(sum(r.status == "ERROR" for r in rows)),
    }
    tags = {f"{BEST_TAG}.run_id": "none"}
    if best is not None:
        counts[metric_key] = float(best.value)
        tags = {
            f"{BEST_TAG}.run_id": best.run_id or "unknown",
            f"{BEST_TAG}.trial_id": best.trial_id,
            f"{BEST_TAG}.{spec.metric}": repr(best.value),
            f"{BEST_TAG}.config": json.dumps(best.config, sort_keys=True),
            **{f"{BEST_TAG}.{k}": str(v) for k, v in best.config.items()},
        }
    tracking.log_metrics(parent_run_id, counts, uri=uri)
    tracking.set_tags(parent_run_id, tags, uri=uri)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        write_table(rows, spec, out / "trials.csv")
        (out / "best_config.json").write_text(
            json.dumps(
                None
                if best is None
                else {
                    "trial_id": best.trial_id,
                    "run_id": best.run_id,
                    spec.metric: best.value,
                    "config": best.config,
                },
                indent=2,
            )
        )
        plot_dir = out / "plots"
        plot_dir.mkdir()
        plot_knobs(rows, spec, best, plot_dir / f"{_slug(spec.metric)}_vs_knobs.png")
        tracking.log_artifacts(parent_run_id, out, "summary", uri=uri)
    return best


def write_table(rows: Sequence[TrialRow], spec: SweepSpec, path: Path) -> None:
    keys = [p.key for p in spec.parameters]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trial_id", "run_id", "status", "epochs", spec.metric, *keys])
        for r in rows:
            writer.writerow(
                [
                    r.trial_id,
                    r.run_id,
                    r.status,
                    r.epochs,
                    r.value,
                    *(r.config.get(k) for k in keys),
                ]
            )


def plot_knobs(
    rows: Sequence[TrialRow], spec: SweepSpec, best: TrialRow | None, path: Path
) -> None:
    """One panel per knob: the metric of every trial against that knob's value, best in red.
    Choices and grids are categorical axes; ranges are numeric (log-scaled for loguniform)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = list(spec.parameters)
    scored = [r for r in rows if r.value is not None and math.isfinite(r.value)]
    cols = min(3, max(1, len(params)))
    rows_n = max(1, math.ceil(len(params) / cols))
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.4 * rows_n), squeeze=False)
    flat = list(axes.flat)
    for ax, param in zip(flat, params, strict=False):
        _panel(ax, param, scored, best, spec.metric)
    for ax in flat[len(params) :]:
        ax.axis("off")
    if not params:
        flat[0].text(0.5, 0.5, "no searched parameters", ha="center", va="center")
    fig.suptitle(f"{spec.name}: {spec.metric} ({spec.mode}) per trial, last reported epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _panel(
    ax: Any, param: Parameter, rows: Sequence[TrialRow], best: TrialRow | None, metric: str
) -> None:
    categorical = param.space in ("choice", "grid")
    labels = [str(v) for v in param.values]

    def x_of(row: TrialRow) -> float:
        value = row.config.get(param.key)
        return float(labels.index(str(value))) if categorical else float(value)

    xs = [x_of(r) for r in rows]
    ys = [r.value for r in rows]
    ax.scatter(xs, ys, s=28, alpha=0.75, color="tab:blue", label="trial")
    if best is not None and best in rows:
        ax.scatter([x_of(best)], [best.value], s=70, color="tab:red", marker="*", label="best")
    if categorical:
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlim(-0.5, len(labels) - 0.5)
    elif param.log_scale:
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ax.set_xlim(param.low / 1.3, param.high * 1.3)
        ax.xaxis.set_minor_formatter(NullFormatter())  # decade labels only; minor ones collide
    ax.set_xlabel(param.key)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)
