"""The ``sequence`` view: a patient's diagnosis "sentence" of condition:age-group:week words
(seed 000), as :class:`~mirror.data.batch.SequenceBatch`.

Reads the model columns, keeps sentences of ``min_words``-``max_words`` words (seed 000:
1-100; counted exactly from ``dataset.json``), masks 10% of the words of long sentences in
the encoder input during training, and normalises validation sums per predicted token.
For inference (embedding every patient) nothing is dropped: sentences longer than
``max_words`` are cut to their most recent words, and the cut rows are counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from mirror.config import require
from mirror.data import schema
from mirror.data.batch import SequenceBatch, SequenceInfo
from mirror.data.collate import CollateConfig, MaskSpec, collate
from mirror.data.views.base import DataView

# Ray is imported where rows are read, not here: model files import their view, and loading a
# config or a sweep file must not pay for importing Ray.
if TYPE_CHECKING:
    import ray.data

    from mirror.data.stream import FilterReport


@dataclass(frozen=True)
class SequenceViewConfig:
    """The ``view.*`` keys of sequence models."""

    mask_rate: float = 0.1  # seed 000: 10% of diagnosis-age words masked in training input
    mask_min_words: int = 10  # ... in sentences longer than this; 0 <= rate, 0 disables
    min_words: int = 1  # training filter (seed 000: 1-100 words); dropped counts are logged
    max_words: int = 100

    def __post_init__(self) -> None:
        require(self, "mask_rate", 0.0 <= self.mask_rate <= 1.0, "a fraction in [0, 1] (0: no mask)")
        require(self, "mask_min_words", self.mask_min_words >= 0, "an int >= 0")
        require(self, "min_words", self.min_words >= 1, "an int >= 1")
        require(self, "max_words", self.max_words >= self.min_words, f"an int >= min_words ({self.min_words})")
        require(self, "max_words", self.max_words <= schema.MAX_EVENTS, f"an int <= {schema.MAX_EVENTS}")


class SequenceView(DataView):
    name = "sequence"
    config_cls = SequenceViewConfig
    info_cls = SequenceInfo
    normaliser = "tokens"  # validation NLL is per predicted token (words plus <EOS>)
    unit = "tokens"
    perturbable = ("mask_rate", "mask_min_words")

    config: SequenceViewConfig

    @classmethod
    def probe_info(cls) -> SequenceInfo:
        return SequenceInfo(week_vocab_size=3 + 52)  # shapes are compared: any valid size does

    def __init__(self, config: SequenceViewConfig, root: str) -> None:
        super().__init__(config, root)
        self.metadata = schema.DatasetMetadata.read(root)

    def info(self) -> SequenceInfo:
        return SequenceInfo(week_vocab_size=self.metadata.vocab["week"], max_words=self.config.max_words)

    def read(self, split: str, *, purpose: str = "train") -> tuple[ray.data.Dataset, FilterReport]:
        from mirror.data.stream import read_split

        if purpose == "inference":
            return read_split(self.root, split, min_words=1, max_words=schema.MAX_EVENTS)
        return read_split(self.root, split, min_words=self.config.min_words, max_words=self.config.max_words)

    def collate_config(self, *, training: bool, seed: int = 0) -> CollateConfig:
        """Training input is masked (seed 000); validation and evaluation read it unmasked."""
        cfg = self.config
        mask = MaskSpec("training", cfg.mask_rate, cfg.mask_min_words) if training and cfg.mask_rate > 0 else None
        return CollateConfig(self.metadata.n_weeks, mask=mask, seed=seed)

    def batches(
        self, source: Any, batch_size: int, *, training: bool, epoch: int = 0, seed: int = 0,
        device: Any = "auto",
    ) -> Iterator[SequenceBatch]:

        from mirror.data.stream import iter_sequence_batches

        config = self.collate_config(training=training, seed=seed)
        return iter_sequence_batches(source, batch_size, config=config, epoch=epoch, device=device)

    def units(self, batch: SequenceBatch) -> int:
        return batch.n_tokens

    def inference_batch(self, table: pa.Table) -> tuple[SequenceBatch, np.ndarray]:
        """Rows read for inference as one unmasked batch; sentences over ``max_words`` keep
        their most recent words. Returns the batch and which rows were cut."""
        table, truncated = keep_last_words(table, self.config.max_words)
        return collate(table, self.collate_config(training=False)), truncated


def keep_last_words(table: pa.Table, max_words: int) -> tuple[pa.Table, np.ndarray]:
    """Per patient, keep the last ``max_words`` events; vectorised over list offsets.

    Returns the new table and a bool array: which rows were truncated.
    """
    n_events = table.column(schema.N_EVENTS).to_numpy()
    truncated = n_events > max_words
    if not truncated.any():
        return table, truncated
    columns = {name: table.column(name).combine_chunks() for name in table.column_names}
    offsets = columns[schema.CONDITIONS].offsets.to_numpy()
    starts = np.maximum(offsets[:-1], offsets[1:] - max_words)
    lengths = offsets[1:] - starts
    new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    take = np.repeat(starts - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
    for name in schema.EVENT_COLUMNS:
        if name in columns:
            values = columns[name].flatten().take(pa.array(take))
            columns[name] = pa.ListArray.from_arrays(pa.array(new_offsets), values)
    columns[schema.N_EVENTS] = pa.array(lengths.astype(np.int32))
    return pa.table(columns), truncated
