"""Streaming input: one split of a dataset as a Ray Dataset, and its rows as SequenceBatch.

Data flow (data-formats.md section 6)::

    data/<split>/*.parquet  --footers (driver, at read_split)-->  read units: row groups
        packed to <= 262,144 patients  --one read task per unit: decode the needed columns,
        validate, length filter, project-->  one block per unit  --streaming_split per train
        worker-->  iter_sequence_batches  --collate in Ray's prefetch threads-->  SequenceBatch

* Row groups are the unit of read parallelism. Read tasks ask for ``read_cpus`` (default
  0.25) so that, on a small box, train workers holding one CPU each do not starve the reads;
  at most one read task per cluster CPU runs at a time, because decoding is CPU-bound and
  every extra task in flight is one more worker process holding decode buffers (peak memory
  would then grow with the dataset). Small row groups are packed into one task: with one
  task per 59k-patient row group, per-task overhead made a pass ~2x slower.
* Why not ``ray.data.read_parquet``: in Ray 2.60 every execution (every epoch) of a
  ``read_parquet`` dataset first lists the files with a pool of footer-reader actors that
  it creates and kills again; on the 2-core dev machine that took several seconds before
  the first batch, every epoch (bench/bench_data.py measures both readers). Reading row
  groups ourselves projects columns in the Parquet scan all the same, and knows each row's
  position in its file, so validation errors name the exact file row.
* Validation (``mirror.data.validate.check_table``) and the length filter run inside the read
  tasks: the training process only slices batches and collates them. A violation stops the
  job with :class:`DatasetValidationError` naming file, row and rule. Each file's whole schema
  is checked from its footer; the rows are checked on the columns read (the view's, plus the
  per-patient ones, ``validation.columns_to_read``), so a diagnosis view never decodes labs.
* The length filter (seed 000: 1-100 words) is counted up front, exactly, from the length
  histogram in ``dataset.json``: :class:`FilterReport` says how many patients were kept and
  how many dropped, before any data is read, so it can be logged with the run.
* Collation runs in Ray's prefetch threads (``iter_torch_batches(collate_fn=...)``), so it
  overlaps with the training step, and Ray moves tensors to the train device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data.collate_fn import ArrowBatchCollateFn

from mirror.data import schema
from mirror.data import validate as validation

# torch (through collate and the batch contract) is imported lazily, where batches are made:
# read tasks unpickle this module in every Ray worker, and torch adds ~190 MB to each.
if TYPE_CHECKING:
    import torch

    from mirror.data.batch import SequenceBatch
    from mirror.data.collate import CollateConfig

logger = logging.getLogger(__name__)

READ_TASK_CPUS = 0.25  # fractional: schedulable beside train workers (data-formats 6.1)
READ_BATCH_ROWS = 16_384  # rows decoded and validated at a time inside a read task (~4 MB)
READ_TASK_ROWS = 262_144  # patients per read task, at most (~30 MB projected): one block


# --------------------------------------------------------------------------------------------
# The length filter, counted up front


@dataclass(frozen=True)
class FilterReport:
    """What the training length filter keeps and drops from one split (exact counts)."""

    split: str
    min_words: int
    max_words: int
    patients: int  # in the split (dataset.json)
    kept: int
    dropped_too_short: int  # fewer than min_words words
    dropped_too_long: int  # more than max_words words

    @property
    def dropped(self) -> int:
        return self.dropped_too_short + self.dropped_too_long

    def dropped_by_reason(self) -> dict[str, int]:
        """Dropped patients per reason (the view contract's filter report)."""
        return {"too_short": self.dropped_too_short, "too_long": self.dropped_too_long}

    def as_dict(self) -> dict[str, int | str]:
        """Flat dict for run parameters (MLflow)."""
        return asdict(self)

    def steps_per_epoch(self, world_size: int, batch_size: int) -> int:
        """Full batches every rank gets from ``streaming_split(world_size, equal=True)``.

        Under DDP, ranks must run the same number of steps or the epoch-end all-reduce hangs
        (data-formats.md 6.7): stop every rank after this many batches.
        """
        if world_size < 1 or batch_size < 1:
            raise ValueError(f"world_size and batch_size must be >= 1, got {world_size}, {batch_size}")
        return self.kept // world_size // batch_size

    def __str__(self) -> str:
        return (
            f"{self.split}: kept {self.kept:,} of {self.patients:,} patients with "
            f"{self.min_words}-{self.max_words} words; dropped {self.dropped_too_short:,} shorter "
            f"and {self.dropped_too_long:,} longer"
        )


def length_histogram(files: Sequence[str | Path]) -> dict[int, int]:
    """Patients per sentence length, from the ``n_events`` column alone (one file at a time).

    The fallback when ``dataset.json`` has no histogram for a split: a cheap pass that decodes
    a single int32 column.
    """
    counts: dict[int, int] = {}
    for file in files:
        for batch in pq.ParquetFile(file).iter_batches(columns=[schema.N_EVENTS]):
            values, n = np.unique(batch.column(0).to_numpy(), return_counts=True)
            for value, count in zip(values.tolist(), n.tolist(), strict=True):
                counts[value] = counts.get(value, 0) + count
    return counts


def filter_report(
    root: str | Path,
    split: str,
    *,
    min_words: int = schema.MIN_WORDS,
    max_words: int = schema.MAX_WORDS,
    metadata: schema.DatasetMetadata | None = None,
) -> FilterReport:
    """Exact counts of the length filter on ``split``, from ``dataset.json``'s histogram."""
    if not 0 <= min_words <= max_words:
        raise ValueError(f"length filter: need 0 <= min_words <= max_words, got {min_words}, {max_words}")
    metadata = metadata or schema.DatasetMetadata.read(root)
    raw = metadata.length_histogram.get(split)
    if raw:
        histogram = {int(length): count for length, count in raw.items()}
    else:
        logger.warning("%s: no length histogram for %r; counting n_events", root, split)
        histogram = length_histogram(schema.split_files(root, split))
    patients = metadata.patients.get(split, 0)
    if sum(histogram.values()) != patients:
        raise ValueError(
            f"{Path(root) / schema.DATASET_JSON}: length_histogram[{split!r}] counts "
            f"{sum(histogram.values()):,} patients but patients[{split!r}] is {patients:,}"
        )
    lengths = np.fromiter(histogram.keys(), dtype=np.int64, count=len(histogram))
    counts = np.fromiter(histogram.values(), dtype=np.int64, count=len(histogram))
    too_short = int(counts[lengths < min_words].sum())
    too_long = int(counts[lengths > max_words].sum())
    return FilterReport(
        split=split,
        min_words=min_words,
        max_words=max_words,
        patients=patients,
        kept=patients - too_short - too_long,
        dropped_too_short=too_short,
        dropped_too_long=too_long,
    )


# --------------------------------------------------------------------------------------------
# Reading a split


def read_units(
    root: str | Path, files: Sequence[str | Path], *, unit_rows: int = READ_TASK_ROWS
) -> list[dict[str, list[dict[str, str | int]]]]:
    """Row groups packed, in file order, into read units of at most ``unit_rows`` patients.

    A unit is one read task, and its output one Ray block (Ray merges what a task yields up
    to 128 MiB); a row group larger than ``unit_rows`` is a unit of its own. Its ``pieces``
    are (path, file, row group, first file row of the row group). Only Parquet footers are
    read (in the calling process). Small row groups are packed so that tasks are not mostly
    overhead; units are also what ``streaming_split`` deals out to workers.
    """
    units: list[dict[str, list[dict[str, str | int]]]] = []
    pieces: list[dict[str, str | int]] = []
    rows_in_unit = 0
    for path in files:
        file = _relative(str(path), str(root))
        try:
            metadata = pq.read_metadata(path)
        except (pa.ArrowException, OSError) as e:
            raise validation.DatasetValidationError(
                [validation.Violation(file, None, None, validation.UNREADABLE, f"not a Parquet file: {e}")]
            ) from e
        first_row = 0
        for row_group in range(metadata.num_row_groups):
            rows = metadata.row_group(row_group).num_rows
            if pieces and rows_in_unit + rows > unit_rows:
                units.append({"pieces": pieces})
                pieces, rows_in_unit = [], 0
            if rows:
                pieces.append({"path": str(path), "file": file, "row_group": row_group, "first_row": first_row})
                rows_in_unit += rows
            first_row += rows
    if pieces:
        units.append({"pieces": pieces})
    return units


class _ReadRowGroups:
    """The read task: row groups -> validated, length-filtered, projected Arrow tables.

    A generator UDF, so row groups leave the task in ``batch_rows`` slices (bounded memory,
    streaming), each validated with its exact file row (``first_row``) before it is yielded.
    """

    def __init__(
        self,
        *,
        split: str,
        n_weeks: int,
        vocab: dict[str, int],
        modalities: list[str],
        read_columns: list[str],
        columns: list[str],
        min_words: int,
        max_words: int,
        validate: bool,
        batch_rows: int,
    ) -> None:
        self.split, self.n_weeks, self.validate = split, n_weeks, validate
        self.vocab, self.modalities = vocab, modalities
        self.read_columns, self.columns = read_columns, columns
        self.min_words, self.max_words, self.batch_rows = min_words, max_words, batch_rows

    def __call__(self, units: pa.Table) -> Iterator[pa.Table]:
        # Arrow's allocator keeps freed pages; a worker that decoded a unit would otherwise sit
        # on ~250 MB until it dies. Hand back what the previous task (and this one) left.
        pool = pa.default_memory_pool()
        pool.release_unused()
        for unit in units.column("pieces").to_pylist():  # one unit per task (batch_size=1)
            for piece in unit:
                yield from self._read(piece["path"], piece["file"], piece["row_group"], piece["first_row"])
        pool.release_unused()

    def _read(self, path: str, file: str, row_group: int, first_row: int) -> Iterator[pa.Table]:
        try:
            parquet = pq.ParquetFile(path)
            if self.validate and (problems := validation.schema_violations(parquet.schema_arrow, file)):
                raise validation.DatasetValidationError(problems)
            batches = parquet.iter_batches(
                batch_size=self.batch_rows, row_groups=[row_group], columns=self.read_columns
            )
            previous_subject: int | None = None
            for batch in batches:
                if self.validate:
                    found = validation.check_table(
                        batch, n_weeks=self.n_weeks, file=file, first_row=first_row,
                        split=self.split, previous_subject_id=previous_subject, vocab=self.vocab,
                        modalities=self.modalities, columns=self.read_columns,
                    )
                    if found:
                        raise validation.DatasetValidationError(found)
                    previous_subject = batch.column(schema.SUBJECT_ID)[-1].as_py()
                first_row += batch.num_rows
                n_events = batch.column(schema.N_EVENTS).to_numpy()
                keep = (n_events >= self.min_words) & (n_events <= self.max_words)
                if not keep.all():
                    batch = batch.filter(pa.array(keep))
                if batch.num_rows:
                    yield pa.Table.from_batches([batch.select(self.columns)])
        except (pa.ArrowException, OSError) as e:
            raise validation.DatasetValidationError(
                [validation.Violation(file, first_row, None, validation.UNREADABLE, f"cannot decode: {e}")]
            ) from e


def _relative(path: str, root: str) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path


def read_split(
    root: str | Path,
    split: str,
    *,
    columns: Sequence[str] = tuple(schema.MODEL_COLUMNS),
    min_words: int = schema.MIN_WORDS,
    max_words: int = schema.MAX_WORDS,
    validate: bool = True,
    shuffle_files: bool = False,
    shuffle_seed: int | None = None,
    read_cpus: float = READ_TASK_CPUS,
    rows_per_read_task: int = READ_TASK_ROWS,
    read_concurrency: int | None = None,
) -> tuple[ray.data.Dataset, FilterReport]:
    """One split as a lazy Ray Dataset of patient rows, and what its length filter drops.

    Rows keep ``columns`` (default ``schema.MODEL_COLUMNS``, what collate needs) and
    ``min_words <= n_events <= max_words``. With ``validate`` every row is checked against
    the dataset rules on the columns read (``validation.check_table``; the other modalities
    are left to ``jobs/validate.py``) as it is read; the first violation raises
    ``DatasetValidationError`` naming file, row and rule. ``shuffle_files`` randomises the
    order of row groups on every execution (epoch); ``shuffle_seed`` makes that sequence of
    orders reproducible. ``read_cpus`` and ``rows_per_read_task`` size the read tasks (the
    latter is also the granularity at which ``streaming_split`` deals rows to workers);
    ``read_concurrency`` caps tasks in flight (default: the cluster's CPUs, at most one per unit). Only Parquet
    footers are read here (and Ray is started if it is not yet); rows are read when iterated.
    """
    root = Path(root).resolve()
    metadata = schema.DatasetMetadata.read(root)
    report = filter_report(root, split, min_words=min_words, max_words=max_words, metadata=metadata)
    files = schema.split_files(root, split)
    if not files:
        raise FileNotFoundError(f"{schema.split_dir(root, split)}: no Parquet shards for {split!r}")
    if rows_per_read_task < 1 or read_cpus <= 0 or (read_concurrency is not None and read_concurrency < 1):
        raise ValueError(
            "read tasks: need rows_per_read_task >= 1, read_cpus > 0, read_concurrency >= 1; "
            f"got {rows_per_read_task}, {read_cpus}, {read_concurrency}"
        )
    columns = list(columns)
    unknown = sorted(set(columns) - set(schema.ROW_SCHEMA.names))
    if unknown:
        raise ValueError(f"columns: unknown {unknown}; valid columns are {schema.ROW_SCHEMA.names}")
    # Read what is kept, plus n_events to filter; validation adds the per-patient columns its
    # rules on the kept columns need, and checks what was read (other modalities stay unread).
    if validate:
        read_columns = validation.columns_to_read(columns)
    else:
        read_columns = [c for c in schema.ROW_SCHEMA.names if c in columns or c == schema.N_EVENTS]

    units = read_units(root, files, unit_rows=rows_per_read_task)
    dataset = ray.data.from_items(units, override_num_blocks=len(units))
    if shuffle_files:
        seed = None
        if shuffle_seed is not None:
            seed = ray.data.RandomSeedConfig(seed=shuffle_seed, reseed_after_execution=True)
        dataset = dataset.randomize_block_order(seed=seed)
    read = _ReadRowGroups(  # imported datasets keep their source splits: no id rule for them
        split=split if metadata.provenance.get("splits") != "source" else None, n_weeks=metadata.n_weeks, vocab=metadata.vocab, modalities=metadata.modalities,
        read_columns=read_columns, columns=columns,
        min_words=min_words, max_words=max_words, validate=validate,
        batch_rows=READ_BATCH_ROWS,
    )
    # Decoding is CPU-bound: more concurrent read tasks than CPUs only adds worker processes,
    # each holding a unit's decode buffers, so memory would grow with the task count.
    if read_concurrency is None:
        if not ray.is_initialized():
            ray.init()  # as Ray Data would on first use; honours RAY_ADDRESS
        read_concurrency = max(1, min(len(units), int(ray.cluster_resources().get("CPU", 1))))
    # An instance, not the class: a class would make Ray start an actor pool.
    dataset = dataset.map_batches(
        read, batch_format="pyarrow", batch_size=1, num_cpus=read_cpus,
        compute=ray.data.TaskPoolStrategy(size=read_concurrency),
    )
    # Surface DatasetValidationError (and any other read error) as itself rather than as
    # Ray's generic UserCodeException, for this dataset and those derived from it.
    dataset.context.raise_original_map_exception = True
    logger.info("read_split %s: %d files, %d row groups; %s", root, len(files), len(units), report)
    return dataset, report


# --------------------------------------------------------------------------------------------
# Batches for the training loop


class SequenceCollateFn(ArrowBatchCollateFn):
    """``collate`` as a Ray collate_fn: runs in the iterator's prefetch threads.

    Returns a dict of tensors (not the dataclass) so Ray's finalize step can move it to the
    train device and pin memory.
    """

    def __init__(self, config: CollateConfig, epoch: int = 0) -> None:
        self.config, self.epoch = config, epoch

    def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
        from mirror.data.collate import collate

        return collate(batch, self.config, epoch=self.epoch).as_dict()


def iter_batches(
    source: ray.data.Dataset | ray.data.DataIterator,
    batch_size: int,
    *,
    collate_fn: ArrowBatchCollateFn,
    make_batch: Callable[[dict[str, torch.Tensor]], Any],
    prefetch_batches: int = 2,
    drop_last: bool = False,
    device: str | torch.device = "auto",
    pin_memory: bool = False,
) -> Iterator[Any]:
    """Iterate a Dataset or a worker's shard (``ray.train.get_dataset_shard``) as batches.

    ``collate_fn`` turns Arrow rows into a dict of tensors in Ray's prefetch threads; Ray moves
    them to the device (``"auto"``: the Ray Train worker's, else CPU); ``make_batch`` wraps the
    dict in the view's batch dataclass. A read task's DatasetValidationError surfaces as itself.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    batches = source.iter_torch_batches(
        batch_size=batch_size,
        collate_fn=collate_fn,
        prefetch_batches=prefetch_batches,
        drop_last=drop_last,
        device=device,
        pin_memory=pin_memory,
    )
    try:
        for tensors in batches:
            yield make_batch(tensors)
    except Exception as error:
        found = validation_error_in(error)
        if found is None:
            raise
        raise found from error


def iter_sequence_batches(
    source: ray.data.Dataset | ray.data.DataIterator,
    batch_size: int,
    *,
    config: CollateConfig,
    epoch: int = 0,
    **options: Any,
) -> Iterator[SequenceBatch]:
    """Sentence batches (:class:`SequenceBatch`); ``epoch`` changes the training mask (same
    seed, new epoch, new masked words). ``options`` as for :func:`iter_batches`."""
    from mirror.data.batch import SequenceBatch

    return iter_batches(
        source, batch_size, collate_fn=SequenceCollateFn(config, epoch),
        make_batch=SequenceBatch.from_dict, **options,
    )


def validation_error_in(error: BaseException) -> validation.DatasetValidationError | None:
    """The DatasetValidationError a read task raised, out of Ray's wrappers, or None.

    Ray wraps exceptions from read tasks in RayTaskError; a training loop should see the data
    error itself. It is rebuilt from its violations because the exception does not survive
    pickling intact (unpickling passes the formatted message back in as the violations).
    """
    seen: set[int] = set()
    stack: list[BaseException | None] = [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, validation.DatasetValidationError):
            return validation.DatasetValidationError(current.violations)
        stack += [current.__cause__, current.__context__, getattr(current, "cause", None)]
    return None
