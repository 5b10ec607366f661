"""The mission's scale for real: generate 100M patients with the whole record, then stream one
full epoch of every data view through the reader (read, validate, filter, collate), no training.

    make bench-scale                                   # 100M, against the same pass at 1M
    .venv/bin/python bench/bench_scale.py --patients 10000000 --reference 1000000

For each size, in a fresh child process with its own local Ray (all of this machine's CPUs):
1. ``generate_dataset``: simulate and write the dataset (every modality, ground truth, trial);
2. per view in ``mirror.data.views.VIEWS``: ``view.read(train)`` + ``view.batches`` over the
   whole train split, counting patients and the view's units.
The parent samples the whole process tree (driver, raylet, GCS, Ray workers and tasks) every
half second: the sum of PSS (so the shared object store is counted once), attributed to the
phase the child reports. Recorded per phase: wall time, patients/s, and peak PSS; per dataset:
bytes on disk per patient (data, ground truth, trial). The dataset is deleted afterwards
(``--keep`` keeps it). Before the big size, free disk is checked against the reference's bytes
per patient; a run that cannot fit stops with the figures rather than filling the disk.

Writes ``bench/results/scale_100m.json`` (``--out`` for other sizes). Timings on this shared
2-core machine move with its load; the reference pass in the same run is the yardstick.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
from process_memory import tree_memory

from mirror.data import schema

RESULTS = Path(__file__).resolve().parent / "results" / "scale_100m.json"
WORKDIR = Path("/tmp/mirror-scale")
BATCH_SIZE = 512
SEED = 0
SAMPLE_EVERY_S = 0.5
DISK_MARGIN = 1.15  # the estimate's headroom: Parquet sizes vary a little with N


def log(message: str) -> None:
    print(f"[bench-scale {time.strftime('%H:%M:%S')}] {message}", flush=True)


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


# --------------------------------------------------------------------------------------------
# The child: generate, then stream every view; reports its phase through a JSON file.


def child(root: Path, n_patients: int, status: Path, views: list[str] | None) -> None:
    import ray
    import ray.data

    from mirror.data import simulator
    from mirror.data.trial import auto_trial_participants
    from mirror.data.views import VIEWS

    def report(phase: str, **figures) -> None:
        state = json.loads(status.read_text()) if status.exists() else {"phases": {}}
        state["phase"] = phase
        state["phases"].update(figures)
        status.write_text(json.dumps(state))

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    cpus = int(ray.cluster_resources().get("CPU", 1))
    report("idle")
    time.sleep(2 * SAMPLE_EVERY_S)

    report("generate")
    began = time.perf_counter()
    meta = simulator.generate_dataset(root, n_patients, seed=SEED, workers=cpus, overwrite=True,
                                      trial_participants=auto_trial_participants(n_patients))
    report("generated", generate={"wall_s": round(time.perf_counter() - began, 1), "workers": cpus,
                                  "modalities": meta.modalities, "trial": bool(meta.trial)})

    for name in views or list(VIEWS):
        view_cls = VIEWS[name]
        view = view_cls(view_cls.config_cls(), str(root))
        report(f"stream:{name}")
        began = time.perf_counter()
        dataset, filtered = view.read(schema.TRAIN, purpose="train")
        rows = units = batches = 0  # a batch row is the view's example: a patient, a window ...
        for batch in view.batches(dataset, BATCH_SIZE, training=True, device="cpu"):
            rows += batch.size
            units += view.units(batch)
            batches += 1
        report(f"streamed:{name}", **{f"stream:{name}": {
            "wall_s": round(time.perf_counter() - began, 1),
            "patients": filtered.as_dict().get("patients", rows),  # patients read
            "batch_rows": rows,
            view.unit: units,
            "batches": batches,
            "filter": filtered.as_dict(),
        }})
    report("done")


# --------------------------------------------------------------------------------------------
# The parent: runs one size in a child and samples its process tree.


def run_size(n_patients: int, workdir: Path, keep: bool, views: list[str] | None = None) -> dict:
    root = workdir / f"scale-{n_patients}"
    status = workdir / f"status-{n_patients}.json"
    status.unlink(missing_ok=True)
    log_path = workdir / f"child-{n_patients}.log"
    log(f"{n_patients:,} patients: generating and streaming in {root} (log {log_path})")
    began = time.perf_counter()
    with log_path.open("w") as child_log:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", str(root), "--child-patients", str(n_patients),
             "--child-status", str(status), *(["--child-views", *views] if views else [])],
            stdout=child_log, stderr=subprocess.STDOUT,
        )
    process = psutil.Process(proc.pid)
    peak: dict[str, int] = {}
    last_phase = None
    while proc.poll() is None:
        try:
            phase = json.loads(status.read_text())["phase"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            phase = "starting"
        if phase != last_phase:
            log(f"  phase {phase}")
            last_phase = phase
        key = phase.replace("streamed:", "stream:").replace("generated", "generate")
        peak[key] = max(peak.get(key, 0), tree_memory(process)[0])
        time.sleep(SAMPLE_EVERY_S)
    if proc.wait() != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-25:])
        raise RuntimeError(f"{n_patients:,}-patient run failed ({proc.returncode}); {log_path}:\n{tail}")
    state = json.loads(status.read_text())
    disk = {
        "data": directory_bytes(root / schema.DATA_DIR),
        "trial": directory_bytes(root / schema.TRIAL_DIR),
        "ground_truth": directory_bytes(root / schema.GROUND_TRUTH_DIR),
        "metadata": directory_bytes(root / schema.METADATA_DIR),
    }
    meta = schema.DatasetMetadata.read(root)
    phases = state["phases"]
    for name, figures in phases.items():
        figures["patients_per_s"] = round(
            (figures.get("patients") or n_patients) / max(figures["wall_s"], 1e-9)
        )
        figures["peak_pss_mib"] = round(peak.get(name, 0) / 2**20)
    result = {
        "patients": n_patients,
        "train_patients": meta.patients[schema.TRAIN],
        "wall_s": round(time.perf_counter() - began, 1),
        "phases": phases,
        "idle_ray_pss_mib": round(peak.get("idle", 0) / 2**20),
        "peak_pss_mib": round(max(peak.values()) / 2**20),
        "disk_bytes": disk,
        "bytes_per_patient": {k: round(v / n_patients, 1) for k, v in disk.items()}
        | {"total": round(sum(disk.values()) / n_patients, 1)},
        "events": meta.extra.get("events"),
    }
    if not keep:
        shutil.rmtree(root)
        log(f"  deleted {root}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=100_000_000)
    parser.add_argument("--reference", type=int, default=1_000_000, help="the yardstick size")
    parser.add_argument("--workdir", type=Path, default=WORKDIR)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep the datasets")
    parser.add_argument("--big-views", nargs="+", metavar="VIEW",
                        help="views streamed at the big size (default: every view; the reference "
                             "always streams every view, so a skipped one can be projected)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-patients", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-status", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-views", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.child_patients, args.child_status, args.child_views)
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    reference = run_size(args.reference, args.workdir, args.keep)
    per_patient = reference["bytes_per_patient"]["total"]
    needed = per_patient * args.patients * DISK_MARGIN
    free = shutil.disk_usage(args.workdir).free
    results = {
        "bench": "scale",
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(),
            "load_average_before": [round(x, 1) for x in load_before],
            "note": "shared machine: absolute figures vary with load; compare with the reference",
        },
        "reference": reference,
        "disk_check": {"free_gib": round(free / 2**30, 1), "needed_gib": round(needed / 2**30, 1)},
    }
    if needed > free:
        results["big"] = None
        results["not_run"] = (
            f"{args.patients:,} patients need about {needed / 2**30:.0f} GiB "
            f"({per_patient:.0f} B/patient x {DISK_MARGIN}) but {args.workdir} has {free / 2**30:.0f} GiB free"
        )
        log(results["not_run"])
    else:
        big = run_size(args.patients, args.workdir, args.keep, args.big_views)
        results["big"] = big
        results["ratios_big_over_reference"] = {
            "peak_pss": round(big["peak_pss_mib"] / max(reference["peak_pss_mib"], 1), 3),
            "bytes_per_patient": round(big["bytes_per_patient"]["total"] / per_patient, 3),
            **{
                f"{name}_patients_per_s": round(
                    figures["patients_per_s"] / max(reference["phases"][name]["patients_per_s"], 1), 3
                )
                for name, figures in big["phases"].items()
            },
        }
        skipped = [name for name in reference["phases"] if name not in big["phases"]]
        if skipped:  # projected linearly from the reference, and said so
            results["big_projected_wall_s"] = {
                name: round(reference["phases"][name]["wall_s"] * args.patients / args.reference)
                for name in skipped
            }
    results["machine"]["load_average_after"] = [round(x, 1) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    print()
    for label, r in (("reference", reference), ("big", results.get("big"))):
        if not r:
            continue
        print(f"{label:10s} {r['patients']:>12,} patients, {r['wall_s']:,} s in all, "
              f"{r['bytes_per_patient']['total']} B/patient on disk, peak {r['peak_pss_mib']:,} MiB PSS")
        for name, figures in r["phases"].items():
            print(f"           {name:22s} {figures['wall_s']:>9,} s {figures['patients_per_s']:>10,} patients/s "
                  f"peak {figures['peak_pss_mib']:,} MiB")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
