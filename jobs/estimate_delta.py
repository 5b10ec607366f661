"""Estimate the causal-effect Δ by propensity-score matching and write it beside the data.

    ray job submit -- python jobs/estimate_delta.py --data /shared/sim --name psm

Writes ``<data>/delta/<name>/`` (Δ columns per data shard, ``delta.json``, ``balance.csv``,
``balance.png``; see ``mirror.causal.estimate``), then logs to MLflow (run ``delta-<name>``):
the config, counts, match rate and caliper drops, per-stratum naive / PSM / true effects (on
simulated data), and the balance table and plot. Train a window model on it with
``--set view.delta=<name>``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="dataset directory (shared by all Ray nodes)")
    parser.add_argument("--name", default="psm", help="name of the Δ column set (view.delta)")
    parser.add_argument("--window-weeks", type=int, default=52)
    parser.add_argument("--caliper-sd", type=float, default=0.2, help="caliper in SDs of the propensity logit")
    parser.add_argument("--block-patients", type=int, default=1_000_000, help="patients per matching block (memory per task)")
    parser.add_argument("--max-fit-rows", type=int, default=100_000, help="rows per class and stratum for the propensity fit")
    parser.add_argument("--propensity", choices=("linear", "quadratic"), default="quadratic",
                        help="propensity inputs: X_{t-1} and the index lab, or those and their squares")
    parser.add_argument("--history", action="store_true",
                        help="the propensity also sees the index lab's value by the end of t-2 (its trend)")
    parser.add_argument("--stops", choices=("none", "decision", "window"), default="window",
                        help="the propensity also sees the ladder's drugs still taken at the end of t-1 and those "
                             "stopped in window t: before the decision, or anywhere in it (a stop raises the lab and "
                             "prompts additions; 'window' assumes a stop is not caused by the addition)")
    parser.add_argument("--neighbours", type=int, default=8, help="controls per side of the sorted logit considered")
    parser.add_argument("--controls", type=int, default=8,
                        help="controls averaged into each treated row's Δ: its k nearest within the caliper "
                             "(1: the paper's single control B)")
    parser.add_argument("--index-lab-weight", type=float, default=1.0, help="the index lab's weight in the match distance (0: logit only)")
    parser.add_argument("--outcome", choices=("first", "latest"), default="first",
                        help="X_{t+1}: each lab's first value in window t+1 (before any later addition acts) or its latest")
    parser.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=True,
                        help="subtract what the covariate difference between a treated row and its control is worth "
                        "under the controls' outcome model (Abadie-Imbens bias-corrected matching)")
    parser.add_argument("--allow-own-windows", action="store_true", help="let a treated row take a control of the same patient")
    parser.add_argument("--truth-name", default=None,
                        help="simulated data: also write the true effects of the same treated rows as this Δ column set "
                             "(the ceiling; seed 003's synthetic study trains on the true Δ)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-work", action="store_true", help="keep the transition rows and matches (_work/)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    args = parser.parse_args(argv)

    from mirror.causal.delta import DeltaConfig
    from mirror.causal.estimate import estimate_delta
    from mirror.cluster import ensure_ray

    config = DeltaConfig(window_weeks=args.window_weeks, caliper_sd=args.caliper_sd,
                         block_patients=args.block_patients, max_fit_rows=args.max_fit_rows, seed=args.seed,
                         propensity=args.propensity, history=args.history, stops=args.stops, neighbours=args.neighbours, controls=args.controls,
                         index_lab_weight=args.index_lab_weight,
                         exclude_own_windows=not args.allow_own_windows, outcome=args.outcome,
                         bias_correction=args.bias_correction)
    ensure_ray()
    report = estimate_delta(args.data, args.name, config, keep_work=args.keep_work, truth_name=args.truth_name)
    out = Path(args.data) / "delta" / args.name
    if not args.no_mlflow:
        from mirror import tracking

        run = tracking.start_run(f"delta-{args.name}", params={"data": args.data, **config.as_dict()},
                                 tags={"job": "estimate_delta"})
        metrics = {f"delta/{k}": float(v) for k, v in report.totals.items()}
        metrics["delta/patients_per_s"] = report.patients / report.seconds
        for row in report.strata:
            for key in ("match_rate", "naive_bias", "psm_bias", "psm_rmse", "naive_rmse", "individual_corr", "max_abs_smd_after",
                        "outcome_effective_controls"):
                if key in row:
                    metrics[f"delta/{row['ladder']}_{row['transition'].replace('->', '_')}/{key}"] = float(row[key])
        tracking.log_metrics(run, metrics)
        tracking.log_table(run, report.balance, "balance.json")
        tracking.log_table(run, report.strata, "strata.json")
        for file in ("balance.png", "balance.csv", "delta.json"):
            tracking.log_artifact(run, out / file)
        tracking.end_run(run)
    print(json.dumps({"out": str(out), "seconds": round(report.seconds, 2), **report.totals}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
