"""What MiranDa's inner (therapeutic-optimisation) steps do to the parameters, under Adam.

    python bench/bench_miranda_inner.py --data /tmp/miranda2-data/sim200k

From a model warmed up with BCE, on the same training batches:

* gradient norms of the two terms of ``L' = ε(1-λ)·L + (1-ε)·P_RL`` with P_RL's ``sum``
  (the paper's Σ ELOS) and ``mean`` normalisers, and the cosine of L''s gradient to BCE's: the
  direction the inner step takes;
* Adam's update norm for one step on ``L`` and on ``0.02·L`` (Adam ignores a loss's scale,
  so ``ε(1-λ)`` does not shrink the step);
* after ``--inner`` steps of each variant (Adam on ``L'`` sum / mean, plain Adam BCE steps, no
  step), the change of the batch's retrieved H_B = mean(ELOS - LOS) and of its BCE.

Writes ``bench/results/miranda_inner.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mirror.cluster import ensure_ray
from mirror.data import schema
from mirror.data.views.admissions import AdmissionsView, AdmissionsViewConfig
from mirror.models import build_model
from mirror.models.local_step import LocalStepContext
from mirror.models.miranda import retrieved_elos

SMALL = {"d_model": 64, "ffn": 128, "dropout": 0.0}


def flat_grad(model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
    grads = torch.autograd.grad(loss, [p for p in model.parameters()], allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, model.parameters(), strict=True)])


def excess_and_bce(model, batch) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(batch).float()
        elos, has = retrieved_elos(torch.sigmoid(logits), batch, model.config.top_k, model.config.min_cosine)
        excess = float((elos - batch.los.float())[has].mean())
        return excess, float(F.binary_cross_entropy_with_logits(logits, batch.target))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--warmup-steps", type=int, default=60)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "miranda_inner.json"))
    args = parser.parse_args(argv)
    ensure_ray()
    torch.manual_seed(0)
    view = AdmissionsView(AdmissionsViewConfig(), args.data)
    ds, _ = view.read(schema.TRAIN)
    ds = ds.limit((args.warmup_steps + args.batches) * args.batch_size)
    batches = list(view.batches(ds, args.batch_size, training=False, device="cpu"))
    warm, probe = batches[: args.warmup_steps], batches[args.warmup_steps: args.warmup_steps + args.batches]
    model = build_model("miranda", {**SMALL, "phase": "supervised"}, view.info())
    ctx = LocalStepContext(model, model.make_optimizers(), 1.0)
    for b in warm:
        ctx.train_step(b)
    c = model.config
    rows: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        rows.setdefault(key, []).append(value)

    for batch in probe:
        logits = model(batch).float()
        bce = F.binary_cross_entropy_with_logits(logits, batch.target)
        g_bce = flat_grad(model, c.blend * (1 - c.decay) * c.decay * bce)
        add("grad_norm/bce_term", float(g_bce.norm()))
        for normaliser in ("sum", "mean"):
            probe_model = copy.deepcopy(model)
            probe_model.config = type(c)(**{**c.__dict__, "normaliser": normaliser})
            lg = probe_model(batch).float()
            scores = torch.sigmoid(lg)
            h_b, mean_elos, n = probe_model.excess(scores, batch)
            p_rl, _ = probe_model.perturbation(scores, batch, h_b, mean_elos, n)
            g_p = flat_grad(probe_model, (1 - c.blend) * p_rl)
            add(f"p_rl/{normaliser}", float(p_rl))
            add(f"grad_norm/p_rl_term_{normaliser}", float(g_p.norm()))
            add(f"cos(grad L', grad BCE)/{normaliser}", float(F.cosine_similarity(g_p + g_bce, g_bce, dim=0)))
        # Adam's step does not scale with the loss
        for scale in (1.0, 0.02):
            m = copy.deepcopy(model)
            opt = torch.optim.AdamW(m.parameters(), lr=c.lr)
            before = torch.cat([p.detach().reshape(-1).clone() for p in m.parameters()])
            (scale * F.binary_cross_entropy_with_logits(m(batch).float(), batch.target)).backward()
            opt.step()
            after = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
            add(f"adam_update_norm/loss_x{scale}", float((after - before).norm()))
        # the inner steps' effect on this batch's H_B and BCE
        start = excess_and_bce(model, batch)
        variants = {"inner_sum": "sum", "inner_mean": "mean", "bce_only": None}
        for name, normaliser in variants.items():
            m = copy.deepcopy(model)
            m.config = type(c)(**{**c.__dict__, "normaliser": normaliser or "sum"})
            opt = torch.optim.AdamW(m.parameters(), lr=c.lr)
            opt.load_state_dict(ctx.optimizers["model"].state_dict())  # the run's Adam moments
            for _ in range(args.inner):
                lg = m(batch).float()
                loss = F.binary_cross_entropy_with_logits(lg, batch.target)
                if normaliser is not None:
                    scores = torch.sigmoid(lg)
                    h_b, mean_elos, n = m.excess(scores, batch)
                    p_rl, _ = m.perturbation(scores, batch, h_b, mean_elos, n)
                    loss = c.blend * (1 - c.decay) * c.decay * loss + (1 - c.blend) * p_rl
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
                opt.step()
            end = excess_and_bce(m, batch)
            add(f"delta_h_b/{name}", end[0] - start[0])
            add(f"delta_bce/{name}", end[1] - start[1])
    result = {"data": args.data, "batches": len(probe), "batch_size": args.batch_size, "inner_steps": args.inner,
              "config": {k: getattr(c, k) for k in ("decay", "blend", "confidence", "temperature", "lr")},
              "mean": {k: float(np.mean(v)) for k, v in rows.items()},
              "sd": {k: float(np.std(v, ddof=1)) for k, v in rows.items()},
              "load_average": os.getloadavg()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["mean"], indent=2))
    return result


if __name__ == "__main__":
    main()
