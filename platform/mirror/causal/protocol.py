"""Seed 003's evaluation protocol: no-Δ vs Δ-augmentation vs Δ-pretraining, GRU and LSTM (and
the GLM with and without Δ), per task and look-back, over seeded repeated train/test draws at
several training sample sizes; a one-sided paired t-test across draws marks the table.

Why in-process trials, as one Ray task per (sample size, draw), and not a ``TorchTrainer`` per
cell: the grid is hundreds of tiny fits (250-5,000 patients, a hidden size of 32), each well
under a second of CPU; a DDP trainer per fit would spend ~30 s starting workers and datasets
for each, so the whole protocol would take hours instead of minutes. The models are the
registry's own (``causal_rnn_delta`` and ``causal_rnn``, built with ``build_model``) and the
examples are the ``windows`` view's (``read_rows`` -> ``patient_windows`` ->
``window_examples``), so the protocol measures exactly what ``jobs/train.py`` trains.

Draws: the training patients of a draw are ``size`` patients sampled (seeded) from a pool of the
training split (``val_fraction`` of them held back for early stopping, the same ones for every
fit of the draw), the test patients ``test_patients`` sampled from the held-out split (from up
to twice as many, so test sets differ between draws too); every cell of a draw sees the same
patients (the pairing of the t-test). Test patients never served as
PSM controls (the estimator's pool is the training split). Pretraining (stage 1, Δ_{t+1} from
X_{<=t}) uses the draw's training patients only, once per (cell, look-back), shared by the
tasks; each fine-tune starts from a copy of it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from mirror.config import require
from mirror.data.views.windows import (
    LAB_SCALE,
    LAB_SHORTS,
    LAB_TARGET_SHORTS,
    LAB_TARGETS,
    ONSET_TARGETS,
)

MODES = ("none", "augment", "pretrain")
GLM_MODES = ("none", "augment")
# Per lab target, lab units² per scaled unit² (MSE is reported in the lab's units).
_MSE_UNIT = {t: float(LAB_SCALE[LAB_SHORTS.index(s)] ** 2) for t, s in zip(LAB_TARGETS, LAB_TARGET_SHORTS, strict=True)}


@dataclass(frozen=True)
class ProtocolConfig:
    """The grid and the per-fit budget (``jobs/causal_protocol.py`` flags)."""

    delta: str = "psm"  # Δ column set (jobs/estimate_delta.py --name)
    sizes: tuple[int, ...] = (250, 1000, 5000)  # training patients per draw
    splits: tuple[int, ...] = (5,)  # seeded draws (the t-test's pairs): one count for every size, or one per size
    tasks: tuple[str, ...] = (*ONSET_TARGETS, "next_ldl")
    lookbacks: tuple[int, ...] = (1, 3)
    cells: tuple[str, ...] = ("gru", "lstm")
    modes: tuple[str, ...] = MODES  # RNN modes fitted; no-Δ always (every test pairs with it)
    glm: bool = True  # the GLM rows, without and with Δ
    pool_patients: int = 20_000  # training-split patients the draws are taken from
    test_patients: int = 2_000  # held-out patients per draw
    hidden: int = 32
    steps: int = 1_000  # optimizer steps per fit (each stage), at most
    eval_every: int = 25  # steps between validation checks (early stopping)
    patience: int = 6  # checks without a better validation loss before stopping
    val_fraction: float = 0.2  # of a draw's training patients, for early stopping
    batch_size: int = 128
    lr: float = 3e-3
    window_weeks: int = 52
    seed: int = 0

    def __post_init__(self) -> None:
        require(self, "sizes", len(self.sizes) > 0 and min(self.sizes) >= 2, "sample sizes >= 2")
        require(self, "splits", len(self.splits) in (1, len(self.sizes)) and min(self.splits) >= 2,
                f"one count, or one per size ({len(self.sizes)}), each >= 2 (a paired t-test needs two draws)")
        require(self, "tasks", set(self.tasks) <= {*ONSET_TARGETS, *LAB_TARGETS}, f"tasks of {ONSET_TARGETS + LAB_TARGETS}")
        require(self, "cells", set(self.cells) <= {"gru", "lstm"}, "gru and/or lstm (the GLM: --glm)")
        require(self, "modes", "none" in self.modes and set(self.modes) <= set(MODES), f"'none' and any of {MODES[1:]}")
        require(self, "lookbacks", len(self.lookbacks) > 0 and min(self.lookbacks) >= 1, "look-backs >= 1")
        require(self, "pool_patients", self.pool_patients >= max(self.sizes), f"at least the largest size, {max(self.sizes)}")
        require(self, "steps", self.steps >= 1, "an int >= 1")
        require(self, "val_fraction", 0 < self.val_fraction < 1, "a fraction in (0, 1)")

    def draws_at(self, size: int) -> int:
        """Seeded draws at ``size``. Per-size counts are for the size trend, whose power lives at
        the small sizes: a draw's gain varies ~10x more at 250 patients than at 5,000."""
        return self.splits[0] if len(self.splits) == 1 else self.splits[self.sizes.index(size)]

    def as_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


