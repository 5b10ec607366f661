"""Fidelity: how closely the synthetic population's statistics match the real one's.

Most metrics compare two :class:`FidelitySummary` objects: sufficient statistics accumulated
shard by shard in one streaming pass (counts, histograms, 605 x 605 co-occurrence and
sequential-bigram matrices), so they are exact at any dataset size. Detection AUC and the
log-cluster metric need records; they take equal-size samples of both sides' patient features.

Conventions (metrics notes, sections 2 and 5)
----------------------------------------------
* Metric groups return ``{name: value}``; a value that cannot be computed is the
  :class:`MetricError` saying why (``errors.attempt``), so one undefined metric does not hide
  the rest of its group. ``summary_metrics`` raises the first one instead.
* Real is the reference: ``r2`` is the coefficient of determination with the real values as
  ``y_true`` (asymmetric, can be negative), distinct from ``pearson_r``.
* Prevalence is patient-level: the share of patients with the condition ever recorded.
* Visits are a patient's words grouped by week. A sequential bigram ``(a, b)`` is condition
  ``a`` in visit ``t - 1`` and ``b`` in visit ``t`` of the same patient, as a share of all
  consecutive visit pairs (HALO's per-visit sequential bigram); R² over the union of pairs
  seen in either dataset.
* Co-occurrence uses all 605 conditions (the issue asks for the top 1,000; the vocabulary has
  605): ``cooccurrence/r2`` over the 182,710 pair probabilities, ``pcd`` the Frobenius norm of
  the difference of phi-correlation matrices off the diagonal (a condition constant in a set
  gets correlation 0 there), ``rmse_offdiag`` the same per pair. Pair probabilities mostly
  reflect the marginals, so ``phi_r2_top100`` / ``pcd_top100`` compare the correlations of the
  100 most prevalent real conditions: they collapse when only the marginals are right.
* Distributions (words, distinct conditions and visits per patient, gaps between visits, age
  and week of each word) are compared exactly from histograms: Kolmogorov-Smirnov statistic
  and Wasserstein-1 in the quantity's own units (years for age).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import scipy.sparse as sp
from sklearn.cluster import MiniBatchKMeans
from sklearn.decomposition import TruncatedSVD
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from mirror.data.vocab import AGE_GROUP_YEARS, N_AGE_GROUPS, N_CONDITIONS
from mirror.metrics import arrays
from mirror.metrics import features as F
from mirror.metrics.code_vector import log_of_share_deviation
from mirror.metrics.errors import MetricError, attempt, raise_first
from mirror.metrics.records import VALIDITY_RULES, PatientBlock

TOP_K_CORRELATIONS = 100
_HISTOGRAMS = ("length_hist", "distinct_hist", "visits_hist", "gap_hist", "week_words")


@dataclass
class FidelitySummary:
    """Sufficient statistics of one set of patients; ``merge`` adds two disjoint sets."""

    n_patients: int
    n_valid: int  # patients passing every validity rule
    rule_failures: np.ndarray  # (len(VALIDITY_RULES),) patients failing each rule
    length_hist: np.ndarray  # words per patient
    distinct_hist: np.ndarray  # distinct conditions per patient
    visits_hist: np.ndarray  # visits per patient
    gap_hist: np.ndarray  # weeks between consecutive visits of a patient
    week_words: np.ndarray  # words per week index
    age_words: np.ndarray  # (24,) words per age group
    condition_words: np.ndarray  # (605,) words per condition
    condition_patients: np.ndarray  # (605,) patients with the condition
    age_condition_patients: np.ndarray  # (24, 605) patients with c while in age group b
    age_patients: np.ndarray  # (24,) patients with any word in age group b
    cooccurrence: np.ndarray  # (605, 605) patients with both conditions
    seq_bigram: np.ndarray  # (605, 605) consecutive visit pairs with a then b
    n_visit_pairs: int
    sex_counts: np.ndarray  # (2,) male, female
    birth_values: np.ndarray  # distinct birth weeks
    birth_counts: np.ndarray

    @classmethod
    def from_block(cls, block: PatientBlock) -> FidelitySummary:
        n = len(block)
        rows = block.row_of_word()
        cond = block.conditions.astype(np.int64)
        age = block.age_groups.astype(np.int64)
        x = F.condition_matrix(block).astype(np.int32)
        v = F.visits(block)
        n_visits = len(v.row)
        same_patient = v.row[1:] == v.row[:-1] if n_visits > 1 else np.zeros(0, bool)
        pair_prev = np.flatnonzero(same_patient)
        xv = F.binary_csr(v.of_word, cond, (n_visits, N_CONDITIONS)).astype(np.int32)
        seq = (xv[pair_prev].T @ xv[pair_prev + 1]).toarray().astype(np.int64)
        _, age_cond = F.row_unique(rows, age * N_CONDITIONS + cond, n, N_AGE_GROUPS * N_CONDITIONS)
        _, age_any = F.row_unique(rows, age, n, N_AGE_GROUPS)
        fails = np.array(
            [(block.rule_failures >> np.uint16(i)) & 1 for i in range(len(VALIDITY_RULES))]
        )
        birth_values, birth_counts = arrays.unique_counts(block.birth_week.astype(np.int64))
        return cls(
            n_patients=n,
            n_valid=int((block.rule_failures == 0).sum()),
            rule_failures=fails.sum(axis=1).astype(np.int64).reshape(len(VALIDITY_RULES)),
            length_hist=np.bincount(block.lengths),
            distinct_hist=np.bincount(np.diff(x.indptr)),
            visits_hist=np.bincount(F.visits_per_patient(block, v)),
            gap_hist=np.bincount((v.week[1:] - v.week[:-1])[same_patient]),
            week_words=np.bincount(block.weeks),
            age_words=np.bincount(age, minlength=N_AGE_GROUPS),
            condition_words=np.bincount(cond, minlength=N_CONDITIONS),
            condition_patients=np.diff(x.tocsc().indptr).astype(np.int64),
            age_condition_patients=np.bincount(
                age_cond, minlength=N_AGE_GROUPS * N_CONDITIONS
            ).reshape(N_AGE_GROUPS, N_CONDITIONS),
            age_patients=np.bincount(age_any, minlength=N_AGE_GROUPS),
            cooccurrence=(x.T @ x).toarray().astype(np.int64),
            seq_bigram=seq,
            n_visit_pairs=len(pair_prev),
            sex_counts=np.array([(block.sex == -1).sum(), (block.sex == 1).sum()], dtype=np.int64),
            birth_values=birth_values,
            birth_counts=birth_counts,
        )

    def merge(self, other: FidelitySummary) -> FidelitySummary:
        out = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name in _HISTOGRAMS:
                out[f.name] = _add_padded(a, b)
            elif f.name in ("birth_values", "birth_counts"):
                continue
            else:
                out[f.name] = a + b
        values = np.concatenate([self.birth_values, other.birth_values])
        counts = np.concatenate([self.birth_counts, other.birth_counts])
        out["birth_values"], inverse = arrays.unique_inverse(values)
        out["birth_counts"] = np.bincount(
            inverse, weights=counts, minlength=len(out["birth_values"])
        ).astype(np.int64)
        return FidelitySummary(**out)

    @property
    def prevalence(self) -> np.ndarray:
        return self.condition_patients / max(self.n_patients, 1)


def _add_padded(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros(max(len(a), len(b)), dtype=np.int64)
    out[: len(a)] += a
    out[: len(b)] += b
    return out


def summarise(blocks) -> FidelitySummary:
    """Merge the summaries of an iterable of blocks (streaming)."""
    total = None
    for block in blocks:
        s = FidelitySummary.from_block(block)
        total = s if total is None else total.merge(s)
    if total is None:
        return FidelitySummary.from_block(PatientBlock.empty())
    return total


# ---------------------------------------------------------------------------------------------
# Scalar comparisons


def pearson_r(real: np.ndarray, syn: np.ndarray, name: str) -> float:
    real, syn = np.asarray(real, np.float64), np.asarray(syn, np.float64)
    if len(real) < 2:
        raise MetricError(name, f"needs at least 2 values, got {len(real)}")
    for label, x in (("real", real), ("synthetic", syn)):
        if np.ptp(x) == 0:
            raise MetricError(
                name,
                f"{label} values are constant ({x[0]:.3g}) over {len(x)} items: "
                "Pearson r is undefined",
            )
    return float(np.corrcoef(real, syn)[0, 1])


def r2_score(real: np.ndarray, syn: np.ndarray, name: str) -> float:
    """Coefficient of determination with ``real`` as y_true (HALO's ``r2_score(real, syn)``)."""
    real, syn = np.asarray(real, np.float64), np.asarray(syn, np.float64)
    total = ((real - real.mean()) ** 2).sum()
    if len(real) < 2 or total == 0:
        raise MetricError(name, f"real values are constant over {len(real)} items: R² is undefined")
    return float(1.0 - ((real - syn) ** 2).sum() / total)


def _cdf(hist: np.ndarray, size: int) -> np.ndarray:
    h = np.zeros(size)
    h[: len(hist)] = hist
    return np.cumsum(h) / h.sum()


def histogram_ks_w1(
    real: np.ndarray, syn: np.ndarray, name: str, unit: float = 1.0
) -> tuple[float, float]:
    """(KS statistic, Wasserstein-1 x ``unit``) of two distributions on 0, 1, 2, ... given as
    counts; exact (for unit spacing, W1 is the summed absolute CDF difference)."""
    if real.sum() == 0 or syn.sum() == 0:
        which = "real" if real.sum() == 0 else "synthetic"
        raise MetricError(name, f"{which} distribution is empty")
    size = max(len(real), len(syn))
    diff = np.abs(_cdf(real, size) - _cdf(syn, size))
    return float(diff.max()), float(diff.sum() * unit)


# ---------------------------------------------------------------------------------------------
# Summary-based metric groups. Each returns {name: value}; names are relative to "fidelity/".


def prevalence_metrics(real: FidelitySummary, syn: FidelitySummary) -> dict[str, float]:
    p, q = real.prevalence, syn.prevalence
    return {
        "prevalence/pearson_r": attempt(lambda: pearson_r(p, q, "fidelity/prevalence/pearson_r")),
        "prevalence/r2": attempt(lambda: r2_score(p, q, "fidelity/prevalence/r2")),
        "prevalence/max_abs_diff": float(np.abs(p - q).max()),
        "prevalence/mean_abs_diff": float(np.abs(p - q).mean()),
        "prevalence/unseen_in_real": float(
            ((real.condition_patients == 0) & (syn.condition_patients > 0)).sum()
        ),
    }


def prevalence_bands(real: FidelitySummary, n_bands: int = 4) -> list[np.ndarray]:
    """Bands of conditions: quantiles (by rank) of the conditions seen in real data, rarest
    first, so every band has ~151 conditions whatever the population size."""
    seen = np.flatnonzero(real.condition_patients > 0)
    return np.array_split(seen[np.argsort(real.prevalence[seen], kind="stable")], n_bands)


def prevalence_band_metrics(
    real: FidelitySummary, syn: FidelitySummary, band: int, n_bands: int = 4
) -> dict[str, float]:
    """``band`` in 1..n_bands (1 = rarest)."""
    rows = prevalence_bands(real, n_bands)[band - 1]
    p, q = real.prevalence[rows], syn.prevalence[rows]
    prefix = f"prevalence/band{band}"
    if len(rows) == 0:
        raise MetricError(f"fidelity/{prefix}", "no condition seen in real data falls in this band")
    return {
        f"{prefix}/pearson_r": attempt(lambda: pearson_r(p, q, f"fidelity/{prefix}/pearson_r")),
        f"{prefix}/r2": attempt(lambda: r2_score(p, q, f"fidelity/{prefix}/r2")),
        f"{prefix}/max_abs_diff": float(np.abs(p - q).max()),
    }


def rare_recall(
    real: FidelitySummary, syn: FidelitySummary, min_patients: int = 10
) -> dict[str, float]:
    """Share of conditions with >= ``min_patients`` real patients that the synthetic set has at
    all (mode collapse). Depends on the synthetic set's size: compare with the ceiling row."""
    frequent = real.condition_patients >= min_patients
    if not frequent.any():
        raise MetricError(
            "fidelity/prevalence/rare_recall", f"no condition has >= {min_patients} real patients"
        )
    return {"prevalence/rare_recall": float((syn.condition_patients[frequent] > 0).mean())}


def age_prevalence_metrics(
    real: FidelitySummary, syn: FidelitySummary, min_cell_patients: int = 100
) -> dict[str, float]:
    """Prevalence of condition c among patients with a word in age group b, compared over the
    age groups with >= ``min_cell_patients`` real patients."""
    bands = np.flatnonzero(real.age_patients >= min_cell_patients)
    if len(bands) == 0:
        raise MetricError(
            "fidelity/age_prevalence/r2", f"no age group has >= {min_cell_patients} real patients"
        )
    p = real.age_condition_patients[bands] / real.age_patients[bands, None]
    q = syn.age_condition_patients[bands] / np.maximum(syn.age_patients[bands, None], 1)
    weight = real.age_patients[bands] / real.age_patients[bands].sum()
    return {
        "age_prevalence/r2": attempt(
            lambda: r2_score(p.ravel(), q.ravel(), "fidelity/age_prevalence/r2")
        ),
        "age_prevalence/weighted_mae": float((weight * np.abs(p - q).mean(axis=1)).sum()),
        "age_prevalence/age_groups_compared": float(len(bands)),
    }


DISTRIBUTIONS = {  # name: (summary histogram, unit)
    "sentence_length": ("length_hist", 1.0),
    "distinct_conditions": ("distinct_hist", 1.0),
    "visits": ("visits_hist", 1.0),
    "gap_weeks": ("gap_hist", 1.0),
    "week_of_event": ("week_words", 1.0),
    "age_at_event_years": ("age_words", float(AGE_GROUP_YEARS)),
}


def distribution_metrics(
    real: FidelitySummary, syn: FidelitySummary, name: str
) -> dict[str, float]:
    attr, unit = DISTRIBUTIONS[name]
    ks, w1 = histogram_ks_w1(getattr(real, attr), getattr(syn, attr), f"fidelity/{name}", unit)
    return {f"{name}/ks": ks, f"{name}/wasserstein": w1}


def _phi(cooc: np.ndarray, n: int) -> tuple[np.ndarray, int]:
    """Phi (Pearson) correlations of binary columns; constant columns get 0. Returns the
    matrix and how many columns were constant."""
    p = np.diag(cooc) / n
    var = p * (1 - p)
    constant = var <= 0
    denom = np.sqrt(np.outer(var, var))
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.where(denom > 0, (cooc / n - np.outer(p, p)) / denom, 0.0)
    return rho, int(constant.sum())


def cooccurrence_metrics(real: FidelitySummary, syn: FidelitySummary) -> dict[str, float]:
    """HALO-style pair probabilities over all 605 x 604 / 2 condition pairs."""
    if real.n_patients == 0 or syn.n_patients == 0:
        raise MetricError("fidelity/cooccurrence/r2", "a set has no patients")
    upper = np.triu_indices(N_CONDITIONS, k=1)
    p = real.cooccurrence[upper] / real.n_patients
    q = syn.cooccurrence[upper] / syn.n_patients
    return {
        "cooccurrence/r2": attempt(lambda: r2_score(p, q, "fidelity/cooccurrence/r2")),
        "cooccurrence/pearson_r": attempt(
            lambda: pearson_r(p, q, "fidelity/cooccurrence/pearson_r")
        ),
        "cooccurrence/n_conditions": float(N_CONDITIONS),
    }


def correlation_metrics(
    real: FidelitySummary, syn: FidelitySummary, top_k: int = TOP_K_CORRELATIONS
) -> dict[str, float]:
    """Phi correlations: PCD over all conditions, and R² / PCD among the ``top_k`` most
    prevalent real conditions. Pair probabilities are dominated by the marginals
    (p_jk ~ p_j p_k already scores well); correlations measure the dependence itself, and
    rare conditions' correlations are mostly sampling noise at any realistic n."""
    if real.n_patients == 0 or syn.n_patients == 0:
        raise MetricError("fidelity/cooccurrence/pcd", "a set has no patients")
    upper = np.triu_indices(N_CONDITIONS, k=1)
    rho_r, const_r = _phi(real.cooccurrence, real.n_patients)
    rho_s, const_s = _phi(syn.cooccurrence, syn.n_patients)
    diff = (rho_r - rho_s)[upper]
    top = np.sort(np.argsort(-real.condition_patients, kind="stable")[:top_k])
    top_upper = np.triu_indices(len(top), k=1)
    top_r, top_s = rho_r[np.ix_(top, top)][top_upper], rho_s[np.ix_(top, top)][top_upper]
    return {
        "cooccurrence/pcd": float(np.sqrt(2 * (diff**2).sum())),
        "cooccurrence/rmse_offdiag": float(np.sqrt((diff**2).mean())),
        f"cooccurrence/phi_r2_top{top_k}": attempt(
            lambda: r2_score(top_r, top_s, f"fidelity/cooccurrence/phi_r2_top{top_k}")
        ),
        f"cooccurrence/pcd_top{top_k}": float(np.sqrt(2 * ((top_r - top_s) ** 2).sum())),
        "cooccurrence/constant_conditions_real": float(const_r),
        "cooccurrence/constant_conditions_synthetic": float(const_s),
    }


def bigram_metrics(real: FidelitySummary, syn: FidelitySummary) -> dict[str, float]:
    """HALO's sequential-visit bigram R² over all ordered pairs, and over pairs of *different*
    conditions (``transition_r2``): chronic recurrences (a then a) dominate the former."""
    name = "fidelity/sequential_bigram/r2"
    if real.n_visit_pairs == 0:
        raise MetricError(name, "no real patient has two visits")
    p = real.seq_bigram / real.n_visit_pairs
    q = syn.seq_bigram / max(syn.n_visit_pairs, 1)
    keys = (real.seq_bigram > 0) | (syn.seq_bigram > 0)
    transitions = keys & ~np.eye(N_CONDITIONS, dtype=bool)
    return {
        "sequential_bigram/r2": attempt(lambda: r2_score(p[keys], q[keys], name)),
        "sequential_bigram/transition_r2": attempt(
            lambda: r2_score(
                p[transitions], q[transitions], "fidelity/sequential_bigram/transition_r2"
            )
        ),
        "sequential_bigram/pairs_compared": float(keys.sum()),
    }


def validity_metrics(real: FidelitySummary, syn: FidelitySummary) -> dict[str, float]:
    if syn.n_patients == 0 or real.n_patients == 0:
        raise MetricError("fidelity/validity/rate", "a set has no patients")
    out = {
        "validity/rate": syn.n_valid / syn.n_patients,
        "validity/real_rate": real.n_valid / real.n_patients,
    }
    for rule, count in zip(VALIDITY_RULES, syn.rule_failures, strict=True):
        out[f"validity/fail/{rule}"] = float(count) / syn.n_patients
    return out


SUMMARY_GROUPS = (
    ("prevalence", prevalence_metrics),
    *(
        (f"prevalence/band{b}", lambda r, s, b=b: prevalence_band_metrics(r, s, b))
        for b in range(1, 5)
    ),
    ("prevalence/rare_recall", rare_recall),
    *((name, lambda r, s, name=name: distribution_metrics(r, s, name)) for name in DISTRIBUTIONS),
    ("cooccurrence", cooccurrence_metrics),
    ("correlations", correlation_metrics),
    ("sequential_bigram", bigram_metrics),
    ("validity", validity_metrics),
)


def summary_metrics(
    real: FidelitySummary, syn: FidelitySummary, min_cell_patients: int = 100
) -> dict[str, float]:
    """Every summary-based metric (raises on the first that cannot be computed; the scorecard
    runs the groups one by one instead, so one failure does not hide the others)."""
    out = age_prevalence_metrics(real, syn, min_cell_patients)
    for _, fn in SUMMARY_GROUPS:
        out.update(fn(real, syn))
    return raise_first(out)


# ---------------------------------------------------------------------------------------------
# Record-based metrics on equal-size samples


def _stack(
    real_x: sp.csr_matrix, syn_x: sp.csr_matrix, name: str
) -> tuple[sp.csr_matrix, np.ndarray]:
    if real_x.shape[0] != syn_x.shape[0]:
        raise MetricError(
            name,
            f"needs equal sample sizes, got {real_x.shape[0]} real and {syn_x.shape[0]} synthetic",
        )
    if real_x.shape[0] < 10:
        raise MetricError(name, f"needs >= 10 records per side, got {real_x.shape[0]}")
    y = np.r_[np.zeros(real_x.shape[0]), np.ones(syn_x.shape[0])]
    x = sp.vstack([real_x, syn_x], format="csr")
    return x[:, F.used_columns(x)].tocsr(), y


def detection_auc(
    real_x: sp.csr_matrix, syn_x: sp.csr_matrix, folds: int = 5, seed: int = 0
) -> float:
    """Mean held-out-fold ROC AUC of an L2 logistic regression telling real (0) from
    synthetic (1) patient features; 0.5 = indistinguishable. Always read next to privacy:
    copying the training data also scores 0.5."""
    x, y = _stack(real_x, syn_x, "fidelity/detection/auc")
    aucs = []
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(
        np.zeros(len(y)), y
    ):
        model = LogisticRegression(C=1.0, solver="liblinear", max_iter=1000)
        model.fit(x[train], y[train])
        aucs.append(roc_auc_score(y[test], model.decision_function(x[test])))
    return float(np.mean(aucs))


def log_cluster(
    real_x: sp.csr_matrix,
    syn_x: sp.csr_matrix,
    n_clusters: int = 20,
    n_components: int = 64,
    seed: int = 0,
) -> float:
    """Goncalves et al. (2020): log of the mean squared deviation of each cluster's real share
    from the overall real share, after TruncatedSVD + k-means on the stacked records. Lower
    (more negative) is better; compare with the ceiling row, the floor depends on n and G."""
    return log_cluster_runs(real_x, syn_x, n_clusters, n_components, seed)[0]


def log_cluster_runs(
    real_x: sp.csr_matrix,
    syn_x: sp.csr_matrix,
    n_clusters: int = 20,
    n_components: int = 64,
    seed: int = 0,
    seeds: int = 1,
) -> list[float]:
    """``log_cluster`` under k-means seeds ``seed`` ... ``seed + seeds - 1`` on one projection
    (TruncatedSVD seeded by ``seed``): U moves by a k-means seed as much as between generators
    (code_vector.py), so the scorecard reports the mean and the SD."""
    x, y = _stack(real_x, syn_x, "fidelity/log_cluster")
    if seeds < 1:
        raise MetricError("fidelity/log_cluster", f"needs seeds >= 1, got {seeds}")
    k = min(n_components, x.shape[1] - 1, x.shape[0] - 1)
    z = TruncatedSVD(n_components=k, random_state=seed).fit_transform(x)
    # Identical sets (a copy of the training data) put exactly the overall real share in every
    # cluster: log(0). That is reported at its limit (code_vector.LOG_CLUSTER_LIMIT, flagged by
    # the scorecard as log_cluster/at_limit), never raised: the privacy gate refuses such sets.
    return [
        log_of_share_deviation(
            MiniBatchKMeans(n_clusters=n_clusters, n_init=3, random_state=s, batch_size=4096).fit_predict(z),
            1 - y, n_clusters,
        )[0]
        for s in range(seed, seed + seeds)
    ]  # fmt: skip
