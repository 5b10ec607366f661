"""Δ by propensity-score matching (seed 003), as Ray tasks with bounded memory.

For every patient-window ``t`` (with windows ``t - 1`` and ``t + 1``) and ladder, a
*transition row* says the level at ``t - 1`` (``from``) and at ``t`` (``to``), the covariates
X_{t-1} (the windows view's features) and the outcome X_{t+1} (raw lab values). A row with
``to > from`` is *treated* in stratum (ladder, from -> to); a row with ``to == from`` is a
*control* for every stratum leaving ``from``. Then, per stratum:

* propensity: logistic regression (scikit-learn) of treated vs control on X_{t-1}, the
  ladder's own lab at the decision (the index lab) and, with ``history`` (off by default: on
  two simulated populations it left the count of strata whose bias beats the naive one's
  3x unchanged in one and raised it by 2 in the other), that lab's latest value by the end of
  t - 2, so the model sees the lab's trend and not one reading; with ``stops`` (see
  ``STOP_NAMES``), the ladder's drugs still taken at the end of t - 1 and those stopped in
  window t; with their squares by default (``propensity``), fitted on the training split only, on at most ``max_fit_rows`` treated and as many controls, drawn
  uniformly (subsampling controls shifts every logit by one constant: matching and the SD
  caliper are unchanged);
* matching: each treated row (any split) takes controls of the training split near its
  propensity logit, by sorted search (``match_nearest``: O(n log n), never all pairs): among
  the ``neighbours`` nearest on each side within the caliper, the ``controls`` nearest also in
  the index lab (``index_lab_weight``), never a window of the treated patient itself
  (``exclude_own_windows``),
  *with replacement* (a control may serve several treated rows: every treated row gets its
  best controls, and the estimate does not depend on the order of matching); a row with no
  control within ``caliper_sd`` x the pooled SD of the logit is dropped (counted). Test
  patients never serve as controls;
* Δ_{t+1} = X^A_{t+1} - X^B_{t+1} - (mu0(X^A) - mu0(X^B)) on every lab, with X^B - mu0(X^B)
  averaged over the row's controls that measured the lab (observed where A and at least one of
  them were measured). 1:k matching (``controls``, 8 by default) divides the variance of the
  controls' half of Δ's noise by up to k, which matters for Δ as a per-patient target: on three
  simulated populations 1:8 lowered the individual RMSE against the true effect in 85 of 86
  strata and cleared 3x in all 86 (``bench/results/causal_delta_controls.json``). mu0 is the
  controls' outcome model (``bias_correction``, on: Abadie &
  Imbens 2011): what the covariate difference left inside the caliper is worth on the outcome.
  On three simulated populations (200K each) it lowered the individual RMSE of Δ against the
  true effect in 77 of 86 strata (46 of the 47 with >= 500 treated) and left the mean bias
  about where it was (``bench/results/causal_delta_bias_correction.json``). X_{t+1}
  is each lab's *first* measurement in window t + 1 (``outcome="first"``), not its latest: a
  control only "stayed at A's previous level" through window t, and 31-58% of them (by
  stratum, 200K simulated) are escalated during window t + 1; an addition happens at a
  measurement of its lab and acts from the next week, so the first measurement of t + 1 is
  the last one that no later addition (of the control or of the treated) has changed. With the
  latest value, Δ mixes in the controls' catch-up treatment and shrinks towards 0 most where
  the treated cannot escalate further (transitions into a ladder's top level).

Memory: patients are dealt into ``blocks`` by a hash of their id, transition rows are written
partitioned by block, and every step runs as one Ray task per block (count, sample, match) or
per data shard (write): a task holds one block's rows, never the population. Matching within a
block (a random ~1/blocks of the controls) at 100M patients still has millions of controls per
stratum. Counts: treated, matched, dropped by the caliper, no control at all.

Balance: standardised mean differences of X_{t-1} per stratum before matching (all treated vs
all controls) and after (matched treated vs their controls, with multiplicity), over the
pooled SD before matching.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa

from mirror.config import require
from mirror.data import schema
from mirror.data.views.windows import (
    LAB_SHORTS,
    N_LABS,
    N_LADDERS,
    Windows,
    patient_windows,
)

# History covariates (``DeltaConfig.history``): the index lab's latest value by the end of
# t - 2, so that with X_{t-1} and the index lab the propensity sees the lab's trend.
HISTORY_NAMES = ["index_lab_prior", "index_lab_prior_known"]
# Stop covariates (``DeltaConfig.stops``): the ladder's drugs still taken at the end of t - 1
# (its level counts drugs ever started), and how many of them stopped in window t: before the
# decision only ("decision"), or anywhere in it ("window"). A stop raises the lab, prompts
# additions and, its effect gone, raises X_{t+1}: on simulated data, the treated of multi-level
# jumps stopped a drug in window t twice as often as their controls.
STOP_NAMES = ["ladder_active", "ladder_stopped_before_decision", "ladder_stopped_in_window"]
STOPS = ("none", "decision", "window")
FEATURE_NAMES = (
    [f"{s}" for s in LAB_SHORTS] + [f"{s}_measured" for s in LAB_SHORTS]
    + ["level_diabetes", "level_lipids", "level_hypertension", "female", "age", "present",
       "index_lab", "index_lab_measured"] + HISTORY_NAMES + STOP_NAMES
)  # fmt: skip
N_PROPENSITY_FEATURES = len(FEATURE_NAMES)
N_BASE_FEATURES = N_PROPENSITY_FEATURES - len(HISTORY_NAMES) - len(STOP_NAMES)  # X_{t-1} and the index lab
# Balance is judged on the covariates that vary ("present" is 1 in every transition row).
BALANCE_FEATURES = np.array([i for i, n in enumerate(FEATURE_NAMES) if n != "present"])
SPLIT_CODE = {s: i for i, s in enumerate(schema.SPLITS)}
MAX_LEVEL = 8  # key packing: ladder * 64 + from * 8 + to
INDEX_LAB = FEATURE_NAMES.index("index_lab")
_CONTINUOUS = np.array([*range(len(LAB_SHORTS)), FEATURE_NAMES.index("age"), INDEX_LAB])
_CONTINUOUS_HISTORY = np.r_[_CONTINUOUS, FEATURE_NAMES.index("index_lab_prior")]
DESIGNS = ("linear", "quadratic")
OUTCOMES = ("first", "latest")


def covariate_columns(history: bool = False, stops: str = "none") -> np.ndarray:
    """The columns of ``FEATURE_NAMES`` a propensity sees: X_{t-1} and the index lab, plus the
    history and the stop covariates when asked."""
    names = HISTORY_NAMES * history + {"none": [], "decision": STOP_NAMES[:2], "window": STOP_NAMES[::2]}[stops]
    return np.r_[np.arange(N_BASE_FEATURES), [FEATURE_NAMES.index(n) for n in names]].astype(np.int64)


def balance_features(history: bool = False, stops: str = "none") -> np.ndarray:
    """The covariates a stratum's max |SMD| is judged on: those its propensity sees. The
    balance table lists every covariate either way."""
    return np.intersect1d(BALANCE_FEATURES, covariate_columns(history, stops))


def design_matrix(x: np.ndarray, design: str, history: bool = False, stops: str = "none") -> np.ndarray:
    """The propensity model's inputs: the covariates (``covariate_columns``), and with
    ``quadratic`` the squares of the continuous ones (labs, age, index lab and its prior
    value), since the simulator decides at a threshold of the index lab and a linear logit
    cannot bend there."""
    x = np.asarray(x, np.float64)
    continuous = _CONTINUOUS_HISTORY if history else _CONTINUOUS
    squares = x[:, continuous] ** 2
    x = x[:, covariate_columns(history, stops)]
    return x if design == "linear" else np.c_[x, squares]


def stratum_key(ladder: np.ndarray | int, from_level: np.ndarray | int, to_level: np.ndarray | int) -> Any:
    return ladder * 64 + from_level * MAX_LEVEL + to_level


def unpack_key(key: int) -> tuple[int, int, int]:
    return key // 64, key % 64 // MAX_LEVEL, key % MAX_LEVEL


@dataclass(frozen=True)
class DeltaConfig:
    """How Δ is estimated (``jobs/estimate_delta.py`` flags)."""

    window_weeks: int = 52
    caliper_sd: float = 0.2  # Austin 2011: 0.2 SD of the logit of the propensity
    block_patients: int = 1_000_000  # patients per block (one task's rows); sets the block count
    min_treated: int = 10  # strata with fewer training treated rows get no model (counted)
    max_fit_rows: int = 100_000  # per stratum and class (treated, controls) for the propensity
    seed: int = 0
    propensity: str = "quadratic"  # linear: X_{t-1} and the index lab; quadratic: plus their squares
    history: bool = False  # the propensity also sees the index lab's value by t - 2 (its trend)
    stops: str = "window"  # the propensity also sees the ladder's drugs taken at t - 1's end and those stopped in t (STOPS)
    neighbours: int = 8  # controls per side of the sorted logit considered (1: the nearest only)
    controls: int = 8  # controls averaged into a treated row's Δ: its k nearest within the caliper (1: the paper's B)
    index_lab_weight: float = 1.0  # weight of the index lab in the distance among candidates (0: logit only)
    exclude_own_windows: bool = True  # a treated row never takes a control of the same patient
    outcome: str = "first"  # X_{t+1}: each lab's first (before later additions act) or latest value in t + 1
    bias_correction: bool = True  # Abadie-Imbens: Δ minus mu0(X_A) - mu0(X_B), mu0 fitted on the controls

    def __post_init__(self) -> None:
        require(self, "caliper_sd", self.caliper_sd > 0, "a positive number of SDs")
        require(self, "block_patients", self.block_patients >= 1, "an int >= 1")
        require(self, "min_treated", self.min_treated >= 2, "an int >= 2")
        require(self, "max_fit_rows", self.max_fit_rows >= 10, "an int >= 10")
        require(self, "propensity", self.propensity in DESIGNS, f"one of {DESIGNS}")
        require(self, "stops", self.stops in STOPS, f"one of {STOPS}")
        require(self, "neighbours", self.neighbours >= 1, "an int >= 1")
        require(self, "controls", self.controls >= 1, "an int >= 1")
        require(self, "index_lab_weight", self.index_lab_weight >= 0, "a weight >= 0")
        require(self, "outcome", self.outcome in OUTCOMES, f"one of {OUTCOMES}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Transition rows


def block_of(subject_id: np.ndarray, blocks: int) -> np.ndarray:
    """A patient's block: a multiplicative hash of its id (all its rows in one block)."""
    return ((subject_id.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(2**32) % np.uint64(blocks)).astype(np.int32)


def transition_rows(windows: Windows, subject_id: np.ndarray, split: str, blocks: int, outcome: str = "first") -> pa.Table:
    """One row per (window t with a previous and a next window, ladder) below the ladder's top;
    the outcome is each lab's ``outcome`` (first or latest) value in window t + 1."""
    from mirror.data.views.windows import LADDER_LEVELS

    n_win = windows.n_windows[windows.owner]
    t = np.flatnonzero((windows.index >= 1) & (windows.index <= n_win - 2))
    known = windows.carried_forward()
    x = windows.features(t - 1, labs=known)
    has_prior = windows.index[t] >= 2
    from mirror.data.views.windows import _LADDER_LAB_COLUMN, LAB_SCALE, LAB_TYPICAL, scaled_lab
    first = outcome == "first"
    y = (windows.first_value if first else windows.lab_value)[t + 1].astype(np.float32)
    y_week = (windows.first_week if first else windows.lab_week)[t + 1].astype(np.int32)
    parts = []
    for li in range(N_LADDERS):
        from_level = windows.level[t - 1, li]
        keep = from_level < LADDER_LEVELS[li]
        rows = t[keep]
        index = windows.index_value[rows, li]
        lab = _LADDER_LAB_COLUMN[li]
        index_x = np.c_[scaled_lab(index, LAB_TYPICAL[lab], LAB_SCALE[lab])]
        prior = np.where(has_prior[keep], known[np.maximum(rows - 2, 0), lab], np.nan)
        history_x = np.c_[scaled_lab(prior, LAB_TYPICAL[lab], LAB_SCALE[lab])]
        stops_x = np.c_[windows.active[rows - 1, li] / LADDER_LEVELS[li], windows.stopped_before_index[rows, li],
                        windows.stopped[rows, li]]
        sid = subject_id[windows.owner[rows]].astype(np.int64)
        parts.append({
            "subject_id": sid, "window": windows.index[rows].astype(np.int16),
            "window_start": windows.start_week[rows].astype(np.int32),
            "ladder": np.full(len(rows), li, np.int8), "from_level": from_level[keep].astype(np.int8),
            "to_level": windows.level[rows, li].astype(np.int8), "x": np.c_[x[keep], index_x, history_x, stops_x].astype(np.float32), "y": y[keep],
            "y_week": y_week[keep],
        })  # fmt: skip
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    n = len(cols["subject_id"])
    table = {k: v for k, v in cols.items() if v.ndim == 1}
    table["split"] = np.full(n, SPLIT_CODE[split], np.int8)
    table["block"] = block_of(cols["subject_id"], blocks)
    for k in ("x", "y", "y_week"):
        table[k] = pa.FixedSizeListArray.from_arrays(pa.array(cols[k].reshape(-1)), cols[k].shape[1])
    return pa.table(table)


class _TransitionsFn:
    """Ray Data UDF: patient rows -> transition rows."""

    def __init__(self, split: str, window_weeks: int, blocks: int, outcome: str = "first") -> None:
        self.split, self.window_weeks, self.blocks, self.outcome = split, window_weeks, blocks, outcome

    def __call__(self, table: pa.Table) -> pa.Table:
        windows = patient_windows(table, self.window_weeks)
        return transition_rows(windows, table.column(schema.SUBJECT_ID).to_numpy(), self.split, self.blocks, self.outcome)


def fixed(table: pa.Table, name: str, width: int) -> np.ndarray:
    col = table.column(name).combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), width)


