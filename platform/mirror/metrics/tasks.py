"""Metric math of the four evaluation tasks of seed 000 and of the latent-space probes.

Everything here is a pure function of tensors or arrays, or a small accumulator that keeps
per-batch *sums* (never per-patient rows), so the evaluation streams over any number of
held-out patients in bounded memory. ``mirror.metrics.evaluate`` wires these to a model.

Definitions (each metric's exact rule; "word" = one diagnosis-age token of a sentence):

* Teacher-forced accuracy: argmax of the decoder's logits equals the target, over word
  positions (the closing ``<EOS>`` is not counted), summed over all words.
* Greedy (free-running) accuracy: the greedy decode from z, compared position by position
  with the true sentence; correct words / true words. A decode that is shorter, longer or
  shifted by one word scores only where positions line up: this is deliberately strict.
* Jaccard: per patient, |A & B| / |A | B| of the *condition* sets (age group ignored) of the
  truth (A) and of the greedy decode's first n + 1 words (B; n = true length, so a decode
  that runs on is penalised for one extra word here and fully in the length accuracy, and
  the value does not depend on how far past the truth the decoder was allowed to run);
  mean over patients.
* Week MAE: mean |decoded week - true week|, in weeks, over the positions where the greedy
  decode got the diagnosis-age token right (so the two weeks describe the same event) and
  the decoded week is a real week token.
* Top-k at masked positions: the true word is among the k largest teacher-forced logits.
* Generation validity: every rule of :func:`generation_rule_failures` holds.
* Prevalence: the fraction of patients with a condition at least once (per condition).
* Length distances: Wasserstein-1 and Kolmogorov-Smirnov between the distributions of
  words per sentence, computed exactly from integer histograms.
* Latent MMD: unbiased MMD^2 between z and N(0, I) samples with the sum of IMQ kernels of
  ``tolstikhin/wae`` (``C = 2 * d_z * s`` for each scale s), see :func:`imq_mmd2_unbiased`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from mirror.data.batch import SequenceBatch
from mirror.data.vocab import (
    AGE_GROUP_YEARS,
    DIAG_AGE_VOCAB_SIZE,
    EOS,
    N_AGE_GROUPS,
    N_CONDITIONS,
    N_SPECIAL,
    PAD,
    WEEKS_PER_YEAR,
)

# Scales of the IMQ kernel sum, as in tolstikhin/wae (wae.py, mmd_penalty).
IMQ_SCALES: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
# Weeks spanned by one five-year age group.
AGE_GROUP_WEEKS = AGE_GROUP_YEARS * WEEKS_PER_YEAR

# Names of the generation rules, in the order reported.
GENERATION_RULES: tuple[str, ...] = (
    "no_eos",  # no <EOS> within max_words words
    "empty",  # <EOS> first: a sentence without words
    "token",  # a special or out-of-vocabulary id among the words (diagnosis-age or week)
    "age_order",  # age group decreases along the sentence
    "week_order",  # week decreases along the sentence
    "age_time",  # no birth week is consistent with every (age group, week) pair
)


# --------------------------------------------------------------------------------------------
# Batch helpers


def word_positions(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) bool: True at the first ``lengths[b]`` positions (the words)."""
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


def mask_encoder_input(batch: SequenceBatch, masked: torch.Tensor) -> SequenceBatch:
    """The batch with its encoder input rebuilt from the (never masked) targets and ``masked``
    words replaced by ``<PAD>``; every other tensor is shared, not copied.

    Rebuilding from ``tgt_dx`` makes the result independent of whatever mask the batch came
    with, so one clean batch serves reconstruction, interpolation and extrapolation.
    ``masked`` is (B, L) bool in forward word order (``batch.py``): word i of a sentence of n
    words sits at encoder column n - i.
    """
    b, t = batch.enc_dx.shape
    width = t - 1
    masked = masked.to(device=batch.enc_dx.device, dtype=torch.bool)
    if tuple(masked.shape) != (b, width):
        raise ValueError(
            f"mask_encoder_input: mask shape {tuple(masked.shape)}, expected ({b}, {width})"
        )
    n = batch.lengths[:, None]
    col = torch.arange(t, device=n.device)[None, :]
    word = n - col  # forward index of the word at encoder column col (valid for 1 <= col <= n)
    is_word = (col >= 1) & (col <= n)
    idx = word.clamp(0, max(width - 1, 0))
    enc_dx = torch.gather(batch.tgt_dx, 1, idx)
    hidden = torch.gather(masked, 1, idx)
    enc_dx = torch.where(is_word & ~hidden, enc_dx, torch.full_like(enc_dx, PAD))
    enc_dx[:, 0] = EOS
    fields = batch.as_dict()
    fields.update(enc_dx=enc_dx, masked=masked & word_positions(batch.lengths, width))
    return SequenceBatch.from_dict(fields)


