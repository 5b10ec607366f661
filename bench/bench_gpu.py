"""GPU sizing for every registered model (``make bench-gpu``): throughput, memory, largest batch.

Prepared before a GPU is lent, so that one short run (under 8 minutes on one CUDA device)
answers "how many GPUs, and for how long, does a 100M-patient run need?". For every model in
the registry, at the sizes seed 000 suggests (models.md §1-2: 4 GRU heads x 256 units,
embeddings 256 / 64, aggregation 512; latent 64 to 1024), in bf16 autocast as the training
loop runs on GPU:

* ``tokens_per_s`` and ``patients_per_s``: training steps (``LocalStepContext``, the loop's
  step: backward, clipping, optimizer steps, every LR schedule) on batches collated from a
  simulated dataset, so sentence lengths follow the simulator's heavy-tailed distribution;
* ``peak_memory_gib``: ``torch.cuda.max_memory_allocated`` over those steps;
* ``max_batch``: the largest batch of worst-case sentences (every patient at ``max_words``
  words) that completes a training step, by doubling then bisection on
  ``torch.cuda.OutOfMemoryError``. Worst case, because a training batch is padded to its
  longest sentence and one long patient per batch is the rule at this batch size.

Results go to ``bench/results/gpu.json``; the README's 100M-patient sizing table is printed
from them (tokens per epoch = 100M x the simulated mean tokens per patient).

The simulated patients are made in-process (``simulate_block``: no Ray, no files), 20K of
them, about 20 s. Without CUDA it prints one line and exits 2 (``--device cpu --tiny`` runs the same code on
the CPU at toy sizes: the smoke test in ``tests/test_bench_gpu.py``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform as host
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results" / "gpu.json"
TARGET_PATIENTS = 100_000_000
NO_GPU_EXIT = 2

# Seed 000's suggested sizes (models.md §1-2); each model runs at the latent widths listed.
REAL_SCALE = {
    "dx_emb_dim": 256,
    "wk_emb_dim": 64,
    "n_heads": 4,
    "head_hidden": 256,
    "out_hidden": 512,
}
REAL_LATENTS = {"ae": (1024, 64), "wae": (64, 1024)}  # the first is the model's reference width
REAL_EXTRA = {"wae": {"cnn_channels": 32, "critic_hidden": 512, "critic_layers": 4}}
TINY_SCALE = {"dx_emb_dim": 8, "wk_emb_dim": 4, "n_heads": 2, "head_hidden": 8, "out_hidden": 16}
TINY_LATENTS = (8,)


@dataclass(frozen=True)
class Plan:
    """How much to measure: real sizes on a GPU, toy sizes for the CPU smoke test."""

    device: str
    scale: dict[str, int]
    latents: dict[str, tuple[int, ...]]
    patients: int  # simulated patients (length distribution and real batches)
    batch: int  # throughput batch (capped by the largest batch found)
    warmup_steps: int
    steps: int
    max_batch_cap: int  # the search stops here (a fit at the cap is reported as ">= cap")
    budget_s: float  # wall-clock budget of the whole run; later configs are skipped past it
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)


def make_plan(device: str, tiny: bool, budget_s: float) -> Plan:
    from mirror.models import MODELS

    # Sentence models only: the batches here are collated sentences (code-vector models are
    # sized by bench/bench_sampler.py and bench/bench_train.py).
    names = [n for n, spec in MODELS.items() if spec.view.name == "sequence"]
    if tiny:
        return Plan(device, TINY_SCALE, {n: TINY_LATENTS for n in names}, 300, 16, 1, 2, 32, budget_s)
    latents = {n: REAL_LATENTS.get(n, (64, 1024)) for n in names}
    return Plan(device, REAL_SCALE, latents, 20_000, 512, 3, 20, 16_384, budget_s, REAL_EXTRA)


def simulate_rows(patients: int):
    """Simulated patients in the row layout, in this process (``simulate_block``: no Ray, no
    files), kept to the training length range; and the dataset's week span."""
    import pyarrow.compute as pc

    from mirror.data import schema
    from mirror.data.simulator import SimulatorParams, simulate_block

    params = SimulatorParams.from_seed(11)
    rows, _ = simulate_block(params, 11, 0, patients)
    n = rows.column(schema.N_EVENTS)
    keep = pc.and_(pc.greater_equal(n, schema.MIN_WORDS), pc.less_equal(n, schema.MAX_WORDS))
    return rows.filter(keep), params.n_weeks