# --------------------------------------------------------------------------------------------
# Matching and balance (pure numpy; the 6-patient test checks these by hand)


def match_nearest(
    treated_logit: np.ndarray, control_logit: np.ndarray, caliper: float, *, neighbours: int = 1,
    controls: int = 1, treated_aux: np.ndarray | None = None, control_aux: np.ndarray | None = None,
    treated_owner: np.ndarray | None = None, control_owner: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``controls`` controls for every treated row, with replacement, by sorted search on
    the logit.

    Candidates are the max(``neighbours``, ``controls``) controls on each side of the treated
    logit (O(n log n + n k), never all pairs). Among those within ``caliper`` (and, given
    owners, of another patient) the row takes the ``controls`` nearest in
    (logit / caliper)² + (aux difference)², where ``aux`` is a second matching variable already
    in caliper units (none: the nearest logit). A row with no candidate within the caliper keeps
    its nearest admissible control in column 0, flagged as outside. Returns (n, ``controls``):
    each row's controls, best first (index into ``control_logit``; -1 where there is none), and
    whether each is within the caliper. Ties go to the lower logit."""
    n = len(treated_logit)
    if not len(control_logit):
        return np.full((n, controls), -1), np.zeros((n, controls), bool)
    order = np.argsort(control_logit, kind="stable")
    sorted_logit = control_logit[order]
    pos = np.searchsorted(sorted_logit, treated_logit)
    side = max(neighbours, controls)
    cand = pos[:, None] + np.arange(-side, side)[None, :]  # (n, 2k), lower logits first
    valid = (cand >= 0) & (cand < len(order))
    cand = order[np.clip(cand, 0, len(order) - 1)]
    d_logit = np.abs(control_logit[cand] - treated_logit[:, None])
    if treated_owner is not None and control_owner is not None:
        valid &= control_owner[cand] != treated_owner[:, None]
    within = valid & (d_logit <= caliper)
    distance = (d_logit / caliper) ** 2
    if treated_aux is not None and control_aux is not None:
        distance = distance + (control_aux[cand] - treated_aux[:, None]) ** 2
    best = np.argsort(np.where(within, distance, np.inf), axis=1, kind="stable")[:, :controls]
    picked_within = np.take_along_axis(within, best, axis=1)
    pick = np.where(picked_within, np.take_along_axis(cand, best, axis=1), -1)
    nearest = np.argmin(np.where(valid, d_logit, np.inf), axis=1)  # the fallback, outside the caliper
    fallback = ~picked_within[:, 0] & valid.any(axis=1)
    pick[fallback, 0] = cand[fallback, nearest[fallback]]
    return pick, picked_within


@dataclass
class Moments:
    """Additive sums of rows of covariates: count, sum, sum of squares (per column)."""

    n: float = 0.0
    s: np.ndarray | float = 0.0
    ss: np.ndarray | float = 0.0

    @classmethod
    def of(cls, x: np.ndarray, weight: np.ndarray | None = None) -> Moments:
        x = np.asarray(x, np.float64)
        if weight is None:
            return cls(float(len(x)), x.sum(axis=0), (x * x).sum(axis=0))
        w = np.asarray(weight, np.float64)[:, None]
        return cls(float(w.sum()), (w * x).sum(axis=0), (w * x * x).sum(axis=0))

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.n + other.n, self.s + other.s, self.ss + other.ss)

    @property
    def mean(self) -> np.ndarray:
        return np.asarray(self.s) / max(self.n, 1.0)

    @property
    def var(self) -> np.ndarray:
        return np.maximum(np.asarray(self.ss) / max(self.n, 1.0) - self.mean**2, 0.0)


def smd(treated: Moments, control: Moments, pooled_sd: np.ndarray) -> np.ndarray:
    """Standardised mean difference per covariate (0 where the covariate does not vary)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pooled_sd > 1e-9, (treated.mean - control.mean) / pooled_sd, 0.0)


