"""Population simulator: realistic synthetic claims "sentences", written as a mirror dataset.

The generative model, per patient (vectorised over blocks of ``BLOCK`` patients)::

    sex ~ Bernoulli(female_fraction); age at enrollment from a US-like sex-specific pyramid
    enrollment: length ~ LogNormal(median enroll_median_weeks), clipped to [1, n_weeks] weeks
        (weeks to the full ~10 years); start uniform so the window fits in [0, n_weeks)
    latent health state z ~ N(0, I_K), K = 8: factor 0 = frailty (every condition, and visit
        frequency), factors 1-7 = organ-system clusters (cardiometabolic, respiratory/allergic,
        mental/injury, musculoskeletal/pain, infection/immune, digestive, neoplasm/genital);
        independent of sex, as seed 000 wants its embedding to be
    hazard of condition c at age group g for sex s, per week: h[s, g, c] * exp(loadings[c] . z)
        h: long-tailed frequency x age profile (paediatric, young adult, reproductive,
        midlife, late onset, ...) x sex factor (exactly 0 for the other sex if sex-specific)
    chronic c (161): onset when the cumulative hazard since birth passes an Exp(1) draw:
        before enrollment = prevalent, inside = incident (exact on the age-varying hazard);
        then follow-up visits recur as a Poisson process (visit_rate[c] x frailty x Gamma)
    acute c (444): episodes are a Poisson process on the age-varying hazard; an episode may
        get a follow-up visit 1, 2, ... weeks later
    progression: once a chronic source starts (prevalent or incident), and at every episode
        of an acute source, each target in the progression table has its hazard multiplied by
        the ratio for the rest of the window; one generation (progression-caused onsets and
        episodes do not progress further)
    words: (condition, week) inside the enrollment window, deduplicated, sorted by week

Claims hold only patients with at least one diagnosis. A patient whose window holds no event
gets exactly one, by construction: its condition is drawn by the patient's own window hazards
(so it still depends on age, sex and latent state) and its time from that hazard. Such
patients are counted in ``provenance.forced_first_event`` (~15% at the defaults; together
with natural ones ~24% of patients have one word, ~38% have 1-3, ~6% more than 100).
Sentences over ``schema.MAX_EVENTS`` keep their first ``MAX_EVENTS`` words and are counted
in ``provenance.truncated_patients`` (visit rates are capped, so that is vanishingly rare).

Determinism: global parameters derive from the seed alone (``SimulatorParams.from_seed``).
Each block of ``BLOCK`` ids has its own RNG stream ``SeedSequence(seed, spawn_key=(1, block))``,
so patient i depends only on (seed, i): growing N appends patients (splits depend on the id
alone), and neither the worker count nor the chunk size changes any row.

Speed (numpy on one core, OMP_NUM_THREADS=1, this shared 2-core box under heavy load from
other jobs; CPU seconds; ``bench/bench_data.py`` ``bench_simulate_block``, both paths timed
alternately, median of 7 runs): ``simulate_block`` of the whole record ~62,800 patients per
CPU-second (best 64,600), diagnoses only (``simulate_record=False``) ~115,000 (Arrow tables
included; before the float64 (patients x acute conditions) cumulative sum gave way to
``_RowPicker``: 47,000 and 79,000 on the same box). 100M patients, whole record: ~1,600
CPU-seconds. ``write_chunk`` (simulate + split + zstd Parquet) was ~72,000/s diagnoses only
(not re-measured).

Storage, measured at the defaults (28 words per patient on average):
    Whole record: Arrow in memory 696 B/patient, Parquet zstd without dictionary 234
    B/patient. Diagnoses only: Arrow 347 B/patient (the empty record lists included), Parquet
    zstd 79 B/patient; ground truth (8 float32) 31 B/patient. Diagnoses-only decode (one
    thread): zstd 1.5M patients/CPU-s, snappy + dictionary 2.1M/CPU-s at 87 B/patient (+11%),
    uncompressed 3.0M/CPU-s at 357 B/patient.
    Either codec decodes far faster than a model consumes patients, so zstd wins on I/O.
    Row group: 262,144 patients (64 blocks) ~ 93 MB uncompressed, ~20 MB on disk: inside the
    usual 64-256 MB band, and the unit a reader decodes at once.
    File (chunk): N / 16 rounded up to a block for small N (>= 16 files to parallelise writes
    and reads), at most 2,097,152 patients ~ 165 MB: 100M patients -> 48 train files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mirror.data import record, schema
from mirror.data.conditions import BY_CODE, CONDITIONS, MOST_COMMON_ACUTE, MOST_COMMON_CHRONIC
from mirror.data.splits import SPLIT_CODES, expected_counts, split_codes
from mirror.data.vocab import (
    AGE_GROUP_YEARS,
    DIAG_AGE_VOCAB_SIZE,
    N_AGE_GROUPS,
    N_CONDITIONS,
    WEEKS_PER_YEAR,
    WeekVocab,
    age_group_at,
)
from mirror.data.vocabularies import codes_table, vocabulary_sizes
from mirror.progress import progress

logger = logging.getLogger(__name__)

SIMULATOR_NAME = "mirror.data.simulator"
SIMULATOR_VERSION = "2.0.0"  # schema 2: the whole record
BLOCK = 4096  # patients per RNG stream; chunk and row-group sizes are multiples of it
ROW_GROUP_PATIENTS = 64 * BLOCK  # 262,144 patients per row group (see module docstring)
MAX_CHUNK_PATIENTS = 512 * BLOCK  # 2,097,152 patients per file at scale
MIN_CHUNKS = 16  # small datasets still get this many files (parallel writes and reads)
COMPRESSION = "zstd"
LATENT_DIM = 8
MAX_VISIT_RATE = 0.5  # follow-up visits per week for one chronic condition, at most
GROUP_WEEKS = AGE_GROUP_YEARS * WEEKS_PER_YEAR  # weeks in one five-year age group

# Age pyramid at enrollment start, five-year groups 0-4 ... 100-104 (US-like shape; claims
# populations thin out past 65 as members move to Medicare, and women outlive men).
_PYRAMID_MALE = (6.3, 6.5, 6.6, 6.8, 7.0, 7.0, 6.8, 6.5, 6.2, 6.3, 6.4, 6.2, 5.4, 4.3, 3.1,
                 2.1, 1.3, 0.7, 0.3, 0.08, 0.01)  # fmt: skip
_PYRAMID_FEMALE = (6.0, 6.2, 6.3, 6.5, 6.8, 6.9, 6.8, 6.5, 6.3, 6.4, 6.6, 6.5, 5.8, 4.8, 3.6,
                   2.6, 1.8, 1.2, 0.6, 0.2, 0.04)  # fmt: skip

# Latent factors: 0 = frailty, 1..7 = organ-system clusters (what each system loads on).
PARAMS_JSON = "params.json"  # SimulatorParams.save: scalars, readable tables, latent factor names
_FACTOR_NAMES = (
    "frailty", "cardiometabolic", "respiratory_allergic", "mental_injury",
    "musculoskeletal_pain", "infection_immune", "digestive", "neoplasm_genitourinary",
)  # fmt: skip
_SYSTEM_FACTOR = {
    "Endocrine and metabolic": 1, "Circulatory system": 1, "Eye and adnexa": 1,
    "Respiratory system": 2, "Ear and mastoid": 2, "Skin and subcutaneous tissue": 2,
    "Mental and behavioural": 3, "Injury and poisoning": 3,
    "Musculoskeletal and connective tissue": 4, "Nervous system": 4, "Symptoms and signs": 4,
    "Infectious and parasitic": 5, "Blood and immune": 5, "Perinatal": 5, "Congenital": 5,
    "Digestive system": 6,
    "Neoplasms": 7, "Genitourinary system": 7, "Pregnancy and childbirth": 7,
}  # fmt: skip
# Rarer systems: their conditions' drawn frequencies are scaled by these factors.
_SYSTEM_WEIGHT = {"Neoplasms": 0.3, "Congenital": 0.3, "Blood and immune": 0.6, "Perinatal": 0.5}
_RENAL = ("N17", "N18", "N19", "N25", "N04")  # kidney conditions join the cardiometabolic cluster

# Known progressions (source -> target, hazard ratio), from textbook epidemiology; the seed
# adds random within-cluster edges on top (``SimulatorParams.n_random_progressions``).
_PROGRESSIONS = """
E11 N18 2.5, E11 H36 4, E11 I25 2, E11 G62 3, E11 L97 3, E11 I63 1.8, E10 H36 4, E10 N18 2
E66 E11 3, E66 I10 2.5, E66 M17 2, E66 G47 2.5, E66 K76 3, E78 I25 2, E78 I70 2
I10 I50 2, I10 I63 2, I10 N18 2, I10 I48 1.6, I10 I25 1.8, I25 I21 3, I25 I50 2.5
I48 I63 3, I48 I50 2, I50 N17 2, I50 J90 3, I63 I69 6, I63 G81 5, N18 D63 4, N18 E87 3
J44 J96 4, J44 J18 2.5, J44 I27 3, F17 J44 3, F17 C34 4, F17 I70 2
F10 K70 6, F10 K74 4, F10 K85 4, F10 F32 1.8, K70 K74 5, B20 B59 10, B20 B37 4
F32 F33 4, F41 F32 2, F32 F41 2, G30 F05 3, G30 L89 3, F03 F05 3, M81 S72 3, M81 M80 5
J30 J45 2, L20 J45 2, L20 J30 2, J45 J32 1.8, J06 H66 2, H66 H65 3
O24 E11 5, O13 I10 2, C50 C79 3, C34 C79 4, C18 C78 4, K50 K60 3
"""


@dataclass(frozen=True, eq=False)
class SimulatorParams:
    """Everything the simulator draws from, besides the per-patient randomness.

    Build with :meth:`from_seed` (scalars may be overridden; the arrays are then derived from
    the seed and those scalars). Arrays are read-only; condition axes follow
    ``conditions.CONDITIONS`` order, sex axes are (male, female).
    """

    # Calendar and population.
    seed: int = 0  # the seed the arrays were derived from
    n_weeks: int = 522  # dataset span in weeks (~10 years from origin_date)
    origin_date: str = "2010-01-01"  # ISO date of week 0
    female_fraction: float = 0.51
    enroll_median_weeks: float = 104.0  # median enrollment length (weeks)
    enroll_sigma: float = 1.3  # log-normal spread of enrollment length
    # Latent state and disease process.
    latent_dim: int = LATENT_DIM  # K: width of the ground-truth latent health state
    chronic_burden: float = 1.2  # mean number of chronic conditions present at enrollment
    max_prevalence: float = 0.25  # cap on any chronic condition's prevalence at enrollment
    acute_rate: float = 0.035  # population-mean acute episodes per week, all conditions
    prevalence_sigma: float = 1.5  # log-normal spread of per-condition frequency (long tail)
    frailty_loading: float = 0.55  # mean loading of every condition on factor 0
    cluster_loading: float = 0.7  # mean loading of a condition on its organ-system factor
    visit_gap_median_weeks: float = 13.0  # median gap between follow-up visits, chronic
    utilisation_loading: float = 0.6  # how strongly frailty z_0 scales chronic visit rates
    visit_shape: float = 1.5  # Gamma shape of per-(patient, condition) visit-rate noise
    n_random_progressions: int = 150  # seed-drawn within-cluster progression edges
    # The record stage (mirror.data.record; each number's source is in its docstring).
    simulate_record: bool = True  # False: diagnoses only (the other modalities stay empty)
    lab_visit_rate: float = 0.010  # outpatient lab visits per week per (0.15 + chronic conditions)
    ladder_add_probability: float = 0.45  # chance a threshold-crossing value adds a level
    dm_threshold: float = 7.0  # HbA1c %, diabetes ladder (ADA target)
    ldl_threshold: float = 130.0  # LDL mg/dL, lipid ladder (NCEP ATP III)
    sbp_threshold: float = 140.0  # SBP mmHg, hypertension ladder (JNC 7)
    effect_sigma: float = 0.35  # log-normal spread of individual treatment effects
    discontinue_weeks: float = 208.0  # mean weeks until a chronic medication stops
    lab_onset_scale: float = 1.0  # multiplies every lab-driven onset hazard
    admission_background: float = 0.0015  # chance any other diagnosis word opens a stay
    helpful_give_probability: float = 0.7  # chance a stay gets a class that shortens it
    los_sigma: float = 0.7  # log-normal spread of length of stay around its expectation
    los_severity: float = 0.25  # log-LOS per unit of stay severity
    # Derived arrays (filled by from_seed).
    age_weights: np.ndarray = field(default=None, repr=False)  # (2, 21) pyramid, rows sum to 1
    hazard: np.ndarray = field(default=None, repr=False)  # (2, 24, 605) onset hazard /week
    loadings: np.ndarray = field(default=None, repr=False)  # (605, K) latent loadings
    visit_rate: np.ndarray = field(default=None, repr=False)  # (605,) /week, 0 if acute
    followup_prob: np.ndarray = field(default=None, repr=False)  # (605,) acute follow-up prob.
    chronic: np.ndarray = field(default=None, repr=False)  # (605,) bool
    progression_src: np.ndarray = field(default=None, repr=False)  # (E,) int16, sorted
    progression_dst: np.ndarray = field(default=None, repr=False)  # (E,) int16
    progression_hr: np.ndarray = field(default=None, repr=False)  # (E,) float32 hazard ratio

    ARRAYS = (
        "age_weights", "hazard", "loadings", "visit_rate", "followup_prob",
        "chronic", "progression_src", "progression_dst", "progression_hr",
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.n_weeks < 1:
            raise ValueError(f"SimulatorParams.n_weeks: expected >= 1, got {self.n_weeks}")
        if not 0.0 < self.female_fraction < 1.0:
            raise ValueError(
                f"SimulatorParams.female_fraction: expected in (0, 1), got {self.female_fraction}"
            )
        if self.latent_dim < 8:
            raise ValueError(
                f"SimulatorParams.latent_dim: expected >= 8 (frailty + 7 clusters), got {self.latent_dim}"
            )
        if self.progression_hr is not None and (self.progression_hr < 1).any():
            raise ValueError(
                "SimulatorParams.progression_hr: expected hazard ratios >= 1 "
                "(progression only raises hazards)"
            )
        for name in self.ARRAYS:
            value = getattr(self, name)
            if value is not None:
                value.flags.writeable = False

    @classmethod
    def from_seed(cls, seed: int = 0, **scalars: Any) -> SimulatorParams:
        """Parameters for ``seed``; keyword overrides apply to the scalar fields only."""
        unknown = set(scalars) - set(cls.scalar_names())
        if unknown:
            raise ValueError(
                f"SimulatorParams.from_seed: unknown scalars {sorted(unknown)}; "
                f"valid: {cls.scalar_names()}"
            )
        base = cls(seed=seed, **scalars)
        return replace(base, **_derive_arrays(base))

    @classmethod
    def scalar_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name not in cls.ARRAYS]

    def scalars(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.scalar_names()}

    def progression_table(self) -> list[dict[str, Any]]:
        """Progression edges with condition codes, for humans (``params.json``)."""
        return [
            {"from": CONDITIONS[s].code, "to": CONDITIONS[d].code, "hazard_ratio": round(float(h), 3)}
            for s, d, h in zip(self.progression_src, self.progression_dst, self.progression_hr, strict=True)
        ]

    def save(self, directory: str | Path) -> dict[str, str]:
        """Write ``params.json`` (scalars, readable tables) and ``params.npz`` (arrays)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(directory / "params.npz", **{n: getattr(self, n) for n in self.ARRAYS})
        summary = {
            "simulator": SIMULATOR_NAME,
            "version": SIMULATOR_VERSION,
            "scalars": self.scalars(),
            "arrays": {n: list(getattr(self, n).shape) for n in self.ARRAYS},
            "latent_factors": list(_FACTOR_NAMES) + [f"extra_{k}" for k in range(8, self.latent_dim)],
            "cluster_of_system": _SYSTEM_FACTOR,
            "progression": self.progression_table(),
        }
        (directory / PARAMS_JSON).write_text(json.dumps(summary, indent=2) + "\n")
        return {"json": str(directory / PARAMS_JSON), "arrays": str(directory / "params.npz")}

    @classmethod
    def load(cls, directory: str | Path) -> SimulatorParams:
        """Inverse of :meth:`save` (e.g. ``<dataset>/ground_truth``)."""
        directory = Path(directory)
        summary = json.loads((directory / PARAMS_JSON).read_text())
        with np.load(directory / "params.npz") as arrays:
            return cls(**summary["scalars"], **{n: arrays[n] for n in cls.ARRAYS})


