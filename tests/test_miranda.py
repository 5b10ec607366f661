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
    pack_regimen,
)
from mirror.evaluation.recommender import (
    ddi_adjacency,
    ddi_rate,
    multilabel_metrics,
    stay_truth,
    top_k_regimen,
    true_length_of_stay,
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


def test_nearest_set_matching_searches_the_block_of_the_most_similar_procedure_set():
    n_labels = 10
    regimen = np.packbits(np.eye(n_labels, dtype=bool)[[0, 1, 2, 3]], axis=1)
    sets = np.packbits(np.array([[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1, 0, 0]], bool), axis=1)
    index = RetrievalIndex.build(
        key=np.array([7, 9, 11, 9], np.uint64), age=np.array([40.0, 41.0, 42.0, 70.0]), subject=np.array([1, 2, 3, 4]),
        los=np.ones(4, np.float32), regimen=regimen, n_labels=n_labels,
        set_keys=np.array([7, 9, 11, 9], np.uint64), sets=sets[[0, 1, 2, 1]],
    )
    query = np.packbits(np.array([[1, 1, 1, 1, 0, 0, 0, 0]], bool), axis=1)  # {0,1,2,3}: nearest is block 9
    pos, valid, fell_back = index.query(np.array([8], np.uint64), np.array([43.0]), np.array([6]), 4, 5.0,
                                        fallback=False, query_sets=query)
    assert index.subject[pos[0][valid[0]]].tolist() == [2] and fell_back[0]  # not subject 4: age 70
    # the query's own (empty) block is never "nearest": block 7 with only its own patient
    pos, valid, _ = index.query(np.array([7], np.uint64), np.array([40.0]), np.array([1]), 4, 5.0,
                                fallback=False, query_sets=sets[[0]])
    assert index.subject[pos[0][valid[0]]].tolist() == [2]


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
    # nearest-set matching: one packed set per block; it only adds candidates where none were
    with_sets, _ = build_index(dataset, meta.vocab["medication"], meta.vocab["lab"], 18.0, meta.vocab["procedure"])
    assert with_sets.block_sets.shape == (len(with_sets.block_keys), (meta.vocab["procedure"] + 7) // 8)
    table = pq.read_table(schema.split_files(dataset, schema.HELD_OUT)[0], columns=READ_COLUMNS)
    adm = block_admissions(table, meta.vocab["lab"])
    proc_adm, proc = adm.sets["procedures"]
    sets = pack_regimen(proc_adm, proc, len(adm.owner), meta.vocab["procedure"])
    _, exact, _ = with_sets.query(adm.procedure_key, adm.age, adm.subject, 64, 5.0, False)
    _, near, fell = with_sets.query(adm.procedure_key, adm.age, adm.subject, 64, 5.0, False, sets)
    assert (near[exact.any(1)] == exact[exact.any(1)]).all() and not fell[exact.any(1)].any()
    assert near.any(1).sum() > exact.any(1).sum() and fell.sum() == near.any(1).sum() - exact.any(1).sum()


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
def test_ddp_ranks_take_the_same_gate_decisions_and_inner_steps_and_the_run_is_evaluated(dataset, tmp_path, monkeypatch):
    from mirror.evaluation import evaluate_run
    from mirror.train.driver import run_training
    from mirror.train.spec import build_run_spec

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    # gate "above" with δ = -100 opens on every step and loops while H_B >= 0, which the
    # untrained model's excess stays reach: the inner steps run, and must stay in step
    overrides = {**{f"model.{k}": v for k, v in SMALL.items()},
                 "model.threshold": -100.0, "model.gate": "above", "model.max_inner_steps": 3,
                 "train.workers": 2, "train.epochs": 1, "train.batch_size": 16, "train.eval_batch_size": 64,
                 "train.max_steps_per_epoch": 4, "train.eval_patients": 200,
                 "train.storage_path": str(tmp_path / "ray_results")}
    outcome = run_training(build_run_spec("miranda", str(dataset), "miranda-ddp", overrides))
    m = outcome.metrics
    assert m["ddp/param_divergence"] == 0.0
    assert m["train/rank_disagreement"] == 0.0
    assert m["train/steps_per_rank"] == 4
    assert m["train/gate"] == 1.0
    assert m["train/inner_steps"] > 0  # inner steps were taken, on both ranks alike
    # the recommender suite, logged to the run: every number beside its floor
    e = evaluate_run(outcome.run_id, log_model=False)
    for key in ("roc_auc", "pr_auc", "jaccard", "precision", "recall", "f1", "ddi_rate", "elos", "true_los"):
        assert np.isfinite(e[f"eval/{key}"]) and np.isfinite(e[f"baseline/{key}"]), key
    assert 0 < e["eval/examples"] <= 200 and e["eval/true_los_missing"] == 0
    assert e["given/true_los_max_abs_error"] < 1e-3  # the truth join reproduces the stored expectation
    assert e["ceiling/true_los"] <= e["given/true_los"] + 1e-6
    assert e["baseline/mean_regimen_size"] == e["baseline/top_k"] >= 1


def test_recommender_metrics_on_a_hand_example():
    truth = np.array([[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]], bool)
    scores = np.array([[0.9, 0.2, 0.6, 0.1], [0.1, 0.8, 0.3, 0.2], [0.7, 0.1, 0.1, 0.1]])
    m = multilabel_metrics(scores, truth)
    assert m["empty_truth_examples"] == 1 and m["graded_examples"] == 2
    assert m["jaccard"] == pytest.approx((1 / 3 + 1) / 2)
    assert m["precision"] == pytest.approx((1 / 2 + 1) / 2) and m["recall"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["roc_auc"] == pytest.approx((0.75 + 1) / 2)  # example 0: 3 of 4 pairs ordered
    adjacency = np.zeros((4, 4), bool)
    adjacency[0, 2] = adjacency[2, 0] = True
    # pairs: example 0 {0, 2}: 1 interacting of 1; example 1 {1}: none; example 2 {0}: none
    assert ddi_rate(scores >= 0.5, adjacency) == 1.0
    assert ddi_rate(np.array([[1, 1, 1, 0]], bool), adjacency) == pytest.approx(1 / 3)
    assert np.isnan(ddi_rate(np.eye(4, dtype=bool), adjacency))
    floor = top_k_regimen(np.array([0.1, 0.5, 0.3, 0.0]), 2, 3)
    assert floor.shape == (3, 4) and floor[:, [1, 2]].all() and not floor[:, [0, 3]].any()


def test_ddi_table_holds_gamenets_edges_over_the_atc3_vocabulary():
    from mirror.data.vocabularies import drug_class_id

    ids = drug_class_id()
    adjacency = ddi_adjacency(len(ids))
    assert (adjacency == adjacency.T).all() and not adjacency.diagonal().any()
    assert adjacency.sum() // 2 == 463  # GAMENet's 467, less 4 with a class outside the vocabulary
    assert adjacency[ids["N02B"], ids["M01A"]]  # the first edge of gamenet_ddi_edges.csv


def test_true_length_of_stay_joins_the_ground_truth_and_reproduces_it(batch, dataset):
    _, b = batch
    subject, stay = b.subject_id.numpy(), b.stay.numpy()
    truth = stay_truth(dataset, schema.TRAIN, subject, stay)
    assert truth.found.all()
    given = b.target.numpy().astype(bool)
    los = true_length_of_stay(dataset, truth, {"given": given, "nothing": np.zeros_like(given)})
    assert np.abs(los["given"] - truth.expected_given).max() < 1e-3
    assert (los["nothing"] >= los["given"] - 1e-4).all() and (los["nothing"] > los["given"] + 0.1).any()
    missing = stay_truth(dataset, schema.TRAIN, np.array([-5]), np.array([0]))
    assert not missing.found.any()  # an unknown stay is reported missing, not invented


@pytest.mark.parametrize("name", ["miranda_ablation", "miranda_pbt", "miranda_paper", "miranda_upstream"])
def test_sweep_files_load_and_declare_their_metric(name):
    from mirror.tune.space import load_sweep

    spec = load_sweep(f"search_spaces/{name}.yaml")
    assert spec.metric == "val/jaccard"


def test_fixed_point_sweeps_hold_the_papers_and_upstreams_values_as_paired_arm_x_seed_grids():
    from mirror.models.miranda import MirandaConfig
    from mirror.tune.space import load_sweep

    paper, upstream = (load_sweep(f"search_spaces/miranda_{n}.yaml") for n in ("paper", "upstream"))
    knobs = ("decay", "threshold", "confidence", "blend")  # λ, δ, γ, ε
    defaults = MirandaConfig()
    assert [paper.fixed[f"model.{k}"] for k in knobs] == [getattr(defaults, k) for k in knobs] == [0.9, 0.2, 0.5, 0.2]
    assert paper.fixed["model.normaliser"] == "sum"  # the paper's Σ ELOS
    assert [upstream.fixed[f"model.{k}"] for k in knobs] == [0.2, 0.5, 0.9, 0.2]
    assert (upstream.fixed["model.gate"], upstream.fixed["model.p_rl"]) == ("below", "detached")
    for spec in (paper, upstream):
        grids = {p.key: p.values for p in spec.parameters}
        assert all(p.space == "grid" for p in spec.parameters) and spec.evaluate == "all"
        assert grids == {"model.phase": ("supervised", "optimise"), "train.seed": (0, 1, 2, 3, 4)}


def _read_candidates(dataset, fallback: str) -> dict[str, np.ndarray]:
    """Held-out examples through the view's own read path, sorted by (subject, stay)."""
    view = AdmissionsView(AdmissionsViewConfig(pool_size=16, fallback=fallback), str(dataset))
    ds, _ = view.read(schema.HELD_OUT)
    parts = list(view.batches(ds, 10_000, training=False, device="cpu"))
    cat = {k: np.concatenate([getattr(b, k).numpy() for b in parts])
           for k in ("subject_id", "stay", "candidate_valid", "candidate_los", "fell_back")}
    order = np.lexsort((cat["stay"], cat["subject_id"]))
    return {k: v[order] for k, v in cat.items()}


def test_nearest_fallback_through_the_view_read_path_only_fills_admissions_without_candidates(dataset):
    none, nearest, age = (_read_candidates(dataset, f) for f in ("none", "nearest", "age"))
    assert (none["subject_id"] == nearest["subject_id"]).all() and (none["stay"] == nearest["stay"]).all()
    exact = none["candidate_valid"].any(1)
    assert not none["fell_back"].any() and (~exact).any()  # some admissions have no exact block
    # admissions with an exact block keep exactly its candidates; the others are filled, and flagged
    assert (nearest["candidate_valid"][exact] == none["candidate_valid"][exact]).all()
    assert (nearest["candidate_los"][exact] == none["candidate_los"][exact]).all()
    assert not nearest["fell_back"][exact].any()
    filled = nearest["candidate_valid"].any(1) & ~exact
    assert filled.sum() > 0 and (nearest["fell_back"] == filled).all()
    # the nearest procedure set's block is not the age-only pool: the two fill differently
    assert (nearest["candidate_los"][filled] != age["candidate_los"][filled]).any()
