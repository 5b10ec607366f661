"""Simulate a claims population and write it as a mirror dataset.

    ray job submit -- python jobs/generate.py --patients 100000000 --out /shared/sim --seed 0

Chunks run as Ray tasks (the cluster at RAY_ADDRESS, or a local one). The same seed gives the
same rows in the same files whatever --workers is; a larger --patients appends patients.
--trial-participants adds a simulated two-arm trial (trial/, with counterfactual twins in
ground_truth/): a number, or "auto" = N / 100 kept within [1000, 5000] (the size of real trials).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from mirror import guards
from mirror.data.ownership import NotWrittenByGenerator
from mirror.data.simulator import BLOCK, generate_dataset
from mirror.data.trial import auto_trial_participants


def trial_participants(value: str, n_patients: int) -> int:
    """``--trial-participants``: a count (0 = no trial part) or ``auto``."""
    if value == "auto":
        return auto_trial_participants(n_patients)
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise guards.GuardError(f"--trial-participants: expected a count >= 0 or 'auto', received {value!r}")
    return count


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, required=True, help="number of patients (ids 0..N-1)")
    parser.add_argument("--out", required=True, help="dataset directory (shared by all Ray nodes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None,
                        help="max chunks in flight (default: the cluster's CPUs)")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="patients per file, a multiple of 4096 (default: by N)")
    parser.add_argument("--name", default=None, help="dataset name for dataset.json")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    parser.add_argument("--trial-participants", default="auto",
                        help="participants of the simulated trial part: a count (0 for none) or auto "
                             "(default: N / 100 within [1000, 5000])")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    # before Ray starts; --overwrite deletes only what this generator wrote
    with guards.exit_on_refusal(NotWrittenByGenerator, FileExistsError):
        guards.check_positive("--patients", args.patients)
        guards.check_positive("--workers", args.workers)
        n_trial = trial_participants(args.trial_participants, args.patients)
        if args.chunk_size is not None and (args.chunk_size < 1 or args.chunk_size % BLOCK):
            raise guards.GuardError(
                f"--chunk-size: expected a positive multiple of {BLOCK} (the RNG block), received {args.chunk_size}"
            )
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise guards.GuardError(f"--out {args.out}: is a file, expected a directory")
        meta = generate_dataset(
            args.out, args.patients, seed=args.seed, workers=args.workers,
            chunk_size=args.chunk_size, name=args.name, overwrite=args.overwrite, trial_participants=n_trial,
        )  # fmt: skip
    summary = {
        "out": args.out,
        "name": meta.name,
        "patients": meta.patients,
        "events": meta.extra["events"],
        "data_bytes": meta.extra["data_bytes"],
        "seconds": meta.extra["seconds"],
        "forced_first_event": meta.provenance["forced_first_event"],
        "truncated_patients": meta.provenance["truncated_patients"],
        "trial_participants": meta.trial.get("participants", {}),
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
