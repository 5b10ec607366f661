"""The loop has no sentence assumptions: a throwaway view and throwaway models, defined here and
never registered, train through the same ``run_training`` on 2 DDP workers, are evaluated by
their capability, and a second stage builds on the first through ``upstream_run``.

The view turns each patient's diagnoses into a bag of condition counts; the first model
predicts sex from it (logistic regression, a ``predictor``); the second adds a correction on
top of the frozen first.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import ray.cloudpickle
import torch
import torch.nn.functional as F
from ray.data.collate_fn import ArrowBatchCollateFn
from torch import nn

from mirror import tracking
from mirror.checkpoint import UpstreamRunError, load_state
from mirror.data import schema
from mirror.data.simulator import generate_dataset
from mirror.data.stream import FilterReport, iter_batches, read_split
from mirror.data.views.base import DataView
from mirror.data.vocab import N_CONDITIONS
from mirror.models import MissingCapability, require_capability
from mirror.models.base import ModelSpec, Prediction
from mirror.train.driver import run_training
from mirror.train.spec import build_run_spec

pytestmark = pytest.mark.slow

# Ray workers cannot import this test module: ship its classes inside the pickles.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ---------------------------------------------------------------------------------------------
# A second view: condition counts per patient, and sex as the label.


@dataclass
class CountBatch:
    subject_id: torch.Tensor  # (B,)
    counts: torch.Tensor  # (B, N_CONDITIONS) float
    female: torch.Tensor  # (B,) float 0/1

    def __post_init__(self) -> None:
        b = self.subject_id.shape[0]
        if tuple(self.counts.shape) != (b, N_CONDITIONS) or tuple(self.female.shape) != (b,):
            raise ValueError(f"CountBatch: shapes {self.counts.shape}, {self.female.shape} for {b} patients")

    @property
    def size(self) -> int:
        return int(self.subject_id.shape[0])

    def to(self, device: Any, non_blocking: bool = True) -> CountBatch:
        return CountBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})


class CountCollate(ArrowBatchCollateFn):
    def __call__(self, table: pa.Table) -> dict[str, torch.Tensor]:
        conditions = table.column(schema.CONDITIONS).combine_chunks()
        offsets = conditions.offsets.to_numpy()
        rows = np.repeat(np.arange(table.num_rows), np.diff(offsets))
        flat = conditions.flatten().to_numpy().astype(np.int64)
        counts = np.bincount(rows * N_CONDITIONS + flat, minlength=table.num_rows * N_CONDITIONS)
        return {
            "subject_id": torch.from_numpy(table.column(schema.SUBJECT_ID).to_numpy().copy()),
            "counts": torch.from_numpy(counts.reshape(table.num_rows, N_CONDITIONS).astype(np.float32)),
            "female": torch.from_numpy((table.column(schema.SEX).to_numpy() == 1).astype(np.float32)),
        }


@dataclass(frozen=True)
class CountViewConfig:
    max_events: int = 200  # patients with more diagnoses are dropped (and counted)


@dataclass(frozen=True)
class CountInfo:
    n_features: int = N_CONDITIONS


class CountView(DataView):
    name = "throwaway_counts"
    config_cls = CountViewConfig
    info_cls = CountInfo

    def info(self) -> CountInfo:
        return CountInfo()

    def read(self, split: str, *, purpose: str = "train") -> tuple[Any, FilterReport]:
        columns = [schema.SUBJECT_ID, schema.SEX, schema.CONDITIONS]
        return read_split(self.root, split, columns=columns, min_words=1, max_words=self.config.max_events)

    def batches(self, source, batch_size, *, training, epoch=0, seed=0, device="auto") -> Iterator[CountBatch]:
        return iter_batches(source, batch_size, collate_fn=CountCollate(), make_batch=lambda t: CountBatch(**t), device=device)


# ---------------------------------------------------------------------------------------------
# Two models on it: a logistic regression, and a correction trained on top of it, frozen.


@dataclass(frozen=True)
class ClassifierConfig:
    lr: float = 0.05


class SexFromCounts(nn.Module):
    prediction_targets = {"female": "risk"}

    def __init__(self, config: ClassifierConfig, info: CountInfo):
        super().__init__()
        self.config = config
        self.linear = nn.Linear(info.n_features, 1)

    def logit(self, batch: CountBatch) -> torch.Tensor:
        return self.linear(torch.log1p(batch.counts)).squeeze(-1)

    def parts(self) -> dict[str, nn.Module]:
        return {"classifier": self}

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"classifier": torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.config.lr)}

    def forward(self, batch: CountBatch) -> torch.Tensor:
        return self.logit(batch)

    def train_step(self, batch: CountBatch, ctx) -> dict[str, float]:
        loss = F.binary_cross_entropy_with_logits(ctx.parts["classifier"](batch), batch.female)
        ctx.step(loss, "classifier")
        return {"loss": float(loss)}

    def eval_sums(self, batch: CountBatch) -> dict[str, torch.Tensor]:
        bce = F.binary_cross_entropy_with_logits(self.logit(batch), batch.female, reduction="sum")
        return {"loss": bce}

    def predict(self, batch: CountBatch) -> dict[str, Prediction]:
        observed = torch.ones_like(batch.female, dtype=torch.bool)
        return {"female": Prediction(torch.sigmoid(self.logit(batch)), batch.female, observed)}


class CorrectionOnFrozen(SexFromCounts):
    """Stage 2: the frozen stage-1 logit plus a new linear correction."""

    def __init__(self, config: ClassifierConfig, info: CountInfo, upstream: SexFromCounts):
        super().__init__(config, info)
        self.upstream = upstream

    def logit(self, batch: CountBatch) -> torch.Tensor:
        return self.upstream.logit(batch) + super().logit(batch)


STAGE_1 = ModelSpec("throwaway_sex", ClassifierConfig, SexFromCounts, CountView, capabilities=("predictor",))
STAGE_2 = ModelSpec(
    "throwaway_correction", ClassifierConfig, CorrectionOnFrozen, CountView,
    capabilities=("predictor",), upstream=(STAGE_1,),
)  # fmt: skip
NOT_STAGE_1 = ModelSpec("throwaway_other", ClassifierConfig, CorrectionOnFrozen, CountView, upstream=(STAGE_2,))
STEPS = 4


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("views")
    generate_dataset(root / "data", 2000, seed=3, workers=1)
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    yield root
    mp.undo()


def train(root, model_spec: ModelSpec, name: str, upstream_run: str | None = None):
    overrides = {
        "train.workers": 2, "train.epochs": 1, "train.batch_size": 32, "train.max_steps_per_epoch": STEPS,
        "train.storage_path": str(root / "ray_results"), "train.log_every_steps": 2, "view.max_events": 60,
    }  # fmt: skip
    spec = build_run_spec(model_spec, str(root / "data"), name, overrides, upstream_run=upstream_run)
    return spec, run_training(spec, model_spec=model_spec)


@pytest.fixture(scope="module")
def first_stage(workdir):
    return train(workdir, STAGE_1, "throwaway-stage-1")


def test_an_unregistered_model_on_a_second_view_trains_on_two_ddp_workers(workdir, first_stage):
    spec, outcome = first_stage
    metrics = outcome.metrics
    assert metrics["train/steps_per_rank"] == STEPS and metrics["ddp/param_divergence"] == 0.0
    assert metrics["global_step"] == STEPS
    assert np.isfinite(metrics["val/loss"]) and 0.0 < metrics["val/loss"] < 5.0  # per patient
    assert "train/tokens_per_s" not in metrics and metrics["train/patients_per_s"] > 0
    run = tracking.get_run(outcome.run_id)
    assert run.data.tags["view"] == "throwaway_counts" and run.data.params["view_config.max_events"] == "60"
    # The view's filter is counted: every train patient is kept or dropped as too long.
    assert run.data.metrics["data/train/kept"] + run.data.metrics["data/train/dropped_too_long"] == run.data.metrics["data/train/patients"]
    # Step-level metrics, every 2 steps, beside the per-epoch ones.
    steps = [step for step, _ in tracking.metric_history(outcome.run_id, "train_step/loss")]
    assert steps == [2, 4]


def test_evaluation_follows_the_declared_capability(first_stage):
    from mirror.evaluation import evaluate_run

    _, outcome = first_stage
    metrics = evaluate_run(outcome.run_id, log_model=False, model_spec=STAGE_1)
    assert 0.0 <= metrics["eval/female/auroc"] <= 1.0 and metrics["baseline/female/auroc"] == 0.5
    assert metrics["eval/female/examples"] > 0
    assert not any(key.startswith("eval/recon") for key in metrics)  # no sequence suite
    assert tracking.get_run(outcome.run_id).info.status == "FINISHED"


def test_a_job_needing_a_missing_capability_fails_in_one_line():
    with pytest.raises(MissingCapability, match=r"embed: model 'throwaway_sex' is not a encoder .*models that can: ae, scoehr_ae, wae"):
        require_capability(STAGE_1, "encoder", "embed")


def test_a_second_stage_trains_on_the_frozen_first(workdir, first_stage):
    _, first = first_stage
    spec, second = train(workdir, STAGE_2, "throwaway-stage-2", upstream_run=first.run_id)
    run = tracking.get_run(second.run_id)
    assert run.data.tags["mirror.upstream_run"] == first.run_id
    assert run.data.params["upstream_run"] == first.run_id
    before = load_state(first.checkpoint_path)["model"]
    after = load_state(second.checkpoint_path)["model"]
    for name, tensor in before.items():  # the first stage did not train
        assert torch.equal(after[f"upstream.{name}"], tensor), name


def test_an_upstream_run_that_does_not_fit_is_refused_before_training(workdir, first_stage):
    _, first = first_stage
    with pytest.raises(UpstreamRunError, match=r"it trained model 'throwaway_sex', but 'throwaway_other' builds on throwaway_correction"):
        train(workdir, NOT_STAGE_1, "refused", upstream_run=first.run_id)
    with pytest.raises(UpstreamRunError, match=r"--upstream-run 0123456789abcdef: cannot load its checkpoint"):
        train(workdir, STAGE_2, "refused", upstream_run="0123456789abcdef")
    with pytest.raises(ValueError, match=r"'throwaway_correction' is a second stage: pass --upstream-run"):
        build_run_spec(STAGE_2, str(workdir / "data"), "x", {})
    assert tracking.find_run("refused") is None  # nothing was started
