"""Collate: a batch of patient rows (Arrow) becomes padded tensors for the sequence models.

This is the hot path of every epoch, so nothing here loops in Python over rows or tokens:
list columns are read as Arrow offsets plus one flat values array, token ids are computed on
the flat arrays, and every padded (B, T) tensor is filled by one scatter at computed
(row, column) indices. Reversal for the encoder is index arithmetic (word i of a sentence of
n words goes to column n - i). The layout is the batch contract in ``mirror.data.batch``.

Masking (seed 000, "Training"): for sentences longer than 10 words, 10% of diagnosis-age
tokens, both inside the sentence and at its end, are replaced by ``<PAD>`` in the encoder
input. Evaluation uses two related masks: interpolation (random interior words) and
extrapolation (the last words). The three mask functions are pure functions of the lengths
and of a (B, L) array of uniform noise. :func:`collate` draws that noise from
:func:`patient_noise`, a counter-based hash of (seed, epoch, subject_id, word index), so a
patient's mask depends only on the seed and the epoch: not on batch size, on which worker
read the patient, or on the order in which Ray's prefetch threads collate batches. Two
models evaluated with the same seed see exactly the same masked words.

This module imports no Ray, so models, metrics and tests can use it directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import torch

from mirror.data import schema, vocab
from mirror.data.batch import SequenceBatch

assert vocab.PAD == 0, "collate pads with np.zeros"

MaskKind = Literal["training", "interpolation", "extrapolation"]
MASK_KINDS: tuple[str, ...] = ("training", "interpolation", "extrapolation")

ArrowBatch = pa.Table | pa.RecordBatch | Mapping[str, pa.Array | pa.ChunkedArray]


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class MaskSpec:
    """Which words of the encoder input are replaced by ``<PAD>``.

    kind: ``training`` (seed 000: end and interior words of long sentences),
        ``interpolation`` (random interior words) or ``extrapolation`` (the last words).
    rate: fraction of a sentence's words to mask; a masked sentence always loses >= 1 word.
    min_words: ``training`` only: sentences with at most this many words are not masked.
    """

    kind: MaskKind = "training"
    rate: float = 0.1
    min_words: int = 10

    def __post_init__(self) -> None:
        if self.kind not in MASK_KINDS:
            raise ValueError(f"MaskSpec.kind: expected one of {MASK_KINDS}, got {self.kind!r}")
        if not 0.0 < self.rate <= 1.0:
            raise ValueError(f"MaskSpec.rate: expected a fraction in (0, 1], got {self.rate!r}")
        if self.min_words < 0:
            raise ValueError(f"MaskSpec.min_words: expected >= 0, got {self.min_words!r}")


@dataclass(frozen=True)
class CollateConfig:
    """Everything collate needs besides the rows.

    n_weeks: the dataset's week span (``metadata/dataset.json``); sizes the week vocabulary.
    mask: encoder-input mask, or None for no masking (plain reconstruction).
    seed: seed of the mask noise; combined with the epoch so every epoch masks anew.
    """

    n_weeks: int
    mask: MaskSpec | None = None
    seed: int = 0
    week_vocab: vocab.WeekVocab = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # WeekVocab validates n_weeks; built once here rather than once per batch.
        object.__setattr__(self, "week_vocab", vocab.WeekVocab(self.n_weeks))
        if self.seed < 0:
            raise ValueError(f"CollateConfig.seed: expected >= 0, got {self.seed!r}")

    @classmethod
    def for_dataset(
        cls, metadata: schema.DatasetMetadata, *, mask: MaskSpec | None = None, seed: int = 0
    ) -> CollateConfig:
        return cls(n_weeks=metadata.n_weeks, mask=mask, seed=seed)


# --------------------------------------------------------------------------------------------
# Mask noise and mask rules. All masks are (B, L) bool arrays in forward word order.

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijective 64-bit mix; numpy uint64 arithmetic wraps mod 2^64."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def patient_noise(subject_id: np.ndarray, width: int, *, seed: int, epoch: int = 0) -> np.ndarray:
    """(B, width) float64 uniforms in [0, 1), a pure function of (seed, epoch, subject, column).

    Counter-based (hash, not a stateful generator), so the noise of one patient does not
    depend on which other patients share its batch.
    """
    stream = _splitmix64(np.array([seed], dtype=np.uint64)) ^ np.uint64(epoch)
    stream = _splitmix64(stream)
    row_key = _splitmix64(np.asarray(subject_id, dtype=np.int64).astype(np.uint64) ^ stream)
    counters = row_key[:, None] + np.arange(width, dtype=np.uint64)[None, :] * _GOLDEN
    bits = _splitmix64(counters) >> np.uint64(11)  # top 53 bits: exact in float64
    return bits.astype(np.float64) * (1.0 / (1 << 53))


def n_masked_words(lengths: np.ndarray, rate: float) -> np.ndarray:
    """max(1, round(rate * n)) per sentence, rounding halves up (1.5 -> 2, 2.5 -> 3)."""
    n = np.asarray(lengths, dtype=np.int64)
    return np.maximum(1, np.floor(rate * n + 0.5).astype(np.int64))


def _choose_random(eligible: np.ndarray, k: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Per row, the k eligible positions with the smallest noise (k is clipped to what exists)."""
    b, width = eligible.shape
    k = np.minimum(k, eligible.sum(axis=1))
    keys = np.where(eligible, noise[:, :width], np.inf)
    order = np.argsort(keys, axis=1, kind="stable")
    chosen = np.zeros((b, width), dtype=bool)
    np.put_along_axis(chosen, order, np.arange(width)[None, :] < k[:, None], axis=1)
    return chosen


