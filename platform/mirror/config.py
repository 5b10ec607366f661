"""Typed, frozen configs (models, views, the loop) built from override dicts (job YAML, Ray Tune samples).

One loader for every model: ``build_config(AEConfig, {"lr": 3e-4, "n_heads": 4})``. Keys are
field names; a nested config dataclass is reached with a dotted key (``"critic.lr"``) or a
nested dict (``{"critic": {"lr": ...}}``). Validation is strict and never rewrites a value:

* an unknown key is an error that lists the valid keys (a typo is never silently ignored);
* a value of the wrong type is an error naming the field, the expected and the received type.
  ``bool`` is not accepted for ``int``/``float`` fields, nor ``1``/``0`` for ``bool`` ones; an
  ``int`` is accepted for a ``float`` field (``lam: 10``), a ``float`` never for an ``int``
  field. NumPy scalars (Ray Tune samples) are converted to Python scalars;
* cross-field rules live in each config's ``__post_init__`` and raise through :func:`require`.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Demo:
...     lr: float = 1e-3
...     heads: int = 2
>>> build_config(Demo, {"lr": 3e-4})
Demo(lr=0.0003, heads=2)
>>> build_config(Demo, {"lr_max": 1.0})
Traceback (most recent call last):
...
mirror.config.ConfigError: Demo: unknown key 'lr_max'; valid keys: heads, lr
>>> build_config(Demo, {"heads": 2.5})
Traceback (most recent call last):
...
mirror.config.ConfigError: Demo.heads: expected int, received float 2.5
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

C = TypeVar("C")


class ConfigError(ValueError):
    """A config override that does not fit the model's config dataclass."""


def require(config: Any, field: str, ok: bool, expected: str) -> None:
    """Raise a :class:`ConfigError` naming ``field``, what was expected and what was received.
    Called from config ``__post_init__`` methods for value and cross-field rules."""
    if not ok:
        value = getattr(config, field)
        raise ConfigError(
            f"{type(config).__name__}.{field}: expected {expected}, received {value!r}"
        )


def build_config(cls: type[C], overrides: Mapping[str, Any] | None = None) -> C:
    """A ``cls`` instance: its defaults with ``overrides`` applied and checked (see module doc)."""
    nested = _nest(cls, dict(overrides or {}), root=cls, prefix="")
    return _build(cls, nested, where=cls.__name__)


def config_to_flat_dict(config: Any, prefix: str = "") -> dict[str, Any]:
    """Flat ``{"dotted.key": value}`` view of a config, e.g. for MLflow params. Inverse of
    :func:`build_config`: ``build_config(type(c), config_to_flat_dict(c)) == c``."""
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            flat.update(config_to_flat_dict(value, prefix=f"{key}."))
        else:
            flat[key] = value
    return flat


def config_keys(cls: type) -> list[str]:
    """Every valid (dotted) override key of ``cls``, sorted."""
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if _is_config(hints[f.name]):
            keys += [f"{f.name}.{k}" for k in config_keys(hints[f.name])]
        else:
            keys.append(f.name)
    return sorted(keys)


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _nest(cls: type, overrides: dict[str, Any], root: type, prefix: str) -> dict[str, Any]:
    """Turn dotted keys into nested dicts, rejecting keys that are not fields of ``cls``
    (``cls`` is ``root`` or a config nested in it at ``prefix``; errors name the full key)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        if not isinstance(key, str):
            raise ConfigError(f"{root.__name__}: config keys must be strings, received {key!r}")
        head, _, rest = key.partition(".")
        if head not in names or (rest and not _is_config(hints[head])):
            valid = config_keys(root)
            close = difflib.get_close_matches(prefix + key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{root.__name__}: unknown key {prefix + key!r}{hint}; "
                f"valid keys: {', '.join(valid)}"
            )
        if _is_config(hints[head]):
            sub = {rest: value} if rest else value
            if not isinstance(sub, Mapping):
                raise ConfigError(
                    f"{root.__name__}.{prefix}{head}: expected a mapping of "
                    f"{hints[head].__name__} fields, received {type(value).__name__} {value!r}"
                )
            sub_nested = _nest(hints[head], dict(sub), root, f"{prefix}{head}.")
            _merge(nested.setdefault(head, {}), sub_nested)
        else:
            nested[head] = value
    return nested


def _merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value)
        else:
            dst[key] = value


def _build(cls: type[C], nested: dict[str, Any], where: str) -> C:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in nested.items():
        tp = hints[name]
        if _is_config(tp):
            kwargs[name] = _build(tp, value, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(f"{where}.{name}", tp, value)
    return cls(**kwargs)


def _coerce(where: str, tp: Any, value: Any) -> Any:
    """``value`` as type ``tp`` when that loses nothing, else a ConfigError."""

    def fail(expected: str) -> typing.NoReturn:
        raise ConfigError(
            f"{where}: expected {expected}, received {type(value).__name__} {value!r}"
        )

    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
            fail(f"one of {list(choices)}")
        return value
    if tp is bool:
        if type(value).__name__ == "bool_":  # numpy.bool_
            return bool(value)
        if not isinstance(value, bool):
            fail("bool")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            fail("int")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            fail("float")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail("str")
        return value
    raise TypeError(f"{where}: config fields of type {tp!r} are not supported by build_config")
