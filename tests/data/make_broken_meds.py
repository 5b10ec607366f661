"""Write ``tests/data/broken_meds/``: one tiny MEDS dataset per refusal of the importer.

    .venv/bin/python tests/data/make_broken_meds.py [OUT_DIR]

Every ``broken_meds/<case>/`` is the same valid base (three subjects, one shard per split)
with one breakage: ``missing_column`` (no ``code``), ``wrong_dtype`` (``time`` in ns),
``null_code`` (row 3), ``time_order`` (subject 2's discharge goes back in time at row 9) and ``two_splits``
(subject 3 listed twice in ``subject_splits.parquet``). ``tests/test_import_meds.py`` expects
each refusal to name the file, the row and the rule. Deterministic.
"""

from __future__ import annotations

import json
import shutil
import sys
from datetime import datetime
from pathlib import Path

import meds
import pyarrow as pa
import pyarrow.parquet as pq

OUT_DIR = Path(__file__).parent / "broken_meds"


def base_rows() -> list[dict]:
    """Subjects 1 and 2 (train), 3 (held_out): sex, birth, an admission with a diagnosis."""
    rows = []
    for sid in (1, 2, 3):
        rows += [
            {"subject_id": sid, "time": None, "code": "GENDER//F"},
            {"subject_id": sid, "time": datetime(1960, 1, 1), "code": "MEDS_BIRTH"},
            {"subject_id": sid, "time": datetime(2020, 3, 1, 8), "code": "HOSPITAL_ADMISSION//EW EMER."},
            {"subject_id": sid, "time": datetime(2020, 3, 4, 12), "code": "DIAGNOSIS//ICD//10//E119"},
            {"subject_id": sid, "time": datetime(2020, 3, 4, 12), "code": "HOSPITAL_DISCHARGE//HOME"},
        ]
    return rows


def write(root: Path, rows: list[dict], splits: list[tuple[int, str]], schema: pa.Schema | None = None) -> None:
    schema = schema or pa.schema([("subject_id", pa.int64()), ("time", pa.timestamp("us")), ("code", pa.string()),
                                  ("numeric_value", pa.float32())])
    for split in sorted({s for _, s in splits}):
        ids = {i for i, s in splits if s == split}
        part = [{k: r.get(k) for k in schema.names} for r in rows if r["subject_id"] in ids]
        path = root / "data" / split / "0.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(part, schema=schema), path)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([{"subject_id": i, "split": s} for i, s in splits],
                                        schema=meds.SubjectSplitSchema.schema()),
                   root / meds.subject_splits_filepath)
    (root / meds.dataset_metadata_filepath).write_text(json.dumps({"dataset_name": root.name}))


SPLITS = [(1, "train"), (2, "train"), (3, "held_out")]


def main(out: Path = OUT_DIR) -> None:
    shutil.rmtree(out, ignore_errors=True)
    write(out / "missing_column", base_rows(), SPLITS,
          pa.schema([("subject_id", pa.int64()), ("time", pa.timestamp("us")), ("numeric_value", pa.float32())]))
    write(out / "wrong_dtype", base_rows(), SPLITS,
          pa.schema([("subject_id", pa.int64()), ("time", pa.timestamp("ns")), ("code", pa.string())]))
    rows = base_rows()
    rows[3]["code"] = None  # subject 1's diagnosis: train/0.parquet row 3
    write(out / "null_code", rows, SPLITS)
    rows = base_rows()
    rows[9]["time"] = datetime(2019, 1, 1)  # subject 2's discharge goes back: train row 9
    write(out / "time_order", rows, SPLITS)
    write(out / "two_splits", base_rows(), SPLITS + [(3, "tuning")])


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR)