def pooled_sd(treated: Moments, control: Moments) -> np.ndarray:
    return np.sqrt((treated.var + control.var) / 2.0)


@dataclass
class StratumSums:
    """What the block tasks add up for one stratum."""

    treated: int = 0  # treated rows (all splits)
    matched: int = 0
    caliper_drops: int = 0
    no_controls: int = 0  # treated rows whose block had no control at all
    controls: int = 0  # control rows in the pool (training split)
    x_treated: Moments | None = None  # all treated
    x_treated_matched: Moments | None = None
    x_controls: Moments | None = None  # all controls of the stratum's pool
    x_matched_controls: Moments | None = None  # with multiplicity, each of a row's k controls weighted 1/k
    controls_used: int = 0  # Σ over matched rows of the controls averaged into their Δ
    y_treated: Moments | None = None  # naive: outcome sums where observed (per lab)
    y_treated_n: np.ndarray | None = None
    y_controls: Moments | None = None
    y_controls_n: np.ndarray | None = None
    delta_sum: np.ndarray | None = None  # Δ over matched pairs, where both observed
    delta_n: np.ndarray | None = None

    def __add__(self, o: StratumSums) -> StratumSums:
        def add(a: Any, b: Any) -> Any:
            return b if a is None else a if b is None else a + b

        return StratumSums(**{k: add(getattr(self, k), getattr(o, k)) for k in self.__dataclass_fields__})


