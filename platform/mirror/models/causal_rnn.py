"""Δ-informed risk predictors on the ``windows`` view (seed 003, Li et al.).

    causal_rnn_delta   stage 1 of ``pretrain``: a GRU/LSTM over windows t-L+1..t predicts
                       Δ_{t+1} (masked MSE on the Δ entries that were observed)
    causal_rnn         the predictor: onsets of DM/CAD/CKD/stroke in window t+1 (BCE among
                       patients at risk; AUROC/AUPRC) and next LDL/SBP/TG (MSE, scaled units)

Modes (``model.mode``): ``none`` reads X only; ``augment`` reads [X_t ⊕ Δ_t] (Δ_t: the effect
observed at window t, known by then; Δ_{t+1} is never an input); ``pretrain`` starts the RNN
from a ``causal_rnn_delta`` run (``--upstream-run``) and fine-tunes all of it on the outcome.
``cell = glm`` is the GLM baseline: logistic/linear regression on the last window (with Δ_t in
``augment``). ``task`` picks one target (the paper trains one model per task) or ``all``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mirror.config import require
from mirror.data.views.windows import (
    LAB_TARGETS,
    ONSET_TARGETS,
    WindowBatch,
    WindowsInfo,
    WindowsView,
)
from mirror.models.base import ModelSpec, Prediction, StepContext

TASKS = ONSET_TARGETS + LAB_TARGETS


@dataclass(frozen=True)
class CausalRNNConfig:
    cell: str = "gru"  # gru | lstm | glm
    mode: str = "none"  # none | augment | pretrain
    task: str = "all"  # one of TASKS, or all
    hidden: int = 32
    layers: int = 1
    dropout: float = 0.0
    lr: float = 1e-3
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        require(self, "cell", self.cell in ("gru", "lstm", "glm"), "gru, lstm or glm")
        require(self, "mode", self.mode in ("none", "augment", "pretrain"), "none, augment or pretrain")
        require(self, "task", self.task in (*TASKS, "all"), f"one of {TASKS} or all")
        require(self, "mode", not (self.cell == "glm" and self.mode == "pretrain"), "none or augment for the GLM")
        require(self, "hidden", self.hidden >= 1, "an int >= 1")
        require(self, "layers", self.layers >= 1, "an int >= 1")
        require(self, "lr", self.lr > 0, "a positive learning rate")


class WindowEncoder(nn.Module):
    """X (and Δ_t) over the look-back -> the last hidden state; the GLM reads the last window."""

    def __init__(self, config: CausalRNNConfig, n_in: int) -> None:
        super().__init__()
        self.cell = config.cell
        if config.cell == "glm":
            self.out_dim = n_in
            return
        rnn = nn.GRU if config.cell == "gru" else nn.LSTM
        self.rnn = rnn(n_in, config.hidden, num_layers=config.layers, batch_first=True,
                       dropout=config.dropout if config.layers > 1 else 0.0)
        self.out_dim = config.hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cell == "glm":
            return x[:, -1]
        out, _ = self.rnn(x)
        return out[:, -1]


def _inputs(batch: WindowBatch, augment: bool) -> torch.Tensor:
    return torch.cat([batch.x, batch.delta_in], dim=-1) if augment else batch.x


class _Base(nn.Module):
    def __init__(self, config: CausalRNNConfig, info: WindowsInfo) -> None:
        super().__init__()
        if config.mode in ("augment", "pretrain") and not info.has_delta:
            raise ValueError(f"model.mode={config.mode!r} needs Δ: train with --set view.delta=<name> "
                             "(jobs/estimate_delta.py writes it)")
        self.config = config
        self.augment = config.mode == "augment"
        self.encoder = WindowEncoder(config, info.n_features + (info.n_delta if self.augment else 0))

    def parts(self) -> dict[str, nn.Module]:
        return {"model": self}

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        params = [p for p in self.parameters() if p.requires_grad]
        return {"model": torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)}

    def train_step(self, batch: WindowBatch, ctx: StepContext) -> dict[str, float]:
        with ctx.autocast():
            sums = ctx.parts["model"](batch)
        loss = sums["loss"] / max(batch.size, 1)
        ctx.step(loss, "model")
        return {"loss": float(loss.detach())}

    def eval_sums(self, batch: WindowBatch) -> dict[str, torch.Tensor]:
        return {k: v.detach().float() for k, v in self(batch).items()}


class DeltaPretrainer(_Base):
    """Stage 1: predict Δ_{t+1} from X_{<=t}: squared error summed over the entries that are
    known, the estimated ones and the zeros where no level was added (the paper's sparse Δ: a
    model must also learn when no treatment effect comes)."""

    def __init__(self, config: CausalRNNConfig, info: WindowsInfo) -> None:
        super().__init__(config.__class__(**{**config.__dict__, "mode": "pretrain"}) if config.mode == "none" else config, info)
        self.augment = False
        self.encoder = WindowEncoder(self.config, info.n_features)
        self.head = nn.Linear(self.encoder.out_dim, info.n_delta)

    def forward(self, batch: WindowBatch) -> dict[str, torch.Tensor]:
        pred = self.head(self.encoder(batch.x))
        mask = (batch.delta_observed | batch.delta_zero).float()
        return {"loss": (((pred - batch.delta_target) ** 2) * mask).sum(), "delta_entries": mask.sum()}


class CausalRNN(_Base):
    """The predictor; ``upstream`` (a stage-1 ``DeltaPretrainer``) seeds the RNN in ``pretrain``."""

    def __init__(self, config: CausalRNNConfig, info: WindowsInfo, upstream: DeltaPretrainer | None = None) -> None:
        super().__init__(config, info)
        if config.mode == "pretrain":
            if upstream is None:
                raise ValueError("model.mode='pretrain' fine-tunes a causal_rnn_delta run: pass --upstream-run RUN_ID")
            if upstream.config.cell != config.cell or upstream.config.hidden != config.hidden or upstream.config.layers != config.layers:
                raise ValueError(f"--upstream-run: its RNN ({upstream.config.cell}, hidden {upstream.config.hidden}, "
                                 f"layers {upstream.config.layers}) differs from model.cell/hidden/layers")
            self.encoder.load_state_dict(upstream.encoder.state_dict())  # copied, then fine-tuned
        tasks = TASKS if config.task == "all" else (config.task,)
        self.onsets = [ONSET_TARGETS.index(t) for t in tasks if t in ONSET_TARGETS]
        self.labs = [LAB_TARGETS.index(t) for t in tasks if t in LAB_TARGETS]
        self.prediction_targets = {t: ("risk" if t in ONSET_TARGETS else "value") for t in tasks}
        self.head = nn.Linear(self.encoder.out_dim, len(self.onsets) + len(self.labs))

    @torch.no_grad()
    def start_at_base_rates(self, onset_rate: torch.Tensor, lab_mean: torch.Tensor) -> None:
        """Output biases at the training base rates (logit of each onset's rate among the at-risk,
        each lab's mean, all four / three targets given). From a zero bias, at a 1% onset rate
        the first steps mostly lower the bias, and with inputs that are not centred that pushes
        the weights against the risk factors: the ranking starts inverted and a small sample may
        stop early there."""
        rate = onset_rate[self.onsets].clamp(1e-4, 1 - 1e-4)
        self.head.bias[: len(self.onsets)] = torch.log(rate / (1 - rate))
        self.head.bias[len(self.onsets):] = lab_mean[self.labs]

    def outputs(self, batch: WindowBatch) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(self.encoder(_inputs(batch, self.augment)))
        return out[:, : len(self.onsets)], out[:, len(self.onsets):]

    def forward(self, batch: WindowBatch) -> dict[str, torch.Tensor]:
        logit, value = self.outputs(batch)
        risk = batch.at_risk[:, self.onsets].float()
        bce = F.binary_cross_entropy_with_logits(logit, batch.onset[:, self.onsets], reduction="none")
        seen = batch.lab_observed[:, self.labs].float()
        mse = ((value - batch.lab_target[:, self.labs]) ** 2) * seen
        return {"loss": (bce * risk).sum() + mse.sum(), "onset_bce": (bce * risk).sum(), "lab_mse": mse.sum()}

    def predict(self, batch: WindowBatch) -> dict[str, Prediction]:
        logit, value = self.outputs(batch)
        out = {}
        for j, k in enumerate(self.onsets):
            out[ONSET_TARGETS[k]] = Prediction(torch.sigmoid(logit[:, j]), batch.onset[:, k], batch.at_risk[:, k])
        for j, k in enumerate(self.labs):
            out[LAB_TARGETS[k]] = Prediction(value[:, j], batch.lab_target[:, k], batch.lab_observed[:, k])
        return out


PRETRAIN = ModelSpec(
    name="causal_rnn_delta", config_cls=CausalRNNConfig, build=DeltaPretrainer, view=WindowsView,
    metric_names=("train/loss", "val/loss"), default_sweep="search_spaces/causal_rnn.yaml",
    description="Stage 1 of Δ-pretraining: a GRU/LSTM over windows predicts the next window's Δ (seed 003).",
)  # fmt: skip
MODEL = ModelSpec(
    name="causal_rnn", config_cls=CausalRNNConfig, build=CausalRNN, view=WindowsView, capabilities=("predictor",),
    upstream=(PRETRAIN,), metric_names=("train/loss", "val/loss", "val/onset_bce", "val/lab_mse"), default_sweep="search_spaces/causal_rnn.yaml",
    description="GRU/LSTM/GLM risk predictor on windows, without Δ, with Δ_t as input, or Δ-pretrained (seed 003).",
)  # fmt: skip
