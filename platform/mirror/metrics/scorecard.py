"""The synthetic-data scorecard: fidelity, utility and privacy, with reference rows.

``compute_scorecard(real_root, synthetic_root)`` reads the real ``train`` and ``held_out``
splits and every split of the synthetic dataset, and returns a flat ``{name: value}`` dict:

* ``fidelity/...``, ``utility/...``, ``privacy/...``: the synthetic set against real data;
* ``reference/ceiling/...``: the same metrics with a random half of the real held-out split
  as the "synthetic" set and the other half as held-out: the best attainable values given
  sampling noise, and what a non-memorising generator's privacy numbers look like;
* ``reference/floor/...``: the same metrics for ``n_synthetic`` patients of the
  independent-marginal sampler (``marginal_sampler``): no joint structure, perfectly private;
* ``meta/...`` (and per reference row): the sizes every number was computed at.

A sample of trial twins (``record_type`` ``trial``) is scored by the trial section instead
(``trial_twins.trial_scorecard``): DP r, TSTR/TRTR, exact match, MIA, presence, NNAA and
attribute disclosure on visit records, the same reference rows, and its counterfactual twins
under ``counterfactual/``.

Sampling: the reference side of every nearest-neighbour search is complete. Queries (DCR
queries, MIA members and non-members, known sets) are random subsets of at most
``max_queries``; record-based fidelity uses ``record_sample`` patients per side. All draws
derive from ``seed``, so two models scored against the same real dataset see the same real
samples and the same utility task panel.

A metric that cannot be computed raises :class:`MetricError` inside its group; the scorecard
still computes every other group. Then:

* an undefined metric (e.g. the rare-band prevalence r of a generator that
  never emits the rarest conditions) is *reported*, not fatal: its value is NaN (MLflow shows
  it; :func:`json_safe` writes it as JSON ``null``), ``<name>/undefined`` is 1, the count is
  ``meta/undefined_metrics`` and the reasons fill the caller's ``undefined`` dict;
* a metric the privacy gate reads (``GATE_METRICS``) that cannot be computed, or an empty
  synthetic set, is a real failure: :class:`ScorecardError` carries the partial results and
  every reason, since the gate must never pass on absent evidence. Other privacy metrics
  (e.g. DCR's median ratio, 0/0 on short code sets) are reported as undefined.

Nothing is dropped or replaced by a number that could be read as a result.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from mirror.data import schema as S
from mirror.metrics import code_vector as CV
from mirror.metrics import features as F
from mirror.metrics import fidelity, plots, privacy, utility
from mirror.metrics.errors import MetricError, attempt
from mirror.metrics.marginal_sampler import write_independent_marginal_sample
from mirror.metrics.neighbours import DEFAULT_CHUNK_PAIRS, NeighbourSearch
from mirror.metrics.records import PatientBlock, read_block
from mirror.metrics.views import DatasetView, reduce_to, scan_view, view_from_block
from mirror.progress import progress

logger = logging.getLogger(__name__)

CEILING, FLOOR = "reference/ceiling/", "reference/floor/"
COUNTERFACTUAL_PREFIX = S.COUNTERFACTUAL_SAMPLE_DIR + "/"  # a trial sample's counterfactual twins


@dataclass(frozen=True)
class ScorecardConfig:
    """Sizes and knobs; every one is logged under ``meta/`` with the results."""

    max_queries: int = 20_000  # DCR queries, MIA members (= non-members), presence known sets
    seed: int = 0
    record_sample: int = 10_000  # per side: detection AUC and log-cluster
    utility_train_size: int = 10_000  # per arm (TSTR, TRTR)
    nnaa_block_size: int = 5_000
    attribute_fraction: float = 0.01  # TWIN: the attacker holds 1% of training records ...
    min_attribute_queries: int = 1_000  # ... but at least this many, for a stable mean
    min_task_positives: int = 10
    min_cell_patients: int = 100  # age x condition cells: real patients per age group
    detection_folds: int = 5
    log_clusters: int = 20
    log_cluster_seeds: int = 5  # log-cluster U (records and code vectors): mean over k-means seeds, SD logged
    # Patients per side for the code-vector metrics (PCD and U depend on n): 0 = record_sample,
    # capped by the smallest synthetic set of any row, so every row is computed at one size.
    code_vector_sample: int = 0
    reference_rows: bool = True
    trial_utility_epochs: int = 30  # trial twins: epochs of the severe-outcome LSTM (TSTR, TRTR)
    trial_utility_seeds: int = 1  # ... trained this many times per side, AUROCs averaged (more: less LSTM noise)
    chunk_pairs: int = DEFAULT_CHUNK_PAIRS

    def __post_init__(self) -> None:
        for name in (
            "max_queries",
            "record_sample",
            "utility_train_size",
            "nnaa_block_size",
            "min_attribute_queries",
            "detection_folds",
            "log_clusters",
            "log_cluster_seeds",
            "chunk_pairs",
            "trial_utility_epochs",
            "trial_utility_seeds",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"ScorecardConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.attribute_fraction <= 1:
            raise ValueError(
                "ScorecardConfig.attribute_fraction must be in (0, 1], "
                f"got {self.attribute_fraction}"
            )


class ScorecardError(RuntimeError):
    """Some metrics could not be computed. ``errors``: metric (group) name -> reason;
    ``partial``: everything that was computed."""

    def __init__(self, errors: dict[str, str], partial: dict[str, float]) -> None:
        self.errors, self.partial = errors, partial
        lines = "\n  ".join(f"{k}: {v}" for k, v in sorted(errors.items()))
        super().__init__(f"{len(errors)} metric(s) could not be computed:\n  {lines}")


# Groups about time, visits and ages: undefined for a code set (every code at one week, no
# age), so not computed when the scorecard compares code sets. The history-split utility
# panel needs two visits per patient: code sets are compared on SRA instead.
SENTENCE_ONLY_GROUPS = frozenset(
    {"visits", "gap_weeks", "week_of_event", "age_at_event_years", "sequential_bigram", "validity", "age_prevalence", "utility"}
)


@dataclass
class _Row:
    """Collects one row's metrics and errors; ``group`` runs one metric group (unless the
    record type leaves it undefined: ``skip``)."""

    prefix: str
    metrics: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    skip: frozenset[str] = frozenset()

    def group(self, name: str, fn: Callable[[], dict[str, float]], namespace: str = "") -> None:
        if name in self.skip:
            return
        began = time.perf_counter()
        try:
            values = fn()
        except MetricError as err:
            self.errors[self.prefix + err.name] = err.reason
            logger.warning("scorecard: %s%s failed: %s", self.prefix, err.name, err.reason)
        else:
            for k, v in values.items():
                if isinstance(v, MetricError):
                    self.errors[self.prefix + v.name] = v.reason
                    logger.warning("scorecard: %s%s failed: %s", self.prefix, v.name, v.reason)
                else:
                    self.metrics[self.prefix + namespace + k] = float(v)
        self.seconds[self.prefix + name] = time.perf_counter() - began
        logger.info("scorecard: %s%s in %.1fs", self.prefix, name, self.seconds[self.prefix + name])


@contextmanager
def _search(
    indptr: np.ndarray, keys: np.ndarray, cfg: ScorecardConfig, seed: int
) -> Iterator[NeighbourSearch]:
    search = NeighbourSearch(indptr, keys, seed=seed, chunk_pairs=cfg.chunk_pairs)
    try:
        yield search
    finally:
        search.close()


def _choice(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return rng.choice(n, size=min(k, n), replace=False)


def code_vector_metrics(
    train: DatasetView, holdout: DatasetView, syn: DatasetView, cfg: ScorecardConfig
) -> dict[str, float]:
    """ScoEHR's DDM, PCD, log-cluster U and SRA on the patients' condition vectors (every
    generator: a sentence is reduced to the set of conditions it holds). Equal-size random
    samples of ``record_sample`` per side; SRA's real arm trains on training records and every
    arm is scored on the held-out set."""
    n = min(cfg.code_vector_sample or cfg.record_sample, train.n, syn.n)
    # One seed per side: sets of equal size give the same rows (a copy is compared exactly).
    real = train.conditions[np.sort(_choice(train.n, n, np.random.default_rng(cfg.seed + 29)))]
    synthetic = syn.conditions[np.sort(_choice(syn.n, n, np.random.default_rng(cfg.seed + 29)))]
    out: dict[str, float | MetricError] = {}
    out["fidelity/code_vector/ddm"] = attempt(lambda: CV.ddm(real, synthetic))
    out["fidelity/code_vector/pcd"] = attempt(lambda: CV.pcd(real, synthetic))
    try:
        runs = CV.log_cluster_runs(real, synthetic, cfg.log_clusters, cfg.seed, cfg.log_cluster_seeds)
        out["fidelity/code_vector/log_cluster"], at_limit = CV.mean_of_runs(runs)
        out["fidelity/code_vector/log_cluster/at_limit"] = float(at_limit)
        out["fidelity/code_vector/log_cluster/sd"] = float(np.std(runs))
    except MetricError as err:
        out["fidelity/code_vector/log_cluster"] = err
    try:
        m = min(cfg.utility_train_size, n)
        sra = CV.sra(real[:m], synthetic[:m], holdout.conditions, min_positives=cfg.min_task_positives, seed=cfg.seed)
        out.update({f"utility/code_vector/{k}": v for k, v in sra.items()})
    except MetricError as err:
        out["utility/code_vector/sra"] = err
    out["fidelity/code_vector/n_sample"] = float(n)
    return out


def score_row(
    prefix: str,
    train: DatasetView,
    holdout: DatasetView,
    syn: DatasetView,
    train_search: NeighbourSearch,
    panel: utility.TaskPanel | None,
    train_labels: utility.LabelledSplit,
    holdout_labels: utility.LabelledSplit,
    cfg: ScorecardConfig,
    n_weeks: int,
    record_type: str = "sentence",
) -> tuple[_Row, dict[str, np.ndarray]]:
    """All metrics of one row; returns the row and its DCR distances (for plots)."""
    row = _Row(prefix, skip=SENTENCE_ONLY_GROUPS if record_type == "code_set" else frozenset())
    rng = np.random.default_rng(cfg.seed + 17)
    if syn.n == 0:
        row.errors[prefix + "synthetic"] = "the synthetic set has no patients"
        return row, {}
    t_sum, s_sum = train.summary, syn.summary

    # Fidelity from summaries (exact, whole sets).
    for name, fn in fidelity.SUMMARY_GROUPS:
        row.group(name, lambda fn=fn: fn(t_sum, s_sum), "fidelity/")
    h_prev = holdout.summary.prevalence
    row.group(
        "prevalence_vs_holdout",
        lambda: {
            "prevalence_vs_holdout/r2": attempt(
                lambda: fidelity.r2_score(
                    h_prev, s_sum.prevalence, "fidelity/prevalence_vs_holdout/r2"
                )
            ),
            "prevalence_vs_holdout/pearson_r": attempt(
                lambda: fidelity.pearson_r(
                    h_prev, s_sum.prevalence, "fidelity/prevalence_vs_holdout/pearson_r"
                )
            ),
        },
        "fidelity/",
    )
    row.group(
        "age_prevalence",
        lambda: fidelity.age_prevalence_metrics(t_sum, s_sum, cfg.min_cell_patients),
        "fidelity/",
    )

    # Fidelity from equal-size record samples.
    n_rec = min(cfg.record_sample, len(train.sample), len(syn.sample))
    x_real = F.patient_features(train.sample.take(np.arange(n_rec)), n_weeks)
    x_syn = F.patient_features(syn.sample.take(np.arange(n_rec)), n_weeks)
    row.group(
        "detection",
        lambda: {
            "detection/auc": fidelity.detection_auc(x_real, x_syn, cfg.detection_folds, cfg.seed)
        },
        "fidelity/",
    )
    def log_cluster() -> dict[str, float]:
        runs = fidelity.log_cluster_runs(x_real, x_syn, cfg.log_clusters, seed=cfg.seed, seeds=cfg.log_cluster_seeds)
        value, at_limit = CV.mean_of_runs(runs)
        return {"log_cluster": value, "log_cluster/at_limit": float(at_limit), "log_cluster/sd": float(np.std(runs))}

    row.group("log_cluster", log_cluster, "fidelity/")
    row.group("code_vector", lambda: code_vector_metrics(train, holdout, syn, cfg))

    # Utility (no panel: the reason is already reported once as utility/panel).
    if panel is not None:
        syn_labels = utility.split_history(syn.sample)
        row.group(
            "utility",
            lambda: utility.utility_metrics(
                panel, train_labels, syn_labels, holdout_labels, n_weeks, cfg.utility_train_size
            ),
            "utility/",
        )

    # Privacy.
    row.group(
        "exact_match",
        lambda: privacy.exact_match_metrics(
            syn.record_hash, train.record_hash, holdout.record_hash
        ),
        "privacy/",
    )
    row.group(
        "exact_match_long",
        lambda: privacy.exact_match_long(syn.record_hash, syn.n_words, train.record_hash),
        "privacy/",
    )
    distances: dict[str, np.ndarray] = {}

    def dcr() -> dict[str, float]:
        q = syn.rows(_choice(syn.n, cfg.max_queries, rng))
        d_t, ties_t = train_search.nearest(*q)
        with _search(holdout.nn_indptr, holdout.nn_keys, cfg, cfg.seed) as holdout_search:
            d_h, ties_h = holdout_search.nearest(*q)
        d_real, _ = train_search.nearest(*holdout.rows(_choice(holdout.n, cfg.max_queries, rng)))
        distances.update(
            {"synthetic to train": d_t, "synthetic to held-out": d_h, "held-out to train": d_real}
        )
        return privacy.dcr_metrics(d_t, ties_t, d_h, ties_h, train.n, holdout.n, d_real)

    row.group("dcr", dcr, "privacy/")
    m = min(train.n, holdout.n, cfg.max_queries)

    def mia() -> dict[str, float]:
        members = train.rows(_choice(train.n, m, rng))
        non_members = holdout.rows(_choice(holdout.n, m, rng))
        with _search(syn.nn_indptr, syn.nn_keys, cfg, cfg.seed) as syn_search:
            d_in, _ = syn_search.nearest(*members)
            d_out, _ = syn_search.nearest(*non_members)
        auc, tpr = privacy.membership_auc(-d_in, -d_out, "privacy/mia/distance_auc")
        return {
            "mia/distance_auc": auc,
            "mia/distance_tpr_at_1pct_fpr": tpr,
            "mia/n_members": float(m),
        }

    row.group("mia", mia, "privacy/")
    row.group(
        "nnaa",
        lambda: privacy.nnaa_metrics(
            (train.nn_indptr, train.nn_keys),
            (holdout.nn_indptr, holdout.nn_keys),
            (syn.nn_indptr, syn.nn_keys),
            cfg.nnaa_block_size,
            cfg.seed,
        ),
        "privacy/",
    )

    def presence() -> dict[str, float]:
        k = min(len(train.sample), len(holdout.sample), cfg.max_queries)
        known_t, known_h = train.sample.take(np.arange(k)), holdout.sample.take(np.arange(k))
        return privacy.presence_metrics(
            F.visit_hashes(known_t),
            F.visit_set_hashes(known_t),
            F.visit_hashes(known_h),
            F.visit_set_hashes(known_h),
            syn.visit_hashes,
            syn.visit_set_hash,
        )

    row.group("presence", presence, "privacy/")
    n_attr = min(
        max(math.ceil(cfg.attribute_fraction * train.n), cfg.min_attribute_queries),
        train.n,
        cfg.max_queries,
        len(train.sample_rows),
    )
    row.group(
        "attribute",
        lambda: privacy.attribute_metrics(
            train.conditions[train.sample_rows[:n_attr]],
            syn.conditions,
            holdout.conditions,
            cfg.seed,
        ),
        "privacy/",
    )
    row.metrics.update(
        {
            prefix + "meta/n_train": float(train.n),
            prefix + "meta/n_holdout": float(holdout.n),
            prefix + "meta/n_synthetic": float(syn.n),
            prefix + "meta/n_record_sample": float(n_rec),
            prefix + "meta/n_dcr_queries": float(min(syn.n, cfg.max_queries)),
        }
    )
    return row, distances


def compute_scorecard(
    real_root: str | Path,
    synthetic_root: str | Path,
    *,
    max_queries: int = 20_000,
    seed: int = 0,
    artifacts_dir: str | Path | None = None,
    config: ScorecardConfig | None = None,
    profile: dict[str, float] | None = None,
    record_type: str | None = None,
    undefined: dict[str, str] | None = None,
) -> dict[str, float]:
    """The scorecard of ``synthetic_root`` against ``real_root`` (module docstring). Writes
    PNG plots to ``artifacts_dir`` if given; fills ``profile`` with seconds per stage and
    ``undefined`` with the reason for each undefined (NaN-valued) metric.

    ``record_type`` (default: the synthetic set's ``provenance.record_type``, else
    ``sentence``): ``code_set`` reduces every set (real, synthetic, references) to each
    patient's set of conditions before anything is computed (``views.as_code_sets``), so a
    generator without ages or weeks is compared, and gated, on what it generates."""
    cfg = replace(config or ScorecardConfig(), max_queries=max_queries, seed=seed)
    real_meta = S.DatasetMetadata.read(real_root)
    syn_meta = S.DatasetMetadata.read(synthetic_root)  # a clear error if it is not a dataset directory
    record_type = record_type or syn_meta.provenance.get("record_type", "sentence")
    if record_type == "trial":  # trial twins: the trial section (metrics.trial_twins)
        from mirror.metrics.trial_twins import trial_scorecard

        metrics, errors = trial_scorecard(real_root, synthetic_root, max_queries=cfg.max_queries, seed=cfg.seed,
                                          counterfactual_dir=S.COUNTERFACTUAL_SAMPLE_DIR,
                                          utility_epochs=cfg.trial_utility_epochs,
                                          utility_seeds=cfg.trial_utility_seeds)
        if errors:
            raise ScorecardError(errors, metrics)
        return metrics
    reduce_to(PatientBlock.empty(), record_type)  # an unknown record type fails before any work
    n_weeks = real_meta.n_weeks
    timings: dict[str, float] = {} if profile is None else profile
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = now - clock
        clock = now
        logger.info("scorecard: %s in %.1fs", stage, timings[stage])

    # Full records kept per set: record-based fidelity, utility training, known sets.
    sample = max(cfg.record_sample, cfg.utility_train_size, cfg.max_queries)
    train = scan_view("train", real_root, [S.TRAIN], n_weeks, sample, seed, record_type=record_type)
    holdout_block = reduce_to(
        read_block(real_root, [S.HELD_OUT], n_weeks), record_type
    )  # <= 50K patients by the split contract
    if len(holdout_block) < 4:
        raise ValueError(
            f"{real_root}: held_out split has {len(holdout_block)} patients; need >= 4"
        )
    holdout = view_from_block("held_out", holdout_block, len(holdout_block), seed + 1)
    lap("scan_real")
    syn = scan_view(
        "synthetic", synthetic_root, S.SPLITS, n_weeks, sample, seed + 2, collect_visits=True,
        record_type=record_type,
    )
    lap("scan_synthetic")

    rows: list[tuple[str, DatasetView, DatasetView]] = [("", holdout, syn)]
    tmp: str | None = None
    try:
        if cfg.reference_rows:
            perm = np.random.default_rng(seed + 3).permutation(len(holdout_block))
            half = len(perm) // 2
            ceiling_syn = view_from_block(
                "ceiling_synthetic",
                holdout_block.take(perm[:half]),
                sample,
                seed + 4,
                collect_visits=True,
            )
            ceiling_holdout = view_from_block(
                "ceiling_held_out", holdout_block.take(perm[half:]), len(perm) - half, seed + 5
            )
            tmp = tempfile.mkdtemp(prefix="mirror-floor-")
            write_independent_marginal_sample(
                real_root, tmp, syn.n, seed + 6, summary=train.summary
            )
            floor = scan_view(
                "floor", tmp, S.SPLITS, n_weeks, sample, seed + 7, collect_visits=True,
                record_type=record_type,
            )
            rows += [(CEILING, ceiling_holdout, ceiling_syn), (FLOOR, holdout, floor)]
            lap("reference_sets")

        if not cfg.code_vector_sample:  # one size for every row's code-vector metrics
            cfg = replace(cfg, code_vector_sample=min(cfg.record_sample, *(s.n for _, _, s in rows)))
        train_labels = utility.split_history(train.sample)
        test_labels = {id(h): utility.split_history(h.sample) for _, h, _ in rows}
        metrics: dict[str, float] = {}
        errors: dict[str, str] = {}
        distances: dict[str, np.ndarray] = {}
        panel = None
        try:
            if record_type != "code_set":  # code sets have no history to split (SRA instead)
                panel = utility.select_panel(
                    train_labels, list(test_labels.values()), cfg.min_task_positives
                )
        except MetricError as err:
            errors[err.name] = err.reason
        with _search(train.nn_indptr, train.nn_keys, cfg, seed) as train_search:
            lap("train_index")
            bar = progress(len(rows), "scoring synthetic data", unit="row")
            for prefix, h, s in rows:
                bar.update(1)
                row, dcr = score_row(
                    prefix,
                    train,
                    h,
                    s,
                    train_search,
                    panel,
                    train_labels,
                    test_labels[id(h)],
                    cfg,
                    n_weeks,
                    record_type,
                )
                metrics.update(row.metrics)
                errors.update(row.errors)
                timings.update({f"row/{k}": v for k, v in row.seconds.items()})
                if prefix == "":
                    distances = dcr
                lap(f"row{'/' + prefix.rstrip('/') if prefix else '/main'}")
        for prefix in [p for p, _, _ in rows]:
            metrics.update({f"{prefix}meta/{k}": float(v) for k, v in asdict(cfg).items()})
            metrics[f"{prefix}meta/record_type_code_set"] = float(record_type == "code_set")

        if artifacts_dir is not None:
            out = Path(artifacts_dir)
            out.mkdir(parents=True, exist_ok=True)
            sets = {"synthetic": syn.summary}
            if cfg.reference_rows:
                sets.update(
                    {
                        "ceiling (held-out half)": ceiling_syn.summary,
                        "floor (independent marginals)": floor.summary,
                    }
                )
            plots.prevalence_scatter(train.summary, sets, out / "prevalence_scatter.png")
            plots.cooccurrence_scatter(train.summary, syn.summary, out / "cooccurrence_scatter.png")
            plots.length_histograms(
                {"real train": train.summary, **sets}, out / "length_histograms.png"
            )
            if distances:
                plots.dcr_distributions(distances, out / "dcr_distributions.png")
            lap("plots")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    failures = {k: v for k, v in errors.items() if fails_scorecard(k)}
    undefined_now = {k: v for k, v in errors.items() if k not in failures}
    for name in undefined_now:
        metrics[name] = math.nan
        metrics[name + "/undefined"] = 1.0
    for prefix in [p for p, _, _ in rows]:  # every row has its count, under the same name
        count = sum(not k.startswith((CEILING, FLOOR)) for k in undefined_now) if prefix == "" else sum(
            k.startswith(prefix) for k in undefined_now
        )
        metrics[f"{prefix}meta/undefined_metrics"] = float(count)
    if undefined is not None:
        undefined.update(undefined_now)
    if failures:
        raise ScorecardError({**failures, **undefined_now}, metrics)
    return metrics


# What the privacy gate reads (``privacy.privacy_gate``): the release decision's evidence.
GATE_METRICS = (
    "privacy/exact_match/train_reproduced",
    "privacy/exact_match/holdout_reproduced",
    "privacy/exact_match/reproduced_excess_se",
    "privacy/mia/distance_auc",
    "privacy/presence/sensitivity",
)


def fails_scorecard(metric: str) -> bool:
    """Whether a metric (or metric group) that cannot be computed fails the scorecard and the
    job: the synthetic row's gate evidence (``GATE_METRICS``), or a synthetic set that cannot
    be scored at all. Any other metric may be undefined for a generator's output (a rare-band
    r with no rare code; DCR's median ratio 0/0 when most code sets, one condition long, also
    occur in held-out) and is reported as undefined; the gate refuses a NaN input anyway."""
    if metric.startswith((CEILING, FLOOR)):
        return False
    return metric == "synthetic" or any(g == metric or g.startswith(metric + "/") for g in GATE_METRICS)


def json_safe(metrics: dict[str, float]) -> dict[str, float | None]:
    """The scorecard for a JSON file: an undefined (NaN, or infinite) metric is ``null``, as
    strict JSON has neither; its ``<name>/undefined`` flag says why the value is missing."""
    return {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}