# --------------------------------------------------------------------------------------------
# Examples of a pool of patients, in memory (a pool is thousands of patients, never a split)


@dataclass
class Pool:
    """Window examples of ``n_patients`` patients at the largest look-back; ``patient`` maps
    each example to its patient (0..n_patients-1)."""

    arrays: dict[str, np.ndarray]
    patient: np.ndarray
    n_patients: int
    patients_read: int  # including those without an example (under two full windows)

    def select(self, patients: np.ndarray) -> dict[str, np.ndarray]:
        keep = np.isin(self.patient, patients)
        return {k: v[keep] for k, v in self.arrays.items()}


def load_pool(root: str, split: str, delta: str, n_patients: int, lookback: int, window_weeks: int,
              at_least: int | None = None) -> Pool:
    """The first ``n_patients`` patients (in subject-id order) of ``split`` that have at least one
    example, read through the windows view's validated reader with Δ joined; fewer are accepted
    down to ``at_least`` (default: exactly ``n_patients``)."""
    import ray.data

    from mirror.data.views.windows import patient_windows, read_rows, window_examples

    ray.data.DataContext.get_current().execution_options.preserve_order = True  # the same pool every run
    parts: list[dict[str, np.ndarray]] = []
    owners: list[np.ndarray] = []
    taken = read = 0
    for table in read_rows(root, split, delta=delta).iter_batches(batch_format="pyarrow", batch_size=4096):
        windows = patient_windows(table, window_weeks)
        examples = window_examples(windows, table.column("subject_id").to_numpy(), lookback, table)
        # patients with an example, in row order; keep them until the pool is full
        row_of = windows.owner[np.flatnonzero(windows.index <= windows.n_windows[windows.owner] - 2)]
        rows = np.unique(row_of)[: n_patients - taken]
        keep = np.isin(row_of, rows)
        read += int(rows.max()) + 1 if len(rows) and taken + len(rows) == n_patients else table.num_rows
        remap = np.full(table.num_rows, -1, np.int64)
        remap[rows] = taken + np.arange(len(rows))
        parts.append({k: v[keep] for k, v in examples.items()})
        owners.append(remap[row_of[keep]])
        taken += len(rows)
        if taken >= n_patients:
            break
    if taken < (n_patients if at_least is None else at_least):
        raise ValueError(f"{root}: split {split!r} has {taken} patients with two or more full windows; "
                         f"the protocol asked for {n_patients if at_least is None else at_least} "
                         "(lower --pool-patients / --test-patients)")
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return Pool(arrays, np.concatenate(owners), taken, read)


# --------------------------------------------------------------------------------------------
# One draw: every cell of the grid on the same training and test patients


def _batch(arrays: dict[str, np.ndarray], rows: np.ndarray | slice, lookback: int):
    import torch

    from mirror.data.views.windows import WindowBatch

    out = {}
    for name, arr in arrays.items():
        part = arr[rows]
        if name in ("x", "delta_in"):
            part = part[:, -lookback:]
        out[name] = torch.from_numpy(np.ascontiguousarray(part))
    return WindowBatch(**out)


