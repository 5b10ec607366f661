"""The ``code_vector`` view: one fixed-width vector per patient over a feature space chosen in
config (ScoEHR, seed 002; medGAN's patient-level vectors), as :class:`CodeVectorBatch`.

Feature spaces (``view.features``):

* ``conditions`` (default): the 605 conditions, column = condition id;
* ``condition_age``: condition x five-year age group, column = ``condition * 24 + age_group``
  (the 14,520 diagnosis-age tokens of seed 000 without the specials);
* ``record_codes``: every coded modality of the record, concatenated: conditions, then
  procedure categories, then ATC-3 drug classes. On an imported dataset these are the
  source's own codes as the importer mapped them (``metadata/codes.parquet``).

``view.values``: ``binary`` (multi-hot: code ever recorded; upstream ScoEHR) or ``counts``
(events per code; the reproduction's choice). A patient with fewer than ``min_codes``
diagnoses is dropped from training and counted (the sequence view's filter, on
``n_events``); inference keeps every patient. Collate is one ``np.bincount`` per batch.

A code vector has no ages and no weeks, so what a generator on this view produces is scored
as a *code set* (``record_type``): the scorecard reduces every set (real, synthetic,
references) to each patient's set of conditions before comparing them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from mirror.config import require
from mirror.data import schema
from mirror.data import vocabularies as V
from mirror.data.views.base import DataView
from mirror.data.vocab import N_AGE_GROUPS, N_CONDITIONS

if TYPE_CHECKING:
    import ray.data

    from mirror.data.stream import FilterReport

FEATURE_SPACES = ("conditions", "condition_age", "record_codes")
VALUE_KINDS = ("binary", "counts")


def feature_blocks(features: str) -> tuple[tuple[str, int], ...]:
    """(list column, width) of each block of the feature space, in column order."""
    if features == "conditions":
        return ((schema.CONDITIONS, N_CONDITIONS),)
    if features == "condition_age":
        return ((schema.CONDITIONS, N_CONDITIONS * N_AGE_GROUPS),)
    if features == "record_codes":
        return (
            (schema.CONDITIONS, N_CONDITIONS),
            (schema.PROCEDURES, len(V.procedure_categories())),
            (schema.MEDICATIONS, len(V.drug_classes())),
        )
    raise ValueError(f"features: unknown feature space {features!r}; valid: {FEATURE_SPACES}")


def n_features(features: str) -> int:
    return sum(width for _, width in feature_blocks(features))


@dataclass(frozen=True)
class CodeVectorViewConfig:
    """The ``view.*`` keys of code-vector models."""

    features: str = "conditions"  # conditions | condition_age | record_codes
    values: str = "binary"  # binary (multi-hot) | counts
    min_codes: int = 1  # training filter on diagnoses per patient; dropped counts are logged

    def __post_init__(self) -> None:
        require(self, "features", self.features in FEATURE_SPACES, f"one of {FEATURE_SPACES}")
        require(self, "values", self.values in VALUE_KINDS, f"one of {VALUE_KINDS}")
        require(self, "min_codes", 0 <= self.min_codes <= schema.MAX_EVENTS, f"an int in [0, {schema.MAX_EVENTS}]")


@dataclass(frozen=True)
class CodeVectorInfo:
    """Dataset facts a code-vector model is built from."""

    n_features: int = N_CONDITIONS
    features: str = "conditions"
    values: str = "binary"


@dataclass
class CodeVectorBatch:
    subject_id: torch.Tensor  # (B,) int64
    x: torch.Tensor  # (B, F) float32: 0/1, or counts

    def __post_init__(self) -> None:
        b = self.subject_id.shape[0]
        if self.x.dim() != 2 or self.x.shape[0] != b:
            raise ValueError(f"CodeVectorBatch.x: expected shape ({b}, F), got {tuple(self.x.shape)}")

    @property
    def size(self) -> int:
        return int(self.subject_id.shape[0])

    def to(self, device: Any, non_blocking: bool = True) -> CodeVectorBatch:
        return CodeVectorBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _flat_list(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(row of each element, element values as int64) of a list column, vectorised."""
    column = table.column(name).combine_chunks()
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.flatten().to_numpy().astype(np.int64)
    rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    return rows, values


def code_vectors(table: pa.Table, features: str, values: str) -> np.ndarray:
    """(n, F) float32 code vectors of Arrow patient rows: one bincount over every event."""
    n, width = table.num_rows, n_features(features)
    rows_all, cols_all = [], []
    start = 0
    for column, block_width in feature_blocks(features):
        rows, cols = _flat_list(table, column)
        if features == "condition_age":
            _, ages = _flat_list(table, schema.AGE_GROUPS)
            cols = cols * N_AGE_GROUPS + ages
        rows_all.append(rows)
        cols_all.append(cols + start)
        start += block_width
    rows, cols = np.concatenate(rows_all), np.concatenate(cols_all)
    counts = np.bincount(rows * width + cols, minlength=n * width).reshape(n, width)
    if values == "binary":
        counts = np.minimum(counts, 1)
    return counts.astype(np.float32)


def collate_code_vectors(table: pa.Table, features: str, values: str) -> dict[str, torch.Tensor]:
    """Arrow rows -> the tensors of a :class:`CodeVectorBatch`."""
    return {
        "subject_id": torch.from_numpy(table.column(schema.SUBJECT_ID).to_numpy().astype(np.int64)),
        "x": torch.from_numpy(code_vectors(table, features, values)),
    }


