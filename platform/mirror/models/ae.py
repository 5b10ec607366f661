"""Model 0: the conditional multi-head GRU autoencoder of seed 000 (the "digital mirror universe").

    z = f(y, x),    min  E_{x,y ~ Pop} [ -log P(y | z, x) ]

``y`` is a patient's diagnosis sentence, each word a diagnosis-age token and a week token;
``x`` is sex (-1 male, +1 female), fed to encoder and decoder as a covariate so that ``z``
need not carry it (nothing in the loss enforces that: evaluation measures it).

Shapes: B patients, T = L + 1 steps, H heads, d_h hidden units per head, N = sum(lengths + 1)
valid steps in a batch. ::

    step input    u_t = [E_dx(c_t) ⊕ E_wk(τ_t) ⊕ x]                  (d_dx + d_wk + 1)
    encoder       H independent GRUs over [<EOS>, w_L, ..., w_1]    final states (B, H, d_h)
    latent head   z = Linear(concat of the H final states)            (B, latent_dim)
    decoder init  tanh(Linear(z)) split into H chunks; chunk k -> decoder head k
    decoder       H GRUs over [<SOS>, w_1, ..., w_L]; outputs concatenated (B, T, H·d_h)
                  -> Linear + ReLU (aggregation) -> dx logits (V_dx) and week logits (V_wk)

Choices where the seed is silent:

* Both embedding tables are shared by encoder and decoder. They have no ``padding_idx``: inside
  a sentence ``<PAD>`` is the training mask token, and it gets a learned vector.
* Sequences are packed with ``lengths + 1`` (never inferred from ``<PAD>``, which doubles as the
  mask token), so padding costs no compute in the GRUs, embeddings or 14,523-way output layer.
* The week is conditioned on the word it belongs to (``week_on_dx``, default on):
  ``P(c_t, τ_t | state) = P(c_t | state) · P(τ_t | state, c_t)``, the week head reading the
  features together with ``E_dx(c_t)`` (the target under teacher forcing, the chosen word when
  decoding). The age group in ``c_t`` pins the week to a five-year window of the birth week,
  which an unconditioned week head cannot know. ``week_on_dx = False`` is the old factorisation
  (dx and week independent given the state).
* Decoding (:meth:`SentenceAutoencoder.generate`): greedy for reconstruction, ancestral
  sampling with temperature and nucleus (top-p) truncation for generation. Both decode under
  the data contract's structure: no ``<EOS>`` before the first word, age group and week never
  decrease, and every (age group, week) pair keeps one birth week consistent with all the
  words so far (the rules of ``metrics.tasks.generation_rule_failures``, which stay the
  definition of validity; decoding only never proposes what they reject).
* Generation draws z from ``gen_prior``. Model 0 has no prior of its own: its aggregate
  posterior is whatever the encoder makes of the data (variance ~0.35 per dimension in the
  reference run), so z ~ N(0, I) asks the decoder about latents it never saw, and sentences run
  on without ``<EOS>``. ``aggregate`` (Model 0's default) draws from a Gaussian fitted to the
  aggregate posterior during training (:class:`LatentMoments`; ex-post density estimation,
  Ghosh et al. 2020, "From variational to deterministic autoencoders"); ``standard`` draws
  N(0, I), the prior Model 1 is trained towards.
* ``copy_history`` (:class:`HistoryBias`): the condition logits get a learned, state-gated
  bias towards the conditions already in the sentence and the previous word's, a copy
  mechanism for sentences that repeat their conditions week after week (copying the previous
  word alone scores 0.33 teacher-forced accuracy). It needs the factorised head, and reads the
  true prefix under teacher forcing and the decoder's own words when decoding
  (:class:`WordHistory`; ``bench/bench_decoder.py`` measures it).
* The loss is the per-token mean of ``CE(dx) + w_time * CE(week)`` over the predicted tokens
  (words and the final ``<EOS>``); :meth:`SentenceAutoencoder.patient_nll` is the plain
  (unweighted) NLL summed per patient.
* ``bow_weight`` > 0 adds ``bow_weight`` times a bag-of-words loss (Zhao et al. 2017): a
  linear head from z alone predicts the sentence's conditions (:meth:`SentenceAutoencoder.bow_nll`),
  by default each distinct condition once (``bow_target = "presence"``). The copy mechanism
  lets the decoder read the conditions off the sentence so far, so nothing else makes z carry
  which conditions the patient has; this does. With ``encoder_bag`` (:class:`ConditionBag`)
  z also gets a linear read of that presence, which the GRU heads alone learn too slowly for
  605 rare conditions. The two together (weight 5) are what lifts the truth-recovery probe from
  z to the bag-of-conditions floor (``bench/README.md``, bag-of-words).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pyarrow as pa
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from mirror.config import require
from mirror.data.batch import SequenceBatch, SequenceInfo
from mirror.data.views.sequence import SequenceView
from mirror.data.vocab import EOS, N_AGE_GROUPS, N_CONDITIONS, N_SPECIAL, PAD, SOS
from mirror.metrics.tasks import AGE_GROUP_WEEKS, condition_ids, condition_sets
from mirror.models.base import GenerationContext, ModelSpec, StepContext
from mirror.models.sentences import sample_sentence_rows


@dataclass(frozen=True)
class AEConfig:
    """Model 0 hyperparameters (all sizes suggested by models.md §1; the seed gives none).

    Defaults are sized for fast CPU smoke runs; each width's comment gives the real-scale value.
    """

    # How a trained run draws, changeable at sampling time (jobs/sample.py --set).
    SAMPLE_TIME: ClassVar[tuple[str, ...]] = ("gen_prior", "gen_temperature", "gen_top_p")
    # Runs saved before the decoder options existed decode as they were trained.
    SAVED_BEFORE: ClassVar[dict[str, object]] = {
        "dx_output": "full", "z_every_step": False, "word_dropout": 0.0, "gen_prior": "standard",
        "copy_history": False, "bow_weight": 0.0, "bow_target": "counts", "encoder_bag": False,
    }

    # Widths.
    dx_emb_dim: int = 64  # diagnosis-age embedding width (real scale: 256)
    wk_emb_dim: int = 16  # week embedding width (real scale: 64)
    n_heads: int = 2  # H: independent GRU heads, in the encoder and in the decoder (real: 4)
    head_hidden: int = 64  # d_h: GRU hidden units per head (real scale: 256)
    latent_dim: int = 32  # width of z (real scale: 1024 = H·d_h)
    out_hidden: int = 128  # decoder aggregation layer before the two softmax heads (real: 512)
    week_on_dx: bool = True  # week head also reads E_dx(word): P(week | state, word)
    # z also gets a linear read of which conditions the sentence has (ConditionBag), added to
    # the GRU heads' aggregation. On by measurement, with the presence bag-of-words loss:
    # bench/README.md (bag-of-words) and the README's reference run.
    encoder_bag: bool = True
    # Decoder options (bench/bench_decoder.py measures them against each other).
    dx_output: str = "factorised"  # condition x age group; "full": one 14,523-way softmax (seed)
    z_every_step: bool = True  # feed z beside every decoder input, not only into h_0
    word_dropout: float = 0.0  # training: each decoder input word -> <PAD> with this probability
    # Condition logits get a learned, state-gated bias towards conditions already in the
    # sentence and towards the previous word's (HistoryBias; needs dx_output "factorised").
    # On by measurement: bench/README.md (decoder) and the README's reference run.
    copy_history: bool = True
    # Loss.
    w_time: float = 1.0  # weight of the week cross-entropy relative to the diagnosis-age one
    bow_weight: float = 5.0  # weight of the bag-of-conditions loss from z (0: no head, no loss)
    bow_target: str = "presence"  # the bag: each distinct condition once, or "counts" (every word's)
    # Generation (z from gen_prior decoded by ancestral sampling; reconstruction stays greedy).
    gen_prior: str = "aggregate"  # Gaussian fitted to the aggregate posterior; "standard": N(0, I)
    prior_momentum: float = 0.01  # per-step EMA weight of the aggregate posterior's moments
    gen_temperature: float = 1.0  # softmax temperature of sampled words and weeks (1 = the model)
    gen_top_p: float = 1.0  # nucleus sampling: smallest set of mass >= top_p (1 = no truncation)
    # Optimisation: AdamW over every autoencoder parameter. Gradient clipping, LR schedule and
    # batch size belong to the training loop (TrainConfig), not to the model.
    lr: float = 1e-3  # learning rate
    adam_beta1: float = 0.9  # AdamW beta1 (beta2 = 0.999)
    weight_decay: float = 0.0  # decoupled weight decay (AdamW)

    def __post_init__(self) -> None:
        for name in (
            "dx_emb_dim",
            "wk_emb_dim",
            "n_heads",
            "head_hidden",
            "latent_dim",
            "out_hidden",
        ):
            require(self, name, getattr(self, name) >= 1, "an int >= 1")
        require(self, "w_time", self.w_time >= 0, "a float >= 0")
        require(self, "bow_weight", self.bow_weight >= 0, "a float >= 0")
        require(self, "bow_target", self.bow_target in BOW_TARGETS, f"one of {list(BOW_TARGETS)}")
        require(self, "dx_output", self.dx_output in WORD_HEADS, f"one of {sorted(WORD_HEADS)}")
        require(self, "word_dropout", 0 <= self.word_dropout < 1, "a float in [0, 1)")
        require(self, "copy_history", not self.copy_history or self.dx_output == "factorised",
                "false unless dx_output is 'factorised' (its bias is over conditions)")
        require(self, "gen_prior", self.gen_prior in GEN_PRIORS, f"one of {list(GEN_PRIORS)}")
        require(self, "prior_momentum", 0 < self.prior_momentum <= 1, "a float in (0, 1]")
        require(self, "gen_temperature", self.gen_temperature > 0, "a float > 0")
        require(self, "gen_top_p", 0 < self.gen_top_p <= 1, "a float in (0, 1]")
        require(self, "lr", self.lr > 0, "a float > 0")
        require(self, "adam_beta1", 0 <= self.adam_beta1 < 1, "a float in [0, 1)")
        require(self, "weight_decay", self.weight_decay >= 0, "a float >= 0")


# ---------------------------------------------------------------------------------------------
# Building blocks (shared with Model 1).


def pack_steps(columns: list[torch.Tensor], lengths: torch.Tensor) -> PackedSequence:
    """Pack (B, T) integer columns over the first ``lengths + 1`` steps of each row, all in one
    permutation, so that inputs, targets and row ids line up; ``.data`` is (N, n_columns)."""
    stacked = torch.stack(columns, dim=-1)  # (B, T, C)
    steps = (lengths + 1).cpu()  # pack_padded_sequence wants lengths on the CPU
    return pack_padded_sequence(stacked, steps, batch_first=True, enforce_sorted=False)


def with_data(packed: PackedSequence, data: torch.Tensor) -> PackedSequence:
    """The same packing as ``packed`` around new per-step ``data`` (N, ...)."""
    return PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)


class StepEmbedding(nn.Module):
    """u = [E_dx(dx) ⊕ E_wk(week) ⊕ x]: separate lookup tables for the joint diagnosis-age token
    and for the categorical week (seed 000), concatenated with the sex covariate."""

    def __init__(self, data_info: SequenceInfo, dx_dim: int, wk_dim: int):
        super().__init__()
        self.dx = nn.Embedding(data_info.diag_age_vocab_size, dx_dim)
        self.wk = nn.Embedding(data_info.week_vocab_size, wk_dim)
        self.dim = dx_dim + wk_dim + 1

    def forward(self, dx: torch.Tensor, wk: torch.Tensor, sex: torch.Tensor) -> torch.Tensor:
        # dx, wk: (...,) int64; sex: (...,) float -> (..., d_dx + d_wk + 1)
        e_dx = self.dx(dx)
        return torch.cat([e_dx, self.wk(wk), sex.to(e_dx.dtype).unsqueeze(-1)], dim=-1)


class MultiHeadGRUEncoder(nn.Module):
    """H independent single-layer GRUs reading the same steps (the seed's "multi-head GRU",
    by analogy with the two directions of a bidirectional RNN); returns each head's state at
    the sentence's last valid step."""

    def __init__(self, input_dim: int, n_heads: int, hidden: int):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.GRU(input_dim, hidden, batch_first=True) for _ in range(n_heads)
        )

    def forward(self, steps: PackedSequence) -> torch.Tensor:
        # h_n of a packed GRU is (1, B, d_h), taken at each row's own last step, in batch order.
        return torch.stack([head(steps)[1][0] for head in self.heads], dim=1)  # (B, H, d_h)


