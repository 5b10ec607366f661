"""ScoEHR on a lent GPU, in one prepared call (issue 14): the sampler speed-up on the GPU, and
whether GPU-sized score nets trained much longer close the PCD gap that CPU-sized ones leave.

The GPU machine has no MLflow store, Ray or dataset: it gets the repository and what a call
carries (64 MiB). So the work is in three steps:

    here  python bench/bench_scoehr_gpu.py export --run RUN --out .gpu/bundle
    GPU   python bench/bench_scoehr_gpu.py device --bundle .gpu/bundle --out $OUT [--deadline 480]
    here  python bench/bench_scoehr_gpu.py score --bundle .gpu/bundle --draws $OUT/draws.npz
              --real DATA --out bench/results/scoehr_gpu_scorecards.json

* ``export``: the ``scoehr_score`` run's and its autoencoder's weights (their checkpoint files
  less the optimizer state, read back by ``load_state``) and the run's data as sparse 0/1 code
  vectors (train and tuning splits; patients with >= 1 code, as ``bench_sampler``): about
  20 MB at 200K patients.
* ``device``:
  1. ``bench_sampler.measure`` on the exported run (10,240 patients, EM x1,000 reference, every
     sampler x steps) on the GPU, at the CPU bench's batch (2,048) and at one batch of all
     10,240: the GPU figure of the >= 20x acceptance.
  2. ``ARMS``: fresh score nets on the same frozen autoencoder, each trained by the loop's own
     step (``LocalStepContext``: bf16 autocast, gradient clipping, warm-up + cosine sized in the
     steps taken) on shuffled train-split batches, for a number of epochs or a wall-clock
     budget (its step count set from a timed calibration, so the schedule runs to its end);
     validated by the run's own val DSM (tuning split, fixed seed); drawn 10,240 times per
     ``DRAWS`` sampler and scored on DDM and PCD against 10,240 real training patients. The draws
     come back as sparse matrices (``draws.npz``). The data sits on the GPU whole (a 200K-patient
     bench: 0.4 GB); the platform's own training streams it (``jobs/train.py``).
  A ``--deadline`` (seconds) shortens or skips the last arms so that the call returns in time.
* ``score``: each draw set becomes a synthetic dataset (``sample_patients`` over a generator
  that replays it) and is scored by ``jobs/score.py`` against the real data, as
  ``jobs/sample.py`` scores a run's own draws: DDM, PCD, log-cluster U, SRA, MIA, the gate.

``--tiny`` (device) runs every step at toy sizes on the CPU: the smoke test in
``tests/test_scoehr_pipeline.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform as host
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_sampler import curve_plot, draw, fidelity, measure, real_vectors  # noqa: E402

from mirror.checkpoint import CHECKPOINT_FILE, load_frozen, load_state, model_from_state  # noqa: E402
from mirror.data import schema  # noqa: E402
from mirror.models import build_model, get_model_spec  # noqa: E402
from mirror.models.local_step import LocalStepContext  # noqa: E402
from mirror.train.schedule import make_schedulers  # noqa: E402
from mirror.train.spec import TrainConfig  # noqa: E402

SCORE_MODEL = "scoehr_score"
KEPT = ("model", "spec", "data_info", "epoch", "global_step")  # what a sampling model needs


@dataclass(frozen=True)
class Arm:
    """One score net to train on the GPU: config overrides on the exported run's, a batch, and
    either ``epochs`` or a wall-clock ``seconds`` budget."""

    name: str
    overrides: dict = field(default_factory=dict)
    batch: int = 256
    epochs: int | None = None
    seconds: float | None = None
    seed: int = 1  # initial weights and batch order


# Four times the CPU default's width, 1.5x its depth (84M parameters against 3.7M); Adam's rate
# halved for the width.
WIDE = {"mlp_width": 2048, "mlp_blocks": 6, "lr": 5e-4}
ARMS = (
    # The CPU acceptance settings (2 workers x 128, 16 epochs, lr 1e-3) on one GPU: the control.
    Arm("mlp512x4_e16", {}, batch=256, epochs=16),
    # The wide net, trained far longer.
    Arm("mlp2048x6_long", WIDE, batch=1024, seconds=90),
    # The default net trained as long: separates training length from size.
    Arm("mlp512x4_long", {}, batch=1024, seconds=90),
    # The seed's UNet at upstream's width (128 channels, 32 groups).
    Arm("unet128_long", {"net": "unet", "ch": 128, "groups": 32}, batch=1024, seconds=90),
    # Second call: the wide net again from other initial weights and batch order, and for twice
    # the budget.
    Arm("mlp2048x6_long_seed2", WIDE, batch=1024, seconds=90, seed=2),
    Arm("mlp2048x6_longer", WIDE, batch=1024, seconds=180),
    # Session 26: that 114-epoch arm replicated from two other seeds, its length fixed in epochs
    # so that a calibration's timing cannot change what is compared.
    Arm("mlp2048x6_e114_seed2", WIDE, batch=1024, epochs=114, seed=2),
    Arm("mlp2048x6_e114_seed3", WIDE, batch=1024, epochs=114, seed=3),
)
FIRST_CALL = "mlp512x4_e16,mlp2048x6_long,mlp512x4_long,unet128_long"
TINY_ARMS = (
    Arm("mlp_e1", {"mlp_width": 16, "mlp_blocks": 1}, batch=16, epochs=1),
    Arm("unet_s", {"net": "unet", "ch": 8, "groups": 4, "levels": 2}, batch=16, seconds=2.0),
)
DRAWS = (("em", 50), ("dpm2m_sde", 40), ("em", 1000))
TINY_DRAWS = (("em", 5), ("dpm2m_sde", 4))


def strip(state: dict) -> dict:
    return {k: state[k] for k in KEPT if k in state}


def export(run_id: str, out: Path) -> None:
    """The run's and its autoencoder's weights, and its data as sparse code vectors."""
    from mirror.checkpoint import checkpoint_dir, upstream_checkpoint

    score_state = load_state(checkpoint_dir(run_id))
    spec = get_model_spec(score_state["spec"]["model"])
    _, ae_dir = upstream_checkpoint(score_state["spec"]["upstream_run"], spec)
    for name, state in (("score", score_state), ("ae", load_state(ae_dir))):
        (out / name).mkdir(parents=True, exist_ok=True)
        torch.save(strip(state), out / name / CHECKPOINT_FILE)
    info = score_state["data_info"]
    for split in (schema.TRAIN, schema.TUNING):
        x = real_vectors(score_state["spec"]["data"], None, info["features"], info["values"], split)
        sp.save_npz(out / f"{split}.npz", x.astype(np.float32))
        print(f"{split}: {x.shape[0]} patients, {x.nnz} codes")
    (out / "run.json").write_text(json.dumps({"run": run_id, "data": score_state["spec"]["data"]}) + "\n")


def load_bundle(bundle: Path, device: str):
    """The exported run as a model on ``device``, its frozen autoencoder, and its saved state."""
    spec = get_model_spec(SCORE_MODEL)
    ae = load_frozen(bundle / "ae", spec.upstream[0]).to(device)
    state = load_state(bundle / "score")
    model, run_spec, info = model_from_state(state, spec, upstream=ae)
    return model.to(device), ae, run_spec, info


def val_dsm(model, tuning: torch.Tensor, batch: int = 4096) -> float:
    """The run's val/loss: DSM per patient over the tuning split at fixed-seed times."""
    from mirror.data.views.code_vector import CodeVectorBatch

    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(tuning), batch):
            x = tuning[i: i + batch]
            ids = torch.arange(i, i + len(x), device=x.device)
            total += float(model.eval_sums(CodeVectorBatch(ids, x))["loss"])
    model.train()
    return total / len(tuning)


