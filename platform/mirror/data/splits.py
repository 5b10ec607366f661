"""Deterministic patient-to-split assignment, a function of ``subject_id`` alone.

The seed holds out 50,000 tuning and 50,000 test patients. Subject ids are dense (the
simulator numbers patients 0..N-1; importers must map source ids to dense ids), and the
first ``RESERVOIR`` ids are laid out by a fixed bijection of ``[0, RESERVOIR)``: the ids it
sends below 50,000 are ``held_out``, those in [50,000, 100,000) are ``tuning``. So:

* a patient keeps its split when the dataset is regenerated or grown (no dependence on N);
* at N >= 1,000,000 there are exactly 50,000 + 50,000 evaluation patients;
* below that, 5% + 5% of patients, spread evenly over the id range (proportional).

Trial participants (ids from ``schema.TRIAL_ID_OFFSET``) are assigned by their index in the
trial (id less the offset), so a trial gets its own 5% + 5% evaluation participants. Imported
datasets keep the source's splits (``provenance["splits"] == "source"``); this rule is then
not applied to them.
"""

from __future__ import annotations

import numpy as np

from mirror.data.schema import HELD_OUT, TRAIN, TRIAL_ID_OFFSET, TUNING

RESERVOIR = 1_000_000
EVAL_PATIENTS = 50_000  # per evaluation split, at full size
# Odd multiplier coprime with 10^6 (not divisible by 2 or 5) and close to RESERVOIR / golden
# ratio, so any prefix of ids maps to a near-uniform spread of positions.
_MULTIPLIER = 618_033
_OFFSET = 271_829

SPLIT_CODES = {TRAIN: 0, TUNING: 1, HELD_OUT: 2}


def split_codes(subject_ids: np.ndarray, *, held_out_share: float = EVAL_PATIENTS / RESERVOIR,
                tuning_share: float = EVAL_PATIENTS / RESERVOIR) -> np.ndarray:
    """int8 split code per subject (see ``SPLIT_CODES``); vectorised. The shares are the
    fraction of the reservoir held out / kept for tuning (5 % each by default); an importer
    that widens them (a small trial's held-out set) records its split as its own, since the
    default rule then no longer re-derives it (``provenance["splits"] == "source"``)."""
    if min(held_out_share, tuning_share) < 0 or held_out_share + tuning_share >= 1:
        raise ValueError(f"split shares must be >= 0 and sum below 1, got held_out {held_out_share}, tuning {tuning_share}")
    held_end = round(held_out_share * RESERVOIR)
    tuning_end = held_end + round(tuning_share * RESERVOIR)
    ids = np.asarray(subject_ids, dtype=np.int64)
    if ids.size and ids.min() < 0:
        raise ValueError("subject ids must be non-negative")
    ids = np.where(ids >= TRIAL_ID_OFFSET, ids - TRIAL_ID_OFFSET, ids)  # a trial's own index
    position = (ids % RESERVOIR * _MULTIPLIER + _OFFSET) % RESERVOIR
    in_reservoir = ids < RESERVOIR
    codes = np.zeros(ids.shape, dtype=np.int8)
    codes[in_reservoir & (position < held_end)] = SPLIT_CODES[HELD_OUT]
    codes[in_reservoir & (position >= held_end) & (position < tuning_end)] = SPLIT_CODES[TUNING]
    return codes


def assign_splits(subject_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean mask per split name."""
    codes = split_codes(subject_ids)
    return {name: codes == code for name, code in SPLIT_CODES.items()}


def expected_counts(n_patients: int) -> dict[str, int]:
    """Split sizes for a simulated dataset with ids 0..n_patients-1."""
    codes = split_codes(np.arange(min(n_patients, RESERVOIR)))
    tuning = int((codes == SPLIT_CODES[TUNING]).sum())
    held_out = int((codes == SPLIT_CODES[HELD_OUT]).sum())
    return {TRAIN: n_patients - tuning - held_out, TUNING: tuning, HELD_OUT: held_out}
