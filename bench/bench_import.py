"""MEDS import throughput: ``import_meds`` on a MEDS export of simulated patients, against a
plain pyarrow scan of the same files in the same run.

    make bench-import                    # 1M patients; writes bench/results/import.json
    .venv/bin/python bench/bench_import.py --patients 100000 --repeats 2

1. A simulated dataset of ``--patients`` (every modality of the whole record, plus its trial)
   is generated and exported to MEDS with ``export_meds`` (both reused from
   ``/tmp/mirror-bench`` when already there: they are inputs, not what is measured).
2. Passes alternate: a single-process pyarrow scan reading every column of every MEDS data
   shard (``pq.ParquetFile.iter_batches``, the floor of any reader of these files), then
   ``import_meds`` end to end (schema checks, time bounds, one Ray task per shard mapping codes
   and building per-patient rows, zstd Parquet out, dataset.json). Throughput is MEDS events
   (rows) per second of wall clock; the figure is the median of the per-pair ratios
   import / scan, since a pair shares the machine's load.

Absolute figures move with the shared machine's load (recorded); compare the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mirror.data import schema
from mirror.data.trial import auto_trial_participants

RESULTS = Path(__file__).resolve().parent / "results" / "import.json"
WORKDIR = Path("/tmp/mirror-bench")
SEED = 0


def log(message: str) -> None:
    print(f"[bench-import {time.strftime('%H:%M:%S')}] {message}", flush=True)


def init_ray() -> int:
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    return int(ray.cluster_resources().get("CPU", 1))


def ensure_inputs(n_patients: int) -> tuple[Path, dict]:
    """The MEDS export of ``n_patients`` simulated patients, made unless already there."""
    from mirror.data import simulator
    from mirror.data.meds_export import export_meds

    sim = WORKDIR / f"import-sim-{n_patients}-seed{SEED}"
    meds_dir = WORKDIR / f"import-meds-{n_patients}-seed{SEED}"
    made: dict = {"simulated": str(sim), "meds": str(meds_dir)}
    try:
        meta = schema.DatasetMetadata.read(sim)
        fresh = sum(meta.patients.values()) == n_patients and meta.provenance.get("version") == simulator.SIMULATOR_VERSION
    except (FileNotFoundError, ValueError, TypeError):
        fresh = False
    if not fresh:
        log(f"generating {n_patients:,} patients into {sim}")
        began = time.perf_counter()
        simulator.generate_dataset(sim, n_patients, seed=SEED, overwrite=True,
                                   trial_participants=auto_trial_participants(n_patients))
        made["generate_s"] = round(time.perf_counter() - began, 1)
        shutil.rmtree(meds_dir, ignore_errors=True)
    if not (meds_dir / "metadata" / "dataset.json").is_file():
        log(f"exporting to MEDS at {meds_dir}")
        began = time.perf_counter()
        export_meds(sim, meds_dir, overwrite=True)
        made["export_s"] = round(time.perf_counter() - began, 1)
    return meds_dir, made


def scan(meds_dir: Path) -> tuple[int, float]:
    """Rows read by a plain pyarrow scan of every column of every data shard, and seconds."""
    began = time.perf_counter()
    rows = 0
    for path in sorted((meds_dir / "data").rglob("*.parquet")):
        with pq.ParquetFile(path) as f:
            for batch in f.iter_batches(batch_size=262_144):
                rows += batch.num_rows
    return rows, time.perf_counter() - began


def import_pass(meds_dir: Path, out: Path) -> tuple[int, float, dict]:
    from mirror.data.meds_import import import_meds

    began = time.perf_counter()
    report = import_meds(meds_dir, out, overwrite=True)
    return report.events_read, time.perf_counter() - began, report.patients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=1_000_000, help="simulated patients exported to MEDS")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved (scan, import) pairs")
    args = parser.parse_args()
    WORKDIR.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    began = time.perf_counter()
    workers = init_ray()
    meds_dir, inputs = ensure_inputs(args.patients)
    files = sorted((meds_dir / "data").rglob("*.parquet"))
    out = WORKDIR / f"import-out-{args.patients}"
    pairs = []
    for i in range(args.repeats):
        scan_rows, scan_s = scan(meds_dir)
        events, import_s, patients = import_pass(meds_dir, out)
        if events != scan_rows:
            raise RuntimeError(f"import read {events} events, the scan {scan_rows} rows")
        pairs.append({"scan_events_per_s": round(scan_rows / scan_s), "import_events_per_s": round(events / import_s),
                      "scan_s": round(scan_s, 2), "import_s": round(import_s, 2),
                      "ratio_import_over_scan": round(scan_s / import_s, 4)})
        log(f"pair {i}: scan {scan_rows / scan_s:,.0f} events/s, import {events / import_s:,.0f} events/s")
    shutil.rmtree(out, ignore_errors=True)
    ratios = [p["ratio_import_over_scan"] for p in pairs]
    results = {
        "bench": "import",
        "machine": {
            "cpus": os.cpu_count(),
            "ray_cpus": workers,
            "python": platform.python_version(),
            "load_average_before": [round(x, 1) for x in load_before],
            "load_average_after": [round(x, 1) for x in os.getloadavg()],
            "note": "shared machine: absolute figures vary with load; compare the ratio",
        },
        "patients": args.patients,
        "imported_patients": patients,
        "meds_events": events,
        "meds_files": len(files),
        "meds_bytes": sum(f.stat().st_size for f in files),
        "inputs": inputs,
        "pairs": pairs,
        "import_events_per_s": max(p["import_events_per_s"] for p in pairs),
        "scan_events_per_s": max(p["scan_events_per_s"] for p in pairs),
        "ratio_import_over_scan": float(np.median(ratios)),
        "baseline": "single-process pq.ParquetFile.iter_batches over every column of every MEDS data shard",
        "seconds": round(time.perf_counter() - began, 1),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nMEDS events    {events:,} from {args.patients:,} patients in {len(files)} shards")
    print(f"import         {results['import_events_per_s']:>12,} events/s (best pass, {workers} Ray CPUs)")
    print(f"pyarrow scan   {results['scan_events_per_s']:>12,} events/s (best pass, one process)")
    print(f"ratio          {results['ratio_import_over_scan']:.3f} import / scan (median of pairs {ratios})")
    print(f"written to     {RESULTS}")


if __name__ == "__main__":
    main()
