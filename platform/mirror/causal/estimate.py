"""The Δ estimator as Ray tasks: transitions -> counts -> propensity samples -> fits -> matches
per block -> Δ column set per data shard (and the truth check where ground truth exists).

Layout under ``<root>/delta/<name>/``::

    <split>/part-NNNNN.parquet   Δ columns (``views.windows.DELTA_SCHEMA``), one row per patient
                                 of the data shard of the same name, in its order
    delta.json                   config, counts per stratum, naive / PSM / true effects
    balance.csv, balance.png     SMD before / after matching per stratum and covariate
    _work/                       transition rows and matches by block (removed unless kept)

Driver memory holds only per-stratum sums and the propensity models; every task holds one
block of transition rows or one data shard.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from mirror.causal import delta as D
from mirror.causal import truth as T
from mirror.data import schema
from mirror.data.views.windows import (
    DELTA_SCHEMA,
    LAB_SHORTS,
    LADDER_NAMES,
    N_LABS,
    delta_split_dir,
    read_rows,
)

logger = logging.getLogger(__name__)
TASK_CPUS = 0.5


@dataclass
class DeltaReport:
    """What the estimator did, per stratum and overall."""

    name: str
    patients: int
    blocks: int
    seconds: float
    strata: list[dict[str, Any]] = field(default_factory=list)
    balance: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "patients": self.patients, "blocks": self.blocks, "seconds": self.seconds,
                "totals": self.totals, "strata": self.strata}


def _read_block(work: Path, k: int, columns: list[str] | None = None) -> pa.Table:
    """Transition rows of block ``k``, every split (written partitioned by block)."""
    tables = [ds.dataset(d, format="parquet").to_table(columns=columns)
              for s in schema.SPLITS if (d := work / "transitions" / s / f"block={k}").is_dir()]
    return pa.concat_tables(tables) if tables else pa.table({})


def _count_task(work: str, k: int) -> np.ndarray:
    """Rows per (split, stratum key): treated keys and pooled control keys (ladder, from, 0)."""
    t = _read_block(Path(work), k, ["split", "ladder", "from_level", "to_level"])
    counts = np.zeros((len(schema.SPLITS), 3 * 64), np.int64)
    if not t.num_rows:
        return counts
    split = t.column("split").to_numpy().astype(np.int64)
    f, to = t.column("from_level").to_numpy().astype(np.int64), t.column("to_level").to_numpy().astype(np.int64)
    key = np.where(to > f, D.stratum_key(t.column("ladder").to_numpy().astype(np.int64), f, to),
                   D.stratum_key(t.column("ladder").to_numpy().astype(np.int64), f, 0))
    np.add.at(counts, (split, key), 1)
    return counts


def _sample_task(work: str, k: int, rates: np.ndarray, seed: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Training rows drawn for the propensity (and outcome) fits, per key, at ``rates[key]``:
    their covariates and outcomes."""
    t = _read_block(Path(work), k, ["split", "ladder", "from_level", "to_level", "x", "y"])
    if not t.num_rows:
        return {}
    train = t.column("split").to_numpy() == D.SPLIT_CODE[schema.TRAIN]
    lad = t.column("ladder").to_numpy().astype(np.int64)
    f, to = t.column("from_level").to_numpy().astype(np.int64), t.column("to_level").to_numpy().astype(np.int64)
    key = np.where(to > f, D.stratum_key(lad, f, to), D.stratum_key(lad, f, 0))
    take = train & (np.random.default_rng([seed, k]).random(len(key)) < rates[key])
    taken = t.filter(pa.array(take))
    x, y = D.fixed(taken, "x", D.N_PROPENSITY_FEATURES), D.fixed(taken, "y", N_LABS)
    kk = key[take]
    return {int(u): (x[kk == u], y[kk == u]) for u in np.unique(kk)}


def _fit_task(key: int, x_treated: np.ndarray, controls: tuple[np.ndarray, np.ndarray],
              config: D.DeltaConfig) -> D.Propensity:
    x_controls, y_controls = controls
    model = D.fit_propensity(key, x_treated, x_controls, config.caliper_sd, config.seed, config.propensity,
                             config.history, config.stops)
    return D.fit_outcome_model(model, x_controls, y_controls) if config.bias_correction else model


def _match_task(work: str, k: int, models: dict[int, D.Propensity], config: D.DeltaConfig) -> dict[int, D.StratumSums]:
    t = _read_block(Path(work), k)
    if not t.num_rows:
        return {}
    rows, sums = D.match_block(t, models, config)
    out = Path(work) / "matches"
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(rows, out / f"block-{k:05d}.parquet")
    return sums


