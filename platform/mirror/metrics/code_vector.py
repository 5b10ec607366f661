"""ScoEHR's four metrics (seed 002; metrics.md §2.1-2.4, §3) on patient code vectors, for
every generator: a code-vector generator's samples directly, a sentence generator's after
reducing each patient to the set of conditions it ever has (``DatasetView.conditions``).

* DDM, dimension-wise mean distance: ``mean_j |p_j(real) - p_j(syn)|`` over the F features
  (binary: the paper's DWM; lower is better).
* PCD, pairwise correlation difference: ``‖Corr(real) - Corr(syn)‖_F`` over the features
  (Pearson = phi on binary columns, from one sparse Gram matrix; a column constant in either
  set has correlation 0, as the paper's "NaN -> 0"; lower is better). Grows with F: compare
  rows of the same scorecard only. Spaces wider than 1,024 use the 1,024 most prevalent
  real codes.
* log-cluster U: ``log(mean_g (n_g^R / n_g - c)^2)``, ``c = n^R / (n^R + n^S)``, k-means with
  G clusters (default 20, stated: the paper does not) on the stacked code vectors of equal-size
  samples (lower is better). Identical sets (a copy of the training data) make every share
  equal c: the mean is 0 and U = log 0 = -inf. U is then reported at its limit, the
  JSON-safe ``LOG_CLUSTER_LIMIT`` = log(1e-12) ≈ -27.6, below anything attainable at the
  scorecard's sample sizes (the smallest non-zero mean is >= 1 / (G n²), n <= 10^5 per side),
  with ``.../at_limit`` = 1; the privacy gate is what refuses such a set. U depends on where
  k-means lands: at 5,002 patients per side its SD over k-means seeds is 0.5-0.7 for a
  generator and the real held-out set (200K simulated, ``bench/results/scoehr_u_seeds.json``),
  as wide as the gap between generators, so ``seeds`` > 1 reports the mean over that many
  seeds (the scorecard uses ``log_cluster_seeds``, default 5) and its SD beside it.
* SRA, synthetic ranking agreement (the paper leaves its task undefined; defined here): for
  each of the ``n_targets`` most prevalent real conditions with at least ``min_positives``
  real training and held-out cases, L = 4 scikit-learn classifiers (L2 logistic regression,
  Bernoulli naive Bayes, a depth-8 decision tree, a 30-tree depth-8 random forest) predict
  the condition from every other feature, trained once on real training records (AUROC A_j)
  and once on as many synthetic records (B_j), both scored on real held-out records.
  ``SRA = 1/(L(L-1)) Σ_{j≠k} 1[(A_j - A_k)(B_j - B_k) > 0]``, averaged over targets (higher is
  better; ties count as disagreement). A target with no synthetic positive (or no negative)
  gives B_j = ½ for every j and is counted in ``sra/targets_unlearnable``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.naive_bayes import BernoulliNB
from sklearn.tree import DecisionTreeClassifier

from mirror.metrics.errors import MetricError

LOG_CLUSTER_LIMIT = math.log(1e-12)  # U reported for identical sets (see module docstring)


def _dense_prevalence(x: sp.csr_matrix) -> np.ndarray:
    return np.asarray(x.mean(axis=0), dtype=np.float64).ravel()


def ddm(real: sp.csr_matrix, syn: sp.csr_matrix) -> float:
    """Mean over features of |real prevalence - synthetic prevalence|."""
    _check(real, syn, "fidelity/code_vector/ddm")
    return float(np.abs(_dense_prevalence(real) - _dense_prevalence(syn)).mean())


def correlation(x: sp.csr_matrix) -> np.ndarray:
    """(F, F) Pearson correlation of the columns of a binary (or count) CSR; 0 for constant
    columns and on the diagonal's constant entries."""
    x = x.astype(np.float64)
    n = x.shape[0]
    mean = _dense_prevalence(x)
    cov = np.asarray((x.T @ x).todense()) / n - np.outer(mean, mean)
    std = np.sqrt(np.clip(np.diag(cov), 0, None))
    ok = std > 0
    corr = np.zeros_like(cov)
    corr[np.ix_(ok, ok)] = cov[np.ix_(ok, ok)] / np.outer(std[ok], std[ok])
    return corr


