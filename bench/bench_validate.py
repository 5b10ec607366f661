"""``check_table`` cost per batch on the training hot path: readers validate every batch.

    PYTHONPATH=platform .venv/bin/python bench/bench_validate.py [--rows 65536] [--repeats 5]

Times ``mirror.data.validate.check_table`` on one fabricated batch of ``--rows`` valid patients
(``tests/data/full_records.py``): diagnosis-only rows (every other modality empty), whole
records (procedures, medications, labs, admissions with stays), and the columns a diagnosis
view reads of whole records (``validate.columns_to_read``). Prints the best CPU time (process
time, since the machine is shared and load only adds time) of ``--repeats`` runs, in ms per
batch and patients per second.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import pyarrow as pa

from mirror.data import schema as S
from mirror.data import validate as V

_spec = importlib.util.spec_from_file_location(
    "full_records", Path(__file__).resolve().parents[1] / "tests" / "data" / "full_records.py"
)
full_records = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(full_records)


def best_seconds(table: pa.Table, repeats: int, **kwargs) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        found = V.check_table(table, n_weeks=520, file="bench.parquet", split=None, **kwargs)
        times.append(time.process_time() - t0)
        assert not found, found[:3]
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=65_536)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    full = full_records.full_record_table(args.rows, seed=0)
    projected = V.columns_to_read(S.MODEL_COLUMNS)
    cases = {"diagnosis-only rows": (full_records.diagnosis_only(full), {}),
             "whole-record rows": (full, {}),
             "whole records, diagnosis view": (full.select(projected), {"columns": projected})}
    events = {name: len(full[name].combine_chunks().values) for name in
              (S.CONDITIONS, S.PROCEDURES, S.MEDICATIONS, S.LABS, S.ADMIT_DAYS)}
    print(f"{args.rows} patients; items per modality: {events}")
    for name, (table, kwargs) in cases.items():
        s = best_seconds(table, args.repeats, **kwargs)
        print(f"{name:<32} {s * 1e3:8.1f} ms/batch  {args.rows / s / 1e6:6.2f} M patients/s")


if __name__ == "__main__":
    main()
