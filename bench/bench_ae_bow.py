"""Bag-of-words loss from z (``model.bow_weight``, Zhao et al. 2017) against the truth-recovery
floor (issue 11): does a head that makes z predict the sentence's conditions lift the ridge
probe from z to the simulator's latent state up to the bag-of-conditions probe?

    OMP_NUM_THREADS=1 nice -n 10 python bench/bench_ae_bow.py [--weights 0 1 5] [--steps 1000]

One process, one torch thread, no Ray: the dataset is simulated in-process (``write_chunk``,
one chunk, default ``SimulatorParams``), and each arm trains the AE at its defaults (the
reference run's decoder: factorised softmax, z at every step, ``copy_history``; and the
presence bag with ``ConditionBag``; ``--set bow_target=counts --set encoder_bag=false`` is the
model before them) through
``LocalStepContext`` on the same batches in the same order from the same initial weights
(the BoW head is drawn after them), with the training loop's schedule and clipping. Each arm is
then scored on the unseen patients (tuning and held-out splits) as the evaluation scores them:
``ridge_r2_cv`` from standardised z and from the unscaled ``sentence_features`` (the floor;
the same patients and folds for every arm), over the whole latent and per simulator factor
(frailty and the seven organ-system clusters: which of them z recovers); the same probe from z to the condition counts
themselves (how much of the floor's input z carries linearly); the probe from the first
``latent_dim`` principal components of the bag, as counts and as presence (what a linear
compression to z's width keeps: :func:`bag_pca_truth_r2`); teacher-forced NLL per token
and condition-age word accuracy from the clean encoder input, with z and with z rolled
across patients.
``--set key=value`` (repeatable) sets any other AE config field for every arm, e.g.
``--set latent_dim=128``; the overrides are recorded in the output. Writes
``bench/results/ae_bow.json`` unless ``--out``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from bench_train import plain_batches
from results_file import write_results
from sklearn.decomposition import PCA

from mirror.data import schema
from mirror.data.batch import SequenceInfo
from mirror.data.collate import CollateConfig, MaskSpec
from mirror.data.simulator import PARAMS_JSON, SimulatorParams, write_chunk
from mirror.data.vocab import N_CONDITIONS, PAD
from mirror.metrics.evaluate import EvalConfig, load_ground_truth, sentence_features
from mirror.metrics.tasks import ridge_r2_cv, ridge_r2_cv_by_dimension
from mirror.models import build_model
from mirror.models.local_step import LocalStepContext
from mirror.train.schedule import make_schedulers
from mirror.train.spec import TrainConfig, parse_set

RESULTS = Path(__file__).parent / "results" / "ae_bow.json"
UNSEEN = (schema.TUNING, schema.HELD_OUT)


def simulate(root: Path, patients: int, seed: int) -> int:
    """A dataset of ``patients`` (ids 0..N-1) in one chunk, written in this process; the
    number of weeks. Reused when present."""
    params = SimulatorParams.from_seed(seed)
    if not schema.split_files(root, schema.HELD_OUT):
        write_chunk(params, seed, str(root), 0, 0, patients, row_group=8192)
    if not (root / schema.GROUND_TRUTH_DIR / PARAMS_JSON).exists():  # the factors' names
        params.save(root / schema.GROUND_TRUTH_DIR)
    return params.n_weeks


def unseen_batches(root: Path, n_weeks: int, limit: int, batch_size: int = 256):
    """Clean (unmasked) batches of the unseen splits, the first ``limit`` patients."""
    seen = 0
    for split in UNSEEN:
        for batch in plain_batches(root, CollateConfig(n_weeks), split, batch_size=batch_size, forever=False):
            if seen >= limit:
                return
            yield batch
            seen += batch.size


def word_hits(model, batch, z: torch.Tensor, valid: torch.Tensor) -> float:
    """Teacher-forced condition-age words predicted right from ``z``, over the valid positions."""
    dx_logits, _ = model.teacher_forced_logits(batch, z)
    return float((dx_logits.argmax(-1) == batch.tgt_dx)[valid].sum())


@torch.no_grad()
def score(model, root: Path, n_weeks: int, limit: int) -> dict[str, object]:
    """z, floor features and ids of the unseen patients; teacher-forced NLL/token and word
    accuracy with the patient's own z and with z rolled by one row."""
    model.eval()
    zs, feats, ids = [], [], []
    nll = tokens = right = right_rolled = 0.0
    for batch in unseen_batches(root, n_weeks, limit):
        sums = model.eval_sums(batch)
        nll, tokens = nll + float(sums["nll_dx"] + sums["nll_wk"]), tokens + float(sums["tokens"])
        z = model.encode(batch)
        valid = batch.tgt_dx != PAD
        right += word_hits(model, batch, z, valid)
        right_rolled += word_hits(model, batch, z.roll(1, dims=0), valid)
        zs.append(z.float().numpy())
        feats.append(sentence_features(batch).numpy())
        ids.append(batch.subject_id.numpy())
    model.train()
    return {"z": np.concatenate(zs), "features": np.concatenate(feats), "ids": np.concatenate(ids),
            "nll_per_token": nll / tokens, "tf_acc": right / tokens, "tf_acc_rolled_z": right_rolled / tokens,
            "tokens": tokens}


