"""ScoEHR acceptance at a size the machine allows (``make bench-scoehr``): both stages trained
through ``run_training``, the sample scored behind the privacy gate, per-stage throughput at 1
and 2 workers, and the sampler benchmark (bench/bench_sampler.py) on the trained run.

    python bench/bench_scoehr.py [--patients 200000] [--work DIR] [--ae-epochs 20]
        [--score-epochs 30] [--sample 10240] [--sampler-patients 10240] [--set key=value ...]

Defaults are the issue's sizes (200K simulated patients, 10,240 samples); on a small CPU box
pass smaller ones and report them. ``--set`` adds score-network overrides (``model.ch=16``).
Results: bench/results/scoehr.json (and sampler.json / sampler.png from the sampler bench).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=200_000)
    parser.add_argument("--work", default="/tmp/mirror-bench-scoehr")
    parser.add_argument("--ae-epochs", type=int, default=20)
    parser.add_argument("--score-epochs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--sample", type=int, default=10_240)
    parser.add_argument("--sampler-patients", type=int, default=10_240)
    parser.add_argument("--sampler-steps", default="5,10,25,50")
    parser.add_argument("--throughput-steps", type=int, default=15)
    parser.add_argument("--set", nargs="*", default=[], help="score-network overrides, model.key=value")
    parser.add_argument("--ae-lr", type=float, default=None, help="stage 1 lr (default: scoehr_ae's own, 3e-2)")
    parser.add_argument("--latent-dim", type=int, default=None, help="stage 1 latent width (default: scoehr_ae's own, 64; the paper 144)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-sampler", action="store_true")
    parser.add_argument("--ae-run", help="reuse this trained scoehr_ae run (skip stage 1)")
    parser.add_argument("--score-run", help="reuse this trained scoehr_score run (skip stage 2)")
    parser.add_argument("--out", default=str(HERE / "results" / "scoehr.json"))
    args = parser.parse_args(argv)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"

    from mirror import tracking
    from mirror.checkpoint import load_run
    from mirror.cluster import ensure_ray
    from mirror.data.simulator import generate_dataset
    from mirror.metrics.privacy import privacy_gate
    from mirror.metrics.scorecard import ScorecardError, compute_scorecard
    from mirror.synthesize import female_fraction, sample_patients
    from mirror.train.driver import run_training
    from mirror.train.spec import build_run_spec, parse_set

    ensure_ray()
    data = work / "data"
    clock = time.perf_counter()
    if not (data / "metadata" / "dataset.json").exists():
        generate_dataset(data, args.patients, seed=0)
    result: dict = {"patients": args.patients, "generate_s": time.perf_counter() - clock, "args": vars(args)}
    score_overrides = parse_set(args.set)
    ae_overrides = {} if args.latent_dim is None else {"model.latent_dim": args.latent_dim}

    def train(model: str, name: str, overrides: dict, upstream: str | None = None, **train_keys):
        base = {
            "train.batch_size": args.batch, "train.workers": args.workers, "train.cpus_per_worker": 1.0,
            "train.storage_path": str(work / "ray_results"), "train.log_every_steps": 0,
            "train.score_synthetic": False,
        } | {f"train.{k}": v for k, v in train_keys.items()}  # fmt: skip
        spec = build_run_spec(model, str(data), name, base | overrides, upstream_run=upstream)
        began = time.perf_counter()
        outcome = run_training(spec)
        print(f"{name}: run {outcome.run_id} in {time.perf_counter() - began:.0f}s; {json.dumps({k: v for k, v in outcome.metrics.items() if k.startswith(('val/', 'train/loss', 'train/patients_per_s'))})}", flush=True)
        return outcome

    def finished(run_id: str) -> SimpleNamespace:
        return SimpleNamespace(run_id=run_id, metrics=dict(tracking.get_run(run_id).data.metrics))

    if args.ae_run:
        ae = finished(args.ae_run)
    else:
        ae_config = ae_overrides | ({} if args.ae_lr is None else {"model.lr": args.ae_lr})
        ae = train("scoehr_ae", "scoehr-ae", ae_config, epochs=args.ae_epochs)
    if args.score_run:
        score = finished(args.score_run)
    else:
        score = train("scoehr_score", "scoehr-score", score_overrides, upstream=ae.run_id, epochs=args.score_epochs)
    result["runs"] = {"ae": ae.run_id, "score": score.run_id}
    result["ae"] = {k: v for k, v in ae.metrics.items() if k.startswith(("val/", "train/"))}
    result["score"] = {k: v for k, v in score.metrics.items() if k.startswith(("val/", "train/"))}

    # The sample job's path (sample, score, gate), keeping the partial scorecard if some
    # fidelity metric is undefined for this sample (reported under "scorecard_errors").
    began = time.perf_counter()
    loaded = load_run(score.run_id)
    staging = work / "sample"
    shutil.rmtree(staging, ignore_errors=True)
    report = sample_patients(
        loaded.model, loaded.spec.data, n_patients=args.sample, out_dir=staging,
        female_share=female_fraction(loaded.spec.data), record_type=loaded.model_spec.view.record_type,
    )  # fmt: skip
    result["sample"] = {"written": report.written, "drawn": report.drawn, "rejected": report.rejected, "seconds": time.perf_counter() - began}
    try:
        card = compute_scorecard(loaded.spec.data, staging, max_queries=20_000, seed=0)
    except ScorecardError as err:
        card, result["scorecard_errors"] = err.partial, err.errors
    gate = privacy_gate(card)
    keep = ("fidelity/code_vector/", "utility/code_vector/", "privacy/mia/", "privacy/exact_match/", "privacy/dcr/closer", "fidelity/prevalence/")
    result["scorecard"] = {k: v for k, v in card.items() if any(k.removeprefix("reference/ceiling/").removeprefix("reference/floor/").startswith(p) for p in keep)}
    result["gate"] = {"passed": gate.passed, "failures": gate.failures}
    print(f"gate passed: {gate.passed} {gate.failures}", flush=True)

    throughput = {}
    for model, overrides, upstream in () if args.skip_throughput else (("scoehr_ae", ae_overrides, None), ("scoehr_score", score_overrides, ae.run_id)):
        for workers in (1, 2):
            outcome = train(
                model, f"{model}-throughput-{workers}", overrides, upstream=upstream, epochs=2,
                max_steps_per_epoch=args.throughput_steps, workers=workers,
            )  # fmt: skip
            history = sorted(tracking.metric_history(outcome.run_id, "train/patients_per_s"))
            throughput[f"{model}/workers_{workers}"] = history[-1][1]  # the second epoch
    result["throughput_patients_per_s"] = throughput

    if not args.skip_sampler:
        from bench_sampler import main as sampler_main

        sampler_out = HERE / "results" / "sampler.json"
        rc = sampler_main([
            "--run", score.run_id, "--patients", str(args.sampler_patients), "--steps", args.sampler_steps,
            "--out", str(sampler_out), "--log",
        ])  # fmt: skip
        result["sampler"] = json.loads(sampler_out.read_text())
        result["sampler_meets_20x"] = rc == 0
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
