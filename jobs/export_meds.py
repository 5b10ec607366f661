"""Export a mirror dataset directory to MEDS v0.4 (``mirror.data.meds_export``).

    python jobs/export_meds.py DIR OUT [--overwrite] [--no-ray]
    ray job submit --working-dir . -- python jobs/export_meds.py /data/claims /data/claims-meds

One Ray task per input shard (the cluster at RAY_ADDRESS, or a local one). Every table is
checked with the meds package's schemas as it is written; event counts per modality must
reconcile exactly with the source's list lengths. Prints the counts as JSON and exits 0;
refusals and invalid input print one line (``error: ...``) and exit 2.
"""

from __future__ import annotations

import argparse
import json

from mirror import guards
from mirror.data.meds_export import MedsExportError, check_output, export_meds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", help="source dataset directory (holds metadata/ and data/)")
    parser.add_argument("out", help="MEDS output directory (new, empty, or an earlier export)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT when it holds an earlier export of this job")
    parser.add_argument("--no-ray", action="store_true", help="export shards in a plain loop")
    args = parser.parse_args(argv)

    with guards.exit_on_refusal(MedsExportError):  # before Ray starts
        guards.check_dataset_dir(args.dir, flag="DIR")
        check_output(args.dir, args.out, args.overwrite)
        report = export_meds(args.dir, args.out, overwrite=args.overwrite, parallel=not args.no_ray)
    summary = report.summary()
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