def latent_factor_names(directory: str | Path, width: int) -> tuple[str, ...]:
    """The latent factors' names that :meth:`SimulatorParams.save` wrote to ``directory`` (e.g.
    ``<dataset>/ground_truth``) when they match the latent's width; () otherwise (datasets
    without them, other simulators)."""
    path = Path(directory) / PARAMS_JSON
    if not path.exists():
        return ()
    names = json.loads(path.read_text()).get("latent_factors") or []
    return tuple(names) if len(names) == width else ()


def _age_shape(profile: str, slope: float) -> np.ndarray:
    """Relative incidence over the 24 age groups for one profile (see AGE_PROFILES)."""
    mid = np.arange(N_AGE_GROUPS) * AGE_GROUP_YEARS + AGE_GROUP_YEARS / 2
    if profile == "a":
        return np.exp(slope * (mid - 40.0) / 10.0)
    if profile == "p":
        return np.exp(-mid / 4.0) + 0.002
    if profile == "n":
        return (mid < AGE_GROUP_YEARS).astype(np.float64)
    if profile == "y":
        return np.exp(-0.5 * ((mid - 27.0) / 9.0) ** 2) + 0.02
    if profile == "o":
        return np.where((mid > 15) & (mid < 50), np.exp(-0.5 * ((mid - 30.0) / 7.0) ** 2), 0.0)
    if profile == "d":
        return np.exp(-0.5 * ((mid - 52.0) / 10.0) ** 2) + 0.02
    if profile == "l":
        return np.where(mid > 30, np.exp(2.5 * slope * (mid - 75.0) / 10.0), 0.0)
    if profile == "u":
        return np.ones(N_AGE_GROUPS)
    raise ValueError(f"unknown age profile {profile!r}")


