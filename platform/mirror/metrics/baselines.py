"""A frequency floor for every evaluation number: the age-conditioned unigram model.

The model knows nothing about a patient beyond what teacher forcing hands it: the previous
word. Its one parameter table is ``P(next word | age group of the previous word)``, with
``<SOS>`` as an extra context, counted over the *training* split. Built from real transitions,
it never steps back in age. Every evaluation metric of a learned model is reported beside
the same metric of this model (``baseline/...``), so "72% accuracy" comes with its floor.

How each task uses it:

* teacher forcing / interpolation / extrapolation: rank words by the count table at the
  previous word's context (ties broken by overall word frequency). The table only counts
  word targets, so the floor never predicts ``<EOS>`` at a word position;
  the week prediction is the previous word's week (the first word gets the median first week).
* greedy reconstruction: one sentence for every patient (there is no z to condition on):
  the chain of most likely words, of the median training length, at the median first week
  plus the median gap per word.
* generation: length from the training length histogram; words by ancestral sampling from
  the table; first week and week gaps sampled independently from their histograms.

Fitting streams over training batches and keeps only count arrays (about 3 MB).

Two more floors need no fitting (``mirror.metrics.evaluate`` reports them beside the unigram's):

* :func:`copy_previous_topk`, the copy-previous-word heuristic: at each position predict the
  words already seen in this sentence, most recent first (top-1 = the previous word), and the
  previous word's week. Patients repeat conditions, so this scores far above the unigram on
  teacher-forced accuracy; a decoder that does not beat it has learnt little beyond copying.
* the shuffled-z control: the model's own decoder given another patient's z (built in
  ``evaluate``), which measures how much z, rather than the teacher-forced prefix, carries.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from mirror.data.batch import SequenceBatch
from mirror.data.schema import MAX_WORDS
from mirror.data.vocab import DIAG_AGE_VOCAB_SIZE, N_AGE_GROUPS, N_SPECIAL, PAD
from mirror.metrics.tasks import word_positions

N_CONTEXTS = N_AGE_GROUPS + 1  # the previous word's age group, or <SOS>
SOS_CONTEXT = N_AGE_GROUPS


def previous_word_context(dec_dx: torch.Tensor) -> torch.Tensor:
    """Context id per decoder position: the age group of the previous word (``dec_dx``), or
    ``SOS_CONTEXT`` where the decoder input is a special id."""
    is_word = dec_dx >= N_SPECIAL
    return torch.where(
        is_word,
        (dec_dx - N_SPECIAL).clamp(min=0) % N_AGE_GROUPS,
        torch.full_like(dec_dx, SOS_CONTEXT),
    )


def copy_previous_topk(
    dec_dx: torch.Tensor, dec_wk: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The copy-previous-word heuristic under teacher forcing: at decoder position t (input
    ``dec_dx[:, t]``, predicting ``tgt_dx[:, t]``) the k most recently seen *distinct* words of
    the decoder inputs ``dec_dx[:, :t + 1]``, most recent first, ``<PAD>`` where fewer exist
    (the first word has nothing to copy: a miss). Week: the previous word's week (``<SOS>`` at
    the first word, a miss). Returns (B, T, k) ids and (B, T) week ids.

    Vectorised over positions in O(B T^2): input j is the latest occurrence of its word at
    time t iff j <= t and the word's next occurrence comes after t; its recency rank is the
    number of such latest occurrences after j.
    """
    b, width = dec_dx.shape
    device = dec_dx.device
    idx = torch.arange(width, device=device)
    same = dec_dx[:, :, None] == dec_dx[:, None, :]  # (B, j, j')
    later = (idx[None, :] > idx[:, None])[None]  # j' > j
    repeat = same & later
    next_same = torch.where(repeat.any(-1), repeat.float().argmax(-1), torch.full_like(dec_dx, width))
    is_word = dec_dx >= N_SPECIAL
    t = idx[None, :, None]  # (1, t, 1)
    j = idx[None, None, :]  # (1, 1, j)
    latest = (j <= t) & (next_same[:, None, :] > t) & is_word[:, None, :]  # (B, t, j)
    rank = latest.flip(-1).cumsum(-1).flip(-1) - latest.long()  # latest occurrences after j
    out = torch.full((b, width, k), PAD, dtype=dec_dx.dtype, device=device)
    for r in range(k):
        pick = latest & (rank == r)
        where = pick.float().argmax(-1)  # (B, t): the j of rank r (0 if none)
        out[..., r] = torch.where(pick.any(-1), dec_dx.gather(1, where), torch.full_like(where, PAD))
    return out, dec_wk.clone()


