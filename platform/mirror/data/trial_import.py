"""Import clinical-trial visit data (PyTrial's ``trial_patient_sequence`` layout) as a
trial-only mirror dataset: empty ``data/`` splits, the participants in ``trial/<split>/``.

    import_trial("/data/pytrial-demo", "/data/trial")        # jobs/import_trial.py SRC_DIR OUT

Source (``SRC_DIR`` or its ``trial_patient_sequence/`` folder)::

    visits.json.gz (or visits.json)  {"order": [treatment, medication, adverse_event,
                                     ae_serious, visit_stage, timestamp], "visits": [[visit, ...]
                                     per participant]}, a visit holding one entry per ``order``
                                     item: token indices into voc.json, or a number (timestamp:
                                     days since the participant's start)
    voc.json                         per token field, the index -> token list ([PAD] at 0)
    feature.csv                      optional: one baseline row per participant, same order

How each part of ``TRIAL_SCHEMA`` is filled (choices where the source leaves room):

* **Ids and splits.** Participant ``i`` (position in ``visits``) gets ``TRIAL_ID_OFFSET + i``
  and the split ``splits.split_codes`` gives that index, as simulated trials do (the source has
  no splits). ``TrialImportConfig.held_out_share`` widens the held-out set (5 % by default; a
  trial of a thousand participants then holds out ~50, too few for a utility AUROC); the split
  is then recorded as the import's own (``provenance["splits"] == "source"``), since the id
  rule alone no longer re-derives it. ``feature.csv`` rows are matched by position; a
  different row count is refused.
* **Visits.** ``visit_days`` are the timestamps (whole days, fractions floored and counted);
  visits are sorted by day, and visits on the same day as another of the participant's are
  merged into one (the union of their items; the platform's visit is a day), counted as
  ``merged_same_day``. Visits before day 0 or without a finite day are dropped, counted by
  reason. ``enroll_day`` is 0 (the source counts days from each participant's start, mapped to
  the dataset's ``origin_date``); ``end_day`` is the last visit day (no later follow-up known).
* **Vocabularies.** Each token field's vocabulary is voc.json's list without ``[PAD]`` (and,
  for ``ae_serious``, without ``NO``), ids in source order; ``[PAD]`` items mean "none" and are
  counted, not placed. Items within a visit are sorted and de-duplicated (repeats counted).
  Adverse events are ``severe`` when the source lists them among ``ae_serious`` tokens.
* **Severe outcome** (TWIN's "death and other severe adverse events"). A participant with any
  serious-AE token (other than ``NO``) at any visit, or a nonzero value in one of
  ``TrialImportConfig.severe_columns`` of ``feature.csv`` (``death``); how many participants
  each reason marks is counted in ``trial["severe_reasons"]``. A severe column the source lacks
  (or no ``feature.csv``) is listed there as absent; a value that is not a number is refused
  with its row.
* **Arms** (the source records the drugs given, not the randomised arm). Each participant's
  *first regimen* is the set of treatments at the first visit that has any. The two most
  frequent first regimens are the arms: arm 1 the one with more drugs (ties: by token order),
  arm 0 the other; the *marker* is arm 1's drugs absent from arm 0's. A participant is in arm 1
  when the first regimen holds every marker drug, else arm 0 (``TrialImportConfig.arm_marker``
  overrides the marker). Participants whose first regimen is neither arm's, and participants
  never treated (arm 0 by the rule), are counted in ``trial["arm_derivation"]``.
* **Baseline.** Every ``feature.csv`` column except the id and the outcome columns (``death``
  and ``num relapse`` happen after randomisation: they would leak the outcome) becomes float32
  features: numeric columns as they are (a censored value such as ``>= 125`` becomes its bound,
  counted); text columns one-hot (``RACE=Caucasian``); list columns (``['a' 'b']``) multi-hot.
  Missing numbers take the column median, missing categories all zeros; both are counted.

Every count (tokens read, pad, repeats, visits merged or dropped, imputed and censored
baseline values, arm derivation) is in ``dataset.json``'s ``trial`` dict and the job summary.
The source is one JSON document, read whole (trials hold thousands of participants, not
millions); everything after parsing runs on flat numpy arrays, never per participant.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mirror.data import schema as S
from mirror.data import vocabularies as V
from mirror.data.meds_import import check_output
from mirror.data.ownership import replace_directory
from mirror.data.splits import SPLIT_CODES, split_codes
from mirror.data.vocab import DIAG_AGE_VOCAB_SIZE, WeekVocab

IMPORTER = "mirror.import_trial"
IMPORTER_VERSION = "1.0"
COMPRESSION = "zstd"
SEQUENCE_DIR = "trial_patient_sequence"
PAD, NOT_SERIOUS = "[PAD]", "NO"
# Token fields of ``order`` -> the platform vocabulary they fill (ae_serious marks severity).
TOKEN_FIELDS = {"treatment": S.TRIAL_TREATMENT, "medication": S.TRIAL_MEDICATION,
                "adverse_event": S.ADVERSE_EVENT}
SERIOUS_FIELD, DAY_FIELD = "ae_serious", "timestamp"
_CODE_PREFIX = {S.TRIAL_TREATMENT: "TX:", S.TRIAL_MEDICATION: "", S.ADVERSE_EVENT: "AE:"}
_NUMBER = re.compile(r"^\s*(?P<op><=|>=|<|>)?\s*(?P<num>[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)\s*$")
_LIST = re.compile(r"^\s*\[.*\]\s*$")


class TrialImportError(ValueError):
    """The trial source cannot be imported as is: the message names the file, the participant
    and visit where one applies, and the rule (``missing``, ``shape``, ``token_range``,
    ``rows``, ``severe_value``, ``range``)."""


@dataclass
class TrialImportConfig:
    """Choices the source leaves open (module docstring)."""

    origin_date: str = "2000-01-01"  # calendar day of every participant's day 0
    id_column: str = "RUSUBJID"  # feature.csv's participant id (not a feature)
    outcome_columns: list[str] = field(default_factory=lambda: ["death", "num relapse"])
    arm_marker: list[str] | None = None  # treatment tokens that make arm 1; None: derived
    severe_columns: list[str] = field(default_factory=lambda: ["death"])  # nonzero: severe outcome
    held_out_share: float = 0.05  # of participants (splits.split_codes); tuning stays 5 %


@dataclass
class TrialImportReport:
    source: str
    out: str
    participants: dict[str, int]
    visits: dict[str, int]
    vocabulary_sizes: dict[str, int]
    seconds: float
    trial: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Field:
    """One token field, flattened: per item its visit (source visit order) and platform id."""

    vocabulary: list[str]  # platform id -> source token
    visit: np.ndarray  # int64 per placed item
    ids: np.ndarray  # int64 per placed item
    counts: dict[str, int]


def _source_files(src: Path) -> tuple[Path, Path, Path | None]:
    base = src / SEQUENCE_DIR if (src / SEQUENCE_DIR).is_dir() else src
    visits = next((p for p in (base / "visits.json.gz", base / "visits.json") if p.is_file()), None)
    voc = base / "voc.json"
    if visits is None or not voc.is_file():
        raise TrialImportError(f"{base}: missing: expected visits.json.gz (or visits.json) and voc.json "
                               f"(PyTrial's {SEQUENCE_DIR} layout)")
    features = base / "feature.csv"
    return visits, voc, features if features.is_file() else None


def _load_json(path: Path) -> Any:
    try:
        with (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TrialImportError(f"{path}: shape: not readable JSON ({err})") from None


def _where(file: Path, first_visit: np.ndarray, visit: int) -> str:
    """``file participant P visit V`` for a flat visit index."""
    p = int(np.searchsorted(first_visit, visit, side="right") - 1)
    return f"{file.name} participant {p} visit {visit - int(first_visit[p])}"


def _flatten(visits_file: Path, raw: Any, voc: dict) -> tuple[list[str], np.ndarray, list[list]]:
    """``order``, visits per participant and the flat list of visits, with shapes checked."""
    if not isinstance(raw, dict) or not isinstance(raw.get("order"), list) \
            or not isinstance(raw.get("visits"), list):
        raise TrialImportError(f"{visits_file}: shape: expected a JSON object with lists 'order' and 'visits'")
    order = raw["order"]
    if missing := [f for f in (*TOKEN_FIELDS, DAY_FIELD) if f not in order]:
        raise TrialImportError(f"{visits_file}: shape: 'order' {order} lacks {missing}")
    if missing := [f for f in (*TOKEN_FIELDS, SERIOUS_FIELD) if f in order and f not in voc]:
        raise TrialImportError(f"voc.json: missing: no vocabulary for {missing}")
    participants = raw["visits"]
    if not all(isinstance(p, list) for p in participants):
        bad = next(i for i, p in enumerate(participants) if not isinstance(p, list))
        raise TrialImportError(f"{visits_file.name} participant {bad}: shape: expected a list of visits")
    n_visits = np.fromiter(map(len, participants), np.int64, len(participants))
    flat = list(chain.from_iterable(participants))
    widths = np.fromiter((len(v) if isinstance(v, list) else -1 for v in flat), np.int64, len(flat))
    if (bad := np.flatnonzero(widths != len(order))).size:
        first = np.concatenate([[0], np.cumsum(n_visits)[:-1]])
        raise TrialImportError(f"{_where(visits_file, first, int(bad[0]))}: shape: expected a list of "
                               f"{len(order)} entries (one per 'order' item {order})")
    return order, n_visits, flat


def _token_field(name: str, column: int, flat: list[list], vocabulary: list, visits_file: Path,
                 first_visit: np.ndarray, specials: tuple[str, ...]) -> _Field:
    """Items of one token field as (visit, platform id), specials removed and counted."""
    try:
        lengths = np.fromiter((len(v[column]) for v in flat), np.int64, len(flat))
        tokens = np.fromiter(chain.from_iterable(v[column] for v in flat), np.int64, int(lengths.sum()))
    except (TypeError, ValueError):
        bad = next(i for i, v in enumerate(flat) if not isinstance(v[column], list)
                   or not all(isinstance(t, int) and not isinstance(t, bool) for t in v[column]))
        raise TrialImportError(f"{_where(visits_file, first_visit, bad)}: shape: {name} must be a list of "
                               f"token indices, got {flat[bad][column]!r}") from None
    visit = np.repeat(np.arange(len(flat)), lengths)
    if (bad := np.flatnonzero((tokens < 0) | (tokens >= len(vocabulary)))).size:
        k = int(bad[0])
        raise TrialImportError(f"{_where(visits_file, first_visit, int(visit[k]))}: token_range: {name} token "
                               f"{tokens[k]} outside voc.json's {name} list [0, {len(vocabulary)})")
    special = np.isin(np.asarray(vocabulary, dtype=object), specials)
    new_id = np.cumsum(~special) - 1
    keep = ~special[tokens]
    counts = {"items_read": int(tokens.size)}
    counts |= {f"{s}_items": int((np.asarray(vocabulary, dtype=object)[tokens] == s).sum()) for s in specials
               if s in vocabulary}
    return _Field([str(t) for t, s in zip(vocabulary, special, strict=True) if not s],
                  visit[keep], new_id[tokens[keep]].astype(np.int64), counts)


def _read_features(path: Path | None) -> pd.DataFrame | None:
    """feature.csv as text columns (read once: the baseline and the severe columns share it)."""
    return None if path is None else pd.read_csv(path, dtype=str, keep_default_na=True)


def _severe_from_features(path: Path | None, frame: pd.DataFrame | None,
                          cfg: TrialImportConfig) -> tuple[dict[str, np.ndarray], list[str]]:
    """Per ``severe_columns`` column, the participants it marks severe (nonzero), and the
    columns the source does not have (no feature.csv, or not among its columns)."""
    if not cfg.severe_columns or frame is None:
        return {}, list(cfg.severe_columns)
    out = {}
    for column in cfg.severe_columns:
        if column not in frame.columns:
            continue
        values = pd.to_numeric(frame[column].str.strip(), errors="coerce")
        if (bad := np.flatnonzero(values.isna().to_numpy())).size:
            raise TrialImportError(f"{path} row {int(bad[0]) + 2}: severe_value: severe column {column!r} holds "
                                   f"{frame[column].iloc[bad[0]]!r}, not a number ({bad.size} such rows)")
        out[column] = values.to_numpy() != 0
    return out, [c for c in cfg.severe_columns if c not in out]


def _baseline(path: Path | None, frame: pd.DataFrame | None, n: int,
              cfg: TrialImportConfig) -> tuple[np.ndarray, list[str], dict]:
    """(n, width) float32 baseline matrix, its feature names, and what was imputed."""
    if frame is None:
        return np.zeros((n, 0), np.float32), [], {"source": None}
    if len(frame) != n:
        raise TrialImportError(f"{path}: rows: {len(frame)} baseline rows, but the visits file has {n} "
                               "participants; rows are matched by position")
    excluded = [c for c in (cfg.id_column, *cfg.outcome_columns) if c in frame.columns]
    blocks, names = [], []
    info: dict[str, Any] = {"source": path.name, "excluded_columns": excluded, "kinds": {},
                            "imputed_median": {}, "censored_at_bound": {}, "missing_category": {},
                            "outcomes": {c: {str(k): int(v) for k, v in frame[c].value_counts(dropna=False).items()}
                                         for c in cfg.outcome_columns if c in frame.columns}}
    for column in frame.columns:
        if column in excluded:
            continue
        values = frame[column].str.strip()
        present = values.notna() & (values != "")
        parsed = values[present].str.extract(_NUMBER)
        if present.any() and parsed["num"].notna().all():
            number = pd.Series(np.nan, index=frame.index)
            number[present] = parsed["num"].astype(float)
            if (censored := int(parsed["op"].notna().sum())):
                info["censored_at_bound"][column] = censored
            if (missing := int((~present).sum())):
                info["imputed_median"][column] = missing
                number = number.fillna(number.median())
            blocks.append(number.to_numpy(np.float32)[:, None])
            names.append(column)
            info["kinds"][column] = "numeric"
            continue
        if present.any() and values[present].str.match(_LIST).all():
            dummies = values.where(present).str.findall(r"'([^']*)'").explode().str.get_dummies()
            dummies = dummies.groupby(level=0).max().reindex(frame.index, fill_value=0)
            info["kinds"][column] = "multi-hot"
        else:
            dummies = pd.get_dummies(values.where(present), dtype=np.int8)
            info["kinds"][column] = "one-hot"
        dummies = dummies[sorted(dummies.columns)]
        if (missing := int((~present).sum())):
            info["missing_category"][column] = missing
        blocks.append(dummies.to_numpy(np.float32))
        names += [f"{column}={c}" for c in dummies.columns]
    matrix = np.hstack(blocks) if blocks else np.zeros((n, 0), np.float32)
    if len(set(names)) != len(names):
        dupes = sorted(k for k, v in Counter(names).items() if v > 1)
        raise TrialImportError(f"{path}: shape: baseline feature names repeat: {dupes}")
    return matrix, names, info


def _arms(treat: _Field, n_visits_per_participant: np.ndarray, visit_participant: np.ndarray,
          cfg: TrialImportConfig) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """Arm per participant from the first regimen (module docstring), arm names, derivation."""
    n = n_visits_per_participant.size
    n_tx = len(treat.vocabulary)
    if n_tx > 62 and cfg.arm_marker is None:
        raise TrialImportError(f"{n_tx} treatment tokens: deriving arms needs at most 62; pass arm_marker")
    bits = np.zeros(visit_participant.size, np.int64)
    np.bitwise_or.at(bits, treat.visit, np.left_shift(np.int64(1), treat.ids % 63))
    treated = np.flatnonzero(bits)
    owner, first = np.unique(visit_participant[treated], return_index=True)
    regimen = np.zeros(n, np.int64)  # 0: never treated
    regimen[owner] = bits[treated[first]]
    names = treat.vocabulary

    def label(mask: int) -> str:
        return "+".join(names[i] for i in range(n_tx) if mask >> i & 1)

    kinds, freq = np.unique(regimen[regimen != 0], return_counts=True)
    top = [int(k) for k in kinds[np.lexsort((kinds, -freq))][:2]]
    if cfg.arm_marker is not None:
        unknown = sorted(set(cfg.arm_marker) - set(names))
        if unknown or not cfg.arm_marker:
            raise TrialImportError(f"arm_marker {cfg.arm_marker}: expected treatment tokens from {names}")
        marker = sum(1 << names.index(t) for t in cfg.arm_marker)
        arm_regimens = [None, None]
    else:
        if len(top) < 2:
            raise TrialImportError(f"arms: the source's first regimens are {[label(k) for k in top]}; two "
                                   "arms need two distinct ones (pass arm_marker)")
        r0, r1 = sorted(top, key=lambda m: (bin(m).count("1"), -m))
        marker = r1 & ~r0
        arm_regimens = [label(r0), label(r1)]
    arm = ((regimen & marker) == marker) & (regimen != 0)
    names_out = arm_regimens if arm_regimens[0] else [f"without {label(marker)}", f"with {label(marker)}"]
    derivation = {
        "rule": "arm 1 when the first regimen (treatments at the first treated visit) holds every "
                "marker treatment, else arm 0",
        "marker": label(marker).split("+"),
        "first_regimens": {label(int(k)): int(c) for k, c in zip(kinds, freq, strict=True)},
        "never_treated_arm_0": int((regimen == 0).sum()),
        "first_regimen_not_an_arm": int(np.isin(regimen, top, invert=True).sum() - (regimen == 0).sum())
        if arm_regimens[0] else None,
    }
    return arm.astype(np.int8), names_out, derivation


def _nested(items: _Field, n_visits: int, visit_offsets: np.ndarray) -> pa.ListArray:
    """list<list<int16>>: per participant, per (merged) visit, sorted unique ids."""
    order = np.lexsort((items.ids, items.visit))
    visit, ids = items.visit[order], items.ids[order]
    repeat = np.zeros(ids.size, bool)
    repeat[1:] = (visit[1:] == visit[:-1]) & (ids[1:] == ids[:-1])
    items.counts["repeats_in_visit"] = int(repeat.sum())
    visit, ids = visit[~repeat], ids[~repeat]
    items.counts["placed"] = int(ids.size)
    inner = np.concatenate([[0], np.cumsum(np.bincount(visit, minlength=n_visits))]).astype(np.int32)
    per_visit = pa.ListArray.from_arrays(pa.array(inner), pa.array(ids.astype(np.int16)))
    return pa.ListArray.from_arrays(pa.array(visit_offsets.astype(np.int32)), per_visit)


def _codes(fields: dict[str, _Field], severe: np.ndarray) -> pa.Table:
    """codes.parquet: the record's vocabularies, then the source's trial vocabularies."""
    rows = []
    for vocabulary, f in ((v, fields[k]) for k, v in TOKEN_FIELDS.items()):
        for i, token in enumerate(f.vocabulary):
            rows.append({"modality": vocabulary, "id": i, "code": f"{_CODE_PREFIX[vocabulary]}{token}",
                         "name": token, "parent_code": None, "unit": None,
                         "severe": bool(severe[i]) if vocabulary == S.ADVERSE_EVENT else None})
    return pa.concat_tables([V.codes_table(trial=False), pa.Table.from_pylist(rows, schema=S.CODES_SCHEMA)])


def import_trial(source: str | Path, out: str | Path, *, config: TrialImportConfig | None = None,
                 overwrite: bool = False, name: str | None = None) -> TrialImportReport:
    """Import the trial visit data at ``source`` into a trial-only dataset at ``out``
    (module docstring). Written to a staging directory and moved into place when complete."""
    began = time.perf_counter()
    cfg = config or TrialImportConfig()
    if not 0 < cfg.held_out_share < 0.9:
        raise TrialImportError(f"held_out_share: range: must be in (0, 0.9), got {cfg.held_out_share}")
    src = Path(source)
    if not src.is_dir():
        raise TrialImportError(f"{src}: missing: not a directory")
    check_output(src, out, overwrite, importer=IMPORTER, parts=(S.DATA_DIR, S.TRIAL_DIR, S.METADATA_DIR))
    visits_file, voc_file, features_file = _source_files(src)
    voc = _load_json(voc_file)
    if not isinstance(voc, dict):
        raise TrialImportError(f"{voc_file}: shape: expected an object of token lists")
    order, n_visits, flat = _flatten(visits_file, _load_json(visits_file), voc)
    n = n_visits.size
    first_visit = np.concatenate([[0], np.cumsum(n_visits)[:-1]]).astype(np.int64)
    participant = np.repeat(np.arange(n), n_visits)

    fields = {f: _token_field(f, order.index(f), flat, voc[f], visits_file, first_visit, (PAD,))
              for f in TOKEN_FIELDS}
    serious = (_token_field(SERIOUS_FIELD, order.index(SERIOUS_FIELD), flat, voc[SERIOUS_FIELD], visits_file,
                            first_visit, (PAD, NOT_SERIOUS)) if SERIOUS_FIELD in order else None)
    try:
        day = np.array([v[order.index(DAY_FIELD)] for v in flat], np.float64)
    except (TypeError, ValueError):
        raise TrialImportError(f"{visits_file}: shape: {DAY_FIELD} must be a number (days) in every visit") from None

    # Visits: drop the unplaceable, sort by day, merge same-day visits of a participant.
    dropped = {"no_day": ~np.isfinite(day)}
    dropped["before_day_0"] = ~dropped["no_day"] & (day < 0)
    keep = ~(dropped["no_day"] | dropped["before_day_0"])
    whole = np.floor(np.where(keep, day, 0)).astype(np.int64)
    fractional = int((keep & (whole != day)).sum())
    kept = np.flatnonzero(keep)
    key = participant[kept] * (int(whole.max(initial=0)) + 1) + whole[kept]
    merged_key, new_visit = np.unique(key, return_inverse=True)  # sorted: participant, then day
    visit_map = np.full(len(flat), -1, np.int64)
    visit_map[kept] = new_visit
    out_participant = participant[kept][np.unique(new_visit, return_index=True)[1]]
    out_day = whole[kept][np.unique(new_visit, return_index=True)[1]]
    source_order = np.all(np.diff(key) >= 0) if key.size else True
    n_out = merged_key.size
    for f in (*fields.values(), *([serious] if serious else [])):
        placed = visit_map[f.visit] >= 0
        f.counts["in_dropped_visits"] = int((~placed).sum())
        f.visit, f.ids = visit_map[f.visit[placed]], f.ids[placed]
    per_participant = np.bincount(out_participant, minlength=n)
    visit_offsets = np.concatenate([[0], np.cumsum(per_participant)])

    # Severity: AE tokens the source lists as serious; a participant's serious AE at any visit.
    ae_tokens = np.asarray(fields["adverse_event"].vocabulary, dtype=object)
    serious_tokens = set(serious.vocabulary) if serious else set()
    severe_ae = np.isin(ae_tokens, list(serious_tokens))
    severe_outcome = np.zeros(n, bool)
    if serious:
        severe_outcome[out_participant[serious.visit]] = True
        serious.counts["placed"] = int(serious.ids.size)  # into severe_outcome
        serious.counts["tokens_not_in_adverse_events"] = len(serious_tokens - set(ae_tokens))

    feature_rows = _read_features(features_file)
    baseline, features, baseline_info = _baseline(features_file, feature_rows, n, cfg)
    severe_reasons = {"serious_adverse_event": int(severe_outcome.sum())}
    severe_marks, severe_absent = _severe_from_features(features_file, feature_rows, cfg)
    if severe_absent:
        severe_reasons["columns_absent"] = severe_absent  # counted, not refused: the file is optional
    for column, marked in severe_marks.items():
        severe_reasons[column] = int(marked.sum())
        severe_reasons[f"{column}_only"] = int((marked & ~severe_outcome).sum())
        severe_outcome |= marked
    arm, arm_names, derivation = _arms(fields["treatment"], n_visits, out_participant, cfg)
    end_day = np.zeros(n, np.int64)
    np.maximum.at(end_day, out_participant, out_day)
    ids = S.TRIAL_ID_OFFSET + np.arange(n, dtype=np.int64)
    width = baseline.shape[1]
    table = pa.Table.from_arrays([
        pa.array(ids), pa.array(arm), pa.array(np.zeros(n, np.int32)), pa.array(end_day.astype(np.int32)),
        pa.ListArray.from_arrays(pa.array((np.arange(n + 1) * width).astype(np.int32)),
                                 pa.array(baseline.ravel())),
        pa.ListArray.from_arrays(pa.array(visit_offsets.astype(np.int32)), pa.array(out_day.astype(np.int32))),
        *(_nested(fields[f], n_out, visit_offsets) for f in TOKEN_FIELDS),
        pa.array(severe_outcome),
    ], schema=S.TRIAL_SCHEMA)

    dst = Path(out).resolve()
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.staging-", dir=dst.parent))
    try:
        codes = split_codes(ids, held_out_share=cfg.held_out_share)
        own_rule = bool((codes == split_codes(ids)).all())  # the default rule re-derives it
        participants, per_arm, severe = {}, {}, {}
        for split, code in SPLIT_CODES.items():
            rows = np.flatnonzero(codes == code)
            S.split_dir(staging, split).mkdir(parents=True)
            S.trial_split_dir(staging, split).mkdir(parents=True)
            if rows.size:
                pq.write_table(table.take(pa.array(rows)), S.trial_shard_path(staging, split, 0),
                               compression=COMPRESSION)
            participants[split] = int(rows.size)
            per_arm[split] = [int((arm[rows] == a).sum()) for a in (0, 1)]
            severe[split] = int(severe_outcome[rows].sum())
        sizes = {TOKEN_FIELDS[f]: len(fields[f].vocabulary) for f in TOKEN_FIELDS}
        if empty := [k for k, v in sizes.items() if v == 0]:
            raise TrialImportError(f"{voc_file}: shape: empty vocabularies {empty} (nothing but {PAD})")
        visits = {"read": len(flat), "written": n_out, "merged_same_day": int(kept.size - n_out),
                  "dropped_no_day": int(dropped["no_day"].sum()),
                  "dropped_before_day_0": int(dropped["before_day_0"].sum()),
                  "fractional_days_floored": fractional, "reordered_by_day": not source_order,
                  "participants_without_visits": int((per_participant == 0).sum())}
        trial = {
            "importer": IMPORTER,
            "source_format": f"PyTrial {SEQUENCE_DIR}",
            "arm_names": arm_names,
            "arm_derivation": derivation,
            "baseline_features": features,
            "baseline": baseline_info,
            "subject_id_offset": S.TRIAL_ID_OFFSET,
            "subject_ids": "TRIAL_ID_OFFSET + position in the source's visits list",
            "enrollment": "enroll_day 0 (source days count from each participant's start); end_day the last visit",
            "max_visits": int(per_participant.max(initial=0)),
            "participants": participants,
            "participants_per_arm": per_arm,
            "severe_outcomes": severe,
            "severe_rule": "any serious-AE token other than NO at any visit"
                           + "".join(f", or {c} != 0 in feature.csv" for c in severe_marks),
            "severe_reasons": severe_reasons,
            "visits": visits,
            "items": {f: fields[f].counts for f in TOKEN_FIELDS} | ({SERIOUS_FIELD: serious.counts} if serious else {}),
            "vocabulary_sizes": sizes,
            "severe_adverse_events": int(severe_ae.sum()),
        }
        n_weeks = int(end_day.max(initial=0)) // S.DAYS_PER_WEEK + 1
        meta = S.DatasetMetadata(
            name=name or src.resolve().name,
            origin_date=cfg.origin_date,
            n_weeks=n_weeks,
            patients=dict.fromkeys(S.SPLITS, 0),
            vocab={"diag_age": DIAG_AGE_VOCAB_SIZE, "week": WeekVocab(n_weeks).size}
            | V.vocabulary_sizes(trial=False) | sizes,
            provenance={"importer": IMPORTER, "version": IMPORTER_VERSION, "source": str(src.resolve()),
                        "splits": "participant index (splits.split_codes)" if own_rule else "source",
                        "split_rule": f"participant index, splits.split_codes(held_out_share={cfg.held_out_share})",
                        "config": asdict(cfg)},
            length_histogram={s: {} for s in S.SPLITS},
            modalities=[],
            trial=trial,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        meta.write(staging)
        pq.write_table(_codes(fields, severe_ae), staging / S.CODES_PARQUET)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_directory(staging, dst)
    return TrialImportReport(source=str(src), out=str(dst), participants=participants, visits=visits,
                             vocabulary_sizes=sizes, seconds=round(time.perf_counter() - began, 3), trial=trial)


__all__ = ["IMPORTER", "TrialImportConfig", "TrialImportError", "TrialImportReport", "import_trial"]
