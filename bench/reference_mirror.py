"""The digital-mirror reference run (issue 11): 200K simulated patients, AE and WAE trained on 2
CPU workers within about an hour on 2 cores, every acceptance target checked beside its floor.

    make reference-mirror
    python bench/reference_mirror.py [--patients N] [--epochs E] [--max-steps S] [--batch-size B]
        [--models ae wae] [--reuse MODEL=RUN_ID ...] [--set MODEL:KEY=VALUE ...] [--out FILE]

``--reuse`` takes a model's row from a finished run of this experiment instead of training it
again (its own epochs are read from the run, not assumed): the targets compare both models,
so a re-run of one model can be checked against the other's recorded run. ``--set`` overrides
one model's config (``wae:model.latent_penalty=mmd``), recorded with its row; ``--out`` writes
such a variant beside the reference instead of over it.

Both runs are recorded in MLflow (experiment ``reference-mirror``, store ``MLFLOW_TRACKING_URI``
or ``/tmp/mirror-reference/mlflow.db``) with the end-of-run evaluation and the synthetic-data
scorecard; the figures and the verdict per target go to ``bench/results/reference_mirror.json``.
A missed target is reported as missed, with its figure and its floor: nothing is tuned here to
pass.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "reference_mirror.json"
WORK = Path("/tmp/mirror-reference")


def train_and_evaluate(model: str, data: Path, args: argparse.Namespace, settings: dict[str, object]) -> dict[str, float]:
    from mirror import tracking
    from mirror.evaluation import evaluate_run
    from mirror.train.driver import run_training
    from mirror.train.spec import build_run_spec

    overrides = {
        "train.workers": 2,
        "train.epochs": args.epochs,
        "train.batch_size": args.batch_size,
        "train.max_steps_per_epoch": args.max_steps,
        "train.val_max_batches": 10,
        "train.eval_patients": 5_000,
        "train.n_generate": 2_000,
        "train.storage_path": str(WORK / "ray_results"),
        "train.experiment": "reference-mirror",
    } | settings
    spec = build_run_spec(model, str(data), f"reference-{model}-{time.strftime('%Y%m%d-%H%M%S')}", overrides)
    start = time.perf_counter()
    outcome = run_training(spec)
    trained = time.perf_counter() - start
    evaluate_run(outcome.run_id, synthetic=True)
    metrics = dict(tracking.get_run(outcome.run_id).data.metrics)
    metrics["seconds/train"] = trained
    metrics["seconds/total"] = time.perf_counter() - start
    metrics["run_id"] = outcome.run_id  # type: ignore[assignment]
    metrics["settings"] = settings  # type: ignore[assignment]
    return metrics


def finished_run_metrics(run_id: str) -> dict[str, float]:
    """A recorded reference run's metrics, with the training budget it actually had."""
    from mirror import tracking

    run = tracking.get_run(run_id)
    if run.info.status != "FINISHED":
        raise SystemExit(f"--reuse {run_id}: the run is {run.info.status}, not FINISHED")
    metrics = dict(run.data.metrics)
    metrics["run_id"] = run_id  # type: ignore[assignment]
    metrics["reused"] = 1.0
    metrics["epochs"] = float(run.data.params.get("train.epochs", "nan"))
    return metrics


def target(name: str, value: float, ok: bool, floor: str) -> dict[str, object]:
    return {"target": name, "value": value, "met": bool(ok) and not math.isnan(value), "against": floor}