def condition_ids(dx: torch.Tensor, fill: int) -> torch.Tensor:
    """The condition of each diagnosis-age token id; ``fill`` for special and out-of-range ids."""
    real = (dx >= N_SPECIAL) & (dx < DIAG_AGE_VOCAB_SIZE)
    return torch.where(real, (dx - N_SPECIAL) // N_AGE_GROUPS, torch.full_like(dx, fill))


def condition_sets(dx: torch.Tensor, n_words: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N_CONDITIONS) bool: conditions among the first ``n_words`` diagnosis-age ids of
    each row (among all of them when None); special and out-of-range ids are ignored."""
    b, width = dx.shape
    cond = condition_ids(dx, N_CONDITIONS)
    if n_words is not None:
        cond = cond.masked_fill(~word_positions(n_words, width), N_CONDITIONS)
    out = torch.zeros(b, N_CONDITIONS + 1, dtype=torch.bool, device=dx.device)
    out.scatter_(1, cond, True)
    return out[:, :N_CONDITIONS]


# --------------------------------------------------------------------------------------------
# Per-batch sums


def topk_hits(
    topk_ids: torch.Tensor, targets: torch.Tensor, select: torch.Tensor, ks: Sequence[int]
) -> dict[int, int]:
    """Selected positions whose target is among the first k ids of ``topk_ids`` (B, T, K),
    for each k in ``ks``; ``targets`` and ``select`` are (B, T)."""
    match = topk_ids == targets[..., None]
    found = match.cumsum(-1) > 0  # found[..., j]: target within the first j + 1 ids
    return {k: int((found[..., k - 1] & select).sum()) for k in ks}


def teacher_forced_sums(
    top1_dx: torch.Tensor, top1_wk: torch.Tensor, batch: SequenceBatch
) -> dict[str, float]:
    """Correct diagnosis-age and week predictions at word positions, and the word count."""
    words = word_positions(batch.lengths, batch.tgt_dx.shape[1])
    return {
        "tf_correct": float(((top1_dx == batch.tgt_dx) & words).sum()),
        "tf_week_correct": float(((top1_wk == batch.tgt_wk) & words).sum()),
        "words": float(words.sum()),
    }


def greedy_sums(
    gen_dx: torch.Tensor,
    gen_wk: torch.Tensor,
    gen_len: torch.Tensor,
    batch: SequenceBatch,
) -> dict[str, float]:
    """Sums for greedy reconstruction: position-aligned correct words, Jaccard of condition
    sets, week errors on correctly decoded positions, length and exact-sentence matches."""
    tgt_dx, tgt_wk, n = batch.tgt_dx, batch.tgt_wk, batch.lengths
    gen_len = gen_len.to(n.device).clamp(0, gen_dx.shape[1])
    width = min(gen_dx.shape[1], tgt_dx.shape[1])
    both = word_positions(n, width) & word_positions(gen_len, width)
    correct = both & (gen_dx[:, :width] == tgt_dx[:, :width])
    week_ok = correct & (gen_wk[:, :width] >= N_SPECIAL)
    week_err = (gen_wk[:, :width] - tgt_wk[:, :width]).abs()
    truth_sets = condition_sets(tgt_dx, n)
    gen_sets = condition_sets(gen_dx, torch.minimum(gen_len, n + 1))
    inter = (truth_sets & gen_sets).sum(1).double()
    union = (truth_sets | gen_sets).sum(1).double()
    jaccard = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    n_correct = correct.sum(1)
    return {
        "greedy_correct": float(n_correct.sum()),
        "words": float(n.sum()),
        "jaccard": float(jaccard.sum()),
        "week_abs_err": float(week_err[week_ok].sum()),
        "week_pairs": float(week_ok.sum()),
        "length_match": float((gen_len == n).sum()),
        "exact": float(((gen_len == n) & (n_correct == n)).sum()),
        "patients": float(n.shape[0]),
    }


def generation_rule_failures(
    dx: torch.Tensor,
    wk: torch.Tensor,
    n_words: torch.Tensor,
    *,
    max_words: int,
    week_vocab_size: int,
) -> dict[str, torch.Tensor]:
    """Per generated sentence (B,) bool, True where the rule of ``GENERATION_RULES`` fails.

    ``n_words`` counts words before ``<EOS>``; a decoder run for ``max_words + 1`` steps
    reports ``n_words > max_words`` when it never emitted ``<EOS>`` in time. The ordering and
    age/time rules are checked on the real tokens only, so one bad token fails one rule.
    ``age_time``: an integer birth week b must satisfy ``age_group_at(w, b) == g`` (the data
    contract's rule, ``vocab.age_group_at``) for every word (g, w), i.e.
    ``w - (g + 1) * P < b <= w - g * P`` with P the weeks of a five-year group.
    """
    width = dx.shape[1]
    n_words = n_words.to(dx.device)
    words = word_positions(n_words.clamp(0, width), width)
    real_dx = (dx >= N_SPECIAL) & (dx < DIAG_AGE_VOCAB_SIZE)
    real_wk = (wk >= N_SPECIAL) & (wk < week_vocab_size)
    real = words & real_dx & real_wk
    age = (dx - N_SPECIAL).clamp(min=0) % N_AGE_GROUPS
    week = wk - N_SPECIAL
    pairs = real[:, 1:] & real[:, :-1]
    lo, hi = birth_week_bounds(age, week, real)
    return {
        "no_eos": n_words > max_words,
        "empty": n_words < 1,
        "token": (words & ~(real_dx & real_wk)).any(1),
        "age_order": (pairs & (age[:, 1:] < age[:, :-1])).any(1),
        "week_order": (pairs & (week[:, 1:] < week[:, :-1])).any(1),
        "age_time": real.any(1) & (lo > hi),
    }


def birth_week_bounds(
    age_group: torch.Tensor, week: torch.Tensor, select: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive integer range [lo, hi] of birth weeks consistent with every selected
    (age group, week) pair of each row; empty where lo > hi. Rows without a selected pair get
    (-2^62, 2^62)."""
    g = age_group.double()
    w = week.double()
    lo = torch.floor(w - (g + 1) * AGE_GROUP_WEEKS).long() + 1
    hi = torch.floor(w - g * AGE_GROUP_WEEKS).long()
    big = 2**62
    lo = torch.where(select, lo, torch.full_like(lo, -big)).amax(1)
    hi = torch.where(select, hi, torch.full_like(hi, big)).amin(1)
    return lo, hi


# --------------------------------------------------------------------------------------------
# Accumulators


class Sums:
    """Named running sums (numerators and denominators) over batches."""

    def __init__(self) -> None:
        self._values: defaultdict[str, float] = defaultdict(float)

    def add(self, values: dict[str, float], prefix: str = "") -> None:
        for key, value in values.items():
            self._values[prefix + key] += float(value)

    def __getitem__(self, key: str) -> float:
        return self._values.get(key, 0.0)

    def ratio(self, num: str, den: str) -> float:
        """num / den, NaN when nothing was counted (never a misleading 0)."""
        d = self[den]
        return self[num] / d if d > 0 else math.nan


class LengthHistogram:
    """Counts of sentence lengths 0 .. max_len; longer lengths land in the last bin."""

    def __init__(self, max_len: int) -> None:
        self.counts = np.zeros(max_len + 1, dtype=np.int64)

    def add(self, lengths: torch.Tensor | np.ndarray) -> None:
        values = np.asarray(torch.as_tensor(lengths).cpu(), dtype=np.int64)
        values = np.clip(values, 0, self.counts.size - 1)
        self.counts += np.bincount(values, minlength=self.counts.size)

    @property
    def total(self) -> int:
        return int(self.counts.sum())


class ConditionPrevalence:
    """Patients having each condition at least once, and the number of patients."""

    def __init__(self) -> None:
        self.counts = np.zeros(N_CONDITIONS, dtype=np.int64)
        self.patients = 0

    def add(self, sets: torch.Tensor) -> None:
        """``sets``: (B, N_CONDITIONS) bool from :func:`condition_sets`."""
        self.counts += sets.sum(0).cpu().numpy().astype(np.int64)
        self.patients += int(sets.shape[0])

    def prevalence(self) -> np.ndarray:
        if self.patients == 0:
            return np.full(N_CONDITIONS, np.nan)
        return self.counts / self.patients


class LatentReservoir:
    """A uniform sample without replacement of at most ``capacity`` patients' (z, sex, id).

    Bottom-k sampling: every patient draws a uniform key and the ``capacity`` smallest keys
    are kept, so the sample is uniform over everything seen and memory is O(capacity).
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"LatentReservoir.capacity: expected >= 1, got {capacity}")
        self.capacity = capacity
        self.seen = 0
        self._rng = np.random.default_rng(seed)
        self._keys = np.empty(0)
        self.z = np.empty((0, 0), dtype=np.float32)
        self.sex = np.empty(0, dtype=np.float32)
        self.subject_id = np.empty(0, dtype=np.int64)
        self.features = np.empty((0, 0), dtype=np.float32)  # optional per-patient rows

    def add(
        self, z: torch.Tensor, sex: torch.Tensor, subject_id: torch.Tensor,
        features: torch.Tensor | None = None,
    ) -> None:
        """Offer a batch; ``features`` (B, F), if given, are kept beside z for the same
        patients (give them on every call or on none)."""
        z_np = z.detach().float().cpu().numpy()
        feats = (
            np.zeros((z_np.shape[0], 0), dtype=np.float32)
            if features is None
            else features.detach().float().cpu().numpy()
        )
        if self.z.shape[0] == 0:
            self.z = np.empty((0, z_np.shape[1]), dtype=np.float32)
            self.features = np.empty((0, feats.shape[1]), dtype=np.float32)
        keys = np.concatenate([self._keys, self._rng.random(z_np.shape[0])])
        feats_all = np.concatenate([self.features, feats])
        z_all = np.concatenate([self.z, z_np])
        sex_all = np.concatenate([self.sex, sex.detach().float().cpu().numpy()])
        ids_all = np.concatenate(
            [self.subject_id, subject_id.detach().cpu().numpy().astype(np.int64)]
        )
        self.seen += z_np.shape[0]
        if keys.size > self.capacity:
            keep = np.argpartition(keys, self.capacity - 1)[: self.capacity]
            keys, z_all, sex_all, ids_all = keys[keep], z_all[keep], sex_all[keep], ids_all[keep]
            feats_all = feats_all[keep]
        self._keys, self.z, self.sex, self.subject_id = keys, z_all, sex_all, ids_all
        self.features = feats_all

    def __len__(self) -> int:
        return int(self.z.shape[0])


# --------------------------------------------------------------------------------------------
# Distribution comparisons


def histogram_distances(counts_a: np.ndarray, counts_b: np.ndarray) -> tuple[float, float]:
    """(Wasserstein-1, Kolmogorov-Smirnov) between two distributions on 0, 1, 2, ... given
    as count histograms. Exact for integer data: W1 = sum_k |F_a(k) - F_b(k)| (unit bins),
    KS = max_k |F_a(k) - F_b(k)|; equal to ``scipy.stats.wasserstein_distance`` and the
    ``ks_2samp`` statistic on the expanded samples."""
    size = max(counts_a.size, counts_b.size)
    a = np.zeros(size)
    b = np.zeros(size)
    a[: counts_a.size] = counts_a
    b[: counts_b.size] = counts_b
    if a.sum() <= 0 or b.sum() <= 0:
        return math.nan, math.nan
    gap = np.abs(np.cumsum(a) / a.sum() - np.cumsum(b) / b.sum())
    return float(gap.sum()), float(gap.max())


def pearson_r(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant (r is undefined there)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    da, db = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((da * da).sum()) * float((db * db).sum()))
    return float((da * db).sum() / denom) if denom > 0 else math.nan


# --------------------------------------------------------------------------------------------
# Latent space


def imq_mmd2_unbiased(
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    scales: Sequence[float] = IMQ_SCALES,
    chunk: int = 1024,
) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, eq. 3) with k(a, b) = sum_s C_s / (C_s + |a-b|^2),
    C_s = 2 * d * s, the kernel of tolstikhin/wae. Diagonal terms are excluded, so the value
    is ~0 (and may be slightly negative) when x and y share a distribution. O(n^2 d) time,
    O(chunk * n) memory."""
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64, device=x.device)
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"imq_mmd2_unbiased: shapes {tuple(x.shape)} and {tuple(y.shape)}")
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    if n < 2 or m < 2:
        return math.nan
    cs = torch.tensor([2.0 * d * s for s in scales], dtype=torch.float64, device=x.device)

    def kernel_sum(a: torch.Tensor, b: torch.Tensor) -> float:
        total = 0.0
        b_sq = (b * b).sum(1)
        for start in range(0, a.shape[0], chunk):
            block = a[start : start + chunk]
            d2 = ((block * block).sum(1)[:, None] + b_sq[None, :] - 2.0 * block @ b.T).clamp(min=0)
            total += float((cs / (cs + d2[..., None])).sum())
        return total

    k_diag = float(cs.numel())  # k(a, a) = number of scales
    xx = (kernel_sum(x, x) - n * k_diag) / (n * (n - 1))
    yy = (kernel_sum(y, y) - m * k_diag) / (m * (m - 1))
    xy = kernel_sum(x, y) / (n * m)
    return xx + yy - 2.0 * xy


