"""Model 1: Wasserstein autoencoder with a weight-clipped W1 critic (seed 000; Tolstikhin et al.
2017 for the WAE, Arjovsky et al. 2017 for the critic).

Model 0 with a structured latent: the aggregate posterior P_Φ(z) is pushed towards the prior
N(0, I) so that sampled z decode into synthetic sentences. ::

    generator     Model 0's encoder -> shallow CNN -> Linear -> z (B, latent_dim)
    decoder       Model 0's decoder (z -> tanh(Linear) -> H head-to-head GRUs)
    critic h      MLP latent_dim -> hidden x critic_layers -> 1, ReLU, params clamped to ±clip

    L_ae = E[-log P(y | z, x)]              (Model 0's per-token loss)
    L_g  = -λ E_{z ~ P_Φ}[h(z)]             autoencoder minimises L_ae + L_g
    L_d  =  E_{z ~ P_Φ}[h(z)] - E_{z ~ N(0, I)}[h(z)]    critic minimises, on detached z

Choices where the seed is silent or ambiguous (see also models.md §2):

* L_d carries no λ. The seed prints ``λ E[h(z)] - E[h(z_prior)]``, which is not the W1 dual
  unless λ = 1; ``λ (E[h(z)] - E[h(z_prior)])`` has the same maximiser as the form used here.
  λ is a generator-side penalty weight; keeping it out of L_d makes the critic step, its
  gradient clipping and the logged W1 estimate ``-L_d`` independent of λ. The Lipschitz
  constant K set by the clamp is absorbed into λ.
* Critic schedule and optimiser follow the WGAN reference: RMSprop lr 5e-5, clamp 0.01,
  ``n_critic = 5`` critic steps per autoencoder step, and ``n_critic_warmup = 100`` for the
  first 25 steps and on every 500th step. WGAN draws a fresh data batch per critic step; here
  the loop hands one batch per step, so the critic steps reuse that batch's z (detached, no
  extra encoder passes) against fresh prior samples each step.
* The critic runs in fp32 outside autocast: clamped weights give outputs of order 1e-4 whose
  differences bf16 would round away. The critic is tiny next to the GRUs.
* The CNN reads the H head states as H input channels over the d_h hidden units (Conv1d over
  the hidden axis), stride 2 per layer, so it both mixes heads and compresses (seed: to
  disentangle and compress). The encoder is deterministic (valid for a WAE).
* The autoencoder's AdamW uses beta1 = 0.5 (WAE reference configs).
* Model 0's ``bow_weight`` (bag-of-words loss from z) joins L_ae when on; ``train/recon_loss``
  stays the reconstruction alone and ``train/bow`` logs the auxiliary NLL.
* λ warms up linearly from 0 over ``lam_warmup_steps`` training steps (models.md §2 suggests
  warming up over the first epoch): early on the critic is still near its clamped
  initialisation and its gradient says little about where N(0, I) is.
* ``latent_penalty = "mmd"`` swaps the critic for WAE-MMD, the paper's other divergence:
  L_g = λ MMD²(z, N(0, I)), unbiased, IMQ kernel at the scales of ``metrics.tasks``, on the
  batch's z against as many prior draws. It needs no adversary (no critic, no critic
  optimiser, no W1 estimate), so it cannot fall behind the encoder; each DDP rank penalises
  its own batch and the gradients are all-reduced as usual. ``critic`` is the seed's default.
* ``latent_penalty = "mmd_by_sex"`` takes that MMD within each sex (weighted by its share of
  the batch), pulling q(z | sex) and not only q(z) to N(0, I). The decoder is given sex, so z
  need not carry it; the aggregate penalty alone leaves z predicting sex (AUROC 0.77 in the
  WAE-MMD reference run) because the diagnoses themselves do, and generation draws z
  independently of the sex it is decoded with.

Latent fit, logged per epoch (models.md §2 evaluation): ``train/z_mean_abs`` (mean over
dimensions of |batch mean of z|), ``train/z_var`` (mean per-dimension batch variance),
``train/mmd`` (unbiased IMQ MMD² of the batch's z against as many N(0, I) draws,
``metrics.tasks.imq_mmd2_unbiased``) and ``train/w1_estimate`` (the last critic step's -L_d),
each the mean of per-batch values over the epoch; and the same four on the tuning split under
``val/...``. The loop divides validation sums by the view's normaliser (predicted tokens), so
:meth:`WassersteinAutoencoder.eval_sums` returns each batch statistic times the batch's tokens:
``val/mmd`` etc. are token-weighted means of per-batch values (batch = ``eval_batch_size``
patients), not statistics of the whole split's z. ``val/loss_plus_mmd`` = ``val/loss`` +
``val/mmd`` is the sweeps' selection metric: reconstruction alone rewards λ -> 0.
A negative W1 estimate (the critic finds prior samples *less* critic-like than z, i.e. it has
fallen behind) is reported as a warning at the end of the epoch (:meth:`epoch_warnings`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from mirror.config import require
from mirror.data.batch import SequenceBatch, SequenceInfo
from mirror.data.views.sequence import SequenceView
from mirror.metrics.tasks import IMQ_SCALES, imq_mmd2_unbiased
from mirror.models.ae import (
    RECONSTRUCTION_METRICS,
    AEConfig,
    ConditionalAutoencoder,
    bow_terms,
    reconstruction_loss,
    scalars_to_floats,
)
from mirror.models.base import ModelSpec, StepContext

LATENT_PENALTIES = ("critic", "mmd", "mmd_by_sex")  # WAEConfig.latent_penalty


@dataclass(frozen=True)
class WAEConfig(AEConfig):
    """Model 1 hyperparameters: every Model 0 field plus the CNN latent head and the critic.
    Critic defaults are the WGAN reference values; widths are sized for CPU smoke runs."""

    latent_dim: int = 32  # width of z after CNN + Linear (real scale: 64)
    adam_beta1: float = 0.5  # autoencoder AdamW beta1 (WAE reference configs)
    # Latent head: shallow CNN over the (H, d_h) head states, then Linear to latent_dim.
    cnn_channels: int = 16  # Conv1d output channels (real scale: 32); very few (4) can leave
    # every ReLU dead so that z is constant: watch the z variance when shrinking it
    cnn_kernel: int = 5  # Conv1d kernel width, over hidden units
    cnn_layers: int = 2  # Conv1d + ReLU layers, stride 2 each; 0 = Linear only (ablation)
    # Critic h (W1 dual): an MLP kept K-Lipschitz by clamping its parameters.
    critic_hidden: int = 128  # units per hidden layer (real scale: 512, WAE adversary)
    critic_layers: int = 3  # hidden layers (real scale: 4)
    lam: float = 10.0  # λ: weight of the W1 penalty L_g in the autoencoder loss
    clip: float = 0.01  # clamp bound c for every critic parameter (sets K)
    critic_lr: float = 5e-5  # RMSprop learning rate of the critic
    n_critic: int = 5  # critic steps per autoencoder step
    n_critic_warmup: int = 100  # critic steps during warm-up and on boost steps
    critic_warmup_steps: int = 25  # first autoencoder steps that use n_critic_warmup; 0 = none
    critic_boost_every: int = 500  # every k-th step uses n_critic_warmup; 0 = never
    lam_warmup_steps: int = 200  # λ rises linearly from 0 to lam over these steps; 0 = none
    latent_penalty: str = "critic"  # "critic": the seed's W1 critic; "mmd": WAE-MMD (no critic);
    # "mmd_by_sex": WAE-MMD within each sex, so that z is independent of the sex covariate
    gen_prior: str = "standard"  # generation draws N(0, I), the prior the critic pulls z towards

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("cnn_channels", "cnn_kernel", "critic_hidden", "n_critic", "n_critic_warmup"):
            require(self, name, getattr(self, name) >= 1, "an int >= 1")
        for name in (
            "cnn_layers", "critic_layers", "critic_warmup_steps", "critic_boost_every", "lam_warmup_steps",
        ):
            require(self, name, getattr(self, name) >= 0, "an int >= 0")
        require(self, "lam", self.lam >= 0, "a float >= 0")
        require(self, "clip", self.clip > 0, "a float > 0")
        require(self, "critic_lr", self.critic_lr > 0, "a float > 0")
        require(self, "latent_penalty", self.latent_penalty in LATENT_PENALTIES, f"one of {LATENT_PENALTIES}")


class ConvLatentHead(nn.Module):
    """Seed Model 1: "a shallow CNN followed by a linear layer" after the encoder heads."""

    def __init__(self, cfg: WAEConfig):
        super().__init__()
        layers: list[nn.Module] = []
        channels, length = cfg.n_heads, cfg.head_hidden
        for _ in range(cfg.cnn_layers):
            pad = cfg.cnn_kernel // 2
            layers += [
                nn.Conv1d(channels, cfg.cnn_channels, cfg.cnn_kernel, stride=2, padding=pad),
                nn.ReLU(),
            ]
            channels, length = cfg.cnn_channels, (length + 2 * pad - cfg.cnn_kernel) // 2 + 1
        self.cnn = nn.Sequential(*layers)
        self.proj = nn.Linear(channels * length, cfg.latent_dim)  # no activation: z ~ N(0, I)

    def forward(self, head_states: torch.Tensor) -> torch.Tensor:
        # (B, H, d_h) -> (B, C, ~d_h / 2^layers) -> flatten -> (B, latent_dim)
        return self.proj(self.cnn(head_states).flatten(1))


class Critic(nn.Module):
    """h: R^latent_dim -> R, an unnormalised MLP (WAE z-adversary shape, WGAN clamping)."""

    def __init__(self, cfg: WAEConfig):
        super().__init__()
        dims = [cfg.latent_dim] + [cfg.critic_hidden] * cfg.critic_layers
        layers: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], 1))
        self.net = nn.Sequential(*layers)
        self.clamp_(cfg.clip)  # the Lipschitz bound holds from the first step on

    @torch.no_grad()
    def clamp_(self, clip: float) -> None:
        for p in self.parameters():
            p.clamp_(-clip, clip)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).squeeze(-1)  # (B, latent_dim) -> (B,)


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Parameters of ``module`` take no gradient inside the block (restored afterwards)."""
    saved = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), saved, strict=True):
            p.requires_grad_(flag)