def _derive_arrays(p: SimulatorParams) -> dict[str, np.ndarray]:
    """All seed-derived arrays; a pure function of the scalars (including the seed)."""
    rng = np.random.default_rng(np.random.SeedSequence(p.seed, spawn_key=(0,)))
    n, k = N_CONDITIONS, p.latent_dim
    pyramid = np.array([_PYRAMID_MALE, _PYRAMID_FEMALE])
    pyramid /= pyramid.sum(axis=1, keepdims=True)
    sex_mix = np.array([1.0 - p.female_fraction, p.female_fraction])

    chronic = np.array([c.chronic for c in CONDITIONS])
    common = np.array([c.common for c in CONDITIONS])

    def long_tailed(members: np.ndarray, head: tuple[str, ...]) -> np.ndarray:
        """Log-normal frequencies for ``members``: the largest to ``head`` in its order, then
        to the other common conditions, the rest at random; rare systems scaled down."""
        draws = np.sort(np.exp(p.prevalence_sigma * rng.standard_normal(members.sum())))[::-1]
        ranked = [BY_CODE[code].condition_id for code in head]
        others_common = np.flatnonzero(members & common & ~np.isin(np.arange(n), ranked))
        rest = np.flatnonzero(members & ~common)
        order = np.concatenate([ranked, rng.permutation(others_common), rng.permutation(rest)])
        out = np.zeros(n)
        out[order.astype(np.int64)] = draws
        out *= [_SYSTEM_WEIGHT.get(c.system, 1.0) for c in CONDITIONS]
        return out / out.sum()

    # Chronic: target prevalence at enrollment start (capped); acute: mean episodes per week.
    prevalence = long_tailed(chronic, MOST_COMMON_CHRONIC) * p.chronic_burden
    for _ in range(20):  # re-spread what the cap removes, keeping the total burden
        prevalence = np.minimum(prevalence, p.max_prevalence)
        spare = p.chronic_burden - prevalence.sum()
        if spare < 1e-9:
            break
        room = chronic & (prevalence < p.max_prevalence)
        prevalence[room] += spare * prevalence[room] / prevalence[room].sum()
    acute_rate = long_tailed(~chronic, MOST_COMMON_ACUTE) * p.acute_rate

    # Latent loadings: frailty for all, the system's cluster, and a sparse secondary cluster.
    loadings = np.zeros((n, k))
    loadings[:, 0] = p.frailty_loading + 0.1 * rng.standard_normal(n)
    cluster = np.array([1 if c.code in _RENAL else _SYSTEM_FACTOR[c.system] for c in CONDITIONS])
    loadings[np.arange(n), cluster] = p.cluster_loading + 0.15 * rng.standard_normal(n)
    secondary = rng.integers(1, k, n)
    has_secondary = (rng.random(n) < 0.25) & (secondary != cluster)
    secondary_loading = 0.3 + 0.1 * rng.standard_normal(has_secondary.sum())
    loadings[np.flatnonzero(has_secondary), secondary[has_secondary]] = secondary_loading
    if k > 8:  # extra factors: small loadings everywhere
        loadings[:, 8:] = 0.1 * rng.standard_normal((n, k - 8))
    latent_mean = np.exp(0.5 * (loadings**2).sum(axis=1))  # E[exp(w . z)] for z ~ N(0, I)

    # Mean weeks lived in each age group before enrollment, and share of time in each group
    # during it, for the population pyramid: (2, 24) each.
    groups = pyramid.shape[1]
    lived = np.where(np.arange(N_AGE_GROUPS)[None, :] < np.arange(groups)[:, None], GROUP_WEEKS, 0.0)
    lived[np.arange(groups), np.arange(groups)] = GROUP_WEEKS / 2
    weeks_before = pyramid @ lived  # (2, 24)
    time_share = np.zeros((2, N_AGE_GROUPS))
    time_share[:, :groups] = pyramid

    # Age and sex shape per condition, scaled to hit its prevalence (chronic) or rate (acute).
    slopes = rng.uniform(0.15, 0.45, n)
    sex_log_ratio = 0.15 * rng.standard_normal(n)
    hazard = np.empty((2, N_AGE_GROUPS, n))
    for c, cond in enumerate(CONDITIONS):
        shape = _age_shape(cond.profile, slopes[c])
        ratio = sex_log_ratio[c] + 0.6 * cond.sex_bias
        sex_factor = np.exp(np.array([-ratio, ratio]) / 2)
        if cond.sex is not None:
            sex_factor = np.array([0.0, 1.0]) if cond.sex == "female" else np.array([1.0, 0.0])
        per_sex = sex_factor[:, None] * shape[None, :]  # (2, 24)
        if chronic[c]:
            mean_cumulative = (sex_mix[:, None] * weeks_before * per_sex).sum()
            target = -np.log1p(-prevalence[c])
            hazard[:, :, c] = per_sex * target / mean_cumulative
        else:
            mean_rate = (sex_mix[:, None] * time_share * per_sex).sum()
            hazard[:, :, c] = per_sex * acute_rate[c] / mean_rate
    hazard /= latent_mean[None, None, :]

    gaps = np.clip(p.visit_gap_median_weeks * np.exp(0.6 * rng.standard_normal(n)), 3.0, 52.0)
    visit_rate = np.where(chronic, 1.0 / gaps, 0.0)
    followup_prob = np.where(chronic, 0.0, rng.uniform(0.05, 0.4, n))

    # Progression: the curated table plus random edges between conditions of one cluster.
    edges: dict[tuple[int, int], float] = {}
    for item in _PROGRESSIONS.replace("\n", ",").split(","):
        if item.strip():
            src, dst, hr = item.split()
            edges[BY_CODE[src].condition_id, BY_CODE[dst].condition_id] = float(hr)
    wanted = len(edges) + p.n_random_progressions
    for _ in range(100 * wanted):
        if len(edges) == wanted:
            break
        src = int(rng.integers(n))
        peers = np.flatnonzero(cluster == cluster[src])
        dst = int(rng.choice(peers))
        if dst != src and (src, dst) not in edges:
            edges[src, dst] = 1.0 + float(np.exp(np.log(0.8) + 0.4 * rng.standard_normal()))
    if len(edges) < wanted:
        raise ValueError(f"SimulatorParams.n_random_progressions: could not draw {p.n_random_progressions} edges")
    pairs = sorted(edges)
    return {
        "age_weights": pyramid.astype(np.float64),
        "hazard": hazard.astype(np.float32),
        "loadings": loadings.astype(np.float32),
        "visit_rate": visit_rate.astype(np.float32),
        "followup_prob": followup_prob.astype(np.float32),
        "chronic": chronic,
        "progression_src": np.array([s for s, _ in pairs], np.int16),
        "progression_dst": np.array([d for _, d in pairs], np.int16),
        "progression_hr": np.array([edges[e] for e in pairs], np.float32),
    }


