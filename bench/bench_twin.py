"""TWIN (issue 17) figures on one trial dataset, in one process (reduced scale, 2-core box).

    python bench/bench_twin.py DATA [--epochs 20] [--retrieval global] [--ablation]
        [--seeds 0 1 2] [--set generation=sample] [--retrieval-scale 1000000]

Trains TWIN on ``trial/train`` with the model's own loss (a plain single-process loop over
``VisitsView.inference_batch`` blocks, shuffled; the Ray Train path is covered by
tests/test_twin.py), generates a twin of every training participant and prints: DP r
(medications, AEs; per dataset and per participant), NNAA and presence disclosure, the
severe-outcome LSTM AUROC trained on real vs synthetic and scored on real tuning + held-out
participants (TSTR / TRTR). With ground truth (a simulated trial) it also scores the
counterfactual twins against the simulator's true counterfactuals, beside the paper's
surrogate (the nearest other-arm participant's real record). ``--ablation`` repeats it
with ``view.retrieval=none`` (TWIN-RAE). ``--retrieval-scale N`` times the index build and
one 64-query batch over N visits instead, the pattern search against the previous CSR search
(random visits, and DATA's trial visits tiled to N when DATA is given).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mirror.data import schema
from mirror.data.views.visits import (
    RetrievalIndex,
    VisitsView,
    VisitsViewConfig,
    top_k_global,
    top_k_global_csr,
)
from mirror.metrics import trial_twins as M
from mirror.models import build_model
from mirror.models.twin import counterfactual_twins, counterfactual_twins_cpm, generate_twins


def read(root: str, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in schema.trial_split_files(root, split)])


def train(view: VisitsView, table: pa.Table, epochs: int, seed: int, batch: int = 64, overrides: dict | None = None):
    torch.manual_seed(seed)
    model = build_model("twin", overrides or {}, view.info())
    opt = model.make_optimizers()["twin"]
    rng = np.random.default_rng(seed)
    participants_per_block = max(2, batch // 9)  # ~9 visits per participant: ~batch visits
    for _ in range(epochs):
        model.train()
        order = rng.permutation(table.num_rows)
        for lo in range(0, len(order) - participants_per_block + 1, participants_per_block):
            b, _ = view.inference_batch(table.take(pa.array(order[lo : lo + participants_per_block])))
            if b.size < 2:
                continue
            sums = model.twin(b)
            opt.zero_grad()
            (sums["loss"] / b.size).backward()
            opt.step()
    return model


def scores(root: str, retrieval: str, epochs: int, seed: int, overrides: dict | None = None) -> dict[str, float]:
    view = VisitsView(VisitsViewConfig(retrieval=retrieval), root)
    view.index_ref = None
    if retrieval == "global":
        from mirror.data.views.visits import build_index

        view.index_ref = build_index(root, view.info().widths)  # in-process: no object store needed
    info = view.info()
    real, tuning, held = read(root, "train"), read(root, "tuning"), read(root, "held_out")
    test = pa.concat_tables([tuning, held])
    t0 = time.perf_counter()
    model = train(view, real, epochs, seed, overrides=overrides)
    out: dict[str, float] = {"train_seconds": time.perf_counter() - t0}
    syn = generate_twins(model, view, real, seed=seed)
    l1, l2, l3 = info.widths
    out["dp_r/medication"] = M.dp_r(real, syn, schema.VISIT_MEDICATIONS, l2)
    out["dp_r/adverse_event"] = M.dp_r(real, syn, schema.VISIT_ADVERSE_EVENTS, l3)
    out["dp_r_patient/medication"], _ = M.per_patient_dp_r(real, syn, schema.VISIT_MEDICATIONS, l2)
    out["dp_r_patient/adverse_event"], _ = M.per_patient_dp_r(real, syn, schema.VISIT_ADVERSE_EVENTS, l3)
    out.update(M.nnaa(real, test, syn, info.widths, seed=seed))
    out.update({f"paired_{k}": v for k, v in M.nnaa(real, test, syn, info.widths, seed=seed, paired=True).items()})
    pres = M.presence(real, test, syn, info.widths, seed=seed)
    out.update({k: pres[k] for k in ("presence/sensitivity", "presence/holdout_sensitivity", "presence/visit_sensitivity")})
    trtr = M.severe_outcome_auroc(real, test, info.widths, seed=seed)
    tstr = M.severe_outcome_auroc(syn, test, info.widths, seed=seed)
    out.update({"utility/trtr_auroc": trtr, "utility/tstr_auroc": tstr, "utility/ratio": tstr / trtr})
    truth_files = sorted((schema.Path(root) / schema.GROUND_TRUTH_DIR / "trial_counterfactual" / "train").glob("*.parquet"))
    if truth_files:
        truth = pa.concat_tables([pq.read_table(f).select(schema.TRIAL_SCHEMA.names) for f in truth_files])
        cf, surrogate = counterfactual_twins(model, view, real, seed=seed)
        cf_own, _ = counterfactual_twins_cpm(model, view, real, seed=seed)
        proxy = real.take(pa.array(surrogate))
        for name, table in (("twin", cf), ("twin_cpm_own_visits", cf_own), ("surrogate", proxy)):
            out[f"counterfactual/{name}/dp_r_adverse_event"] = M.dp_r(truth, table, schema.VISIT_ADVERSE_EVENTS, l3)
            out[f"counterfactual/{name}/dp_r_medication"] = M.dp_r(truth, table, schema.VISIT_MEDICATIONS, l2)
            out[f"counterfactual/{name}/per_patient_dp_r_adverse_event"], _ = M.per_patient_dp_r(truth, table, schema.VISIT_ADVERSE_EVENTS, l3)
            out[f"counterfactual/{name}/ae_rate_error"] = M.ae_rate_error(truth, table, l3)
        # What the truth differs from: the participant's own factual record (the effect size).
        out["counterfactual/factual_itself/dp_r_adverse_event"] = M.dp_r(truth, real, schema.VISIT_ADVERSE_EVENTS, l3)
        out["counterfactual/factual_itself/ae_rate_error"] = M.ae_rate_error(truth, real, l3)
    return out


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def retrieval_scale(n_visits: int, data: str | None = None, width: int = 381, events: int = 12, batch: int = 64,
                    k: int = 3, repeats: int = 3) -> dict[str, dict[str, float]]:
    """Build and query cost of the exact global index over ``n_visits`` visits, the pattern
    search (``top_k_global``) against the previous CSR search (``top_k_global_csr``), same
    process, same queries, results checked equal. Two kinds of visits: ``random`` (``events``
    random columns of ``width``: every visit distinct, the worst case for de-duplication) and,
    with ``data``, ``trial`` (that trial's training visits tiled to ``n_visits``, each copy
    another participant: a trial's visits repeat a few patterns)."""
    rng = np.random.default_rng(0)
    sets = {}
    # distinct sorted columns: sorted draws from [0, width - events] plus 0..events-1
    indices = (np.sort(rng.integers(0, width - events + 1, size=(n_visits, events)), axis=1)
               + np.arange(events)).astype(np.int32).ravel()
    sets["random"] = (np.arange(0, n_visits * events + 1, events, dtype=np.int64), indices,
                      np.repeat(np.arange(n_visits // 9 + 1), 9)[:n_visits], width)
    if data:
        from mirror.data.views.visits import build_index

        view = VisitsView(VisitsViewConfig(), data)
        base = build_index(data, view.info().widths)
        copies = -(-n_visits // base.size)
        lengths = np.tile(np.diff(base.indptr), copies)[:n_visits]
        _, owner = np.unique(base.owner, return_inverse=True)
        owners = (np.arange(copies)[:, None] * (owner.max() + 1) + owner[None, :]).ravel()[:n_visits]
        sets["trial"] = (np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                         np.tile(base.indices, copies)[: lengths.sum()], owners, base.width)
    out = {}
    for name, (indptr, idx, owner, w) in sets.items():
        index = RetrievalIndex(indptr, idx, owner, w)
        _, csr_build = _timed(lambda index=index: index.matrix)
        _, dedupe = _timed(index.dedupe)
        _ = index.patterns.matrix
        pick = rng.choice(index.size, batch, replace=False)
        queries, subjects = index.rows(pick), index.owner[pick]
        old, old_s = _timed(lambda index=index, q=queries, s=subjects: top_k_global_csr(index, q, s, k))
        new_s = []
        for _ in range(repeats):
            new, seconds = _timed(lambda index=index, q=queries, s=subjects: top_k_global(index, q, s, k))
            new_s.append(seconds)
        assert (old[0] == new[0]).all() and (old[1] == new[1]).all(), "pattern search differs from the CSR search"
        out[name] = {"visits": n_visits, "patterns": index.patterns.size, "max_own_visits": index.patterns.max_own,
                     "batch": batch, "k": k, "csr_build_seconds": csr_build, "dedupe_build_seconds": dedupe,
                     "csr_query_seconds": old_s, "pattern_query_seconds": min(new_s),
                     "speedup": old_s / min(new_s),
                     "index_mb": (index.indices.nbytes + index.indptr.nbytes + index.owner.nbytes) / 2**20,
                     "patterns_mb": (index.patterns.members.nbytes + index.patterns.indices.nbytes
                                     + index.patterns.indptr.nbytes + index.patterns.member_offsets.nbytes) / 2**20}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="?")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--set", action="append", default=[], help="model config override key=value, e.g. generation=sample")
    p.add_argument("--retrieval", default="global")
    p.add_argument("--ablation", action="store_true")
    p.add_argument("--retrieval-scale", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.retrieval_scale:
        print(json.dumps(retrieval_scale(args.retrieval_scale, args.data), indent=1))
        return
    overrides = dict(item.split("=", 1) for item in args.set)
    result: dict[str, dict] = {}
    for retrieval in [args.retrieval] + (["none"] if args.ablation else []):
        runs = []
        for seed in args.seeds:
            runs.append(scores(args.data, retrieval, args.epochs, seed, overrides))
            print(json.dumps({"retrieval": retrieval, "seed": seed, **runs[-1]}), flush=True)
        result[retrieval] = {"seeds": args.seeds, "mean": {k: float(np.mean([r[k] for r in runs])) for k in runs[0]},
                             "sd": {k: float(np.std([r[k] for r in runs])) for k in runs[0]}, "runs": runs}
        print(json.dumps({retrieval: result[retrieval]["mean"]}), flush=True)
    print(json.dumps({"data": args.data, "epochs": args.epochs, "set": overrides, **result}, indent=1))


if __name__ == "__main__":
    main()
