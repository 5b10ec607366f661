"""Import a MEDS dataset (v0.3/v0.4, e.g. the MIMIC-IV demo) into a mirror dataset directory
(``mirror.data.meds_import``).

    python jobs/import_meds.py MEDS_DIR OUT [--overwrite] [--config FILE.yaml] [--no-ray]

One Ray task per MEDS shard (the cluster at RAY_ADDRESS, or a local one). Prints the summary
(patients per split, mapped shares, unmapped and unplaced counts) as JSON and exits 0; bad input
prints one line (``error: FILE row N: RULE: ...``) and exits 2.
"""

from __future__ import annotations

import argparse
import json

from mirror import guards
from mirror.data.meds_import import ImportConfig, MedsImportError, check_output, import_meds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("meds_dir", help="MEDS dataset root (holds data/ and metadata/)")
    parser.add_argument("out", help="output dataset directory (new, empty, or an earlier import)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT when it holds an earlier import")
    parser.add_argument("--config", help="YAML file overriding ImportConfig fields (code patterns, ...)")
    parser.add_argument("--name", help="dataset name (default: the MEDS dataset_name)")
    parser.add_argument("--no-ray", action="store_true", help="convert shards in a plain loop")
    args = parser.parse_args(argv)
    with guards.exit_on_refusal(MedsImportError):  # before Ray starts
        config = ImportConfig.from_yaml(args.config) if args.config else ImportConfig()
        check_output(args.meds_dir, args.out, args.overwrite)
        report = import_meds(args.meds_dir, args.out, config=config, overwrite=args.overwrite,
                             parallel=not args.no_ray, name=args.name)
    summary = report.summary()
    summary["provenance"].pop("config")
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