def _positions(lengths: np.ndarray, width: int | None) -> tuple[np.ndarray, np.ndarray]:
    n = np.asarray(lengths, dtype=np.int64)
    width = int(n.max(initial=0)) if width is None else width
    return n[:, None], np.arange(width, dtype=np.int64)[None, :]


def _check_noise(noise: np.ndarray, lengths: np.ndarray, width: int) -> None:
    if noise.ndim != 2 or noise.shape[0] != lengths.shape[0] or noise.shape[1] < width:
        raise ValueError(
            f"noise: expected shape ({lengths.shape[0]}, >={width}), got {tuple(noise.shape)}"
        )


def training_mask(
    lengths: np.ndarray,
    noise: np.ndarray,
    *,
    rate: float = 0.1,
    min_words: int = 10,
    width: int | None = None,
) -> np.ndarray:
    """Seed 000 training mask: ``rate`` of the words of each sentence longer than ``min_words``.

    Exact rule for a sentence of n > min_words words: k = max(1, round_half_up(rate * n))
    words are masked. The last ceil(k / 2) words are masked (the end of the sentence); the
    other floor(k / 2) are drawn without replacement, uniformly from the interior words
    1 .. n - ceil(k/2) - 1 (never the first word), using the smallest ``noise`` values.
    Sentences of n <= min_words words are not masked. ``width`` (default max(lengths)) is L.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n, j = _positions(lengths, width)
    _check_noise(noise, lengths, j.shape[1])
    k = np.where(lengths > min_words, n_masked_words(lengths, rate), 0)
    k_end = (k + 1) // 2
    at_end = (j >= n - k_end[:, None]) & (j < n)
    interior = (j >= 1) & (j < n - k_end[:, None])
    return at_end | _choose_random(interior, k - k_end, noise)


def interpolation_mask(
    lengths: np.ndarray, noise: np.ndarray, *, rate: float = 0.1, width: int | None = None
) -> np.ndarray:
    """Random interior words: k = max(1, round_half_up(rate * n)) of words 1 .. n-2.

    Never the first or last word, so a sentence needs n >= 3 to be masked; k is capped at
    the n - 2 interior words. Drawn without replacement using the smallest ``noise`` values.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n, j = _positions(lengths, width)
    _check_noise(noise, lengths, j.shape[1])
    k = np.where(lengths >= 3, n_masked_words(lengths, rate), 0)
    interior = (j >= 1) & (j < n - 1)
    return _choose_random(interior, k, noise)


def extrapolation_mask(
    lengths: np.ndarray, *, rate: float = 0.1, width: int | None = None
) -> np.ndarray:
    """The last k = max(1, round_half_up(rate * n)) words of every sentence (deterministic)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n, j = _positions(lengths, width)
    k = np.minimum(n_masked_words(lengths, rate), lengths)[:, None]
    return (j >= n - k) & (j < n)


def make_mask(
    spec: MaskSpec, lengths: np.ndarray, subject_id: np.ndarray, *, seed: int, epoch: int = 0
) -> np.ndarray:
    """(B, max(lengths)) mask of ``spec`` with noise from :func:`patient_noise`."""
    lengths = np.asarray(lengths, dtype=np.int64)
    width = int(np.max(lengths, initial=0))
    if spec.kind == "extrapolation":
        return extrapolation_mask(lengths, rate=spec.rate, width=width)
    # Only sentences the rule can mask need noise (most claims sentences are short): hashing
    # and sorting just those rows gives the same mask at a fraction of the cost.
    active = lengths > (spec.min_words if spec.kind == "training" else 2)
    mask = np.zeros((lengths.shape[0], width), dtype=bool)
    if active.any():
        n = lengths[active]
        noise = patient_noise(np.asarray(subject_id)[active], width, seed=seed, epoch=epoch)
        if spec.kind == "interpolation":
            mask[active] = interpolation_mask(n, noise, rate=spec.rate, width=width)
        else:
            mask[active] = training_mask(
                n, noise, rate=spec.rate, min_words=spec.min_words, width=width
            )
    return mask


# --------------------------------------------------------------------------------------------
# Arrow access


def _column(batch: ArrowBatch, name: str) -> pa.Array:
    """One column as a single contiguous Array (Ray hands out Tables with chunked columns)."""
    try:
        column = batch[name]
    except KeyError:
        column = None
    if column is None:
        have = list(batch.keys()) if isinstance(batch, Mapping) else batch.schema.names
        raise KeyError(f"collate: batch has no column {name!r}; columns are {have}")
    if isinstance(column, pa.ChunkedArray):
        column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    if column.null_count:
        raise ValueError(f"collate: column {name!r} has {column.null_count} nulls (rule: non-null)")
    return column


def _list_column(batch: ArrowBatch, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets from 0, flat values) of a list column, honouring slices of a larger array."""
    column = _column(batch, name)
    if not isinstance(column, pa.ListArray | pa.LargeListArray):
        raise TypeError(f"collate: column {name!r} must be a list column, got {column.type}")
    offsets = column.offsets.to_numpy().astype(np.int64, copy=False)
    values = column.flatten().to_numpy(zero_copy_only=False)  # flatten() respects the slice
    return offsets - offsets[0], values


