"""ScoEHR end to end, tiny: the code-vector view streamed through Ray, the autoencoder trained on
2 DDP workers, the score network trained on its frozen latents through ``upstream_run``, and
the finished run sampled as dataset rows through the ``Generator`` capability."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mirror import tracking
from mirror.checkpoint import load_run, load_state
from mirror.data import schema
from mirror.data.simulator import generate_dataset
from mirror.data.views.code_vector import CodeVectorView, CodeVectorViewConfig, code_vectors
from mirror.models import get_model_spec
from mirror.models.base import GenerationContext
from mirror.synthesize import sample_patients
from mirror.train.driver import run_training
from mirror.train.spec import build_run_spec

pytestmark = pytest.mark.slow
STEPS = 3


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("scoehr")
    generate_dataset(root / "data", 800, seed=5, workers=1)
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    yield root
    mp.undo()


def train(root, model: str, overrides: dict, upstream_run: str | None = None):
    base = {
        "train.workers": 2, "train.epochs": 1, "train.batch_size": 32, "train.max_steps_per_epoch": STEPS,
        "train.storage_path": str(root / "ray_results"), "train.log_every_steps": 0, "train.val_max_batches": 2,
    }  # fmt: skip
    spec = build_run_spec(model, str(root / "data"), f"{model}-tiny", base | overrides, upstream_run=upstream_run)
    return run_training(spec)


def test_the_view_streams_exact_code_vectors(workdir):
    view = CodeVectorView(CodeVectorViewConfig(values="counts"), str(workdir / "data"))
    dataset, report = view.read(schema.TRAIN)
    batch = next(iter(view.batches(dataset, 16, training=True, device="cpu")))
    assert batch.x.shape == (16, 605) and batch.x.sum() > 0
    first = pq.read_table(schema.split_files(workdir / "data", schema.TRAIN)[0])
    kept = first.filter(first.column(schema.N_EVENTS).to_numpy() >= 1)
    by_id = dict(zip(kept.column(schema.SUBJECT_ID).to_pylist(), code_vectors(kept, "conditions", "counts"), strict=True))
    for sid, row in zip(batch.subject_id.tolist(), batch.x.numpy(), strict=True):
        if sid in by_id:
            assert np.array_equal(row, by_id[sid])
    assert report.kept + report.dropped_too_short == report.patients


def test_two_stages_train_and_the_second_generates_patients(workdir, monkeypatch):
    first = train(workdir, "scoehr_ae", {"model.latent_dim": 16})
    assert np.isfinite(first.metrics["val/loss"]) and first.metrics["train/steps_per_rank"] == STEPS
    assert first.metrics["ddp/param_divergence"] == 0.0
    second = train(
        workdir, "scoehr_score",
        {"model.mlp_width": 32, "model.mlp_blocks": 1, "model.sample_steps": 4, "model.ema_decay": 0.9},
        upstream_run=first.run_id,
    )  # fmt: skip  the default net, small, with a weight average (equal on both ranks)
    assert np.isfinite(second.metrics["val/loss"]) and second.metrics["ddp/param_divergence"] == 0.0
    assert np.isfinite(second.metrics["val/loss_online"]) and second.metrics["val/loss_online"] != second.metrics["val/loss"]
    assert tracking.get_run(second.run_id).data.tags["mirror.upstream_run"] == first.run_id
    before, after = load_state(first.checkpoint_path)["model"], load_state(second.checkpoint_path)["model"]
    for name, tensor in before.items():  # stage 1 did not train
        assert torch.equal(after[f"upstream.{name}"], tensor), name
    assert after["score_ema.n_averaged"].item() == STEPS  # one average per optimizer step

    loaded = load_run(second.run_id)
    context = GenerationContext(female_share=0.5, week_vocab_size=10)
    rows, rejected = loaded.model.sample_rows(40, rng=torch.Generator().manual_seed(0), first_id=schema.SYNTHETIC_ID_OFFSET, context=context)
    # empty_decode = "top1" (default): every draw is a patient, the empty decodes are counted.
    assert rows.schema == schema.ROW_SCHEMA and rows.num_rows == 40 and 0 <= rejected["no_codes_top1"] <= 40
    assert (rows.column(schema.N_EVENTS).to_numpy() >= 1).all()

    # jobs/sample.py --set: another sampler for the same weights; a training knob is refused.
    from mirror import guards

    resampled = load_run(second.run_id, sample_overrides={"model.sampler": "heun", "model.sample_steps": 3, "model.sample_online": True})
    assert (resampled.model.config.sampler, resampled.model.config.sample_steps) == ("heun", 3)
    assert resampled.model.sampling_net is resampled.model.score_net and loaded.model.sampling_net is loaded.model.score_ema.module
    assert loaded.model.config.sampler == "em"
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(resampled.model.state_dict()[name], tensor), name
    with pytest.raises(guards.GuardError, match=r"--set model.ch: not a sampling option of 'scoehr_score' \(these are: model.sampler"):
        guards.check_sample_overrides(second.run_id, tracking.tracking_uri(), ["model.ch=16"])
    with pytest.raises(guards.GuardError, match="ScoEHRScoreConfig.sample_steps: expected an int >= 1"):
        guards.check_sample_overrides(second.run_id, tracking.tracking_uri(), ["model.sample_steps=0"])

    out = workdir / "synthetic"
    report = sample_patients(
        loaded.model, workdir / "data", n_patients=30, out_dir=out, female_share=0.5,
        record_type=get_model_spec("scoehr_score").view.record_type, max_draw_factor=50,
    )  # fmt: skip
    assert report.written == 30
    meta = schema.DatasetMetadata.read(out)
    assert meta.provenance["record_type"] == "code_set" and meta.patients[schema.TRAIN] == 30

    # The sampler bench on the same run, at toy sizes: the reference, every row, the plot.
    import importlib.util
    import json
    from pathlib import Path

    bench_file = Path(__file__).parents[1] / "bench" / "bench_sampler.py"
    spec = importlib.util.spec_from_file_location("bench_sampler", bench_file)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = workdir / "sampler.json"
    rc = bench.main([
        "--run", second.run_id, "--patients", "40", "--reference-steps", "20", "--steps", "2,5",
        "--batch", "16", "--device", "cpu", "--out", str(out), "--log",
    ])  # fmt: skip
    result = json.loads(out.read_text())
    assert rc in (0, 1) and result["reference"]["steps"] == 20 and result["patients"] == 40
    assert [(r["sampler"], r["steps"]) for r in result["rows"]] == [(s, k) for s in ("em", "dpm2m_sde", "dpm2m", "heun") for k in (2, 5)]
    assert all(r["seconds"] > 0 and r["ddm"] >= 0 and 0 <= r["empty_decodes"] <= 1 for r in result["rows"])
    assert out.with_suffix(".png").exists()
    assert "sampler/dpm2m_5/pcd" in tracking.get_run(second.run_id).data.metrics

    # Where the draws sit (bench_scoehr_draws.py --geometry-only, which imports bench_sampler by
    # name), at toy sizes: one geometry per sampler, the decoder's expected codes on both sides.
    monkeypatch.syspath_prepend(str(bench_file.parent))
    spec = importlib.util.spec_from_file_location("bench_scoehr_draws", bench_file.with_name("bench_scoehr_draws.py"))
    draws = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(draws)
    out = workdir / "draws.json"
    assert draws.main(["--run", second.run_id, "--patients", "40", "--samplers", "dpm2m_sde:3", "--geometry-only", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [row["arm"] for row in result["rows"]][3:] == ["as trained (no clipping)", "dpm2m_sde x3"]
    for name in ("em x4", "dpm2m_sde x3"):
        geometry = result["geometry"][name]
        assert geometry["expected_codes_real"] > 0 and geometry["expected_codes_drawn"] > 0, name
        assert geometry["nearest_real_latent_distance_real"] > 0 and geometry["sd_ratio_drawn_over_real_median"] > 0, name
    with pytest.raises(SystemExit, match="not SAMPLER:STEPS"):
        draws.parse_samplers("em50")

    # The GPU run's three steps (bench_scoehr_gpu.py), with the device step at toy sizes on the
    # CPU: a bundle the GPU machine can read with no MLflow or dataset, the sampler bench and
    # the arms trained and drawn from it, and the draws scored by the platform scorecard.
    gpu = importlib.import_module("bench_scoehr_gpu")  # on the path above; its dataclasses need sys.modules
    bundle, device_out = workdir / "bundle", workdir / "device"
    assert gpu.main(["export", "--run", second.run_id, "--out", str(bundle)]) == 0
    assert sorted(p.name for p in bundle.iterdir()) == ["ae", "run.json", "score", "train.npz", "tuning.npz"]
    assert "optimizers" not in load_state(bundle / "score")
    assert gpu.main(["device", "--bundle", str(bundle), "--out", str(device_out), "--tiny", "--patients", "24", "--deadline", "600"]) == 0
    result = json.loads((device_out / "gpu.json").read_text())
    assert result["sampler"]["batch_24"]["reference"]["steps"] == 20
    arms = {a["arm"]["name"]: a for a in result["arms"]}
    assert set(arms) == {"mlp_e1", "unet_s"} and arms["mlp_e1"]["steps"] == arms["mlp_e1"]["epochs"] * (8 * 24 // 16)
    assert all(a["val_dsm"] > 0 and len(a["draws"]) == 2 for a in arms.values())
    cards = workdir / "cards.json"
    rc = gpu.main(["score", "--bundle", str(bundle), "--draws", str(device_out / "draws.npz"), "--real", str(workdir / "data"),
                   "--only", "mlp_e1/emx5", "--out", str(cards)])  # fmt: skip
    card = json.loads(cards.read_text())
    assert rc == 0 and list(card) == ["mlp_e1/emx5"]
    assert card["mlp_e1/emx5"]["fidelity/code_vector/n_sample"] > 0 and "privacy/gate_passed" in card["mlp_e1/emx5"]