def _delta_table(ids: np.ndarray, rows: pa.Table, values: np.ndarray) -> pa.Table:
    """Δ columns (``DELTA_SCHEMA``) for the patients ``ids`` of one shard from their transition
    ``rows`` (sorted by patient) and one value per row and lab (NaN: unobserved)."""
    sid = rows.column("subject_id").to_numpy()
    counts = np.searchsorted(sid, ids, side="right") - np.searchsorted(sid, ids, side="left")
    offsets = pa.array(np.r_[0, np.cumsum(counts)].astype(np.int32))
    value_offsets = pa.array((np.r_[0, np.cumsum(counts)] * N_LABS).astype(np.int32))
    return pa.Table.from_arrays([
        pa.array(ids, pa.int64()),
        pa.ListArray.from_arrays(offsets, pa.array((rows.column("window").to_numpy() + 1).astype(np.int16))),
        pa.ListArray.from_arrays(offsets, pa.array(rows.column("ladder").to_numpy(), pa.int8())),
        pa.ListArray.from_arrays(value_offsets, pa.array(np.nan_to_num(values).reshape(-1).astype(np.float32))),
        pa.ListArray.from_arrays(value_offsets, pa.array(~np.isnan(values).reshape(-1))),
    ], schema=DELTA_SCHEMA)  # fmt: skip


def _shard_task(root: str, work: str, name: str, split: str, file: str, control_means: dict[int, np.ndarray],
                truth_name: str | None = None) -> tuple[dict[int, T.TruthSums], dict[str, int]]:
    """Δ columns for one data shard, and the truth sums of its treated rows when the dataset
    has ground truth; with ``truth_name``, also the true individual effects τ of every treated
    row (matched or not) as a second column set: the ceiling a perfect estimator would give,
    and the Δ of seed 003's synthetic study (its generator records the true Δ)."""
    ids = pq.read_table(Path(root) / schema.DATA_DIR / split / file, columns=[schema.SUBJECT_ID]).column(0).to_numpy()
    matches_dir = Path(work) / "matches"
    if len(ids) and matches_dir.is_dir() and any(matches_dir.iterdir()):
        flt = ((ds.field("split") == D.SPLIT_CODE[split]) & (ds.field("subject_id") >= int(ids.min()))
               & (ds.field("subject_id") <= int(ids.max())))
        rows = ds.dataset(matches_dir, format="parquet", schema=D.MATCH_SCHEMA).to_table(filter=flt)
        rows = rows.filter(pa.array(np.isin(rows.column("subject_id").to_numpy(), ids)))
        rows = rows.take(pa.array(np.argsort(rows.column("subject_id").to_numpy(), kind="stable")))
    else:
        rows = D.MATCH_SCHEMA.empty_table()
    matched = rows.column("matched").to_numpy(zero_copy_only=False).astype(bool)
    m = rows.filter(pa.array(matched))
    table = _delta_table(ids, m, D.fixed(m, "delta", N_LABS))
    out = delta_split_dir(root, name, split)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / file)
    written = {"patients": len(ids), "delta_entries": m.num_rows,
               "patients_with_delta": int(pc.count_distinct(m.column("subject_id")).as_py()) if m.num_rows else 0}

    truth_file = Path(root) / schema.GROUND_TRUTH_DIR / "treatments" / split / file
    if truth_name and not truth_file.exists():
        raise FileNotFoundError(f"{truth_file}: no treatment ground truth, so no true Δ ({truth_name!r}) can be written")
    if not truth_file.exists():
        return {}, written
    tau = T.true_effects(rows, pq.read_table(truth_file)) if rows.num_rows else np.zeros((0, N_LABS))
    if truth_name:
        out = delta_split_dir(root, truth_name, split)
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(_delta_table(ids, rows, tau), out / file)
    if not rows.num_rows:
        return {}, written
    y = D.fixed(rows, "y", N_LABS).astype(np.float64)
    all_delta = D.fixed(rows, "delta", N_LABS).astype(np.float64)
    key = D.stratum_key(rows.column("ladder").to_numpy().astype(np.int64), rows.column("from_level").to_numpy().astype(np.int64),
                        rows.column("to_level").to_numpy().astype(np.int64))
    sums = {}
    for k in np.unique(key):
        i = key == k
        sums[int(k)] = T.truth_sums(tau[i], y[i], all_delta[i], matched[i], control_means.get(int(k), np.full(N_LABS, np.nan)))
    return sums, written


