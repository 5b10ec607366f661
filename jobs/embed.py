"""Export every patient's latent z (the digital mirror universe) as Parquet.

    python jobs/embed.py --run RUN_ID --data DIR --out DIR [--actors N] [--gpu]
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="MLflow run id of a finished training run")
    parser.add_argument("--data", required=True, help="dataset directory to embed (all splits)")
    parser.add_argument("--out", required=True, help="output directory: OUT/{split}/*.parquet")
    parser.add_argument("--actors", type=int, default=2, help="model replicas in the actor pool")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--gpu", action="store_true", help="one GPU per actor")
    args = parser.parse_args(argv)

    from mirror import guards, tracking

    try:  # before Ray starts: a re-run into the same --out used to append to it
        guards.check_positive("--actors", args.actors)
        guards.check_positive("--batch-size", args.batch_size)
        guards.check_dataset_dir(args.data)
        guards.check_empty_output(args.out)
        uri = tracking.tracking_uri()
        guards.check_trained_run(args.run, uri, needs="encoder", job="embed")
    except guards.GuardError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from mirror.checkpoint import checkpoint_dir
    from mirror.cluster import ensure_ray
    from mirror.embed import export_embeddings

    ensure_ray(min_logical_cpus=args.actors + 2)
    with guards.staged_output(args.out) as staging:  # all of it, or nothing, lands in --out
        report = export_embeddings(
            str(checkpoint_dir(args.run)), args.data, staging,
            actors=args.actors, batch_size=args.batch_size, use_gpu=args.gpu,
        )
    for split, n in report.patients.items():
        print(f"{split}: {n} patients embedded ({report.truncated[split]} truncated to the model's max words)")
    print(f"z ({report.latent_dim} dims) written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
