"""Synthetic patients from a sentence decoder: z ~ N(0, I) decoded, the valid ones kept as rows.

Validity has one definition, the evaluation's (``metrics.tasks.generation_rule_failures``:
non-empty, ended by ``<EOS>`` within ``max_words``, real tokens, ages and weeks non-decreasing,
one birth week consistent with every word). Invalid sentences are counted per rule and never
become rows.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from mirror.metrics.evaluate import generated_rows
from mirror.metrics.tasks import generation_rule_failures
from mirror.models.base import GenerationContext, SequenceDecoder


def valid_rows(
    dx: torch.Tensor, wk: torch.Tensor, n_words: torch.Tensor, sex: torch.Tensor,
    *, max_words: int, week_vocab_size: int, first_id: int,
) -> tuple[pa.Table, dict[str, int]]:
    """Decoded sentences -> rows of the valid ones, plus how many failed each rule (a sentence
    failing several rules is counted under each)."""
    fails = generation_rule_failures(dx, wk, n_words, max_words=max_words, week_vocab_size=week_vocab_size)
    valid = torch.ones_like(n_words, dtype=torch.bool)
    for failed in fails.values():
        valid &= ~failed
    n_valid = int(valid.sum())
    rows = generated_rows(dx[valid], wk[valid], n_words[valid], sex[valid], first_id + np.arange(n_valid))
    return rows, {rule: int(failed.sum()) for rule, failed in fails.items()}


def device_generator(rng: torch.Generator, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded from ``rng``: sampling on a GPU needs one there, and
    drawing its seed from ``rng`` keeps a run reproducible from the caller's seed alone."""
    seed = int(torch.randint(0, 2**62, (1,), generator=rng))
    return torch.Generator(device=device).manual_seed(seed)


@torch.no_grad()
def sample_sentence_rows(
    model: SequenceDecoder, max_words: int, n: int, *,
    rng: torch.Generator, first_id: int, context: GenerationContext, device: torch.device | str = "cpu",
) -> tuple[pa.Table, dict[str, int]]:
    """The ``Generator`` capability of sentence autoencoders: z from the model's generation prior
    (``sample_latent``) and sex from the real
    marginal, decoded by ancestral sampling (the model's ``gen_temperature`` and ``gen_top_p``;
    with room for ``<EOS>`` after ``max_words`` words), valid ones kept. The evaluation's
    generation metrics decode the same way (``metrics.evaluate``)."""
    z = model.sample_latent(n, rng).to(device)
    sex = torch.where(torch.rand(n, generator=rng) < context.female_share, 1.0, -1.0).to(device)
    dx, wk, n_words = model.generate(
        z, sex, max_words + 1, greedy=False, generator=device_generator(rng, device)
    )
    return valid_rows(
        dx.cpu(), wk.cpu(), n_words.cpu().long(), sex.cpu(), max_words=max_words,
        week_vocab_size=context.week_vocab_size, first_id=first_id,
    )
