"""Validate a mirror dataset directory against every rule in ``mirror.data.validate``.

    python jobs/validate.py DIR [--max-errors N] [--parallel]
    ray job submit --working-dir . -- python jobs/validate.py /data/claims --parallel

Prints counts per split (patients, files, rows checked, sentences the training filter will
drop), and per trial split (participants) when the dataset has a trial part, and exits 0 when
the dataset is valid; otherwise lists the first violations, one per line as
``file row R (subject S): rule: message``, and exits 1.
"""

from __future__ import annotations

import argparse
import sys

from mirror.data.validate import RULES, validate_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog=f"rules: {', '.join(RULES)}")
    parser.add_argument("dir", help="dataset directory (holds metadata/ and data/)")
    parser.add_argument("--max-errors", type=int, default=20, metavar="N",
                        help="stop after N violations and list them (default 20)")
    parser.add_argument("--parallel", action="store_true",
                        help="check files as Ray tasks (uses the running cluster if any)")
    args = parser.parse_args(argv)
    if args.max_errors < 1:
        parser.error("--max-errors must be >= 1")

    report = validate_dataset(args.dir, max_violations=args.max_errors, parallel=args.parallel)
    print(report.summary())
    if report.ok:
        return 0
    more = " (stopped at --max-errors; there may be more)" if report.truncated else ""
    print(f"\n{len(report.violations)} violation(s){more}:")
    for violation in report.violations:
        print(violation)
    return 1


if __name__ == "__main__":
    sys.exit(main())
