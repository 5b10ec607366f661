"""The model plug-in surface: a trainable core every model has, and capabilities it opts into.

A model is an ``nn.Module`` made of named *parts* (``parts()``), e.g. ``{"autoencoder": ...}``
or ``{"autoencoder": ..., "critic": ...}``. The loop moves each part to the device and wraps it
in DDP separately (a WAE's critic and autoencoder step on different optimisers), and hands the
wrapped parts back through :class:`StepContext`. The model owns *what* a step does
(``train_step``: critic steps, loss terms); the loop owns *how* (devices, DDP, autocast,
gradient clipping, LR schedule, checkpoints, logging). Batches are whatever the model's data
view collates; the loop never looks inside them.

Beyond training, a model declares capabilities (:data:`CAPABILITIES`): ``Encoder`` for the embed
job, ``SequenceDecoder`` for the four-task evaluation, ``Generator`` for synthetic patients,
``Predictor`` and ``Recommender`` for their metric suites. Jobs and evaluation ask the model's
:class:`ModelSpec` what it can do; nothing branches on a model's name. Capability methods run
on the unwrapped model, under ``torch.no_grad`` by the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    import pyarrow as pa

    from mirror.data.views.base import DataView


class StepContext(Protocol):
    """Given by the training loop to ``train_step``."""

    device: torch.device
    global_step: int
    parts: dict[str, nn.Module]  # DDP-wrapped parts: call these in train_step

    def autocast(self) -> AbstractContextManager[Any]:
        """bf16 autocast on GPU, a no-op on CPU."""
        ...

    def step(self, loss: torch.Tensor, optimizer: str) -> float:
        """Backward ``loss``, clip the gradients of that optimizer's parameters, step it, zero
        its gradients. Returns the pre-clip gradient norm. LR schedules are not stepped here:
        the loop advances every schedule once per training step (global step), however many
        times ``train_step`` steps each optimizer."""
        ...


@runtime_checkable
class TrainableModel(Protocol):
    """What the training loop needs, and all it needs, from every model."""

    config: Any

    def parts(self) -> dict[str, nn.Module]:
        """Named sub-modules, each wrapped in DDP on its own by the loop."""
        ...

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One optimizer per name used in ``train_step``; the first is the main one."""
        ...

    def train_step(self, batch: Any, ctx: StepContext) -> dict[str, float]:
        """One optimisation step on ``batch``; returns scalar metrics for logging."""
        ...

    def eval_sums(self, batch: Any) -> dict[str, torch.Tensor]:
        """Validation sums for one batch; the loop adds them across batches and ranks, then
        divides each by the view's normaliser (a key of these sums, or the patient count)."""
        ...

    # Optional (not part of the protocol, looked up by the loop):
    # ``epoch_warnings(metrics: dict[str, float]) -> list[str]``: warnings about one epoch's
    # reduced metrics (``train/*``, ``val/*``), logged and shown on the driver by rank 0.


# ---------------------------------------------------------------------------------------------
# Capabilities: opt-in, declared in the model's ModelSpec and checked against these protocols.


@runtime_checkable
class Encoder(Protocol):
    """z per patient: the embed job (the "digital mirror universe")."""

    @property
    def latent_dim(self) -> int: ...

    def encode(self, batch: Any) -> torch.Tensor:
        """Latent z, shape (B, latent_dim)."""
        ...


