"""Local paths versus remote URIs (``s3://``, ``gs://``, ...): the one place that tells them apart.

Checkpoints, Tune state and datasets may live on either. Code that must touch the local file
system (markers, ``Path.resolve``) asks :func:`is_remote` first instead of testing for
``"://"`` itself.
"""

from __future__ import annotations

from pathlib import Path


def is_remote(location: str | Path) -> bool:
    """Whether ``location`` is a URI with a scheme (``s3://bucket/x``) rather than a path."""
    return "://" in str(location)


def absolute(location: str | Path) -> str:
    """A URI unchanged, a local path made absolute (``~`` expanded), so that it means the same
    thing in every Ray worker whatever its working directory."""
    return str(location) if is_remote(location) else str(Path(location).expanduser().resolve())


def join(location: str, name: str) -> str:
    """``location/name`` for a URI or a local path."""
    return f"{location.rstrip('/')}/{name}" if is_remote(location) else str(Path(location) / name)
