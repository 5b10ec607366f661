"""Significance for the paper's protocol: a one-sided paired t-test across seeded splits."""

from __future__ import annotations

import math

import numpy as np


def paired_t_one_sided(treatment: np.ndarray, baseline: np.ndarray, *, greater: bool = True) -> tuple[float, float]:
    """t and one-sided p of ``treatment - baseline`` over paired splits (H1: mean difference > 0,
    or < 0 with ``greater=False``, e.g. for an MSE). Same as ``scipy.stats.ttest_rel(...,
    alternative=...)``, written out so the result table needs no scipy import per row."""
    from scipy.stats import t as student_t

    d = np.asarray(treatment, np.float64) - np.asarray(baseline, np.float64)
    if d.ndim != 1 or len(d) < 2:
        raise ValueError(f"paired t-test: need >= 2 paired splits, got {d.shape}")
    sd = d.std(ddof=1)
    if sd == 0:
        return (math.copysign(math.inf, d.mean()) if d.mean() else math.nan), (0.0 if (d.mean() > 0) == greater and d.mean() else 1.0)
    t = d.mean() / (sd / math.sqrt(len(d)))
    p = student_t.sf(t, len(d) - 1) if greater else student_t.cdf(t, len(d) - 1)
    return float(t), float(p)


def stars(p: float) -> str:
    """The paper's marks: * p <= 0.05, ** p <= 0.01, *** p <= 0.001."""
    return "***" if p <= 0.001 else "**" if p <= 0.01 else "*" if p <= 0.05 else ""
