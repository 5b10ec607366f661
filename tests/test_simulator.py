"""Population simulator: contract, realism, determinism, growth and the written dataset."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mirror.data import record, schema, splits, vocab
from mirror.data.conditions import BY_CODE, CONDITIONS
from mirror.data.simulator import (
    LATENT_SCHEMA,
    SimulatorParams,
    generate_dataset,
    latent_path,
    simulate_block,
)
from mirror.data.vocabularies import codes_table, vocabulary_sizes

SEED = 7
N_REALISM = 20_000
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def params() -> SimulatorParams:
    return SimulatorParams.from_seed(SEED)


@pytest.fixture(scope="module")
def population(params):
    """20,000 simulated patients as flat numpy arrays (no Ray)."""
    rows, truth = simulate_block(params, SEED, 0, N_REALISM)
    lengths = rows[schema.N_EVENTS].to_numpy()
    flat = {c: pc.list_flatten(rows[c]).to_numpy() for c in schema.EVENT_COLUMNS}
    return {
        "rows": rows,
        "truth": truth,
        "lengths": lengths,
        "patient": np.repeat(np.arange(rows.num_rows), lengths),
        "sex": rows[schema.SEX].to_numpy(),
        "latent": np.stack(truth[schema.LATENT].to_numpy(zero_copy_only=False)),
        **flat,
    }


def _ids(codes: list[str]) -> np.ndarray:
    return np.array([BY_CODE[c].condition_id for c in codes])


# ---- the catalogue ---------------------------------------------------------------------------


def test_catalogue_has_605_named_conditions():
    table = codes_table()
    assert table.schema == schema.CODES_SCHEMA
    table = table.filter(pc.equal(table["modality"], schema.CONDITION))
    assert table.num_rows == vocab.N_CONDITIONS
    assert table["id"].to_pylist() == list(range(vocab.N_CONDITIONS))
    assert len(set(table["code"].to_pylist())) == vocab.N_CONDITIONS
    assert all(": " in name and name.split(": ")[1] for name in table["name"].to_pylist())
    assert BY_CODE["I10"].name == "Circulatory system: Essential (primary) hypertension"
    pregnancy = [c for c in CONDITIONS if c.system == "Pregnancy and childbirth"]
    assert pregnancy and all(c.sex == "female" and c.profile == "o" for c in pregnancy)
    assert BY_CODE["C61"].sex == "male" and BY_CODE["G30"].late_onset and BY_CODE["H66"].paediatric


# ---- one block: the row contract --------------------------------------------------------------


def test_rows_follow_the_contract(population, params):
    rows, lengths, patient = population["rows"], population["lengths"], population["patient"]
    assert rows.schema == schema.ROW_SCHEMA
    assert np.array_equal(rows[schema.SUBJECT_ID].to_numpy(), np.arange(N_REALISM))
    assert np.array_equal(pc.list_value_length(rows[schema.CONDITIONS]).to_numpy(), lengths)
    assert lengths.min() >= schema.MIN_WORDS and lengths.max() <= schema.MAX_EVENTS
    assert set(np.unique(population["sex"])) == {-1, 1}

    start = rows[schema.ENROLL_START].to_numpy()[patient]
    end = rows[schema.ENROLL_END].to_numpy()[patient]
    birth = rows[schema.BIRTH_WEEK].to_numpy()[patient]
    weeks, ages = population[schema.WEEKS], population[schema.AGE_GROUPS]
    conds = population[schema.CONDITIONS]
    assert (rows[schema.ENROLL_START].to_numpy() >= 0).all()
    assert (rows[schema.ENROLL_END].to_numpy() < params.n_weeks).all()
    assert ((weeks >= start) & (weeks <= end)).all(), "events only inside enrollment"
    same_patient = patient[1:] == patient[:-1]
    assert (np.diff(weeks)[same_patient] >= 0).all(), "weeks sorted within a patient"
    repeated = same_patient & (weeks[1:] == weeks[:-1]) & (conds[1:] == conds[:-1])
    assert not repeated.any(), "no duplicate (condition, week) word"
    assert np.array_equal(ages, vocab.age_group_at(weeks, birth))
    assert ages.min() >= 0 and ages.max() < vocab.N_AGE_GROUPS
    assert conds.min() >= 0 and conds.max() < vocab.N_CONDITIONS


def test_patient_depends_only_on_seed_and_id(population, params):
    """Any id range reproduces the same patients (the basis of growth and worker-independence)."""
    rows, truth = simulate_block(params, SEED, 5_000, 3_000)
    assert rows.equals(population["rows"].slice(5_000, 3_000))
    assert truth.equals(population["truth"].slice(5_000, 3_000))
    other, _ = simulate_block(SimulatorParams.from_seed(SEED + 1), SEED + 1, 5_000, 3_000)
    assert not other.equals(rows)


# ---- realism -----------------------------------------------------------------------------------


def test_sentence_lengths_look_like_claims(population):
    lengths = population["lengths"]
    assert (lengths <= 3).mean() > 0.30, "many patients with 1-3 words"
    assert (lengths > schema.MAX_WORDS).sum() > 100, "a long tail past 100 words"
    assert 3 <= np.median(lengths) <= 15


def test_sex_ratio_is_near_one(population):
    assert 0.46 < (population["sex"] == 1).mean() < 0.56


def test_paediatric_and_late_onset_conditions_happen_at_their_ages(population):
    conds, ages = population[schema.CONDITIONS], population[schema.AGE_GROUPS]
    # Acute only: chronic conditions with a childhood onset (asthma, ADHD) recur for life.
    acute_paediatric = [c.condition_id for c in CONDITIONS if c.paediatric and not c.chronic]
    paediatric = np.isin(conds, acute_paediatric)
    late = np.isin(conds, [c.condition_id for c in CONDITIONS if c.late_onset])
    assert paediatric.sum() > 1_000 and late.sum() > 1_000
    assert (ages[paediatric] < 4).mean() > 0.8, "acute paediatric conditions mostly under 20"
    assert (ages[late] >= 10).mean() > 0.9, "late-onset conditions mostly from 50"
    neonatal = np.isin(conds, _ids(["P07", "P59", "P92", "P22"]))
    assert neonatal.any() and (ages[neonatal] == 0).mean() > 0.99  # follow-ups may cross 5


def test_sex_specific_conditions_occur_in_one_sex_only(population):
    conds, sex = population[schema.CONDITIONS], population["sex"][population["patient"]]
    female_only = np.isin(conds, [c.condition_id for c in CONDITIONS if c.sex == "female"])
    male_only = np.isin(conds, [c.condition_id for c in CONDITIONS if c.sex == "male"])
    assert female_only.sum() > 500 and male_only.sum() > 100
    assert (sex[female_only] == 1).all() and (sex[male_only] == -1).all()


def test_prevalence_is_long_tailed(population):
    counts = np.sort(np.bincount(population[schema.CONDITIONS], minlength=vocab.N_CONDITIONS))[::-1]
    top_tenth = counts[: vocab.N_CONDITIONS // 10].sum() / counts.sum()
    assert top_tenth > 0.5, f"top 10% of conditions hold only {top_tenth:.0%} of events"
    assert np.median(counts) < counts.mean() / 3


def test_chronic_conditions_recur(population, params):
    key = population["patient"] * vocab.N_CONDITIONS + population[schema.CONDITIONS]
    pairs, per_pair = np.unique(key, return_counts=True)
    chronic = params.chronic[pairs % vocab.N_CONDITIONS]
    recur_chronic = (per_pair[chronic] >= 2).mean()
    recur_acute = (per_pair[~chronic] >= 2).mean()
    assert recur_chronic > 0.5 and recur_chronic > 2 * recur_acute


def test_latent_state_drives_comorbidity(population):
    """Cluster 1 (cardiometabolic) of the true latent state raises that cluster's conditions;
    factor 0 (frailty) lengthens sentences."""
    latent, patient = population["latent"], population["patient"]
    systems = {"Endocrine and metabolic", "Circulatory system", "Eye and adnexa"}
    cluster_ids = [c.condition_id for c in CONDITIONS if c.system in systems]
    in_cluster = np.isin(population[schema.CONDITIONS], cluster_ids)
    per_patient = np.bincount(patient[in_cluster], minlength=N_REALISM)
    low, high = np.quantile(latent[:, 1], [0.25, 0.75])
    assert per_patient[latent[:, 1] >= high].mean() > 1.5 * per_patient[latent[:, 1] <= low].mean()
    rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    assert np.corrcoef(rank(latent[:, 0]), rank(population["lengths"]))[0, 1] > 0.2


def test_progression_raises_the_later_hazard_of_targets(params):
    """Same patients with every hazard ratio set to 1: fewer target-after-source pairs."""
    def after_source_pairs(p: SimulatorParams) -> int:
        rows, _ = simulate_block(p, SEED, 0, 12_288)
        lengths = rows[schema.N_EVENTS].to_numpy()
        patient = np.repeat(np.arange(rows.num_rows), lengths)
        conds = pc.list_flatten(rows[schema.CONDITIONS]).to_numpy()
        weeks = pc.list_flatten(rows[schema.WEEKS]).to_numpy()
        never = np.iinfo(np.int32).max
        first = np.full((rows.num_rows, vocab.N_CONDITIONS), never)  # first week per condition
        np.minimum.at(first, (patient, conds), weeks)
        src, dst = first[:, p.progression_src], first[:, p.progression_dst]
        return int(((src < never) & (dst > src) & (dst < never)).sum())

    without = dataclasses.replace(params, progression_hr=np.ones_like(params.progression_hr))
    assert after_source_pairs(params) > 1.2 * after_source_pairs(without)


def test_row_picker_draws_like_inverting_each_rows_cumulative_sum():
    """The two-level picker of acute conditions returns the column a full float64 cumulative
    sum of the row gives, and never a zero-weight column (sex-specific conditions)."""
    from mirror.data.simulator import _pick, _RowPicker

    rng = np.random.default_rng(0)
    n, width = 300, 444
    weights = (rng.random((n, width)) ** 4 * (rng.random((n, width)) < 0.6)).astype(np.float32)
    weights[:, -30:] = 0.0  # an all-zero tail, as for the other sex
    weights[3] = 0.0  # a row without weight (no query targets it)
    flat_cum = np.cumsum(weights, dtype=np.float64)
    picker = _RowPicker(weights)
    np.testing.assert_allclose(picker.total, weights.sum(axis=1, dtype=np.float64), rtol=1e-12)
    rows = np.repeat(np.flatnonzero(picker.total > 0), 200)
    target = rng.random(len(rows)) * picker.total[rows]
    picked = picker.pick(rows, target)
    assert np.array_equal(picked, _pick(flat_cum, width, rows, target))
    assert (weights[rows, picked] > 0).all()
    # a target rounded up onto the row total still lands on a column with weight
    edge = np.flatnonzero(picker.total > 0)
    assert (weights[edge, picker.pick(edge, np.nextafter(picker.total[edge], 0))] > 0).all()


def test_age_group_arithmetic_is_the_exact_floor():
    """``vocab.age_group_of`` (a division and a correction) equals np.floor_divide, the exact
    floor, on every whole-week age and on ages a rounding step below a group boundary."""
    weeks = np.arange(-80_000, 80_000)
    ages = np.concatenate([weeks / vocab.WEEKS_PER_YEAR,
                           np.nextafter(np.arange(-50, 150) * 5.0, -np.inf), np.arange(-50, 150) * 5.0])
    assert np.array_equal(vocab.age_group_of(ages), np.floor_divide(ages, vocab.AGE_GROUP_YEARS))


# ---- written datasets (real Ray) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def datasets(ray_cluster, tmp_path_factory):
    """The same 7,000 patients written with 1 and with 2 workers (2 chunks), and 3,000."""
    root = tmp_path_factory.mktemp("sim")
    meta = {}
    for key, n, workers in (("one", 7_000, 1), ("two", 7_000, 2), ("small", 3_000, 2)):
        meta[key] = generate_dataset(root / key, n, seed=SEED, workers=workers, chunk_size=4096)
    return {key: root / key for key in meta}, meta


def _relative_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*.parquet"))


def test_same_files_whatever_the_worker_count(datasets):
    paths, _ = datasets
    files = _relative_files(paths["one"])
    per_chunk_and_split = 2 + len(record.TRUTH_SCHEMAS)  # data, latent, the record's truth kinds
    assert files == _relative_files(paths["two"])
    assert len(files) == 2 * per_chunk_and_split * len(schema.SPLITS) + 1
    for rel in files:  # byte-identical (ground truth holds NaN, which Table.equals never matches)
        assert (paths["one"] / rel).read_bytes() == (paths["two"] / rel).read_bytes(), rel


def _read_all(root: Path) -> dict[int, tuple[str, dict]]:
    out = {}
    for split in schema.SPLITS:
        for path in schema.split_files(root, split):
            for row in pq.read_table(path).to_pylist():
                out[row[schema.SUBJECT_ID]] = (split, row)
    return out


def test_growing_n_keeps_existing_patients_and_splits(datasets):
    paths, _ = datasets
    small, large = _read_all(paths["small"]), _read_all(paths["two"])
    assert sorted(small) == list(range(3_000)) and sorted(large) == list(range(7_000))
    assert all(small[i] == large[i] for i in range(3_000))


def test_dataset_files_match_metadata_and_ground_truth(datasets, params):
    paths, meta = datasets
    root, metadata = paths["two"], meta["two"]
    assert schema.DatasetMetadata.read(root) == metadata
    assert metadata.patients == splits.expected_counts(7_000)
    assert metadata.vocab == {"diag_age": vocab.DIAG_AGE_VOCAB_SIZE, "week": params.n_weeks + 3} | vocabulary_sizes()
    assert metadata.provenance["seed"] == SEED and metadata.provenance["parameters"]["seed"] == SEED
    assert pq.read_table(root / schema.CODES_PARQUET).equals(codes_table())
    saved = SimulatorParams.load(root / schema.GROUND_TRUTH_DIR)
    assert all(np.array_equal(getattr(saved, a), getattr(params, a)) for a in SimulatorParams.ARRAYS)

    for split in schema.SPLITS:
        files = schema.split_files(root, split)
        ids, lengths = [], []
        for chunk, path in enumerate(files):
            assert path == schema.shard_path(root, split, chunk)
            rows = pq.read_table(path)
            assert rows.schema == schema.ROW_SCHEMA
            truth = pq.read_table(latent_path(root, split, chunk))
            assert truth.schema == LATENT_SCHEMA
            assert truth[schema.SUBJECT_ID].equals(rows[schema.SUBJECT_ID]), "ground truth aligned"
            assert set(pc.list_value_length(truth[schema.LATENT]).to_pylist()) == {params.latent_dim}
            ids.append(rows[schema.SUBJECT_ID].to_numpy())
            lengths.append(rows[schema.N_EVENTS].to_numpy())
        ids, lengths = np.concatenate(ids), np.concatenate(lengths)
        assert (np.diff(ids) > 0).all(), f"{split}: subject ids strictly increasing across files"
        assert (splits.split_codes(ids) == splits.SPLIT_CODES[split]).all()
        assert len(ids) == metadata.patients[split]
        histogram = {str(k): int(v) for k, v in enumerate(np.bincount(lengths)) if v}
        assert metadata.length_histogram[split] == histogram


def test_refuses_to_overwrite_a_dataset(datasets):
    paths, _ = datasets
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_dataset(paths["small"], 100, seed=SEED)
    with pytest.raises(ValueError, match="multiple of 4096"):
        generate_dataset(paths["small"].parent / "bad", 100, chunk_size=1000)


def test_cli_writes_a_dataset(ray_cluster, tmp_path):
    spec = importlib.util.spec_from_file_location("generate_job", REPO / "jobs" / "generate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    summary = job.main(["--patients", "2000", "--out", str(tmp_path / "d"), "--seed", "3"])
    assert sum(summary["patients"].values()) == 2000
    assert schema.DatasetMetadata.read(tmp_path / "d").provenance["seed"] == 3
