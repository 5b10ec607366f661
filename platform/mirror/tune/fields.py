"""The bottom of ``mirror.tune``: the sweep-file error and the typed readers every layer uses.

The loader (``space``), the scheduler strategies and PBT's option checks all read values out
of the same YAML mapping and must word their errors the same way (``<file>: <key>: expected
..., received ...``), so the readers live here, below all of them, and import nothing from
``mirror``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any

import yaml


class SpaceError(ValueError):
    """A sweep file that cannot run; the message names the file, the key and the rule."""


def reject_unknown(where: str, what: str, raw: Mapping[str, Any], valid: tuple[str, ...]) -> None:
    """Refuse any key of ``raw`` outside ``valid``, suggesting the closest valid one."""
    for key in raw:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            listed = ", ".join(valid) if valid else "none"
            raise SpaceError(f"{where}: unknown {what} {key!r}{hint}; valid: {listed}")


def read_mapping(where: str, key: str, raw: Any) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise SpaceError(
            f"{where}: {key}: expected a mapping, received {type(raw).__name__} {raw!r}"
        )
    return raw


def read_string(where: str, key: str, raw: Any) -> str:
    if not isinstance(raw, str) or not raw:
        raise SpaceError(f"{where}: {key}: expected a non-empty string, received {raw!r}")
    return raw


def read_int(where: str, key: str, raw: Any, minimum: int) -> int:
    """An int (never a bool, which YAML's ``true`` would be) of at least ``minimum``."""
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < minimum:
        raise SpaceError(f"{where}: {key}: expected an int >= {minimum}, received {raw!r}")
    return raw


def read_number(where: str, key: str, raw: Any) -> float:
    """An int or a float, never a bool; returned as written (an int stays an int)."""
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise SpaceError(
            f"{where}: {key}: expected a number, received {type(raw).__name__} {raw!r}"
        )
    return raw


def plain(value: Any) -> Any:
    """NumPy scalars from Tune's samplers as Python scalars (for params and run specs)."""
    return value.item() if hasattr(value, "item") and not isinstance(value, str | bytes) else value


def parse_yaml(where: str, text: str) -> Any:
    """``text`` read with :class:`_SweepLoader`; a syntax error becomes a :class:`SpaceError`."""
    try:
        return yaml.load(text, Loader=_SweepLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise SpaceError(f"{where}: not valid YAML: {err}") from None


class _SweepLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``) and refuses
    duplicate keys, which PyYAML would otherwise resolve silently to the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_SweepLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)