def estimate_delta(root: str | Path, name: str, config: D.DeltaConfig | None = None, *, keep_work: bool = False,
                   truth_name: str | None = None) -> DeltaReport:
    """Estimate Δ for every split of the dataset at ``root`` and write it under
    ``<root>/delta/<name>/``; with ``truth_name`` (simulated data only), also the simulator's true
    effects of the same treated rows under ``<root>/delta/<truth_name>/``. Ray must be reachable
    (a local instance is started if none)."""
    import ray

    config = config or D.DeltaConfig()
    t0 = time.perf_counter()
    root = Path(root).resolve()
    metadata = schema.DatasetMetadata.read(root)
    patients = sum(metadata.patients.values())
    blocks = max(1, -(-patients // config.block_patients))
    out = root / "delta" / name
    if truth_name == name:
        raise ValueError(f"truth_name {truth_name!r}: must differ from the estimate's name")
    for old in (out, root / "delta" / truth_name if truth_name else None):
        if old is not None and old.exists():
            shutil.rmtree(old)
    work = out / "_work"
    for split in schema.SPLITS:
        if not schema.split_files(root, split):
            continue
        rows = read_rows(root, split)
        rows.map_batches(D._TransitionsFn(split, config.window_weeks, blocks, config.outcome), batch_format="pyarrow",
                         batch_size=None, num_cpus=0.25).write_parquet(str(work / "transitions" / split), partition_cols=["block"])
    remote = ray.remote(num_cpus=TASK_CPUS)
    counts = sum(ray.get([remote(_count_task).remote(str(work), k) for k in range(blocks)]))
    train_counts = counts[D.SPLIT_CODE[schema.TRAIN]]
    rates = np.minimum(1.0, config.max_fit_rows / np.maximum(train_counts, 1))
    samples: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for part in ray.get([remote(_sample_task).remote(str(work), k, rates, config.seed) for k in range(blocks)]):
        for k, xy in part.items():
            samples.setdefault(k, []).append(xy)
    sample_of = {k: (np.concatenate([x for x, _ in v]), np.concatenate([y for _, y in v])) for k, v in samples.items()}
    strata = [k for k in range(3 * 64) if k % D.MAX_LEVEL > k % 64 // D.MAX_LEVEL and counts[:, k].sum()]
    fitted, unfitted = [], {}
    for k in strata:
        li, f, _ = D.unpack_key(k)
        control = D.stratum_key(li, f, 0)
        if train_counts[k] >= config.min_treated and train_counts[control] >= config.min_treated:
            fitted.append(remote(_fit_task).remote(k, sample_of[k][0], sample_of[control], config))
        else:
            unfitted[k] = int(counts[:, k].sum())
    models = {m.key: m for m in ray.get(fitted)}
    block_sums = ray.get([remote(_match_task).remote(str(work), k, models, config) for k in range(blocks)])
    sums: dict[int, D.StratumSums] = {}
    for part in block_sums:
        for k, s in part.items():
            sums[k] = sums[k] + s if k in sums else s
    control_means = {k: np.where(s.y_controls_n > 0, np.asarray(s.y_controls.s) / np.maximum(s.y_controls_n, 1), np.nan)
                     for k, s in sums.items()}
    shard_jobs = [remote(_shard_task).remote(str(root), str(work), name, split, f.name, control_means, truth_name)
                  for split in schema.SPLITS for f in schema.split_files(root, split)]
    truth: dict[int, T.TruthSums] = {}
    written = {"patients": 0, "delta_entries": 0, "patients_with_delta": 0}
    for part, w in ray.get(shard_jobs):
        for k, s in part.items():
            truth[k] = truth[k] + s if k in truth else s
        written = {k: written[k] + w[k] for k in written}
    report = DeltaReport(name, patients, blocks, time.perf_counter() - t0)
    report.strata = stratum_table(sums, models, unfitted, truth)
    report.balance = D.balance_rows(sums)
    report.totals = totals(report.strata, written, unfitted)
    out.mkdir(parents=True, exist_ok=True)
    (out / "delta.json").write_text(json.dumps({"config": config.as_dict(), **report.as_json()}, indent=2, default=float) + "\n")
    write_balance(report.balance, out)
    if truth_name:
        (root / "delta" / truth_name / "delta.json").write_text(json.dumps({
            "truth_of": name, "note": "true individual effects τ of every treated row of the estimate's fitted strata "
            "(matched or not); NaN (unobserved) where the outcome lab was not measured"}, indent=2) + "\n")
    if not keep_work:
        shutil.rmtree(work)
    logger.info("Δ %s: %s", name, report.totals)
    return report


def stratum_table(sums: dict[int, D.StratumSums], models: dict[int, D.Propensity], unfitted: dict[int, int],
                  truth: dict[int, T.TruthSums]) -> list[dict[str, Any]]:
    """One row per stratum: counts, match rate, naive and PSM effect on the ladder's lab, and
    (simulated data) the true effects, biases, RMSEs and the individual correlation."""
    from mirror.data.record import LADDERS

    rows = []
    for k in sorted(set(sums) | set(unfitted)):
        li, f, t = D.unpack_key(k)
        row: dict[str, Any] = {"ladder": LADDER_NAMES[li], "transition": f"{f}->{t}"}
        if k in unfitted:
            rows.append(row | {"treated": unfitted[k], "fitted": False})
            continue
        s = sums[k]
        j = LADDERS[li].lab
        naive = s.y_treated.s[j] / max(s.y_treated_n[j], 1) - s.y_controls.s[j] / max(s.y_controls_n[j], 1)
        psm = s.delta_sum[j] / max(s.delta_n[j], 1) if s.delta_n[j] else float("nan")
        sd = D.pooled_sd(s.x_treated, s.x_controls)
        judged = D.balance_features(models[k].history, models[k].stops)
        before = np.abs(D.smd(s.x_treated, s.x_controls, sd))[judged]
        after = np.abs(D.smd(s.x_treated_matched, s.x_matched_controls, sd))[judged] if s.matched else before * np.nan
        row |= {
            "fitted": True, "lab": LAB_SHORTS[j], "treated": s.treated, "controls": s.controls, "matched": s.matched,
            "match_rate": s.matched / max(s.treated, 1), "caliper_drops": s.caliper_drops, "no_controls": s.no_controls,
            "controls_per_matched": s.controls_used / max(s.matched, 1), "caliper_logit": models[k].caliper, "naive": float(naive), "psm": float(psm), "psm_pairs": int(s.delta_n[j]),
            "max_abs_smd_before": _max(before), "max_abs_smd_after": _max(after),
            "outcome_effective_controls": models[k].outcome_effective_controls,
        }  # fmt: skip
        if k in truth:
            tr = truth[k]
            true_naive = tr.naive_tau[j] / max(tr.naive_n[j], 1)
            true_psm = tr.psm_tau[j] / max(tr.psm_n[j], 1)
            row |= {
                "true_naive": float(true_naive), "true_psm": float(true_psm),
                "naive_bias": float(naive - true_naive), "psm_bias": float(psm - true_psm),
                "naive_rmse": float(np.sqrt(tr.naive_sq_err[j] / max(tr.naive_n[j], 1))),
                "psm_rmse": float(np.sqrt(tr.psm_sq_err[j] / max(tr.psm_n[j], 1))),
                "individual_corr": float(T.correlation(tr)[j]),
            }  # fmt: skip
        rows.append(row)
    return rows


def _max(values: np.ndarray) -> float:
    return float(np.nanmax(values)) if np.isfinite(values).any() else float("nan")


def totals(strata: list[dict[str, Any]], written: dict[str, int], unfitted: dict[int, int]) -> dict[str, float]:
    fitted = [r for r in strata if r.get("fitted")]
    treated = sum(r["treated"] for r in fitted)
    out: dict[str, float] = {
        "treated": treated, "matched": sum(r["matched"] for r in fitted),
        "match_rate": sum(r["matched"] for r in fitted) / max(treated, 1),
        "caliper_drops": sum(r["caliper_drops"] for r in fitted), "no_controls": sum(r["no_controls"] for r in fitted),
        "treated_in_unfitted_strata": sum(unfitted.values()), "strata_fitted": len(fitted), "strata_unfitted": len(unfitted),
        "max_abs_smd_after": max((r["max_abs_smd_after"] for r in fitted), default=float("nan")),
        **{f"written_{k}": v for k, v in written.items()},
    }  # fmt: skip
    return out


def write_balance(balance: list[dict[str, Any]], out: Path) -> tuple[Path, Path]:
    """``balance.csv`` and a love plot (|SMD| before vs after, one row per stratum)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv = out / "balance.csv"
    keys = ["ladder", "transition", "covariate", "smd_before", "smd_after"]
    csv.write_text(",".join(keys) + "\n" + "".join(",".join(str(r[k]) for k in keys) + "\n" for r in balance))
    strata = sorted({(r["ladder"], r["transition"]) for r in balance})
    fig, ax = plt.subplots(figsize=(7, 0.35 * max(len(strata), 4) + 1.5))
    for i, st in enumerate(strata):
        rs = [r for r in balance if (r["ladder"], r["transition"]) == st]
        ax.scatter([abs(r["smd_before"]) for r in rs], [i] * len(rs), marker="o", color="tab:red", s=12, alpha=0.6,
                   label="before" if i == 0 else None)
        ax.scatter([abs(r["smd_after"]) for r in rs], [i] * len(rs), marker="x", color="tab:blue", s=12,
                   label="after" if i == 0 else None)
    ax.axvline(0.1, color="grey", ls="--", lw=1)
    ax.set_yticks(range(len(strata)), [f"{a} {b}" for a, b in strata])
    ax.set_xlabel("|standardised mean difference| of X_{t-1}")
    ax.legend(loc="lower right")
    png = out / "balance.png"
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return csv, png
