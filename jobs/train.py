"""Train one model with Ray Train DDP, evaluate it, and record everything in MLflow.

    python jobs/train.py --model wae --data DIR [--workers W] [--gpu] [--epochs E]
        [--run-name NAME] [--config FILE] [--set key=value ...] [--upstream-run RUN_ID]

Re-running with the same --run-name resumes from the last checkpoint. A second-stage model
(e.g. a score network on an autoencoder's latents) names its first stage's MLflow run with
--upstream-run. The end-of-run evaluation runs the suites of the model's capabilities.
"""

from __future__ import annotations

import argparse
import sys
import time

from mirror.models import MODELS
from mirror.train.spec import build_run_spec, load_overrides, parse_set


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help=f"registry name: {', '.join(sorted(MODELS))}")
    parser.add_argument("--data", required=True, help="dataset directory (jobs/generate.py layout)")
    parser.add_argument("--workers", type=int, help="DDP workers (train.workers)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL, bf16 autocast")
    parser.add_argument("--cpus-per-worker", type=float, help="logical CPUs per worker")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--storage-path", help="checkpoint storage: a directory or s3://...")
    parser.add_argument("--run-name", help="stable name; re-use it to resume")
    parser.add_argument("--config", help="YAML/JSON with 'model', 'view' and 'train' sections")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="e.g. model.lam=0.5 view.max_words=50")
    parser.add_argument("--upstream-run", help="MLflow run id of the first stage this model builds on")
    parser.add_argument("--no-eval", action="store_true", help="skip the end-of-run evaluation")
    args = parser.parse_args(argv)

    from mirror import guards, tracking
    from mirror.train.driver import storage_path

    try:  # everything a user can get wrong, before Ray starts or a run opens
        guards.check_dataset_dir(args.data)
        overrides = load_overrides(args.config) if args.config else {}
        flags = {
            "train.workers": args.workers,
            "train.epochs": args.epochs,
            "train.cpus_per_worker": args.cpus_per_worker,
            "train.storage_path": args.storage_path,
            "train.use_gpu": True if args.gpu else None,
        }
        overrides.update({k: v for k, v in flags.items() if v is not None})
        overrides.update(parse_set(args.set))
        run_name = args.run_name or f"{args.model}-{time.strftime('%Y%m%d-%H%M%S')}"
        guards.check_run_name(run_name)
        spec = build_run_spec(args.model, args.data, run_name, overrides, upstream_run=args.upstream_run)
        uri = tracking.tracking_uri()
        guards.check_tracking_reachable(uri)
        guards.check_dataset_rows(spec.data)
        storage = storage_path(spec)
        guards.check_storage_dir(storage)
    except (ValueError, TypeError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return guards.run_guarded(
            run_name, spec.train.experiment, storage, uri,
            lambda: train_and_evaluate(spec, storage, uri, no_eval=args.no_eval),
        )  # fmt: skip
    except guards.GuardError as err:  # the name is locked, or belongs to another model
        print(f"error: {err}", file=sys.stderr)
        return 2


def train_and_evaluate(spec, storage: str, uri: str, *, no_eval: bool) -> int:
    """Under the run's lock: refuse a name that belongs to another model, train, evaluate."""
    from mirror import guards

    guards.check_resume_compatible(spec, storage, uri)
    run_name = spec.run_name

    from mirror.checkpoint import UpstreamRunError
    from mirror.cluster import ClusterConnectionError
    from mirror.train.driver import run_training

    try:
        outcome = run_training(spec)
    except (ClusterConnectionError, UpstreamRunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"run {outcome.run_id} ({run_name}): checkpoint {outcome.checkpoint_path}")
    if not no_eval:
        from mirror.evaluation import evaluate_run

        metrics = evaluate_run(outcome.run_id, synthetic=spec.train.score_synthetic)
        print(f"evaluated {len(metrics)} metrics into MLflow run {outcome.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