def code_rows(x: np.ndarray, info: CodeVectorInfo, first_id: int, sex: np.ndarray) -> pa.Table:
    """Code vectors (n, F) -> dataset rows (``ROW_SCHEMA``): one event per present code (a
    count of k gives k events), all at week 0 of a patient born at week 0 and enrolled that
    week. Ages and weeks are placeholders: rows of a code-set generator are scored as code sets
    (the age group is the feature's own in ``condition_age``)."""
    n = x.shape[0]
    counts = np.rint(np.clip(x, 0, None)).astype(np.int64)
    columns: dict[str, pa.Array] = {}
    start = 0
    n_diagnoses = np.zeros(n, np.int64)
    for column, width in feature_blocks(info.features):
        block = counts[:, start : start + width]
        start += width
        per_row = block.sum(1)
        rows, cols = np.nonzero(block)  # row-major: each row's codes in column order
        reps = block[rows, cols]
        cols = np.repeat(cols, reps)
        offsets = pa.array(np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32))
        if column == schema.CONDITIONS:
            n_diagnoses = per_row
            conditions, ages = (cols // N_AGE_GROUPS, cols % N_AGE_GROUPS) if info.features == "condition_age" else (cols, np.zeros_like(cols))
            columns[schema.CONDITIONS] = pa.ListArray.from_arrays(offsets, pa.array(conditions.astype(np.int16)))
            columns[schema.AGE_GROUPS] = pa.ListArray.from_arrays(offsets, pa.array(ages.astype(np.int8)))
            columns[schema.WEEKS] = pa.ListArray.from_arrays(offsets, pa.array(np.zeros(len(cols), np.int32)))
        else:
            week_column = schema.PROCEDURE_WEEKS if column == schema.PROCEDURES else schema.MEDICATION_START_WEEKS
            stays = schema.PROCEDURE_STAYS if column == schema.PROCEDURES else schema.MEDICATION_STAYS
            zeros = np.zeros(len(cols), np.int32)
            columns[column] = pa.ListArray.from_arrays(offsets, pa.array(cols.astype(np.int16)))
            columns[week_column] = pa.ListArray.from_arrays(offsets, pa.array(zeros))
            columns[stays] = pa.ListArray.from_arrays(offsets, pa.array(np.full(len(cols), schema.NO_STAY, np.int16)))
            if column == schema.MEDICATIONS:
                columns[schema.MEDICATION_END_WEEKS] = pa.ListArray.from_arrays(offsets, pa.array(zeros))
    zeros = np.zeros(n, np.int32)
    table = pa.table(
        {
            schema.SUBJECT_ID: pa.array(first_id + np.arange(n, dtype=np.int64)),
            schema.SEX: pa.array(sex.astype(np.int8)),
            schema.BIRTH_WEEK: pa.array(zeros),
            schema.ENROLL_START: pa.array(zeros),
            schema.ENROLL_END: pa.array(zeros),
            schema.N_EVENTS: pa.array(n_diagnoses.astype(np.int32)),
            **columns,
        }
    )
    return schema.fill_missing_modalities(table)


class CodeVectorView(DataView):
    name = "code_vector"
    config_cls = CodeVectorViewConfig
    info_cls = CodeVectorInfo
    record_type = "code_set"

    config: CodeVectorViewConfig

    def __init__(self, config: CodeVectorViewConfig, root: str) -> None:
        super().__init__(config, root)
        self.metadata = schema.DatasetMetadata.read(root)

    def info(self) -> CodeVectorInfo:
        cfg = self.config
        return CodeVectorInfo(n_features=n_features(cfg.features), features=cfg.features, values=cfg.values)

    def columns(self) -> list[str]:
        wanted = {schema.SUBJECT_ID, schema.SEX} | {column for column, _ in feature_blocks(self.config.features)}
        if self.config.features == "condition_age":
            wanted.add(schema.AGE_GROUPS)
        return [name for name in schema.ROW_SCHEMA.names if name in wanted]

    def read(self, split: str, *, purpose: str = "train") -> tuple[ray.data.Dataset, FilterReport]:
        from mirror.data.stream import read_split

        min_codes = 0 if purpose == "inference" else self.config.min_codes
        return read_split(self.root, split, columns=self.columns(), min_words=min_codes, max_words=schema.MAX_EVENTS)

    def batches(
        self, source: Any, batch_size: int, *, training: bool, epoch: int = 0, seed: int = 0,
        device: Any = "auto",
    ) -> Iterator[CodeVectorBatch]:
        from mirror.data.stream import iter_batches
        from mirror.data.views.code_vector_collate import CodeVectorCollate

        collate_fn = CodeVectorCollate(self.config.features, self.config.values)
        return iter_batches(
            source, batch_size, collate_fn=collate_fn, make_batch=lambda t: CodeVectorBatch(**t), device=device
        )

    def inference_batch(self, table: pa.Table) -> tuple[CodeVectorBatch, np.ndarray]:
        tensors = collate_code_vectors(table, self.config.features, self.config.values)
        return CodeVectorBatch(**tensors), np.zeros(table.num_rows, dtype=bool)
