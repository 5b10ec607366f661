"""ScoEHR sampler speed at equal fidelity (``make bench-sampler``): the fast samplers against
upstream's 1,000-step Euler–Maruyama, on one trained ``scoehr_score`` run.

    python bench/bench_sampler.py --run RUN_ID [--patients 10240] [--reference-steps 1000]
        [--steps 5,10,25,50,100] [--samplers em,dpm2m_sde,dpm2m,heun] [--device cpu|cuda] [--batch 2048]
        [--out bench/results/sampler.json] [--log]

Every configuration draws the same ``--patients`` (the paper's 10,240) from the same seed in
batches, decodes them through the frozen autoencoder, and is timed end to end (sampling plus
decoding; synchronised on CUDA). Fidelity is DDM and PCD (``metrics.code_vector``) against as
many real training patients. A fast configuration is at *equal fidelity* when both its DDM and
its PCD are within ``--tolerance`` (5%) of the reference's, or no worse than the reference.
The report gives, per sampler, the fidelity-vs-steps curve, and the speed-up ratio of the
cheapest equal-fidelity configuration (the acceptance asks >= 20x). ``--log`` logs the curve
(PNG) and the figures to the run in MLflow. Results: bench/results/sampler.json.
"""

from __future__ import annotations

import argparse
import json
import platform as host
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import torch  # noqa: E402

from mirror.data import schema  # noqa: E402
from mirror.data.views.code_vector import code_vectors  # noqa: E402
from mirror.metrics import code_vector as CV  # noqa: E402
from mirror.models.vpsde import score_calls  # noqa: E402


def real_vectors(root: str, n: int | None, features: str, values: str, split: str = schema.TRAIN) -> sp.csr_matrix:
    """The first ``n`` (None: all) patients of ``split`` with >= 1 diagnosis, as sparse 0/1 code
    vectors, built batch by batch."""
    parts, rows = [], 0
    for path in schema.split_files(root, split):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=8192):
            table = pa.Table.from_batches([batch])
            table = table.filter(table.column(schema.N_EVENTS).to_numpy() >= 1)
            parts.append(sp.csr_matrix(np.minimum(code_vectors(table, features, values), 1)))
            rows += table.num_rows
            if n is not None and rows >= n:
                return sp.vstack(parts, format="csr")[:n]
    return sp.vstack(parts, format="csr")