def bag_pca_truth_r2(features: np.ndarray, truth: np.ndarray, width: int, eval_cfg: EvalConfig) -> dict[str, float]:
    """The truth probe from the bag of conditions compressed linearly to z's width: its first
    ``width`` principal components, of the counts and of the presence (each condition once).
    What a z holding the bag's leading directions could reach, and which bag holds the truth:
    the counts' variance is mostly chronic conditions recurring, the presence's is which
    conditions a patient has. PCA is fitted on these same unseen patients (unsupervised)."""
    counts = features[:, :N_CONDITIONS].astype(np.float64)
    out = {}
    for name, bag in (("counts", counts), ("presence", (counts > 0).astype(np.float64))):
        components = PCA(width, random_state=eval_cfg.seed).fit_transform(bag)
        out[f"pca{width}_{name}"] = round(ridge_r2_cv(components, truth, folds=eval_cfg.cv_folds, seed=eval_cfg.seed), 4)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/bow/sim60k"))
    parser.add_argument("--patients", type=int, default=60_000, help="simulated (5 %% held out, 5 %% tuning)")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0, 5.0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eval-patients", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="another AE config field for every arm (repeatable), e.g. latent_dim=128")
    args = parser.parse_args()
    try:
        overrides = parse_set(args.set)
    except ValueError as err:
        parser.error(str(err))
    if "bow_weight" in overrides:
        parser.error("bow_weight is set per arm by --weights")
    torch.set_num_threads(1)
    began = time.perf_counter()
    n_weeks = simulate(args.data, args.patients, seed=0)
    info = SequenceInfo(week_vocab_size=n_weeks + 3)
    print(f"[bow] data ready ({time.perf_counter() - began:.0f} s)", flush=True)

    defaults, eval_cfg = TrainConfig(), EvalConfig()
    arms: dict[str, dict[str, object]] = {}
    floor: dict[str, float] = {}
    for weight in args.weights:
        start = time.perf_counter()
        torch.manual_seed(0)
        model = build_model("ae", {**overrides, "bow_weight": weight}, info)  # the head is built last
        optimizers = model.make_optimizers()
        schedulers = make_schedulers(optimizers, args.steps, defaults.warmup_fraction, defaults.min_lr_ratio)
        ctx = LocalStepContext(model, optimizers, grad_clip=defaults.grad_clip, schedulers=schedulers)
        batches = plain_batches(args.data, CollateConfig(n_weeks, mask=MaskSpec("training")),
                                batch_size=args.batch_size)  # the same batches, in order, per arm
        history = [ctx.train_step(next(batches)) for _ in range(args.steps)]
        train_s = time.perf_counter() - start
        s = score(model, args.data, n_weeks, args.eval_patients)
        ground_truth = load_ground_truth(args.data, s["ids"])
        truth = ground_truth.lookup(s["ids"])
        r2, r2_by_factor = ridge_r2_cv_by_dimension(s["z"].astype(np.float64), truth, folds=eval_cfg.cv_folds,
                                                    seed=eval_cfg.seed)
        names = [ground_truth.factor_name(k) for k in range(truth.shape[1])]
        # How much of the floor's own input (the condition counts) a linear read of z recovers.
        counts_r2 = ridge_r2_cv(s["z"].astype(np.float64), s["features"][:, :N_CONDITIONS].astype(np.float64),
                                folds=eval_cfg.cv_folds, seed=eval_cfg.seed)
        if not floor:  # the same patients for every arm: one floor
            floor_r2, floor_by_factor = ridge_r2_cv_by_dimension(
                s["features"].astype(np.float64), truth, folds=eval_cfg.cv_folds, seed=eval_cfg.seed, standardize=False)
            floor = {"truth_r2": floor_r2, "patients": int(len(s["ids"])),
                     "truth_r2_by_factor": {n: round(float(v), 4) for n, v in zip(names, floor_by_factor, strict=True)},
                     "bag_pca": bag_pca_truth_r2(s["features"], truth, model.config.latent_dim, eval_cfg)}
        last = history[-20:]
        arms[f"bow_weight={weight:g}"] = {
            "bow_weight": weight,
            "truth_r2_z": round(r2, 4),
            "truth_r2_z_by_factor": {n: round(float(v), 4) for n, v in zip(names, r2_by_factor, strict=True)},
            "condition_counts_r2_z": round(counts_r2, 4),
            "nll_per_token": round(s["nll_per_token"], 4),
            "tf_acc": round(s["tf_acc"], 4),
            "tf_acc_rolled_z": round(s["tf_acc_rolled_z"], 4),
            "z_var": round(float(s["z"].var(0).mean()), 4),
            "train_loss_last20": round(float(np.mean([m["loss"] for m in last])), 4),
            "train_bow_last20": round(float(np.mean([m["bow"] for m in last])), 4) if weight > 0 else None,
            "train_seconds": round(train_s, 1),
        }
        print(f"[bow] weight {weight:g}: truth R2 z {r2:.4f} (floor {floor['truth_r2']:.4f}), counts R2 z {counts_r2:.4f}, "
              f"nll/token {s['nll_per_token']:.3f}, tf_acc {s['tf_acc']:.4f} (rolled z {s['tf_acc_rolled_z']:.4f}), "
              f"train {train_s:.0f} s", flush=True)
        print("[bow]   by factor, z / floor: " + ", ".join(
            f"{n} {arms[f'bow_weight={weight:g}']['truth_r2_z_by_factor'][n]:.3f} / {floor['truth_r2_by_factor'][n]:.3f}"
            for n in names), flush=True)
    result = {
        "bench": "ae_bow",
        "patients_simulated": args.patients, "eval_patients": floor["patients"], "eval_splits": list(UNSEEN),
        "steps": args.steps, "batch_size": args.batch_size, "torch_threads": 1,
        "model": "ae defaults (factorised, z_every_step, copy_history, bow_target presence, encoder_bag) + bow_weight",
        "config_overrides": overrides,
        "floor_truth_r2": round(floor["truth_r2"], 4),
        "floor_truth_r2_by_factor": floor["truth_r2_by_factor"],
        "bag_pca_truth_r2": floor["bag_pca"],
        "arms": arms,
        "wall_seconds": round(time.perf_counter() - began, 1),
        "load_average_after": [round(x, 1) for x in os.getloadavg()],
    }
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