class ConditionBag(nn.Module):
    """A linear map from the sentence's condition presence to z, added to the latent head's.

    The GRU heads read a sentence in order and learn slowly which of 605 rare conditions say
    what about a patient; a linear read of the multi-hot is the path a PCA of the presence
    takes (``bench/bench_ae_bow.py``). Zero-initialised: training starts from the model without it."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.proj = nn.Linear(N_CONDITIONS, latent_dim, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, presence: torch.Tensor) -> torch.Tensor:
        return self.proj(presence)


class LinearLatentHead(nn.Module):
    """Model 0's aggregation layer: the concatenated head states -> z (B, latent_dim)."""

    def __init__(self, n_heads: int, head_hidden: int, latent_dim: int):
        super().__init__()
        self.proj = nn.Linear(n_heads * head_hidden, latent_dim)

    def forward(self, head_states: torch.Tensor) -> torch.Tensor:
        return self.proj(head_states.flatten(1))  # (B, H, d_h) -> (B, H·d_h) -> (B, latent_dim)


class FullWordHead(nn.Linear):
    """P(word | features) as one softmax over the whole diagnosis-age vocabulary (seed 000).
    A plain Linear, so checkpoints from before the decoder options load unchanged."""

    def logits(self, features: torch.Tensor, history: WordHistory | None = None) -> torch.Tensor:
        return self(features)  # (..., V_dx); AEConfig refuses copy_history with this head

    def nll(self, features: torch.Tensor, target: torch.Tensor, history: WordHistory | None = None) -> torch.Tensor:
        return F.cross_entropy(self(features), target, ignore_index=PAD, reduction="none")


