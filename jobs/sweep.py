"""Run a Ray Tune sweep defined by a space file (format: search_spaces/README.md).

    python jobs/sweep.py search_spaces/wae_ablation.yaml [--data DIR] [--samples N]
        [--resume] [--name NAME] [--workers W] [--gpu] [--cpus-per-worker C]
        [--storage-path DIR|s3://...] [--set key=value ...]

--resume continues the named sweep (default: the newest one from this file) without re-running
finished trials. RAY_ADDRESS picks the cluster; MLFLOW_TRACKING_URI the tracking store.
"""

from __future__ import annotations

import argparse
import sys

from mirror.train.spec import parse_set
from mirror.tune.space import SpaceError, load_sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("space", help="sweep definition, e.g. search_spaces/wae_ablation.yaml")
    parser.add_argument("--data", help="dataset directory or s3://... (overrides 'data')")
    parser.add_argument("--samples", type=int, help="number of samples (overrides 'samples')")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    parser.add_argument("--name", help="sweep name (default: <file name>-<timestamp>)")
    parser.add_argument("--workers", type=int, help="DDP workers per trial")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--cpus-per-worker", type=float, help="logical CPUs per worker")
    parser.add_argument("--storage-path", help="checkpoints and Tune state: DIR or s3://...")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="train.epochs=2")
    parser.add_argument("--upstream-run", help="MLflow run of the first stage (overrides 'upstream_run')")
    args = parser.parse_args(argv)

    from mirror import guards, tracking

    try:
        guards.check_positive("--samples", args.samples)
        guards.check_positive("--workers", args.workers)
        if args.name:
            guards.check_run_name(args.name, "--name")
        overrides = parse_set(args.set)
        if args.storage_path:
            overrides["train.storage_path"] = args.storage_path
        resources = {"workers": args.workers, "cpus_per_worker": args.cpus_per_worker}
        resources["gpu"] = True if args.gpu else None
        spec = load_sweep(
            args.space,
            data=args.data,
            samples=args.samples,
            overrides=overrides,
            resources=resources,
            upstream_run=args.upstream_run,
        )
        if args.data or spec.data:
            guards.check_dataset_dir(args.data or spec.data)
            guards.check_dataset_rows(args.data or spec.data)
        guards.check_tracking_reachable(tracking.tracking_uri())
    except (SpaceError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from mirror.cluster import ClusterConnectionError
    from mirror.tune.sweep import run_sweep

    try:
        outcome = run_sweep(spec, data=args.data, resume=args.resume, name=args.name)
    except (SpaceError, ClusterConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"sweep {outcome.name}: {outcome.trials} trials, {outcome.errors} failed; state in {outcome.path}"
    )
    print(f"MLflow parent run {outcome.parent_run_id}")
    if outcome.best is not None:
        print(
            f"best trial {outcome.best.trial_id}: {spec.metric}={outcome.best.value:.5g} "
            f"run {outcome.best.run_id} config {outcome.best.config}"
        )
    return 1 if outcome.errors or outcome.best is None else 0


if __name__ == "__main__":
    sys.exit(main())
