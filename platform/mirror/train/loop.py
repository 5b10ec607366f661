"""The per-worker training function: plain epoch math, Ray only at the edges.

Layer 1 of three (Ray's train/tune interop pattern): ``train_fn_per_worker`` runs on every
DDP worker. It takes its shard, builds the model from its spec, wraps each model part in
DDP, restores the last checkpoint if there is one, then per epoch runs ``train_epoch`` and
``validate`` (plain functions), reduces metrics across workers, and reports once per epoch
with a checkpoint. Only rank 0 logs to MLflow (every ``train.log_every_steps`` steps and per
epoch) and sends the driver its one-line epoch summary.

Nothing here knows the shape of the data: the model's data view (built on the driver and
handed over in the loop config) turns shards into batches, says what throughput counts and
what validation sums are divided by. Batches are opaque to the loop.

Every optimizer's LR schedule is sized in training steps and advances once per training step
(``LocalStepContext.end_step``), however many optimizer steps a model takes per training step
(a WAE's critic takes 5-100), so a schedule's position always equals the global step.

Restoring takes weights, optimizer moments and the schedule's position from the checkpoint,
but the optimizer settings (learning rates, betas, weight decay) from this run's config, so a
run resumed under a changed config, as PBT does, trains with the new values.

Step parity under DDP: ``streaming_split`` can give ranks different batch counts, and a rank
that stops early leaves the others hanging in all-reduce. So every rank trains a fixed
``steps_per_epoch`` (computed once on the driver from the kept-patient count) and then drains
whatever is left of its shard without training on it; the drained count is logged.
"""

from __future__ import annotations

import logging
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from mirror import tracking
from mirror.checkpoint import load_frozen, load_state, write_checkpoint
from mirror.models import build_model
from mirror.models.base import ModelSpec, TrainableModel
from mirror.models.local_step import LocalStepContext
from mirror.train.schedule import make_schedulers
from mirror.train.spec import RunSpec, TrainConfig

logger = logging.getLogger(__name__)
COUNTERS = ("steps", "drained", "examples", "units", "seconds")  # train_epoch's own sums


