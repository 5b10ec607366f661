"""Trial digital-twin metrics (TWIN §4, issue 17), on ``TRIAL_SCHEMA`` tables.

* ``dp_r``: Pearson r between the dimension-wise probabilities (share of visits holding each
  medication / AE) of a real and a synthetic set; ``per_patient_dp_r``: the same per
  participant against its twin (row-aligned), averaged over participants where both vectors
  vary (the others are counted, not scored).
* ``ae_rate_error``: mean over participants of |AEs per visit (a) - AEs per visit (b)|.
* ``nnaa``: TWIN Eqs. 13-15 on visits (Hamming nearest neighbours, ``privacy``'s
  ``block_adversarial_accuracy``): AA(held-out, synthetic) - AA(train, synthetic).
* ``presence``: ``privacy.presence_metrics`` on visit and record (visit-set) hashes.
* ``severe_outcome_auroc``: the utility LSTM (severe outcome from the visit sequence) trained
  on one set (early-stopped on a validation part of that set), scored on real held-out
  participants (TSTR vs TRTR).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from mirror.data import schema
from mirror.data.views.visits import multi_hot
from mirror.metrics.errors import MetricError
from mirror.metrics.privacy import block_adversarial_accuracy, presence_metrics


def _visits(table: pa.Table, column: str, width: int) -> np.ndarray:
    return multi_hot(table.column(column).combine_chunks().flatten(), width)


def _n_visits(table: pa.Table) -> np.ndarray:
    return np.diff(table.column(schema.VISIT_DAYS).combine_chunks().offsets.to_numpy())


def dimension_probabilities(table: pa.Table, column: str, width: int) -> np.ndarray:
    return _visits(table, column, width).mean(0)


def dp_r(real: pa.Table, syn: pa.Table, column: str, width: int) -> float:
    a, b = dimension_probabilities(real, column, width), dimension_probabilities(syn, column, width)
    return float(np.corrcoef(a, b)[0, 1])


def per_patient_dp_r(real: pa.Table, syn: pa.Table, column: str, width: int) -> tuple[float, int]:
    """Mean per-participant r (row-aligned tables) and how many participants were unscored."""
    def per_patient(table: pa.Table) -> np.ndarray:
        hot, n = _visits(table, column, width), _n_visits(table)
        sums = np.zeros((table.num_rows, width))
        np.add.at(sums, np.repeat(np.arange(table.num_rows), n), hot)
        return sums / np.maximum(n, 1)[:, None]

    a, b = per_patient(real), per_patient(syn)
    a_c, b_c = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    denom = np.sqrt((a_c**2).sum(1) * (b_c**2).sum(1))
    ok = denom > 0
    if not ok.any():
        raise MetricError("trial/per_patient_dp_r", "no participant with varying probabilities on both sides")
    return float(((a_c * b_c).sum(1)[ok] / denom[ok]).mean()), int((~ok).sum())


def ae_rate_error(a: pa.Table, b: pa.Table, width: int) -> float:
    rate = [_visits(t, schema.VISIT_ADVERSE_EVENTS, width).sum(1) for t in (a, b)]
    per = [np.add.reduceat(r, np.concatenate([[0], np.cumsum(_n_visits(t))[:-1]])) / _n_visits(t) for r, t in zip(rate, (a, b), strict=True)]
    return float(np.abs(per[0] - per[1]).mean())


def _rows(table: pa.Table, widths: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Visits as (indptr, keys) of their medication and AE columns (Hamming on what is generated)."""
    l1, l2, l3 = widths
    hot = np.concatenate([_visits(table, schema.VISIT_MEDICATIONS, l2), _visits(table, schema.VISIT_ADVERSE_EVENTS, l3)], 1)
    rows, cols = np.nonzero(hot)
    return np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(hot)))]).astype(np.int64), cols.astype(np.int64)


def _take(rows: tuple[np.ndarray, np.ndarray], ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    indptr, keys = rows
    lengths = indptr[ids + 1] - indptr[ids]
    take = np.repeat(indptr[ids], lengths) + (np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths))
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), keys[take]