def train_arm(arm: Arm, base_config: dict, info, ae, train: torch.Tensor, tuning: torch.Tensor,
              seconds: float | None) -> tuple[torch.nn.Module, dict]:
    """A fresh score net per ``arm``, trained on ``train`` (dense, on the device) by the loop's
    step for ``arm.epochs`` or ``seconds``; its val DSM at five points and its speed."""
    from mirror.data.views.code_vector import CodeVectorBatch

    device = train.device
    defaults = TrainConfig()
    config = {**base_config, **arm.overrides}
    steps_per_epoch = len(train) // arm.batch

    def start(schedule_steps: int):
        """A fresh net from the arm's seed, its step context with the loop's schedule sized to
        ``schedule_steps``, and its shuffled batches from the same seed."""
        torch.manual_seed(arm.seed)
        model = build_model(SCORE_MODEL, config, info, upstream=ae).to(device)
        model.train()
        optimizers = model.make_optimizers()
        schedulers = make_schedulers(optimizers, schedule_steps, defaults.warmup_fraction, defaults.min_lr_ratio)
        return model, LocalStepContext(model, optimizers, defaults.grad_clip, schedulers, device), batches()

    def batches():
        generator = torch.Generator().manual_seed(arm.seed)
        while True:
            order = torch.randperm(len(train), generator=generator, device="cpu").to(device)
            for k in range(steps_per_epoch):
                idx = order[k * arm.batch: (k + 1) * arm.batch]
                yield CodeVectorBatch(idx, train[idx])

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if arm.epochs is not None:
        total_steps, step_s = arm.epochs * steps_per_epoch, None
    else:  # calibrate: time steps of a throwaway copy, then size the schedule to the budget
        model, ctx, stream = start(10**6)
        for _ in range(5):
            ctx.train_step(next(stream))
        sync()
        began = time.perf_counter()
        for _ in range(20):
            ctx.train_step(next(stream))
        sync()
        step_s = (time.perf_counter() - began) / 20
        total_steps = max(1, int(seconds / step_s))
        del model, ctx, stream
    model, ctx, stream = start(total_steps)
    checkpoints = {max(1, total_steps * k // 5) for k in range(1, 6)}
    history, losses = [], []
    sync()
    began = time.perf_counter()
    for step in range(1, total_steps + 1):
        losses.append(ctx.train_step(next(stream))["loss"])
        if step in checkpoints:
            history.append({"step": step, "epochs": step / steps_per_epoch, "train_dsm": float(np.mean(losses[-200:])), "val_dsm": val_dsm(model, tuning)})
            print(f"  {arm.name} step {step}/{total_steps}: {history[-1]}", flush=True)
    sync()
    elapsed = time.perf_counter() - began
    model.eval()
    params = sum(p.numel() for p in model.score_net.parameters())
    return model, {
        "arm": asdict(arm), "config": config, "parameters": params, "steps": total_steps,
        "epochs": total_steps / steps_per_epoch, "patients_seen": total_steps * arm.batch,
        "train_seconds": elapsed, "patients_per_s": total_steps * arm.batch / elapsed,
        "calibrated_step_s": step_s, "val_dsm": history[-1]["val_dsm"], "history": history,
    }  # fmt: skip


def device_main(args) -> int:
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if device == "cpu" and not args.tiny:
        print("no CUDA device: run with --tiny for the CPU smoke test", file=sys.stderr)
        return 2
    began = time.perf_counter()

    def left() -> float:
        return args.deadline - (time.perf_counter() - began)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = Path(args.bundle)
    model, ae, run_spec, info = load_bundle(bundle, device)
    train_cpu = sp.load_npz(bundle / f"{schema.TRAIN}.npz").tocsr()
    tuning_cpu = sp.load_npz(bundle / f"{schema.TUNING}.npz").tocsr()
    n = args.patients
    if args.tiny:  # toy sizes throughout, whatever the bundle holds
        train_cpu, tuning_cpu = train_cpu[: 8 * n], tuning_cpu[: 2 * n]
    real, ceiling = train_cpu[:n], train_cpu[n: 2 * n]
    result = {
        "host": host.node(), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__, "run": json.loads((bundle / "run.json").read_text()),
        "train_patients": train_cpu.shape[0], "tuning_patients": tuning_cpu.shape[0], "patients": n,
    }  # fmt: skip
    save = lambda: (out / "gpu.json").write_text(json.dumps(result, indent=1) + "\n")  # noqa: E731
    print(f"{result['device']}: run {result['run']['run']}, {train_cpu.shape[0]} train patients", flush=True)

    # 1. The sampler bench on the exported run, at the CPU bench's batch and at one batch.
    result["sampler"] = {}
    samplers, steps = (["em", "dpm2m_sde"], [2, 4]) if args.tiny else (["em", "dpm2m_sde", "dpm2m", "heun"], [5, 10, 25, 40, 50, 100])
    for batch in sorted({min(args.batch, n), n}) if args.sampler_bench else ():
        bench = measure(model, real, ceiling, samplers=samplers, steps=steps, reference_steps=20 if args.tiny else 1000,
                        device=device, batch=batch, tolerance=0.05, seed=0)  # fmt: skip
        result["sampler"][f"batch_{batch}"] = bench
        best = bench["best"]
        print(f"sampler bench, batch {batch}: em x{bench['reference']['steps']} {bench['reference']['seconds']:.2f}s; "
              + (f"fastest at equal fidelity {best['sampler']} x{best['steps']}: {best['speedup']:.1f}x" if best else "none at equal fidelity"), flush=True)
        save()
    if args.sampler_bench:
        curve_plot(bench["rows"], bench["reference"], out / "sampler_gpu.png")

    # 2. The arms: train, validate, draw.
    train = torch.tensor(train_cpu.toarray(), device=device)
    tuning = torch.tensor(tuning_cpu.toarray(), device=device)
    result["exported_run_val_dsm"] = val_dsm(model, tuning)
    del model
    draws: dict[str, np.ndarray] = {}
    result["arms"] = []
    by_name = {arm.name: arm for arm in (TINY_ARMS if args.tiny else ARMS)}
    names = args.arms or (",".join(by_name) if args.tiny else FIRST_CALL)
    for arm in [by_name[name] for name in names.split(",")]:
        reserve = args.draw_reserve
        seconds = arm.seconds
        if arm.seconds is not None:
            seconds = min(arm.seconds, left() - reserve)
            if seconds < arm.seconds / 4:
                print(f"{arm.name}: skipped, {left():.0f}s left", flush=True)
                result["arms"].append({"arm": asdict(arm), "skipped": f"{left():.0f}s left"})
                continue
        elif left() < reserve:
            result["arms"].append({"arm": asdict(arm), "skipped": f"{left():.0f}s left"})
            continue
        print(f"{arm.name}: training ({left():.0f}s left)", flush=True)
        net, report = train_arm(arm, run_spec.model_config, info, ae, train, tuning, seconds)
        report["draws"] = []
        for sampler, k in TINY_DRAWS if args.tiny else DRAWS[: args.draws]:
            if k >= 1000 and left() < 60:
                report["draws"].append({"sampler": sampler, "steps": k, "skipped": f"{left():.0f}s left"})
                continue
            syn, secs, empty = draw(net, sampler, k, n, n, device, seed=0)
            key = f"{arm.name}/{sampler}x{k}"
            draws[f"{key}/indices"], draws[f"{key}/indptr"] = syn.indices.astype(np.int32), syn.indptr.astype(np.int64)
            draws[f"{key}/shape"] = np.array(syn.shape)
            report["draws"].append({"sampler": sampler, "steps": k, "seconds": secs, "empty_decodes": empty, **fidelity(real, syn)})
            print(f"  {key}: {report['draws'][-1]}", flush=True)
        result["arms"].append(report)
        np.savez_compressed(out / "draws.npz", **draws)
        save()
        del net
    result["real_vs_real"] = fidelity(real, ceiling) if ceiling.shape[0] == n else None
    result["seconds"] = time.perf_counter() - began
    save()
    print(table(result), flush=True)
    return 0


def table(result: dict) -> str:
    lines = ["arm | params | epochs | val DSM | sampler | DDM | PCD | codes/draw"]
    for report in result["arms"]:
        if "skipped" in report:
            lines.append(f"{report['arm']['name']} | skipped ({report['skipped']})")
            continue
        for d in report["draws"]:
            if "skipped" not in d:
                lines.append(f"{report['arm']['name']} | {report['parameters'] / 1e6:.1f}M | {report['epochs']:.0f} | {report['val_dsm']:.3f} | "
                             f"{d['sampler']} x{d['steps']} | {d['ddm']:.5f} | {d['pcd']:.2f} | {d['mean_codes']:.2f}")
    if result.get("real_vs_real"):
        r = result["real_vs_real"]
        lines.append(f"real vs real | | | | | {r['ddm']:.5f} | {r['pcd']:.2f} | {r['mean_codes']:.2f}")
    return "\n".join(lines)


class ReplayGenerator:
    """A ``Generator`` that hands back stored draws in order, so that ``sample_patients`` writes
    them as a synthetic dataset exactly as it writes a run's own."""

    def __init__(self, x: sp.csr_matrix, info) -> None:
        self.x, self.info, self.position = x, info, 0

    def sample_rows(self, n: int, *, rng: torch.Generator, first_id: int, context):
        from mirror.data.views.code_vector import code_rows

        x = self.x[self.position: self.position + n].toarray()
        self.position += len(x)
        sex = np.where(torch.rand(len(x), generator=rng).numpy() < context.female_share, 1, -1)
        return code_rows(x, self.info, first_id, sex), {}


def score_main(args) -> int:
    from mirror.metrics.privacy import privacy_gate
    from mirror.synthesize import female_fraction, sample_patients

    _, _, _, info = load_bundle(Path(args.bundle), "cpu")
    stored = np.load(args.draws)
    keys = sorted({k.rsplit("/", 1)[0] for k in stored.files})
    if args.only:
        keys = [k for k in keys if any(part in k for part in args.only.split(","))]
    job = importlib.util.spec_from_file_location("score_job", Path(__file__).parents[1] / "jobs" / "score.py")
    score_job = importlib.util.module_from_spec(job)
    job.loader.exec_module(score_job)  # in this process: one Ray instance for every scorecard
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cards = {}
    record_type = get_model_spec(SCORE_MODEL).view.record_type
    with tempfile.TemporaryDirectory() as tmp:
        for key in keys:
            x = sp.csr_matrix((np.ones(len(stored[f"{key}/indices"]), np.float32), stored[f"{key}/indices"], stored[f"{key}/indptr"]),
                              shape=tuple(stored[f"{key}/shape"]))  # fmt: skip
            synthetic = Path(tmp) / key.replace("/", "_")
            sample_patients(ReplayGenerator(x, info), args.real, n_patients=x.shape[0], out_dir=synthetic,
                            female_share=female_fraction(args.real), record_type=record_type)  # fmt: skip
            card = synthetic / "scorecard.json"
            rc = score_job.main(["--real", args.real, "--synthetic", str(synthetic), "--out", str(card)])
            cards[key] = {"rc": rc, **(json.loads(card.read_text()) if card.exists() else {})}
            if rc == 0:  # the job prints the gate's verdict; keep it with the card
                gate = privacy_gate(cards[key])
                cards[key].update({"privacy/gate_passed": float(gate.passed), "privacy/gate_failures": gate.failures})
            print(key, {k: cards[key].get(k) for k in ("fidelity/code_vector/ddm", "fidelity/code_vector/pcd", "fidelity/code_vector/log_cluster", "privacy/gate_passed")}, flush=True)
            out.write_text(json.dumps(cards, indent=1) + "\n")  # after every card: a long run keeps what it scored
    return 0 if all(c["rc"] == 0 for c in cards.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("export", help="here: the run's weights and data as a bundle")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("device", help="on the GPU: the sampler bench and the arms")
    p.add_argument("--bundle", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--patients", type=int, default=10_240)
    p.add_argument("--batch", type=int, default=2048, help="the sampler bench's CPU batch")
    p.add_argument("--deadline", type=float, default=480.0, help="seconds the whole step may take")
    p.add_argument("--draw-reserve", type=float, default=45.0, help="seconds kept per arm for its draws")
    p.add_argument("--arms", help=f"comma-separated ARMS names (default: {FIRST_CALL})")
    p.add_argument("--draws", type=int, default=len(DRAWS), help="draw with the first N of DRAWS")
    p.add_argument("--no-sampler-bench", dest="sampler_bench", action="store_false", help="arms only")
    p.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (smoke test)")
    p = sub.add_parser("score", help="here: score the returned draws with the platform scorecard")
    p.add_argument("--bundle", required=True)
    p.add_argument("--draws", required=True)
    p.add_argument("--real", required=True, help="the real dataset the run trained on")
    p.add_argument("--only", help="comma-separated substrings of the draw keys to score")
    p.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.step == "export":
        export(args.run, Path(args.out))
        return 0
    return device_main(args) if args.step == "device" else score_main(args)


if __name__ == "__main__":
    sys.exit(main())
