"""The batch contract between collate and every sequence model.

Shape symbols: ``B`` patients in the batch, ``L`` the longest sentence in the batch (words),
``T = L + 1`` (one special token added at the start or end).

Sentence ``w_1..w_n`` of patient b (``n = lengths[b]``), each word a diagnosis-age id and a
week id, becomes (seed 000, Model 0)::

    enc_*   [<EOS>, w_n, ..., w_1, <PAD>...]   reversed, preceded by <EOS>; training mask applied
    dec_*   [<SOS>, w_1, ..., w_n, <PAD>...]   decoder input under teacher forcing
    tgt_*   [w_1, ..., w_n, <EOS>, <PAD>...]   next-token targets (never masked)

``masked[b, i]`` is True when word ``i`` (0-based, forward order) was replaced by ``<PAD>`` in
``enc_dx``; word i sits at ``enc_dx[b, n - i]`` and is predicted at ``tgt_dx[b, i]``. Week ids
are never masked. ``<PAD>`` doubles as the mask token (as in the seed), so models must use
``lengths``, not ``enc_dx != PAD``, to find where a sentence ends.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from mirror.data.schema import MAX_WORDS
from mirror.data.vocab import DIAG_AGE_VOCAB_SIZE


@dataclass(frozen=True)
class SequenceInfo:
    """Dataset facts a sequence model is built from (the ``sequence`` view reads them from
    ``metadata/dataset.json`` and the view config)."""

    week_vocab_size: int
    diag_age_vocab_size: int = DIAG_AGE_VOCAB_SIZE
    max_words: int = MAX_WORDS


@dataclass
class SequenceBatch:
    subject_id: torch.Tensor  # (B,) int64
    sex: torch.Tensor  # (B,) float32, -1 male / +1 female
    lengths: torch.Tensor  # (B,) int64, words per sentence, >= 1
    enc_dx: torch.Tensor  # (B, T) int64
    enc_wk: torch.Tensor  # (B, T) int64
    dec_dx: torch.Tensor  # (B, T) int64
    dec_wk: torch.Tensor  # (B, T) int64
    tgt_dx: torch.Tensor  # (B, T) int64
    tgt_wk: torch.Tensor  # (B, T) int64
    masked: torch.Tensor  # (B, L) bool

    def __post_init__(self) -> None:
        b = self.subject_id.shape[0]
        t = self.enc_dx.shape[1] if self.enc_dx.dim() == 2 else -1
        for name in ("sex", "lengths"):
            if tuple(getattr(self, name).shape) != (b,):
                raise ValueError(f"SequenceBatch.{name}: expected shape ({b},), got {tuple(getattr(self, name).shape)}")
        for name in ("enc_dx", "enc_wk", "dec_dx", "dec_wk", "tgt_dx", "tgt_wk"):
            shape = tuple(getattr(self, name).shape)
            if shape != (b, t):
                raise ValueError(f"SequenceBatch.{name}: expected shape ({b}, {t}), got {shape}")
        if tuple(self.masked.shape) != (b, t - 1):
            raise ValueError(f"SequenceBatch.masked: expected shape ({b}, {t - 1}), got {tuple(self.masked.shape)}")

    def to(self, device: torch.device | str, non_blocking: bool = True) -> SequenceBatch:
        return SequenceBatch(
            **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)}
        )

    @property
    def size(self) -> int:
        return int(self.subject_id.shape[0])

    @property
    def n_tokens(self) -> int:
        """Predicted tokens in the batch (words plus one <EOS> per sentence)."""
        return int(self.lengths.sum().item()) + self.size

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, tensors: dict[str, torch.Tensor]) -> SequenceBatch:
        return cls(**{f.name: tensors[f.name] for f in fields(cls)})