def simulated_batches(rows, n_weeks: int, batch: int, mask: bool = True) -> Iterator[Any]:
    """Forever: collated batches of ``batch`` simulated patients (lengths as simulated), with
    the training mask."""
    from mirror.data.collate import CollateConfig, MaskSpec, collate

    config = CollateConfig(n_weeks, mask=MaskSpec("training") if mask else None)
    while True:
        for start in range(0, rows.num_rows - batch + 1, batch):
            yield collate(rows.slice(start, batch), config)


def worst_case_batch(batch: int, n_weeks: int, max_words: int, device: str):
    """``batch`` patients of ``max_words`` words each (the padded shape a batch can reach)."""
    from mirror.data.batch import SequenceBatch
    from mirror.data.vocab import EOS, N_SPECIAL, SOS

    gen = torch.Generator().manual_seed(0)
    words = torch.randint(N_SPECIAL, N_SPECIAL + 24 * 600, (batch, max_words), generator=gen)
    weeks = torch.randint(N_SPECIAL, N_SPECIAL + n_weeks, (batch, max_words), generator=gen).sort(1).values

    def before(token: int, body: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.full((batch, 1), token), body], 1)  # (B, L + 1)

    def after(body: torch.Tensor, token: int) -> torch.Tensor:
        return torch.cat([body, torch.full((batch, 1), token)], 1)

    return SequenceBatch(
        subject_id=torch.arange(batch),
        sex=torch.ones(batch),
        lengths=torch.full((batch,), max_words),
        enc_dx=before(EOS, words.flip(1)),
        enc_wk=before(EOS, weeks.flip(1)),
        dec_dx=before(SOS, words),
        dec_wk=before(SOS, weeks),
        tgt_dx=after(words, EOS),
        tgt_wk=after(weeks, EOS),
        masked=torch.zeros(batch, max_words, dtype=torch.bool),
    ).to(device)


def make_context(model, device: str, total_steps: int):
    from mirror.models.local_step import LocalStepContext
    from mirror.train.schedule import make_schedulers
    from mirror.train.spec import TrainConfig

    optimizers = model.make_optimizers()
    cfg = TrainConfig()
    schedulers = make_schedulers(optimizers, total_steps, cfg.warmup_fraction, cfg.min_lr_ratio)
    return LocalStepContext(model, optimizers, cfg.grad_clip, schedulers, torch.device(device))