# --------------------------------------------------------------------------------------------
# Simulation of one block of patients (pure numpy, vectorised over patients and events).


@dataclass
class _Patients:
    """Columnar patients plus their flat event arrays (``offsets`` into the event arrays)."""

    subject_id: np.ndarray  # (n,) int64
    sex: np.ndarray  # (n,) int8, -1 male / 1 female
    birth_week: np.ndarray  # (n,) int32
    enroll_start: np.ndarray  # (n,) int32
    enroll_end: np.ndarray  # (n,) int32
    offsets: np.ndarray  # (n + 1,) int64
    conditions: np.ndarray  # (E,) int16
    age_groups: np.ndarray  # (E,) int8
    weeks: np.ndarray  # (E,) int32
    latent: np.ndarray  # (n, K) float32
    forced: np.ndarray  # (n,) bool: the one event was added because the window had none
    truncated: np.ndarray  # (n,) bool: more than MAX_EVENTS words, tail cut
    record: record.Record  # the other modalities, condition_stays and their ground truth

    def __len__(self) -> int:
        return len(self.subject_id)

    def slice(self, lo: int, hi: int) -> _Patients:
        a, b = self.offsets[lo], self.offsets[hi]
        per_patient = {
            f.name: getattr(self, f.name)[lo:hi]
            for f in fields(self)
            if f.name not in ("offsets", "conditions", "age_groups", "weeks", "record")
        }
        return _Patients(
            **per_patient,
            offsets=self.offsets[lo : hi + 1] - a,
            conditions=self.conditions[a:b],
            age_groups=self.age_groups[a:b],
            weeks=self.weeks[a:b],
            record=self.record.slice(lo, hi, a, b),
        )

    @staticmethod
    def concat(parts: list[_Patients]) -> _Patients:
        if len(parts) == 1:
            return parts[0]
        ends = np.cumsum([p.offsets[-1] for p in parts])
        offsets = [parts[0].offsets] + [p.offsets[1:] + e for p, e in zip(parts[1:], ends[:-1], strict=True)]
        out = {f.name: np.concatenate([getattr(p, f.name) for p in parts])
               for f in fields(_Patients) if f.name != "record"}
        out["offsets"] = np.concatenate(offsets)
        out["record"] = record.Record.concat([p.record for p in parts])
        return _Patients(**out)

    def tables(self) -> tuple[pa.Table, pa.Table]:
        if self.offsets[-1] > np.iinfo(np.int32).max:
            raise ValueError(
                f"{len(self)} patients hold {self.offsets[-1]} events, more than one Arrow list "
                "array can (2^31 - 1): simulate fewer patients per call"
            )
        offsets = pa.array(self.offsets.astype(np.int32))
        columns = {
            schema.SUBJECT_ID: pa.array(self.subject_id, pa.int64()),
            schema.SEX: pa.array(self.sex, pa.int8()),
            schema.BIRTH_WEEK: pa.array(self.birth_week, pa.int32()),
            schema.ENROLL_START: pa.array(self.enroll_start, pa.int32()),
            schema.ENROLL_END: pa.array(self.enroll_end, pa.int32()),
            schema.N_EVENTS: pa.array(np.diff(self.offsets).astype(np.int32)),
            schema.CONDITIONS: pa.ListArray.from_arrays(offsets, pa.array(self.conditions, pa.int16())),
            schema.AGE_GROUPS: pa.ListArray.from_arrays(offsets, pa.array(self.age_groups, pa.int8())),
            schema.WEEKS: pa.ListArray.from_arrays(offsets, pa.array(self.weeks, pa.int32())),
            schema.CONDITION_STAYS: pa.ListArray.from_arrays(
                offsets, pa.array(self.record.condition_stays, pa.int16())),
        } | self.record.row_columns()
        rows = pa.Table.from_arrays([columns[f.name] for f in schema.ROW_SCHEMA], schema=schema.ROW_SCHEMA)
        k = self.latent.shape[1]
        latent_offsets = pa.array(np.arange(len(self) + 1, dtype=np.int32) * k)
        truth = pa.Table.from_arrays(
            [
                pa.array(self.subject_id, pa.int64()),
                pa.ListArray.from_arrays(latent_offsets, pa.array(self.latent.ravel(), pa.float32())),
            ],
            schema=LATENT_SCHEMA,
        )
        return rows, truth

    def truth_tables(self) -> dict[str, pa.Table]:
        """Every ground-truth table of these patients: ``latent`` and the record's kinds."""
        return {"latent": self.tables()[1]} | self.record.truth_tables(self.subject_id)


LATENT_SCHEMA = pa.schema(
    [
        pa.field(schema.SUBJECT_ID, pa.int64(), nullable=False),
        pa.field(schema.LATENT, pa.list_(pa.float32()), nullable=False),
    ]
)


class _Segments:
    """Piecewise-constant hazard of (patient, condition) pairs over the age groups that the
    enrollment window crosses: maps cumulative hazard to time exactly.

    Arrays are (S, m): one row per segment, so every step is a vectorised pass over the m
    pairs (S is 3 at the default 522 weeks) rather than a reduction along a short axis."""

    def __init__(self, start: np.ndarray, stop: np.ndarray, birth: np.ndarray, rate_by_group):
        # start/stop: (m,) window in weeks (stop exclusive); rate_by_group(g) -> (m,) /week.
        first = np.floor((start - birth) / GROUP_WEEKS).astype(np.int64)
        n_seg = int(math.ceil((stop - start).max(initial=1) / GROUP_WEEKS)) + 1
        group = first[None, :] + np.arange(n_seg)[:, None]  # (S, m)
        lo = np.maximum(start, birth + group * GROUP_WEEKS)
        hi = np.minimum(stop, birth + (group + 1) * GROUP_WEEKS)
        self.start = lo
        self.length = np.maximum(hi - lo, 0.0)
        self.rate = np.where(group < N_AGE_GROUPS, rate_by_group(np.minimum(group, N_AGE_GROUPS - 1)), 0.0)
        self.cum = np.cumsum(self.length * self.rate, axis=0)  # (S, m)

    def _at(self, values: np.ndarray, seg: np.ndarray) -> np.ndarray:
        """``values[seg[i], i]`` for every pair i."""
        return values.ravel()[seg * values.shape[1] + np.arange(values.shape[1])]

    def time_at(self, target: np.ndarray) -> np.ndarray:
        """Time at which the cumulative hazard from the window start reaches ``target``."""
        seg = np.minimum((self.cum <= target).sum(axis=0), len(self.cum) - 1)
        rate, length = self._at(self.rate, seg), self._at(self.length, seg)
        before = self._at(self.cum, seg) - length * rate
        step = np.divide(target - before, rate, out=np.zeros_like(rate), where=rate > 0)
        return self._at(self.start, seg) + np.clip(step, 0.0, length)

    def take(self, index: np.ndarray) -> _Segments:
        """The pairs ``index`` (boolean mask or positions) of these segments."""
        out = object.__new__(_Segments)
        out.start, out.length = self.start[:, index], self.length[:, index]
        out.rate, out.cum = self.rate[:, index], self.cum[:, index]
        return out

    def hazard_until(self, t: np.ndarray) -> np.ndarray:
        """Cumulative hazard from the window start to time ``t``."""
        return (np.clip(t - self.start, 0.0, self.length) * self.rate).sum(axis=0)


