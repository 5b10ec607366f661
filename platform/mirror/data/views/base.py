"""The data-view contract: everything that depends on the shape of the data a model reads.

A view turns a dataset's splits into batches for one family of models:

* the columns it reads and the filter it applies, with exact kept and dropped counts;
* its collate into a batch dataclass that checks its own shapes;
* its config, the ``view.*`` keys of a run spec (a frozen dataclass that checks its own rules);
* the unit that validation sums are normalised by, and what throughput counts;
* how many optimisation steps an epoch has.

The training loop, the driver, sweeps and PBT get all of this from the view and never import
a batch class. A view is built on the driver (``view_cls(config, root)``), reads Parquet
footers and ``dataset.json`` there, and is pickled to the train workers, so it holds only
small, plain state.

Views to come (their issues): ``visits``
(per-visit groups of multi-hots), ``windows`` (per-window labs and treatment levels) and
``admissions`` (per-admission history, multi-label target, length of stay).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    import ray.data


class Batch(Protocol):
    """What the loop may ask of any view's batch."""

    @property
    def size(self) -> int:
        """Examples (patients, admissions, windows) in the batch."""
        ...

    def to(self, device: Any, non_blocking: bool = True) -> Batch: ...


class SplitReport(Protocol):
    """What a view's filter kept and dropped from one split, counted exactly."""

    split: str
    patients: int  # rows in the split before the filter
    kept: int

    def dropped_by_reason(self) -> dict[str, int]: ...


class DataView(ABC):
    """One way of reading a dataset. Subclasses set the class attributes and the methods."""

    name: ClassVar[str]
    config_cls: ClassVar[type]  # frozen dataclass of the view.* keys
    info_cls: ClassVar[type]  # frozen dataclass of the facts a model is built from
    # Validation sums are divided by this key of the model's eval_sums; "patients" is counted
    # by the loop itself, so views whose loss is per example need not report it.
    normaliser: ClassVar[str] = "patients"
    unit: ClassVar[str] = "patients"  # what units() counts, for throughput (e.g. "tokens")
    # view.* keys population-based training may change mid-run: ones that neither change a
    # parameter's shape nor which rows an epoch holds (so steps per epoch stay put).
    perturbable: ClassVar[tuple[str, ...]] = ()
    # What one generated patient is, for the scorecard and the privacy gate: "sentence" (codes
    # with ages and weeks) or "code_set" (each patient's set of codes: every set is reduced to
    # that before scoring, since such a generator has no ages or weeks to compare), or "trial"
    # (trial participants twinned from the real training split, written under trial/).
    record_type: ClassVar[str] = "sentence"

    def __init__(self, config: Any, root: str) -> None:
        self.config, self.root = config, root

    @classmethod
    def probe_info(cls) -> Any:
        """Facts of a small made-up dataset, to build a model without data (e.g. to compare
        parameter shapes across knob values)."""
        return cls.info_cls()

    @abstractmethod
    def info(self) -> Any:
        """The ``info_cls`` facts for this dataset and config (vocabulary sizes, lengths)."""

    @abstractmethod
    def read(self, split: str, *, purpose: str = "train") -> tuple[ray.data.Dataset, SplitReport]:
        """The split as a lazy Ray Dataset of filtered rows, and the filter's exact counts.
        ``purpose`` is ``train`` (the training filter) or ``inference`` (keep every row the
        model can take, e.g. to embed every patient)."""

    @abstractmethod
    def batches(
        self, source: Any, batch_size: int, *, training: bool, epoch: int = 0, seed: int = 0,
        device: Any = "auto",
    ) -> Iterator[Batch]:
        """Batches from a Dataset or a worker's shard. ``training`` applies training-only
        augmentation (masks, dropout of inputs), drawn from ``seed`` and ``epoch``."""

    def inference_batch(self, table: Any) -> tuple[Batch, Any]:
        """Rows read with ``purpose="inference"`` (an Arrow table) as one unaugmented batch, and
        a bool array of the rows the view had to cut to fit the model (counted by callers).
        Needed by views whose models are encoders (the embed job)."""
        raise NotImplementedError(f"the {self.name!r} view has no batch inference")

    def units(self, batch: Any) -> int:
        """What throughput counts in ``batch`` (``unit``): by default its examples."""
        return batch.size

    def steps_per_epoch(self, report: SplitReport, world_size: int, batch_size: int) -> int:
        """Full batches every rank gets from ``streaming_split(world_size, equal=True)``.

        Under DDP every rank must take the same number of steps, or the epoch-end all-reduce
        hangs: every rank stops after this many.
        """
        if world_size < 1 or batch_size < 1:
            raise ValueError(f"world_size and batch_size must be >= 1, got {world_size}, {batch_size}")
        return report.kept // world_size // batch_size

    def describe(self, report: SplitReport) -> str:
        dropped = ", ".join(f"{n:,} {reason.replace('_', ' ')}" for reason, n in report.dropped_by_reason().items())
        return f"{report.split}: kept {report.kept:,} of {report.patients:,} ({self.name} view); dropped {dropped or 'none'}"
