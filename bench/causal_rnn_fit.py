"""Why the GLM floor beats the Δ-free GRU on the causal protocol (issue 15): fit recipes of the
protocol's GRU (no Δ, look-back 1) against the scikit-learn GLM, on the protocol's own draws.

    python bench/causal_rnn_fit.py --data DIR --delta psm4 [--sizes 250 1000 5000] [--draws 4]

Recipes (each changes one thing of ``ProtocolConfig`` / the model):
    protocol      the protocol as run (Adam 3e-3, early stopping: 6 checks x 25 steps)
    patience20    20 checks without a gain, up to 3,000 steps
    weight_decay  AdamW weight decay 0.1, patience 20
    linear_skip   the head reads [h, last window]: the GLM nested in the RNN
    zero_head     head weights start at 0: the start predicts the base rate for everyone, so
                  early stopping that keeps it scores a tie, not a random ranking

Per fit it records the test AUROC and the training AUROC of the state kept (the GLM's too), so
the gap between them says whether a recipe under- or over-fits. Results:
bench/results/causal_rnn_fit.json.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from results_file import write_results
from torch import nn

from mirror.causal import protocol
from mirror.data.splits import HELD_OUT, TRAIN
from mirror.data.views.windows import ONSET_TARGETS, WindowsInfo
from mirror.models import build_model

RECIPES = ("protocol", "patience20", "weight_decay", "linear_skip", "zero_head")


class LinearSkip(nn.Module):
    """The encoder's last hidden state next to the last window's inputs."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.out_dim = encoder.out_dim + encoder.rnn.input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.encoder(x), x[:, -1]], dim=-1)


def fit_recipe(recipe: str, task: str, train: dict, val: dict, base_rates, config: protocol.ProtocolConfig, split: int):
    if recipe in ("patience20", "weight_decay"):
        config = replace(config, patience=20, steps=3_000)
    extra = {"weight_decay": 0.1} if recipe == "weight_decay" else {}
    torch.manual_seed(split)
    model = build_model("causal_rnn", {"cell": "gru", "mode": "none", "task": task, "hidden": config.hidden,
                                       "lr": config.lr, **extra}, WindowsInfo(lookback=1, has_delta=True))
    if recipe == "linear_skip":
        model.encoder = LinearSkip(model.encoder)
        model.head = nn.Linear(model.encoder.out_dim, model.head.out_features)
    model.start_at_base_rates(*base_rates)
    if recipe == "zero_head":
        nn.init.zeros_(model.head.weight)
    steps = protocol._fit(model, train, val, 1, config, np.random.default_rng([config.seed, split, 2]))
    return model, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--delta", default="psm4", help="a Δ column set of --data (read, unused by the no-Δ fits)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 1000, 5000])
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "causal_rnn_fit.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = protocol.ProtocolConfig(delta=args.delta, sizes=tuple(args.sizes), lookbacks=(1,))
    train_pool = protocol.load_pool(args.data, TRAIN, args.delta, config.pool_patients, 1, config.window_weeks)
    test_pool = protocol.load_pool(args.data, HELD_OUT, args.delta, 2 * config.test_patients, 1, config.window_weeks,
                                   at_least=config.test_patients)
    fits = []
    started = time.perf_counter()
    for size in args.sizes:
        for split in range(args.draws):  # the protocol's own draws
            train, val, test = protocol.draw_patients(train_pool, test_pool, size, split, config)
            base_rates = protocol._base_rates(train)
            for task in ONSET_TARGETS:
                row = {"size": size, "split": split, "task": task}
                fits.append(row | {"recipe": "glm", "auroc": protocol._glm_score(train, test, task, False)["auroc"],
                                   "train_auroc": protocol._glm_score(train, train, task, False)["auroc"]})
                for recipe in args.recipes:
                    model, steps = fit_recipe(recipe, task, train, val, base_rates, config, split)
                    fits.append(row | {"recipe": recipe, "auroc": protocol._score(model, test, 1, task)["auroc"],
                                       "train_auroc": protocol._score(model, train, 1, task)["auroc"], "steps": steps})
            print(f"size {size} draw {split}: {time.perf_counter() - started:.0f} s", flush=True)
    summary = {}
    for size in args.sizes:
        for recipe in ("glm", *args.recipes):
            mine = [f for f in fits if f["size"] == size and f["recipe"] == recipe]
            glm = [f for f in fits if f["size"] == size and f["recipe"] == "glm"]
            per_task = {t: float(np.nanmean([f["auroc"] for f in mine if f["task"] == t])) for t in ONSET_TARGETS}
            gap = np.array([f["auroc"] - g["auroc"] for f, g in zip(mine, glm, strict=True)])
            summary[f"{size}/{recipe}"] = {
                "mean_auroc": float(np.nanmean(list(per_task.values()))), "per_task": per_task,
                "minus_glm": float(np.nanmean(gap)), "minus_glm_sd": float(np.nanstd(gap)),
                "train_auroc": float(np.nanmean([f["train_auroc"] for f in mine])),
                "below_half": int(sum(f["auroc"] < 0.5 for f in mine)), "fits": len(mine)}
            print(f"{size:>5} {recipe:<13} AUROC {summary[f'{size}/{recipe}']['mean_auroc']:.3f} "
                  f"(train {summary[f'{size}/{recipe}']['train_auroc']:.3f}), minus GLM {np.nanmean(gap):+.3f}")
    write_results(Path(args.out), {"command": "bench/causal_rnn_fit.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items() if k != "out"),
        "seconds": time.perf_counter() - started, "summary": summary, "fits": fits})


if __name__ == "__main__":
    main()
