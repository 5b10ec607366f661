"""ScoEHR (seed 002; models.md §4): latent score-based diffusion for synthetic code vectors, in
two stages linked by ``--upstream-run``.

    stage 1  scoehr_ae     x (B, F) -> z = tanh(Linear(x)) (B, d) -> x̂ = sigmoid(Linear(z))
                           L_AE = Σ_j BCE(x̂_j, x_j) / B                    (Adam, weight decay)
    stage 2  scoehr_score  z_0 = Enc(x) of the frozen stage 1, computed in the worker as
                           batches stream; z_t = m(t) z_0 + σ(t) ε; a score net s_θ(z_t, t):
                           a residual MLP over z (default) or the seed's UNet over z reshaped
                           to (1, √d, √d) (``net``); L_DSM = mean_b ‖σ s_θ + ε‖²
    sampling               z_T ~ N(0, I) -> reverse SDE / flow ODE (``vpsde``) -> Dec ->
                           x ~ Bernoulli(Dec) (``decode = "bernoulli"``) or x = Dec > ½ (``"threshold"``)

Choices where the seed and upstream leave room or go wrong (models.md §4 pitfalls):

* Sampler and step count are config (``sampler``, ``sample_steps``), sampled with an explicit
  step size; only the final state is kept. Default: Euler-Maruyama, 50 steps, chosen from the
  measured fidelity-vs-steps curve at 10,240 patients on the 64-d latent (``latent_dim``'s
  default; bench/bench_sampler.py, bench/results/sampler_d64_10240_idle.json): 20.4x faster
  than upstream's ``em`` at 1,000 steps, PCD 15.9 against 17.5, DDM 0.0021 against 0.0018;
  x100 (9.9x) is better than x1,000 on both, and x25 over-disperses (9.5 codes per draw
  against the real 6.2, DDM 4.3-4.6x the ceiling). The best step count moves with the latent
  and the score net: on the paper's 144-d latent it was 25 (bench/results/sampler_10240.json,
  sampler_ema_10240.json: 42-43x faster than EM x1,000 with lower DDM and PCD), where
  DPM-Solver++(2M) (``dpm2m``) stayed ~8 % above EM x1,000 in PCD at 10-50 steps, so
  re-measure the curve for a new score net before trusting the default. The
  predictor-corrector (``pc``) trades DDM for PCD like the EM step count does, and does not
  beat EM on both (README, ScoEHR). ``dpm2m_sde`` (the reverse SDE, exact in its linear part)
  samples the trained model in few steps: 40 match EM x1,000 within 5 % on two of three 64-d
  runs (26.9x and 24.4x faster: sampler_d64_sde_10240.json, sampler_d64_replicate3_10240.json),
  not on the third (DDM +8-13 % at 40-60 steps, where EM x50 passes:
  sampler_d64_seed1_sde_10240.json). It is not the default because the faithful
  sample is the worse one here: the score net's own latents are slightly too narrow (SD
  0.93-0.99 of the real latents' per dimension; the decoder expects 4.6-5.4 codes from them
  against the real 6.3) and EM's coarse steps widen them, which offsets it (run 0b8c8b8c's
  scorecard: EM x1,000 PCD 24.5, the floor 24.7; EM x50 23.0; scoehr_sde_sampler.json). Runs
  saved before keep the sampler and steps they were trained with.
* ``decode``: how a final latent becomes codes. The paper thresholds the decoder's
  probabilities at ½ (``"threshold"``); ``"bernoulli"`` (default, by measurement) draws each
  code from its probability, the generative reading of the BCE-trained decoder (the
  no-autoencoder ablation's probability is (z + 1) / 2, the inverse of its 2x - 1 scaling).
  Thresholding keeps only the codes the decoder is sure of, so a latent that lands between
  real patients' latents loses its uncertain codes. At 200K simulated patients (MLP score net,
  EM x25, 10,240 draws scored by ``jobs/sample.py``, 5,002 per side) thresholding decodes 5.1
  codes per patient against the real 6.2, and Bernoulli 6.1: DDM 0.0030 -> 0.0023 (ceiling
  0.0012), PCD 26.4 -> 23.3 (floor 24.7), U over 5 k-means seeds -3.16 -> -3.61 (floor -2.80,
  ceiling -3.99), MIA AUC 0.50 both (README, ScoEHR). The AE's round trip of real patients is
  at the real-data ceiling under either. Runs saved before the option keep ``"threshold"``
  (``SAVED_BEFORE``); ``jobs/sample.py --set model.decode=...`` picks either on any run.
* The UNet follows upstream ``sdeflow_unet`` (GroupNorm–Swish–conv ResBlocks with a projected
  time embedding, stride-2 conv down, nearest×2 + conv up, one middle self-attention since
  upstream's ``attn_resolutions=(16,)`` never matches 12/6/3, zero-initialised output convs).
  Widths default small for CPU (``ch`` 32, 8 groups); upstream is ``ch`` 128, 32 groups.
* ``net``: ``"mlp"`` (default, by measurement), a residual MLP over the flat latent (width 512,
  4 blocks, 3.8M parameters), or ``"unet"`` (the seed's). On one CPU thread the MLP reaches a
  lower held-out DSM in equal time (``bench/bench_score_net.py``: 17.2 against the 16-channel
  UNet's 18.2 after 240 s), and at 200K patients it is the only net whose draws meet the DDM
  target (README, ScoEHR: MLP + Bernoulli decode DDM 1.9x the ceiling; the UNet 3.7-4.8x).
  The paper's own setting (UNet, ``time_scale`` 1, threshold decode) is pinned in
  ``search_spaces/scoehr_paper*.yaml``. Runs saved before ``net`` existed keep the UNet.
  The width is sized for CPUs: on one H200, ``mlp_width`` 2,048 x 6 blocks (84M parameters,
  lr 5e-4, batch 1,024) trained 114 epochs closed 81-86 % of the PCD gap at ``dpm2m_sde`` x40
  on three seeds (DDM 1.54-1.64x the ceiling), where CPU-sized nets closed 34-73 %; EM x50
  over-disperses that net (DDM up to 2.3x), so its search space samples with ``dpm2m_sde``
  (README, ScoEHR, "On a GPU"; ``search_spaces/scoehr_score_gpu.yaml``).
* ``output = "score"`` (upstream, the default): the net outputs s_θ. ``"noise"``: it outputs
  ε̂ and s_θ = -ε̂ / σ(t) (score_sde's VP parameterisation), the same σ²-weighted loss, better
  conditioned at small t. Measured at 200K (one 64-d AE, two arms side by side on the
  acceptance settings; bench/results/scoehr_output_noise.json): it lowers val DSM by 0.32
  (6.70 against 7.02) and improves no scorecard figure (EM x50: PCD 22.7 against 22.6, DDM
  1.7x against 1.4x the ceiling); its own distribution is narrower still (per-dimension SD 0.91
  of the real latents' against 0.96), so it stays off.
* ``time_scale`` multiplies t before the sinusoidal embedding (upstream 1: every frequency
  ≤ 1 rad, nearby times barely separated; 1000, the default, is the documented option, and
  what the MLP was measured with).
* ``clamp_latent`` clips the final latent to the tanh range [-1, 1] before decoding (off:
  upstream does not).
* ``latent_norm`` (off): diffuse (z - mean) / SD per latent dimension, the statistics set once
  from the first training batch (all ranks' rows), saved with the run, undone before
  decoding. Sampled latents were 20-40x too wide in the ~14 tanh-saturated, near-constant
  dimensions; standardising hands those the same unit scale as the rest. Measured at 200K
  (same AE, MLP net, 8 epochs on one worker each, EM x25, Bernoulli, 10,240 draws): DDM 0.0045
  -> 0.0024 (ceiling 0.0012), but PCD 22.5 -> 24.7 (the independent-marginals floor, 24.7) and
  empty draws 7 % -> 13 %: it trades the correlations for the marginals, so it stays off.
* ``ema_decay`` (off): an exponential moving average of the score net's weights (score_sde's
  practice), updated after every optimizer step and saved with the run; it validates and
  samples unless ``sample_online``. Measured at 200K on the acceptance settings (MLP, 16
  epochs, 2 workers, decay 0.999, one run drawn both ways): val DSM 11.419 vs 11.420, DDM
  0.0027 vs 0.0029, PCD 22.9 both: by the end of the cosine schedule the online weights are
  already averaged, so it stays off (README, ScoEHR).
* ``empty_decode``: a draw whose every decoded probability is below ½ decodes to no code at
  all, which no training patient has (``min_codes`` >= 1). A quarter of simulated patients
  hold a single condition, so their latents sit where one logit barely crosses 0 and small
  sampling errors fall to "nothing". ``"top1"`` (default) decodes such a draw to the most
  probable non-empty vector under the decoder's independent Bernoullis, which is its single
  most probable code (any further code below ½ lowers the probability); ``"reject"`` drops
  it. Both count it (``no_codes_top1`` / ``no_codes``). Rejection biases the sample towards
  long records (single-code patients are the ones lost); see README, ScoEHR fidelity.
* No-autoencoder ablation (``autoencoder = false``): diffusion directly on the code vector
  scaled to [-1, 1] and zero-padded to the next square whose side the UNet can halve; the
  frozen first stage is still named by ``--upstream-run`` (the run spec wants one) but unused.
* The LR schedule is the loop's (warm-up + cosine, per optimizer), not upstream's LambdaLR,
  whose ``n_epochs = 10`` divides by zero. Gradient clipping is the loop's ``train.grad_clip``
  (upstream 1.0, the default).
* Noise and times are drawn from a generator seeded by (rank, global step): ranks draw
  different noise, and a resumed run draws what it would have drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from mirror.config import require
from mirror.data.views.code_vector import CodeVectorBatch, CodeVectorInfo, CodeVectorView, code_rows
from mirror.models.base import GenerationContext, ModelSpec, StepContext
from mirror.models.sentences import device_generator
from mirror.models.vpsde import SAMPLERS, VPSDE, dsm_loss, sample

# ---------------------------------------------------------------------------------------------
# Stage 1: the autoencoder.


@dataclass(frozen=True)
class ScoEHRAEConfig:
    """Upstream ``scoehr/models/autoencoder.py`` and its training settings."""

    # d. The paper's is 144; 64 by measurement (200K simulated patients, MLP score net, README
    # ScoEHR): both round-trip real patients at the real-data ceiling, and draws from the 64-d
    # latent at 50 EM steps meet the DDM target in both runs (1.6x, 1.9x the ceiling), where
    # 144-d at its default 25 steps met it in 1 of 3 runs (1.9-2.5x), at a similar PCD.
    # The UNet needs √d divisible by 2^(levels - 1): 64, 144, 256.
    latent_dim: int = 64
    # Upstream 1e-3 underfits sparse code vectors under the loop's warm-up + cosine schedule:
    # 20K simulated patients, 1,580 steps: held-out BCE 23.9 / 11.9 / 4.9 / 3.8 per patient at
    # lr 1e-3 / 3e-3 / 1e-2 / 3e-2, reconstructions with no code 75% / 16% / 1.1% / 0.1%.
    lr: float = 3e-2
    weight_decay: float = 1e-4  # Adam's (L2) weight decay, as upstream
    bias_init: float = 0.01  # upstream: Xavier-uniform weights, biases 0.01
    # σ of Gaussian noise added to z before decoding, in training only (0: upstream). It makes
    # the decoder answer for a neighbourhood of each real latent, not one point, so that stage
    # 2's samples, which land near but not on the data's latents, still decode. Not clamped to
    # the tanh range: the sampler's latents are not clamped either (``clamp_latent``).
    # Measured at 20K (bench/results/scoehr_latent*.json, two seeds): σ 0.2 leaves fewer draws
    # empty; its DDM/PCD effect is within seed noise, so the default stays 0.
    latent_noise: float = 0.0

    def __post_init__(self) -> None:
        require(self, "latent_dim", self.latent_dim >= 1, "an int >= 1")
        require(self, "lr", self.lr > 0, "a float > 0")
        require(self, "weight_decay", self.weight_decay >= 0, "a float >= 0")
        require(self, "latent_noise", self.latent_noise >= 0, "a float >= 0")


class CodeAutoencoder(nn.Module):
    """Enc = Linear + tanh, Dec = Linear (+ sigmoid in the loss: BCE with logits)."""

    def __init__(self, n_features: int, cfg: ScoEHRAEConfig) -> None:
        super().__init__()
        self.enc = nn.Linear(n_features, cfg.latent_dim)
        self.dec = nn.Linear(cfg.latent_dim, n_features)
        for layer in (self.enc, self.dec):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.constant_(layer.bias, cfg.bias_init)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.enc(x))

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.dec(z)

    def forward(self, x: torch.Tensor, latent_noise: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction loss summed over features and the batch (callers divide), decoding
        ``encode(x) + latent_noise`` when noise is given (training with ``latent_noise``)."""
        z = self.encode(x)
        logits = self.decode_logits(z if latent_noise is None else z + latent_noise)
        return F.binary_cross_entropy_with_logits(logits, x.clamp(max=1.0), reduction="sum")


