"""Embedding export: every patient's z, the "digital mirror universe" of seed 000.

Batch inference with Ray Data ``map_batches`` on an actor pool: each actor loads the model
once from the run's checkpoint and encodes Arrow batches (one GPU per actor when there is
one). Sentences longer than the model's ``max_words`` are encoded from their most recent
``max_words`` words; how many patients were truncated is counted per split and reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from mirror.data import schema
from mirror.data.collate import CollateConfig, collate

SPLIT_COLUMN = "split"
Z_COLUMN = "z"
TRUNCATED_COLUMN = "truncated"


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


class EncodeBatches:
    """Ray Data actor: loads the model once, then encodes each batch into z."""

    def __init__(self, checkpoint_path: str, n_weeks: int, split: str) -> None:
        from mirror.train.checkpoints import load_state, model_from_state

        self.model, self.spec, self.data_info = model_from_state(load_state(checkpoint_path))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.config = CollateConfig(n_weeks=n_weeks)
        self.split = split

    @torch.no_grad()
    def __call__(self, table: pa.Table) -> pa.Table:
        table, truncated = keep_last_words(table, self.data_info.max_words)
        batch = collate(table, self.config).to(self.device)
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
    from mirror.data.stream import read_split

    meta = schema.DatasetMetadata.read(data_root)
    out_dir = Path(out_dir)
    patients: dict[str, int] = {}
    truncated: dict[str, int] = {}
    latent_dim = 0
    for split in schema.SPLITS:
        if not schema.split_files(data_root, split):
            continue
        ds, report = read_split(
            data_root, split, columns=schema.MODEL_COLUMNS, min_words=1, max_words=schema.MAX_EVENTS
        )
        encoded = ds.map_batches(
            EncodeBatches,
            fn_constructor_kwargs={"checkpoint_path": checkpoint_path, "n_weeks": meta.n_weeks, "split": split},
            batch_size=batch_size,
            batch_format="pyarrow",
            concurrency=actors,
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