def _fit(model, train: dict[str, np.ndarray], val: dict[str, np.ndarray], lookback: int, config: ProtocolConfig,
         rng: np.random.Generator) -> int:
    """Adam on random mini-batches (the model's own loss, per example) for at most
    ``config.steps`` steps, stopped early on the validation loss (checked every
    ``config.eval_every`` steps, ``config.patience`` checks without a gain); the best weights are
    kept. Returns the steps taken."""
    import copy

    import torch

    optimizer = model.make_optimizers()["model"]
    n = len(train["window"])
    val_batch = _batch(val, slice(None), lookback)

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(model(val_batch)["loss"]) / max(val_batch.size, 1)

    best, best_state, since, step = val_loss(), copy.deepcopy(model.state_dict()), 0, 0
    while step < config.steps and since < config.patience:
        model.train()
        for _ in range(config.eval_every):
            batch = _batch(train, rng.integers(0, n, min(config.batch_size, n)), lookback)
            loss = model(batch)["loss"] / batch.size
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        step += config.eval_every
        current = val_loss()
        if current < best:
            best, best_state, since = current, copy.deepcopy(model.state_dict()), 0
        else:
            since += 1
    model.load_state_dict(best_state)
    model.eval()
    return step


def _task_metrics(score: np.ndarray, target: np.ndarray, task: str) -> dict[str, float]:
    """AUROC/AUPRC with the positives (and, when defined, the prevalence) of an onset task;
    the MSE in the lab's reporting unit for a lab task."""
    from mirror.evaluation.scores import binary_metrics

    if task in ONSET_TARGETS:
        out = binary_metrics(score, target) | {"positives": float(target.sum())}
        return out if np.isnan(out["auroc"]) else out | {"prevalence": float(target.mean())}
    return {"mse": float(np.mean((score - target) ** 2)) * _MSE_UNIT[task]}


def _score(model, arrays: dict[str, np.ndarray], lookback: int, task: str) -> dict[str, float]:
    import torch

    with torch.no_grad():
        pred = model.predict(_batch(arrays, slice(None), lookback))[task]
    seen = pred.observed.bool().numpy()
    return _task_metrics(pred.score.double().numpy()[seen], pred.target.double().numpy()[seen], task)


def _task_rows(arrays: dict[str, np.ndarray], task: str) -> tuple[np.ndarray, np.ndarray]:
    """Which examples count for ``task`` (at risk, or lab measured) and their targets."""
    if task in ONSET_TARGETS:
        k = ONSET_TARGETS.index(task)
        return arrays["at_risk"][:, k], arrays["onset"][:, k]
    k = LAB_TARGETS.index(task)
    return arrays["lab_observed"][:, k], arrays["lab_target"][:, k]