class ScoEHRAutoencoder(nn.Module):
    """Stage 1 (``scoehr_ae``): one part, one Adam. Count vectors are read as present/absent
    (BCE needs targets in [0, 1]); the decoded vector is binary."""

    def __init__(self, config: ScoEHRAEConfig, info: CodeVectorInfo) -> None:
        super().__init__()
        self.config, self.info = config, info
        self.autoencoder = CodeAutoencoder(info.n_features, config)

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def parts(self) -> dict[str, nn.Module]:
        return {"autoencoder": self.autoencoder}

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        cfg = self.config
        return {"autoencoder": torch.optim.Adam(self.autoencoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)}

    def train_step(self, batch: CodeVectorBatch, ctx: StepContext) -> dict[str, float]:
        noise = None
        if self.config.latent_noise > 0:  # seeded by (rank, step): a resumed run draws the same
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            generator = torch.Generator(device=ctx.device).manual_seed(1_000_003 * rank + ctx.global_step)
            shape = (batch.size, self.config.latent_dim)
            noise = self.config.latent_noise * torch.randn(shape, generator=generator, device=ctx.device)
        with ctx.autocast():
            loss = ctx.parts["autoencoder"](batch.x, noise) / batch.size
        ctx.step(loss, "autoencoder")
        return {"loss": float(loss.detach())}

    def eval_sums(self, batch: CodeVectorBatch) -> dict[str, torch.Tensor]:
        """Summed BCE and wrongly decoded bits of the clean latents (the loop divides by
        patients): what stage 2 decodes when it lands exactly on a real latent."""
        z = self.autoencoder.encode(batch.x)
        logits = self.autoencoder.decode_logits(z)
        target = batch.x.clamp(max=1.0)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
        wrong = ((logits > 0).float() != target).float().sum()
        return {"loss": bce.detach().float(), "bit_errors": wrong}

    def encode(self, batch: CodeVectorBatch) -> torch.Tensor:
        return self.autoencoder.encode(batch.x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Code vectors (B, F) as 0/1: sigmoid(Dec(z)) > ½."""
        return (self.autoencoder.decode_logits(z) > 0).float()


# ---------------------------------------------------------------------------------------------
# Stage 2: the score network (upstream ``sdeflow_unet``, compact).


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim), frequencies 1 .. 1/10000."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device, dtype=torch.float32) / max(1, half - 1))
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, temb: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb = nn.Linear(temb, c_out)
        self.norm2, self.dropout = nn.GroupNorm(groups, c_out), nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    def __init__(self, c: int, groups: int) -> None:
        super().__init__()
        self.norm, self.qkv, self.proj = nn.GroupNorm(groups, c), nn.Conv2d(c, 3 * c, 1), _zero(nn.Conv2d(c, c, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)  # each (B, C, HW)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return x + self.proj(out.transpose(1, 2).reshape(b, c, h, w))


class ScoreUNet(nn.Module):
    """s_θ(z, t) for z (B, side²) seen as a one-channel side x side image."""

    def __init__(self, side: int, ch: int, levels: int, res_blocks: int, groups: int, dropout: float, time_scale: float) -> None:
        super().__init__()
        self.side, self.ch, self.time_scale = side, ch, time_scale
        mults = [1] + [2] * (levels - 1)  # upstream ch_mult (1, 2, 2)
        temb = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(1, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skips, c = [ch], ch
        for level, mult in enumerate(mults):
            for _ in range(res_blocks):
                self.down.append(ResBlock(c, ch * mult, temb, groups, dropout))
                c = ch * mult
                skips.append(c)
            if level < levels - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, temb, groups, dropout), SelfAttention(c, groups), ResBlock(c, c, temb, groups, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for _ in range(res_blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), ch * mult, temb, groups, dropout))
                c = ch * mult
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)))
        self.norm_out = nn.GroupNorm(groups, c)
        self.conv_out = _zero(nn.Conv2d(c, 1, 3, padding=1))

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.temb(timestep_embedding(t * self.time_scale, self.ch))
        h = self.conv_in(z.view(-1, 1, self.side, self.side))
        hs = [h]
        for layer in self.down:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, hs.pop()], dim=1), temb)
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h))).flatten(1)


class MLPBlock(nn.Module):
    """Pre-norm residual block, the time embedding added between its two linears."""

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.norm, self.fc1, self.time = nn.LayerNorm(width), nn.Linear(width, width), nn.Linear(width, width)
        self.dropout, self.fc2 = nn.Dropout(dropout), _zero(nn.Linear(width, width))

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        a = self.fc1(F.silu(self.norm(h))) + self.time(temb)
        return h + self.fc2(self.dropout(F.silu(a)))


class ScoreMLP(nn.Module):
    """s_θ(z, t) for z (B, d) as a residual MLP (``net = "mlp"``). A latent's dimensions have
    no spatial order, so the UNet's 3x3 convolutions over a √d x √d reshape buy no inductive
    bias; on one CPU thread this net at width 512 x 4 blocks (3.8M parameters) takes about a
    third of the 16-channel UNet's time per step (bench/bench_score_net.py)."""

    def __init__(self, dim: int, width: int, blocks: int, dropout: float, time_scale: float) -> None:
        super().__init__()
        self.width, self.time_scale = width, time_scale
        self.temb = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList([MLPBlock(width, dropout) for _ in range(blocks)])
        self.norm_out, self.out = nn.LayerNorm(width), _zero(nn.Linear(width, dim))

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = F.silu(self.temb(timestep_embedding(t * self.time_scale, self.width)))
        h = self.inp(z)
        for block in self.blocks:
            h = block(h, temb)
        return self.out(F.silu(self.norm_out(h)))


SCORE_NETS = ("unet", "mlp")
EMPTY_DECODES = ("top1", "reject")
DECODES = ("threshold", "bernoulli")
LATENT_SCALE_FLOOR = 1e-3  # latent_norm: the smallest per-dimension SD it divides by


@dataclass(frozen=True)
class ScoEHRScoreConfig:
    """Stage 2: SDE, score net, optimiser and sampler (upstream values unless stated)."""

    # How a trained run draws, changeable at sampling time (jobs/sample.py --set).
    SAMPLE_TIME: ClassVar[tuple[str, ...]] = (
        "sampler", "sample_steps", "clamp_latent", "decode", "empty_decode", "sample_online",
    )
    # What a run saved before a field existed did (its checkpoint lacks the key).
    SAVED_BEFORE: ClassVar[dict[str, object]] = {
        "decode": "threshold", "net": "unet", "latent_norm": False, "ema_decay": 0.0,
    }

    beta_min: float = 0.1
    beta_max: float = 20.0
    T: float = 1.0
    t_eps: float = 1e-3
    net: str = "mlp"  # "mlp" (a residual MLP over the flat latent) or "unet" (upstream)
    ch: int = 32  # UNet base channels (upstream 128)
    levels: int = 3  # resolutions, channel multipliers (1, 2, 2, ...) (upstream 3)
    res_blocks: int = 2
    groups: int = 8  # GroupNorm groups (upstream 32); must divide ch
    mlp_width: int = 512  # net = "mlp": hidden width and residual blocks
    mlp_blocks: int = 4
    dropout: float = 0.0
    time_scale: float = 1000.0  # t is multiplied by this before the embedding (upstream 1)
    output: str = "score"  # "score" (upstream) or "noise" (s = -ε̂ / σ)
    lr: float = 1e-3
    # Decay of an exponential moving average of the score net's weights, updated after every
    # optimizer step and saved with the run (0: none). The averaged net is what validates and
    # samples, as in score_sde (module docstring).
    ema_decay: float = 0.0
    sample_online: bool = False  # draw with the online weights even when the run kept an EMA
    autoencoder: bool = True  # False: the no-autoencoder ablation (diffusion on code vectors)
    sampler: str = "em"  # em | heun | dpm2m | pc (module docstring: how the default was chosen)
    sample_steps: int = 50
    clamp_latent: bool = False  # clip the final latent to [-1, 1] before decoding
    latent_norm: bool = False  # diffuse the latent standardised per dimension (module docstring)
    decode: str = "bernoulli"  # "bernoulli" (x ~ Bernoulli(p)) or "threshold" (x = p > ½, upstream)
    empty_decode: str = "top1"  # a draw decoding to no code: "top1" (its likeliest code) or "reject"

    def __post_init__(self) -> None:
        require(self, "beta_min", self.beta_min > 0, "a float > 0")
        require(self, "beta_max", self.beta_max >= self.beta_min, f"a float >= beta_min ({self.beta_min})")
        require(self, "T", self.T > 0, "a float > 0")
        require(self, "t_eps", 0 < self.t_eps < self.T, f"a float in (0, T = {self.T})")
        require(self, "net", self.net in SCORE_NETS, f"one of {SCORE_NETS}")
        for name in ("ch", "levels", "res_blocks", "groups", "mlp_width", "mlp_blocks", "sample_steps"):
            require(self, name, getattr(self, name) >= 1, "an int >= 1")
        require(self, "groups", self.ch % self.groups == 0, f"a divisor of ch ({self.ch})")
        require(self, "dropout", 0 <= self.dropout < 1, "a float in [0, 1)")
        require(self, "time_scale", self.time_scale > 0, "a float > 0")
        require(self, "output", self.output in ("score", "noise"), "'score' or 'noise'")
        require(self, "lr", self.lr > 0, "a float > 0")
        require(self, "ema_decay", 0 <= self.ema_decay < 1, "a float in [0, 1) (0: no average)")
        require(self, "sampler", self.sampler in SAMPLERS, f"one of {SAMPLERS}")
        require(self, "empty_decode", self.empty_decode in EMPTY_DECODES, f"one of {EMPTY_DECODES}")
        require(self, "decode", self.decode in DECODES, f"one of {DECODES}")

    @property
    def sde(self) -> VPSDE:
        return VPSDE(self.beta_min, self.beta_max, self.T, self.t_eps)


def grid_side(d: int, levels: int, pad: bool) -> int:
    """Side of the square the UNet sees: √d, which it halves levels - 1 times. With ``pad`` (the
    code-vector ablation) the smallest such side with side² >= d; else d must fit exactly."""
    unit = 2 ** (levels - 1)
    if pad:
        return max(unit, math.ceil(math.sqrt(d) / unit) * unit)
    side = math.isqrt(d)
    if side * side != d or side % unit:
        raise ValueError(
            f"scoehr_score: latent width {d} needs to be a square whose side is divisible by "
            f"2^(levels - 1) = {unit} (e.g. 64, 144, 256 for 3 levels); train the first stage "
            f"with such model.latent_dim or change model.levels"
        )
    return side


def build_score_net(config: ScoEHRScoreConfig, dim: int, pad: bool) -> tuple[nn.Module, int]:
    """The score net ``config.net`` over vectors of width ``dim``, and the width it diffuses:
    ``dim`` for the MLP; for the UNet its square (``grid_side``; ``pad``: zero-padded to it)."""
    if config.net == "mlp":
        return ScoreMLP(dim, config.mlp_width, config.mlp_blocks, config.dropout, config.time_scale), dim
    side = grid_side(dim, config.levels, pad)
    unet = ScoreUNet(side, config.ch, config.levels, config.res_blocks, config.groups, config.dropout, config.time_scale)
    return unet, side * side


class ScoEHRScoreModel(nn.Module):
    """Stage 2 (``scoehr_score``): the score net on the frozen stage 1's latents, and the
    ``Generator`` capability (sample, decode through stage 1 per ``decode``)."""

    def __init__(self, config: ScoEHRScoreConfig, info: CodeVectorInfo, upstream: ScoEHRAutoencoder) -> None:
        super().__init__()
        self.config, self.info, self.upstream = config, info, upstream
        self.sde = config.sde
        self.dim = upstream.latent_dim if config.autoencoder else info.n_features
        # self.width: the diffused vector (the latent, or the code vector), as the net sees it.
        self.score_net, self.width = build_score_net(config, self.dim, pad=not config.autoencoder)
        self.score_ema: AveragedModel | None = None
        if config.ema_decay > 0:  # not a part: no DDP, no optimizer; saved with the model
            self.score_ema = AveragedModel(self.score_net, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay))
            self.score_ema.requires_grad_(False)
        if config.latent_norm:  # set from the first training batch, saved with the run
            self.register_buffer("latent_mean", torch.zeros(self.width))
            self.register_buffer("latent_scale", torch.ones(self.width))
            self.register_buffer("latent_norm_set", torch.zeros((), dtype=torch.bool))

    def parts(self) -> dict[str, nn.Module]:
        return {"score": self.score_net}

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"score": torch.optim.Adam(self.score_net.parameters(), lr=self.config.lr)}

    @torch.no_grad()
    def to_diffusion_space(self, x: torch.Tensor) -> torch.Tensor:
        """z_0: the frozen encoder's latent, or (ablation) the code vector in [-1, 1], padded;
        standardised per dimension under ``latent_norm``."""
        if self.config.autoencoder:
            z = self.upstream.autoencoder.encode(x)
        else:
            z = F.pad(2 * x.clamp(max=1.0) - 1, (0, self.width - self.dim))
        if self.config.latent_norm:
            if not self.latent_norm_set:
                self.set_latent_norm(z)
            z = (z - self.latent_mean) / self.latent_scale
        return z

    @torch.no_grad()
    def set_latent_norm(self, z: torch.Tensor) -> None:
        """Per-dimension mean and SD of ``z`` over every rank's batch (all-reduced, so ranks
        agree), the SD floored at ``LATENT_SCALE_FLOOR`` (a dimension constant in the batch)."""
        stats = torch.cat([z.sum(0), (z * z).sum(0), z.new_tensor([len(z)])]).double()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
        n = stats[-1]
        mean = stats[: self.width] / n
        var = (stats[self.width: 2 * self.width] / n - mean**2).clamp_min(0)
        self.latent_mean.copy_(mean.float())
        self.latent_scale.copy_(var.sqrt().clamp_min(LATENT_SCALE_FLOOR).float())
        self.latent_norm_set.fill_(True)

    @torch.no_grad()
    def from_diffusion_space(
        self, z: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Code vectors (B, F) as 0/1 from final states (per ``decode``), and which draws
        decoded to no code (``empty_decode``: given their likeliest code under "top1", else
        all-zero)."""
        if self.config.latent_norm:
            z = z * self.latent_scale + self.latent_mean
        if self.config.clamp_latent:
            z = z.clamp(-1, 1)
        logits = self.upstream.autoencoder.decode_logits(z) if self.config.autoencoder else z[:, : self.dim]
        if self.config.decode == "bernoulli":
            p = torch.sigmoid(logits) if self.config.autoencoder else ((logits + 1) / 2).clamp(0, 1)
            x = torch.bernoulli(p, generator=generator)
        else:
            x = (logits > 0).float()
        empty = x.sum(1) == 0
        if self.config.empty_decode == "top1":
            rows = torch.nonzero(empty).squeeze(1)
            x[rows, logits[rows].argmax(1)] = 1.0
        return x, empty

    @property
    def sampling_net(self) -> nn.Module:
        """The weights that validate and draw: the EMA when the run keeps one (unless
        ``sample_online``), else the online net."""
        if self.score_ema is None or self.config.sample_online:
            return self.score_net
        return self.score_ema.module

    def score_fn(self, net: nn.Module):
        """s(z, t) through ``net`` (the DDP-wrapped part in training), per ``output``."""

        def score(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = net(z, t)
            if self.config.output == "noise":
                return -out / self.sde.std(t)[:, None]
            return out

        return score

    def train_step(self, batch: CodeVectorBatch, ctx: StepContext) -> dict[str, float]:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        generator = torch.Generator(device=ctx.device).manual_seed(1_000_003 * rank + ctx.global_step)
        z0 = self.to_diffusion_space(batch.x)
        with ctx.autocast():
            loss = dsm_loss(self.score_fn(ctx.parts["score"]), z0, self.sde, generator)
        ctx.step(loss, "score")
        if self.score_ema is not None:  # every rank holds the same weights after the step
            self.score_ema.update_parameters(self.score_net)
        return {"loss": float(loss.detach())}

    @torch.no_grad()
    def eval_sums(self, batch: CodeVectorBatch) -> dict[str, torch.Tensor]:
        """DSM loss summed over patients at stratified times from a fixed seed (comparable
        across epochs and runs), of the net that samples (``sampling_net``); with an EMA, the
        online net's too (``loss_online``)."""
        z0 = self.to_diffusion_space(batch.x)
        nets = {"loss": self.sampling_net}
        if self.score_ema is not None:
            nets["loss_online"] = self.score_net
        sums = {}
        for key, net in nets.items():
            generator = torch.Generator(device=batch.x.device).manual_seed(0)
            sums[key] = dsm_loss(self.score_fn(net), z0, self.sde, generator) * batch.size
        return sums

    @torch.no_grad()
    def sample_vectors(
        self, n: int, *, generator: torch.Generator, sampler: str | None = None, steps: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """n code vectors (n, F) as 0/1, on the model's device: z_T ~ N(0, I), integrated by
        ``sampler`` in ``steps`` (default: the config's), decoded; and the (n,) mask of draws
        that decoded to no code (``from_diffusion_space``)."""
        device = next(self.score_net.parameters()).device
        z_T = torch.randn(n, self.width, generator=generator, device=device)
        score = self.score_fn(self.sampling_net)
        z = sample(sampler or self.config.sampler, score, self.sde, z_T, steps or self.config.sample_steps, generator)
        return self.from_diffusion_space(z, generator)

    def sample_rows(
        self, n: int, *, rng: torch.Generator, first_id: int, context: GenerationContext
    ) -> tuple[pa.Table, dict[str, int]]:
        """The ``Generator`` capability: n draws. A draw that decodes to no code (no
        training patient has none) is counted: kept with its likeliest code
        (``no_codes_top1``) or dropped (``no_codes``), per ``empty_decode``."""
        device = next(self.score_net.parameters()).device
        x, empty = self.sample_vectors(n, generator=device_generator(rng, device))
        x, empty = x.cpu().numpy(), empty.cpu().numpy()
        x = x[x.sum(1) > 0]  # under "reject", the empty draws
        sex = np.where(torch.rand(len(x), generator=rng).numpy() < context.female_share, 1, -1)
        key = "no_codes_top1" if self.config.empty_decode == "top1" else "no_codes"
        return code_rows(x, self.info, first_id, sex), {key: int(empty.sum())}


AE_MODEL = ModelSpec(
    name="scoehr_ae",
    config_cls=ScoEHRAEConfig,
    build=ScoEHRAutoencoder,
    view=CodeVectorView,
    capabilities=("encoder",),
    default_sweep="search_spaces/scoehr_ae.yaml",
    metric_names=("train/loss", "train/grad_norm/autoencoder", "val/loss", "val/bit_errors"),
    description="seed 002 ScoEHR stage 1: code-vector autoencoder (Linear+tanh / Linear+sigmoid, BCE)",
)
MODEL = ModelSpec(
    name="scoehr_score",
    config_cls=ScoEHRScoreConfig,
    build=ScoEHRScoreModel,
    view=CodeVectorView,
    capabilities=("generator",),
    default_sweep="search_spaces/scoehr_score.yaml",
    upstream=(AE_MODEL,),
    metric_names=("train/loss", "train/grad_norm/score", "val/loss", "val/loss_online"),
    description="seed 002 ScoEHR stage 2: VP-SDE score network on the frozen autoencoder's latents",
)
