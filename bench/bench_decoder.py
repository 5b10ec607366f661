"""Decoder options of the sequence autoencoders, measured against each other (issue 11, part 5).

``make bench-decoder``. One process, one torch thread (what one Ray worker gets), the AE at
its default widths on the same simulated patients. Variants of ``AEConfig``:

* ``full``        the seed's single 14,523-way diagnosis-age softmax (the baseline);
* ``factorised``  P(condition) · P(age group | condition): 606 + 24 outputs per step;
* ``z_every_step`` z beside every decoder input, not only in h_0;
* ``word_dropout`` decoder input words hidden behind the mask token with probability 0.25;
* ``factorised_z_every_step`` both (the default since this bench: AEConfig);
* ``copy_history`` that, with the condition logits biased towards the sentence's history
  (``HistoryBias``, a copy mechanism; the default since this bench and the reference run).

The variants train in interleaved blocks of steps (so load on a shared machine hits them
alike) and report training tokens/s as a ratio to ``full``. Each is then scored on held-out
(tuning split) patients: NLL per predicted token (the same quantity for every variant, since
the factorised head is a normalised joint distribution over the same vocabulary),
teacher-forced accuracy with its own z, and with z shuffled across patients (how much z
carries), beside the copy-previous-word floor on the same tokens. Results:
``bench/results/decoder.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from bench_train import plain_batches
from results_file import write_results

from mirror.data import schema
from mirror.data.batch import SequenceInfo
from mirror.data.collate import CollateConfig, MaskSpec
from mirror.data.simulator import generate_dataset
from mirror.data.vocab import PAD
from mirror.models import build_model
from mirror.models.local_step import LocalStepContext
from mirror.train.schedule import make_schedulers
from mirror.train.spec import TrainConfig

RESULTS = Path(__file__).parent / "results" / "decoder.json"
# Seed 000's decoder.
SEED = {"dx_output": "full", "z_every_step": False, "word_dropout": 0.0, "copy_history": False}
VARIANTS = {
    "full": SEED,
    "factorised": SEED | {"dx_output": "factorised"},
    "z_every_step": SEED | {"z_every_step": True},
    "word_dropout": SEED | {"word_dropout": 0.25},
    "factorised_z_every_step": SEED | {"dx_output": "factorised", "z_every_step": True},
    "copy_history": SEED | {"dx_output": "factorised", "z_every_step": True, "copy_history": True},
}


@torch.no_grad()
def held_out_scores(model, root: Path, n_weeks: int, batches: int, batch_size: int) -> dict[str, float]:
    """NLL per token and teacher-forced accuracy (own z, shuffled z) on the tuning split, and
    the copy-previous-word floor (the target is the input word) on the same tokens."""
    model.eval()
    config = CollateConfig(n_weeks)  # unmasked, as validation reads it
    loss = tokens = right = right_shuffled = copied = 0.0
    shuffle = torch.Generator().manual_seed(0)
    for i, batch in enumerate(plain_batches(root, config, schema.TUNING, batch_size=batch_size, forever=False)):
        if i == batches:
            break
        sums = model.eval_sums(batch)
        loss, tokens = loss + float(sums["nll_dx"] + sums["nll_wk"]), tokens + float(sums["tokens"])
        z = model.encode(batch)
        valid = batch.tgt_dx != PAD
        copied += float((batch.dec_dx == batch.tgt_dx)[valid].sum())
        for own, shuffled in ((z, False), (z[torch.randperm(z.shape[0], generator=shuffle)], True)):
            dx_logits, _ = model.teacher_forced_logits(batch, own)
            hits = float((dx_logits.argmax(-1) == batch.tgt_dx)[valid].sum())
            if shuffled:
                right_shuffled += hits
            else:
                right += hits
    model.train()
    return {"nll_per_token": loss / tokens, "tf_acc": right / tokens,
            "tf_acc_shuffled_z": right_shuffled / tokens, "copy_prev": copied / tokens, "tokens": tokens}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=30_000)
    parser.add_argument("--steps", type=int, default=300, help="training steps per variant")
    parser.add_argument("--block", type=int, default=10, help="steps per interleaved block")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eval-batches", type=int, default=20)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="variants to run; speed ratios are to the first")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    variants_run = {name: VARIANTS[name] for name in args.variants}
    baseline = args.variants[0]
    torch.set_num_threads(1)

    from mirror.cluster import ensure_ray

    data = Path(os.environ.get("TMPDIR", "/tmp")) / "mirror-bench" / f"decoder-sim-{args.patients}"
    if not (data / schema.DATASET_JSON).exists():
        ensure_ray(min_logical_cpus=2)
        generate_dataset(data, args.patients, seed=5, overwrite=True)
    n_weeks = schema.DatasetMetadata.read(data).n_weeks
    info = SequenceInfo(week_vocab_size=n_weeks + 3)

    defaults = TrainConfig()
    contexts, streams, seconds, tokens = {}, {}, {}, {}
    for name, options in variants_run.items():
        torch.manual_seed(0)
        model = build_model("ae", options, info)
        optimizers = model.make_optimizers()
        schedulers = make_schedulers(optimizers, args.steps, defaults.warmup_fraction, defaults.min_lr_ratio)
        contexts[name] = LocalStepContext(model, optimizers, grad_clip=1.0, schedulers=schedulers)
        streams[name] = plain_batches(data, CollateConfig(n_weeks, mask=MaskSpec("training")),
                                      batch_size=args.batch_size)  # the same batches, in order
        seconds[name], tokens[name] = [], []
    began = time.perf_counter()
    for block in range(args.steps // args.block):
        for name, ctx in contexts.items():
            batches = [next(streams[name]) for _ in range(args.block)]
            start = time.perf_counter()
            for batch in batches:
                ctx.train_step(batch)
            seconds[name].append(time.perf_counter() - start)
            tokens[name].append(sum(b.n_tokens for b in batches))
        print(f"[bench-decoder] block {block + 1}/{args.steps // args.block} "
              f"({time.perf_counter() - began:.0f} s)", flush=True)

    rate = {name: statistics.median(t / s for t, s in zip(tokens[name], seconds[name], strict=True))
            for name in variants_run}
    variants = {}
    for name, ctx in contexts.items():
        scores = held_out_scores(ctx.model, data, n_weeks, args.eval_batches, 256)
        variants[name] = {"config": VARIANTS[name], "train_tokens_per_s": round(rate[name]),
                          f"speed_vs_{baseline}": round(rate[name] / rate[baseline], 3),
                          **{k: round(v, 4) for k, v in scores.items()}}
        print(f"{name:13s} {rate[name]:8,.0f} tok/s (x{rate[name] / rate[baseline]:.2f}) "
              f"nll/token {scores['nll_per_token']:.3f} tf_acc {scores['tf_acc']:.4f} "
              f"(shuffled z {scores['tf_acc_shuffled_z']:.4f}, copy_prev {scores['copy_prev']:.4f})", flush=True)
    result = {
        "bench": "decoder",
        "patients": args.patients, "steps_per_variant": args.steps, "batch_size": args.batch_size,
        "block": args.block, "eval_batches": args.eval_batches, "torch_threads": 1,
        "load_average_after": [round(x, 1) for x in os.getloadavg()],
        "note": "shared machine: tokens/s are medians over interleaved blocks; compare ratios",
        "variants": variants,
    }
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
