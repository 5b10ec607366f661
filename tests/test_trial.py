"""Simulated two-arm trial: contract, determinism, counterfactual twins, and the written part."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mirror import guards
from mirror.data import schema
from mirror.data.simulator import BLOCK, generate_dataset
from mirror.data.splits import SPLIT_CODES
from mirror.data.trial import (
    ARM_EFFECT,
    BASELINE_FEATURES,
    COUNTERFACTUAL_SCHEMA,
    FACTUAL_SEVERE_PROBABILITY,
    MAX_VISITS,
    SEVERE_PROBABILITY,
    TrialParams,
    counterfactual_path,
    simulate_trial_block,
    trial_split_codes,
    write_trial,
)
from mirror.data.vocabularies import (
    ADVERSE_EVENTS,
    SEVERE_ADVERSE_EVENTS,
    TRIAL_MEDICATIONS,
    TRIAL_TREATMENTS,
)

SEED = 11
N = 20_000
REPO = Path(__file__).resolve().parents[1]
PYTRIAL = REPO.parent / "shared" / "fixtures" / "pytrial-demo"  # ../shared/fixtures (README)
VISIT_LISTS = (schema.VISIT_TREATMENTS, schema.VISIT_MEDICATIONS, schema.VISIT_ADVERSE_EVENTS)
MED = {c.code: c.id for c in TRIAL_MEDICATIONS}
AE = {c.name: c.id for c in ADVERSE_EVENTS}


@pytest.fixture(scope="module")
def trial():
    """20,000 participants and their twins (no Ray)."""
    rows, twins = simulate_trial_block(TrialParams(), SEED, 0, N)
    return rows, twins


def _flat(table: pa.Table, column: str) -> np.ndarray:
    return pc.list_flatten(table[column]).to_numpy()


def _visit_sets(table: pa.Table, column: str, visit: int) -> np.ndarray:
    """(participants, vocabulary size) bool: the ids at visit ``visit`` (0-based) of each row."""
    size = {schema.VISIT_MEDICATIONS: len(TRIAL_MEDICATIONS), schema.VISIT_ADVERSE_EVENTS: len(ADVERSE_EVENTS)}[column]
    out = np.zeros((table.num_rows, size), bool)
    lists = table[column].combine_chunks()
    visits = lists.offsets.to_numpy()[:-1] + visit
    inner = lists.values
    starts, ends = inner.offsets.to_numpy()[visits], inner.offsets.to_numpy()[visits + 1]
    ids = inner.values.to_numpy()
    owner = np.repeat(np.arange(table.num_rows), ends - starts)
    out[owner, ids[np.concatenate([np.arange(s, e) for s, e in zip(starts, ends, strict=True)])]] = True
    return out


# ---- determinism -----------------------------------------------------------------------------


def test_rows_are_the_same_whatever_the_range_and_growth_appends():
    params = TrialParams()
    whole, whole_twins = simulate_trial_block(params, SEED, 0, BLOCK + 500)
    first, first_twins = simulate_trial_block(params, SEED, 0, 1234)
    rest, rest_twins = simulate_trial_block(params, SEED, 1234, BLOCK + 500 - 1234)  # crosses a block
    assert pa.concat_tables([first, rest]).equals(whole)
    assert pa.concat_tables([first_twins, rest_twins]).equals(whole_twins)
    grown, _ = simulate_trial_block(params, SEED, 0, BLOCK + 900)
    assert grown.slice(0, BLOCK + 500).equals(whole)
    other_seed, _ = simulate_trial_block(params, SEED + 1, 0, 1234)
    assert not other_seed.equals(first)


# ---- the row contract ------------------------------------------------------------------------


def test_rows_follow_the_trial_contract(trial):
    rows, twins = trial
    assert rows.schema == schema.TRIAL_SCHEMA and twins.schema == COUNTERFACTUAL_SCHEMA
    ids = rows[schema.SUBJECT_ID].to_numpy()
    assert np.array_equal(ids, schema.TRIAL_ID_OFFSET + np.arange(N))
    assert ids.min() > schema.SYNTHETIC_ID_OFFSET  # never a patient's or a generated patient's id
    n_visits = pc.list_value_length(rows[schema.VISIT_DAYS]).to_numpy()
    assert n_visits.min() >= 1 and n_visits.max() == MAX_VISITS
    for column in VISIT_LISTS:  # one list per visit
        assert np.array_equal(pc.list_value_length(rows[column]).to_numpy(), n_visits), column
    # Visit days strictly increasing inside [enroll_day, end_day].
    days = _flat(rows, schema.VISIT_DAYS)
    owner = np.repeat(np.arange(N), n_visits)
    same = owner[1:] == owner[:-1]
    assert (np.diff(days)[same] > 0).all()
    assert (days >= rows[schema.ENROLL_DAY].to_numpy()[owner]).all()
    assert (days <= rows[schema.END_DAY].to_numpy()[owner]).all()
    # Ids inside their vocabularies, increasing within a visit.
    for column, vocab in zip(VISIT_LISTS, (TRIAL_TREATMENTS, TRIAL_MEDICATIONS, ADVERSE_EVENTS), strict=True):
        per_visit = pc.list_flatten(rows[column])
        values = pc.list_flatten(per_visit).to_numpy()
        assert values.min() >= 0 and values.max() == len(vocab) - 1, column
        lengths = pc.list_value_length(per_visit).to_numpy()
        inner_owner = np.repeat(np.arange(len(lengths)), lengths)
        assert (np.diff(values)[inner_owner[1:] == inner_owner[:-1]] > 0).all(), column
    # Fixed-width finite baseline; almost all female.
    assert (pc.list_value_length(rows[schema.BASELINE]).to_numpy() == len(BASELINE_FEATURES)).all()
    baseline = _flat(rows, schema.BASELINE).reshape(N, len(BASELINE_FEATURES))
    assert np.isfinite(baseline).all()
    assert baseline[:, BASELINE_FEATURES.index("female")].mean() > 0.97
    assert 45 < baseline[:, BASELINE_FEATURES.index("age")].mean() < 60
    # Treatment visits first (never empty), then follow-ups (no treatment).
    tx_lengths = pc.list_value_length(pc.list_flatten(rows[schema.VISIT_TREATMENTS])).to_numpy()
    first_visit = np.concatenate([[0], np.cumsum(n_visits)[:-1]])
    assert (tx_lengths[first_visit] > 0).all()
    on_treatment = tx_lengths > 0
    assert not (on_treatment[1:] & ~on_treatment[:-1] & same).any()
    # 1:1 randomisation in permuted blocks of four.
    arm = rows[schema.ARM].to_numpy()
    assert set(np.unique(arm)) == {0, 1} and (arm.reshape(-1, 4).sum(axis=1) == 2).all()
    # Splits by participant index, as for patients: ~5 % tuning, ~5 % held out.
    codes = trial_split_codes(ids)
    for split in (schema.TUNING, schema.HELD_OUT):
        assert 0.04 < (codes == SPLIT_CODES[split]).mean() < 0.06


def test_figures_resemble_the_pytrial_demo_trial(trial):
    """Visits per participant, AEs and medications per visit, severe share: close to the real
    demo trial's (severe share as TWIN's NCT00174655: 12.6 %)."""
    rows, _ = trial
    n_visits = pc.list_value_length(rows[schema.VISIT_DAYS]).to_numpy()
    visits = n_visits.sum()
    simulated = {
        "visits": n_visits.mean(),
        "aes": len(pc.list_flatten(pc.list_flatten(rows[schema.VISIT_ADVERSE_EVENTS]))) / visits,
        "meds": len(pc.list_flatten(pc.list_flatten(rows[schema.VISIT_MEDICATIONS]))) / visits,
    }
    severe = rows[schema.SEVERE_OUTCOME].to_numpy().mean()
    assert 0.10 < severe < 0.15
    if not PYTRIAL.exists():
        pytest.skip(f"{PYTRIAL} absent: compared with fixed ranges only")
    with gzip.open(PYTRIAL / "trial_patient_sequence" / "visits.json.gz") as f:
        real = json.load(f)["visits"]  # [participant][visit] = [treatment, medication, ae, ...]
    real_visits = [v for p in real for v in p]
    reference = {
        "visits": len(real_visits) / len(real),
        "aes": np.mean([len([a for a in v[2] if a]) for v in real_visits]),  # 0 is [PAD]
        "meds": np.mean([len([m for m in v[1] if m]) for v in real_visits]),
    }
    for key, value in simulated.items():
        assert abs(value / reference[key] - 1) < 0.15, (key, value, reference[key])


# ---- counterfactual twins ----------------------------------------------------------------------


def test_twin_differs_only_by_the_arm_when_the_arms_are_alike():
    """Same regimen in both arms: under common random numbers the twin is the participant."""
    alike = TrialParams(arm_regimens=(("AC",) * 4 + ("T",) * 4,) * 2)
    rows, twins = simulate_trial_block(alike, SEED, 0, 3000)
    assert np.array_equal(twins[schema.ARM].to_numpy(), 1 - rows[schema.ARM].to_numpy())
    for column in schema.TRIAL_SCHEMA.names:
        if column != schema.ARM:
            assert twins[column].equals(rows[column]), column
    assert (twins[ARM_EFFECT].to_numpy() == 0).all()


def test_twin_shares_every_arm_independent_draw(trial):
    rows, twins = trial
    params = TrialParams()
    for column in (schema.SUBJECT_ID, schema.ENROLL_DAY, schema.BASELINE):
        assert twins[column].equals(rows[column]), column
    first_day = pc.list_element(rows[schema.VISIT_DAYS], 0)
    assert pc.list_element(twins[schema.VISIT_DAYS], 0).equals(first_day)
    # First visit: the same uniforms decide each AE in both arms, so the arm whose first phase
    # has the higher logit for an AE has it whenever the other arm has it.
    arm = rows[schema.ARM].to_numpy()
    factual = _visit_sets(rows, schema.VISIT_ADVERSE_EVENTS, 0)
    twin = _visit_sets(twins, schema.VISIT_ADVERSE_EVENTS, 0)
    in_arm1 = np.where(arm[:, None] == 1, factual, twin)
    in_arm0 = np.where(arm[:, None] == 1, twin, factual)
    first_phase = [regimen[0] for regimen in params.arm_regimens]
    tables = {row["name"]: row for row in params.tables()["adverse_events"]}
    checked = 0
    for event in ADVERSE_EVENTS:
        shift = tables[event.name]["phase_logit"]
        delta = shift[first_phase[1]] - shift[first_phase[0]]
        higher, lower = (in_arm1, in_arm0) if delta >= 0 else (in_arm0, in_arm1)
        assert not (lower[:, event.id] & ~higher[:, event.id]).any(), event.name
        if abs(delta) >= 1.0:  # and the rates differ the way the parameters say
            difference = in_arm1[:, event.id].mean() - in_arm0[:, event.id].mean()
            assert np.sign(difference) == np.sign(delta), event.name
            checked += 1
    assert checked >= 5


def test_average_true_effect_matches_the_simulated_difference_between_arms(trial):
    rows, twins = trial
    arm = rows[schema.ARM].to_numpy()
    severe = rows[schema.SEVERE_OUTCOME].to_numpy()
    p_factual = twins[FACTUAL_SEVERE_PROBABILITY].to_numpy()
    p_twin = twins[SEVERE_PROBABILITY].to_numpy()
    effect = twins[ARM_EFFECT].to_numpy()
    np.testing.assert_allclose(effect, np.where(arm == 1, p_factual - p_twin, p_twin - p_factual), atol=1e-6)
    rates = [severe[arm == a].mean() for a in (0, 1)]
    se = np.sqrt(sum(r * (1 - r) / (arm == a).sum() for a, r in enumerate(rates)))
    assert abs(effect.mean() - (rates[1] - rates[0])) < 4 * se
    # The twins' outcomes: the same effect within a much smaller error (paired draws).
    twin_severe = twins[schema.SEVERE_OUTCOME].to_numpy()
    paired = np.where(arm == 1, severe.astype(int) - twin_severe, twin_severe.astype(int) - severe)
    assert abs(effect.mean() - paired.mean()) < 4 * paired.std() / np.sqrt(N)
    assert effect.mean() > 0.01 and effect.std() > 0.03  # TC-H more toxic on average, not for all
    assert (effect < 0).mean() > 0.1


def test_medications_follow_the_arm_and_the_adverse_events(trial):
    rows, _ = trial
    arm = rows[schema.ARM].to_numpy()
    meds = _visit_sets(rows, schema.VISIT_MEDICATIONS, 0)
    aes = _visit_sets(rows, schema.VISIT_ADVERSE_EVENTS, 0)
    gcsf = meds[:, MED["L03A"]]
    assert gcsf[arm == 1].mean() > 5 * gcsf[arm == 0].mean()  # protocol G-CSF in the myelotoxic arm
    assert meds[:, MED["A04A"]].mean() > 0.9  # antiemetics at every chemotherapy cycle
    antibiotics = meds[:, MED["J01C"]] | meds[:, MED["J01M"]]
    febrile = aes[:, AE["Febrile neutropenia"]]
    assert febrile.sum() > 50 and antibiotics[febrile].mean() > 3 * antibiotics[~febrile].mean()


def test_severe_outcome_depends_on_severe_adverse_events(trial):
    rows, _ = trial
    severe = rows[schema.SEVERE_OUTCOME].to_numpy()
    per_participant = pc.list_flatten(rows[schema.VISIT_ADVERSE_EVENTS])
    events = pc.list_flatten(per_participant).to_numpy()
    visit_lengths = pc.list_value_length(per_participant).to_numpy()
    n_visits = pc.list_value_length(rows[schema.VISIT_DAYS]).to_numpy()
    owner = np.repeat(np.repeat(np.arange(N), n_visits), visit_lengths)
    had_severe = np.zeros(N, bool)
    had_severe[owner[np.isin(events, sorted(SEVERE_ADVERSE_EVENTS))]] = True
    assert severe[had_severe].mean() > 4 * severe[~had_severe].mean()


def test_params_refuse_impossible_designs():
    with pytest.raises(ValueError, match=r"arm_regimens\[1\]: expected a non-empty sequence"):
        TrialParams(arm_regimens=(("AC",), ("AC", "chemo")))
    with pytest.raises(ValueError, match="> MAX_VISITS 14"):
        TrialParams(arm_regimens=(("AC",) * 10, ("T",)))
    with pytest.raises(ValueError, match="stop_probability: expected in"):
        TrialParams(stop_probability=1.5)


# ---- the written trial part (real Ray, real Parquet) ---------------------------------------------


def _read_split(root: Path, split: str, truth: bool = False) -> pa.Table:
    files = sorted((root / schema.GROUND_TRUTH_DIR / "trial_counterfactual" / split).glob("*.parquet")) if truth \
        else schema.trial_split_files(root, split)
    return pa.concat_tables([pq.read_table(f) for f in files])


def test_written_trial_is_the_same_whatever_the_chunking(ray_cluster, tmp_path):
    n = 2 * BLOCK + 100
    one = write_trial(tmp_path / "one", n, SEED)  # one chunk, written here
    three = write_trial(tmp_path / "three", n, SEED, chunk_size=BLOCK, workers=2)  # three Ray tasks
    assert three["chunks"] == 3 and one["chunks"] == 1
    with pytest.raises(FileExistsError, match="already holds a trial part"):
        write_trial(tmp_path / "one", 10, SEED)  # never mixed with a stale trial's files
    volatile = ("chunk_size", "row_group_size", "chunks", "data_bytes", "ground_truth_bytes", "seconds")
    assert {k: v for k, v in one.items() if k not in volatile} == {k: v for k, v in three.items() if k not in volatile}
    for split in schema.SPLITS:
        for truth in (False, True):
            a, b = _read_split(tmp_path / "one", split, truth), _read_split(tmp_path / "three", split, truth)
            assert a.equals(b), (split, truth)
    rows, twins = simulate_trial_block(TrialParams(), SEED, 0, n)
    held_out = _read_split(tmp_path / "one", schema.HELD_OUT)
    take = np.flatnonzero(trial_split_codes(rows[schema.SUBJECT_ID].to_numpy()) == SPLIT_CODES[schema.HELD_OUT])
    assert held_out.equals(rows.take(pa.array(take)))


def test_generate_dataset_writes_a_readable_trial_part(ray_cluster, tmp_path):
    root = tmp_path / "ds"
    meta = generate_dataset(root, 500, seed=SEED, workers=2, trial_participants=977)
    trial = schema.DatasetMetadata.read(root).trial
    assert trial == json.loads(json.dumps(meta.trial))  # what the writer returned is on disk
    assert sum(trial["participants"].values()) == 977
    assert trial["baseline_features"] == list(BASELINE_FEATURES) and len(trial["arm_names"]) == 2
    for split in schema.SPLITS:
        rows = _read_split(root, split)
        twins = pq.read_table(counterfactual_path(root, split, 0))
        assert rows.schema == schema.TRIAL_SCHEMA and rows.num_rows == trial["participants"][split]
        assert sum(trial["participants_per_arm"][split]) == rows.num_rows
        assert twins[schema.SUBJECT_ID].equals(rows[schema.SUBJECT_ID])  # row for row
        assert trial["severe_outcomes"][split] == int(rows[schema.SEVERE_OUTCOME].to_numpy().sum())
    assert sum(trial["visits_per_arm"]) == sum(
        int(pc.sum(pc.list_value_length(_read_split(root, s)[schema.VISIT_DAYS])).as_py()) for s in schema.SPLITS
    )
    assert (root / trial["parameter_file"]).is_file()
    assert not any("counterfactual" in str(p) for p in (root / schema.TRIAL_DIR).rglob("*"))
    # jobs/generate.py --overwrite recognises the trial part as the generator's own.
    job = _generate_job()
    summary = job.main(["--patients", "500", "--out", str(root), "--overwrite", "--trial-participants", "0"])
    assert summary["trial_participants"] == {} and not (root / schema.TRIAL_DIR).exists()
    assert not (root / schema.GROUND_TRUTH_DIR / "trial_counterfactual").exists()


def _generate_job():
    spec = importlib.util.spec_from_file_location("generate_job", REPO / "jobs" / "generate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def test_generate_job_sizes_the_trial():
    job = _generate_job()
    assert job.trial_participants("auto", 300) == 1000  # a real trial's size at least
    assert job.trial_participants("auto", 300_000) == 3000  # 1 % of the population
    assert job.trial_participants("auto", 10**8) == 5000
    assert job.trial_participants("0", 10**8) == 0
    for bad in ("-3", "many"):
        with pytest.raises(guards.GuardError, match="--trial-participants: expected a count >= 0 or 'auto'"):
            job.trial_participants(bad, 1000)