def outcome_sums(y: np.ndarray) -> tuple[Moments, np.ndarray]:
    """Sums of an outcome (R, N_LABS) with NaN missing, and counts per lab."""
    observed = ~np.isnan(y)
    z = np.where(observed, y, 0.0)
    return Moments(float(len(y)), z.sum(axis=0), (z * z).sum(axis=0)), observed.sum(axis=0).astype(np.float64)


@dataclass(frozen=True)
class Propensity:
    """A stratum's fitted logistic model and its caliper (in logit units)."""

    key: int
    coef: np.ndarray
    intercept: float
    caliper: float
    fit_treated: int
    fit_controls: int
    design: str = "linear"
    index_lab_sd: float = 1.0  # pooled SD of the index lab (its matching distance's unit)
    history: bool = False
    stops: str = "none"
    outcome_coef: np.ndarray | None = None  # (design width, N_LABS): mu0, the controls' outcome model
    outcome_intercept: np.ndarray | None = None  # (N_LABS,)
    outcome_effective_controls: float = 0.0  # Kish's effective size of mu0's weighted fit sample

    def logit(self, x: np.ndarray) -> np.ndarray:
        return design_matrix(x, self.design, self.history, self.stops) @ self.coef + self.intercept

    def untreated_outcome(self, x: np.ndarray) -> np.ndarray:
        """mu0(x): the outcome model's prediction of X_{t+1} without the addition (R, N_LABS)."""
        assert self.outcome_coef is not None and self.outcome_intercept is not None
        return design_matrix(x, self.design, self.history, self.stops) @ self.outcome_coef + self.outcome_intercept