def sex_auroc_cv(z: np.ndarray, sex: np.ndarray, *, folds: int = 5, seed: int = 0) -> float:
    """Held-out AUROC of an L2 logistic regression predicting sex from standardised z, the
    mean over stratified folds (each fold's model scores only its own held-out patients).

    0.5 means z carries no linearly decodable sex information (what seed 000 asks for);
    1.0 means sex is fully recoverable. NaN if a class has fewer than ``folds`` patients.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = (np.asarray(sex) > 0).astype(np.int64)
    if min(labels.sum(), labels.size - labels.sum()) < folds:
        return math.nan
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(cross_val_score(probe, z, labels, cv=split, scoring="roc_auc").mean())


def ridge_r2_cv(
    z: np.ndarray, truth: np.ndarray, *, folds: int = 5, seed: int = 0, standardize: bool = True
) -> float:
    """Out-of-fold R^2 of a ridge probe z -> true latent state (simulated data): the variance
    weighted R^2 of :func:`ridge_r2_cv_by_dimension`."""
    return ridge_r2_cv_by_dimension(z, truth, folds=folds, seed=seed, standardize=standardize)[0]


def ridge_r2_cv_by_dimension(
    z: np.ndarray, truth: np.ndarray, *, folds: int = 5, seed: int = 0, standardize: bool = True
) -> tuple[float, np.ndarray]:
    """Out-of-fold R^2 of a ridge probe z -> true latent state (simulated data), over the whole
    vector and per dimension of the truth (which factors a representation recovers).

    The ridge penalty is chosen inside each training fold (``RidgeCV``, 1e-3 to 1e6).
    ``standardize`` scales each column on the training fold first: right for a dense z, wrong
    for sparse counts (the truth-recovery floor's ~600 condition counts), where a condition
    seen once in a training fold gets a tiny scale and a test patient holding it many times an
    enormous value: on 5,000 reference patients that probe's R^2 ranged from -0.37 to 0.06 by
    which patients were drawn, the unscaled one 0.089-0.092. The whole vector's R^2 is variance
    weighted over the truth's dimensions, i.e. 1 - SSE / SST; the per-dimension ones come from
    the same out-of-fold predictions (one penalty per fold for all dimensions).
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    truth = np.asarray(truth, dtype=np.float64)
    if truth.ndim == 1:
        truth = truth[:, None]
    if truth.shape[0] != z.shape[0]:
        raise ValueError(f"ridge_r2_cv: {z.shape[0]} latents but {truth.shape[0]} truth rows")
    if truth.shape[0] < 2 * folds:
        return math.nan, np.full(truth.shape[1], math.nan)
    ridge = RidgeCV(alphas=np.logspace(-3, 6, 19))
    probe = make_pipeline(StandardScaler(), ridge) if standardize else ridge
    split = KFold(n_splits=folds, shuffle=True, random_state=seed)
    predicted = cross_val_predict(probe, z, truth, cv=split)
    whole = float(r2_score(truth, predicted, multioutput="variance_weighted"))
    return whole, np.asarray(r2_score(truth, predicted, multioutput="raw_values"), dtype=np.float64)
