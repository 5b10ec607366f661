"""MiranDa (seed 004): ATC-3 medication recommendation per admission, trained in two phases.

Network (upstream pyhealth Transformer): per feature (diagnoses, procedures, lab flags) a code
embedding summed within a visit plus a learned position embedding, one pre-LayerNorm
Transformer block (GELU FFN), the output at position 0 (the current admission: the view puts
it first); demographics through a linear layer; the four concatenated -> one linear layer ->
sigmoid scores ``α̂``.

Training (Algorithm 1), per batch:

1. Evidence-based phase: BCE. The retrieved ELOS of each admission is the mean LOS of the top
   ``top_k`` candidates (training admissions with the same procedure set, age ± window, other
   patients; see ``views.admissions``) whose regimen has cosine similarity > ``min_cosine`` to
   ``α̂``.
2. Sign convention (fixed here; the paper's R = LOS - ELOS conflicts with its aim "minimise
   H_B" for a shorter ELOS): ``H_B = mean_i(ELOS_i - LOS_i)``, the excess stay of the
   recommended regimens over the stays that happened. Minimising it shortens ELOS.
3. Gate, on ``H_B`` all-reduced over DDP ranks (so ranks never disagree): ``gate = "above"``
   (the paper's inequality, default) enters the therapeutic-optimisation phase when
   ``H_B >= threshold`` (δ) and continues while ``H_B >= 0``; ``gate = "below"`` (upstream's)
   enters when ``H_B < threshold`` and continues while ``H_B`` rose since the last step.
   Entering takes one step on ``decay`` (λ) x BCE; then at most ``max_inner_steps`` steps on
   ``L' = blend (1 - decay) L + (1 - blend) P_RL`` (ε), recomputing α̂, ELOS, ``H_B`` and
   ``L = (decay if gate open else 1) x BCE`` each time; the cap is the same on every rank.
4. ``P_RL = log(1 + confidence x H~ / norm)`` (γ), ``norm`` = the batch mean of ELOS~
   (``normaliser = "mean"``, upstream's scale, the default) or Σ_i ELOS~_i (``"sum"``, the
   paper). ``p_rl = "surrogate"`` (default):
   ELOS~ is differentiable soft retrieval, ``Σ_k softmax_k(cos(α̂, b_k) / temperature) LOS_k``
   over the valid candidates, so descending L' moves α̂ toward regimens of shorter stays.
   ``p_rl = "detached"`` reproduces upstream: P_RL is a constant from the retrieved ELOS and
   the blend is detached, so inner steps move no parameter (counted, no optimizer step).
   The log's argument is clamped at ``1e-3`` (clamps counted).

Normaliser default (measured, ``bench/bench_miranda_inner.py``, ``results/miranda_inner.json``:
a BCE-warmed model, 8 batches of 64 admissions of a 200K-patient simulation, the run's AdamW
moments): the paper's Σ ELOS makes P_RL ~3e-4, yet its gradient already outweighs the BCE
term's (ε(1-λ)λ = 0.018 x BCE; norms 0.013 vs 0.0012, cos(∇L', ∇BCE) -0.05), so inner steps
follow P_RL, not BCE. Adam ignores the loss's scale only for its first step (update norm 0.33
for L vs 0.27 for 0.02 L); inside a run its second moments come from the BCE steps, so a P_RL
gradient ~B times smaller than the batch mean's takes ~B times smaller steps: five inner
steps moved the batch's H_B by -0.004 days with ``sum`` against -0.045 with ``mean`` (sd over
the 8 batches 0.027 and 0.040; BCE +0.001 vs +0.022; five plain BCE steps: H_B -0.042, BCE
+0.008 on that batch: on this probe the phase is no better at lowering H_B than more BCE). So ``mean``
(upstream's scale) is the default, which lets the phase act; ``sum`` stays selectable (and in
the ablation grid) for the paper's exact objective. No separate SGD optimiser: with ``mean``
the shared Adam already gives the inner steps a step size comparable to the BCE steps.
Measured since (README, MiranDa; ``bench/bench_miranda_phase.py``): with ``mean`` the phase
acts and costs most of the accuracy (it lowers the given classes' scores); with ``sum`` it is
inert. Neither gives the seed's shorter ELOS at equal accuracy.

``phase = "supervised"`` is the plain baseline: the same network, BCE only (ELOS still
measured).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mirror.config import require
from mirror.data.views.admissions import AdmissionBatch, AdmissionsInfo, AdmissionsView
from mirror.models.base import ModelSpec, StepContext

LOG_ARG_FLOOR = 1e-3


@dataclass(frozen=True)
class MirandaConfig:
    d_model: int = 128
    heads: int = 1
    ffn: int = 512
    dropout: float = 0.5
    lr: float = 1e-3
    weight_decay: float = 0.0
    phase: str = "optimise"  # optimise | supervised (the baseline)
    decay: float = 0.9  # λ: BCE scale once the gate opens (paper 0.9, upstream 0.2)
    threshold: float = 0.2  # δ: gate threshold on H_B, days (paper 0.2, upstream 0.5)
    confidence: float = 0.5  # γ: weight of H_B inside P_RL (paper 0.5, upstream 0.9)
    blend: float = 0.2  # ε: supervised share of L' (paper and upstream 0.2)
    gate: str = "above"  # above (paper) | below (upstream)
    p_rl: str = "surrogate"  # surrogate | detached (upstream: no gradient)
    normaliser: str = "mean"  # mean (upstream: batch mean; default, see the docstring) | sum (paper: Σ ELOS)
    temperature: float = 0.1  # τ of the soft retrieval
    top_k: int = 50  # K = |β| (paper 50)
    min_cosine: float = 0.0  # φ
    max_inner_steps: int = 5  # cap of the optimisation phase's inner loop (upstream: none)

    def __post_init__(self) -> None:
        require(self, "d_model", self.d_model >= 1 and self.d_model % self.heads == 0, f"an int >= 1 divisible by heads ({self.heads})")
        require(self, "ffn", self.ffn >= 1, "an int >= 1")
        require(self, "dropout", 0 <= self.dropout < 1, "a fraction in [0, 1)")
        require(self, "lr", self.lr > 0, "a positive learning rate")
        require(self, "phase", self.phase in ("optimise", "supervised"), "optimise or supervised")
        require(self, "decay", 0 < self.decay <= 1, "λ in (0, 1]")
        require(self, "blend", 0 <= self.blend <= 1, "ε in [0, 1]")
        require(self, "confidence", self.confidence >= 0, "γ >= 0")
        require(self, "gate", self.gate in ("above", "below"), "above (paper) or below (upstream)")
        require(self, "p_rl", self.p_rl in ("surrogate", "detached"), "surrogate or detached")
        require(self, "normaliser", self.normaliser in ("sum", "mean"), "sum or mean")
        require(self, "temperature", self.temperature > 0, "τ > 0")
        require(self, "top_k", self.top_k >= 1, "an int >= 1")
        require(self, "min_cosine", -1 <= self.min_cosine < 1, "φ in [-1, 1)")
        require(self, "max_inner_steps", 0 <= self.max_inner_steps <= 100, "an int in [0, 100]")


class FeatureEncoder(nn.Module):
    """Multi-hot visits (B, V, n) -> embedding sums -> one Transformer block -> position 0."""

    def __init__(self, n_codes: int, config: MirandaConfig, max_visits: int) -> None:
        super().__init__()
        self.embed = nn.Linear(n_codes, config.d_model, bias=False)  # = summed code embeddings
        self.position = nn.Parameter(torch.zeros(max_visits, config.d_model))
        self.block = nn.TransformerEncoderLayer(config.d_model, config.heads, config.ffn, config.dropout,
                                                activation="gelu", batch_first=True, norm_first=True)

    def forward(self, visits: torch.Tensor, visit_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(visits) + self.position
        return self.block(x, src_key_padding_mask=~visit_mask)[:, 0]


def cosine_to_candidates(scores: torch.Tensor, batch: AdmissionBatch) -> torch.Tensor:
    """(B, P) cosine similarity of each prediction to each candidate regimen."""
    return F.cosine_similarity(scores[:, None, :], batch.candidate_regimens, dim=-1, eps=1e-8)


def retrieved_elos(scores: torch.Tensor, batch: AdmissionBatch, top_k: int, min_cosine: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's ELOS: mean LOS of the top-K valid candidates with cosine > φ; (B,) and
    whether any candidate qualified (B,) bool (no ELOS otherwise)."""
    cos = cosine_to_candidates(scores, batch)
    ok = batch.candidate_valid & (cos > min_cosine)
    top, idx = cos.masked_fill(~ok, -math.inf).topk(min(top_k, cos.shape[1]), dim=1)
    chosen = torch.isfinite(top).float()
    n = chosen.sum(1)
    elos = (batch.candidate_los.gather(1, idx).float() * chosen).sum(1) / n.clamp(min=1)
    return elos, n > 0