@dataclass(frozen=True)
class WordHistory:
    """What the sentence has said before each step: ``seen`` (N, C) bool, the conditions among
    its words so far, and ``last`` (N,), the condition of the step's input word (-1 at
    ``<SOS>``). Built from the true prefix under teacher forcing, from the decoder's own
    words when decoding."""

    seen: torch.Tensor
    last: torch.Tensor

    @classmethod
    def teacher_forced(cls, dec_dx: torch.Tensor, row: torch.Tensor, step: torch.Tensor, dx: torch.Tensor) -> WordHistory:
        """Per packed step (``row``, ``step``, input word ``dx``, each (N,)) of the padded
        decoder inputs ``dec_dx`` (B, T): a condition is seen at step t when some input word
        at a step <= t carries it (first occurrence per row by one scatter, no (B, T, C))."""
        b, t = dec_dx.shape
        cond = condition_ids(dec_dx, N_CONDITIONS)  # specials into a sink column
        steps = torch.arange(t, device=dec_dx.device).expand(b, t)
        first = torch.full((b, N_CONDITIONS + 1), t, dtype=torch.long, device=dec_dx.device)
        first.scatter_reduce_(1, cond, steps, reduce="amin")
        return cls(first[row, :N_CONDITIONS] <= step[:, None], condition_ids(dx, -1))

    @classmethod
    def empty(cls, b: int, device: torch.device) -> WordHistory:
        return cls(torch.zeros(b, N_CONDITIONS, dtype=torch.bool, device=device),
                   torch.full((b,), -1, dtype=torch.long, device=device))

    def after(self, dx: torch.Tensor, alive: torch.Tensor) -> WordHistory:
        """The history once each ``alive`` row has written the word ``dx`` (B,)."""
        cond = torch.where(alive, condition_ids(dx, -1), torch.full_like(dx, -1))
        seen = self.seen.clone()
        rows = torch.nonzero(cond >= 0).squeeze(1)
        seen[rows, cond[rows]] = True
        return WordHistory(seen, torch.where(alive, cond, self.last))


class HistoryBias(nn.Module):
    """A copy mechanism for sentences that repeat themselves. A patient's conditions recur
    week after week, so copying the previous word is a strong floor (0.33 teacher-forced
    accuracy at simulator seed 0), and a GRU state must otherwise memorise which of 605
    conditions the sentence holds. This adds to each condition's logit

        seen_c · (a_c + g_seen(h)) + last_c · (b_c + g_last(h)),

    a learned per-condition propensity to recur (a_c) and to repeat at once (b_c), scaled up or
    down by the state (two scalar gates), so P(condition) can point at the history the way a
    pointer-generator does. Zero-initialised: it starts as the plain softmax."""

    def __init__(self, width: int):
        super().__init__()
        self.recur = nn.Parameter(torch.zeros(N_CONDITIONS))
        self.repeat = nn.Parameter(torch.zeros(N_CONDITIONS))
        self.gate = nn.Linear(width, 2)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, features: torch.Tensor, history: WordHistory) -> torch.Tensor:
        """(N, 1 + C) additive logits (``<EOS>``, column 0, gets none)."""
        gate = self.gate(features).float()  # (N, 2)
        bias = history.seen.float() * (self.recur + gate[:, :1])
        last = history.last.clamp(min=0)[:, None]
        repeat = (self.repeat[last] + gate[:, 1:]) * (history.last >= 0)[:, None].float()
        bias = bias.scatter_add(1, last, repeat)
        return F.pad(bias, (1, 0))


