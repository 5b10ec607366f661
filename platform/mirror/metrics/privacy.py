"""Privacy: does the synthetic set reveal who was in the training data, or what they had?

Every distance is the exact Hamming distance of ``neighbours`` on each patient's distinct
diagnosis-age tokens and (token, week) words; the reference side is never subsampled. T is
the real training set, H the real held-out set (never seen by the generator), S synthetic.

Metrics (names relative to ``privacy/``)
-----------------------------------------
* ``exact_match/*``: a record's canonical form is its sex and multiset of words (condition,
  age group, week). ``synthetic_in_train`` / ``synthetic_in_holdout`` are the usual rates
  over S. ``train_reproduced`` / ``holdout_reproduced`` are the shares of T and H records
  that appear in S: under no memorisation they have the *same* expectation whatever
  ``n_T / n_H`` (T and H are exchangeable draws), which is why the privacy gate compares them,
  while ``synthetic_in_train`` grows with ``n_T`` by chance matches of short records.
* ``dcr/*``: distance to the closest record. ``closer_to_train_share`` counts a synthetic
  record as closer to T when ``DCR_T < DCR_H``; a tie is split by the numbers of tied
  neighbours in T and H (the nearest record of T u H is then uniformly one of them), so
  without memorisation the share is ``closer_to_train_expected = n_T / (n_T + n_H)`` exactly.
  ``median_ratio`` is median DCR_T / median DCR_H over synthetic records;
  ``median_ratio_to_real`` compares median DCR_T of synthetic records with that of real
  held-out records (1 = as close to T as fresh patients are; < 1 = closer: memorisation).
* ``nnaa/*``: TWIN Eqs. 13-15 (Yale et al.) on equal-size blocks: T is partitioned into
  blocks of size n (= the evaluation set size), each paired with a block of S; E is n records
  of H. ``privacy_loss = aa_holdout - aa_train``. A density-ratio statistic, not a copy
  detector (metrics notes 4.3): copies are caught by exact match, DCR and MIA.
* ``mia/distance_*``: members (from T) and non-members (from H), equal numbers, scored by
  ``-DCR_S``; ROC AUC and TPR at 1% FPR (ties interpolated). ``membership_from_losses`` is
  the white-box variant on the model's per-patient loss.
* ``presence/*``: TWIN Eq. 11. The attacker knows the full records of a set K of training
  patients. TWIN's rule "a visit of the known record equals a synthetic visit" is reported as
  ``visit_sensitivity``; on claims data most visits are a single common diagnosis, so it
  fires on independent patients too (measured: 0.61 for an independent 20K-patient sample of
  the same simulated population, with an equal held-out control). ``sensitivity`` (the gate's
  metric) therefore uses TWIN's other reading, "the attacker ignores visit order and checks
  whether a synthetic record matches the known record": a known record is discovered when one
  synthetic record has exactly its set of visits (week + diagnosis-age tokens). Every
  sensitivity has its control on an equal-size known set from H (false-positive rate).
* ``attribute/*``: TWIN Eq. 12. The attacker holds 1% of T (at least ``min_attribute_queries``)
  and knows x% of the 605 condition columns (x in 5, 10, 15, 20; the same random columns for
  every record); the 5 nearest synthetic records on the known columns vote (>= 3 of 5) on the
  unknown ones. Sensitivity counts present unknown conditions discovered (predicting all
  absent is otherwise trivially right), averaged over records with any. ``sensitivity`` is
  the maximum over x, as TWIN reports; ``holdout_sensitivity`` is the same attack run on H as
  the attacker's database (what population knowledge alone reveals).
* Risk bands (TWIN 4.4.1): 0 low (< 1/3), 1 medium, 2 high (> 2/3).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import ray
import scipy.sparse as sp
from sklearn.metrics import roc_auc_score, roc_curve

from mirror.data.vocab import N_CONDITIONS
from mirror.metrics import arrays
from mirror.metrics.errors import MetricError
from mirror.metrics.neighbours import NeighbourSearch, local_nearest, select_rows

RISK_BANDS = (1 / 3, 2 / 3)
ATTRIBUTE_KNOWN_PERCENTS = (5, 10, 15, 20)
ATTRIBUTE_K = 5


def risk_band(value: float) -> float:
    """TWIN's equal thirds of [0, 1]: 0 low, 1 medium, 2 high."""
    return float(np.searchsorted(RISK_BANDS, value, side="right"))


# ---------------------------------------------------------------------------------------------
# Exact match