def nnaa(train: pa.Table, holdout: pa.Table, syn: pa.Table, widths: tuple[int, int, int], *, n: int = 750, seed: int = 0,
         paired: bool = False) -> dict[str, float]:
    """TWIN's NNAA (Eqs. 13-15, strict ``>``: ties count as not farther) on ``n`` visits per
    set (the paper: 751). ``paired``: the synthetic visits are the twins of the chosen training
    visits (the paper: "we then select corresponding visits from the synthetic dataset"; needs
    row-aligned twins), not an independent sample of the synthetic set."""
    sets = [_rows(t, widths) for t in (train, holdout, syn)]
    n = min(n, *(len(s[0]) - 1 for s in sets))
    if n < 2:
        raise MetricError("trial/nnaa", f"needs >= 2 visits per set, got {n}")
    if paired and len(sets[0][0]) != len(sets[2][0]):
        raise MetricError("trial/nnaa", "paired NNAA needs the synthetic set row-aligned with the training set (its twins)")
    rng = np.random.default_rng(seed)
    pick = [rng.permutation(len(rows[0]) - 1)[:n] for rows in sets]
    if paired:
        pick[2] = pick[0]
    t, e, s = (_take(rows, p) for rows, p in zip(sets, pick, strict=True))
    aa_t, _, _ = block_adversarial_accuracy(t, s)
    aa_e, _, _ = block_adversarial_accuracy(e, s)
    return {"nnaa/aa_train": aa_t, "nnaa/aa_holdout": aa_e, "nnaa/privacy_loss": aa_e - aa_t, "nnaa/visits": float(n)}


