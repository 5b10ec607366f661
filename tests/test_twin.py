"""TWIN (issue 17): the visits view's retrieval, the attention fusion, generation in the trial
layout and a 2-worker DDP run, on the real PyTrial fixture imported to the platform layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mirror.data import schema, validate
from mirror.data.trial_import import import_trial
from mirror.data.views.visits import (
    VisitsCollate,
    VisitsView,
    VisitsViewConfig,
    build_index,
    top_k_global,
    top_k_global_csr,
    top_k_in_batch,
    visit_matrix,
    visit_rows,
)
from mirror.models import build_model
from mirror.models.twin import (
    EventVAE,
    TwinConfig,
    attention_weights,
    counterfactual_twins,
    counterfactual_twins_cpm,
    generate_twins,
)

FIXTURE = Path("/work/shared/fixtures/pytrial-demo")


@pytest.fixture(scope="module")
def trial_root(tmp_path_factory):
    if not FIXTURE.is_dir():
        pytest.skip(f"{FIXTURE} not present")
    root = tmp_path_factory.mktemp("twin") / "pytrial"
    import_trial(FIXTURE, root)
    return root


def _train_rows(root, n=30):
    return pq.read_table(schema.trial_split_files(root, "train")[0]).slice(0, n)


def test_retrieval_never_returns_the_participants_own_visits(trial_root):
    view = VisitsView(VisitsViewConfig(), str(trial_root))
    widths = view.info().widths
    index = build_index(trial_root, widths)
    visits = visit_rows(_train_rows(trial_root))
    x, subjects = visit_matrix(visits, widths), visits.column(schema.SUBJECT_ID).to_numpy()
    ids, valid = top_k_global(index, x, subjects, k=5, chunk=1000)  # several chunks of patterns
    assert index.patterns is not None and index.patterns.size < index.size  # visits repeat
    np.testing.assert_array_equal(ids, top_k_global_csr(index, x, subjects, k=5, chunk=1000)[0])
    tiny_chunks, _ = top_k_global(index, x, subjects, k=5, chunk=7)  # chunks smaller than m = K + max own
    np.testing.assert_array_equal(tiny_chunks, ids)
    assert valid.all() and not (index.owner[ids] == subjects[:, None]).any()
    # The participant's own visits are the best matches when allowed: exclusion is doing work.
    own_best = (x @ index.matrix.T.toarray()).max(1)
    assert (np.take_along_axis(x @ index.matrix.T.toarray(), ids, 1)[:, 0] <= own_best).all()
    # Exact: the chosen scores equal a brute-force top-5 over the other participants.
    scores = x @ index.matrix.T.toarray()
    scores[index.owner[None, :] == subjects[:, None]] = -np.inf
    np.testing.assert_array_equal(np.take_along_axis(scores, ids, 1), -np.sort(-scores, 1)[:, :5])
    in_ids, in_valid = top_k_in_batch(x, subjects, 3)
    assert not (subjects[in_ids][in_valid] == np.repeat(subjects, 3).reshape(-1, 3)[in_valid]).any()
    collated = VisitsCollate(widths, 3, "none").arrays(visits)
    assert not collated["neighbour_mask"].any()


def test_next_visit_targets_and_mask(trial_root):
    table = _train_rows(trial_root, 3)
    a = VisitsCollate(VisitsView(VisitsViewConfig(), str(trial_root)).info().widths, 2, "in_batch").arrays(visit_rows(table))
    n_visits = [len(d) for d in table.column(schema.VISIT_DAYS).to_pylist()]
    assert a["has_next"].sum() == sum(n_visits) - 3 and not a["has_next"][n_visits[0] - 1]
    np.testing.assert_array_equal(a["next_medication"][0], a["medication"][1])
    assert a["next_adverse_event"][~a["has_next"]].sum() == 0


def test_attention_fusion_on_a_hand_built_k2_case():
    x = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    neighbours = torch.tensor([[[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]]])
    w = attention_weights(x, neighbours, torch.tensor([[True, True]]), temperature=1.0)
    e3, e2, e0 = np.exp(3), np.exp(2), np.exp(0)  # scores: self 3, neighbour 1 scores 2, neighbour 2 scores 0
    np.testing.assert_allclose(w.numpy(), [[e3 / (e3 + e2 + e0), e2 / (e3 + e2 + e0), e0 / (e3 + e2 + e0)]], rtol=1e-6)
    w_masked = attention_weights(x, neighbours, torch.tensor([[True, False]]), temperature=2.0)
    np.testing.assert_allclose(w_masked.numpy(), [[np.exp(1.5) / (np.exp(1.5) + np.e), np.e / (np.exp(1.5) + np.e), 0.0]], rtol=1e-6)
    # Fusion: the encoder reads relu(sum_j w_j (x_j W + b)); with W = I, b = 0 and mu = identity
    # that is the weighted mix of the self and neighbour rows.
    vae = EventVAE(4, 2, 1, TwinConfig(hidden_dim=4, latent_dim=4))
    with torch.no_grad():
        for layer in (vae.embed, vae.mu):
            layer.weight.copy_(torch.eye(4))
            layer.bias.zero_()
    mu, _ = vae.encode(x, neighbours, w)
    expected = w[0, 0] * x[0] + w[0, 1] * neighbours[0, 0] + w[0, 2] * neighbours[0, 1]
    np.testing.assert_allclose(mu[0].detach().numpy(), expected.numpy(), rtol=1e-6)


def test_kl_weight_scales_only_the_kl_inside_betas_term(trial_root):
    """loss = beta * (rec_med + rec_ae + kl_weight * kl) + gamma * (next terms): the same
    weights and noise with kl_weight 1 and 0.25 differ by exactly beta * 0.75 * kl."""
    view = VisitsView(VisitsViewConfig(retrieval="in_batch"), str(trial_root))
    batch, _ = view.inference_batch(_train_rows(trial_root, 20))
    sums = {}
    for kw in (1.0, 0.25):
        torch.manual_seed(0)
        model = build_model("twin", {"kl_weight": kw, "beta": 2.0}, view.info())
        torch.manual_seed(1)
        sums[kw] = model.twin(batch)
    assert float(sums[1.0]["kl"]) > 0 and float(sums[1.0]["kl"]) == pytest.approx(float(sums[0.25]["kl"]))
    gap = float(sums[1.0]["loss"] - sums[0.25]["loss"])
    assert gap == pytest.approx(2.0 * 0.75 * float(sums[1.0]["kl"]), rel=1e-4)


def test_twins_and_counterfactual_twins_pass_trial_validation(trial_root):
    view = VisitsView(VisitsViewConfig(retrieval="in_batch"), str(trial_root))
    model = build_model("twin", {}, view.info())
    table = _train_rows(trial_root, 40)
    vocab = dict(view.metadata.vocab)
    twins = generate_twins(model, view, table, seed=1, batch_visits=100)  # several blocks
    assert twins.num_rows == 40
    assert twins.column(schema.VISIT_TREATMENTS).equals(table.column(schema.VISIT_TREATMENTS))
    assert validate.check_trial_table(twins, file="twins", baseline_width=view.info().n_baseline, vocab=vocab) == []
    cf, surrogate = counterfactual_twins(model, view, table)
    arm = table.column(schema.ARM).to_numpy()
    assert (cf.column(schema.ARM).to_numpy() != arm).all() and (arm[surrogate] != arm).all()
    assert validate.check_trial_table(cf, file="cf", baseline_width=view.info().n_baseline, vocab=vocab) == []
    own, own_surrogate = counterfactual_twins_cpm(model, view, table, seed=2)
    np.testing.assert_array_equal(own_surrogate, surrogate)
    for column in (schema.SUBJECT_ID, schema.ARM, schema.VISIT_DAYS, schema.VISIT_TREATMENTS):
        assert own.column(column).equals(cf.column(column))  # the surrogate's schedule, the participant's id
    assert validate.check_trial_table(own, file="own", baseline_width=view.info().n_baseline, vocab=vocab) == []


@pytest.mark.slow
def test_two_worker_ddp_run_ends_with_identical_parameters(trial_root, tmp_path, ray_cluster, monkeypatch):
    from mirror.train.driver import run_training
    from mirror.train.spec import build_run_spec

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    spec = build_run_spec("twin", str(trial_root), "twin-ddp", {
        "train.workers": 2, "train.epochs": 1, "train.batch_size": 32, "train.eval_batch_size": 256,
        "train.max_steps_per_epoch": 3, "train.storage_path": str(tmp_path / "ray_results"),
        "train.score_synthetic": False,  # the sample job below scores it
    })
    outcome = run_training(spec)
    assert outcome.metrics["ddp/param_divergence"] == 0.0
    assert outcome.metrics["train/steps_per_rank"] == 3
    assert np.isfinite(outcome.metrics["val/loss"])

    # The sample job on the finished run: twins and counterfactual twins, scored, gated, and
    # exported (or refused with exit code 3); either way the verdict is logged to the run.
    import importlib.util

    from mirror import tracking
    from mirror.data.validate import validate_dataset

    job = importlib.util.spec_from_file_location("sample_job", Path(__file__).parents[1] / "jobs" / "sample.py")
    sample_job = importlib.util.module_from_spec(job)
    job.loader.exec_module(sample_job)
    out = tmp_path / "twins"
    rc = sample_job.main(["--run", outcome.run_id, "--patients", "60", "--out", str(out), "--allow-unsafe"])
    assert rc == 0
    assert validate_dataset(out).ok and validate_dataset(out / schema.COUNTERFACTUAL_SAMPLE_DIR).ok
    logged = tracking.get_run(outcome.run_id).data.metrics
    assert "privacy/gate_passed" in logged and np.isfinite(logged["fidelity/trial/dp_r/medications"])
    assert "counterfactual/privacy/presence/sensitivity" in logged


def test_sampling_twins_writes_valid_trial_datasets_that_the_trial_scorecard_gates(trial_root, tmp_path, ray_cluster):
    """The generator capability end to end (below the MLflow run): twins and counterfactual
    twins of the streamed training split, in the trial layout, validated, scored and gated."""
    from mirror.data.validate import validate_dataset
    from mirror.metrics.privacy import privacy_gate
    from mirror.metrics.scorecard import COUNTERFACTUAL_PREFIX, ScorecardConfig, compute_scorecard
    from mirror.synthesize import COUNTERFACTUAL_SAMPLE, SYNTHETIC_ID_OFFSET, sample_patients

    view = VisitsView(VisitsViewConfig(), str(trial_root))  # global retrieval: the index via Ray
    model = build_model("twin", {}, view.info())
    real = pq.read_table(schema.trial_split_files(trial_root, "train"))
    n = real.num_rows + 40  # past the end of the split: the stream starts a second pass
    out = tmp_path / "twins"
    report = sample_patients(model, trial_root, n_patients=n, out_dir=out, female_share=float("nan"),
                             batch_size=256, record_type="trial", view=view)
    assert report.written == n and report.rejected == {}
    for root in (out, out / COUNTERFACTUAL_SAMPLE):
        result = validate_dataset(root)
        assert result.ok, result.summary()
    twins = pq.read_table(schema.trial_split_files(out, "train"))
    cf = pq.read_table(schema.trial_split_files(out / COUNTERFACTUAL_SAMPLE, "train"))
    assert twins.column(schema.SUBJECT_ID).to_pylist() == list(range(SYNTHETIC_ID_OFFSET, SYNTHETIC_ID_OFFSET + n))
    assert cf.column(schema.SUBJECT_ID).equals(twins.column(schema.SUBJECT_ID))
    assert twins.slice(0, real.num_rows).column(schema.VISIT_TREATMENTS).equals(real.column(schema.VISIT_TREATMENTS))
    assert (cf.column(schema.ARM).to_numpy() != twins.column(schema.ARM).to_numpy()).all()
    meta = schema.DatasetMetadata.read(out)
    assert meta.trial["participants"]["train"] == n and meta.provenance["real_rows_passes"] == 2

    card = compute_scorecard(trial_root, out, max_queries=200, seed=0, config=ScorecardConfig(trial_utility_epochs=2))
    for prefix in ("", COUNTERFACTUAL_PREFIX, "reference/ceiling/", "reference/floor/"):
        for key in ("fidelity/trial/dp_r/medications", "utility/trial/severe_auroc_tstr",
                    "privacy/mia/distance_auc", "privacy/presence/sensitivity", "privacy/attribute/sensitivity",
                    "privacy/nnaa/privacy_loss", "privacy/exact_match/train_reproduced"):
            assert np.isfinite(card[prefix + key]), prefix + key
    assert card["meta/trial/n_synthetic"] == 200
    for prefix in ("", COUNTERFACTUAL_PREFIX):
        gate = privacy_gate(card, prefix=prefix)
        assert not any("missing" in f for f in gate.failures), gate.failures


def test_keep_top_codes_folds_the_rest_into_one_rare_code_and_counts_it(trial_root, tmp_path):
    from mirror.data.trial_top_codes import RARE_CODE, keep_top_codes
    from mirror.data.validate import validate_dataset

    report = keep_top_codes(trial_root, tmp_path / "top", {schema.ADVERSE_EVENT: 5})
    assert validate_dataset(tmp_path / "top").ok
    meta = schema.DatasetMetadata.read(tmp_path / "top")
    assert meta.vocab[schema.ADVERSE_EVENT] == 6 and meta.provenance["top_codes"]["report"] == report
    codes = pq.read_table(tmp_path / "top" / schema.CODES_PARQUET).to_pandas()
    ae = codes[codes.modality == schema.ADVERSE_EVENT].sort_values("id")
    assert list(ae.id) == list(range(6)) and ae.code.iloc[-1] == RARE_CODE

    def events(root):
        t = pa.concat_tables([pq.read_table(f) for s in schema.SPLITS for f in schema.trial_split_files(root, s)])
        return t.column(schema.VISIT_ADVERSE_EVENTS).combine_chunks().flatten().flatten().to_numpy()

    before, after = events(trial_root), events(tmp_path / "top")
    r = report[schema.ADVERSE_EVENT]
    assert len(after) == len(before) - r["merged_in_visit"]  # nothing dropped, only merged
    assert (after == 5).sum() == r["folded_events"] - r["merged_in_visit"] > 0


def test_utility_ratio_averages_seeds_and_brackets_itself_with_a_paired_bootstrap():
    """The seed-averaged AUROCs equal sklearn's; bootstrap counts weigh participants like
    repeated rows; identical models give a ratio of exactly 1 in every draw."""
    from sklearn.metrics import roc_auc_score

    from mirror.metrics.trial_twins import _weighted_aurocs, utility_ratio

    rng = np.random.default_rng(0)
    y = (rng.random(40) < 0.3).astype(np.float32)
    real = rng.normal(size=(3, 40)) + 1.5 * y  # informative
    noise = rng.normal(size=(3, 40))  # uninformative
    np.testing.assert_allclose(_weighted_aurocs(real, y, np.ones((1, 40)))[0], [roc_auc_score(y, s) for s in real])
    counts = rng.integers(0, 3, size=(1, 40)).astype(float)
    rows = np.repeat(np.arange(40), counts[0].astype(int))
    np.testing.assert_allclose(_weighted_aurocs(real, y, counts)[0], [roc_auc_score(y[rows], s[rows]) for s in real])
    same = utility_ratio(real, real, y, draws=200)
    assert same["utility/trial/severe_auroc_ratio"] == 1.0
    assert same["utility/trial/severe_auroc_ratio_ci_low"] == same["utility/trial/severe_auroc_ratio_ci_high"] == 1.0
    worse = utility_ratio(real, noise, y, draws=200)
    low, high = worse["utility/trial/severe_auroc_ratio_ci_low"], worse["utility/trial/severe_auroc_ratio_ci_high"]
    assert low <= worse["utility/trial/severe_auroc_ratio"] <= high < 1.0
    assert worse["utility/trial/lstm_seeds"] == 3 and worse["utility/trial/n_test_positive"] == y.sum()


def test_counterfactual_auroc_scores_candidates_against_the_true_outcome(trial_root):
    """The label is the truth's outcome, never the candidate's own: a candidate holding the
    truth's visits with its outcomes flipped scores exactly what the truth's visits score,
    which is the plain utility AUROC of the same LSTM; misaligned candidates are refused."""
    from mirror.metrics.errors import MetricError
    from mirror.metrics.trial_twins import counterfactual_auroc, severe_outcome_auroc

    rows = pq.read_table(schema.trial_split_files(trial_root, "train")[0])
    real, truth = rows.slice(0, 200), rows.slice(200, 120)
    meta = schema.DatasetMetadata.read(trial_root).vocab
    widths = (meta[schema.TRIAL_TREATMENT], meta[schema.TRIAL_MEDICATION], meta[schema.ADVERSE_EVENT])
    i = truth.schema.get_field_index(schema.SEVERE_OUTCOME)
    flipped = truth.set_column(i, schema.SEVERE_OUTCOME, pa.array(1 - truth.column(i).to_numpy(zero_copy_only=False).astype(np.int64),
                                                                  type=truth.schema.field(i).type))
    auc = counterfactual_auroc(real, {"truth": truth, "flipped": flipped}, truth, widths, epochs=2, seeds=(3,))
    assert auc["truth"] == auc["flipped"] == pytest.approx(severe_outcome_auroc(real, truth, widths, epochs=2, seed=3))
    with pytest.raises(MetricError, match="rows"):
        counterfactual_auroc(real, {"short": truth.slice(0, 10)}, truth, widths, epochs=1)


def test_read_trial_caps_a_sharded_split_one_shard_at_a_time(trial_root, tmp_path):
    from mirror.metrics.trial_twins import read_trial

    whole = pq.read_table(schema.trial_split_files(trial_root, "train")[0])
    schema.trial_split_dir(tmp_path, "train").mkdir(parents=True)
    for i, lo in enumerate(range(0, whole.num_rows, 300)):  # three shards
        pq.write_table(whole.slice(lo, 300), schema.trial_shard_path(tmp_path, "train", i))
    ids = whole.column(schema.SUBJECT_ID).to_numpy()
    assert read_trial(tmp_path, "train", 10**6, seed=0).column(schema.SUBJECT_ID).to_numpy().tolist() == ids.tolist()
    capped = read_trial(tmp_path, "train", 100, seed=0).column(schema.SUBJECT_ID).to_numpy()
    assert len(capped) == len(set(capped)) == 100 and set(capped) <= set(ids)
    assert (np.diff(capped) > 0).all()  # shard order kept
    assert {int(i) // 300 for i in np.searchsorted(ids, capped)} == {0, 1, 2}  # every shard drawn from
    assert capped.tolist() == read_trial(tmp_path, "train", 100, seed=0).column(schema.SUBJECT_ID).to_numpy().tolist()
    assert read_trial(tmp_path, "held_out", 100, seed=0).num_rows == 0


def test_utility_lstm_stops_early_on_noise_and_learns_a_real_signal():
    """The utility LSTM keeps its best validation epoch: on labels that are noise it stops
    long before its epoch budget; on labels the first visit determines it ranks held-out
    records almost perfectly."""
    from mirror.metrics.trial_twins import PATIENCE, _severe_outcome_fit

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(300, 4, 6, generator=g) < 0.3).float()
    n = torch.full((300,), 4, dtype=torch.long)
    noise = (torch.rand(300, generator=g) < 0.3).float()
    _, epochs_run = _severe_outcome_fit(x[:200], n[:200], noise[:200], epochs=60, seed=0)
    assert epochs_run < 60 - PATIENCE
    signal = x[:, 0, 0]
    score, _ = _severe_outcome_fit(x[:200], n[:200], signal[:200], epochs=60, seed=0)
    from sklearn.metrics import roc_auc_score
    assert roc_auc_score(signal[200:].numpy(), score(x[200:], n[200:])) > 0.95