def exact_match_metrics(
    syn_hash: np.ndarray, train_hash: np.ndarray, holdout_hash: np.ndarray
) -> dict[str, float]:
    if len(syn_hash) == 0 or len(train_hash) == 0 or len(holdout_hash) == 0:
        raise MetricError("privacy/exact_match", "a set is empty")
    train_rep = arrays.isin(train_hash, syn_hash).mean()
    holdout_rep = arrays.isin(holdout_hash, syn_hash).mean()
    n_t, n_h = len(train_hash), len(holdout_hash)
    pooled = (train_rep * n_t + holdout_rep * n_h) / (n_t + n_h)
    return {
        "exact_match/synthetic_in_train": float(arrays.isin(syn_hash, train_hash).mean()),
        "exact_match/synthetic_in_holdout": float(arrays.isin(syn_hash, holdout_hash).mean()),
        "exact_match/train_reproduced": float(train_rep),
        "exact_match/holdout_reproduced": float(holdout_rep),
        "exact_match/reproduced_excess": float(train_rep - holdout_rep),
        "exact_match/reproduced_excess_se": float(
            np.sqrt(pooled * (1 - pooled) * (1 / n_t + 1 / n_h))
        ),
        "exact_match/holdout_in_train": float(arrays.isin(holdout_hash, train_hash).mean()),
        "exact_match/synthetic_duplicates": float(1 - len(arrays.unique(syn_hash)) / len(syn_hash)),
    }


def exact_match_long(
    syn_hash: np.ndarray, syn_words: np.ndarray, train_hash: np.ndarray, min_words: int = 5
) -> dict[str, float]:
    """Exact matches among synthetic records of >= ``min_words`` words: one- and two-word
    records match by chance in claims data, long ones do not."""
    name = f"exact_match/synthetic_in_train_min{min_words}words"
    long = syn_words >= min_words
    if not long.any():
        raise MetricError(f"privacy/{name}", f"no synthetic record has >= {min_words} words")
    return {name: float(arrays.isin(syn_hash[long], train_hash).mean())}


# ---------------------------------------------------------------------------------------------
# Distance to closest record


def dcr_metrics(
    d_train: np.ndarray,
    ties_train: np.ndarray,
    d_holdout: np.ndarray,
    ties_holdout: np.ndarray,
    n_train: int,
    n_holdout: int,
    d_real_to_train: np.ndarray,
) -> dict[str, float]:
    """Inputs are per synthetic query (``d_*``, ``ties_*``) and per real held-out query
    (``d_real_to_train``: the no-memorisation reference distances)."""
    if len(d_train) == 0 or len(d_real_to_train) == 0:
        raise MetricError("privacy/dcr", "no queries")
    tie = d_train == d_holdout
    closer = (d_train < d_holdout) + tie * ties_train / np.maximum(ties_train + ties_holdout, 1)
    expected = n_train / (n_train + n_holdout)
    med_t, med_h, med_real = np.median(d_train), np.median(d_holdout), np.median(d_real_to_train)
    if med_h == 0:
        raise MetricError(
            "privacy/dcr/median_ratio", "median synthetic distance to held-out records is 0"
        )
    if med_real == 0:
        raise MetricError(
            "privacy/dcr/median_ratio_to_real", "median real held-out distance to train is 0"
        )
    return {
        "dcr/closer_to_train_share": float(closer.mean()),
        "dcr/closer_to_train_expected": float(expected),
        "dcr/closer_to_train_excess": float(closer.mean() - expected),
        "dcr/median_ratio": float(med_t / med_h),
        "dcr/median_ratio_to_real": float(med_t / med_real),
        "dcr/train_p01": float(np.percentile(d_train, 1)),
        "dcr/train_p05": float(np.percentile(d_train, 5)),
        "dcr/train_p50": float(med_t),
        "dcr/holdout_p50": float(med_h),
        "dcr/real_to_train_p05": float(np.percentile(d_real_to_train, 5)),
        "dcr/real_to_train_p50": float(med_real),
        "dcr/train_zero_fraction": float((d_train == 0).mean()),
        "dcr/real_to_train_zero_fraction": float((d_real_to_train == 0).mean()),
    }


# ---------------------------------------------------------------------------------------------
# Membership inference