def _scalar_column(batch: ArrowBatch, name: str) -> np.ndarray:
    return _column(batch, name).to_numpy(zero_copy_only=False)


# --------------------------------------------------------------------------------------------
# Collate


def collate(batch: ArrowBatch, config: CollateConfig, *, epoch: int = 0) -> SequenceBatch:
    """Rows with ``schema.MODEL_COLUMNS`` -> :class:`SequenceBatch` (layout in ``batch.py``).

    ``batch`` is a pyarrow Table or RecordBatch (or a mapping of column name to array).
    Raises ValueError naming the rule and the subject when rows break the contract.
    """
    subject_id = _scalar_column(batch, schema.SUBJECT_ID).astype(np.int64)  # owned, writable
    sex = _scalar_column(batch, schema.SEX).astype(np.float32)
    offsets, conditions = _list_column(batch, schema.CONDITIONS)
    age_offsets, age_groups = _list_column(batch, schema.AGE_GROUPS)
    week_offsets, weeks = _list_column(batch, schema.WEEKS)
    for name, other in ((schema.AGE_GROUPS, age_offsets), (schema.WEEKS, week_offsets)):
        if not np.array_equal(offsets, other):
            bad = int(np.flatnonzero(np.diff(offsets) != np.diff(other))[0])
            raise ValueError(
                f"collate: subject_id {subject_id[bad]}: {name} and {schema.CONDITIONS} differ "
                "in length (rule: one entry per event in every event column)"
            )
    lengths = np.diff(offsets)
    if lengths.size and lengths.min() < 1:
        bad = int(np.flatnonzero(lengths < 1)[0])
        raise ValueError(
            f"collate: subject_id {subject_id[bad]} has no events (rule: sentences have >= 1 "
            "word; read_split filters them and counts them in its FilterReport)"
        )

    dx = vocab.diag_age_token(conditions, age_groups)  # (N,) flat over the batch's words
    wk = config.week_vocab.token(weeks)
    b = lengths.shape[0]
    width = int(lengths.max(initial=0))  # L
    t = width + 1  # T
    # Word i of row r (forward order) sits at flat index offsets[r] + i.
    row = np.repeat(np.arange(b, dtype=np.int64), lengths)
    pos = np.arange(dx.shape[0], dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    rows = np.arange(b)

    if config.mask is None:
        masked = np.zeros((b, width), dtype=bool)
    else:
        masked = make_mask(config.mask, lengths, subject_id, seed=config.seed, epoch=epoch)

    # <PAD> is 0, so zeros are the padding (separate arrays: each tensor owns its storage).
    enc_dx, enc_wk, dec_dx, dec_wk, tgt_dx, tgt_wk = (np.zeros((b, t), np.int64) for _ in range(6))
    enc_col = lengths[row] - pos  # reversal: [<EOS>, w_n, ..., w_1]
    enc_dx[row, enc_col] = np.where(masked[row, pos], vocab.PAD, dx)
    enc_wk[row, enc_col] = wk
    enc_dx[:, 0] = enc_wk[:, 0] = vocab.EOS
    dec_dx[row, pos + 1] = dx  # [<SOS>, w_1, ..., w_n]
    dec_wk[row, pos + 1] = wk
    dec_dx[:, 0] = dec_wk[:, 0] = vocab.SOS
    tgt_dx[row, pos] = dx  # [w_1, ..., w_n, <EOS>]
    tgt_wk[row, pos] = wk
    tgt_dx[rows, lengths] = tgt_wk[rows, lengths] = vocab.EOS

    return SequenceBatch(
        subject_id=torch.from_numpy(subject_id),
        sex=torch.from_numpy(sex),
        lengths=torch.from_numpy(lengths),
        enc_dx=torch.from_numpy(enc_dx),
        enc_wk=torch.from_numpy(enc_wk),
        dec_dx=torch.from_numpy(dec_dx),
        dec_wk=torch.from_numpy(dec_wk),
        tgt_dx=torch.from_numpy(tgt_dx),
        tgt_wk=torch.from_numpy(tgt_wk),
        masked=torch.from_numpy(masked),
    )
