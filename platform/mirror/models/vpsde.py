"""The variance-preserving SDE of ScoEHR (seed 002; Song et al. 2021), its denoising score
matching loss, and six samplers of the reverse process. Pure torch (plus ``torchsde``), no
model or data view: a sampler takes any ``score(z, t)``, so the tests drive it with the
analytic score of a Gaussian.

    dz = -½ β(t) z dt + √β(t) dW,   β(t) = β_min + (t / T)(β_max - β_min),  t in [0, T]
    z_t | z_0 ~ N(m(t) z_0, σ²(t) I),  m = exp(-½ B(t)),  σ² = 1 - exp(-B(t)),
    B(t) = ∫_0^t β = β_min t + (β_max - β_min) t² / (2T)

Samplers integrate from t = T down to t = t_ε, starting from z_T ~ N(0, I), and return only
the final state (upstream kept and decoded the whole trajectory):

* ``em``: the reverse SDE ``dz = [β s(z, t) + ½ β z] ds + √β dW̄`` in ``s = T - t`` with
  ``torchsde.sdeint`` (Itô, diagonal noise, Euler–Maruyama) and an explicit ``dt`` (upstream
  passed none, so torchsde always took 1,000 steps whatever the setting). 1 score call/step.
* ``heun``: the probability-flow ODE ``dz/dt = -½ β (z + s(z, t))`` with Heun's method
  (2nd order; 2 score calls per step, the last step plain Euler).
* ``dpm2m``: DPM-Solver++(2M) (Lu et al. 2022) on the same ODE: a second-order multistep
  solver in log-SNR λ = log(m / σ) with the data prediction ẑ_0 = (z + σ² s) / m, steps
  uniform in λ; 1 score call per step.
* ``ancestral`` and ``dpm2m_sde``: the reverse SDE itself (the distribution EM converges to),
  integrated exactly in its linear part (SDE-DPM-Solver++, Lu et al. 2022) on DDIM's
  quadratic time grid (``_solver_grid``). With the data prediction ẑ_0 held fixed over a step
  s -> t, the reverse SDE's transition is Gaussian:
      z_t = (σ_t / σ_s) e^{-h} z_s + m_t (1 - e^{-2h}) ẑ_0 + σ_t √(1 - e^{-2h}) ε,  h = λ_t - λ_s,
  which is the DDPM posterior q(z_t | z_s, z_0 = ẑ_0): ``ancestral`` (first order).
  ``dpm2m_sde`` replaces ẑ_0 by the multistep extrapolation of ``dpm2m`` (second order). EM
  also discretises the linear drift ``β z / 2``, with an error that grows with β, which these
  take in closed form. 1 score call per step.
* ``pc``: predictor-corrector (Song et al. 2021, Algorithm 3): at each time one Langevin
  corrector step at signal-to-noise ``LANGEVIN_SNR``, then one Euler-Maruyama step of the
  reverse SDE; 2 score calls per step, no noise on the last step.

Which one ``scoehr_score`` uses by default, and why, is in ``models/scoehr.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z (B, d), t (B,)) -> score
SAMPLERS = ("em", "heun", "dpm2m", "ancestral", "dpm2m_sde", "pc")
LANGEVIN_SNR = 0.16  # score_sde's value for the VP SDE


@dataclass(frozen=True)
class VPSDE:
    beta_min: float = 0.1
    beta_max: float = 20.0
    T: float = 1.0
    t_eps: float = 1e-3

    def __post_init__(self) -> None:
        if not (0 < self.beta_min <= self.beta_max and self.T > 0 and 0 < self.t_eps < self.T):
            raise ValueError(f"VPSDE: need 0 < beta_min <= beta_max, T > 0, 0 < t_eps < T; got {self}")

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + (t / self.T) * (self.beta_max - self.beta_min)

    def integral(self, t: torch.Tensor) -> torch.Tensor:
        """B(t) = ∫_0^t β(u) du."""
        return self.beta_min * t + (self.beta_max - self.beta_min) * t**2 / (2 * self.T)

    def mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """m(t): z_t's mean is m(t) z_0."""
        return torch.exp(-0.5 * self.integral(t))

    def std(self, t: torch.Tensor) -> torch.Tensor:
        """σ(t) = sqrt(1 - exp(-B(t)))."""
        return torch.sqrt(-torch.expm1(-self.integral(t)))

    def perturb(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z_t = m(t) z_0 + σ(t) ε for per-row times t (B,)."""
        return self.mean_coeff(t)[:, None] * z0 + self.std(t)[:, None] * noise


def stratified_times(
    b: int, sde: VPSDE, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Upstream ScoEHR's t for a batch of b: ``linspace(1/b + t_ε, 1 - 1/b, b) + U(-1/b, 1/b)``,
    shuffled (one t per stratum of [0, 1]: lower variance than i.i.d. uniform), scaled by T and
    kept inside [t_ε, T]."""
    grid = torch.linspace(1 / b + sde.t_eps, 1 - 1 / b, b, device=device)
    jitter = (torch.rand(b, generator=generator, device=device) * 2 - 1) / b
    order = torch.randperm(b, generator=generator, device=device)
    return ((grid + jitter)[order] * sde.T).clamp(sde.t_eps, sde.T)


def dsm_loss(
    score: ScoreFn, z0: torch.Tensor, sde: VPSDE, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Denoising score matching with λ(t) = σ²(t): mean over the batch of
    ``‖σ(t) s(z_t, t) + ε‖²`` summed over latent dimensions (upstream ``dsm.py``; its scale
    grows with d)."""
    t = stratified_times(z0.shape[0], sde, generator, z0.device)
    noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
    s = score(sde.perturb(z0, t, noise), t)
    return ((sde.std(t)[:, None] * s + noise) ** 2).sum(1).mean()


# ---------------------------------------------------------------------------------------------
# Samplers


def _times(sde: VPSDE, steps: int, device: torch.device | str) -> torch.Tensor:
    """T = t_0 > t_1 > ... > t_steps = t_ε, uniform in t."""
    return torch.linspace(sde.T, sde.t_eps, steps + 1, device=device)


class _ReverseSDE(torch.nn.Module):
    """The reverse-time SDE in s = T - t, in torchsde's (f, g) form."""

    noise_type, sde_type = "diagonal", "ito"

    def __init__(self, score: ScoreFn, sde: VPSDE) -> None:
        super().__init__()
        self.score, self.sde = score, sde

    def _beta(self, s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = (self.sde.T - s).expand(z.shape[0])
        return t, self.sde.beta(t)[:, None]

    def f(self, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        t, beta = self._beta(s, z)
        return beta * self.score(z, t) + 0.5 * beta * z

    def g(self, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        _, beta = self._beta(s, z)
        return torch.sqrt(beta).expand_as(z)


def sample_em(
    score: ScoreFn, sde: VPSDE, z_T: torch.Tensor, steps: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Euler–Maruyama through ``torchsde.sdeint`` with ``dt = (T - t_ε) / steps``; the Brownian
    motion is seeded from ``generator``, so a draw is reproducible."""
    import torchsde

    ts = torch.tensor([0.0, sde.T - sde.t_eps], device=z_T.device, dtype=z_T.dtype)
    span = float(ts[-1])  # in z's dtype, so the Brownian interval ends exactly where ts does
    entropy = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device if generator else "cpu"))
    bm = torchsde.BrownianInterval(
        t0=0.0, t1=span, size=z_T.shape, dtype=z_T.dtype, device=z_T.device, entropy=entropy,
        levy_area_approximation="none",
    )
    path = torchsde.sdeint(_ReverseSDE(score, sde), z_T, ts, bm=bm, method="euler", dt=span / steps)
    return path[-1]


def _flow(score: ScoreFn, sde: VPSDE, z: torch.Tensor, t: float) -> torch.Tensor:
    tt = torch.full((z.shape[0],), t, device=z.device, dtype=z.dtype)
    return -0.5 * sde.beta(tt)[:, None] * (z + score(z, tt))


def sample_heun(score: ScoreFn, sde: VPSDE, z_T: torch.Tensor, steps: int) -> torch.Tensor:
    """The probability-flow ODE with Heun's method (the last step plain Euler)."""
    times = _times(sde, steps, "cpu").tolist()
    z = z_T
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:], strict=True)):
        h = t_next - t  # negative: integrating down in t
        d = _flow(score, sde, z, t)
        z_euler = z + h * d
        last = i == steps - 1
        z = z_euler if last else z + 0.5 * h * (d + _flow(score, sde, z_euler, t_next))
    return z


def _solver_grid(sde: VPSDE, steps: int, spacing: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """Times T = t_0 > ... > t_steps = t_ε with the log-SNR λ = log(m / σ), m and σ at each
    (float64). ``"lambda"``: uniform in λ (B(t) = log(1 + e^{-2λ}) is a quadratic in t, inverted
    in closed form). ``"quadratic"``: t_i = t_ε + (T - t_ε)(1 - i / steps)², DDIM's quadratic
    skip, denser at small t than uniform t and sparser there than uniform λ."""
    if spacing == "lambda":
        t_hi, t_lo = torch.tensor(sde.T, dtype=torch.float64), torch.tensor(sde.t_eps, dtype=torch.float64)
        lam_hi, lam_lo = (float(torch.log(sde.mean_coeff(t)) - torch.log(sde.std(t))) for t in (t_hi, t_lo))
        b_target = torch.log1p(torch.exp(-2 * torch.linspace(lam_hi, lam_lo, steps + 1, dtype=torch.float64)))
        a, b = (sde.beta_max - sde.beta_min) / (2 * sde.T), sde.beta_min
        times = (-b + torch.sqrt(b * b + 4 * a * b_target)) / (2 * a) if a > 0 else b_target / b
    elif spacing == "quadratic":
        times = sde.t_eps + (sde.T - sde.t_eps) * torch.linspace(1, 0, steps + 1, dtype=torch.float64) ** 2
    else:
        raise ValueError(f"sampler time grid: unknown {spacing!r}; valid: lambda, quadratic")
    times[0], times[-1] = sde.T, sde.t_eps
    m, sigma = sde.mean_coeff(times), sde.std(times)
    return times.tolist(), (torch.log(m) - torch.log(sigma)).tolist(), m.tolist(), sigma.tolist()


def _data_prediction(score: ScoreFn, z: torch.Tensor, t: float, m: float, sigma: float) -> torch.Tensor:
    """ẑ_0 = (z + σ² s(z, t)) / m: Tweedie's estimate of the clean latent."""
    return (z + sigma**2 * score(z, torch.full((z.shape[0],), t, device=z.device, dtype=z.dtype))) / m


def _multistep(x0: torch.Tensor, previous: torch.Tensor | None, h: float, h_previous: float) -> torch.Tensor:
    """DPM-Solver++(2M)'s second-order estimate of ẑ_0 over the step (first order at the start)."""
    if previous is None:
        return x0
    r = h_previous / h
    return (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous


def sample_dpm2m(score: ScoreFn, sde: VPSDE, z_T: torch.Tensor, steps: int) -> torch.Tensor:
    """DPM-Solver++(2M): multistep, second order in λ, one score call per step."""
    times, lams, m, sigma = _solver_grid(sde, steps, "lambda")
    z, previous = z_T, None
    for i in range(steps):
        x0 = _data_prediction(score, z, times[i], m[i], sigma[i])
        h = lams[i + 1] - lams[i]
        d = _multistep(x0, previous, h, lams[i] - lams[i - 1] if i else h)
        z = (sigma[i + 1] / sigma[i]) * z - m[i + 1] * math.expm1(-h) * d
        previous = x0
    return z


def sample_sde_exponential(
    score: ScoreFn, sde: VPSDE, z_T: torch.Tensor, steps: int, generator: torch.Generator | None = None,
    order: int = 1, spacing: str = "quadratic",
) -> torch.Tensor:
    """The reverse SDE with its linear part exact (``ancestral`` at order 1, ``dpm2m_sde`` at
    order 2; module docstring); one score call per step, noise on every step as EM adds it.
    The quadratic grid by measurement (README, ScoEHR; run af8a766e, 10,240 draws): at 50 steps
    uniform λ leaves DDM 6-8 % above EM x1,000's and uniform t 23 %; quadratic is within 3 %
    of EM x1,000 on DDM and PCD at 40 steps."""
    times, lams, m, sigma = _solver_grid(sde, steps, spacing)
    z, previous = z_T, None
    for i in range(steps):
        x0 = _data_prediction(score, z, times[i], m[i], sigma[i])
        h = lams[i + 1] - lams[i]
        d = _multistep(x0, previous, h, lams[i] - lams[i - 1] if i else h) if order == 2 else x0
        kept = -math.expm1(-2 * h)  # 1 - e^{-2h}: the share of z_t's variance that is fresh noise
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        z = (sigma[i + 1] / sigma[i]) * math.exp(-h) * z + m[i + 1] * kept * d + sigma[i + 1] * math.sqrt(kept) * noise
        previous = x0
    return z


def sample_pc(
    score: ScoreFn, sde: VPSDE, z_T: torch.Tensor, steps: int, generator: torch.Generator | None = None,
    snr: float = LANGEVIN_SNR,
) -> torch.Tensor:
    """Predictor-corrector on a uniform t grid. The Langevin step is ``2 α (snr σ(t))²`` with
    ``α = 1 - β(t) Δt``: score_sde's ``2 α (snr ‖ε‖ / ‖s‖)²`` with ``‖s‖`` at its scale under
    the forward process, ``‖ε‖ / σ(t)``. score_sde averages the norms over the batch, so a draw
    would depend on the batch it was drawn in; per row, a row near the mode (``s`` ≈ 0) would
    take an unbounded step."""
    times = _times(sde, steps, "cpu").tolist()

    def noise() -> torch.Tensor:
        return torch.randn(z_T.shape, generator=generator, device=z_T.device, dtype=z_T.dtype)

    z = z_T
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:], strict=True)):
        dt = t - t_next
        tt = torch.full((z.shape[0],), t, device=z.device, dtype=z.dtype)
        beta = sde.beta(tt)[:, None]
        alpha = (1.0 - beta * dt).clamp_min(1e-3)
        step = 2.0 * alpha * (snr * sde.std(tt)[:, None]) ** 2
        z = z + step * score(z, tt) + torch.sqrt(2.0 * step) * noise()  # corrector
        z = z + dt * beta * (score(z, tt) + 0.5 * z)  # predictor: the reverse SDE's drift ...
        if i < steps - 1:
            z = z + torch.sqrt(beta * dt) * noise()  # ... and its noise, except on the last step
    return z


@torch.no_grad()
def sample(
    name: str, score: ScoreFn, sde: VPSDE, z_T: torch.Tensor, steps: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Integrate from ``z_T`` with sampler ``name`` in ``steps`` steps; the final state only."""
    if steps < 1:
        raise ValueError(f"sampler steps: expected >= 1, got {steps}")
    if name == "em":
        return sample_em(score, sde, z_T, steps, generator)
    if name == "heun":
        return sample_heun(score, sde, z_T, steps)
    if name == "dpm2m":
        return sample_dpm2m(score, sde, z_T, steps)
    if name in ("ancestral", "dpm2m_sde"):
        return sample_sde_exponential(score, sde, z_T, steps, generator, order=1 if name == "ancestral" else 2)
    if name == "pc":
        return sample_pc(score, sde, z_T, steps, generator)
    raise ValueError(f"sampler: unknown {name!r}; valid: {SAMPLERS}")


def score_calls(name: str, steps: int) -> int:
    """Score-network evaluations a sampler makes in ``steps`` steps (its cost)."""
    return {"heun": 2 * steps - 1, "pc": 2 * steps}.get(name, steps)
