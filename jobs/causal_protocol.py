"""Seed 003's protocol as one job: no-Δ vs Δ-augmentation vs Δ-pretraining (GRU, LSTM) and the
GLM with and without Δ, per task and look-back, over seeded train/test draws at several sample
sizes, with one-sided paired t-tests across draws.

    python jobs/estimate_delta.py --data DIR --name psm
    ray job submit --working-dir . -- python jobs/causal_protocol.py --data DIR --delta psm \\
        --sizes 250 1000 5000 --splits 5 --lookbacks 1 3

One Ray task per (sample size, draw) runs every fit of that draw in process (see
``mirror.causal.protocol`` for why). The MLflow parent run (``--run-name``) holds the results
table in the paper's shape (``results.json`` and ``results.md``: one row per task and look-back
per size, stars from the t-test), every fit (``trials.json``), the t-tests (``tests.json``),
the pretraining gain by sample size (``gain_by_size.json`` and metrics) and whether it grows as
the sample shrinks (``size_trend.json``: a one-sided Welch test, smallest against largest size);
one child run per draw holds that draw's numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from mirror.causal.protocol import ProtocolConfig

    d = ProtocolConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="dataset directory with a Δ column set")
    parser.add_argument("--delta", default=d.delta, help="Δ column set (jobs/estimate_delta.py --name)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(d.sizes), help="training patients per draw")
    parser.add_argument("--splits", type=int, nargs="+", default=list(d.splits),
                        help="seeded draws (t-test pairs): one count for every size, or one per size")
    parser.add_argument("--tasks", nargs="+", default=list(d.tasks))
    parser.add_argument("--lookbacks", type=int, nargs="+", default=list(d.lookbacks))
    parser.add_argument("--cells", nargs="+", default=list(d.cells))
    parser.add_argument("--modes", nargs="+", default=list(d.modes), help="RNN modes (none is always needed)")
    parser.add_argument("--no-glm", action="store_true", help="leave out the GLM rows")
    parser.add_argument("--pool-patients", type=int, default=d.pool_patients)
    parser.add_argument("--test-patients", type=int, default=d.test_patients)
    parser.add_argument("--hidden", type=int, default=d.hidden)
    parser.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per fit and stage")
    parser.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between early-stopping checks")
    parser.add_argument("--patience", type=int, default=d.patience, help="checks without a gain before stopping")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--run-name", default=None, help="MLflow parent run name")
    parser.add_argument("--out", help="also write the tables here (a directory); trials.json is rewritten after every draw")
    parser.add_argument("--tables-from", metavar="DIR",
                        help="no fits: rebuild the tables in DIR from its trials.json (e.g. the draws finished before "
                             "a run was stopped), with the grid given by the other flags")
    args = parser.parse_args(argv)

    try:
        config = ProtocolConfig(
            delta=args.delta, sizes=tuple(args.sizes), splits=tuple(args.splits), tasks=tuple(args.tasks),
            lookbacks=tuple(args.lookbacks), cells=tuple(args.cells), modes=tuple(args.modes), glm=not args.no_glm,
            pool_patients=args.pool_patients, test_patients=args.test_patients, hidden=args.hidden, steps=args.steps,
            eval_every=args.eval_every, patience=args.patience, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        )  # fmt: skip
        if not (Path(args.data) / "delta" / args.delta).is_dir():
            raise ValueError(f"--delta {args.delta}: {Path(args.data) / 'delta' / args.delta} does not exist; "
                             f"write it with jobs/estimate_delta.py --data {args.data} --name {args.delta}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.tables_from:
        trials = json.loads((Path(args.tables_from) / "trials.json").read_text())
        write_tables(trials, config, Path(args.tables_from))
        return 0
    run_protocol(args.data, config, args.run_name or f"causal-protocol-{time.strftime('%Y%m%d-%H%M%S')}", args.out)
    return 0


def summarise(trials: list[dict], config) -> tuple:
    """The results table (paired t-tests), the gain-by-size rows and the size trend of the fits
    ``trials``; draws are paired by their split index, so a partial set of draws gives a smaller
    t-test."""
    from mirror.causal.protocol import gain_by_size, results_table, size_trend

    table = results_table(trials, config)
    modes = [m for m in ("pretrain", "augment") if m in config.modes]
    trend = [row for m in modes for row in size_trend(trials, config, m)]
    return table, gain_by_size(table, "pretrain") + gain_by_size(table, "augment"), trend


def write_tables(trials: list[dict], config, out: Path, summary: tuple | None = None) -> tuple:
    """results/tests/gain_by_size/size_trend (json) and results.md from the fits ``trials`` into
    ``out`` (``summary``: their ``summarise`` if already computed)."""
    from mirror.causal.protocol import markdown, trend_markdown

    table, gains, trend = summary or summarise(trials, config)
    draws = sorted({(r["size"], r["split"]) for r in trials})
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(f"<!-- {len(trials)} fits from {len(draws)} draws (size, split): {draws} -->\n"
                                    + markdown(table) + trend_markdown(trend))
    for name, rows in (("results", table.rows), ("tests", table.tests), ("trials", trials), ("gain_by_size", gains),
                       ("size_trend", trend)):
        (out / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    return table, gains, trend


def run_protocol(data: str, config, run_name: str, out: str | None = None) -> dict:
    import ray

    from mirror import tracking
    from mirror.causal.protocol import load_pool, markdown, run_draw, trend_markdown
    from mirror.cluster import ensure_ray
    from mirror.data.schema import HELD_OUT, TRAIN

    ensure_ray()
    started = time.perf_counter()
    lookback = max(config.lookbacks)
    train_pool = load_pool(data, TRAIN, config.delta, config.pool_patients, lookback, config.window_weeks)
    test_pool = load_pool(data, HELD_OUT, config.delta, 2 * config.test_patients, lookback, config.window_weeks,
                          at_least=config.test_patients)
    parent = tracking.start_run(run_name, params={"data": data, **config.as_dict()}, tags={"job": "causal_protocol"})
    tracking.log_metrics(parent, {"pool/train_patients": train_pool.n_patients, "pool/train_examples": len(train_pool.patient),
                                  "pool/train_patients_read": train_pool.patients_read,
                                  "pool/test_patients": test_pool.n_patients, "pool/test_examples": len(test_pool.patient)})
    draw = ray.remote(num_cpus=1)(run_draw)
    train_ref, test_ref = ray.put(train_pool), ray.put(test_pool)
    # split-major: every size gets its first draws first, so a run stopped early (a shared box)
    # still holds paired draws at every size (--out keeps trials.json current; --tables-from)
    pending = {draw.remote(train_ref, test_ref, size, split, config): (size, split)
               for split in range(max(config.splits)) for size in config.sizes if split < config.draws_at(size)}
    trials: list[dict] = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        size, split = pending.pop(done[0])
        rows = ray.get(done[0])
        trials += rows
        child = tracking.start_run(f"{run_name}-n{size}-split{split}", params={"size": size, "split": split},
                                   tags={"job": "causal_protocol"}, parent_run_id=parent)
        tracking.log_metrics(child, {f"{r['cell']}/{r['mode']}/{r['task']}/lb{r['lookback']}/{k}": r[k]
                                     for r in rows for k in ("auroc", "auprc", "mse", "mean_mse") if k in r})
        tracking.end_run(child)
        print(f"draw n={size} split={split}: {len(rows)} fits, {sum(r['seconds'] for r in rows):.1f} s", flush=True)
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "trials.json.tmp").write_text(json.dumps(trials, indent=1) + "\n")
            (Path(out) / "trials.json.tmp").replace(Path(out) / "trials.json")
    table, gains, trend = summarise(trials, config)
    tracking.log_table(parent, table.rows, "results.json")
    tracking.log_table(parent, table.tests, "tests.json")
    tracking.log_table(parent, trials, "trials.json")
    tracking.log_table(parent, gains, "gain_by_size.json")
    tracking.log_table(parent, trend, "size_trend.json")
    metrics = {f"gain/{g['mode']}/{g['cell']}/n{g['size']}/mean_auroc": g["mean_auroc_gain"] for g in gains}
    metrics |= {f"gain/{g['mode']}/{g['cell']}/n{g['size']}/significant_wins": g["significant_wins"] for g in gains}
    metrics |= {f"trend/{r['mode']}/{r['cell']}/{k}": r[k] for r in trend for k in ("small_minus_large", "p")}
    metrics["protocol/seconds"] = time.perf_counter() - started
    metrics["protocol/fits"] = len(trials)
    tracking.log_metrics(parent, metrics)
    text = markdown(table) + trend_markdown(trend)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "results.md").write_text(text)
        tracking.log_artifact(parent, Path(tmp) / "results.md")
    tracking.end_run(parent)
    if out:
        write_tables(trials, config, Path(out), (table, gains, trend))
    print(text)
    print(json.dumps({"run_id": parent, "fits": len(trials), "seconds": round(metrics["protocol/seconds"], 1), "gain_by_size": gains, "size_trend": trend}, indent=1))
    return {"run_id": parent, "table": table, "trials": trials, "gains": gains}


if __name__ == "__main__":
    sys.exit(main())