@dataclass(frozen=True)
class _Layout:
    """Parameters re-ordered for the hot loop: chronic conditions first (columns
    ``[0, n_chronic)``), acute after, so every per-kind slice is a contiguous view."""

    order: np.ndarray  # internal column j is condition id order[j]
    n_chronic: int
    hazard: np.ndarray  # (2, 24, 605) float64, internal order
    hazard_chronic: np.ndarray  # (48, n_chronic) float32: rows male groups, then female
    hazard_acute: np.ndarray  # (48, n_acute) float32
    loadings_t: np.ndarray  # (K, 605) float32
    visit_rate: np.ndarray  # (605,)
    followup_prob: np.ndarray  # (605,)
    edge_ptr: np.ndarray  # (606,) CSR over internal source ids
    edge_dst: np.ndarray  # (E,) internal target ids
    edge_hr: np.ndarray  # (E,)

    @classmethod
    def of(cls, p: SimulatorParams) -> _Layout:
        missing = [name for name in p.ARRAYS if getattr(p, name) is None]
        if missing:
            raise ValueError(f"SimulatorParams: arrays {missing} not set; build with SimulatorParams.from_seed")
        order = np.concatenate([np.flatnonzero(p.chronic), np.flatnonzero(~p.chronic)])
        internal = np.empty_like(order)
        internal[order] = np.arange(len(order))
        nc = int(p.chronic.sum())
        hazard48 = p.hazard[:, :, order].reshape(2 * N_AGE_GROUPS, -1)
        src, dst = internal[p.progression_src], internal[p.progression_dst]
        by_src = np.argsort(src, kind="stable")
        return cls(
            order=order,
            n_chronic=nc,
            hazard=p.hazard[:, :, order].astype(np.float64),
            hazard_chronic=np.ascontiguousarray(hazard48[:, :nc], dtype=np.float32),
            hazard_acute=np.ascontiguousarray(hazard48[:, nc:], dtype=np.float32),
            loadings_t=np.ascontiguousarray(p.loadings[order].T, dtype=np.float32),
            visit_rate=p.visit_rate[order].astype(np.float64),
            followup_prob=p.followup_prob[order].astype(np.float64),
            edge_ptr=np.searchsorted(src[by_src], np.arange(len(order) + 1)),
            edge_dst=dst[by_src].astype(np.int64),
            edge_hr=p.progression_hr[by_src].astype(np.float64),
        )


def _block_rng(seed: int, block: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, block)))