def draw(model, sampler: str, steps: int, n: int, batch: int, device: str, seed: int) -> tuple[sp.csr_matrix, float, float]:
    """n code vectors from one configuration, the seconds they took, and the share of draws
    that decoded to no code (decoded per the run's ``empty_decode``)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    began = time.perf_counter()
    parts = [model.sample_vectors(min(batch, n - i), generator=generator, sampler=sampler, steps=steps) for i in range(0, n, batch)]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    x, empty = torch.cat([p[0] for p in parts]).cpu(), torch.cat([p[1] for p in parts]).cpu()
    return sp.csr_matrix(x.numpy()), seconds, float(empty.float().mean())


def fidelity(real: sp.csr_matrix, syn: sp.csr_matrix) -> dict[str, float]:
    return {"ddm": CV.ddm(real, syn), "pcd": CV.pcd(real, syn), "mean_codes": float(syn.sum(1).mean())}


def equal_fidelity(row: dict, reference: dict, tolerance: float) -> bool:
    return all(row[k] <= reference[k] * (1 + tolerance) for k in ("ddm", "pcd"))


def curve_plot(rows: list[dict], reference: dict, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("ddm", "pcd"), strict=True):
        for sampler in sorted({r["sampler"] for r in rows}):
            pts = sorted((r["score_calls"], r[key]) for r in rows if r["sampler"] == sampler)
            ax.plot(*zip(*pts, strict=True), marker="o", label=sampler)
        ax.axhline(reference[key], color="k", ls="--", label=f"em x{reference['steps']}")
        ax.axhline(reference[key] * 1.05, color="k", ls=":", lw=0.8, label="+5%")
        ax.set_xscale("log")
        ax.set_xlabel("score-network calls")
        ax.set_ylabel(key.upper())
        ax.legend()
    fig.suptitle("ScoEHR fidelity vs sampler steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def measure(
    model, real: sp.csr_matrix, ceiling: sp.csr_matrix, *, samplers: list[str], steps: list[int], reference_steps: int,
    device: str, batch: int, tolerance: float, seed: int,
) -> dict:
    """The reference (EM x ``reference_steps``) and every sampler x steps, each drawing as many
    patients as ``real`` holds from ``seed``: seconds, fidelity against ``real``, speed-up and
    equal fidelity; the fastest equal-fidelity row; and ``real`` against ``ceiling`` (more
    real patients), the fidelity no sampler can beat."""
    n = real.shape[0]
    syn, seconds, empty = draw(model, "em", reference_steps, n, batch, device, seed)
    reference = {"sampler": "em", "steps": reference_steps, "score_calls": reference_steps, "seconds": seconds, "empty_decodes": empty, **fidelity(real, syn)}
    print(json.dumps(reference), flush=True)
    rows = []
    for sampler in samplers:
        for k in steps:
            syn, seconds, empty = draw(model, sampler, k, n, batch, device, seed)
            row = {"sampler": sampler, "steps": k, "score_calls": score_calls(sampler, k), "seconds": seconds, "empty_decodes": empty, **fidelity(real, syn)}
            row["speedup"] = reference["seconds"] / seconds
            row["equal_fidelity"] = equal_fidelity(row, reference, tolerance)
            rows.append(row)
            print(json.dumps(row), flush=True)
    ok = [r for r in rows if r["equal_fidelity"]]
    best = max(ok, key=lambda r: r["speedup"]) if ok else None
    return {
        "patients": n, "device": device, "batch": batch, "tolerance": tolerance, "reference": reference, "rows": rows,
        "best": best, "real_vs_real": fidelity(real, ceiling) if ceiling.shape[0] == n else None,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="MLflow run id of a trained scoehr_score run")
    parser.add_argument("--patients", type=int, default=10_240)
    parser.add_argument("--reference-steps", type=int, default=1000)
    parser.add_argument("--steps", default="5,10,25,50,100")
    parser.add_argument("--samplers", default="em,dpm2m_sde,dpm2m,heun")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/sampler.json")
    parser.add_argument("--log", action="store_true", help="log the curve and figures to the run")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from mirror import tracking
    from mirror.checkpoint import load_run
    from mirror.models import require_capability

    loaded = load_run(args.run)
    require_capability(loaded.model_spec, "generator", "bench_sampler")
    model = loaded.model.to(args.device)
    info = loaded.data_info
    both = real_vectors(loaded.spec.data, 2 * args.patients, info.features, info.values)
    real, ceiling = both[: args.patients], both[args.patients:]
    print(f"run {args.run}: {loaded.spec.model}, {real.shape[0]} patients, device {args.device}", flush=True)
    result = {
        "run": args.run, "threads": args.threads, "host": host.node(),
        **measure(model, real, ceiling, samplers=args.samplers.split(","), steps=[int(s) for s in args.steps.split(",")],
                  reference_steps=args.reference_steps, device=args.device, batch=args.batch, tolerance=args.tolerance, seed=args.seed),
        "model_config": loaded.spec.model_config,
    }  # fmt: skip
    rows, reference, best = result["rows"], result["reference"], result["best"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot = curve_plot(rows, reference, out.with_suffix(".png"))
    if best:
        print(f"fastest at equal fidelity: {best['sampler']} x{best['steps']}: {best['speedup']:.1f}x faster than em x{args.reference_steps} "
              f"({best['seconds']:.1f}s vs {reference['seconds']:.1f}s; DDM {best['ddm']:.4g} vs {reference['ddm']:.4g}, PCD {best['pcd']:.3g} vs {reference['pcd']:.3g})")
    else:
        print("no fast configuration reached equal fidelity")
    if args.log:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "sampler.json").write_text(out.read_text())
            Path(tmp, plot.name).write_bytes(plot.read_bytes())
            tracking.log_artifacts(args.run, tmp, "sampler_bench")
        figures = {f"sampler/{r['sampler']}_{r['steps']}/{k}": r[k] for r in rows for k in ("ddm", "pcd", "seconds")}
        if best:
            figures["sampler/best_speedup"] = best["speedup"]
        tracking.log_metrics(args.run, figures)
    return 0 if best and best["speedup"] >= 20 else 1


if __name__ == "__main__":
    sys.exit(main())
