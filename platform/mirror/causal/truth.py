"""The truth check no real dataset allows: estimated Δ against the simulator's true effects.

The simulator records, per ladder addition, its start and end week and its true change of
every lab while active (``ground_truth/treatments``: ``record.TREATMENT_COLUMNS`` and
``EFFECT_COLUMNS``). The true effect of a transition row (patient, ladder, from -> to at
window t) on lab j at the outcome X_{t+1} is the sum, over the additions of levels
``from .. to - 1``, of their effect on j if active at the week of that measurement
(start < week <= end): exactly what treatment changed in the value X^A_{t+1} (before the
plausible-range clip). Later additions (at t + 1) are not part of this transition's effect.

Per stratum the estimand is the mean true effect over the treated rows used: for the naive
estimate (mean X_{t+1} of treated minus of controls) all treated rows with the outcome
measured; for PSM the matched ones with both outcomes measured. Bias is estimate - truth; the
RMSE is over individuals (Δ_i - τ_i, and for the naive estimate y_i - mean control - τ_i).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from mirror.causal.delta import fixed
from mirror.data import schema
from mirror.data.views.windows import N_LABS


def true_effects(rows: pa.Table, truth: pa.Table) -> np.ndarray:
    """τ (R, N_LABS) for transition rows (``delta.MATCH_SCHEMA``) from the patients' treatment
    ground truth; NaN where the outcome lab was not measured."""
    sid = truth.column(schema.SUBJECT_ID).to_numpy()

    def flat(name: str) -> tuple[np.ndarray, np.ndarray]:
        col = truth.column(name).combine_chunks()
        return col.flatten().to_numpy(zero_copy_only=False), col.offsets.to_numpy()

    start, add_off = flat("addition_weeks")
    end = flat("addition_end_weeks")[0]
    ladder = flat("addition_ladders")[0].astype(np.int64)
    level = flat("addition_levels")[0].astype(np.int64)
    add_owner = np.repeat(np.arange(len(sid)), np.diff(add_off))
    e_add, e_off = flat("effect_additions")
    e_lab = flat("effect_labs")[0].astype(np.int64)
    e_val = flat("effect_values")[0]
    e_owner = np.repeat(np.arange(len(sid)), np.diff(e_off))
    effect = np.zeros((len(start), N_LABS))
    keep = e_lab < N_LABS
    effect[add_off[e_owner[keep]] + e_add[keep].astype(np.int64), e_lab[keep]] = e_val[keep]
    add_key = sid[add_owner].astype(np.int64) * 64 + ladder * 8 + level
    order = np.argsort(add_key, kind="stable")
    sorted_key = add_key[order]

    r_sid = rows.column("subject_id").to_numpy().astype(np.int64)
    r_ladder = rows.column("ladder").to_numpy().astype(np.int64)
    r_from = rows.column("from_level").to_numpy().astype(np.int64)
    r_to = rows.column("to_level").to_numpy().astype(np.int64)
    week = fixed(rows, "y_week", N_LABS)
    tau = np.zeros((len(r_sid), N_LABS))
    for step in range(int((r_to - r_from).max(initial=0))):  # levels added at once: <= 5
        v = r_from + step
        key = r_sid * 64 + r_ladder * 8 + v
        pos = np.minimum(np.searchsorted(sorted_key, key), max(len(sorted_key) - 1, 0))
        found = (v < r_to) & (sorted_key[pos] == key) if len(sorted_key) else np.zeros(len(key), bool)
        a = order[pos] if len(order) else pos
        on = (start[a][:, None] < week) & (week <= end[a][:, None]) if len(order) else np.zeros_like(week, bool)
        tau += np.where(found[:, None] & on, effect[a] if len(order) else 0.0, 0.0)
    tau[week < 0] = np.nan
    return tau


@dataclass
class TruthSums:
    """Per stratum, additive over shards (per lab)."""

    naive_tau: np.ndarray  # Σ τ over treated with outcome measured
    naive_n: np.ndarray
    naive_sq_err: np.ndarray  # Σ (y - mean control - τ)^2
    psm_tau: np.ndarray  # over matched with Δ observed
    psm_delta: np.ndarray
    psm_n: np.ndarray
    psm_sq_err: np.ndarray  # Σ (Δ - τ)^2
    psm_dd: np.ndarray  # Σ Δ^2, Σ τ^2, Σ Δτ: the individual correlation
    psm_tt: np.ndarray
    psm_dt: np.ndarray

    @classmethod
    def zeros(cls) -> TruthSums:
        return cls(*[np.zeros(N_LABS) for _ in range(10)])

    def __add__(self, o: TruthSums) -> TruthSums:
        return TruthSums(*[getattr(self, k) + getattr(o, k) for k in self.__dataclass_fields__])


def truth_sums(tau: np.ndarray, y: np.ndarray, delta: np.ndarray, matched: np.ndarray,
               control_mean: np.ndarray) -> TruthSums:
    """Sums for one stratum's rows of one shard."""
    obs = ~np.isnan(tau) & ~np.isnan(y)
    t0 = np.where(obs, tau, 0.0)
    naive_err = np.where(obs, y - control_mean - tau, 0.0)
    d_obs = obs & matched[:, None] & ~np.isnan(delta)
    d = np.where(d_obs, delta, 0.0)
    t1 = np.where(d_obs, tau, 0.0)
    return TruthSums(
        naive_tau=t0.sum(0), naive_n=obs.sum(0).astype(float), naive_sq_err=(naive_err**2).sum(0),
        psm_tau=t1.sum(0), psm_delta=d.sum(0), psm_n=d_obs.sum(0).astype(float), psm_sq_err=((d - t1) ** 2).sum(0),
        psm_dd=(d * d).sum(0), psm_tt=(t1 * t1).sum(0), psm_dt=(d * t1).sum(0),
    )  # fmt: skip


def correlation(s: TruthSums) -> np.ndarray:
    n = np.maximum(s.psm_n, 1)
    cov = s.psm_dt / n - (s.psm_delta / n) * (s.psm_tau / n)
    vd = s.psm_dd / n - (s.psm_delta / n) ** 2
    vt = s.psm_tt / n - (s.psm_tau / n) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((vd > 0) & (vt > 0), cov / np.sqrt(vd * vt), np.nan)
