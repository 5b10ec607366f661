"""MiranDa's acceptance: the optimisation phase against the supervised baseline (the same
network, BCE only) over several seeds, with a paired t-test per metric.

    MLFLOW_TRACKING_URI=sqlite:////tmp/miranda2-data/mlflow.db \\
    python bench/bench_miranda.py --data /tmp/miranda2-data/sim200k --seeds 5 \\
        --set train.max_steps_per_epoch=150 train.storage_path=/tmp/miranda2-data/ray_results

Every (seed, arm) is one ``jobs/train.py --model miranda`` run (so MLflow holds it, with its
evaluation: ``mirror.evaluation.recommender``), named ``<prefix>-<arm>-s<seed>``; a run that
already finished is read back, not retrained. The arms differ only in ``model.phase``; a seed
sets ``train.seed`` (initialisation and shuffling) on the same data. The table pairs the arms
by seed (``scipy.stats.ttest_rel``, two-sided) and shows the floor (most-frequent regimen) and
the given regimen beside them. Writes ``bench/results/miranda_acceptance.json`` and prints a
markdown table. With ``--deadline`` no seed pair starts that would end after it (the longest
pair so far sets the estimate); the table then holds the seeds that finished, and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from scipy import stats

from mirror import tracking

ARMS = ("supervised", "optimise")
METRICS = ("elos", "true_los", "roc_auc", "pr_auc", "jaccard", "precision", "recall", "f1", "ddi_rate",
           "mean_regimen_size")  # fmt: skip
ROOT = Path(__file__).resolve().parents[1]


def run_arm(data: str, arm: str, seed: int, prefix: str, experiment: str, extra: list[str]) -> dict[str, float]:
    """The finished run's metrics, training it first when it has not finished."""
    name = f"{prefix}-{arm}-s{seed}"
    run_id = tracking.find_run(name, experiment)
    if run_id is None or tracking.get_run(run_id).info.status != "FINISHED":
        cmd = [sys.executable, str(ROOT / "jobs" / "train.py"), "--model", "miranda", "--data", data,
               "--run-name", name, "--set", f"model.phase={arm}", f"train.seed={seed}",
               f"train.experiment={experiment}", "train.score_synthetic=false", *extra]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        run_id = tracking.find_run(name, experiment)
    run = tracking.get_run(run_id)
    return {"run_id": run_id, **run.data.metrics}


def paired_table(runs: dict[str, list[dict[str, float]]]) -> list[dict[str, float | str]]:
    rows = []
    for metric in METRICS:
        sup = np.array([r.get(f"eval/{metric}", np.nan) for r in runs["supervised"]])
        opt = np.array([r.get(f"eval/{metric}", np.nan) for r in runs["optimise"]])
        diff = opt - sup
        test = stats.ttest_rel(opt, sup) if len(diff) >= 2 and np.isfinite(diff).all() and diff.std() > 0 else None
        floor = np.nanmean([r.get(f"baseline/{metric}", np.nan) for r in runs["supervised"]])
        given = np.nanmean([r.get(f"given/{metric}", np.nan) for r in runs["supervised"]])
        rows.append({"metric": metric, "supervised": float(sup.mean()), "optimise": float(opt.mean()),
                     "diff_mean": float(diff.mean()), "diff_sd": float(diff.std(ddof=1)) if len(diff) > 1 else float("nan"),
                     "t": float(test.statistic) if test else float("nan"),
                     "p": float(test.pvalue) if test else float("nan"),
                     "floor": float(floor), "given": float(given)})
    ceiling = [r.get("ceiling/true_los", np.nan) for r in runs["supervised"]]
    rows.append({"metric": "true_los ceiling (every helpful class)", "supervised": float(np.nanmean(ceiling))})
    return rows


def markdown(rows: list[dict[str, float | str]], n: int) -> str:
    head = f"| metric (n={n} seeds) | supervised | MiranDa | diff (MiranDa - sup.) ± sd | t | p | floor | given |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "optimise" not in r:
            lines.append(f"| {r['metric']} | {r['supervised']:.4f} | | | | | | |")
            continue
        lines.append(f"| {r['metric']} | {r['supervised']:.4f} | {r['optimise']:.4f} | {r['diff_mean']:+.4f} ± "
                     f"{r['diff_sd']:.4f} | {r['t']:.2f} | {r['p']:.3g} | {r['floor']:.4f} | {r['given']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--prefix", default="miranda-accept")
    parser.add_argument("--experiment", default="miranda-acceptance")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides common to both arms")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "miranda_acceptance.json"))
    parser.add_argument("--deadline", type=lambda v: datetime.fromisoformat(v),
                        help="ISO time (e.g. 2026-11-30T15:55+00:00): no seed pair starts that would end after it")
    args = parser.parse_args(argv)
    runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    longest = 0.0
    for seed in range(args.seeds):
        if args.deadline and time.time() + longest > args.deadline.timestamp():
            print(f"stopping before seed {seed}: a pair takes up to {longest:.0f} s, the deadline is {args.deadline}")
            break
        start = time.time()
        for arm in ARMS:
            runs[arm].append(run_arm(args.data, arm, seed, args.prefix, args.experiment, args.set))
        longest = max(longest, time.time() - start)
    n = len(runs["optimise"])
    rows = paired_table(runs)
    table = markdown(rows, n)
    result = {"data": args.data, "seeds": n, "seeds_requested": args.seeds, "overrides": args.set,
              "tracking_uri": tracking.tracking_uri(),
              "runs": {arm: [r["run_id"] for r in rs] for arm, rs in runs.items()},
              "train_inner_steps": [r.get("train/inner_steps", np.nan) for r in runs["optimise"]],
              "train_gate": [r.get("train/gate", np.nan) for r in runs["optimise"]],
              "table": rows, "load_average": os.getloadavg()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table)
    return result


if __name__ == "__main__":
    main()
