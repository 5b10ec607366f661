"""The code-vector collate as a Ray collate_fn (its own module: importing the view must not
import Ray, so that loading a config or a sweep file stays cheap)."""

from __future__ import annotations

import pyarrow as pa
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from mirror.data.views.code_vector import collate_code_vectors


class CodeVectorCollate(ArrowBatchCollateFn):
    """Arrow rows -> dict of tensors, in Ray's prefetch threads (Ray then moves them to the
    train device)."""

    def __init__(self, features: str, values: str) -> None:
        self.features, self.values = features, values

    def __call__(self, table: pa.Table) -> dict[str, torch.Tensor]:
        return collate_code_vectors(table, self.features, self.values)