def _standardisation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and SDs to standardise a design by (SD 1 where a column is constant)."""
    mean, sd = x.mean(axis=0), x.std(axis=0)
    return mean, np.where(sd > 1e-9, sd, 1.0)


def fit_propensity(key: int, x_treated: np.ndarray, x_controls: np.ndarray, caliper_sd: float, seed: int = 0,
                   design: str = "linear", history: bool = False, stops: str = "none") -> Propensity:
    """Logistic regression treated vs control on ``design_matrix`` (standardised inside, so the
    L2 penalty treats every input alike); caliper = ``caliper_sd`` x pooled SD of the logit (the
    average of the two groups' variances, so subsampling either group does not move it)."""
    from sklearn.linear_model import LogisticRegression

    x = design_matrix(np.concatenate([x_treated, x_controls]), design, history, stops)
    mean, sd = _standardisation(x)
    label = np.r_[np.ones(len(x_treated)), np.zeros(len(x_controls))]
    model = LogisticRegression(C=1.0, max_iter=2000, random_state=seed).fit((x - mean) / sd, label)
    coef = model.coef_[0] / sd
    intercept = float(model.intercept_[0] - coef @ mean)
    lt, lc = x[: len(x_treated)] @ coef + intercept, x[len(x_treated):] @ coef + intercept
    logit_sd = float(np.sqrt((lt.var() + lc.var()) / 2.0))
    index = np.concatenate([x_treated, x_controls])[:, INDEX_LAB].astype(np.float64)
    index_sd = float(np.sqrt((index[: len(x_treated)].var() + index[len(x_treated):].var()) / 2.0))
    return Propensity(key, coef, intercept, caliper_sd * max(logit_sd, 1e-9), len(x_treated), len(x_controls),
                      design, max(index_sd, 1e-9), history, stops)


def fit_outcome_model(model: Propensity, x_controls: np.ndarray, y_controls: np.ndarray,
                      ridge: float = 1e-3) -> Propensity:
    """``model`` with mu0: per lab, a ridge regression of the controls' outcome on the
    propensity's design, weighted by the propensity odds e/(1 - e) so that it is fitted where
    the treated are (the controls' ATT weights; subsampled controls scale every weight alike).
    Matching leaves residual differences between a treated row and its control (a caliper
    of 0.2 SD, the index lab); mu0(X_A) - mu0(X_B) is what they are worth on the outcome
    (Abadie & Imbens 2011, bias-corrected matching). Labs observed in fewer than 2 x the
    design's width of controls get mu0 = their weighted mean (no correction)."""
    x = design_matrix(x_controls, model.design, model.history, model.stops)
    logit = x @ model.coef + model.intercept
    weight = np.exp(np.clip(logit - logit.max(), -50.0, 0.0))  # odds up to one constant
    effective = float(weight.sum() ** 2 / max((weight**2).sum(), 1e-300))
    mean, sd = _standardisation(x)
    z = np.c_[np.ones(len(x)), (x - mean) / sd]
    coef = np.zeros((x.shape[1], N_LABS))
    intercept = np.zeros(N_LABS)
    # With normalised weights a ridge of (width / effective size) is a prior worth ``width``
    # controls that the slopes are 0: light where thousands of controls carry the fit, heavy
    # in a stratum of a few dozen treated whose odds weights leave ~15 effective controls.
    penalty = (ridge + z.shape[1] / effective) * np.eye(z.shape[1])
    penalty[0, 0] = 0.0  # the intercept is not shrunk
    for j in range(N_LABS):
        seen = ~np.isnan(y_controls[:, j])
        w, y = weight[seen], y_controls[seen, j].astype(np.float64)
        if len(y) < 2 * z.shape[1]:
            intercept[j] = float(np.average(y, weights=w)) if len(y) else 0.0
            continue
        zw = z[seen] * (w / w.sum())[:, None]
        beta = np.linalg.solve(z[seen].T @ zw + penalty, zw.T @ y)
        coef[:, j] = beta[1:] / sd
        intercept[j] = beta[0] - coef[:, j] @ mean
    return replace(model, outcome_coef=coef, outcome_intercept=intercept, outcome_effective_controls=effective)


def match_stratum(model: Propensity, treated: dict[str, np.ndarray], controls: dict[str, np.ndarray],
                  config: DeltaConfig | None = None) -> tuple[dict[str, np.ndarray], StratumSums]:
    """Match one stratum's treated rows to its controls (both of one block); returns one row per
    treated row (matched or not, with its nearest control and Δ) and the stratum's sums. A row's
    Δ is its outcome minus the mean of its controls' (``config.controls`` nearest within the
    caliper, each lab over those where it was measured). Without a config: the nearest logit
    only (1 neighbour, 1 control, no index lab, own windows allowed)."""
    lt, lc = model.logit(treated["x"]), model.logit(controls["x"])
    options: dict[str, Any] = {}
    if config is not None:
        options["neighbours"], options["controls"] = config.neighbours, config.controls
        if config.index_lab_weight > 0:  # index lab in caliper units: one caliper = one logit caliper
            unit = config.caliper_sd * model.index_lab_sd / config.index_lab_weight
            options["treated_aux"] = treated["x"][:, INDEX_LAB] / unit
            options["control_aux"] = controls["x"][:, INDEX_LAB] / unit
        if config.exclude_own_windows:
            options["treated_owner"], options["control_owner"] = treated["subject_id"], controls["subject_id"]
    pick, within = match_nearest(lt, lc, model.caliper, **options)
    has_control = pick[:, 0] >= 0
    matched = within[:, 0]  # the best candidate is within the caliper iff any is
    used = within & matched[:, None]  # (n, k): the controls averaged into each row's Δ
    j = np.where(used, pick, 0)
    y_treated = treated["y"]
    if len(lc):
        y_controls = controls["y"][j]  # (n, k, labs)
        if model.outcome_coef is not None:  # bias correction: each control's mu0 difference
            y_treated = y_treated - model.untreated_outcome(treated["x"])
            y_controls = y_controls - model.untreated_outcome(controls["x"][j.reshape(-1)]).reshape(y_controls.shape)
        seen = used[:, :, None] & ~np.isnan(y_controls)
        n_seen = seen.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            y_control = np.where(n_seen > 0, np.where(seen, y_controls, 0.0).sum(axis=1) / n_seen, np.nan)
    else:
        y_control = np.full_like(y_treated, np.nan)
    delta = y_treated - y_control
    delta[~matched] = np.nan
    k = used.sum(axis=1)
    rows_m, ctl_m = np.nonzero(used)
    sums = StratumSums(
        treated=len(lt), matched=int(matched.sum()), caliper_drops=int((has_control & ~matched).sum()),
        no_controls=int((~has_control).sum()), controls=len(lc),
        x_treated=Moments.of(treated["x"]), x_treated_matched=Moments.of(treated["x"][matched]),
        x_controls=Moments.of(controls["x"]),
        x_matched_controls=Moments.of(controls["x"][j[rows_m, ctl_m]], 1.0 / k[rows_m]),
        controls_used=int(k.sum()),
    )  # fmt: skip
    sums.y_treated, sums.y_treated_n = outcome_sums(treated["y"])
    sums.y_controls, sums.y_controls_n = outcome_sums(controls["y"])
    d_obs = ~np.isnan(delta)
    sums.delta_sum, sums.delta_n = np.where(d_obs, delta, 0.0).sum(axis=0), d_obs.sum(axis=0).astype(np.float64)
    rows = {
        "subject_id": treated["subject_id"], "split": treated["split"], "window": treated["window"],
        "window_start": treated["window_start"], "ladder": treated["ladder"], "from_level": treated["from_level"],
        "to_level": treated["to_level"], "matched": matched,
        "control_subject_id": np.where(matched, controls["subject_id"][pick[:, 0]] if len(lc) else -1, -1),
        "controls": k.astype(np.int8), "logit": lt, "y": treated["y"], "y_week": treated["y_week"],
        "delta": delta.astype(np.float32),
    }  # fmt: skip
    return rows, sums


def match_block(transitions: pa.Table, models: dict[int, Propensity],
                config: DeltaConfig | None = None) -> tuple[pa.Table, dict[int, StratumSums]]:
    """Every stratum of one block: treated rows of any split, controls of the training split."""
    cols = {name: transitions.column(name).to_numpy() for name in
            ("subject_id", "split", "window", "window_start", "ladder", "from_level", "to_level")}
    cols["x"] = fixed(transitions, "x", N_PROPENSITY_FEATURES)
    cols["y"] = fixed(transitions, "y", N_LABS).astype(np.float64)
    cols["y_week"] = fixed(transitions, "y_week", N_LABS)
    ladder = cols["ladder"].astype(np.int64)
    f, t = cols["from_level"].astype(np.int64), cols["to_level"].astype(np.int64)
    key = stratum_key(ladder, f, t)
    control_key = np.where((f == t) & (cols["split"] == SPLIT_CODE[schema.TRAIN]), stratum_key(ladder, f, 0), -1)
    out_rows, out_sums = [], {}
    for k, model in models.items():  # a few dozen strata, each vectorised
        li, fl, _ = unpack_key(k)
        ti = np.flatnonzero(key == k)
        ci = np.flatnonzero(control_key == stratum_key(li, fl, 0))
        if not len(ti):
            continue
        rows, sums = match_stratum(model, {n: v[ti] for n, v in cols.items()}, {n: v[ci] for n, v in cols.items()}, config)
        out_rows.append(rows)
        out_sums[k] = sums
    if not out_rows:
        return MATCH_SCHEMA.empty_table(), out_sums
    merged = {n: np.concatenate([r[n] for r in out_rows]) for n in out_rows[0]}
    order = np.argsort(merged["subject_id"], kind="stable")
    arrays = []
    for field in MATCH_SCHEMA:
        v = merged[field.name][order]
        if pa.types.is_fixed_size_list(field.type):
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1), field.type.value_type), N_LABS))
        else:
            arrays.append(pa.array(v, field.type))
    return pa.Table.from_arrays(arrays, schema=MATCH_SCHEMA), out_sums