def is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def largest_batch(fits: Callable[[int], bool], start: int, cap: int) -> tuple[int, bool]:
    """The largest b <= cap with ``fits(b)``, for a monotone ``fits`` (True up to some size):
    double from ``start`` to the first failure, then bisect to within ~3%. Returns (b, hit_cap);
    b = 0 when nothing fits."""
    start = min(start, cap)
    if fits(start):
        lo = start
        while True:
            step = min(lo * 2, cap)
            if step == lo:
                return lo, True
            if not fits(step):
                hi = step
                break
            lo = step
    else:
        lo, hi = 0, start
    while hi - lo > max(1, lo // 32):
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, False


def measure(name: str, latent: int, plan: Plan, rows, n_weeks: int, mean_tokens: float) -> dict[str, Any]:
    from mirror.data.batch import SequenceInfo
    from mirror.models import build_model

    cuda = plan.device == "cuda"
    overrides = {**plan.scale, "latent_dim": latent, **plan.extra.get(name, {})}
    info = SequenceInfo(week_vocab_size=n_weeks + 3)
    torch.manual_seed(0)
    model = build_model(name, overrides, info).to(plan.device)
    n_params = sum(p.numel() for p in model.parameters())

    def fits(batch: int) -> bool:
        """One training step on ``batch`` worst-case patients; False on out-of-memory."""
        ctx = make_context(model, plan.device, 10)
        ctx.global_step = 10_001  # a mid-run step, as measured below
        oom = False
        try:
            ctx.train_step(worst_case_batch(batch, n_weeks, info.max_words, plan.device))
            if cuda:
                torch.cuda.synchronize()
        except Exception as err:  # noqa: BLE001 - only OOM is an answer; anything else re-raised
            if not is_oom(err):
                raise
            oom = True
        # Outside the except block, so the traceback (and the tensors its frames hold) is gone.
        del ctx
        for p in model.parameters():
            p.grad = None
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
        return not oom

    start = time.perf_counter()
    max_batch, hit_cap = largest_batch(fits, 64 if cuda else 4, plan.max_batch_cap)
    search_s = time.perf_counter() - start

    batch = min(plan.batch, max_batch) if max_batch else plan.batch
    batches = simulated_batches(rows, n_weeks, batch)
    ctx = make_context(model, plan.device, plan.warmup_steps + plan.steps)
    # A mid-run step number: steady state, past the early phases that depend on the step
    # (the WGAN critic's 100-step warm-up, λ's warm-up); every 500th step's critic boost
    # (+19% critic steps on average, on a critic far smaller than the GRUs) is left out.
    ctx.global_step = 10_001
    for _ in range(plan.warmup_steps):
        ctx.train_step(next(batches).to(plan.device))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tokens = patients = 0
    start = time.perf_counter()
    for _ in range(plan.steps):
        b = next(batches)
        tokens += b.n_tokens
        patients += b.size
        ctx.train_step(b.to(plan.device))
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens_per_s = tokens / seconds
    gpu_hours = TARGET_PATIENTS * mean_tokens / tokens_per_s / 3600
    return {
        "model": name,
        "latent_dim": latent,
        "config": overrides,
        "parameters": n_params,
        "dtype": "bf16 autocast" if cuda else "fp32",
        "batch": batch,
        "steps": plan.steps,
        "tokens_per_s": tokens_per_s,
        "patients_per_s": patients / seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "max_batch_worst_case": max_batch,
        "max_batch_at_cap": hit_cap,
        "max_batch_search_s": search_s,
        "gpu_hours_per_epoch_100m": gpu_hours,
    }


def sizing_table(results: list[dict[str, Any]], mean_tokens: float) -> str:
    """The README's 100M-patient sizing, one row per measured configuration."""
    lines = [
        f"100M patients x {mean_tokens:.1f} predicted tokens each (simulated mean) = "
        f"{TARGET_PATIENTS * mean_tokens / 1e9:.2f}B tokens per epoch; linear DDP scaling assumed.",
        "",
        "| model | latent | params | tokens/s/GPU | peak GiB (batch) | max batch (100 words) "
        "| GPU-h/epoch | epoch on 8 GPUs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        peak = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        cap = ">=" if r["max_batch_at_cap"] else ""
        lines.append(
            f"| {r['model']} | {r['latent_dim']} | {r['parameters'] / 1e6:.1f}M | {r['tokens_per_s']:,.0f} "
            f"| {peak} ({r['batch']}) | {cap}{r['max_batch_worst_case']} "
            f"| {r['gpu_hours_per_epoch_100m']:.1f} | {r['gpu_hours_per_epoch_100m'] / 8:.1f} h |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="toy sizes and few steps (CPU smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip configs started past this")
    parser.add_argument("--batch", type=int, help="throughput batch (default: 512; 16 with --tiny)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"bench-gpu: no CUDA device here (torch {torch.__version__}); run `make bench-gpu` on a GPU "
            "machine (or `bench/bench_gpu.py --device cpu --tiny` for the CPU smoke run)",
            file=sys.stderr,
        )
        return NO_GPU_EXIT

    started = time.perf_counter()
    plan = make_plan(args.device, args.tiny, args.budget_s)
    if args.batch:
        plan = replace(plan, batch=args.batch)
    if plan.device == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    rows, n_weeks = simulate_rows(plan.patients)
    probe = next(simulated_batches(rows, n_weeks, min(rows.num_rows, 4096), mask=False))
    mean_tokens = probe.n_tokens / probe.size  # words + the closing <EOS>, per patient

    results, skipped = [], []

    def save() -> dict:
        """Written after every config, so a run cut short by its lease keeps what it measured."""
        out = {
            "device": torch.cuda.get_device_name(0) if plan.device == "cuda" else f"cpu ({host.processor() or host.machine()})",
            "torch": torch.__version__,
            "host": host.node(),
            "tiny": args.tiny,
            "simulated_patients": plan.patients,
            "mean_tokens_per_patient": mean_tokens,
            "target_patients": TARGET_PATIENTS,
            "seconds": time.perf_counter() - started,
            "skipped_over_budget": skipped,
            "results": results,
            "readme_sizing": sizing_table(results, mean_tokens),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
        return out

    for name, latents in plan.latents.items():
        for latent in latents:
            if time.perf_counter() - started > plan.budget_s:
                skipped.append(f"{name}/latent={latent}")
                continue
            row = measure(name, latent, plan, rows, n_weeks, mean_tokens)
            results.append(row)
            print(
                f"{name:4s} latent {latent:5d}: {row['tokens_per_s']:>12,.0f} tokens/s  "
                f"max batch {row['max_batch_worst_case']}  peak {row['peak_memory_gib'] or 0:.1f} GiB",
                flush=True,
            )
            save()
    out = save()
    print(f"\n{out['readme_sizing']}\n\nwrote {args.out} in {out['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
