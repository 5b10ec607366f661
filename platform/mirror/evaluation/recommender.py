"""The evaluation suite of recommenders (the ``recommender`` capability): medication regimens
per admission, scored as MiranDa (seed 004) and GAMENet score them.

On held-out examples (at most ``train.eval_patients``), each number beside its floor:

* accuracy, sample-averaged with scikit-learn at a 0.5 threshold: ROC-AUC and PR-AUC (over
  examples whose truth has both classes), Jaccard, precision, recall, F1 (over examples with a
  non-empty given regimen; the others are counted in ``eval/empty_truth_examples``);
* ``ddi_rate``: the share of co-recommended class pairs that interact in GAMENet's DDI graph
  over ATC-3 (``data/mappings/ddi_atc3.csv.gz``, MIT), over all recommended pairs (GAMENet's
  definition); also for the regimen actually given (``given/ddi_rate``);
* when the model declares ``recommendation_outcomes(batch, scores)`` (per-example outcomes of
  any regimen, e.g. MiranDa's retrieved ELOS): each outcome of the model's scores, of the
  given regimen (``given/...``) and of the floor's (``baseline/...``); NaN entries (no
  outcome) are counted in ``.../<name>_missing``;
* on simulated data (``ground_truth/admissions`` exists and examples carry ``subject_id`` and
  ``stay``): ``true_los``, the simulator's TRUE expected length of stay
  (``record.expected_length_of_stay``) of the recommended regimen, of the given one
  (``given/true_los``, which must match the stored ``stay_expected_los``), of the floor's, and
  the ceiling of giving every helpful class (``ceiling/true_los``). Stays whose ground truth
  row is missing are counted, never dropped silently.

Floor (``baseline/...``): the most-frequent-regimen recommender. Its scores are the training
split's class frequencies (for the rank metrics); its regimen is the top-k most frequent
classes, k = the mean training regimen size rounded (for the set metrics, DDI, ELOS, true LOS).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from sklearn.metrics import (
    average_precision_score,
    jaccard_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from mirror.checkpoint import LoadedRun
from mirror.data import schema
from mirror.data.schema import HELD_OUT, TRAIN

FLOOR_EXAMPLES = 20_000  # training examples the floor is fitted on, at most (class frequencies: se <= 0.004)
THRESHOLD = 0.5
DDI_TABLE = Path(__file__).parents[1] / "data" / "mappings" / "ddi_atc3.csv.gz"


# -- metrics on arrays -------------------------------------------------------------------------


def multilabel_metrics(scores: np.ndarray, truth: np.ndarray, predicted: np.ndarray | None = None) -> dict[str, float]:
    """Sample-averaged ROC-AUC, PR-AUC (examples with both classes in the truth) and Jaccard,
    precision, recall, F1 of ``predicted`` (default ``scores >= 0.5``; examples with a
    non-empty truth), with the counts of examples each average is over."""
    truth = truth.astype(bool)
    predicted = scores >= THRESHOLD if predicted is None else predicted.astype(bool)
    positives = truth.sum(1)
    ranked = (positives > 0) & (positives < truth.shape[1])
    graded = positives > 0
    out = {"ranked_examples": float(ranked.sum()), "graded_examples": float(graded.sum()),
           "empty_truth_examples": float((~graded).sum())}
    nan = float("nan")
    if ranked.any():
        out["roc_auc"] = float(roc_auc_score(truth[ranked], scores[ranked], average="samples"))
        out["pr_auc"] = float(average_precision_score(truth[ranked], scores[ranked], average="samples"))
    else:
        out["roc_auc"] = out["pr_auc"] = nan
    if graded.any():
        t, p = truth[graded], predicted[graded]
        out["jaccard"] = float(jaccard_score(t, p, average="samples", zero_division=0.0))
        precision, recall, f1, _ = precision_recall_fscore_support(t, p, average="samples", zero_division=0.0)
        out |= {"precision": float(precision), "recall": float(recall), "f1": float(f1)}
    else:
        out |= {"jaccard": nan, "precision": nan, "recall": nan, "f1": nan}
    out["mean_regimen_size"] = float(predicted.sum(1).mean()) if len(predicted) else nan
    return out


@cache
def ddi_adjacency(n_labels: int) -> np.ndarray:
    """(n_labels, n_labels) symmetric bool: GAMENet's DDI edges over the platform's ATC-3 ids
    (labels are ``vocabularies.drug_class_id`` ids, as in the simulated and imported data)."""
    from mirror.data.vocabularies import drug_class_id

    ids = drug_class_id()
    adjacency = np.zeros((n_labels, n_labels), bool)
    with gzip.open(DDI_TABLE, "rt") as f:
        header = f.readline().strip().split(",")
        if header != ["atc3_a", "atc3_b"]:
            raise ValueError(f"{DDI_TABLE}: header {header}, expected atc3_a,atc3_b")
        for line_no, line in enumerate(f, start=2):
            a, b = line.strip().split(",")
            if a not in ids or b not in ids:
                raise ValueError(f"{DDI_TABLE}:{line_no}: {a!r} or {b!r} is not an ATC-3 class of the vocabulary")
            i, j = ids[a], ids[b]
            if i < n_labels and j < n_labels:
                adjacency[i, j] = adjacency[j, i] = True
    return adjacency


def ddi_rate(regimens: np.ndarray, adjacency: np.ndarray) -> float:
    """Interacting pairs / all pairs of co-recommended classes, summed over examples."""
    r = regimens.astype(np.float64)
    sizes = r.sum(1)
    pairs = float((sizes * (sizes - 1) / 2).sum())
    interacting = float(((r @ adjacency.astype(np.float64)) * r).sum() / 2)
    return interacting / pairs if pairs else float("nan")


def top_k_regimen(frequency: np.ndarray, k: int, n: int) -> np.ndarray:
    """(n, L) bool: every example gets the ``k`` most frequent classes."""
    regimen = np.zeros(len(frequency), bool)
    regimen[np.argsort(-frequency, kind="stable")[:k]] = True
    return np.broadcast_to(regimen, (n, len(frequency)))


# -- the simulator's ground truth of length of stay ----------------------------------------------


@dataclass
class StayTruth:
    """What ``record.expected_length_of_stay`` needs per evaluated stay, in query order."""

    found: np.ndarray  # (S,) bool: the stay has a ground-truth row
    principal: np.ndarray  # (S,) condition id
    severity: np.ndarray  # (S,)
    diagnoses: np.ndarray  # (S, n_conditions) bool: admission-week diagnoses
    expected_given: np.ndarray  # (S,) stored expectation under the given regimen
    expected_all_helpful: np.ndarray  # (S,)


def _flat(table: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray]:
    arr = table.column(column).combine_chunks()
    return arr.flatten().to_numpy(zero_copy_only=False), np.repeat(np.arange(len(arr)), np.diff(arr.offsets.to_numpy()))


def stay_truth(root: str | Path, split: str, subject: np.ndarray, stay: np.ndarray) -> StayTruth:
    """Ground truth of the stays ``(subject, stay)``, streamed shard by shard (rows and their
    ``ground_truth/admissions`` twin), keeping only the queried patients."""
    from mirror.data.record import ADMISSIONS
    from mirror.data.vocab import N_CONDITIONS

    n = len(subject)
    out = StayTruth(np.zeros(n, bool), np.zeros(n, np.int64), np.zeros(n), np.zeros((n, N_CONDITIONS), bool),
                    np.full(n, np.nan), np.full(n, np.nan))
    wanted = pa.array(np.unique(subject), pa.int64())
    row_cols = [schema.SUBJECT_ID, schema.CONDITIONS, schema.CONDITION_STAYS, schema.WEEKS, schema.ADMIT_DAYS]
    truth_cols = [schema.SUBJECT_ID, "stay_principal", "stay_severity", "stay_expected_los", "stay_expected_los_all_helpful"]
    for file in schema.split_files(root, split):
        truth_file = Path(root) / schema.GROUND_TRUTH_DIR / ADMISSIONS / split / file.name
        rows = pq.read_table(file, columns=row_cols)
        keep = pc.is_in(rows.column(schema.SUBJECT_ID), value_set=wanted)
        if not pc.any(keep).as_py():
            continue
        truth = pq.read_table(truth_file, columns=truth_cols)
        if not truth.column(schema.SUBJECT_ID).equals(rows.column(schema.SUBJECT_ID)):
            raise ValueError(f"{truth_file}: rows do not match {file} row for row")
        rows, truth = rows.filter(keep), truth.filter(keep)
        admit, owner = _flat(rows, schema.ADMIT_DAYS)
        counts = np.bincount(owner, minlength=rows.num_rows)
        first = np.cumsum(counts) - counts
        stay_index = np.arange(len(owner)) - first[owner]
        subjects = rows.column(schema.SUBJECT_ID).to_numpy()
        # the queried stays of this shard -> flat admission position (joined on subject x stay)
        shard_key = subjects[owner].astype(np.int64) * 65_536 + stay_index
        order = np.argsort(shard_key, kind="stable")
        query_key = subject.astype(np.int64) * 65_536 + stay.astype(np.int64)
        at = np.minimum(np.searchsorted(shard_key[order], query_key), max(len(order) - 1, 0))
        hit = (len(order) > 0) & (shard_key[order][at] == query_key) if len(order) else np.zeros(n, bool)
        if not hit.any():
            continue
        query, flat = np.flatnonzero(hit), order[at[hit]]
        truth_values = {c: _flat(truth, c)[0] for c in truth_cols[1:]}
        if len(truth_values["stay_principal"]) != len(owner):
            raise ValueError(f"{truth_file}: {len(truth_values['stay_principal'])} stays, {file} has {len(owner)}")
        codes, code_row = _flat(rows, schema.CONDITIONS)
        code_stay = _flat(rows, schema.CONDITION_STAYS)[0].astype(np.int64)
        weeks = _flat(rows, schema.WEEKS)[0]
        linked = code_stay >= 0
        code_flat = np.where(linked, first[code_row] + code_stay, 0)
        same_week = linked & (weeks == admit[code_flat] // schema.DAYS_PER_WEEK)
        diagnoses = np.zeros((len(owner), N_CONDITIONS), bool)
        diagnoses[code_flat[same_week], codes[same_week]] = True
        out.found[query] = True
        out.principal[query] = truth_values["stay_principal"][flat]
        out.severity[query] = truth_values["stay_severity"][flat]
        out.expected_given[query] = truth_values["stay_expected_los"][flat]
        out.expected_all_helpful[query] = truth_values["stay_expected_los_all_helpful"][flat]
        out.diagnoses[query] = diagnoses[flat]
    return out


def true_length_of_stay(root: str | Path, truth: StayTruth, regimens: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The TRUE expected LOS of each named (S, n_medications) regimen, at the found stays."""
    from mirror.data.record import expected_length_of_stay
    from mirror.data.simulator import SimulatorParams

    params = SimulatorParams.load(Path(root) / schema.GROUND_TRUTH_DIR)
    f = truth.found
    return {name: expected_length_of_stay(params, truth.principal[f], truth.severity[f], truth.diagnoses[f], regimen[f])
            for name, regimen in regimens.items()}


