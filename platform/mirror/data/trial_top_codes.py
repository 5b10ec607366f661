"""TWIN's trial preprocessing (seed 001 §4.1, models.md §3): keep a trial vocabulary's most
frequent codes and fold every other code into one extra "rare" code, written as a new dataset.

    keep_top_codes(src, dst, {ADVERSE_EVENT: 50, TRIAL_MEDICATION: 100})

The paper keeps the top 100 medications and the top 50 adverse events and combines the rare
ones into one extra event. Frequencies are counted on the *training* split only (visits that
hold the code), so the held-out participants do not choose the vocabulary; ties go to the
lower id. Every code outside the kept ones is folded (the paper's "frequency < 50" leaves codes
between rank 50 and frequency 50 unspecified; folding them keeps nothing out of the record).
Kept codes get ids 0..keep-1 in their old order; the rare code is id ``keep``. A visit holding
several folded codes holds the rare code once. Everything is counted in the returned report
(and in ``dataset.json``'s provenance): codes folded, events folded, duplicates merged.
Only ``trial/`` is rewritten (streamed row group by row group); ``data/`` is copied, and
``ground_truth/`` is not carried over (its codes would no longer match).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mirror.data import schema

COLUMN_OF = {schema.TRIAL_MEDICATION: schema.VISIT_MEDICATIONS, schema.ADVERSE_EVENT: schema.VISIT_ADVERSE_EVENTS}
RARE_CODE = "RARE"


def _visit_counts(root: Path, column: str, width: int) -> np.ndarray:
    """Training visits holding each code."""
    counts = np.zeros(width, np.int64)
    for file in schema.trial_split_files(root, schema.TRAIN):
        for batch in pq.ParquetFile(file).iter_batches(columns=[column]):
            counts += np.bincount(batch.column(0).flatten().flatten().to_numpy().astype(np.int64), minlength=width)
    return counts


def _remap(lists: pa.ListArray, lookup: np.ndarray, width: int) -> tuple[pa.ListArray, int]:
    """list<list<int16>>: old ids -> new ids, each visit's ids sorted and unique; returns the
    column and how many duplicates (folded codes meeting in one visit) were merged."""
    visits = lists.flatten()
    offsets = visits.offsets.to_numpy()
    values = lookup[visits.flatten().to_numpy().astype(np.int64)]
    visit_of = np.repeat(np.arange(len(visits)), np.diff(offsets))
    keys = np.unique(visit_of.astype(np.int64) * width + values)
    inner_offsets = np.concatenate([[0], np.cumsum(np.bincount(keys // width, minlength=len(visits)))]).astype(np.int32)
    inner = pa.ListArray.from_arrays(pa.array(inner_offsets), pa.array((keys % width).astype(np.int16)))
    return pa.ListArray.from_arrays(lists.offsets, inner), len(values) - len(keys)


def keep_top_codes(src: str | Path, dst: str | Path, keep: dict[str, int]) -> dict[str, Any]:
    """Write ``dst``: ``src`` with each vocabulary in ``keep`` cut to its top codes plus one
    rare code (module docstring). Returns the report per vocabulary."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise FileExistsError(f"{dst}: already exists")
    meta = schema.DatasetMetadata.read(src)
    unknown = sorted(set(keep) - set(COLUMN_OF))
    if unknown:
        raise ValueError(f"keep: {unknown} are not trial vocabularies; expected some of {sorted(COLUMN_OF)}")
    codes = pq.read_table(src / schema.CODES_PARQUET)
    lookups: dict[str, tuple[np.ndarray, int]] = {}
    report: dict[str, Any] = {}
    new_codes = [codes.filter(pc.invert(pc.is_in(codes.column("modality"), pa.array(list(keep)))))]
    for modality, n_keep in keep.items():
        width = meta.vocab[modality]
        if n_keep < 1:
            raise ValueError(f"keep[{modality!r}]: expected >= 1, got {n_keep}")
        if n_keep >= width:  # nothing to fold: ids unchanged
            report[modality] = {"kept": width, "folded_codes": 0, "folded_events": 0, "merged_in_visit": 0}
            new_codes.append(codes.filter(pc.equal(codes.column("modality"), modality)))
            continue
        counts = _visit_counts(src, COLUMN_OF[modality], width)
        top = np.sort(np.argsort(-counts, kind="stable")[:n_keep])
        lookup = np.full(width, n_keep, np.int64)
        lookup[top] = np.arange(n_keep)
        lookups[modality] = (lookup, n_keep + 1)
        table = codes.filter(pc.equal(codes.column("modality"), modality)).sort_by("id")
        kept = table.take(pa.array(top)).set_column(1, "id", pa.array(np.arange(n_keep, dtype=np.int32)))
        folded = np.setdiff1d(np.arange(width), top)
        severe = table.column("severe").to_numpy(zero_copy_only=False)[folded] if modality == schema.ADVERSE_EVENT else None
        rare = pa.table({"modality": [modality], "id": pa.array([n_keep], pa.int32()), "code": [RARE_CODE],
                         "name": [f"rare ({len(folded)} codes folded, training visits < {int(counts[top].min())})"],
                         "parent_code": pa.array([None], pa.string()), "unit": pa.array([None], pa.string()),
                         "severe": pa.array([None if severe is None else bool(np.any(severe == True))], pa.bool_())},  # noqa: E712
                        schema=schema.CODES_SCHEMA)
        new_codes += [kept.cast(schema.CODES_SCHEMA), rare]
        report[modality] = {"kept": n_keep, "folded_codes": int(len(folded)), "folded_events": 0, "merged_in_visit": 0,
                            "training_visits_with_folded": int(counts[folded].sum())}
    staging = dst.with_name(f".{dst.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    if (src / schema.DATA_DIR).is_dir():
        shutil.copytree(src / schema.DATA_DIR, staging / schema.DATA_DIR)
    for split in schema.SPLITS:
        schema.trial_split_dir(staging, split).mkdir(parents=True, exist_ok=True)
        for file in schema.trial_split_files(src, split):
            writer = None
            for batch in pq.ParquetFile(file).iter_batches():
                table = pa.Table.from_batches([batch])
                for modality, (lookup, width) in lookups.items():
                    column = COLUMN_OF[modality]
                    lists = table.column(column).combine_chunks()
                    report[modality]["folded_events"] += int((lookup[lists.flatten().flatten().to_numpy().astype(np.int64)] == width - 1).sum())
                    new, merged = _remap(lists, lookup, width)
                    report[modality]["merged_in_visit"] += merged
                    table = table.set_column(table.schema.get_field_index(column), table.schema.field(column), new)
                writer = writer or pq.ParquetWriter(schema.trial_split_dir(staging, split) / file.name, table.schema, compression="zstd")
                writer.write_table(table)
            if writer is not None:
                writer.close()
    vocab = dict(meta.vocab) | {m: w for m, (_, w) in lookups.items()}
    meta.vocab = vocab
    meta.provenance = {**meta.provenance, "top_codes": {"source": str(src.resolve()), "keep": keep, "report": report}}
    meta.write(staging)
    pq.write_table(pa.concat_tables(new_codes).cast(schema.CODES_SCHEMA), staging / schema.CODES_PARQUET)
    staging.rename(dst)
    return report
