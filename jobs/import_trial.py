"""Import clinical-trial visit data (PyTrial's ``trial_patient_sequence`` layout, e.g. the
PyTrial demo) as a trial-only mirror dataset (``mirror.data.trial_import``).

    python jobs/import_trial.py SRC_DIR OUT [--overwrite] [--arm-marker TOKEN ...] [--name NAME]
                                [--held-out-share F] [--severe-columns COL ...]

Prints the summary (participants per split, visits read and written, vocabulary sizes, how the
arms were derived, every count of items not placed) as JSON and exits 0; bad input prints one
line (``error: FILE participant P visit V: RULE: ...``) and exits 2. Check the result with
``jobs/validate.py OUT``.
"""

from __future__ import annotations

import argparse
import json

from mirror import guards
from mirror.data.trial_import import TrialImportConfig, TrialImportError, import_trial


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src_dir", help="trial source (holds visits.json.gz and voc.json, or trial_patient_sequence/)")
    parser.add_argument("out", help="output dataset directory (new, empty, or an earlier trial import)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT when it holds an earlier trial import")
    parser.add_argument("--arm-marker", nargs="+", metavar="TOKEN",
                        help="treatment tokens whose presence in the first regimen makes arm 1 (default: derived)")
    parser.add_argument("--name", help="dataset name (default: SRC_DIR's name)")
    parser.add_argument("--held-out-share", type=float, default=TrialImportConfig.held_out_share,
                        help="share of participants held out (default 0.05; a trial of ~1,000 needs more for "
                             "the utility AUROC)")
    parser.add_argument("--severe-columns", nargs="*", metavar="COL", default=None,
                        help="feature.csv columns whose nonzero value marks a severe outcome (default: death; "
                             "none: serious AEs only)")
    args = parser.parse_args(argv)
    with guards.exit_on_refusal(TrialImportError):
        report = import_trial(args.src_dir, args.out, config=TrialImportConfig(
                                  arm_marker=args.arm_marker, held_out_share=args.held_out_share,
                                  **({} if args.severe_columns is None else {"severe_columns": args.severe_columns})),
                              overwrite=args.overwrite, name=args.name)
    summary = report.summary()
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