class WassersteinAutoencoder(ConditionalAutoencoder):
    """Model 1 (seed 000): Model 0 with a CNN latent head and a W1 critic on z."""

    config: WAEConfig

    def __init__(self, config: WAEConfig, data_info: SequenceInfo):
        super().__init__(config, data_info, latent_head=ConvLatentHead(config))
        self.critic = Critic(config) if config.latent_penalty == "critic" else None

    def parts(self) -> dict[str, nn.Module]:
        return {"autoencoder": self.autoencoder} | ({"critic": self.critic} if self.critic is not None else {})

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        optimizers = super().make_optimizers()  # "autoencoder" first: the main one
        if self.critic is not None:
            optimizers["critic"] = torch.optim.RMSprop(self.critic.parameters(), lr=self.config.critic_lr)
        return optimizers

    def critic_steps(self, step: int) -> int:
        """WGAN schedule: n_critic_warmup steps early on and every critic_boost_every-th step.
        Depends only on the step number, so every DDP rank takes the same number of steps."""
        cfg = self.config
        boost = cfg.critic_boost_every > 0 and step % cfg.critic_boost_every == 0
        return cfg.n_critic_warmup if step < cfg.critic_warmup_steps or boost else cfg.n_critic

    def lam_at(self, step: int) -> float:
        """λ at training step ``step``: linear from 0 over ``lam_warmup_steps``, then λ."""
        cfg = self.config
        if cfg.lam_warmup_steps <= 0:
            return cfg.lam
        return cfg.lam * min(1.0, step / cfg.lam_warmup_steps)

    def train_step(self, batch: SequenceBatch, ctx: StepContext) -> dict[str, float]:
        cfg = self.config
        with ctx.autocast():
            sums, z = ctx.parts["autoencoder"](batch)
            recon = reconstruction_loss(sums, cfg.w_time)
            bow, bow_metric = bow_terms(sums, cfg.bow_weight)
        ae_loss = recon if bow is None else recon + bow  # everything but the latent penalty
        z_data = z.detach().float()
        lam = self.lam_at(ctx.global_step)
        if self.critic is None:  # WAE-MMD: the penalty is a statistic of the batch, no adversary
            gen_loss = lam * self.mmd_penalty(z.float(), batch.sex)
            loss = ae_loss + gen_loss
            ctx.step(loss, "autoencoder")
            fit: dict[str, float] = {"critic_steps": 0.0}
        else:
            gen_loss, loss, fit = self._critic_step(ctx, z, z_data, ae_loss, lam)
        self.record_latent(z_data)  # a no-op unless gen_prior = "aggregate"

        tokens = sums["tokens"].clamp(min=1.0)
        metrics = scalars_to_floats(
            {
                "loss": loss,
                "recon_loss": recon,
                "gen_loss": gen_loss,
                "nll_dx": sums["nll_dx"] / tokens,
                "nll_wk": sums["nll_wk"] / tokens,
            }
            | bow_metric
        )
        return metrics | latent_fit(z_data) | fit | {"lam": lam}

    def mmd_penalty(self, z: torch.Tensor, sex: torch.Tensor) -> torch.Tensor:
        """MMD² of the batch's z against as many N(0, I) draws; under ``mmd_by_sex``, the
        share-weighted sum of each sex's MMD² against its own prior draws."""
        if self.config.latent_penalty == "mmd":
            return imq_mmd2_penalty(z, torch.randn_like(z))
        total = z.sum() * 0.0
        for value in sex.unique():
            group = z[sex == value]
            total = total + group.shape[0] / z.shape[0] * imq_mmd2_penalty(group, torch.randn_like(group))
        return total

    def _critic_step(self, ctx: StepContext, z: torch.Tensor, z_data: torch.Tensor, ae_loss: torch.Tensor,
                     lam: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """The seed's W1 critic: its steps on the detached z, then the autoencoder's."""
        cfg, critic = self.config, ctx.parts["critic"]
        # Critic: minimise L_d = E[h(z)] - E[h(z_prior)] on this batch's detached z.
        n_steps = self.critic_steps(ctx.global_step)
        for _ in range(n_steps):
            h = critic(torch.cat([z_data, torch.randn_like(z_data)]))  # one forward: (2B,)
            h_data, h_prior = h.split(z_data.shape[0])
            critic_loss = h_data.mean() - h_prior.mean()
            ctx.step(critic_loss, "critic")
            self.critic.clamp_(cfg.clip)  # same tensors as the DDP-wrapped critic's

        # Autoencoder: minimise L_ae + L_g with the critic fixed (no gradient into it).
        with frozen(self.critic):
            gen_loss = -lam * critic(z.float()).mean()
            loss = ae_loss + gen_loss
            ctx.step(loss, "autoencoder")
        # last critic step's -L_d, in units of h (K * W1)
        return gen_loss, loss, {"w1_estimate": -critic_loss.item(), "critic_steps": float(n_steps)}

    def eval_sums(self, batch: SequenceBatch) -> dict[str, torch.Tensor]:
        """Model 0's sums plus the latent fit of this batch's z, each batch value times the
        batch's tokens (the loop divides by total tokens: token-weighted batch means), and
        ``loss_plus_mmd`` = the loss sum + mmd x tokens (so val/loss_plus_mmd = val/loss +
        val/mmd)."""
        sums, z = self.autoencoder(batch)
        sums["loss"] = sums["nll_dx"] + self.config.w_time * sums["nll_wk"]
        z = z.float()
        fit = latent_fit(z)
        if self.critic is not None:
            h_data, h_prior = self.critic(torch.cat([z, torch.randn_like(z)])).split(z.shape[0])
            fit["w1_estimate"] = float(h_prior.mean() - h_data.mean())
        tokens = sums["tokens"]
        out = {k: v.detach().float() for k, v in sums.items()}
        for key, value in fit.items():
            value = value if math.isfinite(value) else 0.0  # a 1-patient batch has no variance
            out[key] = (tokens * value).float()
        out["loss_plus_mmd"] = out["loss"] + out["mmd"]
        return out

    def epoch_warnings(self, metrics: dict[str, float]) -> list[str]:
        """Warnings about an epoch's metrics: a negative W1 estimate means the critic has
        fallen behind the encoder (it rates z above prior samples), so L_g pushes z nowhere
        useful; z drifts (check train/z_mean_abs) until the critic catches up."""
        out = []
        for key in ("train/w1_estimate", "val/w1_estimate"):
            value = metrics.get(key)
            if value is not None and value < 0:
                out.append(
                    f"{key} = {value:.3g} < 0: the critic is behind the encoder (raise "
                    f"critic_lr or n_critic, or lower lam); z mean |E z| "
                    f"{metrics.get(key.split('/')[0] + '/z_mean_abs', float('nan')):.3g}"
                )
        return out


LATENT_FIT = ("z_mean_abs", "z_var", "mmd")  # the keys of latent_fit


def imq_mmd2_penalty(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Differentiable unbiased MMD² of two batches with the IMQ kernel of
    ``metrics.tasks.imq_mmd2_unbiased`` (same scales, same value): the WAE-MMD penalty.
    Squared distances by the expansion (``cdist``'s sqrt has no gradient at the diagonal)."""
    n, d = x.shape
    if n < 2:
        return x.sum() * 0.0
    cs = torch.tensor([2.0 * d * s for s in IMQ_SCALES], dtype=x.dtype, device=x.device)

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d2 = ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T).clamp(min=0)
        return (cs / (cs + d2[..., None])).sum(-1)

    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=x.device)
    return kernel(x, x)[off_diagonal].mean() + kernel(y, y)[off_diagonal].mean() - 2.0 * kernel(x, y).mean()


def latent_fit(z: torch.Tensor) -> dict[str, float]:
    """Batch statistics of z (B, d) against N(0, I): mean over dimensions of |mean|, mean
    per-dimension variance, and unbiased IMQ MMD² against B prior draws."""
    z = z.detach().float()
    prior = torch.randn_like(z)
    mmd = imq_mmd2_unbiased(z, prior) if z.shape[0] >= 2 else float("nan")
    return {
        "z_mean_abs": float(z.mean(0).abs().mean()),
        "z_var": float(z.var(0).mean()) if z.shape[0] >= 2 else float("nan"),
        "mmd": mmd,
    }


MODEL = ModelSpec(
    name="wae",
    config_cls=WAEConfig,
    build=WassersteinAutoencoder,
    view=SequenceView,
    capabilities=("encoder", "sequence_decoder", "generator"),
    default_sweep="search_spaces/wae_ablation.yaml",
    metric_names=RECONSTRUCTION_METRICS + tuple(
        f"{split}/{name}" for split in ("train", "val") for name in ("w1_estimate", *LATENT_FIT)
    ) + (
        "train/recon_loss", "train/gen_loss", "train/critic_steps", "train/lam",
        "train/grad_norm/critic", "val/loss_plus_mmd",
    ),  # fmt: skip
    description="seed 000 Model 1: Wasserstein autoencoder with a weight-clipped critic (or WAE-MMD)",
)
