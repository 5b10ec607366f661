"""Which files a dataset directory holds that a job of ours provably wrote.

``generate --overwrite`` deletes exactly those and refuses the whole overwrite when anything
else is there (a user's ``data/my_study_results.csv``): lose nothing a user put there. The
import and export jobs write into a staging directory and swap it in whole
(``check_output_dir``, ``replace_directory``).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from mirror.data import record, schema
from mirror.data.trial import COUNTERFACTUAL_DIR


class NotWrittenByGenerator(ValueError):
    """The directory, or a file in it, is not the generator's: nothing may be deleted."""


GENERATED_MARKER = ".written-by-mirror-generate"  # in metadata/, written before anything else
_SHARD = re.compile(r"part-\d{5}\.parquet")
_TOPS = (schema.DATA_DIR, schema.TRIAL_DIR, schema.METADATA_DIR, schema.GROUND_TRUTH_DIR)


def owned_dataset_files(root: Path, simulator_name: str) -> list[Path]:
    """Every file ``generate --overwrite`` may delete under ``root``; raises if the directory
    is not provably a dataset written by the simulator, or holds any file it did not write.

    Proof of authorship: ``metadata/dataset.json`` whose ``provenance.simulator`` is the
    simulator, or the marker the generator writes first (an interrupted generation). Then
    every file under ``data/``, ``trial/``, ``metadata/`` and ``ground_truth/`` must be one the
    generator writes (shards ``part-NNNNN.parquet``, ``dataset.json``, ``codes.parquet``, the
    simulator's and the trial's parameters); anything else, e.g. ``data/my_study_results.csv``,
    is the user's and the whole overwrite is refused.
    """
    meta_file, marker = root / schema.DATASET_JSON, root / schema.METADATA_DIR / GENERATED_MARKER
    proven = marker.is_file()
    if not proven and meta_file.is_file():
        try:
            proven = json.loads(meta_file.read_text()).get("provenance", {}).get("simulator") == simulator_name
        except (ValueError, OSError, AttributeError):
            proven = False
    if not proven:
        raise NotWrittenByGenerator(
            f"--overwrite {root}: not a dataset written by jobs/generate.py (no {schema.DATASET_JSON} "
            f"from the simulator, no {schema.METADATA_DIR}/{GENERATED_MARKER}); refusing to delete "
            "anything there"
        )
    allowed_meta = {"dataset.json", "codes.parquet", GENERATED_MARKER}
    allowed_truth = {"params.json", "params.npz", "trial_params.json"}
    # ground_truth/<name>/<split>/part-*.parquet: the latent state, the record stage's truth
    # and the trial's counterfactual twins.
    sharded_truth = {"latent", *record.TRUTH_SCHEMAS, COUNTERFACTUAL_DIR}
    owned: list[Path] = []
    for top in _TOPS:
        for path in sorted((root / top).rglob("*")):
            if path.is_dir() and not path.is_symlink():
                continue
            parts = path.relative_to(root).parts
            ok = not path.is_symlink() and (
                (top == schema.METADATA_DIR and len(parts) == 2 and parts[1] in allowed_meta)
                or (top in (schema.DATA_DIR, schema.TRIAL_DIR) and len(parts) == 3 and parts[1] in schema.SPLITS
                    and _SHARD.fullmatch(parts[2]))
                or (top == schema.GROUND_TRUTH_DIR and len(parts) == 2 and parts[1] in allowed_truth)
                or (top == schema.GROUND_TRUTH_DIR and len(parts) == 4 and parts[1] in sharded_truth
                    and parts[2] in schema.SPLITS and _SHARD.fullmatch(parts[3]))
            )  # fmt: skip
            if not ok:
                raise NotWrittenByGenerator(
                    f"--overwrite {root}: {path.relative_to(root)} was not written by jobs/generate.py; "
                    "move it out first (nothing was deleted)"
                )
            owned.append(path)
    return owned


def remove_owned_dataset(root: Path, files: list[Path]) -> None:
    """Delete exactly ``files`` (from :func:`owned_dataset_files`), then the directories they
    leave empty; directories still holding anything are kept."""
    for path in files:
        path.unlink()
    for top in _TOPS:
        base = root / top
        if not base.is_dir():
            continue
        for directory in sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            if not any(directory.iterdir()):
                directory.rmdir()
        if not any(base.iterdir()):
            base.rmdir()


def check_output_dir(source: str | Path, out: str | Path, overwrite: bool, *, owner: str,
                     written_by: Callable[[Path], str | None], parts: tuple[str, ...]) -> None:
    """OUT of a job that writes a whole directory (import, export): new or empty, or, with
    ``overwrite``, an earlier output of ``owner`` (``written_by(out)`` says whose it is)
    holding nothing but ``parts``; never the source or inside it. Raises ``GuardError``."""
    from mirror.guards import GuardError

    src, dst = Path(source).resolve(), Path(out).resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise GuardError(f"OUT {out}: overlaps the source {source}; choose a separate directory")
    if dst.exists() and not dst.is_dir():
        raise GuardError(f"OUT {out}: is a file, expected a directory")
    if not dst.is_dir() or not any(dst.iterdir()):
        return
    if not overwrite:
        raise GuardError(f"OUT {out}: already exists and is not empty; pass --overwrite to replace "
                         f"an earlier output of {owner}, or choose a new directory")
    try:
        author = written_by(dst)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        author = None
    others = sorted(p.name for p in dst.iterdir() if p.name not in set(parts))
    if author != owner or others:
        why = f"holds {others}" if others else f"its metadata does not name {owner}"
        raise GuardError(f"OUT {out}: --overwrite replaces only an earlier output of {owner}, "
                         f"but it {why}; refusing to delete it")


def replace_directory(staging: Path, dst: Path) -> None:
    """Move the finished ``staging`` directory to ``dst``, replacing what ``dst`` held (an
    earlier output that ``check_output_dir`` allowed) only once the new one is complete."""
    old = None
    if dst.exists():
        if any(dst.iterdir()):
            old = dst.with_name(f".{dst.name}.replaced-{staging.name.rsplit('-', 1)[-1]}")
            dst.rename(old)
        else:
            dst.rmdir()
    staging.rename(dst)
    if old is not None:
        shutil.rmtree(old)
