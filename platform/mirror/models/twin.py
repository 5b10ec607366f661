"""TWIN (seed 001, Das, Wang and Sun 2023): personalised clinical-trial digital twins.

Per visit x = [treatment x1 | medication x2 | AE x3] (multi-hots, l1 + l2 + l3) and its K
retrieved neighbours X_K (the ``visits`` view: other participants' visits only). Two
sub-models, u in {medication, AE}, each::

    attention   w = softmax([x·x, x·X_K1, ..., x·X_KK] / tau)     (B, K + 1), shared by both
    embedding   H_u = [x_u; X_K,u] W_emb + b                        (B, K + 1, hidden)
    fusion      h_u = sum_j w_j H_u,j ; ReLU
    encoder     mu, log sigma^2 = Linear(h_u), Linear(h_u)          (B, latent)
    decoder     x_u^ = sigmoid(Linear(ReLU(Linear(z))))             z = mu + sigma * eps
    CPM         x_u'^(t+1) from [z ⊕ x1]: 4 Linear + ReLU with a BatchNorm, then Linear

    L = beta * (BCE(x_u^, x_u) + KL) + gamma * BCE(x_u'^(t+1), x_u'(t+1)) [t has a next visit]
    (``kl_weight`` scales the KL inside beta's term; 1, the paper's loss, by default)

summed over both sub-models, the visit's columns and the batch, and divided by the batch's
visits (the paper sums; a per-visit mean keeps one learning rate right for any batch size).
The reconstruction and KL cover every visit, the next-visit term only visits with a next one
(models.md §3 pitfalls). tau = 1 is the paper's unscaled softmax; neighbours the view could
not fill are masked out of it. The CPM's BatchNorm uses batch statistics all-reduced over
the DDP ranks (:class:`AllReduceBatchNorm`: SyncBatchNorm needs CUDA, this works on gloo
too), and the view drops a last short training batch.

Generation (:func:`generate_twins`): each participant's visits and neighbours are encoded,
z is sampled, decoded and thresholded at ``threshold`` (PyTrial rounds at 0.5) or, with
``generation="sample"``, each event drawn from its probability; the
treatment schedule, visit days, arm, baseline and outcome are the participant's own.
Counterfactual twins (:func:`counterfactual_twins`, the paper's method): for participant n,
the most similar participant k of the other arm (dot product of their mean visit multi-hots,
treatment columns left out) is regenerated; the twin keeps n's id, baseline and enrolment,
and takes k's visits, schedule and arm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from mirror.config import require
from mirror.data import schema
from mirror.data.views.visits import VisitBatch, VisitsInfo, VisitsView, multi_hot
from mirror.models.ae import scalars_to_floats
from mirror.models.base import GenerationContext, ModelSpec, StepContext

GENERATION_MODES = ("threshold", "sample")
COUNTERFACTUAL_MODES = ("surrogate", "own")


@dataclass(frozen=True)
class TwinConfig:
    """TWIN hyperparameters (upstream PyTrial sizes; beta, gamma, tau: models.md §3)."""

    # How a trained run draws, changeable at sampling time (jobs/sample.py --set).
    SAMPLE_TIME: ClassVar[tuple[str, ...]] = ("threshold", "generation", "counterfactual")

    hidden_dim: int = 36  # W_emb and decoder width
    latent_dim: int = 32
    cpm_hidden: int = 42  # the CPM's first layer (then hidden_dim)
    beta: float = 1.0  # weight of reconstruction + KL
    # Weight of the KL inside beta's term (1: the paper's loss). Below 1 the posterior may carry
    # more of a visit's specifics: at 1, rare events (severe AEs) decode at their marginal rate.
    kl_weight: float = 1.0
    gamma: float = 1.0  # weight of the causality-preserving next-visit prediction
    temperature: float = 1.0  # attention softmax temperature (1: the paper's unscaled dot products)
    threshold: float = 0.5  # generation "threshold": an event is present where its probability >= this
    # How generated events are drawn from the decoder's probabilities: "sample" (Bernoulli;
    # the default: on PyTrial after 1 epoch DP r 0.96/0.97 and TSTR/TRTR 1.00) or "threshold"
    # (PyTrial rounds at 0.5: a rare event, never above 0.5, is never emitted; 0.80/0.82, 0.73).
    generation: str = "sample"
    # Counterfactual twins: "surrogate" (the paper: regenerate the nearest other-arm
    # participant's visits) or "own" (the participant's own visits through the CPM under the
    # surrogate's treatments: ``counterfactual_twins_cpm``).
    counterfactual: str = "surrogate"
    lr: float = 1e-3  # Adam (upstream)

    def __post_init__(self) -> None:
        for name in ("hidden_dim", "latent_dim", "cpm_hidden"):
            require(self, name, getattr(self, name) >= 1, "an int >= 1")
        require(self, "beta", self.beta >= 0, "a float >= 0")
        require(self, "gamma", self.gamma >= 0, "a float >= 0")
        require(self, "kl_weight", self.kl_weight >= 0, "a float >= 0")
        require(self, "temperature", self.temperature > 0, "a float > 0")
        require(self, "threshold", 0 < self.threshold < 1, "a float in (0, 1)")
        require(self, "lr", self.lr > 0, "a float > 0")
        require(self, "generation", self.generation in GENERATION_MODES, f"one of {GENERATION_MODES}")
        require(self, "counterfactual", self.counterfactual in COUNTERFACTUAL_MODES, f"one of {COUNTERFACTUAL_MODES}")


class AllReduceBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are the whole global batch's under DDP (sums
    all-reduced, differentiably), on any backend; plain BatchNorm1d otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        stats = torch.cat([x.sum(0), (x * x).sum(0), x.new_full((1,), x.shape[0])])
        stats = all_reduce(stats)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp(min=0)
        with torch.no_grad():
            m = self.momentum if self.momentum is not None else 0.1
            self.running_mean.mul_(1 - m).add_(m * mean)
            self.running_var.mul_(1 - m).add_(m * var * n / (n - 1).clamp(min=1))
            self.num_batches_tracked.add_(1)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


def attention_weights(x: torch.Tensor, neighbours: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax([x·x, x·n_1, ..., x·n_K] / tau) over self and the valid neighbours: (B, K + 1)."""
    scores = torch.cat([(x * x).sum(-1, keepdim=True), torch.einsum("bl,bkl->bk", x, neighbours)], dim=1)
    valid = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
    return torch.softmax((scores / temperature).masked_fill(~valid, float("-inf")), dim=1)