PCD_MAX_FEATURES = 1024  # wider spaces (condition x age: 14,520) use their top-K real codes


def pcd(real: sp.csr_matrix, syn: sp.csr_matrix, max_features: int = PCD_MAX_FEATURES) -> float:
    """Frobenius norm of the difference of the two correlation matrices, over every feature,
    or over the ``max_features`` most prevalent real ones when there are more (metrics.md
    §2.3: K x K dense memory)."""
    _check(real, syn, "fidelity/code_vector/pcd")
    if real.shape[1] > max_features:
        top = np.sort(np.argsort(-_dense_prevalence(real), kind="stable")[:max_features])
        real, syn = real[:, top], syn[:, top]
    return float(np.linalg.norm(correlation(real) - correlation(syn)))


def log_cluster(
    real: sp.csr_matrix, syn: sp.csr_matrix, n_clusters: int = 20, seed: int = 0, seeds: int = 1
) -> tuple[float, bool]:
    """(U, at_limit): U of equal-size samples, the mean over k-means seeds ``seed`` ...
    ``seed + seeds - 1``; ``LOG_CLUSTER_LIMIT`` and True when every seed's clusters hold real
    shares all equal to c (identical sets). ``log_cluster_runs`` gives each seed's U."""
    return mean_of_runs(log_cluster_runs(real, syn, n_clusters, seed, seeds))


def mean_of_runs(values: list[float]) -> tuple[float, bool]:
    """(mean U, at_limit) of per-seed U values: at the limit only when every seed is."""
    at_limit = all(v == LOG_CLUSTER_LIMIT for v in values)
    return (LOG_CLUSTER_LIMIT if at_limit else float(np.mean(values))), at_limit


def log_cluster_runs(
    real: sp.csr_matrix, syn: sp.csr_matrix, n_clusters: int = 20, seed: int = 0, seeds: int = 1
) -> list[float]:
    """U under each of ``seeds`` k-means seeds (each k-means keeps its best of 3 inits)."""
    name = "fidelity/code_vector/log_cluster"
    _check(real, syn, name)
    if real.shape[0] != syn.shape[0]:
        raise MetricError(name, f"needs equal sample sizes, got {real.shape[0]} real and {syn.shape[0]} synthetic")
    if seeds < 1:
        raise MetricError(name, f"needs seeds >= 1, got {seeds}")
    x = sp.vstack([real, syn], format="csr").astype(np.float64)
    is_real = np.r_[np.ones(real.shape[0]), np.zeros(syn.shape[0])]
    k = min(n_clusters, x.shape[0])
    return [
        log_of_share_deviation(KMeans(n_clusters=k, n_init=3, random_state=s).fit_predict(x), is_real, k)[0]
        for s in range(seed, seed + seeds)
    ]


def log_of_share_deviation(labels: np.ndarray, is_real: np.ndarray, n_clusters: int) -> tuple[float, bool]:
    """log of the mean over non-empty clusters of (real share - overall real share)², at its
    limit (``LOG_CLUSTER_LIMIT``, True) when that mean is 0."""
    sizes = np.bincount(labels, minlength=n_clusters)
    real_in = np.bincount(labels, weights=is_real, minlength=n_clusters)
    used = sizes > 0
    value = float(np.mean((real_in[used] / sizes[used] - is_real.mean()) ** 2))
    if value <= 1e-12:
        return LOG_CLUSTER_LIMIT, True
    return math.log(value), False