class FactorisedWordHead(nn.Module):
    """P(word | h) = P(condition | h) · P(age group | h, condition), for the 14,523-way softmax
    that dominates the decoder's compute: 606 + 24 outputs per step instead of 14,523.

    The condition softmax has ``<EOS>`` as class 0. The age group is scored additively, the
    state's age logits plus the condition's own learned age profile (early- vs late-onset),
    so the joint table of every (condition, age group) is one broadcast add when decoding
    needs it. ``<PAD>`` and ``<SOS>`` are never predicted (log-probability -1e9)."""

    def __init__(self, width: int, vocab_size: int, copy_history: bool = False):
        super().__init__()
        if vocab_size != N_SPECIAL + N_CONDITIONS * N_AGE_GROUPS:
            raise ValueError(f"FactorisedWordHead: the diagnosis-age vocabulary must be "
                             f"{N_SPECIAL} + {N_CONDITIONS} x {N_AGE_GROUPS}, received {vocab_size}")
        self.condition = nn.Linear(width, 1 + N_CONDITIONS)
        self.age = nn.Linear(width, N_AGE_GROUPS)
        self.age_profile = nn.Embedding(N_CONDITIONS, N_AGE_GROUPS)
        nn.init.zeros_(self.age_profile.weight)
        self.history = HistoryBias(width) if copy_history else None

    def condition_logits(self, features: torch.Tensor, history: WordHistory | None) -> torch.Tensor:
        logits = self.condition(features)
        if self.history is not None:
            if history is None:
                raise ValueError("FactorisedWordHead: copy_history is on, so every call needs the WordHistory")
            logits = logits + self.history(features, history).to(logits.dtype)
        return logits

    def logits(self, features: torch.Tensor, history: WordHistory | None = None) -> torch.Tensor:
        """Joint log-probabilities (N, V_dx) in the vocabulary's token order."""
        features = features.float()
        condition = torch.log_softmax(self.condition_logits(features, history), dim=-1)  # (N, 1 + C)
        age = torch.log_softmax(self.age(features)[..., None, :] + self.age_profile.weight, dim=-1)
        words = (condition[..., 1:, None] + age).flatten(-2)  # (..., C·G), token 3 + c·G + g
        never = torch.full_like(condition[..., :2], -1e9)  # <PAD>, <SOS>
        return torch.cat([never, condition[..., :1], words], dim=-1)

    def nll(self, features: torch.Tensor, target: torch.Tensor, history: WordHistory | None = None) -> torch.Tensor:
        is_word = target >= N_SPECIAL
        offset = (target - N_SPECIAL).clamp(min=0)
        condition = torch.where(is_word, offset // N_AGE_GROUPS + 1, 0)  # <EOS> (and <PAD>) -> 0
        nll = F.cross_entropy(self.condition_logits(features, history), condition, reduction="none")
        age_logits = self.age(features) + self.age_profile((condition - 1).clamp(min=0)).to(features.dtype)
        nll_age = F.cross_entropy(age_logits, offset % N_AGE_GROUPS, reduction="none")
        nll = nll + torch.where(is_word, nll_age, torch.zeros_like(nll_age))
        return torch.where(target == PAD, torch.zeros_like(nll), nll)


WORD_HEADS = {"full": FullWordHead, "factorised": FactorisedWordHead}


class MultiHeadGRUDecoder(nn.Module):
    """H GRUs initialised head-to-head from z, their outputs aggregated into the features from
    which the next diagnosis-age token and its week are predicted."""

    def __init__(self, cfg: AEConfig, data_info: SequenceInfo, input_dim: int):
        super().__init__()
        self.n_heads, self.hidden = cfg.n_heads, cfg.head_hidden
        self.vocab_size = data_info.diag_age_vocab_size
        if cfg.z_every_step:  # [u_t ⊕ z] at every step, so z need not survive in h alone
            input_dim += cfg.latent_dim
        # z has no head structure after the encoder's aggregation layer, so "head-to-head" is:
        # one projection of z, split into H chunks, chunk k initialising head k.
        self.init_state = nn.Linear(cfg.latent_dim, cfg.n_heads * cfg.head_hidden)
        self.heads = nn.ModuleList(
            nn.GRU(input_dim, cfg.head_hidden, batch_first=True) for _ in range(cfg.n_heads)
        )
        self.aggregate = nn.Linear(cfg.n_heads * cfg.head_hidden, cfg.out_hidden)
        head_options = {"copy_history": True} if cfg.copy_history else {}
        self.dx_out = WORD_HEADS[cfg.dx_output](cfg.out_hidden, data_info.diag_age_vocab_size, **head_options)
        # P(week | state, word): a hidden layer over [features ⊕ E_dx(word)], so that the week
        # window can depend jointly on the state (birth week, last week) and the word's age.
        self.wk_mix = (
            nn.Linear(cfg.out_hidden + cfg.dx_emb_dim, cfg.out_hidden) if cfg.week_on_dx else None
        )
        self.wk_out = nn.Linear(cfg.out_hidden, data_info.week_vocab_size)

    def initial_state(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.init_state(z))  # (B, H·d_h), in the GRUs' range (-1, 1)
        h = h.view(z.shape[0], self.n_heads, self.hidden).transpose(0, 1)  # (H, B, d_h)
        return h.unsqueeze(1).contiguous()  # (H, 1, B, d_h): state[k] is head k's h_0

    def features(self, head_outputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.relu(self.aggregate(torch.cat(head_outputs, dim=-1)))  # (..., out_hidden)

    def week_logits(self, features: torch.Tensor, word_emb: torch.Tensor) -> torch.Tensor:
        """(..., V_wk) week logits given the features and the embedding of the word (dx) the
        week belongs to (ignored when ``week_on_dx`` is off)."""
        if self.wk_mix is None:
            return self.wk_out(features)
        mixed = torch.relu(self.wk_mix(torch.cat([features, word_emb.to(features.dtype)], dim=-1)))
        return self.wk_out(mixed)

    def forward(self, steps: PackedSequence, state: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: features (N, out_hidden) of every valid step, in packed order.
        (A packed GRU permutes ``state`` into its sorted order itself.)"""
        outputs = [head(steps, state[k])[0].data for k, head in enumerate(self.heads)]
        return self.features(outputs)

    def step(self, inputs: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One free-running step: inputs (B, D), state (H, 1, B, d_h) -> features, new state."""
        outputs, new_state = [], []
        for k, head in enumerate(self.heads):
            out, h = head(inputs.unsqueeze(1), state[k])  # (B, 1, d_h), (1, B, d_h)
            outputs.append(out[:, 0])
            new_state.append(h)
        return self.features(outputs), torch.stack(new_state)


class SentenceAutoencoder(nn.Module):
    """The ``"autoencoder"`` part: embeddings, encoder, latent head and decoder.

    ``forward`` is the only method a training step calls (through DDP); the other methods are
    for inference on the unwrapped module.
    """

    def __init__(self, cfg: AEConfig, data_info: SequenceInfo, latent_head: nn.Module):
        super().__init__()
        self.embed = StepEmbedding(data_info, cfg.dx_emb_dim, cfg.wk_emb_dim)
        self.encoder = MultiHeadGRUEncoder(self.embed.dim, cfg.n_heads, cfg.head_hidden)
        self.latent_head = latent_head
        self.decoder = MultiHeadGRUDecoder(cfg, data_info, self.embed.dim)
        self.z_every_step, self.word_dropout = cfg.z_every_step, cfg.word_dropout
        self.copy_history = cfg.copy_history
        # Only built when used: runs saved without it load unchanged.
        self.bow = nn.Linear(cfg.latent_dim, N_CONDITIONS) if cfg.bow_weight > 0 else None
        self.bow_presence = cfg.bow_target == "presence"
        self.bag = ConditionBag(cfg.latent_dim) if cfg.encoder_bag else None

    def forward(self, batch: SequenceBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Summed NLL terms over the batch's predicted tokens and the latent z (B, latent_dim);
        with the bag-of-words head, also ``bow`` (:meth:`bow_nll` summed over the words).
        Sums, not means, so that callers can add them across batches and ranks."""
        z = self.encode(batch)
        nll_dx, nll_wk, _, n_valid = self.token_nll(batch, z)
        sums = {"nll_dx": nll_dx.sum(), "nll_wk": nll_wk.sum(), "tokens": n_valid}
        if self.bow is not None:
            sums["bow"] = self.bow_nll(batch, z).sum()
        return sums, z

    def bow_nll(self, batch: SequenceBatch, z: torch.Tensor) -> torch.Tensor:
        """Bag-of-words NLL (Zhao et al. 2017) per word (B, T), 0 off the words:
        ``-log softmax(W z + b)[c_t]`` for each word's condition c_t, order ignored.

        A softmax over the 605 conditions summed over the words, not a per-condition BCE of
        the multi-hot: its optimum is the sentence's condition frequencies ``n_c / L``; and
        summed per word it has the reconstruction's per-token scale, so ``bow_weight = 1``
        weighs a word's condition as much as its reconstruction. Conditions only, no age group
        or week: the conditions are what the copy mechanism lets z drop.

        ``bow_target = "presence"`` sums over the sentence's distinct conditions instead
        (B, 1): the optimum is ``1 / n_distinct`` on each, so a chronic condition recorded
        every week weighs what a one-off does. The counts' variance is mostly such recurrence;
        which conditions a patient has is what says where they sit on the simulator's latent
        factors (``bench/README.md``, bag-of-words)."""
        logp = torch.log_softmax(self.bow(z).float(), dim=-1)  # (B, C)
        if self.bow_presence:
            return -(condition_sets(batch.tgt_dx).float() * logp).sum(1, keepdim=True)  # (B, 1)
        cond = condition_ids(batch.tgt_dx, N_CONDITIONS)  # <EOS>, <PAD> -> the sink column
        return -F.pad(logp, (0, 1)).gather(1, cond) * (cond < N_CONDITIONS)

    def encode(self, batch: SequenceBatch) -> torch.Tensor:
        rows = _row_ids(batch)
        packed = pack_steps([batch.enc_dx, batch.enc_wk, rows], batch.lengths)
        dx, wk, row = packed.data.unbind(-1)  # each (N,)
        steps = with_data(packed, self.embed(dx, wk, batch.sex[row]))
        z = self.latent_head(self.encoder(steps))
        if self.bag is not None:
            z = z + self.bag(condition_sets(batch.enc_dx).float()).to(z.dtype)
        return z

    def decode_features(
        self, batch: SequenceBatch, z: torch.Tensor
    ) -> tuple[torch.Tensor, PackedSequence, WordHistory | None]:
        """Teacher-forced features (N, out_hidden), the packed (N, 3) columns
        [tgt_dx, tgt_wk, row] they predict, and (``copy_history``) each step's WordHistory."""
        rows = _row_ids(batch)
        steps = torch.arange(rows.shape[1], device=rows.device).expand_as(rows)
        columns = [batch.dec_dx, batch.dec_wk, batch.tgt_dx, batch.tgt_wk, rows, steps]
        packed = pack_steps(columns, batch.lengths)
        dx, wk, tgt_dx, tgt_wk, row, step = packed.data.unbind(-1)
        # The history is the sentence as written: word dropout below hides inputs, not it.
        history = WordHistory.teacher_forced(batch.dec_dx, row, step, dx) if self.copy_history else None
        if self.training and self.word_dropout > 0:
            # Word dropout (Bowman et al.): hide some previous words behind the mask token, so
            # that the decoder has to lean on z rather than on its own history.
            hidden = (torch.rand(dx.shape, device=dx.device) < self.word_dropout) & (dx != SOS)
            dx, wk = dx.masked_fill(hidden, PAD), wk.masked_fill(hidden, PAD)
        inputs = self.decoder_inputs(dx, wk, batch.sex[row], z[row])
        features = self.decoder(with_data(packed, inputs), self.decoder.initial_state(z))
        return features, with_data(packed, torch.stack([tgt_dx, tgt_wk, row], dim=-1)), history

    def decoder_inputs(self, dx: torch.Tensor, wk: torch.Tensor, sex: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """A decoder step's input: the step embedding, and z beside it when ``z_every_step``
        (``z`` row-aligned with ``dx``: per step under teacher forcing, per row when decoding)."""
        inputs = self.embed(dx, wk, sex)
        return torch.cat([inputs, z.to(inputs.dtype)], dim=-1) if self.z_every_step else inputs

    def token_nll(
        self, batch: SequenceBatch, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token NLL of the dx and the week (N,) each, their row ids (N,), and the number of
        non-<PAD> targets as a float 0-dim tensor (PAD targets contribute 0 and are not counted)."""
        features, targets, history = self.decode_features(batch, z)
        tgt_dx, tgt_wk, row = targets.data.unbind(-1)
        nll_dx = self.decoder.dx_out.nll(features, tgt_dx, history)
        nll_wk = F.cross_entropy(
            self.week_logits(features, tgt_dx), tgt_wk, ignore_index=PAD, reduction="none"
        )
        return nll_dx.float(), nll_wk.float(), row, (tgt_dx != PAD).sum().float()

    def week_logits(self, features: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
        """Week logits (..., V_wk) of the word ``dx`` (...,) predicted from ``features``."""
        return self.decoder.week_logits(features, self.embed.dx(dx))

    def teacher_forced_logits(
        self, batch: SequenceBatch, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, V_dx) and (B, T, V_wk); steps past ``lengths + 1`` hold zeros. The week
        logits are those of the true word at each step (teacher forcing)."""
        features, packed, history = self.decode_features(batch, z)
        tgt_dx = packed.data[:, 0]
        total = batch.dec_dx.shape[1]

        def unpack(logits: torch.Tensor) -> torch.Tensor:
            return pad_packed_sequence(
                with_data(packed, logits), batch_first=True, total_length=total
            )[0]

        return unpack(self.decoder.dx_out.logits(features, history)), unpack(self.week_logits(features, tgt_dx))

    def patient_nll(self, batch: SequenceBatch) -> torch.Tensor:
        """-log P(y | z, x) per patient (B,): dx plus week NLL summed over the patient's tokens."""
        nll_dx, nll_wk, row, _ = self.token_nll(batch, self.encode(batch))
        return torch.zeros(batch.size, device=nll_dx.device).index_add_(0, row, nll_dx + nll_wk)

    @torch.no_grad()
    def generate(
        self, z: torch.Tensor, sex: torch.Tensor, max_words: int, *, greedy: bool = True,
        temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched decoding from ``<SOS>``: each step picks a word, then its week given the word.

        ``greedy``: argmax (reconstruction); otherwise ancestral sampling at ``temperature``
        from the nucleus of mass ``top_p`` (generation), drawing from ``generator``.
        Both pick only among what :class:`DecodeConstraints` allows (real words or ``<EOS>``,
        no ``<EOS>`` first, ages and weeks non-decreasing, one consistent birth week). A row
        stops at its first ``<EOS>``; positions from there on hold ``<PAD>``. Returns dx
        (B, max_words), week (B, max_words) and the number of words per row (B,)."""
        b, device = z.shape[0], z.device
        out_dx = torch.full((b, max_words), PAD, dtype=torch.long, device=device)
        out_wk = torch.full_like(out_dx, PAD)
        n_words = torch.zeros(b, dtype=torch.long, device=device)
        alive = torch.ones(b, dtype=torch.bool, device=device)
        dx = torch.full((b,), SOS, dtype=torch.long, device=device)
        wk = torch.full_like(dx, SOS)
        rules = DecodeConstraints(b, self.decoder.vocab_size, self.decoder.wk_out.out_features, device)
        state = self.decoder.initial_state(z)
        history = WordHistory.empty(b, device) if self.copy_history else None

        def pick(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
            logits = logits.float().masked_fill(~allowed, float("-inf"))
            if greedy:
                return logits.argmax(-1)
            return sample_logits(logits, temperature, top_p, generator)

        for t in range(max_words):
            features, state = self.decoder.step(self.decoder_inputs(dx, wk, sex, z), state)
            dx = pick(self.decoder.dx_out.logits(features, history), rules.allowed_words(first=t == 0))
            wk = pick(self.week_logits(features, dx), rules.allowed_weeks(dx))
            alive &= dx != EOS
            if history is not None:
                history = history.after(dx, alive)
            rules.update(dx, wk, alive)
            out_dx[:, t] = torch.where(alive, dx, PAD)
            out_wk[:, t] = torch.where(alive, wk, PAD)
            wk = torch.where(alive, wk, torch.full_like(wk, EOS))  # the week input after <EOS>
            n_words += alive.long()
            if not bool(alive.any()):
                break
        return out_dx, out_wk, n_words


def sample_logits(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """One draw per row from softmax(logits / temperature), restricted to the smallest set of
    most likely ids whose mass reaches ``top_p`` (Holtzman et al. 2020, nucleus sampling).
    ``-inf`` logits are never drawn. (B, V) -> (B,)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the more likely ids
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # the most likely id always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class DecodeConstraints:
    """What a decoded word and week may be, given the words decoded so far in each row.

    The structure of every real sentence (the data contract, and the validity rules of
    ``metrics.tasks.generation_rule_failures``): ``<EOS>`` not before the first word, age group
    and week never decrease, and one integer birth week b consistent with every word (g, w):
    ``w - (g + 1) P < b <= w - g P`` (P: weeks per five-year age group), tracked as an
    interval [lo, hi] per row. An age group is allowed when some week >= the last week keeps
    the interval non-empty; a week when the interval stays non-empty with the chosen word's
    age group. Token ids: dx ``3 + condition * 24 + age_group``, week ``3 + week``.
    """

    def __init__(self, b: int, dx_vocab: int, wk_vocab: int, device: torch.device) -> None:
        self.dx_vocab, self.n_weeks = dx_vocab, wk_vocab - N_SPECIAL
        self.device = device
        self.last_age = torch.zeros(b, dtype=torch.long, device=device)
        self.last_week = torch.zeros(b, dtype=torch.float64, device=device)
        self.lo = torch.full((b,), -math.inf, dtype=torch.float64, device=device)
        self.hi = torch.full((b,), math.inf, dtype=torch.float64, device=device)
        self.token_age = (torch.arange(dx_vocab, device=device) - N_SPECIAL).clamp(min=0) % N_AGE_GROUPS
        self.weeks = torch.arange(self.n_weeks, dtype=torch.float64, device=device)  # (W,)

    def allowed_words(self, first: bool) -> torch.Tensor:
        """(B, V_dx) bool: real words of an allowed age group, and ``<EOS>`` after a word."""
        g = torch.arange(N_AGE_GROUPS, dtype=torch.float64, device=self.device)[None, :]  # (1, G)
        # Weeks w keeping [lo, hi] non-empty for age group g: ceil(lo + gP) <= w <= ceil(hi + (g+1)P) - 1.
        first_week = torch.maximum(torch.ceil(self.lo[:, None] + g * AGE_GROUP_WEEKS), self.last_week[:, None])
        last_week = torch.clamp(torch.ceil(self.hi[:, None] + (g + 1) * AGE_GROUP_WEEKS) - 1, max=self.n_weeks - 1)
        age_ok = (g >= self.last_age[:, None]) & (first_week <= last_week)  # (B, G)
        allowed = torch.zeros(age_ok.shape[0], self.dx_vocab, dtype=torch.bool, device=self.device)
        allowed[:, N_SPECIAL:] = age_ok[:, self.token_age[N_SPECIAL:]]
        allowed[:, EOS] = not first
        return allowed

    def _bounds(self, dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Birth-week bounds (B, W) implied by each candidate week for the word ``dx``, with
        the arithmetic of ``metrics.tasks.birth_week_bounds``."""
        g = self.token_age[dx].double()[:, None]
        w = self.weeks[None, :]
        lo = torch.floor(w - (g + 1) * AGE_GROUP_WEEKS) + 1
        hi = torch.floor(w - g * AGE_GROUP_WEEKS)
        return torch.maximum(lo, self.lo[:, None]), torch.minimum(hi, self.hi[:, None])

    def allowed_weeks(self, dx: torch.Tensor) -> torch.Tensor:
        """(B, V_wk) bool: real weeks >= the last week that keep a birth week for word ``dx``;
        after ``<EOS>`` (or if rounding left none) any real week >= the last one."""
        lo, hi = self._bounds(dx)
        later = self.weeks[None, :] >= self.last_week[:, None]
        ok = later & (lo <= hi)
        ok = torch.where(ok.any(1, keepdim=True) & (dx >= N_SPECIAL)[:, None], ok, later)
        allowed = torch.zeros(dx.shape[0], N_SPECIAL + self.n_weeks, dtype=torch.bool, device=self.device)
        allowed[:, N_SPECIAL:] = ok
        return allowed

    def update(self, dx: torch.Tensor, wk: torch.Tensor, words: torch.Tensor) -> None:
        """Take the decoded (dx, week) of the rows where ``words`` (a real word was emitted)."""
        lo, hi = self._bounds(dx)
        col = (wk - N_SPECIAL).clamp(0, self.n_weeks - 1)[:, None]
        lo, hi = lo.gather(1, col)[:, 0], hi.gather(1, col)[:, 0]
        self.lo = torch.where(words, lo, self.lo)
        self.hi = torch.where(words, hi, self.hi)
        self.last_age = torch.where(words, self.token_age[dx], self.last_age)
        self.last_week = torch.where(words, (wk - N_SPECIAL).double(), self.last_week)


def _row_ids(batch: SequenceBatch) -> torch.Tensor:
    b, t = batch.enc_dx.shape
    return torch.arange(b, device=batch.enc_dx.device).unsqueeze(1).expand(b, t)


def reconstruction_loss(sums: dict[str, torch.Tensor], w_time: float) -> torch.Tensor:
    """L_ae: per-token mean of CE(dx) + w_time * CE(week)."""
    tokens = sums["tokens"].clamp(min=1.0)
    return (sums["nll_dx"] + w_time * sums["nll_wk"]) / tokens


def bow_terms(sums: dict[str, torch.Tensor], bow_weight: float) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """The bag-of-words term to add to the loss (``bow_weight`` x its NLL per predicted
    token, the reconstruction's normaliser) and its step metric; (None, {}) when off."""
    if "bow" not in sums:
        return None, {}
    bow = sums["bow"] / sums["tokens"].clamp(min=1.0)
    return bow_weight * bow, {"bow": bow}


def scalars_to_floats(scalars: dict[str, torch.Tensor]) -> dict[str, float]:
    """0-dim tensors -> Python floats with a single device sync (for step metrics)."""
    values = torch.stack([v.detach().float() for v in scalars.values()]).tolist()
    return dict(zip(scalars, values, strict=True))


GEN_PRIORS = ("aggregate", "standard")
BOW_TARGETS = ("counts", "presence")  # AEConfig.bow_target: see SentenceAutoencoder.bow_nll


class LatentMoments(nn.Module):
    """Running mean and second moment of the encoder's z over training batches, an EMA like
    BatchNorm's running statistics, so generation can draw from a Gaussian fitted to the
    aggregate posterior. Each update all-reduces the batch sums first, so every DDP rank holds
    the same moments (and the checkpoint does not depend on which rank saved it)."""

    def __init__(self, dim: int, momentum: float):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("second", torch.eye(dim, dtype=torch.float64))
        self.register_buffer("seen", torch.zeros((), dtype=torch.float64))  # patients, all ranks

    @torch.no_grad()
    def update(self, z: torch.Tensor) -> None:
        z = z.detach().double()
        d = z.shape[1]
        sums = torch.cat([z.sum(0), (z.T @ z).flatten(), z.new_tensor([z.shape[0]])])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        n = sums[-1]
        weight = self.momentum if self.seen > 0 else 1.0  # the first batch sets the moments
        self.mean.lerp_(sums[:d] / n, weight)
        self.second.lerp_(sums[d:-1].view(d, d) / n, weight)
        self.seen += n

    def covariance(self) -> torch.Tensor:
        return self.second - torch.outer(self.mean, self.mean)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n draws from N(mean, covariance), float32 on the CPU (``generator``'s device)."""
        cov = self.covariance().cpu()
        cov = (cov + cov.T) / 2 + 1e-6 * torch.eye(cov.shape[0], dtype=cov.dtype)  # symmetric, PD
        noise = torch.randn(n, cov.shape[0], generator=generator, dtype=torch.float64)
        return (self.mean.cpu() + noise @ torch.linalg.cholesky(cov).T).float()


# ---------------------------------------------------------------------------------------------
# Model 0.


class ConditionalAutoencoder(nn.Module):
    """Model 0 (seed 000): conditional multi-head GRU autoencoder. One part, one optimizer."""

    def __init__(self, config: AEConfig, data_info: SequenceInfo, latent_head: nn.Module | None = None):
        super().__init__()
        if data_info.week_vocab_size <= N_SPECIAL:
            raise ValueError(
                f"SequenceInfo.week_vocab_size: expected > {N_SPECIAL} (specials plus >= 1 week), "
                f"received {data_info.week_vocab_size}"
            )
        self.config = config
        self.data_info = data_info
        if latent_head is None:
            latent_head = LinearLatentHead(config.n_heads, config.head_hidden, config.latent_dim)
        self.autoencoder = SentenceAutoencoder(config, data_info, latent_head)
        # Only the aggregate prior has state: runs saved before it (or with N(0, I)) load as they were.
        self.latent_moments = (
            LatentMoments(config.latent_dim, config.prior_momentum) if config.gen_prior == "aggregate" else None
        )

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def parts(self) -> dict[str, nn.Module]:
        return {"autoencoder": self.autoencoder}

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"autoencoder": _adamw(self.autoencoder, self.config)}

    def record_latent(self, z: torch.Tensor) -> None:
        """Fold a training batch's z into the aggregate-posterior fit (when generation uses it)."""
        if self.latent_moments is not None:
            self.latent_moments.update(z)

    def sample_latent(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n draws of z (CPU) from the generation prior, ``config.gen_prior``."""
        if self.latent_moments is None:
            return torch.randn(n, self.latent_dim, generator=generator)
        return self.latent_moments.sample(n, generator)

    def train_step(self, batch: SequenceBatch, ctx: StepContext) -> dict[str, float]:
        with ctx.autocast():
            sums, z = ctx.parts["autoencoder"](batch)
            loss = reconstruction_loss(sums, self.config.w_time)
            bow, bow_metric = bow_terms(sums, self.config.bow_weight)
            if bow is not None:
                loss = loss + bow
        ctx.step(loss, "autoencoder")  # the loop records each optimizer's gradient norm
        self.record_latent(z)
        tokens = sums["tokens"].clamp(min=1.0)
        metrics = scalars_to_floats(
            {
                "loss": loss,
                "nll_dx": sums["nll_dx"] / tokens,
                "nll_wk": sums["nll_wk"] / tokens,
            }
            | bow_metric
        )
        return metrics

    def eval_sums(self, batch: SequenceBatch) -> dict[str, torch.Tensor]:
        """Summed ``nll_dx``, ``nll_wk``, ``loss`` (= nll_dx + w_time * nll_wk) and ``tokens``."""
        sums, _ = self.autoencoder(batch)
        sums["loss"] = sums["nll_dx"] + self.config.w_time * sums["nll_wk"]
        return {k: v.detach().float() for k, v in sums.items()}

    def encode(self, batch: SequenceBatch) -> torch.Tensor:
        return self.autoencoder.encode(batch)

    def teacher_forced_logits(
        self, batch: SequenceBatch, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.autoencoder.teacher_forced_logits(batch, z)

    def generate(
        self, z: torch.Tensor, sex: torch.Tensor, max_words: int, *, greedy: bool = True,
        temperature: float | None = None, top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Greedy (reconstruction) or sampled (generation) decoding; the sampling knobs
        default to the config's ``gen_temperature`` and ``gen_top_p``."""
        return self.autoencoder.generate(
            z, sex, max_words, greedy=greedy,
            temperature=self.config.gen_temperature if temperature is None else temperature,
            top_p=self.config.gen_top_p if top_p is None else top_p, generator=generator,
        )

    def patient_nll(self, batch: SequenceBatch) -> torch.Tensor:
        return self.autoencoder.patient_nll(batch)

    def sample_rows(
        self, n: int, *, rng: torch.Generator, first_id: int, context: GenerationContext
    ) -> tuple[pa.Table, dict[str, int]]:
        return sample_sentence_rows(
            self, self.data_info.max_words, n, rng=rng, first_id=first_id,
            context=context, device=next(self.parameters()).device,
        )


def _adamw(module: nn.Module, cfg: AEConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        module.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, 0.999), weight_decay=cfg.weight_decay
    )


RECONSTRUCTION_METRICS = (
    "train/loss", "train/nll_dx", "train/nll_wk", "train/grad_norm/autoencoder",
    "val/loss", "val/nll_dx", "val/nll_wk",
)  # fmt: skip
MODEL = ModelSpec(
    name="ae",
    config_cls=AEConfig,
    build=ConditionalAutoencoder,
    view=SequenceView,
    capabilities=("encoder", "sequence_decoder", "generator"),
    default_sweep="search_spaces/ae_vs_wae.yaml",
    metric_names=RECONSTRUCTION_METRICS,
    description="seed 000 Model 0: conditional multi-head GRU autoencoder",
)
