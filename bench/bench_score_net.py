"""ScoEHR score nets against each other at equal wall time (issue 14): the 16-channel UNet of
the acceptance run and residual MLPs (``model.net = "mlp"``), on one CPU thread (what one Ray
worker gets), trained by DSM on the same real latents of a stage-1 run.

    python bench/bench_score_net.py --ae-run AE_RUN_ID [--seconds 240] [--patients 44000]

The latents are the frozen encoder's on the first training patients; the last 4,000 are held
out, and every net's held-out DSM loss (mean of three fixed noise seeds) is recorded every 500
steps and at the end of its time budget. Nets run one after another, so a shared machine's load
can favour one: compare curves, and re-run when the box is busy. Results:
``bench/results/score_net.json``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from bench_sampler import real_vectors
from results_file import write_results

from mirror.checkpoint import load_run
from mirror.models.scoehr import ScoEHRScoreConfig, build_score_net
from mirror.models.vpsde import VPSDE, dsm_loss

RESULTS = Path(__file__).parent / "results" / "score_net.json"
HELD_OUT = 4000


# Each net as the scoehr_score overrides that build it (ScoEHRScoreConfig fields).
NETS = {
    "unet16x1": {"net": "unet", "ch": 16, "groups": 4, "res_blocks": 1, "time_scale": 1.0},
    "mlp512x4": {"net": "mlp", "mlp_width": 512, "mlp_blocks": 4, "time_scale": 1.0},
    "mlp512x4_ts1000": {"net": "mlp", "mlp_width": 512, "mlp_blocks": 4, "time_scale": 1000.0},
    "mlp1024x4_ts1000": {"net": "mlp", "mlp_width": 1024, "mlp_blocks": 4, "time_scale": 1000.0},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ae-run", required=True, help="MLflow run id of a trained scoehr_ae run")
    parser.add_argument("--seconds", type=float, default=240.0, help="training time per net")
    parser.add_argument("--patients", type=int, default=44_000)
    parser.add_argument("--nets", default=",".join(NETS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_run(args.ae_run)
    info = loaded.data_info
    x = torch.tensor(real_vectors(loaded.spec.data, args.patients, info.features, info.values).toarray(), dtype=torch.float32)
    with torch.no_grad():
        z = loaded.model.autoencoder.encode(x)
    train, held = z[:-HELD_OUT], z[-HELD_OUT:]
    sde = VPSDE(0.1, 20.0, 1.0, 1e-3)

    @torch.no_grad()
    def held_loss(net: torch.nn.Module) -> float:
        return sum(float(dsm_loss(net, held, sde, torch.Generator().manual_seed(s))) for s in range(3)) / 3

    rows = {}
    for name in args.nets.split(","):
        config = NETS[name]
        torch.manual_seed(0)
        net, _ = build_score_net(ScoEHRScoreConfig(**config), z.shape[1], pad=False)
        opt = torch.optim.Adam(net.parameters(), 1e-3)
        g = torch.Generator().manual_seed(1)
        step, curve, began = 0, [], time.perf_counter()
        while time.perf_counter() - began < args.seconds:
            loss = dsm_loss(net, train[torch.randint(0, len(train), (128,), generator=g)], sde, g)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            step += 1
            if step % 500 == 0:
                curve.append({"step": step, "seconds": round(time.perf_counter() - began, 1), "held_dsm": round(held_loss(net), 3)})
        rows[name] = {"config": config, "parameters": sum(p.numel() for p in net.parameters()), "steps": step,
                      "held_dsm": round(held_loss(net), 3), "curve": curve}
        print(f"{name:18s} {step:6d} steps in {args.seconds:.0f} s, held-out DSM {rows[name]['held_dsm']:.3f}", flush=True)
    result = {"bench": "score_net", "ae_run": args.ae_run, "latent_dim": int(z.shape[1]), "seconds_per_net": args.seconds,
              "train_latents": len(train), "held_out": HELD_OUT, "batch": 128, "lr": 1e-3, "torch_threads": 1,
              "load_average_after": [round(v, 1) for v in os.getloadavg()], "nets": rows}
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