class EventVAE(nn.Module):
    """One event type's sub-model: retrieval-augmented encoder, VAE decoder and its CPM."""

    def __init__(self, width: int, other_width: int, n_treatments: int, cfg: TwinConfig) -> None:
        super().__init__()
        self.embed = nn.Linear(width, cfg.hidden_dim)  # W_emb
        self.mu = nn.Linear(cfg.hidden_dim, cfg.latent_dim)
        self.log_var = nn.Linear(cfg.hidden_dim, cfg.latent_dim)
        self.decoder = nn.Sequential(nn.Linear(cfg.latent_dim, cfg.hidden_dim), nn.ReLU(), nn.Linear(cfg.hidden_dim, width))
        self.cpm = nn.Sequential(
            nn.Linear(cfg.latent_dim + n_treatments, cfg.cpm_hidden), nn.ReLU(),
            nn.Linear(cfg.cpm_hidden, cfg.hidden_dim), nn.ReLU(), AllReduceBatchNorm(cfg.hidden_dim),
            nn.Linear(cfg.hidden_dim, cfg.hidden_dim), nn.ReLU(),
            nn.Linear(cfg.hidden_dim, other_width), nn.ReLU(),
            nn.Linear(other_width, other_width),
        )
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def encode(self, x: torch.Tensor, neighbours: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(torch.cat([x[:, None, :], neighbours], dim=1))  # (B, K + 1, hidden)
        fused = torch.relu((weights[..., None] * h).sum(1))
        return self.mu(fused), self.log_var(fused)

    def forward(self, x: torch.Tensor, neighbours: torch.Tensor, weights: torch.Tensor, treatment: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
        mu, log_var = self.encode(x, neighbours, weights)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + torch.exp(0.5 * log_var) * eps
        return self.decoder(z), self.cpm(torch.cat([z, treatment], dim=1)), mu, log_var


class TwinNet(nn.Module):
    """The two sub-models; returns the loss sums of a batch."""

    def __init__(self, cfg: TwinConfig, info: VisitsInfo) -> None:
        super().__init__()
        self.cfg = cfg
        l1, l2, l3 = info.widths
        self.slices = (slice(l1, l1 + l2), slice(l1 + l2, l1 + l2 + l3))
        self.medication = EventVAE(l2, l3, l1, cfg)  # CPM: next visit's AEs
        self.adverse_event = EventVAE(l3, l2, l1, cfg)  # CPM: next visit's medications

    def outputs(self, batch: VisitBatch, generator: torch.Generator | None = None) -> dict[str, tuple[torch.Tensor, ...]]:
        w = attention_weights(batch.visit_vector, batch.neighbours, batch.neighbour_mask, self.cfg.temperature)
        med_n, ae_n = (batch.neighbours[..., s] for s in self.slices)
        return {
            "med": self.medication(batch.medication, med_n, w, batch.treatment, generator),
            "ae": self.adverse_event(batch.adverse_event, ae_n, w, batch.treatment, generator),
        }

    def forward(self, batch: VisitBatch) -> dict[str, torch.Tensor]:
        out = self.outputs(batch)
        has_next = batch.has_next.float()[:, None]

        def bce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
            return F.binary_cross_entropy_with_logits(logits.float(), target, weight=weight, reduction="sum")

        def kl(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
            return -0.5 * (1 + log_var - mu.pow(2) - log_var.exp()).float().sum()

        rec_med, next_ae, mu_m, lv_m = out["med"]
        rec_ae, next_med, mu_a, lv_a = out["ae"]
        sums = {
            "rec_med": bce(rec_med, batch.medication),
            "rec_ae": bce(rec_ae, batch.adverse_event),
            "kl": kl(mu_m, lv_m) + kl(mu_a, lv_a),
            "next_ae": bce(next_ae, batch.next_adverse_event, has_next.expand_as(next_ae)),
            "next_med": bce(next_med, batch.next_medication, has_next.expand_as(next_med)),
        }
        sums["loss"] = (self.cfg.beta * (sums["rec_med"] + sums["rec_ae"] + self.cfg.kl_weight * sums["kl"])
                        + self.cfg.gamma * (sums["next_ae"] + sums["next_med"]))
        return sums


class Twin(nn.Module):
    """TWIN: one part (both sub-models), one Adam optimizer."""

    def __init__(self, config: TwinConfig, data_info: VisitsInfo) -> None:
        super().__init__()
        self.config, self.data_info = config, data_info
        self.twin = TwinNet(config, data_info)

    def parts(self) -> dict[str, nn.Module]:
        return {"twin": self.twin}

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"twin": torch.optim.Adam(self.twin.parameters(), lr=self.config.lr)}

    def train_step(self, batch: VisitBatch, ctx: StepContext) -> dict[str, float]:
        with ctx.autocast():
            sums = ctx.parts["twin"](batch)
        visits = max(1, batch.size)
        ctx.step(sums["loss"] / visits, "twin")
        return scalars_to_floats({k: v.detach() / visits for k, v in sums.items()})

    def eval_sums(self, batch: VisitBatch) -> dict[str, torch.Tensor]:
        sums = {k: v.detach().float() for k, v in self.twin(batch).items()}
        sums["visits"] = torch.tensor(float(batch.size), device=batch.treatment.device)
        return sums

    @torch.no_grad()
    def reconstruct(self, batch: VisitBatch, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Synthetic medication and AE multi-hots (bool) of each visit: z sampled, decoded,
        thresholded or sampled (``config.generation``)."""
        out = self.twin.outputs(batch, generator)
        probabilities = (torch.sigmoid(out["med"][0]), torch.sigmoid(out["ae"][0]))
        if self.config.generation == "sample":
            return tuple(torch.bernoulli(p, generator=generator).bool() for p in probabilities)
        return tuple(p >= self.config.threshold for p in probabilities)

    # The generator capabilities: twins of the caller's real participants (one block per call).
    def sample_rows(self, n: int, *, rng: torch.Generator, first_id: int,
                    context: GenerationContext) -> tuple[pa.Table, dict[str, int]]:
        """The twins of ``context.real_rows`` (``n`` participants) with ids from ``first_id``.
        A twin keeps its participant's schedule, so every draw is valid: nothing is rejected."""
        real, view = _twinned(n, context)
        return _renumber(generate_twins(self, view, real, seed=_seed(rng)), first_id), {}

    def counterfactual_rows(self, n: int, *, rng: torch.Generator, first_id: int,
                            context: GenerationContext) -> tuple[pa.Table, dict[str, int]]:
        """The same participants under the other arm (``config.counterfactual``: the paper's
        :func:`counterfactual_twins` or :func:`counterfactual_twins_cpm`; surrogates searched
        within the block), ids matching ``sample_rows``'s."""
        real, view = _twinned(n, context)
        make = counterfactual_twins_cpm if self.config.counterfactual == "own" else counterfactual_twins
        cf, _ = make(self, view, real, seed=_seed(rng))
        return _renumber(cf, first_id), {}


def _twinned(n: int, context: GenerationContext) -> tuple[pa.Table, VisitsView]:
    """The real participants a twin call is for, checked."""
    if context.real_rows is None or context.view is None:
        raise ValueError("twin generation needs the real participants it twins (GenerationContext.real_rows "
                         "and .view): sample it with jobs/sample.py, which streams them from the training split")
    if context.real_rows.num_rows != n:
        raise ValueError(f"twin generation: asked for {n} twins of {context.real_rows.num_rows} real participants")
    return context.real_rows, context.view


def _seed(rng: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=rng))


def _renumber(table: pa.Table, first_id: int) -> pa.Table:
    """Synthetic ids (``first_id`` upwards): a twin never carries its participant's id."""
    ids = pa.array(np.arange(first_id, first_id + table.num_rows, dtype=np.int64))
    return table.set_column(table.schema.get_field_index(schema.SUBJECT_ID), schema.TRIAL_SCHEMA.field(schema.SUBJECT_ID), ids)


# ---------------------------------------------------------------------------------------------
# Generation in the trial layout


def _lists(hot: np.ndarray, visit_offsets: np.ndarray) -> pa.ListArray:
    """(V, width) bool -> list<list<int16>> per participant (``visit_offsets`` (n + 1))."""
    rows, cols = np.nonzero(hot)
    inner_offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(hot)))]).astype(np.int32)
    inner = pa.ListArray.from_arrays(pa.array(inner_offsets), pa.array(cols.astype(np.int16)))
    return pa.ListArray.from_arrays(pa.array(visit_offsets.astype(np.int32)), inner)


