"""The record stage: invariants of every modality, determinism, causal ground truth, LOS truth
and claims-likeness (numpy on ``simulate_block``; no Ray)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from mirror.data import record, schema, vocab
from mirror.data.conditions import BY_CODE
from mirror.data.record import LADDERS, expected_length_of_stay
from mirror.data.simulator import BLOCK, SimulatorParams, simulate_block, simulate_block_with_truth
from mirror.data.vocabularies import LABS, drug_class_id, vocabulary_sizes

SEED = 11
N_INVARIANTS = 5 * BLOCK  # 20,480 patients
N_CAUSAL = 48 * BLOCK  # 196,608 patients


@pytest.fixture(scope="module")
def params() -> SimulatorParams:
    return SimulatorParams.from_seed(SEED)


@pytest.fixture(scope="module")
def simulated(params):
    return simulate_block_with_truth(params, SEED, 0, N_INVARIANTS)


def _flat(rows: pa.Table, column: str) -> np.ndarray:
    return pc.list_flatten(rows[column]).to_numpy()


def _owner(rows: pa.Table, column: str) -> np.ndarray:
    """Row index of every element of a list column."""
    return np.repeat(np.arange(rows.num_rows), pc.list_value_length(rows[column]).to_numpy())


def _same(a: pa.Table, b: pa.Table) -> bool:
    """Table equality where NaN equals NaN (ground truth marks 'no next measurement' by NaN)."""
    if a.schema != b.schema or a.num_rows != b.num_rows:
        return False
    for name in a.column_names:
        x, y = a[name].combine_chunks(), b[name].combine_chunks()
        if pa.types.is_list(x.type):
            if not np.array_equal(pc.list_value_length(x).to_numpy(), pc.list_value_length(y).to_numpy()):
                return False
            x, y = pc.list_flatten(x), pc.list_flatten(y)
        if not np.array_equal(x.to_numpy(zero_copy_only=False), y.to_numpy(zero_copy_only=False),
                              equal_nan=pa.types.is_floating(x.type)):
            return False
    return True


def check_record_invariants(rows: pa.Table) -> None:
    """The rules validation enforces on the record's columns, checked with numpy."""
    start, end = rows[schema.ENROLL_START].to_numpy(), rows[schema.ENROLL_END].to_numpy()
    birth = rows[schema.BIRTH_WEEK].to_numpy()
    sizes = vocabulary_sizes()
    for modality, columns in schema.MODALITY_COLUMNS.items():
        lengths = [pc.list_value_length(rows[c]).to_numpy() for c in columns]
        assert all(np.array_equal(lengths[0], x) for x in lengths[1:]), f"{modality}: lists not parallel"

    # Admissions: inside enrollment (days), discharge >= admit, no overlap, LOS within a day.
    a_owner = _owner(rows, schema.ADMIT_DAYS)
    admit, discharge = _flat(rows, schema.ADMIT_DAYS), _flat(rows, schema.DISCHARGE_DAYS)
    los = _flat(rows, schema.LENGTH_OF_STAY)
    assert (admit >= start[a_owner] * 7).all() and (discharge <= end[a_owner] * 7 + 6).all()
    assert (discharge >= admit).all() and np.isfinite(los).all()
    assert (np.abs(los - (discharge - admit)) <= 1).all()
    same = a_owner[1:] == a_owner[:-1]
    assert (admit[1:][same] >= discharge[:-1][same]).all(), "admissions overlap"
    n_stays = pc.list_value_length(rows[schema.ADMIT_DAYS]).to_numpy()
    first_stay = np.cumsum(n_stays) - n_stays

    def check_stays(column: str, weeks: np.ndarray, owner: np.ndarray) -> None:
        stays = _flat(rows, column)
        assert ((stays == schema.NO_STAY) | ((stays >= 0) & (stays < n_stays[owner]))).all(), column
        linked = stays >= 0
        flat = first_stay[owner[linked]] + stays[linked]
        assert (weeks[linked] >= admit[flat] // 7).all() and (weeks[linked] <= discharge[flat] // 7).all(), column

    def check_times(name: str, weeks: np.ndarray, owner: np.ndarray) -> None:
        assert ((weeks >= start[owner]) & (weeks <= end[owner])).all(), f"{name}: outside enrollment"
        same = owner[1:] == owner[:-1]
        assert (np.diff(weeks)[same] >= 0).all(), f"{name}: not sorted within a patient"

    d_owner = _owner(rows, schema.CONDITIONS)
    d_weeks = _flat(rows, schema.WEEKS)
    check_times("diagnoses", d_weeks, d_owner)
    check_stays(schema.CONDITION_STAYS, d_weeks, d_owner)
    assert np.array_equal(_flat(rows, schema.AGE_GROUPS), vocab.age_group_at(d_weeks, birth[d_owner]))

    p_owner = _owner(rows, schema.PROCEDURES)
    p_weeks = _flat(rows, schema.PROCEDURE_WEEKS)
    check_times("procedures", p_weeks, p_owner)
    check_stays(schema.PROCEDURE_STAYS, p_weeks, p_owner)
    procedures = _flat(rows, schema.PROCEDURES)
    assert procedures.min() >= 0 and procedures.max() < sizes[schema.PROCEDURE]

    m_owner = _owner(rows, schema.MEDICATIONS)
    m_start, m_end = _flat(rows, schema.MEDICATION_START_WEEKS), _flat(rows, schema.MEDICATION_END_WEEKS)
    check_times("medications", m_start, m_owner)
    assert (m_end >= m_start).all() and (m_end <= end[m_owner]).all()
    check_stays(schema.MEDICATION_STAYS, m_start, m_owner)
    medications = _flat(rows, schema.MEDICATIONS)
    assert medications.min() >= 0 and medications.max() < sizes[schema.MEDICATION]

    l_owner = _owner(rows, schema.LABS)
    l_weeks = _flat(rows, schema.LAB_WEEKS)
    check_times("labs", l_weeks, l_owner)
    check_stays(schema.LAB_STAYS, l_weeks, l_owner)
    labs, values = _flat(rows, schema.LABS), _flat(rows, schema.LAB_VALUES)
    assert labs.min() >= 0 and labs.max() < sizes[schema.LAB] and np.isfinite(values).all()
    low = np.array([lab.low for lab in LABS])[labs]
    high = np.array([lab.high for lab in LABS])[labs]
    assert ((values >= low) & (values <= high)).all(), "lab value outside its plausible range"


# ---- the contract --------------------------------------------------------------------------


def test_record_rows_satisfy_the_validation_invariants(simulated):
    rows, _ = simulated
    assert rows.schema == schema.ROW_SCHEMA
    check_record_invariants(rows)
    for modality, columns in schema.MODALITY_COLUMNS.items():
        assert pc.sum(pc.list_value_length(rows[columns[0]])).as_py() > 0, f"{modality} is empty"


def test_record_depends_only_on_seed_and_id(simulated, params):
    rows, truth = simulated
    again, again_truth = simulate_block_with_truth(params, SEED, 5_000, 3_000)
    assert again.equals(rows.slice(5_000, 3_000))
    for kind, table in truth.items():
        assert _same(again_truth[kind], table.slice(5_000, 3_000)), kind
    small, _ = simulate_block(params, SEED, 0, 2 * BLOCK)  # growing N appends patients
    assert small.equals(rows.slice(0, 2 * BLOCK))


def test_diagnosis_only_keeps_the_base_diagnoses(simulated, params):
    """Without the record stage the diagnoses are the base process's; with it, the same words
    plus the lab-driven onsets and their follow-ups, and nothing else."""
    rows, truth = simulated
    base, _ = simulate_block(dataclasses.replace(params, simulate_record=False), SEED, 0, 2 * BLOCK)
    assert pc.sum(pc.list_value_length(base[schema.MEDICATIONS])).as_py() == 0
    full = rows.slice(0, 2 * BLOCK)
    key = lambda t: set(zip(_owner(t, schema.CONDITIONS), _flat(t, schema.WEEKS), _flat(t, schema.CONDITIONS),  # noqa: E731
                            strict=True))
    base_words, full_words = key(base), key(full)
    assert base_words <= full_words
    onsets = truth[record.ONSETS].slice(0, 2 * BLOCK)
    added = set(zip(_owner(onsets, "onset_conditions"), _flat(onsets, "onset_weeks"),
                    _flat(onsets, "onset_conditions"), strict=True))
    assert added and added <= full_words
    extra_conditions = {c for _, _, c in full_words - base_words}
    assert extra_conditions <= {BY_CODE[c].condition_id for c in ("E11", "I25", "N18", "I63")}


# ---- causal ground truth ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def causal(params):
    """~200K patients: treatment ground truth joined to the trigger lab's measurements."""
    rows, truth = simulate_block_with_truth(params, SEED, 0, N_CAUSAL)
    return rows, truth


def test_naive_treatment_contrast_is_confounded_and_adjustment_recovers_it(causal, params):
    """Consecutive outpatient measurements of a ladder's lab, while the patient is still
    untreated on that ladder: was a first level added at the earlier one? Only values over the
    threshold get treated (confounding by indication), so the naive treated-vs-untreated
    difference of the next value is biased against the true mean effect (the ground truth's
    observed - counterfactual next value); regressing on the earlier value as well removes
    most of that bias."""
    rows, truth = causal
    table = truth[record.TREATMENTS]
    owner = _owner(rows, schema.LABS)
    labs, weeks, values = _flat(rows, schema.LABS), _flat(rows, schema.LAB_WEEKS), _flat(rows, schema.LAB_VALUES)
    outpatient = _flat(rows, schema.LAB_STAYS) == schema.NO_STAY
    a_owner, a_week = _owner(table, "addition_weeks"), _flat(table, "addition_weeks")
    a_ladder, a_level = _flat(table, "addition_ladders"), _flat(table, "addition_levels")
    n_adds = pc.list_value_length(table["addition_weeks"]).to_numpy()
    e_add = (np.cumsum(n_adds) - n_adds)[_owner(table, "effect_labs")] + _flat(table, "effect_additions")
    e_lab, e_week = _flat(table, "effect_labs"), _flat(table, "next_weeks")
    e_shift = _flat(table, "next_observed") - _flat(table, "next_counterfactual")
    for li, ladder in enumerate(LADDERS):
        sel = np.flatnonzero(outpatient & (labs == ladder.lab))
        o, w, v = owner[sel], weeks[sel], values[sel]
        pair = np.flatnonzero((o[1:] == o[:-1]) & (w[1:] > w[:-1]))
        prev_o, prev_w, prev_v, next_v = o[pair], w[pair], v[pair], v[pair + 1]
        first_add = np.full(rows.num_rows, np.iinfo(np.int32).max)
        on_ladder = a_ladder == li
        np.minimum.at(first_add, a_owner[on_ladder], a_week[on_ladder])
        untreated_so_far = prev_w <= first_add[prev_o]
        prev_v, next_v = prev_v[untreated_so_far], next_v[untreated_so_far]
        added = prev_w[untreated_so_far] == first_add[prev_o[untreated_so_far]]
        first_level = on_ladder & (a_level == 0)
        true_effect = e_shift[(e_lab == ladder.lab) & first_level[e_add] & (e_week >= 0)].mean()
        naive = next_v[added].mean() - next_v[~added].mean()
        design = np.column_stack([np.ones(len(prev_v)), added, prev_v])
        adjusted = np.linalg.lstsq(design, next_v, rcond=None)[0][1]
        print(f"{ladder.name}: true {true_effect:.2f}, naive {naive:.2f}, adjusted {adjusted:.2f}")
        assert added.sum() > 200 and (~added).sum() > 200, (ladder.name, added.sum())
        assert true_effect < 0
        assert prev_v[added].mean() > prev_v[~added].mean(), f"{ladder.name}: no confounding by indication"
        assert naive - true_effect > 0.3 * abs(true_effect), f"{ladder.name}: naive {naive} vs true {true_effect}"
        assert abs(adjusted - true_effect) < 0.3 * abs(naive - true_effect), (
            f"{ladder.name}: adjusted {adjusted:.3f}, naive {naive:.3f}, true {true_effect:.3f}")


def test_counterfactual_next_values_differ_by_the_true_effect(causal):
    _, truth = causal
    table = truth[record.TREATMENTS]
    week = _flat(table, "next_weeks")
    found = week >= 0
    observed, counterfactual = _flat(table, "next_observed"), _flat(table, "next_counterfactual")
    assert np.isnan(observed[~found]).all() and np.isfinite(observed[found]).all()
    diff = observed[found] - counterfactual[found]
    effect = _flat(table, "effect_values")[found]
    # Equal unless the addition had stopped by then (diff 0) or a value hit its clip bound.
    close = np.isclose(diff, effect, atol=1e-3, rtol=1e-3) | (diff == 0)
    assert close.mean() > 0.99


def test_lab_driven_onsets_follow_the_treated_labs(causal):
    _, truth = causal
    onsets = truth[record.ONSETS]
    hr = _flat(onsets, "onset_hazard_ratios")
    treatment_hr = _flat(onsets, "onset_treatment_hazard_ratios")
    assert len(hr) > 1_000 and (hr > 0).all()
    assert (treatment_hr <= 1.0 + 1e-6).all() and (treatment_hr < 0.99).any(), "treatment lowers the hazard"


def test_length_of_stay_differs_by_regimen_as_the_truth_says(causal, params):
    """Stays with the helpful class are shorter on average, by what expected_length_of_stay
    says; and the function reproduces the stored expectation from the rows alone."""
    rows, truth = causal
    stays = truth[record.ADMISSIONS]
    principal = _flat(stays, "stay_principal")
    censored = _flat(stays, "stay_censored")
    expected = _flat(stays, "stay_expected_los")
    los = _flat(rows, schema.LENGTH_OF_STAY)
    # Regimen and admission-week diagnoses of every stay, from the rows.
    n_stays = pc.list_value_length(rows[schema.ADMIT_DAYS]).to_numpy()
    first = np.cumsum(n_stays) - n_stays
    admit_week = _flat(rows, schema.ADMIT_DAYS) // 7
    m_stay = _flat(rows, schema.MEDICATION_STAYS)
    m_in = m_stay >= 0
    m_flat = first[_owner(rows, schema.MEDICATIONS)[m_in]] + m_stay[m_in]
    regimen = np.zeros((len(los), record.N_MEDICATIONS), bool)
    regimen[m_flat, _flat(rows, schema.MEDICATIONS)[m_in]] = True
    d_stay = _flat(rows, schema.CONDITION_STAYS)
    d_flat = first[_owner(rows, schema.CONDITIONS)] + d_stay
    d_in = (d_stay >= 0)
    d_in[d_in] &= _flat(rows, schema.WEEKS)[d_in] == admit_week[d_flat[d_in]]
    diagnoses = np.zeros((len(los), vocab.N_CONDITIONS), bool)
    diagnoses[d_flat[d_in], _flat(rows, schema.CONDITIONS)[d_in]] = True
    recomputed = expected_length_of_stay(params, principal, _flat(stays, "stay_severity"), diagnoses, regimen)
    assert np.allclose(recomputed, expected, rtol=1e-4)

    j01 = np.isin(np.arange(record.N_MEDICATIONS), [drug_class_id()[c] for c in record._J01])
    pneumonia = (principal == BY_CODE["J18"].condition_id) & ~censored
    with_class = pneumonia & regimen[:, j01].any(axis=1)
    without = pneumonia & ~regimen[:, j01].any(axis=1)
    assert with_class.sum() > 100 and without.sum() > 50
    observed_gap = los[without].mean() - los[with_class].mean()
    truth_gap = expected[without].mean() - expected[with_class].mean()
    assert truth_gap > 0.5 and observed_gap > 0.5 * truth_gap and observed_gap < 1.5 * truth_gap
    # Under the full regimen the expectation never rises, and it varies by regimen.
    assert (_flat(stays, "stay_expected_los_all_helpful") <= expected + 1e-4).all()
    assert (_flat(stays, "stay_expected_los_without_helpful") >= expected - 1e-4).all()


# ---- claims-likeness -------------------------------------------------------------------------


def test_record_looks_like_claims(causal):
    rows, _ = causal
    figures = record.claims_figures(rows)
    assert 0.03 <= figures["share_with_admission_per_year"] <= 0.12, figures
    assert 2.0 <= figures["median_length_of_stay"] <= 4.0, figures
    assert 3.5 <= figures["mean_length_of_stay"] <= 6.5, figures
    assert 1.0 <= figures["medication_classes_per_patient"] <= 8.0, figures
    assert 0.3 <= figures["share_with_any_medication"] <= 0.85, figures
    assert 2.0 <= figures["lab_measurements_per_patient_year"] <= 40.0, figures
    assert 0.3 <= figures["share_with_any_lab"] <= 0.9, figures


def test_generated_dataset_holds_the_record_and_its_ground_truth(ray_cluster, tmp_path, params):
    import pyarrow.parquet as pq

    from mirror.data.simulator import generate_dataset, truth_path

    metadata = generate_dataset(tmp_path / "d", 5_000, seed=SEED, workers=2, chunk_size=BLOCK)
    assert metadata.modalities == list(schema.MODALITIES)
    provenance = metadata.provenance["record"]
    assert provenance["counts"]["admissions"] > 0 and provenance["lab_driven_onsets"] >= 0
    assert set(provenance["additions_per_ladder"]) == {ladder.name for ladder in LADDERS}
    assert 0 < provenance["claims_figures"]["median_length_of_stay"] < 10
    for split in schema.SPLITS:
        for chunk, path in enumerate(schema.split_files(tmp_path / "d", split)):
            rows = pq.read_table(path)
            check_record_invariants(rows)
            for kind, truth_schema in record.TRUTH_SCHEMAS.items():
                truth = pq.read_table(truth_path(tmp_path / "d", kind, split, chunk))
                assert truth.schema == truth_schema
                assert truth[schema.SUBJECT_ID].equals(rows[schema.SUBJECT_ID]), (kind, split)
            stays = pq.read_table(truth_path(tmp_path / "d", record.ADMISSIONS, split, chunk))
            assert np.array_equal(pc.list_value_length(stays["stay_principal"]).to_numpy(),
                                  pc.list_value_length(rows[schema.ADMIT_DAYS]).to_numpy())
