"""The one error a metric raises when it cannot be computed.

A metric that cannot be computed is never reported as 0, -1, 999 or silently left out (the
synthcity ``_safe_evaluate`` failure mode, metrics notes section 5): it raises
:class:`MetricError` naming the metric and the reason, and the scorecard surfaces it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping


class MetricError(RuntimeError):
    """``name`` is the metric's stable name (e.g. ``privacy/dcr/median_ratio``)."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"{name}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # survives pickling across Ray
        return (MetricError, (self.name, self.reason))


def attempt(compute: Callable[[], float]) -> float | MetricError:
    """``compute()``, or the :class:`MetricError` it raised, as a value.

    Lets a group of independent metrics report each failure next to the values that could be
    computed (a constant synthetic column makes Pearson r undefined, not R²). The scorecard
    turns such values into reported errors; nothing is dropped."""
    try:
        return compute()
    except MetricError as err:
        return err


def raise_first(values: Mapping[str, float | MetricError]) -> dict[str, float]:
    """The values as floats, raising the first MetricError among them (for direct callers)."""
    for value in values.values():
        if isinstance(value, MetricError):
            raise value
    return dict(values)  # type: ignore[arg-type]