def generate_twins(model: Twin, view: VisitsView, table: pa.Table, *, seed: int = 0, batch_visits: int = 4096) -> pa.Table:
    """A digital twin of each participant row (``TRIAL_SCHEMA``), same ids and order: the
    participant's schedule, treatments, days, arm, baseline and outcome; generated
    medications and AEs. Participants are processed in blocks of about ``batch_visits``."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    parts = []
    n_visits = np.diff(table.column(schema.VISIT_DAYS).combine_chunks().offsets.to_numpy())
    block_of = np.concatenate([[0], np.cumsum(n_visits)[:-1]]) // batch_visits
    edges = (np.flatnonzero(np.diff(block_of)) + 1).tolist()
    for lo, hi in zip([0, *edges], [*edges, table.num_rows], strict=True):
        block = table.slice(lo, hi - lo)
        batch, _ = view.inference_batch(block)
        med, ae = model.reconstruct(batch.to(device), generator)
        offsets = np.concatenate([[0], np.cumsum(n_visits[lo:hi])])
        columns = {name: block.column(name) for name in schema.TRIAL_SCHEMA.names}
        columns[schema.VISIT_MEDICATIONS] = _lists(med.cpu().numpy(), offsets)
        columns[schema.VISIT_ADVERSE_EVENTS] = _lists(ae.cpu().numpy(), offsets)
        parts.append(pa.table(columns, schema=schema.TRIAL_SCHEMA))
    return pa.concat_tables(parts) if parts else schema.TRIAL_SCHEMA.empty_table()


def participant_profiles(table: pa.Table, info: VisitsInfo) -> np.ndarray:
    """Mean medication + AE multi-hot over each participant's visits (n, l2 + l3)."""
    n_visits = np.diff(table.column(schema.VISIT_DAYS).combine_chunks().offsets.to_numpy())
    owner = np.repeat(np.arange(table.num_rows), n_visits)
    hot = np.concatenate([multi_hot(table.column(schema.VISIT_MEDICATIONS).combine_chunks().flatten(), info.n_medications),
                          multi_hot(table.column(schema.VISIT_ADVERSE_EVENTS).combine_chunks().flatten(), info.n_adverse_events)], 1)
    sums = np.zeros((table.num_rows, hot.shape[1]), np.float32)
    np.add.at(sums, owner, hot)
    return sums / np.maximum(n_visits, 1)[:, None]