def _grow(counts: np.ndarray, size: int) -> np.ndarray:
    if counts.size >= size:
        return counts
    out = np.zeros(size, dtype=counts.dtype)
    out[: counts.size] = counts
    return out


def _median_of_histogram(counts: np.ndarray) -> int:
    cdf = np.cumsum(counts)
    return int(np.searchsorted(cdf, cdf[-1] / 2.0))


class FrequencyBaseline:
    """Age-conditioned unigram model of diagnosis sentences (see the module docstring)."""

    def __init__(
        self, max_words: int = MAX_WORDS, diag_vocab_size: int = DIAG_AGE_VOCAB_SIZE
    ) -> None:
        self.max_words = max_words
        self.diag_vocab_size = diag_vocab_size
        self.next_word_counts = np.zeros((N_CONTEXTS, diag_vocab_size), dtype=np.int64)
        self.length_counts = np.zeros(max_words + 1, dtype=np.int64)
        self.first_week_counts = np.zeros(0, dtype=np.int64)  # grows with the weeks seen
        self.gap_counts = np.zeros(0, dtype=np.int64)
        self.patients = 0
        self.skipped_long = 0  # sentences longer than max_words, counted and not used

    # ----------------------------------------------------------------------------------------
    # Fitting

    def update(self, batch: SequenceBatch) -> None:
        """Add one (training) batch to the counts."""
        lengths = batch.lengths.cpu()
        keep = lengths <= self.max_words
        self.skipped_long += int((~keep).sum())
        if not bool(keep.any()):
            return
        tgt_dx, tgt_wk = batch.tgt_dx.cpu()[keep], batch.tgt_wk.cpu()[keep]
        dec_dx, lengths = batch.dec_dx.cpu()[keep], lengths[keep]
        words = word_positions(lengths, tgt_dx.shape[1])
        context = previous_word_context(dec_dx)
        flat = (context[words] * self.diag_vocab_size + tgt_dx[words]).numpy()
        self.next_word_counts += np.bincount(flat, minlength=self.next_word_counts.size).reshape(
            self.next_word_counts.shape
        )
        self.length_counts += np.bincount(lengths.numpy(), minlength=self.length_counts.size)
        first = (tgt_wk[:, 0] - N_SPECIAL).numpy()
        self.first_week_counts = _grow(self.first_week_counts, int(first.max()) + 1)
        self.first_week_counts += np.bincount(first, minlength=self.first_week_counts.size)
        gap_select = words[:, 1:]
        gaps = (tgt_wk[:, 1:] - tgt_wk[:, :-1])[gap_select].numpy()
        if gaps.size:
            if gaps.min() < 0:
                raise ValueError(
                    "FrequencyBaseline.update: weeks decrease within a sentence "
                    "(rule: weeks are non-decreasing)"
                )
            self.gap_counts = _grow(self.gap_counts, int(gaps.max()) + 1)
            self.gap_counts += np.bincount(gaps, minlength=self.gap_counts.size)
        self.patients += int(lengths.shape[0])

    @classmethod
    def fit(
        cls,
        batches: Iterable[SequenceBatch],
        *,
        max_patients: int | None = None,
        max_words: int = MAX_WORDS,
    ) -> FrequencyBaseline:
        """Count over training batches, stopping after ``max_patients`` (whole batches)."""
        model = cls(max_words=max_words)
        for batch in batches:
            model.update(batch)
            if max_patients is not None and model.patients >= max_patients:
                break
        if model.patients == 0:
            raise ValueError("FrequencyBaseline.fit: no training patients were seen")
        return model

    # ----------------------------------------------------------------------------------------
    # Prediction

    def _fallback(self) -> np.ndarray:
        """(N_CONTEXTS, V) overall word counts restricted to words no younger than the
        context's age group (all words after ``<SOS>``): what breaks ties, and what an unseen
        context falls back to, so the model never steps back in age."""
        overall = self.next_word_counts.sum(0).astype(np.float64)
        token_age = np.full(self.diag_vocab_size, -1)
        token_age[N_SPECIAL:] = np.arange(self.diag_vocab_size - N_SPECIAL) % N_AGE_GROUPS
        context_age = np.arange(N_CONTEXTS)
        context_age[SOS_CONTEXT] = 0
        fallback = np.where(token_age[None, :] >= context_age[:, None], overall[None, :], 0.0)
        empty = fallback.sum(1) == 0
        fallback[empty] = overall  # no word that old at all: any word
        return fallback

    def _scores(self) -> np.ndarray:
        """(N_CONTEXTS, V) ranking scores: the context's counts, ties broken by the fallback
        counts scaled below one count."""
        fallback = self._fallback()
        return self.next_word_counts + fallback / (fallback.sum(1, keepdims=True) + 1.0)

    def topk_table(self, k: int) -> np.ndarray:
        """(N_CONTEXTS, k) most likely next words per context, best first."""
        scores = self._scores()
        scores[:, :N_SPECIAL] = -np.inf  # the table predicts words only
        return np.argsort(-scores, axis=1, kind="stable")[:, :k]

    @property
    def median_first_week_token(self) -> int:
        return N_SPECIAL + _median_of_histogram(self.first_week_counts)

    def teacher_forced(self, batch: SequenceBatch, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k diagnosis-age ids (B, T, k) and the week id (B, T) at every decoder position."""
        table = torch.from_numpy(self.topk_table(k)).to(batch.dec_dx.device)
        topk = table[previous_word_context(batch.dec_dx)]
        weeks = torch.where(
            batch.dec_wk >= N_SPECIAL,
            batch.dec_wk,
            torch.full_like(batch.dec_wk, self.median_first_week_token),
        )
        return topk, weeks

    def greedy_sentence(self, width: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The same most likely sentence for everyone: dx (width,), week ids (width,), length."""
        length = min(_median_of_histogram(self.length_counts), width)
        best = self.topk_table(1)[:, 0]
        dx = torch.full((width,), PAD, dtype=torch.int64)
        wk = torch.full((width,), PAD, dtype=torch.int64)
        context, gap = (
            SOS_CONTEXT,
            _median_of_histogram(self.gap_counts) if self.gap_counts.size else 0,
        )
        for i in range(length):
            dx[i] = int(best[context])
            wk[i] = self.median_first_week_token + i * gap
            context = (int(dx[i]) - N_SPECIAL) % N_AGE_GROUPS
        return dx, wk, length

    def sample(
        self, n: int, rng: np.random.Generator, width: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` sentences like ``SequenceDecoder.generate``: dx ids (n, width), week ids (n, width)
        and words before ``<EOS>`` (n,), ``width`` defaulting to max_words + 1."""
        width = self.max_words + 1 if width is None else width
        lengths = rng.choice(
            self.length_counts.size, size=n, p=self.length_counts / self.length_counts.sum()
        )
        lengths = np.minimum(lengths, width)
        probs = self.next_word_counts.astype(np.float64)
        empty = probs.sum(1) == 0
        probs[empty] = self._fallback()[empty]
        cdf = np.cumsum(probs, axis=1)
        cdf /= cdf[:, -1:]
        dx = np.full((n, width), PAD, dtype=np.int64)
        context = np.full(n, SOS_CONTEXT, dtype=np.int64)
        for i in range(int(lengths.max(initial=0))):
            active = lengths > i
            u = rng.random(n)
            for c in np.unique(context[active]):
                rows = active & (context == c)
                dx[rows, i] = np.searchsorted(cdf[c], u[rows], side="right")
            context = np.where(active, (dx[:, i] - N_SPECIAL) % N_AGE_GROUPS, context)
        first = rng.choice(
            self.first_week_counts.size,
            size=n,
            p=self.first_week_counts / self.first_week_counts.sum(),
        )
        if self.gap_counts.size:
            gaps = rng.choice(
                self.gap_counts.size, size=(n, width), p=self.gap_counts / self.gap_counts.sum()
            )
        else:
            gaps = np.zeros((n, width), dtype=np.int64)
        gaps[:, 0] = 0
        weeks = first[:, None] + np.cumsum(gaps, axis=1) + N_SPECIAL
        words = np.arange(width)[None, :] < lengths[:, None]
        wk = np.where(words, weeks, PAD)
        return (
            torch.from_numpy(dx),
            torch.from_numpy(wk),
            torch.from_numpy(lengths.astype(np.int64)),
        )
