"""Scorecard benchmark: the full scorecard of 50K synthetic patients against 200K real ones, and
how its time and peak memory grow with the size of the real reference (50K -> 200K).

    make bench-metrics                   # writes bench/results/metrics.json, prints a summary
    .venv/bin/python bench/bench_metrics.py --sizes 50000,100000,200000 --synthetic 50000

Real datasets come from the simulator (seed 1); the synthetic set is an independent sample of
the same population (same seed, patient ids from 10M), so every metric has a realistic value.
Each size runs in a fresh subprocess with its own local Ray; the parent samples the whole
process tree (driver, raylet, GCS, Ray workers) with psutil: the sum of PSS (the shared-memory
object store counted once, not once per process that maps it) and, for reference, of RSS.
Times exclude Ray start-up. The machine is shared, so the load average is recorded and the
scaling figures are ratios between runs of this one script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from process_memory import tree_memory

RESULTS = Path(__file__).resolve().parent / "results" / "metrics.json"
SEED = 1
SYNTHETIC_FIRST_ID = 10_000_000
SHARD_PATIENTS = 12_500


def ensure_real(root: Path, n: int) -> None:
    from mirror.data import schema as S
    from mirror.data.simulator import generate_dataset

    if (root / S.DATASET_JSON).exists() and sum(
        S.DatasetMetadata.read(root).patients.values()
    ) == n:
        return
    generate_dataset(root, n, seed=SEED, overwrite=True)


def ensure_synthetic(root: Path, real_root: Path, n: int) -> None:
    from mirror.data import schema as S
    from mirror.data.simulator import SimulatorParams, simulate_block
    from mirror.metrics.records import block_from_arrow, write_dataset

    if (root / S.DATASET_JSON).exists() and S.DatasetMetadata.read(root).patients[S.TRAIN] == n:
        return
    params = SimulatorParams.from_seed(SEED)
    blocks = (
        block_from_arrow(
            simulate_block(params, SEED, SYNTHETIC_FIRST_ID + lo, min(SHARD_PATIENTS, n - lo))[0],
            n_weeks=params.n_weeks,
        )
        for lo in range(0, n, SHARD_PATIENTS)
    )
    write_dataset(
        root,
        blocks,
        like=S.DatasetMetadata.read(real_root),
        name=f"independent-{n}",
        provenance={"simulator_seed": SEED, "first_id": SYNTHETIC_FIRST_ID},
        real_root=real_root,
    )


def child(real: str, synthetic: str, max_queries: int, out: str) -> None:
    """One scorecard in this (fresh) process; writes timings and sizes to ``out``."""
    import resource

    from mirror.cluster import ensure_ray
    from mirror.metrics.scorecard import ScorecardError, compute_scorecard

    ensure_ray()
    profile: dict[str, float] = {}
    began = time.perf_counter()
    errors: dict[str, str] = {}
    try:
        card = compute_scorecard(real, synthetic, max_queries=max_queries, seed=0, profile=profile)
    except ScorecardError as err:
        card, errors = err.partial, err.errors
    seconds = time.perf_counter() - began
    Path(out).write_text(
        json.dumps(
            {
                "seconds": seconds,
                "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "stages": {k: round(v, 2) for k, v in profile.items()},
                "n_metrics": len(card),
                "errors": errors,
                "selected": {
                    k: card.get(k)
                    for k in (
                        "meta/n_train",
                        "meta/n_synthetic",
                        "meta/n_dcr_queries",
                        "fidelity/prevalence/r2",
                        "fidelity/cooccurrence/phi_r2_top100",
                        "fidelity/detection/auc",
                        "utility/auroc_ratio",
                        "privacy/mia/distance_auc",
                        "privacy/dcr/closer_to_train_excess",
                        "privacy/presence/sensitivity",
                        "privacy/nnaa/privacy_loss_half_ties",
                    )
                },
            },
            indent=1,
        )
    )


def run_size(real: Path, synthetic: Path, max_queries: int, work: Path) -> dict:
    out = work / f"child-{real.name}.json"
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", str(real), str(synthetic), str(max_queries), str(out)]
    )
    peak = {"pss_mb": 0.0, "rss_mb": 0.0}

    def sample() -> None:
        try:
            root = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while proc.poll() is None:
            pss, rss = (b / 2**20 for b in tree_memory(root))
            peak["pss_mb"], peak["rss_mb"] = max(peak["pss_mb"], pss), max(peak["rss_mb"], rss)
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    load_before = os.getloadavg()[0]
    sampler.start()
    if proc.wait() != 0:
        raise RuntimeError(f"scorecard child for {real} failed with exit code {proc.returncode}")
    sampler.join()
    result = json.loads(out.read_text())
    result.update(
        {
            "tree_peak_pss_mb": round(peak["pss_mb"]),
            "tree_peak_rss_mb": round(peak["rss_mb"]),
            "load_average_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        }
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", default="50000,100000,200000", help="real dataset sizes (patients)"
    )
    parser.add_argument("--synthetic", type=int, default=50_000)
    parser.add_argument("--max-queries", type=int, default=20_000)
    parser.add_argument("--work", default="/tmp/mirror-bench-metrics")
    parser.add_argument(
        "--child",
        nargs=4,
        metavar=("REAL", "SYNTHETIC", "MAX_QUERIES", "OUT"),
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args()
    if args.child:
        real, synthetic, max_queries, out = args.child
        child(real, synthetic, int(max_queries), out)
        return

    import ray

    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    for n in sizes:
        ensure_real(work / f"real-{n}", n)
    synthetic = work / f"synthetic-{args.synthetic}"
    ensure_synthetic(synthetic, work / f"real-{max(sizes)}", args.synthetic)
    ray.shutdown()
    print(f"datasets ready in {time.perf_counter() - began:.0f}s under {work}")

    runs = {}
    for n in sizes:
        runs[str(n)] = run_size(work / f"real-{n}", synthetic, args.max_queries, work)
        r = runs[str(n)]
        print(
            f"real {n:>7,}: scorecard {r['seconds']:6.1f}s  peak PSS {r['tree_peak_pss_mb']:6,} MB "
            f"(RSS {r['tree_peak_rss_mb']:,} MB, driver {r['driver_peak_rss_mb']:.0f} MB)  "
            f"{r['n_metrics']} metrics, {len(r['errors'])} errors, load {r['load_average_1min']}"
        )
    small, big = runs[str(min(sizes))], runs[str(max(sizes))]
    scaling = {
        "reference_ratio": max(sizes) / min(sizes),
        "time_ratio": round(big["seconds"] / small["seconds"], 2),
        "peak_pss_ratio": round(big["tree_peak_pss_mb"] / small["tree_peak_pss_mb"], 2),
    }
    print(
        f"{max(sizes):,} vs {min(sizes):,} real patients (x{scaling['reference_ratio']:g}): "
        f"time x{scaling['time_ratio']}, peak memory x{scaling['peak_pss_ratio']}"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "machine": {
                    "cpus": os.cpu_count(),
                    "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                    "python": platform.python_version(),
                },
                "synthetic_patients": args.synthetic,
                "max_queries": args.max_queries,
                "runs": runs,
                "scaling": scaling,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"results -> {RESULTS}")


if __name__ == "__main__":
    main()