def surrogate_neighbours(table: pa.Table, info: VisitsInfo) -> np.ndarray:
    """For each participant, the row of the most similar participant of the other arm (the
    paper's surrogate): dot product of mean medication + AE profiles."""
    profiles = participant_profiles(table, info)
    arm = table.column(schema.ARM).to_numpy()
    scores = profiles @ profiles.T
    scores[arm[:, None] == arm[None, :]] = -np.inf
    return np.argmax(scores, axis=1)


def counterfactual_twins(model: Twin, view: VisitsView, table: pa.Table, *, seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    """Each participant under the other arm (the paper's method): the twin of its surrogate
    (``surrogate_neighbours``) with the participant's id, baseline and enrolment day, visit
    days shifted to that enrolment. Returns the table and the surrogate rows."""
    surrogate = surrogate_neighbours(table, view.info())
    donor = generate_twins(model, view, table.take(pa.array(surrogate)), seed=seed)
    shift = table.column(schema.ENROLL_DAY).to_numpy().astype(np.int64) - donor.column(schema.ENROLL_DAY).to_numpy()
    days = donor.column(schema.VISIT_DAYS).combine_chunks()
    n_visits = np.diff(days.offsets.to_numpy())
    flat = days.flatten().to_numpy().astype(np.int64) + np.repeat(shift, n_visits)
    columns = {name: donor.column(name) for name in schema.TRIAL_SCHEMA.names}
    columns[schema.SUBJECT_ID] = table.column(schema.SUBJECT_ID)
    columns[schema.BASELINE] = table.column(schema.BASELINE)
    columns[schema.ENROLL_DAY] = table.column(schema.ENROLL_DAY)
    columns[schema.END_DAY] = pa.array((donor.column(schema.END_DAY).to_numpy() + shift).astype(np.int32))
    columns[schema.VISIT_DAYS] = pa.ListArray.from_arrays(pa.array(days.offsets.to_numpy()), pa.array(flat.astype(np.int32)))
    return pa.table(columns, schema=schema.TRIAL_SCHEMA), surrogate


@torch.no_grad()
def counterfactual_twins_cpm(model: Twin, view: VisitsView, table: pa.Table, *, seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    """Each participant under the other arm, from its *own* visits (an alternative to the
    paper's method, which regenerates the surrogate's visits and so can at best copy the
    surrogate): the schedule (visit count, days, treatments, arm) is the surrogate's, as in
    :func:`counterfactual_twins`; the events of visit j >= 1 are the causality-preserving
    module's prediction from z of the participant's own visit min(j - 1, T - 1) and the
    surrogate's treatment at visit j - 1 (the treatment enters where the model learned its
    effect); visit 0 (before any treatment) is the decoder's reconstruction of the
    participant's own first visit. Returns the table and the surrogate rows."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    info = view.info()
    frame, surrogate = counterfactual_twins(model, view, table, seed=seed)  # schedule and ids
    batch, _ = view.inference_batch(table)
    net = model.twin
    w = attention_weights(batch.visit_vector, batch.neighbours, batch.neighbour_mask, net.cfg.temperature)
    med_n, ae_n = (batch.neighbours[..., sl] for sl in net.slices)
    z = {}
    for name, vae, x, nb in (("med", net.medication, batch.medication, med_n), ("ae", net.adverse_event, batch.adverse_event, ae_n)):
        mu, log_var = vae.encode(x, nb, w)
        z[name] = mu + torch.exp(0.5 * log_var) * torch.randn(mu.shape, generator=g)
    own_n = np.diff(table.column(schema.VISIT_DAYS).combine_chunks().offsets.to_numpy())
    own_start = np.concatenate([[0], np.cumsum(own_n)[:-1]])
    cf_n = np.diff(frame.column(schema.VISIT_DAYS).combine_chunks().offsets.to_numpy())
    owner = np.repeat(np.arange(table.num_rows), cf_n)
    j = np.arange(cf_n.sum()) - np.repeat(np.concatenate([[0], np.cumsum(cf_n)[:-1]]), cf_n)
    src = torch.from_numpy(own_start[owner] + np.minimum(np.maximum(j - 1, 0), own_n[owner] - 1))
    tx = torch.from_numpy(multi_hot(frame.column(schema.VISIT_TREATMENTS).combine_chunks().flatten(), info.n_treatments))
    prev_tx = torch.cat([tx[:1], tx[:-1]])  # visit j - 1's treatment (j = 0 rows are replaced below)
    first = torch.from_numpy(j == 0)[:, None]
    med_p = torch.where(first, torch.sigmoid(net.medication.decoder(z["med"][src])),
                        torch.sigmoid(net.adverse_event.cpm(torch.cat([z["ae"][src], prev_tx], 1))))
    ae_p = torch.where(first, torch.sigmoid(net.adverse_event.decoder(z["ae"][src])),
                       torch.sigmoid(net.medication.cpm(torch.cat([z["med"][src], prev_tx], 1))))
    if model.config.generation == "sample":
        med, ae = (torch.bernoulli(p, generator=g).bool() for p in (med_p, ae_p))
    else:
        med, ae = med_p >= model.config.threshold, ae_p >= model.config.threshold
    offsets = np.concatenate([[0], np.cumsum(cf_n)])
    frame = frame.set_column(frame.schema.get_field_index(schema.VISIT_MEDICATIONS), schema.TRIAL_SCHEMA.field(schema.VISIT_MEDICATIONS), _lists(med.numpy(), offsets))
    frame = frame.set_column(frame.schema.get_field_index(schema.VISIT_ADVERSE_EVENTS), schema.TRIAL_SCHEMA.field(schema.VISIT_ADVERSE_EVENTS), _lists(ae.numpy(), offsets))
    return frame, surrogate


TWIN_METRICS = tuple(f"{side}/{name}" for side in ("train", "val") for name in ("loss", "rec_med", "rec_ae", "kl", "next_ae", "next_med")) + ("train/grad_norm/twin",)
MODEL = ModelSpec(
    name="twin",
    config_cls=TwinConfig,
    build=Twin,
    view=VisitsView,
    capabilities=("generator", "counterfactual_generator"),
    default_sweep="search_spaces/twin_ablation.yaml",
    metric_names=TWIN_METRICS,
    description="seed 001 TWIN: retrieval-augmented VAE + causality-preserving module for trial digital twins",
)
