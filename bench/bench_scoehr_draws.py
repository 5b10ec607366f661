"""Where ScoEHR's draws go wrong, and three sample-time fixes that do not help.

    python bench/bench_scoehr_draws.py --run RUN_ID [--patients 10240] [--steps 25]
        [--samplers em:50,dpm2m_sde:40] [--geometry-only] [--out bench/results/scoehr_draws.json]

On one trained ``scoehr_score`` run, with the sampler it was trained with (Euler-Maruyama by
default) and the same seed for every arm, fidelity (DDM, PCD against ``--patients`` real
training patients, as ``bench_sampler.py``) of:

* **x0 clipping**: at every score call the data prediction x̂_0 = (z + σ² s) / m is clipped
  and the score recomputed from it, as DDPM clips its denoised image to [-1, 1]: to the tanh
  range, or to the per-dimension [min, max] of real latents (the 12-14 near-constant latent
  dimensions come out 40x too wide);
* **decoder temperature** τ on the decoder's logits before the Bernoulli draw (τ = 1: the
  run's decode; τ → 0: thresholding at ½), to pull the codes per draw towards the real count;
* **where the draws sit** (``latent_geometry``): per-dimension SD and mean of drawn against
  real latents, the mean distance from a draw to its nearest real latent against real to
  real, the codes the decoder expects per draw (its summed probabilities) against per real
  patient, and the fidelity of the drawn latents with their near-constant dimensions reset to
  the real mean.

``--samplers`` adds the geometry of other samplers' draws (same seed, so the same z_T): EM at
few steps widens the net's own distribution, ``dpm2m_sde`` lands on it. ``--geometry-only``
skips the clipping and temperature arms (three full draws) and reports geometry alone.

Ceiling: a second sample of real patients (and the autoencoder's round trip of one); floor:
each code drawn independently at its real prevalence. Writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from bench_sampler import fidelity, real_vectors
from results_file import write_results

from mirror.checkpoint import load_run
from mirror.models import require_capability
from mirror.models.vpsde import ScoreFn, sample

TEMPERATURES = (1.0, 0.8, 0.5, 0.0)
NEAR_CONSTANT_SD = 0.05  # a latent dimension whose real SD is below this is "near-constant"


def clipped_score(score: ScoreFn, sde, low: torch.Tensor, high: torch.Tensor) -> ScoreFn:
    """``score`` with its data prediction clipped to [low, high] (per dimension)."""

    def clipped(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        m, var = sde.mean_coeff(t)[:, None], sde.std(t)[:, None] ** 2
        x0 = torch.clamp((z + var * score(z, t)) / m, low, high)
        return (m * x0 - z) / var

    return clipped


def draw_latents(model, score: ScoreFn, sampler: str, n: int, steps: int, seed: int, batch: int = 2048) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for i in range(0, n, batch):
        z_T = torch.randn(min(batch, n - i), model.width, generator=generator)
        parts.append(sample(sampler, score, model.sde, z_T, steps, generator))
    return torch.cat(parts)


def decode(model, z: torch.Tensor, temperature: float, seed: int) -> tuple[sp.csr_matrix, float]:
    """0/1 code vectors from latents: Bernoulli at ``temperature`` (0: threshold at ½), an
    empty draw given its likeliest code (the run's default ``empty_decode``)."""
    with torch.no_grad():
        logits = model.upstream.autoencoder.decode_logits(z)
    if temperature > 0:
        x = torch.bernoulli(torch.sigmoid(logits / temperature), generator=torch.Generator().manual_seed(seed))
    else:
        x = (logits > 0).float()
    empty = x.sum(1) == 0
    rows = torch.nonzero(empty).squeeze(1)
    x[rows, logits[rows].argmax(1)] = 1.0
    return sp.csr_matrix(x.numpy()), float(empty.float().mean())


def expected_codes(model, z: torch.Tensor) -> float:
    """Codes the decoder expects per latent: its Bernoulli probabilities summed, averaged."""
    with torch.no_grad():
        return float(torch.sigmoid(model.upstream.autoencoder.decode_logits(z)).sum(1).mean())


def latent_geometry(model, drawn: torch.Tensor, real_z: torch.Tensor) -> dict:
    """Where drawn latents sit against real ones. Distances use disjoint halves of the real
    latents, so real-to-real is not a point's distance to itself."""
    real_sd, drawn_sd = real_z.std(0), drawn.std(0)
    narrow = real_sd < NEAR_CONSTANT_SD
    half = len(real_z) // 2
    return {
        "expected_codes_drawn": expected_codes(model, drawn),
        "expected_codes_real": expected_codes(model, real_z),
        "sd_ratio_drawn_over_real_median": float((drawn_sd / real_sd).median()),
        "sd_ratio_drawn_over_real_near_constant": float((drawn_sd / real_sd)[narrow].median()) if narrow.any() else None,
        "sd_ratio_drawn_over_real_other_median": float((drawn_sd / real_sd)[~narrow].median()),
        "mean_shift_in_real_sd": float(((drawn.mean(0) - real_z.mean(0)).abs() / real_sd).mean()),
        "nearest_real_latent_distance_drawn": float(torch.cdist(drawn[:half], real_z[half:]).min(1).values.mean()),
        "nearest_real_latent_distance_real": float(torch.cdist(real_z[:half], real_z[half:]).min(1).values.mean()),
    }


def parse_samplers(text: str) -> list[tuple[str, int]]:
    """``"em:50,dpm2m_sde:40"`` -> [("em", 50), ("dpm2m_sde", 40)]."""
    pairs = []
    for item in filter(None, text.split(",")):
        name, _, steps = item.partition(":")
        if not steps.isdigit():
            raise SystemExit(f"--samplers: {item!r} is not SAMPLER:STEPS (e.g. em:50)")
        pairs.append((name, int(steps)))
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="MLflow run id of a trained scoehr_score run (with an autoencoder)")
    parser.add_argument("--patients", type=int, default=10_240)
    parser.add_argument("--steps", type=int, help="sampler steps (default: the run's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samplers", default="", help="also the geometry of these draws: SAMPLER:STEPS,...")
    parser.add_argument("--geometry-only", action="store_true", help="skip the clipping and temperature arms")
    parser.add_argument("--out", default="bench/results/scoehr_draws.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    loaded = load_run(args.run)
    require_capability(loaded.model_spec, "generator", "bench_scoehr_draws")
    model = loaded.model.eval()
    config, info = model.config, loaded.data_info
    if not config.autoencoder or config.latent_norm:
        raise SystemExit(f"run {args.run}: needs a run that diffuses the plain autoencoder latent")
    n, steps = args.patients, args.steps or config.sample_steps
    real_all = real_vectors(loaded.spec.data, 3 * n, info.features, info.values)
    real, second_real, latent_source = real_all[:n], real_all[n: 2 * n], real_all[2 * n:]
    with torch.no_grad():
        real_z = model.upstream.autoencoder.encode(torch.tensor(latent_source.toarray(), dtype=torch.float32))
    print(f"run {args.run}: {n} patients per side, {config.sampler} x{steps}", flush=True)

    def arm(name: str, syn: sp.csr_matrix, empty: float, **extra) -> dict:
        row = {"arm": name, **fidelity(real, syn), "empty_draws": empty, **extra}
        print(row, flush=True)
        return row

    prevalence = np.asarray(real.mean(0)).ravel()
    independent = np.random.default_rng(args.seed).random((n, len(prevalence))) < prevalence
    rows = [
        arm("ceiling: second real sample", second_real, 0.0),
        arm("floor: independent codes at the real prevalence", sp.csr_matrix(independent.astype(np.float32)), float((independent.sum(1) == 0).mean())),
        arm("autoencoder round trip of real latents", *decode(model, real_z, 1.0, args.seed)),
    ]
    score = model.score_fn(model.sampling_net)
    as_trained = "as trained (no clipping)"
    bounds: dict[str, Callable[[ScoreFn], ScoreFn]] = {as_trained: lambda s: s}
    if not args.geometry_only:
        bounds |= {
            "x0 clipped to [-1, 1]": lambda s: clipped_score(s, model.sde, torch.tensor(-1.0), torch.tensor(1.0)),
            "x0 clipped to the real latents' per-dimension box": lambda s: clipped_score(
                s, model.sde, real_z.min(0).values, real_z.max(0).values
            ),
        }
    latents = {}
    for name, wrap in bounds.items():
        began = time.perf_counter()
        latents[name] = draw_latents(model, wrap(score), config.sampler, n, steps, args.seed)
        rows.append(arm(name, *decode(model, latents[name], 1.0, args.seed), seconds=time.perf_counter() - began))
    drawn = latents[as_trained]
    if not args.geometry_only:
        for tau in TEMPERATURES[1:]:
            rows.append(arm(f"decoder temperature {tau}" if tau else "threshold at 1/2", *decode(model, drawn, tau, args.seed)))
        narrow = torch.nonzero(real_z.std(0) < NEAR_CONSTANT_SD).squeeze(1)
        reset = drawn.clone()
        reset[:, narrow] = real_z.mean(0)[narrow]
        rows.append(arm(f"{len(narrow)} near-constant dimensions reset to the real mean", *decode(model, reset, 1.0, args.seed)))

    geometry = {f"{config.sampler} x{steps}": latent_geometry(model, drawn, real_z)}
    for sampler, sampler_steps in parse_samplers(args.samplers):
        began = time.perf_counter()
        other = draw_latents(model, score, sampler, n, sampler_steps, args.seed)
        rows.append(arm(f"{sampler} x{sampler_steps}", *decode(model, other, 1.0, args.seed), seconds=time.perf_counter() - began))
        geometry[f"{sampler} x{sampler_steps}"] = latent_geometry(model, other, real_z)
    geometry["near_constant_dimensions"] = int((real_z.std(0) < NEAR_CONSTANT_SD).sum())
    print(geometry, flush=True)
    write_results(Path(args.out), {
        "run": args.run, "patients": n, "sampler": config.sampler, "steps": steps, "seed": args.seed,
        "model_config": loaded.spec.model_config, "rows": rows, "geometry": geometry,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
