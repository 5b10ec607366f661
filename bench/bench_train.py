"""Training throughput: Ray Train overhead and DDP scaling (``make bench-train``).

In one run, on the same simulated dataset, model (WAE, default config) and batch size:

* plain:  a plain PyTorch loop in this process: pyarrow reads, the same collate and mask,
          ``LocalStepContext`` steps; one torch thread (what one Ray worker gets).
* ray_1:  ``run_training`` with 1 TorchTrainer worker (1 CPU).
* ray_2:  the same with 2 DDP workers (gloo).

Throughput is predicted tokens per second over the *second* epoch (the first includes
worker start-up and warm-up), as the loop reports it in ``train/tokens_per_s``. Ratios are
what matter on a noisy machine: ``ray_overhead = 1 - ray_1 / plain`` (target <= 10%) and
``ddp_speedup = ray_2 / ray_1``. With a GPU, the plain loop also runs in bf16 on it and
reports tokens/s and peak GPU memory. Results: bench/results/train.json.
"""

from __future__ import annotations

import json
import os
import platform as host
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from mirror.data import schema
from mirror.data.batch import SequenceInfo
from mirror.data.collate import CollateConfig, MaskSpec, collate
from mirror.data.simulator import generate_dataset
from mirror.models import build_model
from mirror.models.local_step import LocalStepContext
from mirror.train.schedule import make_schedulers
from mirror.train.spec import TrainConfig

PATIENTS = int(os.environ.get("BENCH_TRAIN_PATIENTS", 30_000))
STEPS = int(os.environ.get("BENCH_TRAIN_STEPS", 40))
BATCH = 128
RESULTS = Path(__file__).parent / "results" / "train.json"


def plain_batches(root: Path, config: CollateConfig, split: str = schema.TRAIN, *, batch_size: int = BATCH,
                  forever: bool = True):
    """Pyarrow record batches of a split, length-filtered, collated (forever: in a loop)."""
    while True:
        for path in schema.split_files(root, split):
            for rb in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=schema.MODEL_COLUMNS):
                n = rb.column(schema.N_EVENTS)
                keep = pc.and_(pc.greater_equal(n, schema.MIN_WORDS), pc.less_equal(n, schema.MAX_WORDS))
                yield collate(rb.filter(keep), config)
        if not forever:
            return


def plain_tokens_per_s(root: Path, n_weeks: int, device: str = "cpu") -> tuple[float, float]:
    torch.manual_seed(0)
    model = build_model("wae", {}, SequenceInfo(week_vocab_size=n_weeks + 3)).to(device)
    optimizers = model.make_optimizers()
    # The Ray loop's schedules (one step per training step, for every optimizer), so that the
    # plain loop does the same work per step, LR schedule included.
    defaults = TrainConfig()
    schedulers = make_schedulers(optimizers, STEPS + 3, defaults.warmup_fraction, defaults.min_lr_ratio)
    ctx = LocalStepContext(model, optimizers, grad_clip=1.0, schedulers=schedulers, device=torch.device(device))
    batches = plain_batches(root, CollateConfig(n_weeks, mask=MaskSpec("training")))
    for _ in range(3):  # warm-up
        ctx.train_step(next(batches).to(device))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tokens, start = 0, time.perf_counter()
    for _ in range(STEPS):
        batch = next(batches)
        tokens += batch.n_tokens
        ctx.train_step(batch.to(device))
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    return tokens / seconds, peak


def ray_tokens_per_s(root: Path, workers: int, storage: Path) -> float:
    from mirror.train.driver import run_training
    from mirror.train.spec import build_run_spec

    spec = build_run_spec(
        "wae", str(root), f"bench-{workers}w-{int(time.time())}",
        {
            "train.workers": workers,
            "train.epochs": 2,
            "train.batch_size": BATCH,
            "train.max_steps_per_epoch": STEPS,
            "train.val_max_batches": 1,
            "train.storage_path": str(storage),
        },
    )
    return float(run_training(spec).metrics["train/tokens_per_s"])


def main() -> int:
    from mirror.cluster import ensure_ray

    torch.set_num_threads(1)
    ensure_ray(min_logical_cpus=5)  # once, sized for the 2-worker run plus reads and driver
    work = Path(tempfile.gettempdir()) / "mirror-bench-train"
    data = work / f"data-{PATIENTS}"
    if not (data / schema.DATASET_JSON).exists():
        generate_dataset(data, PATIENTS, seed=11, overwrite=True)
    n_weeks = schema.DatasetMetadata.read(data).n_weeks
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")

    plain, _ = plain_tokens_per_s(data, n_weeks)
    ray_1 = ray_tokens_per_s(data, 1, work / "ray_results")
    ray_2 = ray_tokens_per_s(data, 2, work / "ray_results")
    result = {
        "patients": PATIENTS,
        "steps_measured": STEPS,
        "batch_size": BATCH,
        "cpus": os.cpu_count(),
        "host": host.node(),
        "plain_tokens_per_s": plain,
        "ray_1_worker_tokens_per_s": ray_1,
        "ray_2_workers_tokens_per_s": ray_2,
        "ray_overhead": 1 - ray_1 / plain,
        "ddp_speedup_2_vs_1": ray_2 / ray_1,
    }
    if torch.cuda.is_available():
        result["gpu_bf16_tokens_per_s"], result["gpu_peak_memory_gib"] = plain_tokens_per_s(data, n_weeks, "cuda")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(
        f"\nplain {plain:,.0f} tok/s | Ray 1 worker {ray_1:,.0f} tok/s (overhead {result['ray_overhead']:.1%}) "
        f"| Ray 2 workers {ray_2:,.0f} tok/s (x{result['ddp_speedup_2_vs_1']:.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