def membership_auc(
    member_scores: np.ndarray,
    nonmember_scores: np.ndarray,
    name: str = "privacy/mia",
    fpr: float = 0.01,
) -> tuple[float, float]:
    """(ROC AUC, TPR at ``fpr``) of an attack scoring members higher; ties count half, and the
    TPR is interpolated along the ROC curve (a randomised threshold between tied scores)."""
    member_scores, nonmember_scores = (
        np.asarray(member_scores, float),
        np.asarray(nonmember_scores, float),
    )
    if len(member_scores) == 0 or len(nonmember_scores) == 0:
        raise MetricError(name, "needs members and non-members")
    if not (np.isfinite(member_scores).all() and np.isfinite(nonmember_scores).all()):
        raise MetricError(name, "scores contain NaN or infinity")
    y = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    s = np.r_[member_scores, nonmember_scores]
    fprs, tprs, _ = roc_curve(y, s, drop_intermediate=False)
    return float(roc_auc_score(y, s)), float(np.interp(fpr, fprs, tprs))


def membership_from_losses(
    member_losses: np.ndarray, nonmember_losses: np.ndarray
) -> dict[str, float]:
    """White-box membership test from the model's per-patient loss (``model.patient_nll``) on
    training members and held-out non-members: lower loss = more likely a member."""
    auc, tpr = membership_auc(
        -np.asarray(member_losses, float),
        -np.asarray(nonmember_losses, float),
        "privacy/mia/loss_auc",
    )
    return {"privacy/mia/loss_auc": auc, "privacy/mia/loss_tpr_at_1pct_fpr": tpr}


# ---------------------------------------------------------------------------------------------
# Nearest-neighbour adversarial accuracy (blocked)

Rows = tuple[np.ndarray, np.ndarray]  # (indptr, keys)


def adversarial_accuracy(
    d_ab: np.ndarray, d_aa: np.ndarray, d_ba: np.ndarray, d_bb: np.ndarray, tie_credit: float = 0.0
) -> float:
    """TWIN Eq. 14/15: 0.5 = A and B indistinguishable by nearest neighbours. TWIN counts a tie
    (``d_ab == d_aa``) as "not farther" (``tie_credit=0``); with integer distances ties are
    common, so the scorecard also reports half credit."""

    def side(cross: np.ndarray, own: np.ndarray) -> float:
        return float(((cross > own) + tie_credit * (cross == own)).mean())

    return 0.5 * (side(d_ab, d_aa) + side(d_ba, d_bb))


def block_adversarial_accuracy(
    a: Rows, b: Rows, d_aa: np.ndarray | None = None, d_bb: np.ndarray | None = None
) -> tuple[float, float, float]:
    """(AA strict, AA with half credit for ties, tie rate) of two equal-size row sets,
    computed in this process (self excluded by index). Within-set distances can be passed in
    when one set is paired with several others."""
    d_ab, _ = local_nearest(*a, *b)
    d_ba, _ = local_nearest(*b, *a)
    d_aa = local_nearest(*a, *a, self_match=True)[0] if d_aa is None else d_aa
    d_bb = local_nearest(*b, *b, self_match=True)[0] if d_bb is None else d_bb
    ties = 0.5 * ((d_ab == d_aa).mean() + (d_ba == d_bb).mean())
    return (
        adversarial_accuracy(d_ab, d_aa, d_ba, d_bb),
        adversarial_accuracy(d_ab, d_aa, d_ba, d_bb, 0.5),
        float(ties),
    )


def _within(rows: Rows) -> np.ndarray:
    return local_nearest(*rows, *rows, self_match=True)[0]


_aa_task = ray.remote(num_cpus=1)(block_adversarial_accuracy)
_within_task = ray.remote(num_cpus=1)(_within)


