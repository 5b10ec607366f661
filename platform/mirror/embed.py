"""Embedding export: every patient's z, the "digital mirror universe" of seed 000.

For any model with the ``encoder`` capability. Batch inference with Ray Data ``map_batches``
on an actor pool: each actor loads the model once from the run's checkpoint and encodes Arrow
batches through the model's data view (one GPU per actor when there is one). The view reads
every patient (``purpose="inference"``) and cuts what the model cannot take, e.g. sentences
longer than ``max_words`` keep their most recent words; how many were cut is counted per
split and reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray.data
import torch

from mirror.data import schema

SPLIT_COLUMN = "split"
Z_COLUMN = "z"
TRUNCATED_COLUMN = "truncated"


class EncodeBatches:
    """Ray Data actor: loads the model once, then encodes each batch into z."""

    def __init__(self, checkpoint_path: str, view, split: str) -> None:
        from mirror.checkpoint import load_state, model_from_state

        self.model, self.spec, self.data_info = model_from_state(load_state(checkpoint_path))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.view = view
        self.split = split

    @torch.no_grad()
    def __call__(self, table: pa.Table) -> pa.Table:
        batch, truncated = self.view.inference_batch(table)
        batch = batch.to(self.device)
        z = self.model.encode(batch).float().cpu().numpy()
        flat = pa.array(z.reshape(-1).astype(np.float32))
        z_col = pa.FixedSizeListArray.from_arrays(flat, z.shape[1])
        return pa.table(
            {
                schema.SUBJECT_ID: table.column(schema.SUBJECT_ID),
                SPLIT_COLUMN: pa.array([self.split] * table.num_rows, pa.string()),
                Z_COLUMN: z_col,
                TRUNCATED_COLUMN: pa.array(truncated),
            }
        )


@dataclass
class EmbedReport:
    patients: dict[str, int]
    truncated: dict[str, int]
    latent_dim: int


def export_embeddings(
    checkpoint_path: str,
    data_root: str | Path,
    out_dir: str | Path,
    *,
    actors: int = 2,
    batch_size: int = 1024,
    use_gpu: bool = False,
) -> EmbedReport:
    from mirror.checkpoint import load_state
    from mirror.models import get_model_spec, require_capability
    from mirror.train.spec import RunSpec

    saved = load_state(checkpoint_path)["spec"]
    model_spec = get_model_spec(saved["model"])
    require_capability(model_spec, "encoder", "embed")
    view = model_spec.view(RunSpec.from_dict(saved).view_config_obj(), str(data_root))
    out_dir = Path(out_dir)
    patients: dict[str, int] = {}
    truncated: dict[str, int] = {}
    latent_dim = 0
    for split in schema.SPLITS:
        if not schema.split_files(data_root, split):
            continue
        ds, report = view.read(split, purpose="inference")
        encoded = ds.map_batches(
            EncodeBatches,
            fn_constructor_kwargs={"checkpoint_path": checkpoint_path, "view": view, "split": split},
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=1 if use_gpu else 0,
            num_cpus=1 if not use_gpu else 0.5,
        )
        encoded.write_parquet(str(out_dir / split))
        counts = encoded_counts(out_dir / split)
        patients[split], truncated[split], latent_dim = counts
        if report.dropped:
            raise RuntimeError(f"embed: {report.dropped} patients of {split} were filtered: {report}")
    summary = EmbedReport(patients, truncated, latent_dim)
    (out_dir / "embedding.json").write_text(
        json.dumps({"checkpoint": checkpoint_path, "data": str(data_root), **summary.__dict__}, indent=2) + "\n"
    )
    return summary


def encoded_counts(directory: Path) -> tuple[int, int, int]:
    """(patients, truncated, latent_dim) of one written split, reading two small columns."""
    import pyarrow.parquet as pq

    patients = truncated = dim = 0
    for path in sorted(directory.glob("*.parquet")):
        flags = pq.read_table(path, columns=[TRUNCATED_COLUMN]).column(0)
        patients += len(flags)
        truncated += int(np.asarray(flags.to_numpy(zero_copy_only=False)).sum())
        dim = pq.read_schema(path).field(Z_COLUMN).type.list_size
    return patients, truncated, dim
