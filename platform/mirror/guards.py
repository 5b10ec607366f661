"""Refusals before any work: bad arguments, unsafe names, data loss, merged runs.

Every job calls these before Ray starts or an MLflow run is opened, so a mistake costs one
line on stderr (``error: ...``, exit 2), not minutes of cluster time, a half-written output or
a run whose history mixes two experiments. Each check raises :class:`GuardError` with a
message that names the argument, file or run and the rule it broke.

* Names: :func:`check_run_name` (run names become directory names and MLflow filter values).
* Numbers: counts given on the command line (the loop's own config checks its numbers in
  ``mirror.train.spec``: ``train.epochs=0`` would start workers, then fail).
* Inputs: :func:`check_dataset_dir`, :func:`check_dataset_rows`
  (schema from Parquet footers, split membership from the ``subject_id`` column only).
* Outputs: :func:`check_empty_output` and :func:`staged_output` (write beside, then rename;
  only what this process created is ever deleted); :func:`owned_dataset_files` (what
  ``generate --overwrite`` may delete).
* Runs: :class:`RunLock` (one ``jobs/train.py`` per run name), :func:`check_resume_compatible`
  (a re-used name must continue the same model), :func:`run_guarded` (every run this job
  opens ends FINISHED, FAILED or KILLED).
* Services: :func:`check_tracking_reachable`, :func:`check_run_exists`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirror.storage import is_remote

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
TRACKING_TIMEOUT_S = 5.0
LOCK_SUFFIX = ".lock"


class GuardError(ValueError):
    """A refusal: one line naming what was wrong and the rule. Jobs print it and exit 2."""


# --------------------------------------------------------------------------------------------
# Names and numbers


@contextmanager
def exit_on_refusal(*refusals: type[Exception]) -> Iterator[None]:
    """A job's refusal (a :class:`GuardError`, or the domain errors it names) ends the job
    with one line on stderr and exit status 2; any other exception keeps its traceback."""
    try:
        yield
    except (GuardError, *refusals) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def check_run_name(name: str, flag: str = "--run-name") -> None:
    """A run name is a directory under the storage path and a value in MLflow filter strings,
    so it must be a plain file name: no separators, no ``..``, no quotes or spaces."""
    if not RUN_NAME.fullmatch(name) or ".." in name:
        raise GuardError(
            f"{flag} {name!r}: expected 1-128 letters, digits, '_', '.', '-' starting with a "
            "letter or digit, without '..' (it names a directory and an MLflow run)"
        )


def check_positive(flag: str, value: int | float | None, minimum: int = 1) -> None:
    """A count given on the command line (``--patients``, ``--workers``, ``--actors``)."""
    if value is not None and value < minimum:
        raise GuardError(f"{flag}: expected >= {minimum}, received {value}")


# --------------------------------------------------------------------------------------------
# Inputs


def check_dataset_dir(path: str, flag: str = "--data") -> None:
    """``path`` is a dataset directory with a readable ``metadata/dataset.json``."""
    if is_remote(path):
        return
    from mirror.data.schema import DATASET_JSON, DatasetMetadata

    root = Path(path)
    if not root.exists():
        raise GuardError(f"{flag} {path}: no such directory")
    if not root.is_dir():
        raise GuardError(f"{flag} {path}: is a file, expected a dataset directory (holding metadata/ and data/)")
    if not (root / DATASET_JSON).is_file():
        raise GuardError(f"{flag} {path}: {DATASET_JSON} is missing; is it a mirror dataset directory?")
    try:
        DatasetMetadata.read(root)
    except (ValueError, TypeError, OSError) as err:
        raise GuardError(f"{flag} {path}: {err}") from None


def check_dataset_rows(root: str, splits: tuple[str, ...] | None = None) -> None:
    """Refuse data the workers would reject later, before they start.

    * Schema, from each shard's Parquet footer (no rows read): a missing, mistyped or extra
      column (``ssn``) names the file.
    * Split membership, from the ``subject_id`` column only, one row group at a time: a
      patient sits in the split ``splits.split_codes`` assigns, so none can be in two splits
      (today's failure: train passes, evaluate meets the duplicate in held_out). Memory is one
      row group's ids (262,144 x 8 bytes); time is linear in N: ~50M ids/s on one core of
      the 2-core dev box (zstd, dense sorted ids: ~2 bytes read per patient), so ~2 s plus
      ~200 MB of reads at 100M patients.
    """
    if is_remote(root):
        return
    import numpy as np
    import pyarrow.parquet as pq

    from mirror.data import schema
    from mirror.data.splits import SPLIT_CODES, split_codes
    from mirror.data.validate import schema_violations

    base = Path(root)
    names = {code: name for name, code in SPLIT_CODES.items()}
    # Imported datasets keep their source's splits (the importer refused a subject in two):
    # the id rule does not apply to them, as in validate.py and the reader.
    try:
        source_splits = schema.DatasetMetadata.read(base).provenance.get("splits") == "source"
    except (FileNotFoundError, ValueError):
        source_splits = False
    for split in splits or schema.SPLITS:
        for path in schema.split_files(base, split):
            rel = path.relative_to(base).as_posix()
            try:
                parquet = pq.ParquetFile(path)
            except Exception as err:  # noqa: BLE001 (pyarrow raises several types)
                raise GuardError(f"{root}: {rel}: unreadable: not a Parquet file ({err})") from None
            with parquet:
                problems = schema_violations(parquet.schema_arrow, rel)
                if problems:
                    raise GuardError(f"{root}: {problems[0]} (checked before training starts)")
                row = 0
                for group in range(parquet.num_row_groups):
                    ids = parquet.read_row_group(group, columns=[schema.SUBJECT_ID]).column(0).to_numpy()
                    if ids.size and ids.min() < 0:
                        bad = int(np.flatnonzero(ids < 0)[0])
                        raise GuardError(f"{root}: {rel} row {row + bad}: split: negative subject id {ids[bad]}")
                    wrong = np.flatnonzero(split_codes(ids) != SPLIT_CODES[split]) if not source_splits \
                        else np.empty(0, np.int64)
                    if wrong.size:
                        i = int(wrong[0])
                        home = names[int(split_codes(ids[i : i + 1])[0])]
                        raise GuardError(
                            f"{root}: {rel} row {row + i} (subject {ids[i]}): split: in {split!r} but "
                            f"belongs to {home!r}; a patient may appear in one split only"
                        )
                    row += ids.size


# --------------------------------------------------------------------------------------------
# Outputs


def check_storage_dir(path: str, flag: str = "--storage-path") -> None:
    """Checkpoints and locks go under it, so it must be a directory (or not exist yet)."""
    if not is_remote(path) and Path(path).exists() and not Path(path).is_dir():
        raise GuardError(f"{flag} {path}: is a file, expected a directory for checkpoints")


def check_empty_output(path: str, flag: str = "--out") -> None:
    """An output directory must not exist yet or be empty: re-running into it would mix old
    and new files (embed appended 7,202 rows for 3,601 patients)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise GuardError(f"{flag} {path}: is a file, expected a directory")
    if out.is_dir() and any(out.iterdir()):
        raise GuardError(f"{flag} {path}: directory is not empty; choose a new one or remove it first")


@contextmanager
def staged_output(out: str | Path) -> Iterator[Path]:
    """Yield a new, uniquely named directory beside ``out`` that this process created; on
    success it becomes ``out`` (which must be absent or empty), on failure it is removed.
    Nothing else is ever deleted, so a user's ``out.staging`` or ``out`` stays as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    staging.rename(out)  # fails (and keeps both) if someone filled ``out`` meanwhile


# --------------------------------------------------------------------------------------------
# Runs: one writer per name, same model on resume, every run ends


@dataclass
class RunLock:
    """``<storage>/<run name>.lock``, created with ``O_EXCL``: a second ``jobs/train.py`` with
    the same run name is refused instead of logging every metric twice into one MLflow run.
    The file holds pid and host; a lock whose process is gone (same host) is stale and taken
    over. Remote storage (``s3://``) has no atomic create and is not locked."""

    path: Path | None

    @classmethod
    def acquire(cls, storage: str, run_name: str) -> RunLock:
        if is_remote(storage):
            return cls(None)
        path = Path(storage) / f"{run_name}{LOCK_SUFFIX}"
        path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_lock(path)
                if holder is not None and _stale(holder):
                    _remove_stale(path, holder, me)  # its process is gone: take it over
                    continue
                who = (
                    f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
                    if holder
                    else "an unreadable lock"
                )
                raise GuardError(
                    f"--run-name {run_name}: another jobs/train.py is running it ({who}); wait for it "
                    f"to finish, choose another name, or delete {path} if that process is gone"
                ) from None
            with os.fdopen(fd, "w") as file:
                json.dump(me, file)
            return cls(path)
        raise GuardError(f"--run-name {run_name}: could not take the lock {path}")

    def release(self) -> None:
        if self.path is not None:
            holder = _read_lock(self.path)
            if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                self.path.unlink(missing_ok=True)
            self.path = None


def _remove_stale(path: Path, holder: dict[str, Any], me: dict[str, Any]) -> None:
    """Remove a stale lock, but only while holding ``<lock>.takeover`` (also ``O_EXCL``): two
    jobs that find the same stale lock cannot both remove it, nor one remove the other's
    fresh lock. The loser just tries ``O_EXCL`` again and finds the winner's lock."""
    guard = path.with_name(path.name + ".takeover")
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        other = _read_lock(guard)
        if other is not None and _stale(other):
            guard.unlink(missing_ok=True)  # a takeover that died half-way
        return
    try:
        with os.fdopen(fd, "w") as file:
            json.dump(me, file)
        if _read_lock(path) == holder:  # still the stale one, not a lock taken meanwhile
            path.unlink(missing_ok=True)
    finally:
        guard.unlink(missing_ok=True)


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stale(holder: dict[str, Any]) -> bool:
    """Only a lock of this host can be proven stale (its pid no longer exists)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def latest_checkpoint(storage: str, run_name: str) -> Path | None:
    """The newest checkpoint directory Ray Train keeps for ``run_name`` (None if none)."""
    if is_remote(storage):
        return None
    run_dir = Path(storage) / run_name
    found = [p.parent for p in run_dir.glob("*/checkpoint.pt")] + [p.parent for p in run_dir.glob("*/*/checkpoint.pt")]
    return max(found, key=lambda p: (p.name, p.stat().st_mtime)) if found else None


def check_resume_compatible(spec: Any, storage: str, uri: str) -> None:
    """Re-using a run name continues that run, so it must be the same model with parameters of
    the same shapes; otherwise Ray would retry a ``state_dict`` mismatch and the earlier run's
    MLflow status would flip. Checked against the MLflow run of that name (model) and the
    newest checkpoint under the storage path (model and every parameter shape)."""
    from mirror import tracking
    from mirror.checkpoint import CHECKPOINT_TAG

    existing = tracking.find_run(spec.run_name, spec.train.experiment, uri)
    if existing is not None:
        run = tracking.get_run(existing, uri=uri)
        earlier = run.data.params.get("model")
        if earlier and earlier != spec.model:
            raise GuardError(
                f"--run-name {spec.run_name}: MLflow run {existing} of that name trained model "
                f"{earlier!r}, not {spec.model!r}; choose another --run-name (re-using a name resumes it)"
            )
        kept = run.data.tags.get(CHECKPOINT_TAG)  # absolute
        here = Path(storage) / spec.run_name
        if kept and not is_remote(kept) and not is_remote(storage) and here.resolve() not in Path(kept).resolve().parents:
            raise GuardError(
                f"--run-name {spec.run_name}: MLflow run {existing} of that name keeps its checkpoints "
                f"in {Path(kept).parent}, not under --storage-path {storage}; resume it with that "
                "storage path, or choose another --run-name (its history would mix two runs)"
            )
    checkpoint = latest_checkpoint(storage, spec.run_name)
    if checkpoint is None:
        return

    from mirror.checkpoint import load_state
    from mirror.models import build_model, get_model_spec

    state = load_state(checkpoint)
    where = f"--run-name {spec.run_name}: the checkpoint {checkpoint}"
    saved = state.get("spec", {})
    if saved.get("model") != spec.model:
        raise GuardError(
            f"{where} is of model {saved.get('model')!r}, not {spec.model!r}; choose another "
            "--run-name (re-using a name resumes it)"
        )
    info = get_model_spec(spec.model).view.info_cls(**state["data_info"])
    fresh = build_model(spec.model, spec.model_config, info).state_dict()
    old = state["model"]
    for key in sorted(set(fresh) | set(old)):
        if key not in old or key not in fresh or tuple(old[key].shape) != tuple(fresh[key].shape):
            changed = {
                k: (v, spec.model_config.get(k))
                for k, v in saved.get("model_config", {}).items()
                if spec.model_config.get(k) != v
            }
            diff = ", ".join(f"model.{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items())) or "shapes"
            raise GuardError(
                f"{where} does not fit this config ({diff}; parameter {key!r} "
                f"{tuple(old[key].shape) if key in old else 'absent'} vs "
                f"{tuple(fresh[key].shape) if key in fresh else 'absent'}); choose another --run-name"
            )


def run_guarded(
    run_name: str, experiment: str, storage: str, uri: str, body: Callable[[], int]
) -> int:
    """Run ``body`` holding the run's lock, then make sure the MLflow run of ``run_name`` does
    not stay RUNNING: FINISHED when ``body`` returns 0, KILLED on Ctrl-C, FAILED otherwise.
    A run that is no longer RUNNING (evaluation finished it, the driver marked it FAILED, or
    it is an earlier run this job never reopened) is left as it is."""
    lock = RunLock.acquire(storage, run_name)
    status = "FAILED"
    try:
        rc = body()
        status = "FINISHED" if rc == 0 else "FAILED"
        return rc
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            close_run(run_name, experiment, uri, status)
        except Exception as err:  # noqa: BLE001 (the tracking server may be the failure)
            print(f"warning: could not end MLflow run {run_name!r} as {status}: {err}", file=sys.stderr)
        finally:
            lock.release()


def close_run(run_name: str, experiment: str, uri: str, status: str) -> str | None:
    """End the run named ``run_name`` with ``status`` if it is still RUNNING; its id or None.
    Only called under the run's lock, so a RUNNING run of that name is this job's."""
    from mirror import tracking

    run_id = tracking.find_run(run_name, experiment, uri)
    if run_id is not None and tracking.get_run(run_id, uri=uri).info.status == "RUNNING":
        tracking.end_run(run_id, status=status, uri=uri)
    return run_id


# --------------------------------------------------------------------------------------------
# Services


def check_tracking_reachable(uri: str, timeout_s: float = TRACKING_TIMEOUT_S) -> None:
    """An unreachable tracking server would surface minutes later, inside a worker, as a
    chained traceback; ask it once with a short timeout instead. A sqlite store needs its
    directory."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s):
                return
        except urllib.error.HTTPError as err:
            if err.code in (401, 403):
                return  # it answers; credentials are MLflow's own business
            if err.code == 404:  # an older server without /health: try the REST API
                try:
                    with urllib.request.urlopen(
                        uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1",
                        timeout=timeout_s,
                    ):
                        return
                except urllib.error.HTTPError as api_err:
                    if api_err.code in (400, 401, 403):
                        return
                except (urllib.error.URLError, OSError):
                    pass
            raise GuardError(
                f"MLFLOW_TRACKING_URI={uri}: the tracking server answered HTTP {err.code}; is it an MLflow server?"
            ) from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise GuardError(
                f"MLFLOW_TRACKING_URI={uri}: cannot reach the tracking server ({reason}); start it "
                "or point MLFLOW_TRACKING_URI at a running one"
            ) from None
    elif uri.startswith("sqlite:///"):
        directory = Path(uri[len("sqlite:///") :]).parent
        if not directory.is_dir():
            raise GuardError(f"MLFLOW_TRACKING_URI={uri}: directory {directory} does not exist")


def check_run_exists(run_id: str, uri: str, flag: str = "--run") -> None:
    """``--run`` names an MLflow run of this tracking store."""
    from mirror import tracking

    try:
        tracking.get_run(run_id, uri=uri)
    except Exception as err:  # noqa: BLE001 (MlflowException, or a malformed id)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise GuardError(f"{flag} {run_id}: no such MLflow run in {uri} ({first[:160]})") from None


# --------------------------------------------------------------------------------------------
# Sweeps

# What the loop itself reports every epoch for any model (``loop.epoch_metrics``), besides
# ``train/<unit>`` and ``train/<unit>_per_s`` for a view whose unit is not patients.
LOOP_METRICS = ("train/steps_per_rank", "train/drained_patients", "train/patients_per_s", "val/patients")


def loop_metrics(unit: str) -> tuple[str, ...]:
    return LOOP_METRICS + (() if unit == "patients" else (f"train/{unit}", f"train/{unit}_per_s"))


def check_sweep_metric(source: str, metric: str, models: list[str] | tuple[str, ...]) -> None:
    """A sweep's ``metric`` must be reported by every trial, or Tune fails each trial after
    its first epoch (and used to leave the parent run KILLED and a child RUNNING)."""
    from mirror.models import get_model_spec

    for model in models:
        spec = get_model_spec(model)
        names = set(spec.metric_names) | set(loop_metrics(spec.view.unit))
        if metric not in names:
            raise GuardError(
                f"{source}: metric: {metric!r} is not reported by model {model!r}; it reports "
                f"{', '.join(sorted(names))}"
            )


def check_run_has_checkpoint(run_id: str, uri: str, flag: str = "--run") -> None:
    """``--run`` is a training run that finished with a checkpoint (not a sweep's parent)."""
    from mirror.checkpoint import CHECKPOINT_FILE, checkpoint_dir

    try:
        path = checkpoint_dir(run_id, uri)
    except ValueError as err:
        raise GuardError(f"{flag} {run_id}: {err}") from None
    if not (path / CHECKPOINT_FILE).is_file():
        raise GuardError(f"{flag} {run_id}: its checkpoint {path} is gone (checkpoint.pt missing)")


def check_trained_run(run_id: str, uri: str, *, needs: str | None = None, job: str = "") -> None:
    """What every job on a finished run checks first: the tracking server answers, the run
    exists and kept its checkpoint, and (with ``needs``) its model has that capability."""
    check_tracking_reachable(uri)
    check_run_exists(run_id, uri)
    check_run_has_checkpoint(run_id, uri)
    if needs is not None:
        check_run_capability(run_id, uri, needs, job)


def check_sample_overrides(run_id: str, uri: str, pairs: list[str]) -> dict[str, object]:
    """``--set`` pairs for drawing from a trained run, checked against its model's sampling
    options and its saved config before any sample is drawn; returned as ``model.*`` keys."""
    from mirror import tracking
    from mirror.checkpoint import checkpoint_dir, load_state
    from mirror.models import get_model_spec
    from mirror.train.spec import parse_set, sample_time_overrides

    try:
        overrides = parse_set(pairs)
        if overrides:
            model_spec = get_model_spec(tracking.get_run(run_id, uri=uri).data.tags["model"])
            saved = load_state(checkpoint_dir(run_id, uri))["spec"].get("model_config", {})
            sample_time_overrides(model_spec, overrides, saved)
    except (ValueError, TypeError, KeyError) as err:
        raise GuardError(str(err)) from None
    return overrides


def check_run_capability(run_id: str, uri: str, capability: str, job: str) -> None:
    """The run's model can do what ``job`` needs (e.g. ``embed`` needs an encoder); the
    refusal names the models that can."""
    from mirror import tracking
    from mirror.models import MissingCapability, get_model_spec, require_capability

    try:
        require_capability(get_model_spec(tracking.get_run(run_id, uri=uri).data.tags["model"]), capability, job)
    except (MissingCapability, KeyError, ValueError) as err:
        raise GuardError(f"--run {run_id}: {err}") from None


def check_run_dataset_metadata(run_id: str, uri: str, flag: str = "--run") -> None:
    """The run's dataset still has valid metadata: ``sample`` copies ``codes.parquet`` into
    every export, so a broken file (e.g. non-UTF-8 names) must stop it first."""
    from mirror import tracking
    from mirror.data.validate import check_codes, check_metadata

    data = tracking.get_run(run_id, uri=uri).data.params.get("data")
    if not data or is_remote(data):
        return
    meta, problems = check_metadata(data)
    problems += check_codes(data, meta.vocab if meta else None)
    if problems:
        raise GuardError(f"{flag} {run_id}: its dataset {data} is invalid: {problems[0]}")