def checks(ae: dict[str, float], wae: dict[str, float]) -> list[dict[str, object]]:
    """The issue's acceptance targets, each with the figure and the floor it is held against."""
    nan = float("nan")
    out = [
        target("AE tf_acc > copy-previous", ae.get("eval/recon/tf_acc", nan),
               ae.get("eval/recon/tf_acc", nan) > ae.get("baseline/copy_prev/recon/tf_acc", nan),
               f"copy_prev {ae.get('baseline/copy_prev/recon/tf_acc', nan):.4f}"),
        target("AE tf_acc > unigram", ae.get("eval/recon/tf_acc", nan),
               ae.get("eval/recon/tf_acc", nan) > ae.get("baseline/recon/tf_acc", nan),
               f"unigram {ae.get('baseline/recon/tf_acc', nan):.4f}"),
        target("AE shuffled-z control clearly lower", ae.get("baseline/shuffled_z/recon/tf_acc", nan),
               ae.get("eval/recon/tf_acc", nan) - ae.get("baseline/shuffled_z/recon/tf_acc", nan) >= 0.02,
               f"own z {ae.get('eval/recon/tf_acc', nan):.4f} (margin 0.02)"),
        target("AE greedy length_acc >= 0.5", ae.get("eval/recon/length_acc", nan),
               ae.get("eval/recon/length_acc", nan) >= 0.5, "0.5"),
    ]  # fmt: skip
    for task in ("interp", "extrap"):
        value = ae.get(f"eval/{task}/top5", nan)
        floors = (ae.get(f"baseline/{task}/top5", nan), ae.get(f"baseline/copy_prev/{task}/top5", nan))
        out.append(target(f"AE {task} top5 beats both floors", value, value > max(floors),
                          f"unigram {floors[0]:.4f}, copy_prev {floors[1]:.4f}"))  # fmt: skip
    out += [
        target("WAE mean abs(E z) < 0.5", wae.get("eval/latent/z_mean_abs", nan), wae.get("eval/latent/z_mean_abs", nan) < 0.5, "0.5"),
        target("WAE z variance in [0.5, 2]", wae.get("eval/latent/z_var", nan), 0.5 <= wae.get("eval/latent/z_var", nan) <= 2, "[0.5, 2]"),
        target("WAE latent MMD < AE's", wae.get("eval/latent/mmd", nan),
               wae.get("eval/latent/mmd", nan) < ae.get("eval/latent/mmd", nan), f"AE {ae.get('eval/latent/mmd', nan):.4f}"),
        target("WAE sex AUROC from z <= 0.6", wae.get("eval/latent/sex_auroc", nan), wae.get("eval/latent/sex_auroc", nan) <= 0.6, "0.6"),
    ]  # fmt: skip
    for name, m in (("AE", ae), ("WAE", wae)):
        out += [
            target(f"{name} generation validity >= 0.95", m.get("eval/gen/validity", nan), m.get("eval/gen/validity", nan) >= 0.95, "0.95"),
            target(f"{name} prevalence r >= 0.9", m.get("eval/gen/prevalence_r", nan), m.get("eval/gen/prevalence_r", nan) >= 0.9,
                   f"unigram {m.get('baseline/gen/prevalence_r', nan):.4f}"),
            target(f"{name} scorecard ran and the privacy gate passed", m.get("privacy/gate_passed", nan),
                   m.get("privacy/gate_passed", 0.0) == 1.0, "1"),
            target(f"{name} truth R2 >= bag-of-conditions probe", m.get("eval/latent/truth_r2", nan),
                   m.get("eval/latent/truth_r2", nan) >= m.get("baseline/latent/truth_r2", nan),
                   f"probe {m.get('baseline/latent/truth_r2', nan):.4f}"),
        ]  # fmt: skip
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=200_000)
    parser.add_argument("--epochs", type=int, default=1, help="full passes over the train split")
    parser.add_argument("--max-steps", type=int, default=0, help="cap on steps per epoch (0: a full pass)")
    parser.add_argument("--batch-size", type=int, default=256, help="patients per worker per step")
    parser.add_argument("--models", nargs="+", default=["ae", "wae"])
    parser.add_argument("--reuse", nargs="*", default=[], metavar="MODEL=RUN_ID",
                        help="take MODEL's row from this finished run instead of training it")
    parser.add_argument("--set", nargs="*", default=[], metavar="MODEL:KEY=VALUE", dest="settings",
                        help="a config override for one model's run, e.g. wae:model.latent_penalty=mmd")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    reuse = dict(item.split("=", 1) for item in args.reuse)
    from mirror.train.spec import parse_set

    settings: dict[str, dict[str, object]] = {model: {} for model in args.models}
    for item in args.settings:
        model, _, assignment = item.partition(":")
        if model not in settings or "=" not in assignment:
            raise SystemExit(f"--set {item!r}: expected MODEL:KEY=VALUE with MODEL one of {args.models}")
        settings[model].update(parse_set([assignment]))  # typed as jobs/train.py types --set

    from mirror.cluster import ensure_ray
    from mirror.data import schema
    from mirror.data.simulator import generate_dataset

    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{WORK / 'mlflow.db'}")
    ensure_ray(min_logical_cpus=5)
    data = WORK / f"data-{args.patients}"
    if not (data / schema.DATASET_JSON).exists():
        generate_dataset(data, args.patients, seed=0, overwrite=True)
    runs = {model: finished_run_metrics(reuse[model]) if model in reuse else train_and_evaluate(model, data, args, settings[model])
            for model in args.models}
    result = {
        "patients": args.patients,
        "epochs": args.epochs,
        "max_steps_per_epoch": args.max_steps,
        "batch_size_per_worker": args.batch_size,
        "workers": 2,
        "cpus": os.cpu_count(),
        "runs": runs,
        "targets": checks(runs.get("ae", {}), runs.get("wae", {})) if {"ae", "wae"} <= set(runs) else [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    for row in result["targets"]:
        print(f"{'MET ' if row['met'] else 'MISS'}  {row['target']}: {row['value']:.4f} (against {row['against']})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