@runtime_checkable
class SequenceDecoder(Protocol):
    """Reconstructs sentences from z: the four-task evaluation and white-box membership."""

    def encode(self, batch: Any) -> torch.Tensor: ...

    def teacher_forced_logits(self, batch: Any, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder logits under teacher forcing: (B, T, V_dx) and (B, T, V_wk)."""
        ...

    def generate(
        self, z: torch.Tensor, sex: torch.Tensor, max_words: int, *, greedy: bool = True,
        temperature: float | None = None, top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Free-running decode from z: dx ids (B, max_words), week ids (B, max_words), and the
        number of words before ``<EOS>`` (B,). Positions past a sentence's end hold ``<PAD>``.
        ``greedy`` (reconstruction) takes the argmax; otherwise words are drawn by ancestral
        sampling (generation) at ``temperature`` with nucleus ``top_p`` (None: the model's
        configured values), from ``generator`` (on z's device)."""
        ...

    def patient_nll(self, batch: Any) -> torch.Tensor:
        """Per-patient reconstruction negative log-likelihood (B,)."""
        ...

    def sample_latent(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n draws of z (CPU) from the prior that generation decodes: N(0, I), or a fit."""
        ...


@dataclass(frozen=True)
class GenerationContext:
    """What a generator is told about the real population it imitates."""

    female_share: float  # of the real training split
    week_vocab_size: int  # the real dataset's week span (plus specials)
    # Generators that twin real records (a trial generator keeps each participant's schedule)
    # get this call's real rows of the training split here, streamed by the caller one block
    # per call (``n`` rows); None for generators that draw from noise alone.
    real_rows: pa.Table | None = None
    view: DataView | None = None  # the run's data view over the real data, for ``real_rows``


@runtime_checkable
class Generator(Protocol):
    """Synthetic patients in the platform's row layout: scorecard, privacy gate, sample job."""

    def sample_rows(
        self, n: int, *, rng: torch.Generator, first_id: int, context: GenerationContext
    ) -> tuple[pa.Table, dict[str, int]]:
        """Draw ``n`` patients; return the valid ones as dataset rows (ids from ``first_id``)
        and how many draws failed each validity rule. Invalid draws are never returned."""
        ...


class Prediction(NamedTuple):
    """One predicted target over a batch: scores and truth (B,), and which entries count."""

    score: torch.Tensor  # probability for "risk", predicted value for "value"
    target: torch.Tensor
    observed: torch.Tensor  # bool (B,): False where the target is missing


TargetKind = Literal["risk", "value"]


@runtime_checkable
class Predictor(Protocol):
    """Risk or value per patient or window: AUROC/AUPRC for risks, MSE for values."""

    prediction_targets: Mapping[str, TargetKind]

    def predict(self, batch: Any) -> dict[str, Prediction]: ...


@runtime_checkable
class Recommender(Protocol):
    """A multi-label recommendation per example (admission): ROC-AUC, PR-AUC, Jaccard, F1, DDI
    (``mirror.evaluation.recommender``). Optional: ``recommendation_outcomes(batch, scores) ->
    {name: (B,) tensor}``, the model's own outcome of any regimen (MiranDa: retrieved ELOS),
    which the suite scores for the model's, the given and the floor's regimens."""

    def recommend(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores in [0, 1] and the multi-hot truth, both (B, n_labels)."""
        ...


@runtime_checkable
class CounterfactualGenerator(Protocol):
    """A generator that can also write each twinned record under the other arm (trial twins):
    the sample job writes these beside the twins and gates them too."""

    def counterfactual_rows(
        self, n: int, *, rng: torch.Generator, first_id: int, context: GenerationContext
    ) -> tuple[pa.Table, dict[str, int]]:
        """The same ``n`` real rows as ``sample_rows`` (``context.real_rows``), each under the
        other arm; the ids match ``sample_rows``'s row for row."""
        ...


CAPABILITIES: dict[str, type] = {
    "encoder": Encoder,
    "sequence_decoder": SequenceDecoder,
    "generator": Generator,
    "counterfactual_generator": CounterfactualGenerator,
    "predictor": Predictor,
    "recommender": Recommender,
}


# ---------------------------------------------------------------------------------------------
# The metadata each model file declares beside its model.


@dataclass(frozen=True)
class ModelSpec:
    """Everything the platform knows about a model, declared in the model's own file.

    ``build(config, info)`` makes the model; ``info`` is the view's facts about the dataset.
    A model trained on another run's frozen model (a second stage) lists the specs it can
    build on in ``upstream`` and is built with ``build(config, info, upstream=model)``.
    """

    name: str
    config_cls: type  # frozen config dataclass; overrides are checked against its fields
    build: Callable[..., TrainableModel]
    view: type[DataView]  # the data view the model reads
    capabilities: tuple[str, ...] = ()  # keys of CAPABILITIES
    default_sweep: str | None = None  # search_spaces/... file, relative to the repository
    upstream: tuple[ModelSpec, ...] = ()  # models a run of this one can start from
    # Per-epoch metrics the model makes the loop report (``train/<train_step key>``,
    # ``train/grad_norm/<optimizer>``, ``val/<eval_sums key>``): a sweep's ``metric`` must be
    # one of these or of the loop's own (``mirror.guards.loop_metrics``), checked at load.
    metric_names: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        unknown = [c for c in self.capabilities if c not in CAPABILITIES]
        if unknown:
            raise ValueError(
                f"model {self.name!r}: unknown capabilities {unknown}; valid: {sorted(CAPABILITIES)}"
            )

    def can(self, capability: str) -> bool:
        return capability in self.capabilities


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