CLASSIFIERS: dict[str, Callable[[int], object]] = {
    "logistic": lambda seed: LogisticRegression(C=1.0, solver="liblinear", max_iter=1000),
    "bernoulli_nb": lambda seed: BernoulliNB(),
    "tree": lambda seed: DecisionTreeClassifier(max_depth=8, random_state=seed),
    "forest": lambda seed: RandomForestClassifier(n_estimators=30, max_depth=8, random_state=seed, n_jobs=1),
}


def _aurocs(x_train: sp.csr_matrix, y_train: np.ndarray, x_test: sp.csr_matrix, y_test: np.ndarray, seed: int) -> np.ndarray | None:
    """Held-out AUROC of each classifier, or None when the training labels are one class."""
    if y_train.min() == y_train.max():
        return None
    out = []
    for make in CLASSIFIERS.values():
        model = make(seed)
        model.fit(x_train, y_train)
        out.append(roc_auc_score(y_test, model.predict_proba(x_test)[:, 1]))
    return np.array(out)


def ranking_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of ordered pairs j != k whose AUROC order agrees: (A_j - A_k)(B_j - B_k) > 0."""
    da, db = a[:, None] - a[None, :], b[:, None] - b[None, :]
    off = ~np.eye(len(a), dtype=bool)
    return float(((da * db) > 0)[off].mean())


def sra(
    real_train: sp.csr_matrix, syn: sp.csr_matrix, real_test: sp.csr_matrix, *,
    n_targets: int = 5, min_positives: int = 20, seed: int = 0,
) -> dict[str, float]:
    """SRA over the target panel (module docstring), with the panel's size and the mean
    AUROCs of the two arms (TRTR, TSTR)."""
    name = "utility/code_vector/sra"
    _check(real_train, syn, name)
    pos_train = np.asarray(real_train.sum(axis=0)).ravel()
    pos_test = np.asarray(real_test.sum(axis=0)).ravel()
    eligible = np.flatnonzero(
        (pos_train >= min_positives) & (pos_test >= min_positives)
        & (real_train.shape[0] - pos_train >= min_positives) & (real_test.shape[0] - pos_test >= min_positives)
    )
    if len(eligible) == 0:
        raise MetricError(name, f"no condition has >= {min_positives} real positives and negatives in train and held-out")
    targets = eligible[np.argsort(-pos_train[eligible], kind="stable")][:n_targets]
    n = min(real_train.shape[0], syn.shape[0])
    real_train, syn = real_train[:n], syn[:n]  # equal training sizes for the two arms
    agreements, trtr, tstr, unlearnable = [], [], [], 0
    for target in targets:
        keep = np.setdiff1d(np.arange(real_train.shape[1]), [target])
        y_test = real_test[:, target].toarray().ravel() > 0
        a = _aurocs(real_train[:, keep], real_train[:, target].toarray().ravel() > 0, real_test[:, keep], y_test, seed)
        b = _aurocs(syn[:, keep], syn[:, target].toarray().ravel() > 0, real_test[:, keep], y_test, seed)
        if b is None:
            unlearnable += 1
            b = np.full(len(CLASSIFIERS), 0.5)
        agreements.append(ranking_agreement(a, b))
        trtr.append(a.mean())
        tstr.append(b.mean())
    return {
        "sra": float(np.mean(agreements)),
        "sra/n_targets": float(len(targets)),
        "sra/targets_unlearnable": float(unlearnable),
        "sra/n_classifiers": float(len(CLASSIFIERS)),
        "sra/trtr_auroc": float(np.mean(trtr)),
        "sra/tstr_auroc": float(np.mean(tstr)),
    }


def _check(real: sp.csr_matrix, syn: sp.csr_matrix, name: str) -> None:
    if real.shape[1] != syn.shape[1]:
        raise MetricError(name, f"feature widths differ: {real.shape[1]} real, {syn.shape[1]} synthetic")
    if min(real.shape[0], syn.shape[0]) < 2:
        raise MetricError(name, f"needs >= 2 records per side, got {real.shape[0]} real and {syn.shape[0]} synthetic")
