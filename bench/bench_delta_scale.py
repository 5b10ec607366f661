"""The Δ estimator at scale: patients/s and peak memory of ``jobs/estimate_delta.py``, per
``--controls`` setting, on one simulated population, in one script so the arms share the box.

    make bench-delta DELTA_ARGS="--patients 1000000 [--data DIR] [--controls 1 8] [--out FILE]"

Generates the population with ``jobs/generate.py`` unless ``--data`` holds one, then runs the
job once per setting as a subprocess (its own Ray instance, ``--no-mlflow``). Memory is
sampled every 0.25 s with psutil: the driver's RSS, and the summed PSS of its whole process
tree (GCS, raylet, workers; RSS summed too, for reference: it counts the shared object store
once per process mapping it). Reported: the estimator's
own seconds (from its ``delta.json``: Ray's start excluded), wall seconds, patients/s, and each
arm's figures as ratios to the first arm's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from process_memory import tree_memory
from results_file import write_results

ROOT = Path(__file__).resolve().parents[1]


class PeakMemory:
    """Peak memory of one process and of its whole tree (driver, GCS, raylet, workers)."""

    def __init__(self, pid: int, interval_s: float = 0.25) -> None:
        self.root, self.interval_s = psutil.Process(pid), interval_s
        self.driver_rss = self.tree_pss = self.tree_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pss, rss = tree_memory(self.root)
            if not rss:  # the job has exited
                break
            try:
                self.driver_rss = max(self.driver_rss, self.root.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            self.tree_pss, self.tree_rss = max(self.tree_pss, pss), max(self.tree_rss, rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_arm(data: Path, controls: int, patients: int) -> dict:
    name = f"bench_controls{controls}"
    cmd = [sys.executable, "jobs/estimate_delta.py", "--data", str(data), "--name", name,
           "--controls", str(controls), "--no-mlflow"]
    env = os.environ | {"PYTHONPATH": str(ROOT / "platform")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with PeakMemory(proc.pid) as peak:
        _, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"estimate_delta --controls {controls} failed:\n{err[-3000:]}")
    report = json.loads((data / "delta" / name / "delta.json").read_text())
    return {"controls": controls, "estimator_s": round(report["seconds"], 1), "wall_s": round(wall, 1),
            "patients_per_s": round(patients / report["seconds"]), "driver_peak_rss_gib": round(peak.driver_rss / 2**30, 2),
            "tree_peak_pss_gib": round(peak.tree_pss / 2**30, 2), "tree_peak_rss_gib": round(peak.tree_rss / 2**30, 2), "treated": report["totals"]["treated"],
            "matched": report["totals"]["matched"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=None, help="a simulated population (generated when absent)")
    parser.add_argument("--controls", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "delta_scale.json")
    args = parser.parse_args()
    data = args.data or Path(f"/tmp/mirror-bench-delta-{args.patients}")
    if not (data / "metadata" / "dataset.json").exists():
        subprocess.run([sys.executable, "jobs/generate.py", "--patients", str(args.patients), "--seed", str(args.seed),
                        "--out", str(data), "--overwrite"], cwd=ROOT, check=True,
                       env=os.environ | {"PYTHONPATH": str(ROOT / "platform")})
    arms = [run_arm(data, k, args.patients) for k in args.controls]
    for arm in arms:
        print(json.dumps(arm))
    base = arms[0]
    write_results(args.out, {
        "what": "jobs/estimate_delta.py on one simulated population per --controls setting, one after the other in one "
                "script; ratios are to the first setting",
        "patients": args.patients, "seed": args.seed, "cpus": os.cpu_count(), "arms": arms,
        "ratios_to_first": [{"controls": a["controls"], "estimator_s": round(a["estimator_s"] / base["estimator_s"], 2),
                             "tree_peak_pss": round(a["tree_peak_pss_gib"] / max(base["tree_peak_pss_gib"], 1e-9), 2),
                             "driver_peak_rss": round(a["driver_peak_rss_gib"] / max(base["driver_peak_rss_gib"], 1e-9), 2)}
                            for a in arms],
    })


if __name__ == "__main__":
    main()