def all_reduce_sums(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum named scalars across ranks (a no-op without a process group)."""
    if not values:
        return {}
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return dict(zip(keys, tensor.tolist(), strict=True))


def parameter_divergence(model: nn.Module, device: torch.device) -> float:
    """Largest |difference| of any parameter between ranks: 0.0 when DDP kept them in sync."""
    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()]).to(device)
    if not (dist.is_available() and dist.is_initialized()):
        return 0.0
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return float((high - low).abs().max())


class StepLogger:
    """Training metrics every ``every`` steps: means since the last log, all-reduced (every
    rank reaches the same steps, so the collective cannot hang), logged by rank 0 under
    ``train_step/<name>`` at the global step, so MLflow draws a curve within each epoch."""

    def __init__(self, every: int, rank: int, device: torch.device, run_id: str, uri: str) -> None:
        self.every, self.rank, self.device, self.run_id, self.uri = every, rank, device, run_id, uri
        self.sums: dict[str, float] = {}
        self.steps = 0

    def add(self, metrics: dict[str, float], global_step: int) -> None:
        if self.every <= 0:
            return
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1
        if global_step % self.every == 0:
            reduced = all_reduce_sums({**self.sums, "__steps": float(self.steps)}, self.device)
            steps = max(1.0, reduced.pop("__steps"))
            if self.rank == 0:
                means = {f"train_step/{k}": v / steps for k, v in reduced.items()}
                tracking.log_metrics(self.run_id, means, step=global_step, uri=self.uri)
            self.sums, self.steps = {}, 0


def train_epoch(
    model: TrainableModel, ctx: LocalStepContext, batches, steps: int, *, units=None,
    step_logger: StepLogger | None = None,
) -> dict[str, float]:
    """``steps`` optimisation steps; returns sums of step metrics plus counts. ``units``
    counts what throughput is measured in (the view's unit; default: examples)."""
    for part in model.parts().values():
        part.train()
    sums: dict[str, float] = {}
    done = drained = examples = n_units = 0
    start = time.perf_counter()
    seconds = 0.0
    for batch in batches:
        if done >= steps:
            drained += batch.size  # keep the stream moving for the other ranks
            continue
        batch = batch.to(ctx.device)
        metrics = ctx.train_step(batch)  # model.train_step, then every schedule and global_step
        metrics.update({f"grad_norm/{key}": value for key, value in ctx.grad_norms.items()})
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(value)
        examples += batch.size
        n_units += units(batch) if units else batch.size
        done += 1
        if step_logger is not None:
            step_logger.add(metrics, ctx.global_step)
        seconds = time.perf_counter() - start  # data wait included, draining excluded
    return {
        **sums,
        "steps": float(done),
        "drained": float(drained),
        "examples": float(examples),
        "units": float(n_units),
        "seconds": seconds,
    }


@torch.no_grad()
def validate(model: TrainableModel, batches, device: torch.device, max_batches: int = 0) -> dict[str, float]:
    for part in model.parts().values():
        part.eval()
    sums: dict[str, float] = {}
    patients = 0
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break  # every rank stops at the same count, so no rank waits on another's split
        batch = batch.to(device)
        for key, value in model.eval_sums(batch).items():
            sums[key] = sums.get(key, 0.0) + float(value)
        patients += batch.size
    return {**sums, "patients": float(patients)}


def load_checkpoint_state(checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    with checkpoint.as_directory() as directory:
        return load_state(directory)


def hyperparameters(optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, list[dict[str, Any]]]:
    """Each optimizer's param-group settings (lr, betas, weight decay, ...), without the params."""
    return {
        name: [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
        for name, opt in optimizers.items()
    }


def reapply_hyperparameters(
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR],
    settings: dict[str, list[dict[str, Any]]],
    global_step: int | None = None,
) -> None:
    """After loading a checkpoint, put this run's optimizer settings back over the saved ones.

    ``load_state_dict`` restores the learning rates, betas and weight decay the checkpoint was
    trained with, and the schedule's base rates with them. That is right for a plain resume
    (the settings are the same) and wrong when the config changed in between: a PBT trial that
    took over another trial's checkpoint with a perturbed ``lr`` would silently keep the old
    one. Moments and step counts stay as loaded; the schedule keeps its position and is
    re-evaluated on the new base rates. ``global_step`` (the checkpoint's) pins every
    schedule's position to it: schedules advance once per training step, and checkpoints
    written before that rule advanced the critic's schedule once per critic step.
    """
    for name, opt in optimizers.items():
        for group, fresh in zip(opt.param_groups, settings[name], strict=True):
            group.update(fresh)
        schedule = schedulers.get(name)
        if schedule is None:
            continue
        if global_step is not None:
            schedule.last_epoch = global_step
        schedule.base_lrs = [group["initial_lr"] for group in opt.param_groups]
        for group, base, factor in zip(opt.param_groups, schedule.base_lrs, schedule.lr_lambdas, strict=True):
            group["lr"] = base * factor(schedule.last_epoch)
        schedule._last_lr = [group["lr"] for group in opt.param_groups]  # what get_last_lr() reads


def _wrap(part: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    part.to(device)
    if world_size <= 1:
        return part
    return nn.parallel.DistributedDataParallel(
        part, device_ids=[device.index] if device.type == "cuda" else None
    )


def train_fn_per_worker(config: dict[str, Any]) -> None:
    model_spec: ModelSpec = config["model_spec"]
    view = config["view"]
    spec = RunSpec.from_dict(config["spec"], model_spec)
    train: TrainConfig = spec.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(train.cpus_per_worker)))

    info = config["data_info"]
    upstream = None
    if config.get("upstream"):
        upstream_spec, upstream_path = config["upstream"]
        upstream = load_frozen(upstream_path, upstream_spec).to(device)
    torch.manual_seed(train.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
    model = build_model(model_spec, spec.model_config, info, upstream=upstream)
    model.to(device)
    optimizers = model.make_optimizers()
    steps_per_epoch = int(config["steps_per_epoch"])
    total_steps = max(1, steps_per_epoch * train.epochs)
    schedulers = make_schedulers(optimizers, total_steps, train.warmup_fraction, train.min_lr_ratio)

    start_epoch, global_step = 0, 0
    checkpoint = ray.train.get_checkpoint() or config.get("initial_checkpoint")  # own, else seed
    if checkpoint is not None:
        settings = hyperparameters(optimizers)
        state = load_checkpoint_state(checkpoint)
        model.load_state_dict(state["model"])
        for k, o in optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        for k, s in schedulers.items():
            s.load_state_dict(state["schedulers"][k])
        start_epoch, global_step = state["epoch"] + 1, state["global_step"]
        reapply_hyperparameters(optimizers, schedulers, settings, global_step)
    stop_epoch = min(train.epochs, config.get("until_epoch") or train.epochs)

    parts = {name: _wrap(part, device, world) for name, part in model.parts().items()}
    ctx = LocalStepContext(
        model, optimizers, train.grad_clip, schedulers, device, parts=parts, global_step=global_step
    )
    train_shard = ray.train.get_dataset_shard("train")
    tuning_shard = ray.train.get_dataset_shard("tuning")
    run_id, uri = config["run_id"], config["tracking_uri"]
    step_logger = StepLogger(train.log_every_steps, rank, device, run_id, uri)
    progress = config.get("progress")
    started = time.monotonic()

    for epoch in range(start_epoch, stop_epoch):
        batches = view.batches(train_shard, train.batch_size, training=True, epoch=epoch, seed=train.seed)
        sums = train_epoch(model, ctx, batches, steps_per_epoch, units=view.units, step_logger=step_logger)
        sums = all_reduce_sums(sums, device)
        val_batches = view.batches(tuning_shard, train.eval_batch_size, training=False)
        val = all_reduce_sums(validate(model, val_batches, device, train.val_max_batches), device)
        metrics = epoch_metrics(sums, val, world, ctx, epoch, normaliser=view.normaliser, unit=view.unit)
        metrics["ddp/param_divergence"] = parameter_divergence(model, device)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                write_checkpoint(
                    Path(tmp), model=model, optimizers=ctx.optimizers, schedulers=ctx.schedulers,
                    epoch=epoch, global_step=ctx.global_step, spec=spec, info=info,
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
                tracking.log_metrics(run_id, metrics, step=epoch, uri=uri)
                for warning in epoch_warnings(model, metrics):
                    logger.warning("epoch %d: %s", epoch, warning)
                    if progress is not None:
                        progress.put(f"warning (epoch {epoch + 1}): {warning}")
                if progress is not None:
                    done = epoch - start_epoch + 1
                    eta = (time.monotonic() - started) / done * (stop_epoch - epoch - 1)
                    line = epoch_line(metrics, epoch, train.epochs, eta, unit=view.unit)
                    try:
                        progress.put_nowait(line)
                    except Exception as err:  # the console line is a courtesy; never block training on it
                        logger.warning("epoch line not sent to the driver (%s): %s", err, line)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch_{epoch:04d}")


def epoch_warnings(model: TrainableModel, metrics: dict[str, float]) -> list[str]:
    """The model's own warnings about an epoch's metrics (optional ``epoch_warnings`` hook,
    e.g. the WAE's negative W1 estimate); none for models without the hook."""
    hook = getattr(model, "epoch_warnings", None)
    return list(hook(metrics)) if hook is not None else []


def epoch_metrics(
    sums: dict[str, float], val: dict[str, float], world: int, ctx: LocalStepContext, epoch: int,
    *, normaliser: str = "patients", unit: str = "patients",
) -> dict[str, float]:
    """Per-epoch means from all-reduced sums, under the shared names ``train/*``, ``val/*``.
    Validation sums are divided by ``val[normaliser]`` (the view's unit of loss)."""
    steps = max(1.0, sums.get("steps", 0.0))  # summed over ranks
    out = {"epoch": float(epoch), "global_step": float(ctx.global_step)}
    for key, value in sums.items():
        if key in COUNTERS:
            continue
        out[f"train/{key}"] = value / steps
    rank_seconds = max(1e-9, sums.get("seconds", 0.0) / world)  # the mean rank's time
    out["train/steps_per_rank"] = sums.get("steps", 0.0) / world
    out["train/drained_patients"] = sums.get("drained", 0.0)
    # Throughput of the whole worker group: all ranks' examples (and units) over that time.
    out["train/patients_per_s"] = sums.get("examples", 0.0) / rank_seconds
    if unit != "patients":
        out[f"train/{unit}"] = sums.get("units", 0.0)
        out[f"train/{unit}_per_s"] = sums.get("units", 0.0) / rank_seconds
    denominator = max(1.0, val.get(normaliser, 0.0))
    for key, value in val.items():
        if key in (normaliser, "patients"):
            continue
        out[f"val/{key}"] = value / denominator
    out["val/patients"] = val.get("patients", 0.0)
    for name, sched in ctx.schedulers.items():
        out[f"lr/{name}"] = float(sched.get_last_lr()[0])
    return out


def epoch_line(metrics: dict[str, float], epoch: int, epochs: int, eta_s: float, *, unit: str) -> str:
    """The one line per epoch a user watches: where it is, both losses, speed, time left."""
    parts = [
        f"epoch {epoch + 1}/{epochs}",
        f"step {int(metrics['global_step'])}",
        f"train/loss {metrics.get('train/loss', float('nan')):.4f}",
        f"val/loss {metrics.get('val/loss', float('nan')):.4f}",
        f"{metrics['train/patients_per_s']:,.0f} patients/s",
    ]
    if unit != "patients":
        parts.append(f"{metrics[f'train/{unit}_per_s']:,.0f} {unit}/s")
    parts.append(f"ETA {timedelta(seconds=round(eta_s))}")
    return "  ".join(parts)
