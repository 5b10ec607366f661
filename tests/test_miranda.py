"""MiranDa (seed 004): the admissions view, its training-only retrieval, the two phases and
the DDP-synchronised gate, on a small simulated population (real Ray, real Parquet)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mirror.data import schema
from mirror.data.views.admissions import (
    READ_COLUMNS,
    AdmissionsView,
    AdmissionsViewConfig,
    RetrievalIndex,
    block_admissions,
    build_index,
)
from mirror.models import build_model
from mirror.models.local_step import LocalStepContext
from mirror.models.miranda import retrieved_elos, soft_elos

SMALL = {"d_model": 16, "ffn": 32, "dropout": 0.1}


def test_index_query_blocks_by_procedure_set_and_age_and_excludes_the_patient():
    n_labels = 10
    regimen = np.packbits(np.eye(n_labels, dtype=bool)[[0, 1, 2, 3, 4]], axis=1)
    index = RetrievalIndex.build(
        key=np.array([7, 7, 7, 9, 7], np.uint64), age=np.array([40.0, 44.0, 60.0, 41.0, 41.0]),
        subject=np.array([1, 2, 3, 4, 5]), los=np.array([1, 2, 3, 4, 5], np.float32), regimen=regimen, n_labels=n_labels,
    )
    pos, valid, fell_back = index.query(np.array([7, 8], np.uint64), np.array([42.0, 42.0]), np.array([5, 6]),
                                        pool_size=4, age_window=5.0, fallback=True)
    # query 0: block 7, ages 37-47, not subject 5 -> subjects 1 and 2 only
    assert sorted(index.subject[pos[0][valid[0]]].tolist()) == [1, 2] and not fell_back[0]
    # query 1: no block 8 -> the age-only fallback: subjects 1, 2, 4, 5 (not 3: age 60)
    assert sorted(index.subject[pos[1][valid[1]]].tolist()) == [1, 2, 4, 5] and fell_back[1]
    _, valid, _ = index.query(np.array([8], np.uint64), np.array([42.0]), np.array([6]), 4, 5.0, fallback=False)
    assert not valid.any()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ray_cluster):
    from mirror.data.simulator import generate_dataset

    root = tmp_path_factory.mktemp("miranda") / "data"
    generate_dataset(root, 1500, seed=11, workers=1)
    return root


def test_retrieval_pool_holds_training_admissions_of_other_patients_only(dataset):
    meta = schema.DatasetMetadata.read(dataset)
    index, counts = build_index(dataset, meta.vocab["medication"], meta.vocab["lab"], 18.0)
    ids = {s: set(pq.read_table(f, columns=[schema.SUBJECT_ID]).column(0).to_numpy().tolist())
           for s in schema.SPLITS for f in schema.split_files(dataset, s)}
    assert index.size == counts["admissions"] > 0
    assert set(index.subject.tolist()) <= ids[schema.TRAIN]
    assert not set(index.subject.tolist()) & (ids[schema.TUNING] | ids[schema.HELD_OUT])
    for split in (schema.TRAIN, schema.HELD_OUT):  # the query's own patient (so itself) never
        table = pq.read_table(schema.split_files(dataset, split)[0], columns=READ_COLUMNS)
        adm = block_admissions(table, meta.vocab["lab"])
        pos, valid, _ = index.query(adm.procedure_key, adm.age, adm.subject, 64, 5.0, True)
        assert valid.any()
        assert (index.subject[pos][valid] != np.broadcast_to(adm.subject[:, None], pos.shape)[valid]).all()


@pytest.fixture(scope="module")
def batch(dataset):
    view = AdmissionsView(AdmissionsViewConfig(pool_size=32), str(dataset))
    ds, report = view.read(schema.TRAIN)
    batches = list(view.batches(ds, 10_000, training=True, device="cpu"))
    assert sum(b.size for b in batches) == report.kept > 50
    assert report.admissions == report.kept + report.dropped_under_min_age
    return view, batches[0]


def test_admission_examples_carry_history_target_and_candidates(batch):
    view, b = batch
    assert b.diagnoses.shape[1:] == (8, view.info().n_conditions)
    assert b.visit_mask[:, 0].all() and (b.visit_mask.sum(1) == torch.clamp(b.stay + 1, max=8)).all()
    assert (b.diagnoses[~b.visit_mask] == 0).all()  # absent visits hold nothing
    assert b.target.sum() > 0 and (b.los > 0).all()
    assert b.candidate_regimens.shape == (b.size, 32, view.info().n_labels)
    assert b.candidate_valid.any(1).float().mean() > 0.8


def test_soft_elos_is_differentiable_and_retrieved_elos_is_a_mean_of_candidates(batch):
    _, b = batch
    scores = torch.rand(b.size, b.target.shape[1], requires_grad=True)
    elos, has = soft_elos(scores, b, 0.1)
    elos[has].mean().backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0
    hard, ok = retrieved_elos(b.target, b, 1, 0.0)
    lo = b.candidate_los.masked_fill(~b.candidate_valid, float("inf")).min(1).values
    hi = b.candidate_los.masked_fill(~b.candidate_valid, -float("inf")).max(1).values
    assert ok.any() and ((hard[ok] >= lo[ok] - 1e-5) & (hard[ok] <= hi[ok] + 1e-5)).all()


def _step(batch, **overrides):
    torch.manual_seed(0)
    model = build_model("miranda", {**SMALL, **overrides}, batch[0].info())
    ctx = LocalStepContext(model, model.make_optimizers(), 1.0)
    metrics = ctx.train_step(batch[1])
    return model, metrics


def test_gate_inner_loop_cap_and_modes(batch):
    _, sup = _step(batch, phase="supervised", threshold=-100.0)
    assert sup["gate"] == 0 and sup["inner_steps"] == 0
    _, shut = _step(batch, threshold=100.0)  # H_B never reaches 100 days
    assert shut["gate"] == 0
    _, opened = _step(batch, threshold=100.0, max_inner_steps=3, gate="below", p_rl="surrogate")  # below: H_B < δ
    assert opened["gate"] == 1 and opened["inner_steps"] <= 3
    # detached (upstream): inner steps move no parameter, so any cap ends where cap 0 ends
    capped, m1 = _step(batch, threshold=-100.0, max_inner_steps=0, p_rl="detached", gate="above")
    looped, m2 = _step(batch, threshold=-100.0, max_inner_steps=5, p_rl="detached", gate="above")
    assert m1["gate"] == m2["gate"] == 1
    for a, b in zip(capped.parameters(), looped.parameters(), strict=True):
        assert torch.equal(a, b)
    # surrogate: inner steps do move parameters
    moved, m3 = _step(batch, threshold=100.0, max_inner_steps=5, p_rl="surrogate", gate="below", normaliser="mean")
    if m3["inner_steps"] > 0:
        assert any(not torch.equal(a, b) for a, b in zip(capped.parameters(), moved.parameters(), strict=True))
    sums = moved.eval_sums(batch[1])
    assert 0 <= float(sums["jaccard"]) <= batch[1].size and float(sums["elos_coverage"]) > 0


@pytest.mark.slow
@pytest.mark.timeout(600)  # desynchronised ranks hang in a collective: fail, never hang
def test_ddp_ranks_take_the_same_gate_decisions_and_inner_steps(dataset, tmp_path, monkeypatch):
    from mirror.train.driver import run_training
    from mirror.train.spec import build_run_spec

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    overrides = {**{f"model.{k}": v for k, v in SMALL.items()},
                 "model.threshold": 100.0, "model.gate": "below", "model.max_inner_steps": 3,
                 "train.workers": 2, "train.epochs": 1, "train.batch_size": 16, "train.eval_batch_size": 64,
                 "train.max_steps_per_epoch": 3, "train.storage_path": str(tmp_path / "ray_results")}
    outcome = run_training(build_run_spec("miranda", str(dataset), "miranda-ddp", overrides))
    m = outcome.metrics
    assert m["ddp/param_divergence"] == 0.0
    assert m["train/rank_disagreement"] == 0.0
    assert m["train/steps_per_rank"] == 3
    assert m["train/gate"] > 0  # the gate opened on some steps, on both ranks alike


@pytest.mark.parametrize("name", ["miranda_ablation", "miranda_pbt"])
def test_sweep_files_load_and_declare_their_metric(name):
    from mirror.tune.space import load_sweep

    spec = load_sweep(f"search_spaces/{name}.yaml")
    assert spec.metric == "val/jaccard"
