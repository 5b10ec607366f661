"""Score a synthetic dataset against real data: fidelity, utility, privacy, reference rows.

    python jobs/score.py --real DIR --synthetic DIR [--out FILE.json] [--run RUN_ID]
        [--max-queries N] [--seed S] [--artifacts DIR]

Writes the scorecard as a flat JSON object {metric: number}, plots (PNG) beside it, logs both
to the MLflow run with --run, and prints the privacy gate's verdict. A fidelity or utility
metric that is undefined for this synthetic set is written as null with a
``<name>/undefined`` flag, its reason goes to FILE.undefined.json, and the job still exits 0.
If a privacy metric cannot be computed, everything else is still written, the reasons go to
FILE.errors.json and the job exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mirror.cluster import ensure_ray
from mirror.metrics.privacy import privacy_gate
from mirror.metrics.scorecard import ScorecardError, compute_scorecard, json_safe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--real", required=True, help="real dataset directory (train and held_out splits)"
    )
    parser.add_argument(
        "--synthetic", required=True, help="synthetic dataset directory (all splits are read)"
    )
    parser.add_argument("--out", help="scorecard JSON path (default: <synthetic>/scorecard.json)")
    parser.add_argument("--run", help="MLflow run id to log the metrics and plots to")
    parser.add_argument(
        "--max-queries", type=int, default=20_000, help="query subsample for NN metrics"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--artifacts", help="plot directory (default: <out stem>_plots)")
    args = parser.parse_args(argv)

    from mirror import guards

    try:  # before Ray starts
        guards.check_dataset_dir(args.real, "--real")
        guards.check_dataset_dir(args.synthetic, "--synthetic")
        guards.check_positive("--max-queries", args.max_queries)
        if args.run:
            from mirror import tracking

            guards.check_tracking_reachable(tracking.tracking_uri())
            guards.check_run_exists(args.run, tracking.tracking_uri())
    except guards.GuardError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out or Path(args.synthetic) / "scorecard.json")
    plots = Path(args.artifacts or out.with_name(out.stem + "_plots"))
    ensure_ray()
    errors: dict[str, str] = {}
    undefined: dict[str, str] = {}
    try:
        metrics = compute_scorecard(
            args.real,
            args.synthetic,
            max_queries=args.max_queries,
            seed=args.seed,
            artifacts_dir=plots,
            undefined=undefined,
        )
    except ScorecardError as err:
        metrics, errors = err.partial, err.errors
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json_safe(metrics), indent=1, sort_keys=True, allow_nan=False) + "\n")
    print(f"scorecard: {len(metrics)} metrics -> {out}; plots -> {plots}")
    if args.run:
        from mirror.tracking import log_scorecard

        log_scorecard(args.run, metrics, plots)
        print(f"logged to MLflow run {args.run}")
    if undefined:
        undefined_path = out.with_suffix(".undefined.json")
        undefined_path.write_text(json.dumps(undefined, indent=1, sort_keys=True) + "\n")
        print(f"{len(undefined)} metric(s) undefined for this synthetic set (null; reasons in {undefined_path})")
    if errors:
        error_path = out.with_suffix(".errors.json")
        error_path.write_text(json.dumps(errors, indent=1, sort_keys=True) + "\n")
        print(
            f"{len(errors)} metric(s) could not be computed (reasons in {error_path}):",
            file=sys.stderr,
        )
        for name, reason in sorted(errors.items()):
            print(f"  {name}: {reason}", file=sys.stderr)
        return 1
    gate = privacy_gate(metrics)
    print(
        "privacy gate: " + ("passed" if gate.passed else "REFUSED\n  " + "\n  ".join(gate.failures))
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
