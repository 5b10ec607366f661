"""Streaming input on a real local Ray: projection, the counted length filter, validation on
read, and a two-consumer streaming_split pass that sees every training patient exactly once."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mirror.data import schema as S
from mirror.data import stream
from mirror.data.collate import CollateConfig, MaskSpec
from mirror.data.splits import SPLIT_CODES, split_codes
from mirror.data.validate import DatasetValidationError
from mirror.data.vocab import DIAG_AGE_VOCAB_SIZE, N_SPECIAL, age_group_at

N_WEEKS = 260
BROKEN = Path(__file__).parent / "data" / "broken"  # make_broken_corpus.py: whole records


def write_dataset(root: Path, lengths: np.ndarray, *, files_per_split: int = 3, seed: int = 0,
                  histogram: bool = True) -> S.DatasetMetadata:
    """A valid dataset by hand (no simulator): patient i has ``lengths[i]`` words."""
    rng = np.random.default_rng(seed)
    ids = np.arange(len(lengths))
    codes = split_codes(ids)
    patients, hist = {}, {}
    for split in S.SPLITS:
        members = ids[codes == SPLIT_CODES[split]]
        patients[split] = len(members)
        values, counts = np.unique(lengths[members], return_counts=True)
        hist[split] = {str(v): int(c) for v, c in zip(values, counts, strict=True)} if histogram else {}
        for shard, part in enumerate(np.array_split(members, files_per_split)):
            n = lengths[part].astype(np.int32)
            offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int32)
            row = np.repeat(np.arange(len(part)), n)
            weeks = rng.integers(0, N_WEEKS, int(offsets[-1]))
            weeks = weeks[np.lexsort((weeks, row))]  # sorted within each patient
            birth = rng.integers(-90 * 52, 0, len(part)).astype(np.int32)
            ages = age_group_at(weeks, birth[row])
            table = S.fill_missing_modalities(pa.table(
                {
                    S.SUBJECT_ID: pa.array(part, pa.int64()),
                    S.SEX: pa.array(np.where(part % 2 == 0, -1, 1).astype(np.int8)),
                    S.BIRTH_WEEK: pa.array(birth),
                    S.ENROLL_START: pa.array(np.zeros(len(part), np.int32)),
                    S.ENROLL_END: pa.array(np.full(len(part), N_WEEKS - 1, np.int32)),
                    S.N_EVENTS: pa.array(n),
                    S.CONDITIONS: pa.ListArray.from_arrays(offsets, pa.array(rng.integers(0, 605, len(row)).astype(np.int16))),
                    S.AGE_GROUPS: pa.ListArray.from_arrays(offsets, pa.array(ages.astype(np.int8))),
                    S.WEEKS: pa.ListArray.from_arrays(offsets, pa.array(weeks.astype(np.int32))),
                },
                schema=S.DIAGNOSIS_SCHEMA,
            ))
            path = S.shard_path(root, split, shard)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path, row_group_size=64)
    metadata = S.DatasetMetadata(
        name="stream-test", origin_date="2010-01-04", n_weeks=N_WEEKS, patients=patients,
        vocab={"diag_age": DIAG_AGE_VOCAB_SIZE, "week": N_SPECIAL + N_WEEKS},
        provenance={"writer": "tests/test_stream.py"}, length_histogram=hist,
    )
    metadata.write(root)
    return metadata


# Lengths 1..130: some beyond MAX_WORDS = 100, which the training filter must drop and count.
LENGTHS = (np.arange(1200) * 7919 % 130 + 1).astype(np.int32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stream") / "ds"
    write_dataset(root, LENGTHS)
    return root


def train_ids(lo: int, hi: int) -> set[int]:
    ids, n = np.arange(len(LENGTHS)), LENGTHS
    keep = (split_codes(ids) == SPLIT_CODES[S.TRAIN]) & (n >= lo) & (n <= hi)
    return set(ids[keep].tolist())


def test_filter_report_counts_exactly_from_the_histogram(dataset):
    in_train = split_codes(np.arange(len(LENGTHS))) == SPLIT_CODES[S.TRAIN]
    n = LENGTHS[in_train]
    report = stream.filter_report(dataset, S.TRAIN, min_words=5, max_words=100)
    assert report.patients == in_train.sum()
    assert report.dropped_too_short == (n < 5).sum() > 0
    assert report.dropped_too_long == (n > 100).sum() > 0
    assert report.kept == ((n >= 5) & (n <= 100)).sum()
    assert report.kept + report.dropped == report.patients
    assert "dropped" in str(report) and report.as_dict()["kept"] == report.kept


def test_filter_report_counts_the_files_when_the_histogram_is_missing(tmp_path):
    root = tmp_path / "nohist"
    write_dataset(root, LENGTHS[:300], histogram=False)
    with_hist = tmp_path / "hist"
    write_dataset(with_hist, LENGTHS[:300])
    assert stream.filter_report(root, S.TRAIN) == stream.filter_report(with_hist, S.TRAIN)


def test_filter_report_rejects_a_histogram_that_does_not_add_up(tmp_path):
    root = tmp_path / "bad"
    metadata = write_dataset(root, LENGTHS[:300])
    metadata.length_histogram[S.TRAIN]["1"] += 1
    metadata.write(root)
    with pytest.raises(ValueError, match=r"dataset.json: length_histogram\['train'\]"):
        stream.filter_report(root, S.TRAIN)


def test_streaming_split_two_consumers_see_every_training_patient_once(ray_cluster, dataset):
    # Small read tasks: several blocks to deal out, as a large dataset would have.
    ds, report = stream.read_split(dataset, S.TRAIN, rows_per_read_task=100)
    shards = ds.streaming_split(2, equal=False)
    config = CollateConfig(n_weeks=N_WEEKS, mask=MaskSpec(), seed=1)
    seen: list[list[int]] = [[], []]
    masked = [0, 0]
    errors: list[BaseException] = []

    def consume(rank: int) -> None:
        try:
            for batch in stream.iter_sequence_batches(shards[rank], 32, config=config, device="cpu"):
                assert batch.enc_dx.dtype == torch.int64 and batch.size <= 32
                assert int(batch.lengths.max()) <= S.MAX_WORDS
                seen[rank] += batch.subject_id.tolist()
                masked[rank] += int(batch.masked.sum())
        except BaseException as e:  # surfaced in the main thread below
            errors.append(e)

    workers = [threading.Thread(target=consume, args=(rank,)) for rank in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    assert not errors, errors
    assert all(seen), "both consumers must receive data"
    everyone = seen[0] + seen[1]
    assert len(everyone) == len(set(everyone)) == report.kept
    assert set(everyone) == train_ids(1, 100)
    assert sum(masked) > 0  # the training mask is applied on the way


def test_read_split_keeps_the_counted_patients_with_their_own_words(ray_cluster, dataset):
    ds, report = stream.read_split(dataset, S.HELD_OUT, min_words=5, max_words=100)
    assert ds.schema().names == S.MODEL_COLUMNS  # projection: only what collate reads
    by_id = {}
    for path in S.split_files(dataset, S.HELD_OUT):
        for row in pq.read_table(path).to_pylist():
            by_id[row[S.SUBJECT_ID]] = row
    n_batches = n_rows = 0
    for batch in stream.iter_sequence_batches(ds, 16, config=CollateConfig(n_weeks=N_WEEKS), device="cpu"):
        n_batches += 1
        n_rows += batch.size
        for i, sid in enumerate(batch.subject_id.tolist()):
            row = by_id.pop(sid)  # KeyError if a patient came twice
            n = row[S.N_EVENTS]
            assert 5 <= n <= 100 and batch.lengths[i] == n
            assert batch.tgt_wk[i, :n].tolist() == [N_SPECIAL + w for w in row[S.WEEKS]]
            assert batch.sex[i] == row[S.SEX]
    assert n_batches > 1 and n_rows == report.kept
    left = [r[S.N_EVENTS] for r in by_id.values()]  # exactly the ones the report counts
    assert sum(n < 5 for n in left) == report.dropped_too_short > 0
    assert sum(n > 100 for n in left) == report.dropped_too_long > 0
    assert len(left) == report.dropped


def test_read_split_stops_on_an_invalid_row_naming_file_row_and_rule(ray_cluster, tmp_path):
    root = tmp_path / "broken"
    write_dataset(root, LENGTHS[:600], files_per_split=2)
    shard = S.shard_path(root, S.TRAIN, 1)
    table = pq.read_table(shard)
    weeks = table.column(S.WEEKS).combine_chunks()
    values = weeks.values.to_numpy().copy()
    bad_row = 201  # in the fourth row group (64 rows each): its read task starts mid-file
    values[weeks.offsets[bad_row].as_py()] = N_WEEKS + 5  # its first event: out of range
    broken = pa.ListArray.from_arrays(weeks.offsets, pa.array(values))
    pq.write_table(table.set_column(table.schema.get_field_index(S.WEEKS), S.WEEKS, broken), shard)

    ds, _ = stream.read_split(root, S.TRAIN)
    with pytest.raises(DatasetValidationError) as error:
        for _ in stream.iter_sequence_batches(ds, 64, config=CollateConfig(n_weeks=N_WEEKS), device="cpu"):
            pass
    message = str(error.value)
    assert f"data/train/part-00001.parquet row {bad_row}" in message
    assert "week_range" in message


def test_projected_read_validates_the_columns_it_reads(ray_cluster):
    """A diagnosis view of whole records reads no lab column, so an implausible lab value
    (the corpus' lab_value_range case) passes it; a view that keeps labs stops on it, naming
    the file, row and rule."""
    root = BROKEN / "lab_value_range"
    expected = json.loads((root / "BROKEN.json").read_text())
    ds, report = stream.read_split(root, S.TRAIN)
    assert sum(b.num_rows for b in ds.iter_batches(batch_format="pyarrow")) == report.kept > 0
    assert stream.validation.columns_to_read(S.MODEL_COLUMNS) == [
        S.SUBJECT_ID, S.SEX, S.BIRTH_WEEK, S.ENROLL_START, S.ENROLL_END, S.N_EVENTS,
        S.CONDITIONS, S.AGE_GROUPS, S.WEEKS]
    ds, _ = stream.read_split(root, S.TRAIN, columns=[*S.MODEL_COLUMNS, S.LABS, S.LAB_VALUES])
    with pytest.raises(DatasetValidationError) as error:
        for _ in ds.iter_batches(batch_format="pyarrow"):
            pass
    assert (f"{expected['file']} row {expected['row']} (subject {expected['subject_id']}): "
            f"lab_value_range: LDL (lab 0) value 2.9") in str(error.value)