def _hashes(table: pa.Table, widths: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Visit hashes (treatment + medication + AE), each visit's participant row, and record
    hashes (the set of a participant's visits: a sum of visit hashes, order-free)."""
    cols = (schema.VISIT_TREATMENTS, schema.VISIT_MEDICATIONS, schema.VISIT_ADVERSE_EVENTS)
    hot = np.concatenate([_visits(table, c, w) for c, w in zip(cols, widths, strict=True)], 1).astype(bool)
    weights = np.random.default_rng(12345).integers(1, 2**62, size=hot.shape[1], dtype=np.uint64)
    visit = (hot.astype(np.uint64) * weights).sum(1, dtype=np.uint64)
    owner = np.repeat(np.arange(table.num_rows), _n_visits(table))
    record = np.zeros(table.num_rows, np.uint64)
    np.add.at(record, owner, visit * np.uint64(0x9E3779B97F4A7C15))
    return visit.view(np.int64), owner, record.view(np.int64)


def presence(train: pa.Table, holdout: pa.Table, syn: pa.Table, widths: tuple[int, int, int], *, known_share: float = 0.2, seed: int = 0) -> dict[str, float]:
    """Presence disclosure with the attacker knowing ``known_share`` of the training records
    (the paper's largest m), with an equal-size held-out control."""
    rng = np.random.default_rng(seed)
    n = max(1, min(round(known_share * train.num_rows), holdout.num_rows))
    known_t = train.take(pa.array(rng.permutation(train.num_rows)[:n]))
    known_h = holdout.take(pa.array(rng.permutation(holdout.num_rows)[:n]))
    vt, ot, rt = _hashes(known_t, widths)
    vh, oh, rh = _hashes(known_h, widths)
    vs, _, rs = _hashes(syn, widths)
    return presence_metrics((vt, ot), rt, (vh, oh), rh, vs, rs)


class _SevereLSTM(nn.Module):
    def __init__(self, width: int, hidden: int = 32) -> None:
        super().__init__()
        self.lstm = nn.LSTM(width, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)
        return self.head(h[-1]).squeeze(-1)


def _sequences(table: pa.Table, widths: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cols = (schema.VISIT_TREATMENTS, schema.VISIT_MEDICATIONS, schema.VISIT_ADVERSE_EVENTS)
    hot = np.concatenate([_visits(table, c, w) for c, w in zip(cols, widths, strict=True)], 1)
    n = _n_visits(table)
    x = np.zeros((table.num_rows, int(n.max()), hot.shape[1]), np.float32)
    owner = np.repeat(np.arange(table.num_rows), n)
    x[owner, np.arange(len(owner)) - np.concatenate([[0], np.cumsum(n)[:-1]])[owner]] = hot
    y = table.column(schema.SEVERE_OUTCOME).to_numpy(zero_copy_only=False).astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(n.astype(np.int64)), torch.from_numpy(y)


def severe_outcome_auroc(train: pa.Table, test: pa.Table, widths: tuple[int, int, int], *, epochs: int = 30, seed: int = 0) -> float:
    """The utility LSTM trained on ``train`` (real or synthetic), AUROC on real ``test``."""
    scores, y = severe_outcome_scores(train, test, widths, epochs=epochs, seeds=(seed,))
    return float(roc_auc_score(y, scores[0]))


def severe_outcome_scores(train: pa.Table, test: pa.Table, widths: tuple[int, int, int], *, epochs: int = 30,
                          seeds: tuple[int, ...] = (0,)) -> tuple[np.ndarray, np.ndarray]:
    """The utility LSTM trained on ``train`` once per seed; its scores of the real ``test``
    participants, (seeds, participants), and their outcomes. One intra-op thread: the model is
    tiny, and more threads only contend (4x slower on 2 cores)."""
    with _one_thread():
        x, n, y = _sequences(train, widths)
        xt, nt, yt = _sequences(test, widths)
        if yt.min() == yt.max():
            raise MetricError("trial/utility", "the test set has a single outcome class")
        if y.min() == y.max():
            raise MetricError("trial/utility", "the training set has a single outcome class")
        scores = np.stack([_severe_outcome_fit(x, n, y, epochs=epochs, seed=s)[0](xt, nt) for s in seeds])
        return scores, yt.numpy()


@contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op torch thread for the utility LSTM's fits, restoring the caller's count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


VALIDATION_SHARE, PATIENCE = 0.2, 5  # the utility LSTM's early stopping


def _severe_outcome_fit(x: torch.Tensor, n: torch.Tensor, y: torch.Tensor, *, epochs: int, seed: int):
    """The utility LSTM fitted on (x, n, y), at most ``epochs`` epochs, early-stopped on the
    weighted BCE of a seeded ``VALIDATION_SHARE`` of the training records (kept out of the
    fit; stratified, so both classes are in each part), its best epoch's weights kept. A fixed
    epoch count over-fits large training sets (5-fold AUROC 0.71 at 10 epochs, 0.66 at 30 on a
    5,000-participant simulated trial) and under-fits small ones; the same rule serves the
    real (TRTR) and the synthetic (TSTR) side. Returns the scorer and the epochs run."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    fit_rows, val_rows = _stratified_split(y, VALIDATION_SHARE, g)
    model = _SevereLSTM(x.shape[2])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    yf = y[fit_rows]
    pos_weight = torch.tensor(float((1 - yf).sum() / yf.sum().clamp(min=1)))

    def val_loss() -> float:
        with torch.no_grad():
            return float(nn.functional.binary_cross_entropy_with_logits(
                model(x[val_rows], n[val_rows]), y[val_rows], pos_weight=pos_weight))

    best, best_state, since, epochs_run = math.inf, None, 0, 0
    while epochs_run < epochs:
        epochs_run += 1
        model.train()
        for idx in fit_rows[torch.randperm(len(fit_rows), generator=g)].split(64):
            loss = nn.functional.binary_cross_entropy_with_logits(model(x[idx], n[idx]), y[idx], pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if val_rows.numel() == 0:
            continue
        model.eval()
        if (current := val_loss()) < best:
            best, best_state, since = current, {k: v.clone() for k, v in model.state_dict().items()}, 0
        elif (since := since + 1) >= PATIENCE:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()

    def score(xt: torch.Tensor, nt: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return model(xt, nt).numpy()

    return score, epochs_run


def _stratified_split(y: torch.Tensor, share: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (fit, validation): ``share`` of each class to validation, at least one of
    each when the class has two or more rows (no validation part otherwise)."""
    fit, val = [], []
    for cls in (0.0, 1.0):
        rows = torch.nonzero(y == cls).flatten()
        rows = rows[torch.randperm(len(rows), generator=g)]
        k = max(1, round(share * len(rows))) if len(rows) >= 2 else 0
        val.append(rows[:k])
        fit.append(rows[k:])
    if min(len(v) for v in val) == 0:  # a class too small to split: fit on everything
        return torch.arange(len(y)), torch.zeros(0, dtype=torch.long)
    return torch.cat(fit), torch.cat(val)


def counterfactual_auroc(real: pa.Table, candidates: dict[str, pa.Table], truth: pa.Table, widths: tuple[int, int, int], *,
                         epochs: int = 30, seeds: tuple[int, ...] = (0,)) -> dict[str, float]:
    """TWIN's counterfactual AUROC, scored against the truth a simulator knows: the utility
    LSTM trained on the real (factual) participants scores each candidate counterfactual
    record (row-aligned with ``truth``: the counterfactual twins, the paper's surrogate, the
    true counterfactual visits themselves as the ceiling); AUROC against the *true*
    counterfactual severe outcome, averaged over ``seeds``."""
    with _one_thread():
        x, n, y = _sequences(real, widths)
        y_true = truth.column(schema.SEVERE_OUTCOME).to_numpy(zero_copy_only=False).astype(np.float32)
        if y_true.min() == y_true.max():
            raise MetricError("trial/counterfactual_auroc", "the true counterfactual outcomes have a single class")
        inputs = {}
        for name, table in candidates.items():
            if table.num_rows != truth.num_rows:
                raise MetricError("trial/counterfactual_auroc", f"{name}: {table.num_rows} rows, truth has {truth.num_rows}")
            inputs[name] = _sequences(table, widths)[:2]
        out = {name: 0.0 for name in candidates}
        for s in seeds:
            score, _ = _severe_outcome_fit(x, n, y, epochs=epochs, seed=s)
            for name, (xt, nt) in inputs.items():
                out[name] += float(roc_auc_score(y_true, score(xt, nt))) / len(seeds)
        return out


def _weighted_aurocs(scores: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of each seed's ``scores`` (seeds, n) under each row of participant ``weights``
    (draws, n; bootstrap counts): Mann-Whitney with ties as 1/2, as (draws, seeds)."""
    pos, neg = y > 0.5, y <= 0.5
    wins = (scores[:, pos, None] > scores[:, None, neg]) + 0.5 * (scores[:, pos, None] == scores[:, None, neg])
    wp, wn = weights[:, pos], weights[:, neg]
    num = np.einsum("bi,sij,bj->bs", wp, wins, wn)
    return num / np.maximum(wp.sum(1) * wn.sum(1), 1e-12)[:, None]


def utility_ratio(real_scores: np.ndarray, syn_scores: np.ndarray, y: np.ndarray, *, draws: int = 2000,
                  seed: int = 0) -> dict[str, float]:
    """TSTR / TRTR from the seed-averaged AUROCs, with a 95 % paired bootstrap interval over
    the test participants (both models score the same resampled set, so the shared test-set
    noise partly cancels; the interval says how much is left). Draws without both classes are
    redrawn by skipping them (counted out of the interval)."""
    ones = np.ones((1, len(y)))
    trtr = float(_weighted_aurocs(real_scores, y, ones).mean())
    tstr = float(_weighted_aurocs(syn_scores, y, ones).mean())
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(y), np.full(len(y), 1 / len(y)), size=draws).astype(np.float64)
    ok = (counts[:, y > 0.5].sum(1) > 0) & (counts[:, y <= 0.5].sum(1) > 0)
    ratio = _weighted_aurocs(syn_scores, y, counts[ok]).mean(1) / _weighted_aurocs(real_scores, y, counts[ok]).mean(1)
    lo, hi = np.percentile(ratio, [2.5, 97.5])
    return {"utility/trial/severe_auroc_trtr": trtr, "utility/trial/severe_auroc_tstr": tstr,
            "utility/trial/severe_auroc_ratio": tstr / trtr,
            "utility/trial/severe_auroc_ratio_ci_low": float(lo), "utility/trial/severe_auroc_ratio_ci_high": float(hi),
            "utility/trial/n_test": float(len(y)), "utility/trial/n_test_positive": float((y > 0.5).sum()),
            "utility/trial/lstm_seeds": float(real_scores.shape[0])}


# ---------------------------------------------------------------------------------------------
# The scorecard's trial section: a sample of twins (``jobs/sample.py`` on a trial generator)
# against the real trial it twins.


def read_trial(root: str | Path, split: str, limit: int, seed: int) -> pa.Table:
    """Up to ``limit`` participants of one trial split, a seeded random subset when there are
    more (the scorecard's sets are capped, like its query sets). The rows are chosen from the
    shards' footers and read one shard at a time, so a trial of any size costs one shard plus
    the chosen rows."""
    files = schema.trial_split_files(root, split)
    if not files:
        return schema.TRIAL_SCHEMA.empty_table()
    counts = np.array([pq.ParquetFile(f).metadata.num_rows for f in files], np.int64)
    total = int(counts.sum())
    chosen = np.arange(total) if total <= limit else np.sort(np.random.default_rng(seed).choice(total, limit, replace=False))
    starts = np.concatenate([[0], np.cumsum(counts)])
    parts = []
    for f, lo, hi in zip(files, starts[:-1], starts[1:], strict=True):
        local = chosen[np.searchsorted(chosen, lo):np.searchsorted(chosen, hi)] - lo
        if local.size:
            shard = pq.read_table(f)
            parts.append(shard if local.size == shard.num_rows else shard.take(pa.array(local)))
    return pa.concat_tables(parts).combine_chunks()


def record_rows(table: pa.Table, widths: tuple[int, int, int], max_visits: int) -> tuple[np.ndarray, np.ndarray]:
    """Each participant's record as (indptr, keys): key = visit index x width + column of the
    whole visit multi-hot, so two records are close when they hold the same events at the same
    visits (Hamming distance, the platform's nearest-neighbour search)."""
    cols = (schema.VISIT_TREATMENTS, schema.VISIT_MEDICATIONS, schema.VISIT_ADVERSE_EVENTS)
    hot = np.concatenate([_visits(table, c, w) for c, w in zip(cols, widths, strict=True)], 1)
    n = _n_visits(table)
    visit_index = np.arange(len(hot)) - np.repeat(np.concatenate([[0], np.cumsum(n)[:-1]]), n)
    rows, col = np.nonzero(hot)
    keys = np.minimum(visit_index[rows], max_visits - 1) * hot.shape[1] + col
    owner = np.repeat(np.arange(table.num_rows), n)[rows]
    return np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=table.num_rows))]).astype(np.int64), keys.astype(np.int64)


def marginal_twins(real: pa.Table, train: pa.Table, widths: tuple[int, int, int], seed: int) -> pa.Table:
    """The floor: ``real``'s schedules with every medication and AE drawn independently from
    the training visits' marginal rates (no participant, no visit-to-visit structure)."""
    from mirror.models.twin import _lists  # the twins' own list writer

    rng = np.random.default_rng(seed)
    n = _n_visits(real)
    offsets = np.concatenate([[0], np.cumsum(n)])
    columns = {name: real.column(name) for name in schema.TRIAL_SCHEMA.names}
    for column, width in ((schema.VISIT_MEDICATIONS, widths[1]), (schema.VISIT_ADVERSE_EVENTS, widths[2])):
        p = dimension_probabilities(train, column, width)
        columns[column] = _lists(rng.random((int(n.sum()), width)) < p, offsets)
    return pa.table(columns, schema=schema.TRIAL_SCHEMA)


def trial_row_metrics(train: pa.Table, holdout: pa.Table, syn: pa.Table, widths: tuple[int, int, int], *,
                      seed: int, utility_epochs: int = 30, utility_seeds: int = 1,
                      real_scores: np.ndarray | None = None) -> tuple[dict[str, float], dict[str, str]]:
    """Fidelity, utility and privacy of one synthetic trial set (``syn``) against real
    ``train`` (what was twinned) and ``holdout``; returns metrics and the reasons of those
    that could not be computed. The utility LSTM is trained ``utility_seeds`` times per side
    (its own training noise averaged out); ``real_scores``: the real-data LSTMs' held-out
    scores if already known for this pair."""
    import scipy.sparse as sp

    from mirror.metrics import privacy
    from mirror.metrics.neighbours import NeighbourSearch

    out: dict[str, float] = {}
    errors: dict[str, str] = {}

    def group(fn) -> None:
        try:
            out.update(fn())
        except MetricError as err:
            errors[err.name] = err.reason

    l1, l2, l3 = widths
    group(lambda: {"fidelity/trial/dp_r/medications": dp_r(train, syn, schema.VISIT_MEDICATIONS, l2),
                   "fidelity/trial/dp_r/adverse_events": dp_r(train, syn, schema.VISIT_ADVERSE_EVENTS, l3),
                   "fidelity/trial/ae_per_visit": float(_visits(syn, schema.VISIT_ADVERSE_EVENTS, l3).sum(1).mean()),
                   "fidelity/trial/real_ae_per_visit": float(_visits(train, schema.VISIT_ADVERSE_EVENTS, l3).sum(1).mean())})

    seeds = tuple(range(seed, seed + utility_seeds))

    def utility() -> dict[str, float]:
        synthetic, y = severe_outcome_scores(syn, holdout, widths, epochs=utility_epochs, seeds=seeds)
        real = real_scores if real_scores is not None else \
            severe_outcome_scores(train, holdout, widths, epochs=utility_epochs, seeds=seeds)[0]
        return utility_ratio(real, synthetic, y, seed=seed)

    group(utility)
    _, _, syn_records = _hashes(syn, widths)
    _, _, train_records = _hashes(train, widths)
    _, _, holdout_records = _hashes(holdout, widths)
    group(lambda: {f"privacy/{k}": v for k, v in privacy.exact_match_metrics(syn_records, train_records, holdout_records).items()})

    def mia() -> dict[str, float]:
        m = min(train.num_rows, holdout.num_rows)
        max_visits = int(max(_n_visits(t).max() for t in (train, holdout, syn)))
        rng = np.random.default_rng(seed)
        members = train.take(pa.array(rng.permutation(train.num_rows)[:m]))
        non_members = holdout.take(pa.array(rng.permutation(holdout.num_rows)[:m]))
        search = NeighbourSearch(*record_rows(syn, widths, max_visits), seed=seed)
        try:
            d_in, _ = search.nearest(*record_rows(members, widths, max_visits))
            d_out, _ = search.nearest(*record_rows(non_members, widths, max_visits))
        finally:
            search.close()
        auc, tpr = privacy.membership_auc(-d_in, -d_out, "privacy/mia/distance_auc")
        return {"privacy/mia/distance_auc": auc, "privacy/mia/distance_tpr_at_1pct_fpr": tpr, "privacy/mia/n_members": float(m)}

    group(mia)
    group(lambda: {f"privacy/{k}": v for k, v in presence(train, holdout, syn, widths, seed=seed).items()})
    group(lambda: {f"privacy/{k}": v for k, v in nnaa(train, holdout, syn, widths, seed=seed).items()})

    def attribute() -> dict[str, float]:
        def visits(t: pa.Table) -> sp.csr_matrix:
            hot = np.concatenate([_visits(t, schema.VISIT_MEDICATIONS, l2), _visits(t, schema.VISIT_ADVERSE_EVENTS, l3)], 1)
            return sp.csr_matrix(hot.astype(np.int8))

        known = visits(train)
        rng = np.random.default_rng(seed + 1)
        known = known[np.sort(rng.permutation(known.shape[0])[: max(1, known.shape[0] // 5)])]
        return {f"privacy/{k}": v for k, v in privacy.attribute_metrics(known, visits(syn), visits(holdout), seed, width=l2 + l3).items()}

    group(attribute)
    out.update({"meta/trial/n_train": float(train.num_rows), "meta/trial/n_holdout": float(holdout.num_rows),
                "meta/trial/n_synthetic": float(syn.num_rows)})
    return out, errors


def trial_scorecard(real_root: str | Path, synthetic_root: str | Path, *, max_queries: int, seed: int,
                    counterfactual_dir: str | None = None, utility_epochs: int = 30,
                    utility_seeds: int = 1) -> tuple[dict[str, float], dict[str, str]]:
    """The trial section: the twins' row, ``reference/ceiling/`` (half of the real held-out
    participants as the "twins", the other half as held-out), ``reference/floor/`` (the real
    schedules with independent marginal events: ``marginal_twins``), and, when the sample has
    counterfactual twins (``<synthetic_root>/<counterfactual_dir>``), their row under
    ``counterfactual/`` (gated like the twins)."""
    meta = schema.DatasetMetadata.read(real_root)
    v = meta.vocab
    widths = (v[schema.TRIAL_TREATMENT], v[schema.TRIAL_MEDICATION], v[schema.ADVERSE_EVENT])
    train = read_trial(real_root, schema.TRAIN, max_queries, seed)
    holdout = read_trial(real_root, schema.HELD_OUT, max_queries, seed + 1)
    if holdout.num_rows < 4:
        raise MetricError("trial", f"{real_root}: trial held_out split has {holdout.num_rows} participants; need >= 4")
    syn = read_trial(synthetic_root, schema.TRAIN, max_queries, seed + 2)
    if syn.num_rows == 0:
        raise MetricError("trial", f"{synthetic_root}: no twins under trial/train/")
    half = holdout.num_rows // 2
    perm = np.random.default_rng(seed + 3).permutation(holdout.num_rows)
    rows = [("", train, holdout, syn),
            ("reference/ceiling/", train, holdout.take(pa.array(perm[half:])), holdout.take(pa.array(perm[:half]))),
            ("reference/floor/", train, holdout, marginal_twins(syn, train, widths, seed + 4))]
    if counterfactual_dir is not None and (Path(synthetic_root) / counterfactual_dir).is_dir():
        rows.append((f"{counterfactual_dir}/", train, holdout, read_trial(Path(synthetic_root) / counterfactual_dir, schema.TRAIN, max_queries, seed + 2)))
    metrics: dict[str, float] = {}
    errors: dict[str, str] = {}
    # The real-data LSTMs are trained once (on ``train``) and score the whole held-out split;
    # the ceiling row's held-out half takes its columns of those scores.
    try:
        real_scores = severe_outcome_scores(train, holdout, widths, epochs=utility_epochs,
                                            seeds=tuple(range(seed, seed + utility_seeds)))[0]
    except MetricError:  # each row's own utility group records the reason
        real_scores = None
    real_for = {id(holdout): real_scores, id(rows[1][2]): None if real_scores is None else real_scores[:, perm[half:]]}
    for prefix, t, h, s in rows:
        m, e = trial_row_metrics(t, h, s, widths, seed=seed, utility_epochs=utility_epochs, utility_seeds=utility_seeds,
                                 real_scores=real_for[id(h)])
        metrics.update({prefix + k: val for k, val in m.items()})
        errors.update({prefix + k: val for k, val in e.items()})
    return metrics, errors