def nnaa_metrics(
    train: Rows, holdout: Rows, syn: Rows, block_size: int, seed: int
) -> dict[str, float]:
    n_t, n_h, n_s = (len(x[0]) - 1 for x in (train, holdout, syn))
    n = min(block_size, n_t, n_h, n_s)
    if n < 2:
        raise MetricError("privacy/nnaa", f"needs >= 2 records per set, got block size {n}")
    rng = np.random.default_rng(seed)
    t_blocks = rng.permutation(n_t)[: (n_t // n) * n].reshape(-1, n)
    s_blocks = rng.permutation(n_s)[: (n_s // n) * n].reshape(-1, n)
    e = select_rows(*holdout, rng.permutation(n_h)[:n])
    s_refs = [ray.put(select_rows(*syn, rows)) for rows in s_blocks]
    s_within = [_within_task.remote(s_ref) for s_ref in s_refs]  # d_SS once per synthetic block
    e_within = _within_task.remote(e)
    train_refs = [
        _aa_task.remote(
            select_rows(*train, rows), s_refs[i % len(s_refs)], None, s_within[i % len(s_refs)]
        )
        for i, rows in enumerate(t_blocks)
    ]
    holdout_refs = [
        _aa_task.remote(e, s_ref, e_within, d_ss)
        for s_ref, d_ss in zip(s_refs, s_within, strict=True)
    ]
    aa_t = np.mean(ray.get(train_refs), axis=0)
    aa_e = np.mean(ray.get(holdout_refs), axis=0)
    return {
        "nnaa/aa_train": float(aa_t[0]),
        "nnaa/aa_holdout": float(aa_e[0]),
        "nnaa/privacy_loss": float(aa_e[0] - aa_t[0]),
        "nnaa/aa_train_half_ties": float(aa_t[1]),
        "nnaa/aa_holdout_half_ties": float(aa_e[1]),
        "nnaa/privacy_loss_half_ties": float(aa_e[1] - aa_t[1]),
        "nnaa/tie_rate": float(aa_t[2]),
        "nnaa/block_size": float(n),
        "nnaa/train_blocks": float(len(t_blocks)),
    }


# ---------------------------------------------------------------------------------------------
# TWIN presence and attribute disclosure


def presence_metrics(
    known_train_visits: tuple[np.ndarray, np.ndarray],
    known_train_records: np.ndarray,
    known_holdout_visits: tuple[np.ndarray, np.ndarray],
    known_holdout_records: np.ndarray,
    syn_visits: np.ndarray,
    syn_records: np.ndarray,
) -> dict[str, float]:
    """``*_visits`` are (visit hashes, patient row of each visit) of the known sets;
    ``*_records`` their visit-set hashes; ``syn_*`` all synthetic visit / visit-set hashes."""
    n_t, n_h = len(known_train_records), len(known_holdout_records)
    if n_t == 0 or n_h == 0:
        raise MetricError("privacy/presence", "empty known set")

    def visit_rule(visits: tuple[np.ndarray, np.ndarray], n: int) -> float:
        hashes, rows = visits
        return float((np.bincount(rows[arrays.isin(hashes, syn_visits)], minlength=n) > 0).mean())

    s_k, s_h = (
        arrays.isin(known_train_records, syn_records).mean(),
        arrays.isin(known_holdout_records, syn_records).mean(),
    )
    v_k, v_h = visit_rule(known_train_visits, n_t), visit_rule(known_holdout_visits, n_h)
    return {
        "presence/sensitivity": float(s_k),
        "presence/holdout_sensitivity": float(s_h),
        "presence/excess": float(s_k - s_h),
        "presence/risk_band": risk_band(s_k),
        "presence/visit_sensitivity": v_k,
        "presence/visit_holdout_sensitivity": v_h,
        "presence/visit_excess": v_k - v_h,
        "presence/n_known": float(n_t),
    }


def _restrict(x: sp.csr_matrix, columns: np.ndarray) -> Rows:
    """Rows of a binary CSR restricted to ``columns``, as (indptr, int64 keys)."""
    sub = x[:, columns].tocsr()
    sub.sort_indices()
    return sub.indptr.astype(np.int64), columns[sub.indices].astype(np.int64)


def _attack(
    known_x: sp.csr_matrix, database_x: sp.csr_matrix, known_cols: np.ndarray, seed: int,
    width: int = N_CONDITIONS,
) -> float:
    """TWIN's attribute attack against one database; returns mean sensitivity (Eq. 12)."""
    search = NeighbourSearch(*_restrict(database_x, known_cols), seed=seed)
    _, idx = search.k_nearest(*_restrict(known_x, known_cols), ATTRIBUTE_K)
    search.close()
    m = known_x.shape[0]
    pick = sp.csr_matrix(
        (np.ones(idx.size, np.int32), (np.repeat(np.arange(m), ATTRIBUTE_K), idx.ravel())),
        shape=(m, database_x.shape[0]),
    )
    votes = (pick @ database_x.astype(np.int32)).toarray()
    unknown = np.ones(width, dtype=bool)
    unknown[known_cols] = False
    present = known_x.toarray().astype(bool) & unknown
    discovered = present & (votes * 2 > ATTRIBUTE_K)
    has = present.sum(axis=1) > 0
    if not has.any():
        raise MetricError(
            "privacy/attribute", "no compromised record has an unknown present condition"
        )
    return float((discovered.sum(axis=1)[has] / present.sum(axis=1)[has]).mean())


def attribute_metrics(
    known_x: sp.csr_matrix, syn_x: sp.csr_matrix, holdout_x: sp.csr_matrix, seed: int,
    width: int = N_CONDITIONS,
) -> dict[str, float]:
    """``known_x``: multi-hot (``width`` columns: conditions of a patient record, or a trial
    visit's medications and AEs) of the compromised training records; ``syn_x`` and
    ``holdout_x``: the attacker's database (synthetic) and the population-knowledge control."""
    if syn_x.shape[0] < ATTRIBUTE_K or holdout_x.shape[0] < ATTRIBUTE_K:
        raise MetricError("privacy/attribute", f"databases need >= {ATTRIBUTE_K} records")
    wrong = {name: x.shape[1] for name, x in (("known", known_x), ("synthetic", syn_x), ("held-out", holdout_x))
             if x.shape[1] != width}
    if wrong:
        raise MetricError("privacy/attribute", f"multi-hots must have width {width}, got {wrong}")
    rng = np.random.default_rng(seed)
    out: dict[str, float] = {}
    worst_s = worst_h = -1.0
    for pct in ATTRIBUTE_KNOWN_PERCENTS:
        cols = np.sort(
            rng.choice(width, size=max(1, round(width * pct / 100)), replace=False)
        ).astype(np.int64)
        s = _attack(known_x, syn_x, cols, seed, width)
        h = _attack(known_x, holdout_x, cols, seed, width)
        out[f"attribute/sensitivity_known{pct:02d}"] = s
        out[f"attribute/holdout_sensitivity_known{pct:02d}"] = h
        worst_s, worst_h = max(worst_s, s), max(worst_h, h)
    out["attribute/sensitivity"] = worst_s
    out["attribute/holdout_sensitivity"] = worst_h
    out["attribute/excess"] = worst_s - worst_h
    out["attribute/risk_band"] = risk_band(worst_s)
    out["attribute/n_compromised"] = float(known_x.shape[0])
    return out


# ---------------------------------------------------------------------------------------------
# Gate


@dataclass(frozen=True)
class GateThresholds:
    """Release criteria. Exact match: the share of training records reproduced may exceed the
    share of held-out records reproduced by at most ``exact_match_z`` standard errors (both
    are estimated from finite sets; at z = 0 an honest generator fails half the time)."""

    exact_match_z: float = 3.0
    max_mia_auc: float = 0.6
    max_presence_sensitivity: float = 1 / 3  # strictly below: TWIN's low-risk band

    def __post_init__(self) -> None:
        if self.exact_match_z < 0:
            raise ValueError(f"exact_match_z must be >= 0, got {self.exact_match_z}")
        for name in ("max_mia_auc", "max_presence_sensitivity"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class GateResult:
    passed: bool
    failures: list[str] = field(default_factory=list)


def privacy_gate(
    scorecard: Mapping[str, float], thresholds: GateThresholds | None = None, prefix: str = ""
) -> GateResult:
    """Pass/fail on a scorecard (``prefix`` selects a reference row, e.g. ``reference/floor/``).
    A metric that is missing or NaN is a failure: the gate never passes on absent evidence."""
    t = thresholds or GateThresholds()
    failures: list[str] = []

    def get(name: str) -> float | None:
        value = scorecard.get(prefix + name)
        if value is None or not np.isfinite(value):
            failures.append(
                f"{prefix}{name} is {'missing' if value is None else value}: cannot pass the gate"
            )
            return None
        return float(value)

    train, holdout, se = (
        get(f"privacy/exact_match/{k}")
        for k in ("train_reproduced", "holdout_reproduced", "reproduced_excess_se")
    )
    if None not in (train, holdout, se) and train > holdout + t.exact_match_z * se:
        failures.append(
            f"exact match: {train:.4f} of training records reproduced vs {holdout:.4f} of "
            f"held-out records (allowed excess {t.exact_match_z:g} x SE {se:.4f})"
        )
    auc = get("privacy/mia/distance_auc")
    if auc is not None and auc > t.max_mia_auc:
        failures.append(f"distance membership-inference AUC {auc:.3f} > {t.max_mia_auc:g}")
    sens = get("privacy/presence/sensitivity")
    if sens is not None and sens >= t.max_presence_sensitivity:
        failures.append(
            f"presence-disclosure sensitivity {sens:.3f} >= {t.max_presence_sensitivity:.3f}"
        )
    return GateResult(passed=not failures, failures=failures)
