"""Does a smoother stage-1 latent space fix ScoEHR's stage 2? One row per autoencoder setting.

    python bench/bench_scoehr_latent.py --data DIR [--work DIR] [--draws 2048]
        [--setting NAME=key=value,key=value ...] [--ae-epochs 10] [--score-epochs 4] [--max-steps N]
        [--score-set model.ch=16 ...] [--out bench/results/scoehr_latent.json]

Each setting trains ``scoehr_ae`` with its overrides (real Ray TorchTrainer runs, tracked in
MLflow at MLFLOW_TRACKING_URI), then the same small ``scoehr_score`` net for the same steps on
its frozen latents, then draws ``--draws`` patients with the score run's default sampler.
Reported per setting: the AE's held-out reconstruction (``val/bit_errors`` per patient,
``val/loss``), the share of draws that threshold to no code, and DDM, PCD and log-cluster U
(``metrics.code_vector``, G = 20) of the draws against ``--draws`` real training patients.
Two reference rows at the same size bound every number: the ceiling, a second disjoint
sample of real training patients, and the floor, the scorecard's independent-marginal sampler
(``marginal_sampler``), both reduced to condition vectors. Patients with no condition are left
out of every real and floor sample, and counted. Results are written after every setting.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
DEFAULT_SETTINGS = ("baseline=", "noise0.1=model.latent_noise=0.1", "noise0.2=model.latent_noise=0.2")


def parse_setting(text: str) -> tuple[str, dict[str, str]]:
    """``name=key=value,key=value`` -> (name, {key: value}); ``name=`` is the defaults."""
    from mirror.train.spec import parse_set

    name, _, rest = text.partition("=")
    return name, parse_set([kv for kv in rest.split(",") if kv])


def fidelity(real: sp.csr_matrix, syn: sp.csr_matrix, seed: int) -> dict[str, float]:
    from mirror.metrics import code_vector as CV

    u, at_limit = CV.log_cluster(real, syn, 20, seed)
    return {"ddm": CV.ddm(real, syn), "pcd": CV.pcd(real, syn), "log_cluster": u, "log_cluster_at_limit": at_limit,
            "mean_codes": float(syn.sum(1).mean())}  # fmt: skip


def condition_vectors(root: str, n: int, skip: int = 0) -> tuple[sp.csr_matrix, int]:
    """Training patients ``skip .. skip + n`` among those holding >= 1 condition, as 0/1
    condition vectors (streamed, one batch at a time), and how many patients with none were
    passed over."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mirror.data import schema
    from mirror.data.views.code_vector import code_vectors

    parts, kept, empty = [], 0, 0
    for path in schema.split_files(root, schema.TRAIN):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            x = sp.csr_matrix(np.minimum(code_vectors(pa.Table.from_batches([batch]), "conditions", "binary"), 1))
            held = np.asarray(x.sum(1)).ravel() > 0
            empty += int((~held).sum())
            parts.append(x[held])
            kept += int(held.sum())
            if kept >= skip + n:
                return sp.vstack(parts, format="csr")[skip : skip + n], empty
    raise SystemExit(f"{root}: {kept} training patients hold a condition; need {skip + n}")


