"""Why MiranDa's optimisation phase costs accuracy: a diagnosis on a small simulation.

    python bench/bench_miranda_phase.py --data /tmp/i16-data/sim20k --epochs 8

One process, no Ray Train (the training split read once through the ``admissions`` view and
held as batches): the supervised arm and the optimisation arm from the same initialisation,
on the same batches in the same order, with Adam at a constant learning rate. It measures:

* per epoch, on the tuning split: Jaccard, precision, recall, mean regimen size, retrieved ELOS
  and the TRUE expected stay of the recommended regimen (simulator ground truth);
* per gated step of the optimisation arm, on its batch, before and after the step (the λ·BCE
  step and the inner P_RL steps): mean probability of the given classes and of the others,
  regimen size, precision, BCE, retrieved and soft H_B; how many inner steps ran (the cap?);
* where P_RL's gradient points: ``-dP_RL/dα̂`` (the descent direction on the scores) summed over
  given classes and over the others;
* how much the retrieved ELOS depends on the regimen at all: on the tuning split, the
  retrieved ELOS of the model's regimen, the given one, the floor's, a random one of the same
  size, and the mean LOS of all valid candidates (what ELOS is when top-K keeps them all);
* which classes the optimisation arm over-predicts, and their training-split mean LOS.

Writes ``bench/results/miranda_phase.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mirror.cluster import ensure_ray
from mirror.data import schema
from mirror.data.views.admissions import AdmissionBatch, AdmissionsView, AdmissionsViewConfig
from mirror.evaluation.recommender import stay_truth, true_length_of_stay
from mirror.models import build_model
from mirror.models.local_step import LocalStepContext
from mirror.models.miranda import Miranda, retrieved_elos, soft_elos


def batch_state(model: Miranda, batch: AdmissionBatch) -> dict[str, float]:
    """The batch's accuracy and H_B under the model's current scores (eval mode, no grad)."""
    model.eval()
    with torch.no_grad():
        logits = model(batch).float()
        scores = torch.sigmoid(logits)
        truth = batch.target.bool()
        predicted = scores >= 0.5
        elos, has = retrieved_elos(scores, batch, model.config.top_k, model.config.min_cosine)
        soft, soft_has = soft_elos(scores, batch, model.config.temperature)
        los = batch.los.float()
        out = {
            "p_given": float(scores[truth].mean()), "p_other": float(scores[~truth].mean()),
            "size": float(predicted.sum(1).float().mean()),
            "precision": float((predicted & truth).sum() / predicted.sum().clamp(min=1)),
            "bce": float(F.binary_cross_entropy_with_logits(logits, batch.target)),
            "h_b": float((elos - los)[has].mean()), "soft_h_b": float((soft - los)[soft_has].mean()),
        }
    model.train()
    return out


def descent_on_scores(model: Miranda, batch: AdmissionBatch) -> dict[str, float]:
    """``-dP_RL/dα̂``: how one descent step on P_RL alone would move the scores."""
    model.eval()
    with torch.no_grad():
        scores = torch.sigmoid(model(batch).float())
    model.train()
    scores = scores.clone().requires_grad_(True)
    h_b, mean_elos, n = model.excess(scores, batch)
    p_rl, _ = model.perturbation(scores, batch, h_b, mean_elos, n)
    (grad,) = torch.autograd.grad(p_rl, scores)
    move, truth = -grad, batch.target.bool()
    return {"to_given_sum": float(move[truth].sum()), "to_other_sum": float(move[~truth].sum()),
            "to_given_mean": float(move[truth].mean()), "to_other_mean": float(move[~truth].mean()),
            "share_of_other_raised": float((move[~truth] > 0).float().mean())}


def evaluate(model: Miranda, batches: list[AdmissionBatch], root: str, frequency: np.ndarray) -> dict[str, float]:
    """Tuning-split accuracy, retrieved ELOS of several regimens, and the true stay."""
    model.eval()
    rng = np.random.default_rng(0)
    sums: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for batch in batches:
            scores = torch.sigmoid(model(batch).float())
            predicted = scores >= 0.5
            k = max(1, round(float(batch.target.sum(1).float().mean())))
            floor = torch.zeros_like(scores)
            floor[:, np.argsort(-frequency)[:k]] = 1
            random = torch.zeros_like(scores)
            random.scatter_(1, torch.as_tensor(rng.integers(0, scores.shape[1], (scores.shape[0], k))), 1.0)
            regimens = {"model": scores, "given": batch.target.float(), "floor": floor, "random": random}
            for name, reg in regimens.items():
                elos, has = retrieved_elos(reg, batch, model.config.top_k, model.config.min_cosine)
                sums.setdefault(f"elos/{name}", []).append(torch.where(has, elos, torch.nan).numpy())
            valid = batch.candidate_valid.float()
            all_mean = (batch.candidate_los.float() * valid).sum(1) / valid.sum(1).clamp(min=1)
            sums.setdefault("elos/all_candidates", []).append(torch.where(valid.sum(1) > 0, all_mean, torch.nan).numpy())
            sums.setdefault("valid_candidates", []).append(valid.sum(1).numpy())
            truth = batch.target.bool()
            both, either = (predicted & truth).sum(1).float(), (predicted | truth).sum(1).float()
            sums.setdefault("jaccard", []).append(torch.where(either > 0, both / either.clamp(min=1), 1.0).numpy())
            sums.setdefault("precision", []).append(torch.where(predicted.sum(1) > 0, both / predicted.sum(1).clamp(min=1), 0.0).numpy())
            sums.setdefault("recall", []).append(torch.where(truth.sum(1) > 0, both / truth.sum(1).clamp(min=1), 1.0).numpy())
            sums.setdefault("size", []).append(predicted.sum(1).float().numpy())
            sums.setdefault("los", []).append(batch.los.float().numpy())
            sums.setdefault("_subject", []).append(batch.subject_id.numpy())
            sums.setdefault("_stay", []).append(batch.stay.numpy())
            sums.setdefault("_regimen", []).append(predicted.numpy())
    model.train()
    cat = {k: np.concatenate(v) for k, v in sums.items()}
    out = {k: float(np.nanmean(v)) for k, v in cat.items() if not k.startswith("_")}
    truth = stay_truth(root, schema.TUNING, cat["_subject"], cat["_stay"])
    out["true_los"] = float(true_length_of_stay(root, truth, {"model": cat["_regimen"]})["model"].mean())
    return out


def class_report(model: Miranda, batches: list[AdmissionBatch], train_batches: list[AdmissionBatch], top: int = 8) -> list[dict]:
    """Classes the model predicts most often beyond their given rate, with their training LOS."""
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([(torch.sigmoid(model(b).float()) >= 0.5).float() for b in batches]).mean(0)
    model.train()
    given = torch.cat([b.target for b in batches]).mean(0)
    target = torch.cat([b.target for b in train_batches])
    los = torch.cat([b.los.float() for b in train_batches])
    with_class = (target * los[:, None]).sum(0) / target.sum(0).clamp(min=1)
    order = torch.argsort(predicted - given, descending=True)[:top]
    return [{"class": int(c), "predicted_rate": float(predicted[c]), "given_rate": float(given[c]),
             "train_mean_los_with_class": float(with_class[c]), "train_mean_los": float(los.mean())} for c in order]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="model config overrides, both arms")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "miranda_phase.json"))
    args = parser.parse_args(argv)
    overrides = {k: json.loads(v) if v[:1] in "0123456789-[{" else v for k, v in (s.split("=", 1) for s in args.set)}
    started = time.time()
    ensure_ray()
    view = AdmissionsView(AdmissionsViewConfig(), args.data)
    train_ds, _ = view.read(schema.TRAIN)
    tune_ds, _ = view.read(schema.TUNING)
    train_batches = list(view.batches(train_ds, args.batch_size, training=False, device="cpu"))
    val_batches = list(view.batches(tune_ds, 512, training=False, device="cpu"))
    frequency = torch.cat([b.target for b in train_batches]).mean(0).numpy()
    torch.manual_seed(args.seed)
    base = build_model("miranda", {**overrides, "phase": "supervised"}, view.info())
    arms = {"supervised": base, "optimise": copy.deepcopy(base)}
    arms["optimise"].config = type(base.config)(**{**base.config.__dict__, "phase": "optimise"})
    contexts = {name: LocalStepContext(m, m.make_optimizers(), 1.0) for name, m in arms.items()}
    curves: dict[str, list[dict[str, float]]] = {name: [] for name in arms}
    gated: list[dict[str, float]] = []
    direction: list[dict[str, float]] = []
    rng = np.random.default_rng(args.seed)
    for epoch in range(args.epochs):
        order = rng.permutation(len(train_batches))
        gates = inner = 0.0
        for i in order:
            batch = train_batches[i]
            contexts["supervised"].train_step(batch)
            model = arms["optimise"]
            before = batch_state(model, batch)
            if len(direction) < 40 and before["h_b"] >= model.config.threshold:
                direction.append({"epoch": epoch, **descent_on_scores(model, batch)})
            metrics = contexts["optimise"].train_step(batch)
            gates += metrics["gate"]
            inner += metrics["inner_steps"]
            if metrics["gate"]:
                after = batch_state(model, batch)
                gated.append({"epoch": epoch, "inner_steps": metrics["inner_steps"],
                              **{f"delta_{k}": after[k] - before[k] for k in before}, "h_b_before": before["h_b"]})
        for name, model in arms.items():
            curves[name].append({"epoch": epoch + 1, **evaluate(model, val_batches, args.data, frequency)})
        curves["optimise"][-1].update({"gate_rate": gates / len(order), "inner_steps_per_step": inner / len(order)})
        print(f"epoch {epoch + 1}: " + "  ".join(f"{n} jaccard {c[-1]['jaccard']:.3f} prec {c[-1]['precision']:.3f} "
                                                 f"size {c[-1]['size']:.2f} true_los {c[-1]['true_los']:.3f}" for n, c in curves.items()), flush=True)
    summary = {
        "gated_steps": len(gated),
        "gated_steps_at_cap": int(sum(g["inner_steps"] >= arms["optimise"].config.max_inner_steps for g in gated)),
        "gated_mean": {k: float(np.mean([g[k] for g in gated])) for k in (gated[0] if gated else {}) if k != "epoch"},
        # the first epoch starts from sigmoid(0) = 0.5 everywhere (size ~ all classes): apart
        "gated_mean_after_epoch_1": {k: float(np.mean([g[k] for g in gated if g["epoch"] > 0]))
                                     for k in (gated[0] if gated else {}) if k != "epoch"},
        "p_rl_descent_on_scores_mean": {k: float(np.mean([d[k] for d in direction])) for k in (direction[0] if direction else {}) if k != "epoch"},
    }
    result = {"gated_step_rows": gated, "data": args.data, "epochs": args.epochs, "batch_size": args.batch_size, "train_batches": len(train_batches),
              "val_examples": sum(b.size for b in val_batches), "seed": args.seed, "overrides": overrides,
              "config": {k: getattr(arms["optimise"].config, k) for k in ("decay", "threshold", "confidence", "blend", "gate", "p_rl",
                                                                         "normaliser", "temperature", "top_k", "max_inner_steps", "lr")},
              "pool_size": view.config.pool_size, "curves": curves, "summary": summary,
              "over_predicted_classes": {n: class_report(m, val_batches, train_batches) for n, m in arms.items()},
              "seconds": time.time() - started, "load_average": os.getloadavg()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return result


if __name__ == "__main__":
    main()