# -- the suite ------------------------------------------------------------------------------------


def _examples(loaded: LoadedRun, split: str, limit: int) -> Any:
    view, train = loaded.view(), loaded.spec.train
    dataset, _ = view.read(split)
    if limit:
        dataset = dataset.limit(limit)
    return view.batches(dataset, train.eval_batch_size, training=False, device="cpu")


def _mean_outcome(values: np.ndarray, key: str) -> dict[str, float]:
    missing = np.isnan(values)
    return {key: float(values[~missing].mean()) if (~missing).any() else float("nan"),
            f"{key}_missing": float(missing.sum())}


@torch.no_grad()
def recommender_suite(loaded: LoadedRun, artifacts: Path) -> dict[str, float]:
    """Accuracy, DDI, outcome (ELOS) and, on simulated data, true LOS of the model's, the given
    and the most-frequent-regimen recommendations on held-out examples."""
    model = loaded.model
    counts: np.ndarray | None = None
    n_train = sizes = 0
    for batch in _examples(loaded, TRAIN, FLOOR_EXAMPLES):
        _, truth = model.recommend(batch)
        counts = truth.double().sum(0).cpu().numpy() + (0 if counts is None else counts)
        n_train += truth.shape[0]
        sizes += int(truth.sum())
    frequency = (np.zeros(0) if counts is None else counts) / max(1, n_train)
    k = round(sizes / max(1, n_train))
    hook = getattr(model, "recommendation_outcomes", None)
    scores, truths, ids, stays = [], [], [], []
    outcomes: dict[str, list[np.ndarray]] = {}
    for batch in _examples(loaded, HELD_OUT, loaded.spec.train.eval_patients):
        score, truth = model.recommend(batch)
        scores.append(score.double().cpu().numpy())
        truths.append(truth.cpu().numpy().astype(bool))
        if hasattr(batch, "subject_id") and hasattr(batch, "stay"):
            ids.append(batch.subject_id.cpu().numpy())
            stays.append(batch.stay.cpu().numpy())
        if hook is not None:
            floor = torch.from_numpy(top_k_regimen(frequency, k, truth.shape[0]).astype(np.float32)).to(score)
            for prefix, regimen in (("eval", score), ("given", truth.to(score)), ("baseline", floor)):
                for name, value in hook(batch, regimen).items():
                    outcomes.setdefault(f"{prefix}/{name}", []).append(value.double().cpu().numpy())
    if not scores:
        raise ValueError(f"{loaded.spec.data}: no held-out examples to evaluate the recommender on")
    score, truth = np.concatenate(scores), np.concatenate(truths)
    if len(frequency) != truth.shape[1]:
        frequency = np.zeros(truth.shape[1])
    predicted = score >= THRESHOLD
    floor = top_k_regimen(frequency, k, len(truth))
    adjacency = ddi_adjacency(truth.shape[1])
    out = {f"eval/{m}": v for m, v in multilabel_metrics(score, truth, predicted).items()}
    out |= {f"baseline/{m}": v for m, v in multilabel_metrics(np.broadcast_to(frequency, truth.shape), truth, floor).items()}
    out |= {"eval/ddi_rate": ddi_rate(predicted, adjacency), "given/ddi_rate": ddi_rate(truth, adjacency),
            "baseline/ddi_rate": ddi_rate(floor, adjacency), "baseline/top_k": float(k),
            "eval/examples": float(len(truth)), "given/mean_regimen_size": float(truth.sum(1).mean())}
    for key, parts in outcomes.items():
        out |= _mean_outcome(np.concatenate(parts), key)
    root = Path(loaded.spec.data)
    from mirror.data.record import ADMISSIONS

    if ids and (root / schema.GROUND_TRUTH_DIR / ADMISSIONS).is_dir():
        out |= _true_los_metrics(root, np.concatenate(ids), np.concatenate(stays),
                                 {"eval": predicted, "given": truth, "baseline": floor})
    return out


def _true_los_metrics(root: Path, subject: np.ndarray, stay: np.ndarray, regimens: dict[str, np.ndarray]) -> dict[str, float]:
    truth = stay_truth(root, HELD_OUT, subject, stay)
    true_los = true_length_of_stay(root, truth, regimens)
    out = {f"{name}/true_los": float(v.mean()) if len(v) else float("nan") for name, v in true_los.items()}
    found = truth.found
    out["ceiling/true_los"] = float(truth.expected_all_helpful[found].mean()) if found.any() else float("nan")
    out["eval/true_los_missing"] = float((~found).sum())
    # the function must reproduce the simulator's stored expectation of the given regimen
    out["given/true_los_max_abs_error"] = float(np.abs(true_los["given"] - truth.expected_given[found]).max()) if found.any() else float("nan")
    return out
