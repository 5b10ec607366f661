"""MiranDa's retrieval index (``views.admissions.RetrievalIndex``) at scale, against brute force.

    python bench/bench_retrieval.py --data /tmp/miranda2-data/sim200k [--admissions 1000000 --queries 200000]

The index's admissions are drawn (with replacement) from the training admissions of a
simulated dataset, so procedure-set blocks, ages, stays and regimens follow the simulator's
distribution at any size; every drawn admission gets its own subject id. Queries are the
held-out admissions of the same dataset (other patients, as in training).

* build: ``RetrievalIndex.build`` wall time and its peak traced allocation (tracemalloc sees
  numpy's buffers), and the index's resident bytes per admission;
* query: candidates per second in batches of 8,192 (a read task's batch), peak allocation,
  after one warm-up pass (held-out admissions drawn with replacement up to ``--queries``);
* brute force, in the same run: one pass over all N admissions per query (same block, age
  window, not the same patient, the ``pool_size`` nearest in age): queries per second on a
  subset, the ratio, and the agreement of the candidate counts (index = min(pool, brute));
* the fallbacks' rates at this N: age alone, and the nearest procedure set (Jaccard);
* the 100M sizing: bytes x 1e8, build time scaled by N log N, queries at the measured rate.

Writes ``bench/results/retrieval.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mirror.data import schema
from mirror.data.views.admissions import (
    _AGE_SPAN,
    READ_COLUMNS,
    RetrievalIndex,
    block_admissions,
    build_index,
    pack_regimen,
)

QUERY_BATCH = 8_192


def traced(fn):
    """(result, wall seconds, peak traced bytes) of ``fn()``."""
    tracemalloc.start()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, seconds, peak


def held_out_queries(root: Path, n_labs: int, n_procedures: int, min_age: float) -> tuple[np.ndarray, ...]:
    keys, ages, subjects, sets = [], [], [], []
    for file in schema.split_files(root, schema.HELD_OUT):
        for batch in pq.ParquetFile(file).iter_batches(columns=READ_COLUMNS, batch_size=8192):
            adm = block_admissions(pa.Table.from_batches([batch]), n_labs)
            adult = adm.age >= min_age
            keys.append(adm.procedure_key[adult])
            ages.append(adm.age[adult])
            subjects.append(adm.subject[adult])
            proc_adm, proc = adm.sets["procedures"]
            sets.append(pack_regimen(proc_adm, proc, len(adm.owner), n_procedures)[adult])
    return np.concatenate(keys), np.concatenate(ages), np.concatenate(subjects), np.concatenate(sets)


def brute_force_counts(index_inputs: dict[str, np.ndarray], key: np.ndarray, age: np.ndarray, subject: np.ndarray,
                       pool_size: int, age_window: float) -> np.ndarray:
    """Candidates per query by scanning every admission (the baseline)."""
    k, a, s = index_inputs["key"], index_inputs["age"], index_inputs["subject"]
    counts = np.zeros(len(key), np.int64)
    for i in range(len(key)):
        hit = np.flatnonzero((k == key[i]) & (np.abs(a - age[i]) <= age_window) & (s != subject[i]))
        if len(hit) > pool_size:  # the pool_size nearest in age, as the index keeps
            hit = hit[np.argpartition(np.abs(a[hit] - age[i]), pool_size - 1)[:pool_size]]
        counts[i] = len(hit)
    return counts


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="simulated dataset whose admissions are resampled")
    parser.add_argument("--admissions", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200_000, help="held-out admissions drawn with replacement")
    parser.add_argument("--brute-queries", type=int, default=200)
    parser.add_argument("--pool-size", type=int, default=64)
    parser.add_argument("--age-window", type=float, default=5.0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "retrieval.json"))
    args = parser.parse_args(argv)
    root = Path(args.data)
    meta = schema.DatasetMetadata.read(root)
    n_labels, n_labs, min_age = meta.vocab["medication"], meta.vocab["lab"], 18.0
    n_procedures = meta.vocab["procedure"]

    source, counts = build_index(root, n_labels, n_labs, min_age, n_procedures)
    rng = np.random.default_rng(0)
    draw = rng.integers(0, source.size, args.admissions)
    block = (source.sort_key // _AGE_SPAN).astype(np.int64)
    inputs = {"key": source.block_keys[block][draw], "age": source.age[draw],
              "subject": np.arange(args.admissions, dtype=np.int64) + 10**12,
              "los": source.los[draw], "regimen": source.regimen[draw]}
    index, build_s, build_peak = traced(lambda: RetrievalIndex.build(
        inputs["key"], inputs["age"], inputs["subject"], inputs["los"], inputs["regimen"], n_labels,
        source.block_keys, source.block_sets))

    held_key, held_age, held_subject, held_sets = held_out_queries(root, n_labs, n_procedures, min_age)
    pick = rng.integers(0, len(held_key), args.queries)
    q_key, q_age, q_subject, q_sets = held_key[pick], held_age[pick], held_subject[pick], held_sets[pick]

    def query_all(fallback: bool, nearest: bool = False) -> tuple[np.ndarray, np.ndarray]:
        valid_n, fell = [], []
        for lo in range(0, len(q_key), QUERY_BATCH):
            sl = slice(lo, lo + QUERY_BATCH)
            _, valid, fell_back = index.query(q_key[sl], q_age[sl], q_subject[sl], args.pool_size, args.age_window,
                                              fallback, q_sets[sl] if nearest else None)
            valid_n.append(valid.sum(1))
            fell.append(fell_back)
        return np.concatenate(valid_n), np.concatenate(fell)

    query_all(True)  # warm: the first pass pays page faults of the index's arrays
    (exact_n, _), query_s, query_peak = traced(lambda: query_all(False))
    (_, fell), fallback_s, _ = traced(lambda: query_all(True))
    (near_n, fell_near), nearest_s, _ = traced(lambda: query_all(False, nearest=True))
    sub = rng.choice(len(q_key), min(args.brute_queries, len(q_key)), replace=False)
    start = time.perf_counter()
    brute_n = brute_force_counts(inputs, q_key[sub], q_age[sub], q_subject[sub], args.pool_size, args.age_window)
    brute_s = time.perf_counter() - start

    index_qps = len(q_key) / query_s
    brute_qps = len(sub) / brute_s
    per_admission = index.nbytes / index.size
    result = {
        "source": {"data": str(root), "training_admissions": int(source.size), "blocks": int(counts["blocks"])},
        "admissions": int(index.size), "blocks": int(len(index.block_keys)), "queries": int(len(q_key)), "distinct_held_out_queries": int(len(held_key)),
        "pool_size": args.pool_size, "age_window": args.age_window,
        "build": {"wall_s": round(build_s, 3), "admissions_per_s": round(index.size / build_s),
                  "peak_traced_mib": round(build_peak / 2**20, 1), "index_mib": round(index.nbytes / 2**20, 1),
                  "bytes_per_admission": round(per_admission, 1)},
        "query": {"queries_per_s": round(index_qps), "peak_traced_mib_per_batch_of_8192": round(query_peak / 2**20, 1),
                  "with_fallback_queries_per_s": round(len(q_key) / fallback_s),
                  "empty_without_fallback": round(float((exact_n == 0).mean()), 4),
                  "fell_back_to_age": round(float(fell.mean()), 4),
                  "nearest_set_queries_per_s": round(len(q_key) / nearest_s),
                  "fell_back_to_nearest_set": round(float(fell_near.mean()), 4),
                  "empty_after_nearest_set": round(float((near_n == 0).mean()), 4),
                  "mean_candidates": {"exact": round(float(exact_n.mean()), 1), "nearest": round(float(near_n.mean()), 1)}},
        "brute_force": {"queries": int(len(sub)), "queries_per_s": round(brute_qps, 1),
                        "index_speedup": round(index_qps / brute_qps),
                        "count_agreement": float((exact_n[sub] == brute_n).mean())},
        "sizing_100m": {"index_gib": round(per_admission * 1e8 / 2**30, 2),
                        "build_s_scaled_nlogn": round(build_s * (1e8 * np.log(1e8)) / (index.size * np.log(index.size))),
                        "query_s_per_100m_queries_one_core": round(1e8 / index_qps)},
        "load_average": os.getloadavg(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
