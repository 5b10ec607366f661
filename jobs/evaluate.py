"""Evaluate a finished training run on held_out and log the results to its MLflow run.

    python jobs/evaluate.py --run RUN_ID
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="MLflow run id of a finished training run")
    parser.add_argument("--no-model", action="store_true", help="don't log the model to MLflow again")
    args = parser.parse_args(argv)

    from mirror import guards, tracking

    try:
        uri = tracking.tracking_uri()
        guards.check_trained_run(args.run, uri)
    except guards.GuardError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from mirror.evaluation import evaluate_run

    metrics = evaluate_run(args.run, log_model=not args.no_model)
    width = max(map(len, metrics))
    for name in sorted(metrics):
        print(f"{name:<{width}}  {metrics[name]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