def _pick(flat_cum: np.ndarray, width: int, rows: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Column at which row ``rows[i]``'s running sum passes ``target[i]`` (in [0, row total)).

    ``flat_cum`` is the float64 cumulative sum of a C-ordered (n, width) weight matrix, so
    one global searchsorted serves every row at once."""
    row_start = np.where(rows > 0, flat_cum[np.maximum(rows * width - 1, 0)], 0.0)
    idx = np.searchsorted(flat_cum, row_start + target, side="right")
    return np.clip(idx - rows * width, 0, width - 1)


def _cells(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.nonzero`` of a 2-D mask (same arrays, same order), ~8x faster through the flat index."""
    return np.divmod(np.flatnonzero(mask), mask.shape[1])


def _chunk_width(width: int, most: int = 16) -> int:
    """Largest divisor of ``width`` up to ``most``: the columns one :class:`_RowPicker` chunk holds."""
    return max(d for d in range(1, most + 1) if width % d == 0)


class _RowPicker:
    """Draws columns of a non-negative (n, width) float32 weight matrix in proportion to the
    weights of a row, for many (row, target) queries at once: what :func:`_pick` does, without
    its float64 cumulative sum over all n x width cells (the costliest step of a block).

    Two levels: float64 sums of chunks of ``chunk`` adjacent columns, one flat cumulative sum
    over those (n x width / chunk values) whose global searchsorted finds every query's chunk,
    then a running sum over that chunk's few columns. Same distribution as inverting each
    row's cumulative sum; picks differ from :func:`_pick` only where a target lies within
    float64 rounding (~1e-12 of the row total) of a column boundary."""

    def __init__(self, weights: np.ndarray):
        self.chunk = _chunk_width(weights.shape[1])
        self.n_chunks = weights.shape[1] // self.chunk
        self.blocks = weights.reshape(-1, self.chunk)  # row r * n_chunks + j: chunk j of row r
        sums = self.blocks.astype(np.float64) @ np.ones(self.chunk)
        self.flat_cum = np.cumsum(sums)  # over the C-ordered (n, n_chunks) chunk sums
        ends = self.flat_cum[self.n_chunks - 1 :: self.n_chunks]
        self.total = np.maximum(np.diff(ends, prepend=0.0), 0.0)  # (n,) row sums

    def pick(self, rows: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Column at which row ``rows[i]``'s running sum passes ``target[i]`` (in [0, row total))."""
        first = rows * self.n_chunks
        position = np.where(rows > 0, self.flat_cum[np.maximum(first - 1, 0)], 0.0) + target
        block = np.maximum(np.searchsorted(self.flat_cum, position, side="right"), first)
        past = np.flatnonzero(block >= first + self.n_chunks)  # rounding put the target past
        if len(past):  # the row: take its last chunk with weight
            row_end = self.flat_cum[first[past] + self.n_chunks - 1]
            block[past] = np.maximum(np.searchsorted(self.flat_cum, row_end, side="left"), first[past])
        left = position - np.where(block > 0, self.flat_cum[np.maximum(block - 1, 0)], 0.0)
        weights = self.blocks[block]  # (Q, chunk)
        running = np.zeros(len(rows))
        column = np.zeros(len(rows), np.int64)
        for k in range(self.chunk):
            running += weights[:, k]
            column += running <= left
        over = np.flatnonzero(column == self.chunk)  # rounding put the target past the chunk:
        if len(over):  # take its last column with weight (the last column if none has any)
            positive = weights[over, ::-1] > 0
            column[over] = self.chunk - 1 - np.where(positive.any(axis=1), positive.argmax(axis=1), 0)
        return (block - first) * self.chunk + column


def _simulate_full_block(p: SimulatorParams, layout: _Layout, seed: int, block: int) -> _Patients:
    """Patients ``block * BLOCK`` .. ``block * BLOCK + BLOCK - 1`` from one RNG stream.

    Every step is vectorised over the block: (patients x conditions) hazard matrices, then
    flat event arrays built with repeat / cumsum offsets; no loop over patients or events."""
    rng = _block_rng(seed, block)
    n, nc = BLOCK, layout.n_chronic

    # Demographics and enrollment.
    female = rng.random(n) < p.female_fraction
    cdf = np.cumsum(p.age_weights, axis=1)
    u = rng.random(n)
    age_group = np.where(female, np.searchsorted(cdf[1], u, "right"), np.searchsorted(cdf[0], u, "right"))
    age_group = np.minimum(age_group, p.age_weights.shape[1] - 1)
    age_years = (age_group + rng.random(n)) * AGE_GROUP_YEARS
    duration = np.exp(p.enroll_sigma * rng.standard_normal(n)) * p.enroll_median_weeks
    duration = np.clip(np.rint(duration), 1, p.n_weeks).astype(np.int64)
    start = np.floor(rng.random(n) * (p.n_weeks - duration + 1)).astype(np.int64)
    end = start + duration - 1
    stop = (end + 1).astype(np.float64)  # window as a continuous interval [start, stop)
    birth = start - np.floor(age_years * WEEKS_PER_YEAR).astype(np.int64)
    z = rng.standard_normal((n, p.latent_dim), dtype=np.float32)

    # Hazard matrices: exposure (weeks per sex x age group) @ hazard table, times exp(w . z).
    edges = np.arange(N_AGE_GROUPS) * GROUP_WEEKS
    before = np.clip((start - birth)[:, None] - edges, 0.0, GROUP_WEEKS)
    inside = np.clip((stop - birth)[:, None] - edges, 0.0, GROUP_WEEKS) - before
    sex_cols = np.stack([~female, female], axis=1).astype(np.float32)  # (n, 2)

    def by_sex(exposure: np.ndarray) -> np.ndarray:  # (n, 24) -> (n, 48)
        return (sex_cols[:, :, None] * exposure[:, None, :].astype(np.float32)).reshape(n, -1)

    multiplier = z @ layout.loadings_t
    np.exp(multiplier, out=multiplier)
    exposure_inside = by_sex(inside)
    h_chronic = exposure_inside @ layout.hazard_chronic
    h_chronic *= multiplier[:, :nc]
    h_acute = exposure_inside @ layout.hazard_acute
    h_acute *= multiplier[:, nc:]
    h_before = by_sex(before) @ layout.hazard_chronic
    h_before *= multiplier[:, :nc]

    def window_hazard(pp: np.ndarray, cc: np.ndarray) -> np.ndarray:
        chronic = cc < nc
        return np.where(chronic, h_chronic[pp, np.minimum(cc, nc - 1)], h_acute[pp, np.maximum(cc - nc, 0)])

    sex_idx = female.astype(np.intp)
    n_cond = multiplier.shape[1]

    def segments(pp: np.ndarray, cc: np.ndarray) -> _Segments:
        sex_base = sex_idx[pp] * (N_AGE_GROUPS * n_cond) + cc  # flat index of age group 0
        scale = multiplier.ravel()[pp * n_cond + cc]

        def rate(g: np.ndarray) -> np.ndarray:  # (S, m) age groups -> (S, m) /week
            return layout.hazard.ravel()[sex_base + g * n_cond] * scale

        return _Segments(start[pp].astype(np.float64), stop[pp], birth[pp].astype(np.float64), rate)

    # Chronic onsets: one Exp(1) draw per (patient, condition) against the cumulative hazard
    # from birth: used up before the window = prevalent, inside it = incident.
    draw = rng.standard_exponential((n, nc), dtype=np.float32)
    prevalent = draw < h_before
    draw -= h_before
    prev_p, prev_c = _cells(prevalent)
    inc_p, inc_c = _cells(~prevalent & (draw < h_chronic))
    inc_t = segments(inc_p, inc_c).time_at(draw[inc_p, inc_c].astype(np.float64))

    # Acute episodes: a Poisson process on each patient's summed acute hazard; each episode's
    # condition is drawn by its share of that hazard, its time from the age-varying hazard.
    acute = _RowPicker(h_acute)
    acute_total = acute.total
    ep_p = np.repeat(np.arange(n), rng.poisson(acute_total))
    ep_c = acute.pick(ep_p, rng.random(len(ep_p)) * acute_total[ep_p]) + nc
    ep_t = segments(ep_p, ep_c).time_at(rng.random(len(ep_p)) * h_acute[ep_p, ep_c - nc])

    # Progression: every started source (prevalent, incident, or an acute episode) multiplies
    # its targets' hazard by the hazard ratio from then on: the extra cumulative hazard is
    # (ratio - 1) x (target's hazard left in the window), exact on the age-varying hazard.
    src_p = np.concatenate([prev_p, inc_p, ep_p])
    src_c = np.concatenate([prev_c, inc_c, ep_c])
    src_t = np.concatenate([start[prev_p].astype(np.float64), inc_t, ep_t])
    degree = layout.edge_ptr[src_c + 1] - layout.edge_ptr[src_c]
    rep = np.repeat(np.arange(len(src_c)), degree)
    edge = layout.edge_ptr[src_c][rep] + np.arange(len(rep)) - np.repeat(np.cumsum(degree) - degree, degree)
    pr_p, pr_c, pr_ratio = src_p[rep], layout.edge_dst[edge], layout.edge_hr[edge] - 1.0
    pr_seg = segments(pr_p, pr_c)
    pr_done = pr_seg.hazard_until(src_t[rep])
    pr_left = np.maximum(window_hazard(pr_p, pr_c) - pr_done, 0.0)
    # ... a chronic target starts at most once (and not if already prevalent),
    with np.errstate(divide="ignore"):  # ratio 1 (no effect): infinite draw, never a hit
        pr_draw = rng.standard_exponential(len(rep)) / pr_ratio  # in units of the base hazard
    hit = (pr_c < nc) & (pr_draw < pr_left)
    hit[hit] &= ~prevalent[pr_p[hit], pr_c[hit]]
    prog_p, prog_c = pr_p[hit], pr_c[hit]
    prog_t = pr_seg.take(hit).time_at(pr_done[hit] + pr_draw[hit])
    # ... an acute target gets Poisson extra episodes over the rest of its hazard.
    acute_target = np.flatnonzero(pr_c >= nc)
    rep = np.repeat(acute_target, rng.poisson(pr_ratio[acute_target] * pr_left[acute_target]))
    extra_t = pr_seg.take(rep).time_at(pr_done[rep] + rng.random(len(rep)) * pr_left[rep])
    ep_p = np.concatenate([ep_p, pr_p[rep]])
    ep_c = np.concatenate([ep_c, pr_c[rep]])
    ep_t = np.concatenate([ep_t, extra_t])

    # A chronic condition starts at its earliest onset (base hazard or progression).
    on_p = np.concatenate([inc_p, prog_p])
    on_c = np.concatenate([inc_c, prog_c])
    on_t = np.concatenate([inc_t, prog_t])
    key = on_p * nc + on_c
    order = np.lexsort((on_t, key))
    first = np.ones(len(order), bool)
    first[1:] = key[order][1:] != key[order][:-1]
    on_p, on_c, on_t = on_p[order[first]], on_c[order[first]], on_t[order[first]]

    # Chronic conditions recur: follow-up visits as a Poisson process from onset (or from the
    # window start if prevalent), at a rate scaled by frailty and per-pair Gamma noise.
    utilisation = np.exp(p.utilisation_loading * z[:, 0] - p.utilisation_loading**2 / 2)
    vis_p = np.concatenate([on_p, prev_p])
    vis_c = np.concatenate([on_c, prev_c])
    vis_from = np.concatenate([on_t, start[prev_p].astype(np.float64)])
    span = stop[vis_p] - vis_from
    noise = rng.gamma(p.visit_shape, 1.0 / p.visit_shape, len(vis_p))
    rate = np.minimum(layout.visit_rate[vis_c] * utilisation[vis_p] * noise, MAX_VISIT_RATE)
    rep = np.repeat(np.arange(len(vis_p)), rng.poisson(rate * span))
    visit_t = vis_from[rep] + rng.random(len(rep)) * span[rep]

    # Acute episodes may get a follow-up visit 1, 2, 3... weeks later (if still enrolled).
    follow = np.flatnonzero(rng.random(len(ep_p)) < layout.followup_prob[ep_c])
    fu_t = ep_t[follow] + rng.geometric(0.5, len(follow))
    follow, fu_t = follow[fu_t < stop[ep_p[follow]]], fu_t[fu_t < stop[ep_p[follow]]]

    ev_p = np.concatenate([on_p, vis_p[rep], ep_p, ep_p[follow]])
    ev_c = np.concatenate([on_c, vis_c[rep], ep_c, ep_c[follow]])
    ev_t = np.concatenate([on_t, visit_t, ep_t, fu_t])

    # Claims hold only patients with a diagnosis: a window without events gets exactly one,
    # drawn from the patient's own window hazards (condition by share, time by hazard).
    forced = np.bincount(ev_p, minlength=n) == 0
    fp = np.flatnonzero(forced)
    chronic_cum = np.cumsum(h_chronic[fp], dtype=np.float64)
    chronic_total = h_chronic[fp].sum(axis=1, dtype=np.float64)
    u = rng.random(len(fp)) * (chronic_total + acute_total[fp])
    in_chronic = u < chronic_total
    fc = np.where(
        in_chronic,
        _pick(chronic_cum, nc, np.arange(len(fp)), np.minimum(u, chronic_total)),
        acute.pick(fp, np.maximum(u - chronic_total, 0.0)) + nc,
    )
    ft = segments(fp, fc).time_at(rng.random(len(fp)) * window_hazard(fp, fc))
    ev_p = np.concatenate([ev_p, fp])
    ev_c = np.concatenate([ev_c, fc])
    ev_t = np.concatenate([ev_t, ft])

    # Words: (patient, week, condition id), deduplicated and sorted by week within patient.
    week = np.clip(np.floor(ev_t).astype(np.int64), start[ev_p], end[ev_p])
    word = (ev_p * p.n_weeks + week) * N_CONDITIONS + layout.order[ev_c]
    if p.simulate_record:  # labs, ladders and lab-driven onsets (their own RNG stream)
        state = record.BlockState(
            female=female, birth=birth, start=start, end=end, z=z, utilisation=utilisation,
            present_p=np.concatenate([prev_p, on_p]),
            present_c=layout.order[np.concatenate([prev_c, on_c])],
            present_t=np.concatenate([np.full(len(prev_p), -np.inf), on_t]),
        )
        record_rng = record.block_rng(seed, block)
        labs = record.lab_stage(p, state, record_rng)
        word = np.concatenate([word, (labs.extra_p * p.n_weeks + labs.extra_w) * N_CONDITIONS + labs.extra_c])
    word = np.sort(word, kind="stable")  # runs by patient: timsort is ~3x faster here
    word = word[np.concatenate([[True], word[1:] != word[:-1]])]
    condition, patient_week = word % N_CONDITIONS, word // N_CONDITIONS
    patient, week = patient_week // p.n_weeks, patient_week % p.n_weeks
    counts = np.bincount(patient, minlength=n)
    truncated = counts > schema.MAX_EVENTS
    if truncated.any():  # keep the first MAX_EVENTS words; counted in the provenance
        rank = np.arange(len(patient)) - np.repeat(np.cumsum(counts) - counts, counts)
        keep = rank < schema.MAX_EVENTS
        patient, condition, week = patient[keep], condition[keep], week[keep]
        counts = np.minimum(counts, schema.MAX_EVENTS)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    if p.simulate_record:  # admissions, medications, procedures on the final words
        rec = record.encounter_stage(p, state, record_rng, labs, patient, week, condition)
    else:
        rec = record.empty_record(n, len(patient))
    return _Patients(
        subject_id=block * BLOCK + np.arange(n, dtype=np.int64),
        sex=np.where(female, 1, -1).astype(np.int8),
        birth_week=birth.astype(np.int32),
        enroll_start=start.astype(np.int32),
        enroll_end=end.astype(np.int32),
        offsets=offsets,
        conditions=condition.astype(np.int16),
        age_groups=age_group_at(week, birth[patient]).astype(np.int8),
        weeks=week.astype(np.int32),
        latent=z,
        forced=forced,
        truncated=truncated,
        record=rec,
    )


def _simulate(params: SimulatorParams, seed: int, first_id: int, n: int) -> _Patients:
    if first_id < 0 or n < 1:
        raise ValueError(f"simulate_block: need first_id >= 0 and n >= 1, got first_id={first_id}, n={n}")
    layout = _Layout.of(params)
    parts = []
    for block in range(first_id // BLOCK, (first_id + n - 1) // BLOCK + 1):
        patients = _simulate_full_block(params, layout, seed, block)
        lo = max(first_id - block * BLOCK, 0)
        hi = min(first_id + n - block * BLOCK, BLOCK)
        parts.append(patients if (lo, hi) == (0, BLOCK) else patients.slice(lo, hi))
    return _Patients.concat(parts)


def simulate_block(params: SimulatorParams, seed: int, first_id: int, n: int) -> tuple[pa.Table, pa.Table]:
    """Patients ``first_id .. first_id + n - 1`` as (rows in ROW_SCHEMA, ground truth latent).

    Pure and Ray-free. Each patient depends only on (seed, subject_id), whatever the range;
    ranges aligned to ``BLOCK`` avoid simulating patients that are then cut away.
    """
    return _simulate(params, seed, first_id, n).tables()


def simulate_block_with_truth(
    params: SimulatorParams, seed: int, first_id: int, n: int
) -> tuple[pa.Table, dict[str, pa.Table]]:
    """Like :func:`simulate_block`, with every ground-truth table: ``latent`` and the record
    stage's ``treatments``, ``admissions`` and ``onsets`` (``record.TRUTH_SCHEMAS``)."""
    patients = _simulate(params, seed, first_id, n)
    return patients.tables()[0], patients.truth_tables()


# --------------------------------------------------------------------------------------------
# Writing a dataset: one Ray task per chunk of ids, one file per (chunk, split).


def default_chunk_size(n_patients: int) -> int:
    """Patients per file: about MIN_CHUNKS files for small datasets, MAX_CHUNK_PATIENTS at
    scale (~150 MB files at 100M patients); always a multiple of BLOCK."""
    per_chunk = math.ceil(n_patients / MIN_CHUNKS / BLOCK) * BLOCK
    return int(min(max(per_chunk, BLOCK), MAX_CHUNK_PATIENTS))


class _SplitFile:
    """Buffered writer of one split's file for one chunk: full-size row groups, and the file
    appears under its final name only once complete."""

    def __init__(self, path: Path, table_schema: pa.Schema, row_group: int):
        self.path, self.schema, self.row_group = path, table_schema, row_group
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.writer: pq.ParquetWriter | None = None

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.pending.append(table)
            self.pending_rows += table.num_rows
        if self.pending_rows >= self.row_group:
            self._flush()

    def _flush(self, final: bool = False) -> None:
        if not self.pending_rows:
            return
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(
                f"{self.path}.tmp", self.schema, compression=COMPRESSION, use_dictionary=False
            )
        table = pa.concat_tables(self.pending)
        full = table.num_rows if final else table.num_rows // self.row_group * self.row_group
        for lo in range(0, full, self.row_group):
            self.writer.write_table(table.slice(lo, self.row_group), row_group_size=self.row_group)
        self.pending = [table.slice(full)] if full < table.num_rows else []
        self.pending_rows = table.num_rows - full

    def close(self) -> int:
        """Finish the file (if it got any rows); returns its size in bytes."""
        self._flush(final=True)
        if self.writer is None:
            return 0
        self.writer.close()
        os.replace(f"{self.path}.tmp", self.path)
        return self.path.stat().st_size


def latent_path(root: str | Path, split: str, chunk: int) -> Path:
    """Ground-truth latent shard matching ``schema.shard_path(root, split, chunk)``."""
    return truth_path(root, "latent", split, chunk)


def truth_path(root: str | Path, kind: str, split: str, chunk: int) -> Path:
    """Ground-truth shard of ``kind`` (``latent`` or a ``record.TRUTH_SCHEMAS`` key) matching
    ``schema.shard_path(root, split, chunk)`` row for row."""
    return Path(root) / schema.GROUND_TRUTH_DIR / kind / split / f"part-{chunk:05d}.parquet"


def _add_counts(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """Key-wise sum of two dicts of numbers / numpy arrays (chunk counters)."""
    return {k: total.get(k, 0) + v for k, v in part.items()} | {k: v for k, v in total.items() if k not in part}


def write_chunk(
    params: SimulatorParams, seed: int, root: str, chunk: int, first_id: int, n: int, row_group: int
) -> dict[str, Any]:
    """Simulate ids ``first_id .. first_id + n - 1`` and write chunk ``chunk`` of every split
    (data and ground truth). Returns counts and histograms only, never rows."""
    began = time.perf_counter()
    data = {
        s: _SplitFile(schema.shard_path(root, s, chunk), schema.ROW_SCHEMA, row_group)
        for s in schema.SPLITS
    }
    kinds = {"latent": LATENT_SCHEMA} | (record.TRUTH_SCHEMAS if params.simulate_record else {})
    truth = {
        (kind, s): _SplitFile(truth_path(root, kind, s, chunk), table_schema, row_group)
        for kind, table_schema in kinds.items() for s in schema.SPLITS
    }
    histogram = {s: np.zeros(schema.MAX_EVENTS + 1, np.int64) for s in schema.SPLITS}
    condition_events = np.zeros(N_CONDITIONS, np.int64)
    forced = truncated = events = 0
    record_counts: dict[str, Any] = {}
    for lo in range(first_id, first_id + n, row_group):
        patients = _simulate(params, seed, lo, min(row_group, first_id + n - lo))
        rows = patients.tables()[0]
        truth_tables = patients.truth_tables()
        codes = split_codes(patients.subject_id)
        lengths = np.diff(patients.offsets)
        if params.simulate_record:
            record_counts = _add_counts(record_counts, record.claims_counters(rows)
                                        | {k: float(v.sum()) for k, v in patients.record.counts.items()})
        for split, code in SPLIT_CODES.items():
            take = pa.array(np.flatnonzero(codes == code))
            data[split].add(rows.take(take))
            for kind in kinds:
                truth[kind, split].add(truth_tables[kind].take(take))
            histogram[split] += np.bincount(lengths[codes == code], minlength=schema.MAX_EVENTS + 1)
        condition_events += np.bincount(patients.conditions, minlength=N_CONDITIONS)
        forced += int(patients.forced.sum())
        truncated += int(patients.truncated.sum())
        events += int(patients.offsets[-1])
    data_bytes = sum(f.close() for f in data.values())
    truth_bytes = sum(f.close() for f in truth.values())
    return {
        "chunk": chunk,
        "patients": {s: int(h.sum()) for s, h in histogram.items()},
        "histogram": histogram,
        "condition_events": condition_events,
        "events": events,
        "forced": forced,
        "truncated": truncated,
        "record": record_counts,
        "data_bytes": data_bytes,
        "truth_bytes": truth_bytes,
        "seconds": time.perf_counter() - began,
    }


def _record_provenance(counts: dict[str, Any]) -> dict[str, Any]:
    """The record stage's counts and claims-likeness figures for ``dataset.json``."""
    figures = {k: round(float(v), 4) for k, v in record.claims_figures(counts).items()}
    kept = {k: int(v) for k, v in counts.items() if k != "los_histogram" and float(v).is_integer()}
    return {
        "claims_figures": figures,
        "counts": kept | {"patient_years": round(float(counts["patient_years"]), 1)},
        "lab_driven_onsets": int(counts["lab_onsets"]),
        "additions_per_ladder": {ladder.name: int(counts[f"additions_{ladder.name}"]) for ladder in record.LADDERS},
        "clipped_lab_values": int(counts["clipped_lab_values"]),
        "absorbed_overlapping_stays": int(counts["absorbed_stays"]),
        "stays_censored_at_enrollment_end": int(counts["censored_stays"]),
    }


def _prepare_output(root: Path, overwrite: bool) -> None:
    """Refuse an existing dataset unless ``overwrite``; even then delete only files this
    generator provably wrote (``ownership.owned_dataset_files``), never a user's. The marker
    written first proves authorship of a generation that is interrupted later."""
    from mirror.data.ownership import GENERATED_MARKER, owned_dataset_files, remove_owned_dataset

    owned = [root / d for d in (schema.METADATA_DIR, schema.DATA_DIR, schema.TRIAL_DIR, schema.GROUND_TRUTH_DIR)]
    existing = [p for p in owned if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{root}: already holds {', '.join(p.name for p in existing)}; "
            "choose an empty directory or pass overwrite=True (--overwrite)"
        )
    if existing:
        remove_owned_dataset(root, owned_dataset_files(root, SIMULATOR_NAME))
    (root / schema.METADATA_DIR).mkdir(parents=True, exist_ok=True)
    (root / schema.METADATA_DIR / GENERATED_MARKER).write_text(f"{SIMULATOR_NAME}\n")


def generate_dataset(
    out_dir: str | Path,
    n_patients: int,
    seed: int = 0,
    workers: int | None = None,
    chunk_size: int | None = None,
    name: str | None = None,
    *,
    overwrite: bool = False,
    params: SimulatorParams | None = None,
    trial_participants: int = 0,
) -> schema.DatasetMetadata:
    """Simulate ``n_patients`` (ids 0..N-1) and write a complete dataset to ``out_dir``.

    Chunks run as Ray tasks, at most ``workers`` in flight (default: the cluster's CPUs), so
    memory stays bounded at any N; the driver only sums counts. ``out_dir`` must be visible
    to every Ray node (local disk on one machine, or a shared filesystem). ``dataset.json`` is
    written last: its presence marks a finished dataset. ``params`` overrides the default
    ``SimulatorParams.from_seed(seed)`` (e.g. a wider latent state); ``seed`` still drives
    the patients. ``trial_participants`` > 0 adds the simulated trial part (``mirror.data.trial``).
    """
    if n_patients < 1:
        raise ValueError(f"n_patients: expected >= 1, got {n_patients}")
    if trial_participants < 0:
        raise ValueError(f"trial_participants: expected >= 0, got {trial_participants}")
    chunk_size = chunk_size or default_chunk_size(n_patients)
    if chunk_size < 1 or chunk_size % BLOCK:
        raise ValueError(
            f"chunk_size: expected a positive multiple of {BLOCK} (the RNG block), got {chunk_size}"
        )
    import ray

    root = Path(out_dir).resolve()
    _prepare_output(root, overwrite)
    began = time.perf_counter()
    params = params or SimulatorParams.from_seed(seed)
    files = params.save(root / schema.GROUND_TRUTH_DIR)
    (root / schema.METADATA_DIR).mkdir(exist_ok=True)  # holds the marker already
    pq.write_table(codes_table(), root / schema.CODES_PARQUET)

    if not ray.is_initialized():
        ray.init()  # honours RAY_ADDRESS
    if workers is None:
        workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
    if workers < 1:
        raise ValueError(f"workers: expected >= 1, got {workers}")
    task = ray.remote(num_cpus=1, max_retries=3)(write_chunk)
    params_ref = ray.put(params)
    row_group = min(ROW_GROUP_PATIENTS, chunk_size)
    n_chunks = math.ceil(n_patients / chunk_size)
    totals: dict[str, Any] = {}  # running sums of the chunks' counts: never rows
    pending, next_chunk, finished = [], 0, 0
    bar = progress(n_patients, "simulating patients")
    while next_chunk < n_chunks or pending:
        while next_chunk < n_chunks and len(pending) < workers:
            first = next_chunk * chunk_size
            n = min(chunk_size, n_patients - first)
            pending.append(task.remote(params_ref, seed, str(root), next_chunk, first, n, row_group))
            next_chunk += 1
        done, pending = ray.wait(pending, num_returns=1)
        result = ray.get(done[0])
        for key in ("events", "forced", "truncated", "data_bytes", "truth_bytes", "condition_events"):
            totals[key] = totals.get(key, 0) + result[key]
        totals["record"] = _add_counts(totals.get("record", {}), result["record"])
        for split in schema.SPLITS:
            totals.setdefault("patients", {}).setdefault(split, 0)
            totals["patients"][split] += result["patients"][split]
            totals.setdefault("histogram", {}).setdefault(split, 0)
            totals["histogram"][split] = totals["histogram"][split] + result["histogram"][split]
        finished += 1
        bar.update(sum(result["patients"].values()))
        logger.info("simulator: %d/%d chunks written", finished, n_chunks)
    bar.close()

    if totals["patients"] != expected_counts(n_patients):
        raise RuntimeError(
            f"simulator: split counts {totals['patients']} != "
            f"expected {expected_counts(n_patients)}"
        )
    trial: dict[str, Any] = {}
    if trial_participants:
        from mirror.data.trial import write_trial  # imports this module

        trial = write_trial(root, trial_participants, seed, workers=workers)
    seconds = time.perf_counter() - began
    metadata = schema.DatasetMetadata(
        name=name or f"simulated-{n_patients}-seed{seed}",
        origin_date=params.origin_date,
        n_weeks=params.n_weeks,
        patients=totals["patients"],
        vocab={"diag_age": DIAG_AGE_VOCAB_SIZE, "week": WeekVocab(params.n_weeks).size}
        | vocabulary_sizes(),
        provenance={
            "simulator": SIMULATOR_NAME,
            "version": SIMULATOR_VERSION,
            "seed": seed,
            "parameters": params.scalars(),
            "parameter_files": {k: os.path.relpath(v, root) for k, v in files.items()},
            "block_size": BLOCK,
            "chunk_size": chunk_size,
            "row_group_size": row_group,
            "compression": COMPRESSION,
            "forced_first_event": int(totals["forced"]),
            "truncated_patients": int(totals["truncated"]),
        } | ({"record": _record_provenance(totals["record"])} if params.simulate_record else {}),
        length_histogram={
            s: {str(k): int(v) for k, v in enumerate(h) if v} for s, h in totals["histogram"].items()
        },
        trial=trial,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        modalities=list(schema.MODALITIES) if params.simulate_record else ["diagnoses"],
        extra={
            "events": int(totals["events"]),
            "chunks": n_chunks,
            "data_bytes": int(totals["data_bytes"]),
            "ground_truth_bytes": int(totals["truth_bytes"]),
            "seconds": round(seconds, 2),
            "condition_events": {
                c.code: int(v) for c, v in zip(CONDITIONS, totals["condition_events"], strict=True)
            },
        },
    )
    metadata.write(root)
    return metadata


__all__ = [
    "BLOCK",
    "LATENT_SCHEMA",
    "SimulatorParams",
    "default_chunk_size",
    "generate_dataset",
    "latent_path",
    "simulate_block",
    "simulate_block_with_truth",
    "truth_path",
    "write_chunk",
]
