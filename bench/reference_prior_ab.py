"""Generation from one trained sentence autoencoder under two latent priors (issue 11): the
Gaussian fitted to its aggregate posterior (``model.gen_prior=aggregate``, what the AE samples
now) against z ~ N(0, I) (what it sampled before), with the same seeds, scored as the
evaluation scores generation (validity rules, condition prevalence r and length W1 against
held-out patients).

    MLFLOW_TRACKING_URI=sqlite:////tmp/mirror-reference/mlflow.db \\
        python bench/reference_prior_ab.py RUN_ID [--draws 2000] [--out FILE]

The run must have been trained with ``gen_prior=aggregate`` (its checkpoint holds the fitted
moments). Writes ``bench/results/reference_prior_ab.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mirror.checkpoint import load_run
from mirror.data.schema import HELD_OUT
from mirror.metrics.evaluate import _GenerationScore
from mirror.metrics.tasks import ConditionPrevalence, LengthHistogram, condition_sets

RESULTS = Path(__file__).parent / "results" / "reference_prior_ab.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_id")
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--real", type=int, default=5000, help="held-out patients the draws are scored against")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    run = load_run(args.run_id)
    model, info, view = run.model.eval(), run.data_info, run.view()
    if getattr(model, "latent_moments", None) is None:
        raise SystemExit(f"run {args.run_id}: trained without gen_prior=aggregate, no fitted moments to compare")
    held_out, _ = view.read(HELD_OUT)
    real_prevalence, real_lengths, females, patients = ConditionPrevalence(), LengthHistogram(info.max_words + 1), 0, 0
    for batch in view.batches(held_out.limit(args.real), 512, training=False):
        real_prevalence.add(condition_sets(batch.tgt_dx, batch.lengths))
        real_lengths.add(batch.lengths)
        females, patients = females + int((batch.sex > 0).sum()), patients + batch.size
    priors = {"aggregate": model.sample_latent, "standard": lambda n, g: torch.randn(n, model.latent_dim, generator=g)}
    result: dict[str, object] = {"run_id": args.run_id, "draws": args.draws, "real_patients": patients}
    for name, draw_z in priors.items():
        score = _GenerationScore("eval", info.max_words, info.week_vocab_size, keep_rows=False)
        latents, words = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        with torch.no_grad():
            for start in range(0, args.draws, 500):
                b = min(500, args.draws - start)
                z = draw_z(b, latents)
                sex = torch.where(torch.rand(b, generator=latents) < females / patients, 1.0, -1.0)
                score.add(*model.generate(z, sex, info.max_words + 1, greedy=False, generator=words), sex)
        metrics = score.metrics(real_prevalence.prevalence(), real_lengths.counts)
        result[name] = {key.split("/")[-1]: round(value, 4) for key, value in metrics.items()}
        print(name, result[name], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