def soft_elos(scores: torch.Tensor, batch: AdmissionBatch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable ELOS: softmax(cos / τ)-weighted LOS over the valid candidates."""
    logits = (cosine_to_candidates(scores, batch) / temperature).masked_fill(~batch.candidate_valid, -math.inf)
    has = batch.candidate_valid.any(1)
    weights = torch.softmax(logits, dim=1).nan_to_num(0.0)
    return (weights * batch.candidate_los.float()).sum(1), has


def all_reduced(values: list[torch.Tensor]) -> list[float]:
    """Sums across DDP ranks (identity without a process group): the gate's statistics."""
    tensor = torch.stack([v.detach().double().reshape(()) for v in values])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


class Miranda(nn.Module):
    def __init__(self, config: MirandaConfig, info: AdmissionsInfo) -> None:
        super().__init__()
        self.config = config
        self.diagnoses = FeatureEncoder(info.n_conditions, config, info.max_visits)
        self.procedures = FeatureEncoder(info.n_procedures, config, info.max_visits)
        self.labs = FeatureEncoder(info.n_lab_flags, config, info.max_visits)
        self.demographics = nn.Linear(info.n_demographics, config.d_model)
        self.head = nn.Linear(4 * config.d_model, info.n_labels)

    def forward(self, batch: AdmissionBatch) -> torch.Tensor:
        """Logits (B, n_labels)."""
        mask = batch.visit_mask
        parts = [self.diagnoses(batch.diagnoses, mask), self.procedures(batch.procedures, mask),
                 self.labs(batch.labs, mask), self.demographics(batch.demographics)]
        return self.head(torch.cat(parts, dim=1))

    def parts(self) -> dict[str, nn.Module]:
        return {"model": self}

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"model": torch.optim.AdamW(self.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)}

    # -- the gate ---------------------------------------------------------------------------

    def excess(self, scores: torch.Tensor, batch: AdmissionBatch) -> tuple[float, float, float]:
        """All-reduced H_B = mean(ELOS - LOS) over admissions with an ELOS, their mean ELOS,
        and the count."""
        elos, has = retrieved_elos(scores.detach(), batch, self.config.top_k, self.config.min_cosine)
        h = has.float()
        s_excess, s_elos, n = all_reduced([((elos - batch.los.float()) * h).sum(), (elos * h).sum(), h.sum()])
        return s_excess / max(n, 1.0), s_elos / max(n, 1.0), n

    def _enters(self, h_b: float, n: float) -> bool:
        if n == 0:
            return False
        return h_b >= self.config.threshold if self.config.gate == "above" else h_b < self.config.threshold

    def _continues(self, h_b: float, previous: float, n: float) -> bool:
        if n == 0:
            return False
        return h_b >= 0 if self.config.gate == "above" else h_b > previous

    def perturbation(self, scores: torch.Tensor, batch: AdmissionBatch, h_b: float, mean_elos: float,
                     n: float) -> tuple[torch.Tensor, bool]:
        """P_RL and whether its log argument was clamped."""
        c = self.config
        if c.p_rl == "detached":  # upstream: floats -> a constant tensor
            norm = mean_elos * (n if c.normaliser == "sum" else 1.0)
            arg = 1 + c.confidence * h_b / max(norm, 1e-9)
            return torch.tensor(math.log(max(arg, LOG_ARG_FLOOR)), device=scores.device), arg < LOG_ARG_FLOOR
        elos, has = soft_elos(scores, batch, c.temperature)
        h = has.float()
        count = h.sum().clamp(min=1)
        excess = ((elos - batch.los.float()) * h).sum() / count
        norm = (elos * h).sum() if c.normaliser == "sum" else (elos * h).sum() / count
        arg = 1 + c.confidence * excess / norm.clamp(min=1e-9)
        return torch.log(arg.clamp(min=LOG_ARG_FLOOR)), bool(arg.detach() < LOG_ARG_FLOOR)

    # -- training ---------------------------------------------------------------------------

    def train_step(self, batch: AdmissionBatch, ctx: StepContext) -> dict[str, float]:
        c, net = self.config, ctx.parts["model"]
        with ctx.autocast():
            logits = net(batch).float()
        bce = F.binary_cross_entropy_with_logits(logits, batch.target)
        h_b, mean_elos, n = self.excess(torch.sigmoid(logits), batch)
        metrics = {"loss": float(bce.detach()), "h_b": h_b, "elos": mean_elos, "gate": 0.0, "inner_steps": 0.0,
                   "p_rl": 0.0, "p_rl_clamped": 0.0}
        if c.phase == "supervised" or not self._enters(h_b, n):
            ctx.step(bce, "model")
            return self._with_disagreement(metrics, ctx.device)
        metrics["gate"] = 1.0
        ctx.step(c.decay * bce, "model")
        previous = h_b
        p_sum = clamped = 0.0
        for _ in range(c.max_inner_steps):  # the same count on every rank: decided on all-reduced H_B
            grad = c.p_rl == "surrogate"
            with torch.set_grad_enabled(grad), ctx.autocast():
                logits = net(batch).float()
            scores = torch.sigmoid(logits)
            h_b, mean_elos, n = self.excess(scores, batch)
            if not self._continues(h_b, previous, n):
                break
            previous = h_b
            loss = (c.decay if self._enters(h_b, n) else 1.0) * F.binary_cross_entropy_with_logits(logits, batch.target)
            p_rl, was_clamped = self.perturbation(scores, batch, h_b, mean_elos, n)
            blended = c.blend * (1 - c.decay) * loss + (1 - c.blend) * p_rl
            if grad:
                ctx.step(blended, "model")
            metrics["inner_steps"] += 1.0
            p_sum += float(p_rl.detach())
            clamped += float(was_clamped)
        if metrics["inner_steps"]:
            metrics["p_rl"] = p_sum / metrics["inner_steps"]
        metrics["p_rl_clamped"] = clamped
        return self._with_disagreement(metrics, ctx.device)

    @staticmethod
    def _with_disagreement(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
        """``rank_disagreement``: the spread across DDP ranks of this step's gate decision and
        inner-step count (0 when the ranks stayed in step; a spread would hang the next
        collective, so it is measured before any can)."""
        if not (dist.is_available() and dist.is_initialized()):
            metrics["rank_disagreement"] = 0.0
            return metrics
        high = torch.tensor([metrics["gate"], metrics["inner_steps"]], dtype=torch.float64, device=device)
        low = high.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        metrics["rank_disagreement"] = float((high - low).abs().max())
        return metrics

    @torch.no_grad()
    def eval_sums(self, batch: AdmissionBatch) -> dict[str, torch.Tensor]:
        logits = self(batch).float()
        scores = torch.sigmoid(logits)
        bce = F.binary_cross_entropy_with_logits(logits, batch.target, reduction="none").mean(1)
        predicted, truth = scores >= 0.5, batch.target.bool()
        both, either = (predicted & truth).sum(1).float(), (predicted | truth).sum(1).float()
        sizes = predicted.sum(1).float() + truth.sum(1).float()
        jaccard = torch.where(either > 0, both / either.clamp(min=1), torch.ones_like(both))
        f1 = torch.where(sizes > 0, 2 * both / sizes.clamp(min=1), torch.ones_like(both))
        elos, has = retrieved_elos(scores, batch, self.config.top_k, self.config.min_cosine)
        h = has.float()
        return {"loss": bce.sum(), "jaccard": jaccard.sum(), "f1": f1.sum(),
                "elos_sum": (elos * h).sum(), "elos_coverage": h.sum(),
                "excess_sum": ((elos - batch.los.float()) * h).sum()}

    # -- capabilities ------------------------------------------------------------------------

    def recommend(self, batch: AdmissionBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sigmoid(self(batch).float()), batch.target

    def recommendation_outcomes(self, batch: AdmissionBatch, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-admission outcome of any regimen ``scores`` (B, n_labels) (the evaluation asks it
        of the model's, the given and the floor's): the retrieved ELOS, NaN without candidates."""
        elos, has = retrieved_elos(scores, batch, self.config.top_k, self.config.min_cosine)
        return {"elos": torch.where(has, elos, torch.full_like(elos, math.nan))}


MODEL = ModelSpec(
    name="miranda", config_cls=MirandaConfig, build=Miranda, view=AdmissionsView, capabilities=("recommender",),
    default_sweep="search_spaces/miranda_ablation.yaml",
    metric_names=("train/loss", "train/h_b", "train/elos", "train/gate", "train/inner_steps", "train/p_rl", "train/rank_disagreement",
                  "val/loss", "val/jaccard", "val/f1", "val/elos_sum", "val/elos_coverage", "val/excess_sum"),
    description="MiranDa: ATC-3 recommendation per admission, BCE then an ELOS-gated optimisation phase (seed 004).",
)  # fmt: skip
