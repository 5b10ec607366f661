"""Write synthetic patients from a trained generative run, behind a privacy gate.

    python jobs/sample.py --run RUN_ID --patients N --out DIR [--allow-unsafe]
        [--max-mia-auc 0.6] [--max-presence 0.333] [--exact-match-z 3] [--device cuda]
        [--set model.sampler=em model.sample_steps=25 ...]

The sample is scored against the run's real data first; unless every privacy check passes,
nothing is exported and the exit code is 3. --allow-unsafe exports anyway and tags the run.

A trial-twin generator (``twin``) twins the training split's participants instead, streamed
N at a time (past the end it starts over, with new draws): DIR/trial/train/ holds the twins,
DIR/counterfactual/ (a dataset of its own) their counterfactual twins under the other arm;
the scorecard's trial section scores both and the gate must pass on both.

--set changes how the trained model draws (its config class's SAMPLE_TIME fields: a ScoEHR
run's sampler and steps, a sentence model's temperature and top-p, TWIN's generation), not
what it learned; the scorecard logged to the run is tagged with them (mirror.sample_overrides).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="MLflow run id of a finished generative run")
    parser.add_argument("--patients", type=int, required=True)
    parser.add_argument("--out", required=True, help="output dataset directory (platform layout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-mia-auc", type=float, default=0.6)
    parser.add_argument("--max-presence", type=float, default=1 / 3, help="presence-disclosure sensitivity bound (strict)")
    parser.add_argument("--exact-match-z", type=float, default=3.0,
                        help="train exact-match rate may exceed held-out's by this many standard errors")
    parser.add_argument("--allow-unsafe", action="store_true", help="export even if the gate fails (tags the run)")
    parser.add_argument("--device", default="cpu", help="where the model draws patients: cpu, cuda, cuda:1")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="sampling options, e.g. model.sampler=em model.sample_steps=25")
    args = parser.parse_args(argv)

    from mirror import guards, tracking

    try:  # before Ray starts; the output is staged beside --out, never in a user's directory
        guards.check_positive("--patients", args.patients)
        if args.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise guards.GuardError(f"--device {args.device}: no CUDA device is visible to this process")
        guards.check_empty_output(args.out)
        uri = tracking.tracking_uri()
        guards.check_trained_run(args.run, uri, needs="generator", job="sample")
        guards.check_run_dataset_metadata(args.run, uri)
        sample_overrides = guards.check_sample_overrides(args.run, uri, args.set)
    except guards.GuardError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from mirror.cluster import ensure_ray
    from mirror.metrics.privacy import GateThresholds
    from mirror.metrics.scorecard import ScorecardError
    from mirror.synthesize import TooFewValidSentences, release_synthetic

    ensure_ray()
    thresholds = GateThresholds(
        exact_match_z=args.exact_match_z, max_mia_auc=args.max_mia_auc, max_presence_sensitivity=args.max_presence
    )
    try:
        result = release_synthetic(
            args.run, n_patients=args.patients, out_dir=args.out, thresholds=thresholds,
            allow_unsafe=args.allow_unsafe, seed=args.seed, device=args.device, sample_overrides=sample_overrides,
        )
    except (TooFewValidSentences, ScorecardError) as err:  # nothing exported, nothing of the user's deleted
        print(f"error: {err}", file=sys.stderr)
        return 1
    s = result.sample
    print(f"sampled {s.written} valid patients from {s.drawn} draws (validity {s.validity_rate:.3f}); rejected {s.rejected}")
    if not result.gate_passed:
        print("privacy gate FAILED:\n  " + "\n  ".join(result.gate_failures), file=sys.stderr)
    if result.out_dir is None:
        print("nothing exported (use --allow-unsafe to override; the run is then tagged)", file=sys.stderr)
        return 3
    print(f"wrote {result.out_dir}" + (" (UNSAFE override, run tagged)" if result.unsafe_override else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