def _glm_score(train: dict[str, np.ndarray], test: dict[str, np.ndarray], task: str, augment: bool) -> dict[str, float]:
    """The paper's GLM rows: logistic (onsets) or ridge (labs) regression, scikit-learn, on the
    last window's features, with Δ_t appended in ``augment``; standardised inputs."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def features(a: dict[str, np.ndarray]) -> np.ndarray:
        return np.c_[a["x"][:, -1], a["delta_in"][:, -1]] if augment else a["x"][:, -1]

    seen, target = _task_rows(train, task)
    test_seen, test_target = _task_rows(test, task)
    y, y_test = target[seen], test_target[test_seen]
    if task in ONSET_TARGETS:
        if len(np.unique(y)) < 2 or len(np.unique(y_test)) < 2:
            return {"auroc": float("nan"), "auprc": float("nan"), "positives": float(y_test.sum())}
        glm = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(features(train)[seen], y)
        return _task_metrics(glm.predict_proba(features(test)[test_seen])[:, 1], y_test, task)
    glm = make_pipeline(StandardScaler(), Ridge(alpha=1.0)).fit(features(train)[seen], y)
    return _task_metrics(glm.predict(features(test)[test_seen]), y_test, task)


def _base_rates(train: dict[str, np.ndarray]):
    """Each onset's rate among the at-risk and each lab target's mean, over a draw's training
    examples (the predictors' starting output biases)."""
    import torch

    at_risk, observed = train["at_risk"], train["lab_observed"]
    rate = (train["onset"] * at_risk).sum(0) / np.maximum(at_risk.sum(0), 1)
    mean = (train["lab_target"] * observed).sum(0) / np.maximum(observed.sum(0), 1)
    return torch.as_tensor(rate, dtype=torch.float32), torch.as_tensor(mean, dtype=torch.float32)


def _mean_floor(train: dict[str, np.ndarray], test: dict[str, np.ndarray], task: str) -> float:
    """MSE of predicting the training patients' mean (the floor of a lab task), lab units²."""
    k = LAB_TARGETS.index(task)
    mean = train["lab_target"][train["lab_observed"][:, k], k].mean()
    seen = test["lab_observed"][:, k]
    return float(np.mean((test["lab_target"][seen, k] - mean) ** 2)) * _MSE_UNIT[task]


def grid_cells(config: ProtocolConfig) -> Iterator[tuple[str, str]]:
    """(cell, mode) of every fit per task and look-back: RNNs in the three modes, the GLM in two
    (fitted by scikit-learn on the last window, not by Adam: a GLM has a well-posed optimum, and
    a few hundred Adam steps from a zero intercept do not reach it at a 1% prevalence)."""
    for cell in config.cells:
        for mode in MODES:
            if mode in config.modes:
                yield cell, mode
    if config.glm:
        for mode in GLM_MODES:
            yield "glm", mode


def draw_patients(train_pool: Pool, test_pool: Pool, size: int, split: int, config: ProtocolConfig
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The (train, val, test) examples of draw ``split`` at ``size`` training patients, seeded by
    (seed, size, split): the same patients for every fit of the draw, and for any other
    measurement on the protocol's draws (bench/causal_rnn_fit.py)."""
    rng = np.random.default_rng([config.seed, size, split])
    drawn = rng.choice(train_pool.n_patients, size, replace=False)
    n_val = max(1, int(round(config.val_fraction * size)))
    train, val = train_pool.select(drawn[n_val:]), train_pool.select(drawn[:n_val])
    test = test_pool.select(rng.choice(test_pool.n_patients, min(config.test_patients, test_pool.n_patients), replace=False))
    return train, val, test


def run_draw(train_pool: Pool, test_pool: Pool, size: int, split: int, config: ProtocolConfig) -> list[dict[str, Any]]:
    """Every (look-back, cell, mode, task) of one draw; one row per fit."""
    import torch

    from mirror.data.views.windows import WindowsInfo
    from mirror.models import build_model

    torch.set_num_threads(1)
    train, val, test = draw_patients(train_pool, test_pool, size, split, config)
    rows: list[dict[str, Any]] = []
    common = {"size": size, "split": split, "train_examples": len(train["window"]), "val_examples": len(val["window"]),
              "test_examples": len(test["window"])}
    base_rates = _base_rates(train)
    for lookback in config.lookbacks:
        info = WindowsInfo(lookback=lookback, has_delta=True)
        stage1: dict[str, Any] = {}
        for cell in config.cells if "pretrain" in config.modes else ():  # stage 1 once per (cell, look-back), shared by the tasks
            torch.manual_seed(config.seed * 1000 + split)
            started = time.perf_counter()
            model = build_model("causal_rnn_delta", {"cell": cell, "hidden": config.hidden, "lr": config.lr}, info)
            steps = _fit(model, train, val, lookback, config, np.random.default_rng([config.seed, split, 1]))
            stage1[cell] = (model, time.perf_counter() - started, steps)
        for task in config.tasks:
            floor = {"mean_mse": _mean_floor(train, test, task)} if task in LAB_TARGETS else {}
            for cell, mode in grid_cells(config):
                started = time.perf_counter()
                if cell == "glm":  # closed-form-ish fits (scikit-learn), as the paper's GLMs
                    rows.append({**common, "task": task, "lookback": lookback, "cell": cell, "mode": mode,
                                 **_glm_score(train, test, task, mode == "augment"), **floor, "steps": 0,
                                 "pretrain_steps": 0, "seconds": time.perf_counter() - started})
                    continue
                torch.manual_seed(config.seed * 1000 + split)  # every mode starts from the same head
                upstream = stage1[cell][0] if mode == "pretrain" else None
                model = build_model("causal_rnn", {"cell": cell, "mode": mode, "task": task, "hidden": config.hidden,
                                                   "lr": config.lr}, info, upstream=upstream)
                model.start_at_base_rates(*base_rates)
                steps = _fit(model, train, val, lookback, config, np.random.default_rng([config.seed, split, 2]))
                seconds = time.perf_counter() - started + (stage1[cell][1] if upstream is not None else 0.0)
                rows.append({**common, "task": task, "lookback": lookback, "cell": cell, "mode": mode,
                             **_score(model, test, lookback, task), **floor, "steps": steps,
                             "pretrain_steps": stage1[cell][2] if upstream is not None else 0, "seconds": seconds})
    return rows


# --------------------------------------------------------------------------------------------
# The paper-shaped table


def metric_of(task: str) -> tuple[str, bool]:
    """The table's metric of a task and whether higher is better."""
    return ("auroc", True) if task in ONSET_TARGETS else ("mse", False)


@dataclass
class ResultsTable:
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per (size, task, look-back)
    tests: list[dict[str, Any]] = field(default_factory=list)  # one per (size, task, look-back, cell, mode != none)


def _by_draw(trials: list[dict[str, Any]]) -> dict[tuple, dict[int, float]]:
    """(size, task, look-back, cell, mode) -> draw (split) -> the task's metric."""
    by: dict[tuple, dict[int, float]] = {}
    for r in trials:
        metric, _ = metric_of(r["task"])
        by.setdefault((r["size"], r["task"], r["lookback"], r["cell"], r["mode"]), {})[r["split"]] = r[metric]
    return by


def _paired(by: dict[tuple, dict[int, float]], size: int, task: str, lookback: int, cell: str, mode: str
            ) -> tuple[list[int], np.ndarray, np.ndarray]:
    """The draws where both ``mode`` and no-Δ have a number, with their two metrics: a NaN fit
    drops its own pair only. The one pairing rule of the t-tests and the size trend."""
    values, base = by.get((size, task, lookback, cell, mode), {}), by.get((size, task, lookback, cell, "none"), {})
    splits = [s for s in sorted(set(values) & set(base)) if not (np.isnan(values[s]) or np.isnan(base[s]))]
    return splits, np.array([values[s] for s in splits]), np.array([base[s] for s in splits])


def results_table(trials: list[dict[str, Any]], config: ProtocolConfig) -> ResultsTable:
    """Means over draws per (size, task, look-back) and column (GLM, GLM+Δ, GRU, GRU+aug,
    GRU+pre, LSTM ...); each with-Δ column is tested against its own no-Δ column (one-sided
    paired t-test across draws, in the direction that is better) and starred."""
    from mirror.causal.stats import paired_t_one_sided, stars

    by = _by_draw(trials)
    table = ResultsTable()
    for size in config.sizes:
        for task in config.tasks:
            metric, higher = metric_of(task)
            for lookback in config.lookbacks:
                row: dict[str, Any] = {"size": size, "task": task, "lookback": lookback, "metric": metric}
                for cell, mode in grid_cells(config):
                    values = by.get((size, task, lookback, cell, mode), {})
                    column = cell.upper() + {"none": "", "augment": "+aug", "pretrain": "+pre"}[mode]
                    mean = float(np.nanmean(list(values.values()))) if values else float("nan")
                    mark = ""
                    if mode != "none":
                        splits, a, b = _paired(by, size, task, lookback, cell, mode)
                        if len(splits) >= 2:
                            t, p = paired_t_one_sided(a, b, greater=higher)
                            mark = stars(p)
                            table.tests.append({"size": size, "task": task, "lookback": lookback, "cell": cell, "mode": mode,
                                                "metric": metric, "mean": mean, "baseline": float(b.mean()),
                                                "gain": float((a - b).mean()) * (1 if higher else -1),
                                                "t": t, "p": p, "pairs": len(splits)})
                    row[column] = f"{mean:.4f}{mark}" if metric == "auroc" else f"{mean:.2f}{mark}"
                table.rows.append(row)
    return table


def markdown(table: ResultsTable) -> str:
    """The table as markdown, one block per sample size."""
    if not table.rows:
        return ""
    columns = [k for k in table.rows[0] if k not in ("size", "metric")]
    out = []
    for size in sorted({r["size"] for r in table.rows}):
        out += [f"\n### {size} training patients per draw\n", "| " + " | ".join(columns) + " |",
                "|" + "---|" * len(columns)]
        out += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in table.rows if r["size"] == size]
    return "\n".join(out) + "\n"


def gain_by_size(table: ResultsTable, mode: str = "pretrain") -> list[dict[str, Any]]:
    """Mean gain of ``mode`` over no-Δ per size and cell on the onset tasks (AUROC points), and
    how many (task, look-back) rows it wins significantly (p <= 0.05)."""
    out = []
    for (size, cell) in sorted({(t["size"], t["cell"]) for t in table.tests}):
        rows = [t for t in table.tests if (t["size"], t["cell"], t["mode"]) == (size, cell, mode) and t["metric"] == "auroc"]
        if rows:
            out.append({"size": size, "cell": cell, "mode": mode, "mean_auroc_gain": float(np.mean([r["gain"] for r in rows])),
                        "significant_wins": sum(r["p"] <= 0.05 and r["gain"] > 0 for r in rows), "rows": len(rows)})
    return out


def size_trend(trials: list[dict[str, Any]], config: ProtocolConfig, mode: str = "pretrain") -> list[dict[str, Any]]:
    """Does the gain of ``mode`` over no-Δ grow as the sample shrinks (seed 003's synthetic
    finding)? Per draw, the onset AUROC gain averaged over tasks and look-backs (the ``all`` row
    also over cells); then a one-sided Welch t-test that the mean gain at the smallest size is
    larger than at the largest. Welch, not paired: draws of different sizes are independent
    (their own seeds, their own test patients)."""
    from scipy.stats import ttest_ind

    by = _by_draw(trials)
    per_draw: dict[tuple[str, int], dict[int, list[float]]] = {}  # (cell, size) -> split -> gains
    for size, task, lookback, cell, m in by:
        if m != mode or task not in ONSET_TARGETS:
            continue
        splits, a, b = _paired(by, size, task, lookback, cell, mode)
        for split, gain in zip(splits, a - b, strict=True):
            per_draw.setdefault((cell, size), {}).setdefault(split, []).append(float(gain))
    gains = {key: {split: float(np.mean(g)) for split, g in by_split.items()} for key, by_split in per_draw.items()}
    cells = [c for c in config.cells if any(k[0] == c for k in gains)]
    if len(cells) > 1:
        for size in config.sizes:
            shared = set.intersection(*(set(gains.get((c, size), {})) for c in cells))
            gains[("all", size)] = {s: float(np.mean([gains[(c, size)][s] for c in cells])) for s in shared}
        cells.append("all")
    small, large = min(config.sizes), max(config.sizes)
    out = []
    for cell in cells:
        by_size = [{"size": size, "draws": len(g := list(gains.get((cell, size), {}).values())),
                    "mean_gain": float(np.mean(g)) if g else float("nan"),
                    "se": float(np.std(g, ddof=1) / np.sqrt(len(g))) if len(g) > 1 else float("nan")}
                   for size in config.sizes]
        a, b = list(gains.get((cell, small), {}).values()), list(gains.get((cell, large), {}).values())
        t, p = (ttest_ind(a, b, equal_var=False, alternative="greater") if small != large and min(len(a), len(b)) >= 2
                else (float("nan"), float("nan")))
        out.append({"mode": mode, "cell": cell, "by_size": by_size, "smallest": small, "largest": large,
                    "small_minus_large": float(np.mean(a) - np.mean(b)) if a and b and small != large else float("nan"),
                    "t": float(t), "p": float(p)})
    return out


def trend_markdown(trend: list[dict[str, Any]]) -> str:
    """The size trend as markdown: mean onset gain (SE) per size, and the one-sided test."""
    if not trend:
        return ""
    sizes = [s["size"] for s in trend[0]["by_size"]]
    out = ["\n### Does the gain grow as the sample shrinks? (onset AUROC gain over no-Δ, mean (SE) over draws)\n",
           "| mode | cell | " + " | ".join(f"n = {s}" for s in sizes) + " | smallest - largest | p (one-sided Welch) |",
           "|" + "---|" * (len(sizes) + 4)]
    for r in trend:
        cells = [f"{s['mean_gain']:+.4f} ({s['se']:.4f})" for s in r["by_size"]]
        out.append(f"| {r['mode']} | {r['cell']} | " + " | ".join(cells) + f" | {r['small_minus_large']:+.4f} | {r['p']:.3g} |")
    return "\n".join(out) + "\n"