def floor_vectors(data: str, n: int, seed: int, work: Path) -> tuple[sp.csr_matrix, int]:
    """n independent-marginal patients holding a condition: the scorecard's floor for a code-set
    generator (the marginals of the training patients reduced to their sets of conditions)."""
    from mirror.data import schema
    from mirror.metrics.marginal_sampler import write_independent_marginal_sample
    from mirror.metrics.views import scan_view

    n_weeks = schema.DatasetMetadata.read(data).n_weeks
    train = scan_view("train", data, [schema.TRAIN], n_weeks, n, seed, record_type="code_set")
    root = work / "floor"
    shutil.rmtree(root, ignore_errors=True)
    write_independent_marginal_sample(data, root, 2 * n, seed, summary=train.summary)
    try:
        return condition_vectors(str(root), n)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--work", default="/tmp/mirror-bench-scoehr-latent")
    parser.add_argument("--draws", type=int, default=2048)
    parser.add_argument("--setting", nargs="*", default=list(DEFAULT_SETTINGS))
    parser.add_argument("--ae-epochs", type=int, default=10)
    parser.add_argument("--score-epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--max-steps", type=int, default=0, help="cap steps per epoch (0: full epochs; smoke runs)")
    parser.add_argument("--score-set", nargs="*", default=["model.ch=16", "model.groups=4", "model.res_blocks=1"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "results" / "scoehr_latent.json"))
    parser.add_argument("--append", action="store_true", help="keep --out's settings (same data and sizes)")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    import torch
    from bench_sampler import draw

    from mirror import tracking
    from mirror.checkpoint import load_run
    from mirror.cluster import ensure_ray
    from mirror.train.driver import run_training
    from mirror.train.spec import build_run_spec, parse_set

    torch.set_num_threads(1)
    n = args.draws
    both, real_without = condition_vectors(args.data, 2 * n)
    real, ceiling = both[:n], both[n:]
    ensure_ray()
    floor, floor_without = floor_vectors(args.data, n, args.seed, work)
    result: dict = {
        "data": args.data, "draws": n, "args": vars(args),
        "left_out_without_conditions": {"real": real_without, "floor": floor_without},
        "references": {"ceiling (second real sample)": fidelity(real, ceiling, args.seed),
                       "floor (independent marginals)": fidelity(real, floor, args.seed)},
        "settings": {},
    }  # fmt: skip
    print(json.dumps(result["references"]), flush=True)
    out = Path(args.out)
    if args.append and out.exists():
        earlier = json.loads(out.read_text())
        same = ("data", "ae_epochs", "score_epochs", "batch", "score_set", "seed", "max_steps", "draws")
        if any(earlier["args"].get(k) != vars(args)[k] for k in same):
            raise SystemExit(f"--append: {out} was made with other data or sizes ({same})")
        result["settings"] = earlier["settings"]
    out.parent.mkdir(parents=True, exist_ok=True)

    base = {"train.batch_size": args.batch, "train.workers": 1, "train.cpus_per_worker": 1.0,
            "train.storage_path": str(work / "ray_results"), "train.log_every_steps": 0,
            "train.score_synthetic": False,
            "train.max_steps_per_epoch": args.max_steps}  # fmt: skip
    score_overrides = parse_set(args.score_set)
    for text in args.setting:
        name, overrides = parse_setting(text)
        began = time.perf_counter()
        ae_spec = build_run_spec("scoehr_ae", args.data, f"latent-{name}-ae",
                                 base | {"train.epochs": args.ae_epochs} | overrides)  # fmt: skip
        ae = run_training(ae_spec)
        ae_metrics = dict(tracking.get_run(ae.run_id).data.metrics)
        score_spec = build_run_spec("scoehr_score", args.data, f"latent-{name}-score",
                                    base | {"train.epochs": args.score_epochs} | score_overrides,
                                    upstream_run=ae.run_id)  # fmt: skip
        score = run_training(score_spec)
        score_metrics = dict(tracking.get_run(score.run_id).data.metrics)
        loaded = load_run(score.run_id)
        cfg = loaded.model.config
        syn, _, empty = draw(loaded.model.eval(), cfg.sampler, cfg.sample_steps, n, 1024, "cpu", args.seed)
        row = {
            "overrides": overrides, "ae_run": ae.run_id, "score_run": score.run_id,
            "ae_val_bit_errors": ae_metrics.get("val/bit_errors"), "ae_val_loss": ae_metrics.get("val/loss"),
            "score_val_loss": score_metrics.get("val/loss"), "sampler": f"{cfg.sampler} x{cfg.sample_steps}",
            "empty_draws": empty, **fidelity(real, syn, args.seed), "seconds": time.perf_counter() - began,
        }  # fmt: skip
        result["settings"][name] = row
        print(name, json.dumps(row), flush=True)
        out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    np.seterr(all="ignore")
    sys.exit(main())
