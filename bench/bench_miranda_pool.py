"""How well MiranDa's retrieved ELOS separates regimens, by candidate pool size.

    python bench/bench_miranda_pool.py --data /tmp/miranda2-data/sim200k --pools 64 1024

For held-out adult admissions with a given regimen (the first ``--files`` held-out shards),
the candidates of the training-split index (same procedure set, age ± 5 y, other patients;
age fallback), and the ELOS (mean LOS of the top-K = 50 candidates with cosine > 0, as
``models.miranda.retrieved_elos``) of three regimens: the one given, the floor's (the two most
frequent classes) and two random classes; beside the mean LOS of all valid candidates. With
``view.pool_size`` (64) below the block size, top-K keeps most of the pool and ELOS barely
depends on the regimen; the simulator's true stays of the given and floor regimens differ by
~0.7 days (``results/miranda_acceptance.json``). Writes ``results/miranda_pool.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mirror.data import schema
from mirror.data.views.admissions import READ_COLUMNS, block_admissions, build_index, pack_regimen

TOP_K = 50


def top_k_elos(candidates: np.ndarray, los: np.ndarray, valid: np.ndarray, regimen: np.ndarray) -> np.ndarray:
    """(Q,) mean LOS of the top-K valid candidates by cosine (> 0) to ``regimen`` (Q, L); NaN if none."""
    r = regimen.astype(np.float32)
    cos = (candidates @ r[:, :, None])[..., 0] / (np.linalg.norm(candidates, axis=2) * np.linalg.norm(r, axis=1)[:, None] + 1e-8)
    ok = valid & (cos > 0)
    top = np.argsort(-np.where(ok, cos, -np.inf), axis=1, kind="stable")[:, :TOP_K]
    chosen = np.take_along_axis(ok, top, 1)
    total = (np.take_along_axis(los, top, 1) * chosen).sum(1)
    return np.where(chosen.any(1), total / np.maximum(chosen.sum(1), 1), np.nan)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--pools", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--files", type=int, default=4, help="held-out shards to query")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "miranda_pool.json"))
    args = parser.parse_args(argv)
    meta = schema.DatasetMetadata.read(args.data)
    n_labels = meta.vocab["medication"]
    index, _ = build_index(args.data, n_labels, meta.vocab["lab"], 18.0)
    frequency = np.unpackbits(index.regimen, axis=1, count=n_labels).mean(0)
    floor = np.zeros(n_labels, bool)
    floor[np.argsort(-frequency)[:2]] = True
    rng = np.random.default_rng(0)
    acc: dict[int, dict[str, list[np.ndarray]]] = {p: {} for p in args.pools}
    for file in schema.split_files(args.data, schema.HELD_OUT)[: args.files]:
        adm = block_admissions(pq.read_table(file, columns=READ_COLUMNS), meta.vocab["lab"])
        a, c = adm.sets["medications"]
        given = np.unpackbits(pack_regimen(a, c, len(adm.owner), n_labels), axis=1, count=n_labels).astype(bool)
        keep = (adm.age >= 18) & given.any(1)
        given = given[keep]
        random = np.zeros_like(given)
        random[np.arange(len(random))[:, None], rng.integers(0, n_labels, (len(random), 2))] = True
        regimens = {"given": given, "floor": np.broadcast_to(floor, given.shape), "random": random}
        for pool in args.pools:
            pos, valid, _ = index.query(adm.procedure_key[keep], adm.age[keep], adm.subject[keep], pool, 5.0, True)
            los = index.los[pos]
            candidates = np.unpackbits(index.regimen[pos], axis=2, count=n_labels).astype(np.float32)
            d = acc[pool]
            d.setdefault("valid_candidates", []).append(valid.sum(1).astype(float))
            d.setdefault("elos/all_valid", []).append(
                np.where(valid.any(1), (los * valid).sum(1) / np.maximum(valid.sum(1), 1), np.nan))
            for name, regimen in regimens.items():
                d.setdefault(f"elos/{name}", []).append(top_k_elos(candidates, los, valid, regimen))
    result: dict = {"data": args.data, "top_k": TOP_K, "pools": {}}
    for pool, d in acc.items():
        cat = {k: np.concatenate(v) for k, v in d.items()}
        n = cat["valid_candidates"]
        result["pools"][str(pool)] = {"queries": int(len(n)), "valid_mean": float(n.mean()), "valid_median": float(np.median(n)),
                                      "share_over_k": float(np.mean(n > TOP_K)),
                                      **{k: float(np.nanmean(v)) for k, v in cat.items() if k.startswith("elos/")}}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["pools"], indent=2))
    return result


if __name__ == "__main__":
    main()
