"""Evaluation of models (tasks, baselines) and the synthetic-data scorecard.

Scorecard entry points: ``mirror.metrics.scorecard.compute_scorecard`` and
``mirror.metrics.privacy.privacy_gate``; every metric failure is a :class:`MetricError`.
"""

from mirror.metrics.errors import MetricError

__all__ = ["MetricError"]