MATCH_SCHEMA = pa.schema([
    ("subject_id", pa.int64()), ("split", pa.int8()), ("window", pa.int16()), ("window_start", pa.int32()),
    ("ladder", pa.int8()), ("from_level", pa.int8()), ("to_level", pa.int8()), ("matched", pa.bool_()),
    ("control_subject_id", pa.int64()), ("controls", pa.int8()), ("logit", pa.float64()),
    ("y", pa.list_(pa.float32(), N_LABS)), ("y_week", pa.list_(pa.int32(), N_LABS)),
    ("delta", pa.list_(pa.float32(), N_LABS)),
])  # fmt: skip


def balance_rows(sums: dict[int, StratumSums]) -> list[dict[str, Any]]:
    """Per stratum and covariate: SMD before and after matching (the MLflow balance table)."""
    from mirror.data.views.windows import LADDER_NAMES

    rows = []
    for k, s in sorted(sums.items()):
        if s.x_treated is None or s.x_controls is None or not s.controls:
            continue
        li, f, t = unpack_key(k)
        sd = pooled_sd(s.x_treated, s.x_controls)
        before = smd(s.x_treated, s.x_controls, sd)
        after = smd(s.x_treated_matched, s.x_matched_controls, sd) if s.matched else np.full_like(before, np.nan)
        for i in BALANCE_FEATURES:
            rows.append({"ladder": LADDER_NAMES[li], "transition": f"{f}->{t}", "covariate": FEATURE_NAMES[i],
                         "smd_before": float(before[i]), "smd_after": float(after[i])})
    return rows
