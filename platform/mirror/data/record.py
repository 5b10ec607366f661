"""The record stage: procedures, medications, labs and admissions, with causal ground truth.

Called per block of ``simulator.BLOCK`` patients from ``simulator._simulate_full_block`` on its
own RNG stream ``SeedSequence(seed, spawn_key=(2, block))``, so the diagnosis process (stream
``(1, block)``) is unchanged and every patient still depends only on (seed, id). Pure numpy,
vectorised over the block; the only Python loops run over ladder levels (<= 5), lab-ladder
pairs, panels, and admission ranks within a patient (a handful), never over patients or events.

Mechanisms, in order (stage A runs before the diagnosis words are final, stage B after)::

    A1 labs: the nine ``SIMULATED_LABS``; untreated mean at week w of patient i =
         typical + latent (frailty z0, cardiometabolic z1) + age + sex + correlated patient
         intercepts (glycaemic, blood-pressure, lipid factors) + condition shifts once the
         condition is present (E11, E10, I10, N18, E78, E66, I25) + age/drift slope x years;
         a measurement adds independent noise, then the treatment effects, then a clip into
         the lab's plausible [low, high] (clips counted).
    A2 measurement visits: Poisson over the window at rate lab_visit_rate x (0.15 + chronic
         conditions) x exp(0.5 z0) x age factor, capped at 0.5/week: many healthy young
         patients have none. Each visit measures panels (BP, BMI, lipids, FPG, HbA1c, eGFR)
         with probabilities that rise when a related condition is present.
    A3 guideline-like ladders (seed 003, Table II: DM 5 levels, lipids 4, hypertension 3):
         DM A10B, A10B, A10B, A10A, A10A on HbA1c >= dm_threshold (7 %, ADA glycaemic target);
         lipids C10A, C10A, C10A, C10B on LDL >= ldl_threshold (130 mg/dL, NCEP ATP III
         "above optimal" second tier); hypertension C09A, C08C, C03A on SBP >= sbp_threshold
         (140 mmHg, JNC 7/8 stage 1-2 boundary). At a measurement of the ladder's lab whose
         observed (treated) value crosses the threshold, the next level is added with
         probability ladder_add_probability (clinical inertia), so treatment is confounded by
         indication. Start week = that week; end = enrollment end or a geometric
         discontinuation (mean discontinue_weeks).
    A4 individual effects: an addition changes its lab by -fraction[level] x (value at the
         decision - anchor) x LogNormal(0, effect_sigma) x exp(-0.15 z0) (bigger when the
         value is higher; frail patients respond less), from the week after its start to its
         end; secondary labs change by a fixed ratio (FPG 28.7 mg/dL per HbA1c %, the ADAG
         eAG slope; TG 0.25 and HDL -0.05 per LDL mg/dL; DBP 0.5 per SBP mmHg) and insulin
         levels raise BMI. Fractions: metformin-like first oral agent ~1-1.5 % HbA1c at
         HbA1c 8-9 (UKPDS/ADA), statin 30-50 % LDL (CTT), ~10 mmHg SBP per drug class (Law
         et al. BMJ 2009). Effects accumulate across levels.
    A5 lab-driven onsets (E11, I25, N18, I63): an extra hazard per 26-week segment,
         rate x age factor x exp(beta . (treated noise-free lab - reference)): E11 on HbA1c
         (beta 1.6 per %, ref 5.7 %, the prediabetes bound); I25 on LDL (0.0064 per mg/dL:
         CTT's 22 % risk per mmol/L) and SBP (0.02 per mmHg); N18 on eGFR (-0.06 per
         mL/min, ref 75); I63 on SBP (0.035 per mmHg: Lewington et al. 2002, stroke risk
         doubles per 20 mmHg). An onset adds a diagnosis word at its week plus chronic
         follow-up visits (the base simulator's rule) unless the patient has the condition by
         then. Ground truth records the hazard ratio vs the reference value and the factor by
         which the patient's treatments changed it. Lab-driven onsets do not feed back into
         labs (they change diagnoses, medications and admissions only).
    B1 admissions (day resolution): every diagnosis word may open a stay with a
         condition-specific probability (I21, I63, A41, K35, S72 near 0.9; J18 0.35; I50 and
         J44 exacerbations at follow-up visits 0.04-0.08; delivery O80 0.9) times a severity
         multiplier (frailty, age), and any other word with admission_background: one stay
         per patient-week at most, the earliest triggering condition its principal diagnosis.
         A stay that would start before the previous one ends is absorbed (counted).
    B2 regimen: each helpful class group of the admission-week diagnoses (J18/J15/A41/A40/
         J69/N39/L03 -> J01*, I50 -> C03C, I21 -> B01A and C07A, I63 -> B01A, J44 -> R03* and
         H02A) is given with helpful_give_probability; filler classes (IV solutions B05B,
         A02B, N02B, N02A, A04A, A06A, prophylactic B01A, J01) at fixed rates.
    B3 length of stay: LogNormal(mu, los_sigma), mu = log(base LOS of the principal) +
         los_severity x severity + 0.04 x (other admission-week diagnoses, <= 5) + the
         penalty of every helpful group the regimen lacks. ``expected_length_of_stay`` is
         exp(mu + los_sigma^2 / 2) under any regimen: MiranDa's ground truth. Base LOS from
         HCUP Statistical Brief #225 (2016 stays: septicaemia ~5, pneumonia ~3.5-4, heart
         failure ~4, AMI ~3.5-4, delivery ~2.5 days, overall mean 4.6).
    B4 stay content: all diagnosis words in its weeks link through ``condition_stays``;
         procedures by the principal's chapter (curated for common admissions); inpatient
         labs (SBP, DBP, FPG, eGFR at admission, an acute shift added); the regimen as
         medications with start = admit week, end = discharge week.
    B5 outpatient medications: a compact condition -> ATC-3 table for chronic conditions
         (first diagnosis word in the window starts it), acute courses (J01 after
         infections, N02A after fractures, M01A after back pain), never the ladder classes.
    B6 outpatient procedures: per outpatient diagnosis word by organ system (ECG,
         chest X-ray, endoscopy, physical therapy, ...), plus vaccinations (0.35/year) and
         mammography (women 40+, 0.5/year).

Speed (one core, OMP_NUM_THREADS=1, shared box under load): this stage roughly doubles the
cost of a block: ``simulate_block`` ~62,800 patients per CPU-second with it, ~115,000 without
(ratio ~1.83; ``bench/bench_data.py`` ``bench_simulate_block``). It adds ~460 B/patient in
Arrow and ~155 B/patient in zstd Parquet (696 and 234 in all) to the diagnosis rows. Hot
spots are spread thin (lab means and treatment effects over the (visits x 9) matrix, the
ladder grids, per-word draws); every step is vectorised over the block.

Claims-likeness (measured at the defaults in tests/test_record.py and the dataset's
provenance), against published US figures:

* people with >= 1 inpatient stay in a year: ~7 % (MEPS 2017-2018; NCHS Health, United
  States, "hospital stays in the past year" ~7-8 % of persons); commercial claims (< 65)
  are lower, ~5 %.
* hospital length of stay: mean 4.5-4.7 days, median ~3 (AHRQ HCUP Statistical Brief #225,
  2016; #246, 2017).
* prescription drugs: 45.8 % of the US population used >= 1 prescription drug in the past
  30 days, 24 % >= 3 (NCHS Data Brief 334, NHANES 2015-2016); ~66 % of adults (Georgetown
  HPI); ~4 distinct classes among users.
* lab measurements: blood pressure is taken at most office visits; ~3 office visits per
  person-year (NCHS NAMCS 2016: 2.7 visits per person per year).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mirror.data import schema
from mirror.data.conditions import BY_CODE, CONDITIONS
from mirror.data.vocab import N_CONDITIONS, WEEKS_PER_YEAR
from mirror.data.vocabularies import (
    LAB_BY_SHORT,
    SIMULATED_LABS,
    drug_class_id,
    drug_classes,
    procedure_id,
)

if TYPE_CHECKING:
    from mirror.data.simulator import SimulatorParams

DAYS = schema.DAYS_PER_WEEK
N_LABS = len(SIMULATED_LABS)
N_MEDICATIONS = len(drug_classes())
LDL, HDL, TG, SBP, DBP, FPG, HBA1C, EGFR, BMI = (LAB_BY_SHORT[s].id for s in
                                               ("LDL", "HDL", "TG", "SBP", "DBP", "FPG", "HbA1c", "eGFR", "BMI"))
_LOW = np.array([lab.low for lab in SIMULATED_LABS])
_HIGH = np.array([lab.high for lab in SIMULATED_LABS])
_TYPICAL = np.array([lab.typical for lab in SIMULATED_LABS])


def _cid(code: str) -> int:
    return BY_CODE[code].condition_id


def _mid(code: str) -> int:
    return drug_class_id()[code]


def _pid(code: str) -> int:
    return procedure_id()[f"CCS-PR:{code}"]


# ---- labs ------------------------------------------------------------------------------------
# Columns in SIMULATED_LABS order: LDL, HDL, TG, SBP, DBP, FPG, HbA1c, eGFR, BMI. Magnitudes
# from NHANES-like adult distributions (seed 003 Table I: LDL 105 [83, 130], TG 130 [91, 187],
# HDL 50 [41, 61], SBP 120 [108, 132], DBP 70 [60, 78], FPG 101 [92, 117]).
_Z_FRAILTY = np.array([0, -1, 5, 2, 0, 2, 0.05, -4, 0.5])
_Z_CARDIOMETABOLIC = np.array([8, -4, 15, 3, 2, 4, 0.15, -3, 1.5])
_PER_DECADE = np.array([3, 0.5, 4, 3, 0.5, 2, 0.06, -6, 0.3])  # per decade of age over 45
_FEMALE = np.array([-2, 10, -15, -4, -2, -3, 0, 2, -0.3])
_NOISE = np.array([12, 5, 30, 9, 6, 9, 0.2, 6, 0.8])  # visit-to-visit (biological + assay)
_DRIFT_SD = np.array([2, 0.5, 4, 1, 0.5, 1.5, 0.05, 1, 0.3])  # per-patient slope per year
# Patient intercepts: rows are independent N(0, 1) sources, columns labs (shared factors
# make HbA1c/FPG, SBP/DBP and TG/HDL co-vary as they do in people).
_INTERCEPT_MIX = np.zeros((12, N_LABS))
_INTERCEPT_MIX[0, [HBA1C, FPG]] = (0.28, 7)  # glycaemic factor
_INTERCEPT_MIX[1, [SBP, DBP]] = (8, 5)  # blood-pressure factor
_INTERCEPT_MIX[2, [TG, HDL]] = (35, -5)  # atherogenic-dyslipidaemia factor
for _k, _sd in enumerate((26, 10, 25, 7, 4, 5, 0.15, 9, 4.2)):
    _INTERCEPT_MIX[3 + _k, _k] = _sd
# Condition shifts once present (rows; columns labs).
_LAB_CONDITIONS = ("E11", "E10", "I10", "N18", "E78", "E66", "I25")
_CONDITION_SHIFT = np.array([
    # LDL  HDL  TG   SBP  DBP  FPG  HbA1c eGFR  BMI
    [0,   -5,  25,  0,   0,   45,  1.9,  -5,   2.5],  # E11 type 2 diabetes
    [0,    0,   0,  0,   0,   70,  2.6,  -3,   0],  # E10 type 1 diabetes
    [0,    0,   0,  12,  7,   0,   0,    -4,   1],  # I10 hypertension
    [0,    0,  10,  5,   2,   0,   0,    -30,  0],  # N18 chronic kidney disease
    [40,  -4,  30,  0,   0,   0,   0,    0,    0],  # E78 lipid disorders
    [5,   -4,  25,  5,   3,   5,   0.1,  0,    8],  # E66 obesity
    [10,  -2,  10,  3,   0,   0,   0,    -3,   0],  # I25 chronic ischaemic heart disease
])  # fmt: skip

# Panels measured at a visit: (labs, base probability, conditions that raise it, raised to).
_PANELS = (
    ((SBP, DBP), 0.85, (), 0.85),
    ((BMI,), 0.6, ("E66", "E11"), 0.85),
    ((LDL, HDL, TG), 0.25, ("E78", "E11", "I25", "I10"), 0.6),
    ((FPG,), 0.3, ("E11", "E10"), 0.6),
    ((HBA1C,), 0.08, ("E11", "E10"), 0.8),
    ((EGFR,), 0.3, ("N18", "E11", "I10"), 0.6),
)

# ---- ladders -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ladder:
    name: str
    lab: int  # the lab that triggers additions
    threshold_field: str  # SimulatorParams field holding the threshold
    classes: tuple[str, ...]  # ATC-3 class per level
    fractions: tuple[float, ...]  # share of (value - anchor) removed per level
    anchor: float
    secondary: tuple[tuple[int, float], ...]  # (lab, change per unit change of the ladder's lab)
    fixed: tuple[tuple[int, tuple[float, ...]], ...] = ()  # (lab, change per level), e.g. BMI


LADDERS = (
    Ladder("diabetes", HBA1C, "dm_threshold", ("A10B", "A10B", "A10B", "A10A", "A10A"),
           (0.28, 0.18, 0.15, 0.3, 0.15), 5.0, ((FPG, 28.7),), ((BMI, (-0.3, 0, 0, 0.8, 0.4)),)),
    Ladder("lipids", LDL, "ldl_threshold", ("C10A", "C10A", "C10A", "C10B"),
           (0.38, 0.15, 0.12, 0.2), 40.0, ((TG, 0.25), (HDL, -0.05))),
    Ladder("hypertension", SBP, "sbp_threshold", ("C09A", "C08C", "C03A"),
           (0.22, 0.18, 0.15), 100.0, ((DBP, 0.5),)),
)  # fmt: skip
LADDER_CLASSES = frozenset(c for ladder in LADDERS for c in ladder.classes)

# ---- lab-driven onsets ---------------------------------------------------------------------
# condition: (hazard per week at the reference values, age slope per year, {lab: (beta, ref)})
_LAB_ONSETS = {
    "E11": (8e-5, 0.03, {HBA1C: (1.6, 5.7)}),
    "I25": (4e-5, 0.06, {LDL: (0.0064, 100.0), SBP: (0.02, 120.0)}),
    "N18": (3e-5, 0.05, {EGFR: (-0.06, 75.0)}),
    "I63": (1.5e-5, 0.07, {SBP: (0.035, 120.0)}),
}
ONSET_SEGMENT_WEEKS = 26

# ---- admissions ------------------------------------------------------------------------------
# condition: (probability a diagnosis word opens a stay, base median LOS in days)
_ADMIT = {
    "I21": (0.9, 3.0), "I63": (0.85, 3.0), "I61": (0.85, 4.5), "A41": (0.9, 4.5),
    "A40": (0.9, 4.5), "K35": (0.9, 1.8), "S72": (0.9, 4.0), "N17": (0.45, 3.0),
    "J18": (0.3, 3.0), "J15": (0.5, 4.0), "I50": (0.08, 3.2), "J44": (0.04, 2.8),
    "I26": (0.7, 3.0), "K85": (0.6, 3.0), "K56": (0.6, 3.0), "J96": (0.6, 4.0),
    "J69": (0.7, 4.5), "S06": (0.2, 2.2), "K80": (0.2, 2.0), "K57": (0.15, 3.0),
    "I48": (0.03, 2.2), "N39": (0.02, 2.6), "L03": (0.05, 2.8), "E87": (0.1, 2.4),
    "O80": (0.9, 2.0), "F20": (0.03, 6.0), "G40": (0.03, 2.2),
}  # fmt: skip
_BACKGROUND_LOS = 2.5
# Helpful class groups: condition -> ((group classes, log-LOS penalty when absent), ...)
_J01 = ("J01C", "J01D", "J01M", "J01F", "J01X")
_HELPFUL = {
    "J18": ((_J01, 0.35),), "J15": ((_J01, 0.35),), "A41": ((_J01, 0.45),), "A40": ((_J01, 0.45),),
    "J69": ((_J01, 0.3),), "N39": ((_J01, 0.3),), "L03": ((_J01, 0.3),),
    "I50": ((("C03C",), 0.3),), "I21": ((("B01A",), 0.25), (("C07A",), 0.15)),
    "I63": ((("B01A",), 0.2),), "J44": ((("R03A", "R03B"), 0.2), (("H02A",), 0.15)),
}  # fmt: skip
# Filler inpatient classes given regardless of diagnosis: (classes, probability).
_FILLER = ((("B05B",), 0.6), (("N02B",), 0.4), (("A02B",), 0.3), (("N02A",), 0.25),
           (("A04A",), 0.15), (("A06A",), 0.1), (("B01A",), 0.15), (_J01, 0.06))  # fmt: skip
_INPATIENT_LABS = ((SBP, 8.0), (DBP, 4.0), (FPG, 15.0), (EGFR, -5.0))  # (lab, acute shift)

# ---- procedures ------------------------------------------------------------------------------
_CHAPTER_OF_SYSTEM = {
    "Circulatory system": 7, "Respiratory system": 6, "Digestive system": 9,
    "Musculoskeletal and connective tissue": 14, "Injury and poisoning": 14, "Nervous system": 1,
    "Genitourinary system": 10, "Pregnancy and childbirth": 13, "Endocrine and metabolic": 2,
    "Eye and adnexa": 3, "Ear and mastoid": 4, "Skin and subcutaneous tissue": 15,
}  # fmt: skip  (other systems: chapter 16, miscellaneous)
_INPATIENT_PROCEDURES = {
    "I21": (("7.5", 0.6), ("7.3", 0.45), ("16.19", 0.9)), "I63": (("16.2", 0.9), ("16.15", 0.4)),
    "I61": (("16.2", 0.95),), "I50": (("16.14", 0.6), ("16.19", 0.7)), "J18": (("16.5", 0.9),),
    "J15": (("16.5", 0.9), ("16.23", 0.5)), "A41": (("16.23", 0.8), ("16.5", 0.4)),
    "A40": (("16.23", 0.8),), "K35": (("9.12", 0.95),), "S72": (("14.3", 0.6), ("14.7", 0.35)),
    "N17": (("7.16", 0.15), ("16.14", 0.4)), "O80": (("13.7", 0.6), ("13.2", 0.3), ("13.8", 0.3)),
    "J96": (("16.27", 0.5), ("16.22", 0.7)), "I26": (("16.2", 0.8),), "K80": (("9.16", 0.6),),
}  # fmt: skip
_GENERIC_INPATIENT = (("16.19", 0.3), ("16.5", 0.25), ("16.2", 0.2), ("16.33", 0.05))
_OUTPATIENT_BY_SYSTEM = {  # per outpatient diagnosis word: (probability, procedures)
    "Circulatory system": (0.15, ("16.19", "16.14", "16.18")),
    "Respiratory system": (0.08, ("16.5",)),
    "Digestive system": (0.08, ("9.2", "9.8", "16.14")),
    "Musculoskeletal and connective tissue": (0.1, ("16.26", "16.37", "14.9")),
    "Injury and poisoning": (0.3, ("16.37", "16.2")),
    "Eye and adnexa": (0.3, ("16.31",)), "Ear and mastoid": (0.15, ("16.31",)),
    "Mental and behavioural": (0.15, ("16.29",)),
    "Genitourinary system": (0.1, ("16.14", "10.1")),
    "Pregnancy and childbirth": (0.4, ("16.14", "13.7")),
    "Neoplasms": (0.3, ("16.2", "16.35", "16.25")),
    "Nervous system": (0.08, ("16.15", "16.16")),
    "Skin and subcutaneous tissue": (0.05, ("15.7",)),
}  # fmt: skip
# (procedure, rate per year, sex: 0 any / 1 female, minimum age)
_PREVENTIVE = (("16.39", 0.35, 0, 0.0), ("16.4", 0.5, 1, 40.0))

# ---- outpatient medications ------------------------------------------------------------------
# chronic condition -> ((class, probability of starting it at the first diagnosis word), ...)
_CHRONIC_MEDS = {
    "J45": (("R03A", 0.7), ("R03B", 0.4)), "J44": (("R03A", 0.6), ("R03B", 0.6)),
    "F33": (("N06A", 0.6),), "F41": (("N06A", 0.4), ("N05B", 0.2)), "E03": (("H03A", 0.85),),
    "I48": (("B01A", 0.7), ("C07A", 0.5)), "I25": (("B01A", 0.7), ("C07A", 0.5), ("C01D", 0.2)),
    "I50": (("C03C", 0.7), ("C07A", 0.5)), "K21": (("A02B", 0.6),), "M81": (("M05B", 0.5),),
    "G40": (("N03A", 0.8),), "M10": (("M04A", 0.6),), "N40": (("G04C", 0.5),),
    "J30": (("R06A", 0.4), ("R01A", 0.3)), "F20": (("N05A", 0.8),), "G43": (("N02C", 0.4),),
    "G20": (("N04B", 0.8),), "B20": (("J05A", 0.9),), "M05": (("L04A", 0.5), ("H02A", 0.3)),
    "E05": (("H03B", 0.7),), "G30": (("N06D", 0.6),), "M17": (("M01A", 0.4),),
    "F90": (("N06B", 0.7),), "G47": (("N05C", 0.3),), "L40": (("D05A", 0.5),),
    "K58": (("A03A", 0.3),), "F17": (("N07B", 0.15),), "E28": (("G03A", 0.4),),
    "J32": (("R01A", 0.4),), "L20": (("D07A", 0.5),),
}  # fmt: skip
# acute condition -> (probability of a course, classes drawn uniformly, course weeks)
_ACUTE_MEDS = {
    **{c: (0.6, _J01, 1) for c in ("J18", "J15", "N39", "N30", "L03", "J01", "J03", "J02")},
    **{c: (0.3, _J01, 1) for c in ("J06", "J20", "H66")},
    "F32": (0.5, ("N06A",), 26), "S72": (0.4, ("N02A",), 2), "S82": (0.3, ("N02A",), 2),
    "M54": (0.3, ("M01A", "M03B"), 2),
    # Common outpatient courses (NAMCS: ~3 in 4 office visits end with a drug mention).
    **{c: (0.5, _J01, 1) for c in ("J40", "N76", "H60", "H65")},
    **{c: (0.35, ("M01A", "N02B"), 2) for c in ("M25", "M79", "M19")},
    **{c: (0.4, ("D07A",), 2) for c in ("L30", "L21", "L23")},
    "H10": (0.4, ("S01A",), 1), "B35": (0.4, ("D01A",), 4), "B37": (0.5, ("J02A",), 1),
    "K59": (0.4, ("A06A",), 2), "R11": (0.3, ("A04A",), 1), "R51": (0.2, ("N02B",), 1),
    "G44": (0.2, ("N02B", "N02C"), 1), "A09": (0.2, ("A07D",), 1), "K52": (0.2, ("A07D",), 1),
    "R05": (0.25, ("R05C",), 1), "B00": (0.5, ("J05A",), 1), "B02": (0.6, ("J05A",), 1),
    "T78": (0.4, ("R06A", "H02A"), 1), "E55": (0.5, ("A11C",), 26), "D50": (0.6, ("B03A",), 13),
    "N95": (0.3, ("G03C",), 26), "L70": (0.5, ("D10A",), 13),
}  # fmt: skip


# ---- parameter helpers -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Tables:
    """Module tables as dense arrays indexed by condition id, built once per process."""

    lab_condition_index: np.ndarray  # (605,) index into _LAB_CONDITIONS or -1
    admit_prob: np.ndarray  # (605,)
    log_base_los: np.ndarray  # (605,)
    chapter: np.ndarray  # (605,) CCS chapter of the condition's system
    helpful_group: np.ndarray  # (605, G) bool: condition needs group g
    helpful_penalty: np.ndarray  # (605, G)
    group_classes: tuple[np.ndarray, ...]  # G arrays of medication ids
    group_member: np.ndarray  # (243, G) bool: class belongs to group g
    chronic_med_cond: np.ndarray  # (R,) condition ids
    chronic_med_class: np.ndarray  # (R,)
    chronic_med_prob: np.ndarray  # (R,)
    chronic_med_ptr: np.ndarray  # (606,) CSR over condition ids
    acute_prob: np.ndarray  # (605,)
    acute_weeks: np.ndarray  # (605,)
    acute_classes: np.ndarray  # (605, 5) medication ids, -1 padded
    acute_n_classes: np.ndarray  # (605,)
    outpatient_prob: np.ndarray  # (605,)
    outpatient_procs: np.ndarray  # (605, 3) procedure ids, -1 padded
    outpatient_n: np.ndarray  # (605,)
    inpatient_procs: np.ndarray  # (605, 3) procedure ids, -1 padded
    inpatient_probs: np.ndarray  # (605, 3)
    chapter_procs: dict[int, np.ndarray]  # chapter -> procedure ids

    @classmethod
    def build(cls) -> _Tables:
        systems = [c.system for c in CONDITIONS]
        lab_index = np.full(N_CONDITIONS, -1)
        for k, code in enumerate(_LAB_CONDITIONS):
            lab_index[_cid(code)] = k
        admit = np.zeros(N_CONDITIONS)
        los = np.full(N_CONDITIONS, np.log(_BACKGROUND_LOS))
        for code, (prob, days) in _ADMIT.items():
            admit[_cid(code)], los[_cid(code)] = prob, np.log(days)
        chapter = np.array([_CHAPTER_OF_SYSTEM.get(s, 16) for s in systems])
        groups: list[tuple[str, ...]] = []
        for entries in _HELPFUL.values():
            for classes, _ in entries:
                if classes not in groups:
                    groups.append(classes)
        need = np.zeros((N_CONDITIONS, len(groups)), bool)
        penalty = np.zeros((N_CONDITIONS, len(groups)))
        for code, entries in _HELPFUL.items():
            for classes, pen in entries:
                need[_cid(code), groups.index(classes)] = True
                penalty[_cid(code), groups.index(classes)] = pen
        member = np.zeros((N_MEDICATIONS, len(groups)), bool)
        for g, classes in enumerate(groups):
            member[[_mid(c) for c in classes], g] = True
        rows = sorted((_cid(code), _mid(cls_), p) for code, entries in _CHRONIC_MEDS.items()
                      for cls_, p in entries)
        r_cond = np.array([r[0] for r in rows])
        acute_prob = np.zeros(N_CONDITIONS)
        acute_weeks = np.zeros(N_CONDITIONS, np.int64)
        acute_classes = np.full((N_CONDITIONS, 5), -1)
        acute_n = np.zeros(N_CONDITIONS, np.int64)
        for code, (prob, classes, weeks) in _ACUTE_MEDS.items():
            c = _cid(code)
            acute_prob[c], acute_weeks[c], acute_n[c] = prob, weeks, len(classes)
            acute_classes[c, : len(classes)] = [_mid(x) for x in classes]
        out_prob = np.zeros(N_CONDITIONS)
        out_procs = np.full((N_CONDITIONS, 3), -1)
        out_n = np.zeros(N_CONDITIONS, np.int64)
        for c, s in enumerate(systems):
            if s in _OUTPATIENT_BY_SYSTEM:
                prob, procs = _OUTPATIENT_BY_SYSTEM[s]
                out_prob[c], out_n[c] = prob, len(procs)
                out_procs[c, : len(procs)] = [_pid(x) for x in procs]
        in_procs = np.full((N_CONDITIONS, 3), -1)
        in_probs = np.zeros((N_CONDITIONS, 3))
        for code, entries in _INPATIENT_PROCEDURES.items():
            for j, (proc, prob) in enumerate(entries):
                in_procs[_cid(code), j], in_probs[_cid(code), j] = _pid(proc), prob
        from mirror.data.vocabularies import procedure_categories

        by_chapter: dict[int, list[int]] = {}
        for proc in procedure_categories():
            by_chapter.setdefault(int(proc.parent_code.split(":")[1]), []).append(proc.id)
        return cls(
            lab_condition_index=lab_index, admit_prob=admit, log_base_los=los, chapter=chapter,
            helpful_group=need, helpful_penalty=penalty,
            group_classes=tuple(np.array([_mid(c) for c in g]) for g in groups), group_member=member,
            chronic_med_cond=r_cond, chronic_med_class=np.array([r[1] for r in rows]),
            chronic_med_prob=np.array([r[2] for r in rows]),
            chronic_med_ptr=np.searchsorted(r_cond, np.arange(N_CONDITIONS + 1)),
            acute_prob=acute_prob, acute_weeks=acute_weeks, acute_classes=acute_classes,
            acute_n_classes=acute_n, outpatient_prob=out_prob, outpatient_procs=out_procs,
            outpatient_n=out_n, inpatient_procs=in_procs, inpatient_probs=in_probs,
            chapter_procs={k: np.array(v) for k, v in by_chapter.items()},
        )


_TABLES: _Tables | None = None


def tables() -> _Tables:
    global _TABLES
    if _TABLES is None:
        _TABLES = _Tables.build()
    return _TABLES


# ---- ragged per-patient groups ------------------------------------------------------------


@dataclass
class Ragged:
    """Flat per-event columns of a block of patients, ``offsets`` (n + 1) into them."""

    offsets: np.ndarray
    columns: dict[str, np.ndarray]
    _arrow_offsets: pa.Array | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def build(cls, n: int, patient: np.ndarray, columns: dict[str, np.ndarray]) -> Ragged:
        """``patient`` must be sorted (non-decreasing)."""
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(patient, minlength=n), out=offsets[1:])
        return cls(offsets, columns)

    def slice(self, lo: int, hi: int) -> Ragged:
        a, b = self.offsets[lo], self.offsets[hi]
        return Ragged(self.offsets[lo : hi + 1] - a, {k: v[a:b] for k, v in self.columns.items()})

    @staticmethod
    def concat(parts: list[Ragged]) -> Ragged:
        ends = np.cumsum([p.offsets[-1] for p in parts])
        offsets = [parts[0].offsets] + [p.offsets[1:] + e for p, e in zip(parts[1:], ends[:-1], strict=True)]
        return Ragged(np.concatenate(offsets),
                      {k: np.concatenate([p.columns[k] for p in parts]) for k in parts[0].columns})

    def list_array(self, name: str, value_type: pa.DataType) -> pa.Array:
        if self._arrow_offsets is None:  # cast once for all the group's columns
            self._arrow_offsets = pa.array(self.offsets.astype(np.int32))
        return pa.ListArray.from_arrays(self._arrow_offsets, pa.array(self.columns[name], value_type))


# Ground-truth schemas (``ground_truth/<kind>/<split>/part-NNNNN.parquet``, one row per patient).
TREATMENTS, ADMISSIONS, ONSETS = "treatments", "admissions", "onsets"
TREATMENT_COLUMNS = {  # per addition
    "addition_weeks": pa.int32(), "addition_end_weeks": pa.int32(), "addition_ladders": pa.int8(),
    "addition_levels": pa.int8(), "addition_medications": pa.int16(),
}
EFFECT_COLUMNS = {  # per (addition, affected lab)
    "effect_additions": pa.int16(),  # index into the patient's additions
    "effect_labs": pa.int8(),
    "effect_values": pa.float32(),  # true change of the lab (treated - untreated), its unit
    "next_weeks": pa.int32(),  # week of the next outpatient measurement of the lab after the
    #                            start (-1: none in the window)
    "next_observed": pa.float32(),  # its recorded value (NaN: none)
    "next_counterfactual": pa.float32(),  # the same measurement without this addition (same
    #                                       noise draw, other additions kept)
}
STAY_COLUMNS = {  # per admission, parallel to the patient's admission lists
    "stay_principal": pa.int16(),  # condition id of the principal (triggering) diagnosis
    "stay_severity": pa.float32(),
    "stay_expected_los": pa.float32(),  # expected LOS under the given regimen (days)
    "stay_expected_los_without_helpful": pa.float32(),
    "stay_expected_los_all_helpful": pa.float32(),
    "stay_censored": pa.bool_(),  # discharge cut at enrollment end
}
ONSET_COLUMNS = {
    "onset_conditions": pa.int16(), "onset_weeks": pa.int32(),
    "onset_hazard_ratios": pa.float32(),  # lab hazard at the patient's values / at the references
    "onset_treatment_hazard_ratios": pa.float32(),  # treated / untreated lab hazard at onset
}


def _truth_schema(columns: dict[str, pa.DataType]) -> pa.Schema:
    return pa.schema([pa.field(schema.SUBJECT_ID, pa.int64(), nullable=False)]
                     + [pa.field(k, pa.list_(t), nullable=False) for k, t in columns.items()])


TRUTH_SCHEMAS = {
    TREATMENTS: _truth_schema(TREATMENT_COLUMNS | EFFECT_COLUMNS),
    ADMISSIONS: _truth_schema(STAY_COLUMNS),
    ONSETS: _truth_schema(ONSET_COLUMNS),
}


@dataclass
class Record:
    """One block's record modalities and ground truth (Ragged groups over its patients)."""

    procedures: Ragged
    medications: Ragged
    labs: Ragged
    admissions: Ragged
    condition_stays: np.ndarray  # parallel to the block's diagnosis words
    additions: Ragged
    effects: Ragged
    stays: Ragged
    onsets: Ragged
    counts: dict[str, np.ndarray]  # per-patient counters (n,) summed in provenance

    GROUPS = ("procedures", "medications", "labs", "admissions", "additions", "effects", "stays", "onsets")

    def slice(self, lo: int, hi: int, word_lo: int, word_hi: int) -> Record:
        return Record(**{g: getattr(self, g).slice(lo, hi) for g in self.GROUPS},
                      condition_stays=self.condition_stays[word_lo:word_hi],
                      counts={k: v[lo:hi] for k, v in self.counts.items()})

    @staticmethod
    def concat(parts: list[Record]) -> Record:
        return Record(**{g: Ragged.concat([getattr(p, g) for p in parts]) for g in Record.GROUPS},
                      condition_stays=np.concatenate([p.condition_stays for p in parts]),
                      counts={k: np.concatenate([p.counts[k] for p in parts]) for k in parts[0].counts})

    def row_columns(self) -> dict[str, pa.Array]:
        """The record's ``ROW_SCHEMA`` list columns (``condition_stays`` needs the word offsets)."""
        S = schema
        t = {f.name: f.type.value_type for f in S.ROW_SCHEMA if pa.types.is_list(f.type)}
        out = {}
        for group, names in ((self.procedures, S.MODALITY_COLUMNS["procedures"]),
                             (self.medications, S.MODALITY_COLUMNS["medications"]),
                             (self.labs, S.MODALITY_COLUMNS["labs"]),
                             (self.admissions, S.MODALITY_COLUMNS["admissions"])):
            for name in names:
                out[name] = group.list_array(name, t[name])
        return out

    def truth_tables(self, subject_id: np.ndarray) -> dict[str, pa.Table]:
        ids = pa.array(subject_id, pa.int64())

        def table(kind: str, groups: list[tuple[Ragged, dict]]) -> pa.Table:
            arrays = [ids] + [g.list_array(k, t) for g, cols in groups for k, t in cols.items()]
            return pa.Table.from_arrays(arrays, schema=TRUTH_SCHEMAS[kind])

        return {
            TREATMENTS: table(TREATMENTS, [(self.additions, TREATMENT_COLUMNS), (self.effects, EFFECT_COLUMNS)]),
            ADMISSIONS: table(ADMISSIONS, [(self.stays, STAY_COLUMNS)]),
            ONSETS: table(ONSETS, [(self.onsets, ONSET_COLUMNS)]),
        }


# ---- the block state the diagnosis process hands over ---------------------------------------


@dataclass
class BlockState:
    """What the record stage needs from the diagnosis process of one block."""

    female: np.ndarray  # (n,) bool
    birth: np.ndarray  # (n,) int64 week
    start: np.ndarray  # (n,) int64 first enrolled week
    end: np.ndarray  # (n,) int64 last enrolled week (inclusive)
    z: np.ndarray  # (n, K) latent state
    utilisation: np.ndarray  # (n,) frailty-driven visit multiplier of the base simulator
    present_p: np.ndarray  # chronic conditions present by the window end: patient,
    present_c: np.ndarray  # condition id,
    present_t: np.ndarray  # onset time in weeks (-inf if prevalent at enrollment)

    @property
    def n(self) -> int:
        return len(self.start)

    def age_at(self, p: np.ndarray, week: np.ndarray) -> np.ndarray:
        return (week - self.birth[p]) / WEEKS_PER_YEAR


def block_rng(seed: int, block: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2, block)))


# ---- stage A: labs, ladders, lab-driven onsets ----------------------------------------------


@dataclass
class LabStage:
    patient_level: np.ndarray  # (n, 9) untreated mean at enrollment start, without conditions
    slope: np.ndarray  # (n, 9) change per week (drift + ageing)
    onset: np.ndarray  # (n, len(_LAB_CONDITIONS)) week the condition is present from (inf never)
    add_p: np.ndarray  # additions, sorted by patient: patient, ladder, level, start, end
    add_ladder: np.ndarray
    add_level: np.ndarray
    add_start: np.ndarray
    add_end: np.ndarray
    add_effect: np.ndarray  # (A, 9) change of every lab while active
    visit_p: np.ndarray  # outpatient visits sorted by (patient, week)
    visit_w: np.ndarray
    measured: np.ndarray  # (V, 9) bool
    meas_v: np.ndarray  # np.nonzero(measured): visit and lab of every outpatient measurement
    meas_lab: np.ndarray
    meas_cell: np.ndarray  # meas_v * 9 + meas_lab (flat index into the (V, 9) matrices)
    values: np.ndarray  # (V, 9) treated, clipped values (meaningful where measured)
    unclipped: np.ndarray  # (V, 9) treated values before the clip
    effect_rows: dict[str, np.ndarray]  # effect ground truth, flat, sorted by patient
    extra_p: np.ndarray  # diagnosis words from lab-driven onsets and their follow-ups
    extra_w: np.ndarray
    extra_c: np.ndarray
    onset_rows: dict[str, np.ndarray]  # onset ground truth, flat, sorted by patient
    clipped: np.ndarray  # (n,) outpatient values clipped into the plausible range


def _lab_mean(st: BlockState, level: np.ndarray, slope: np.ndarray, onset: np.ndarray,
              p: np.ndarray, week: np.ndarray, cols: np.ndarray | None = None) -> np.ndarray:
    """Untreated noise-free value of the labs ``cols`` (default all) for (patient, week)
    queries: (Q, len(cols))."""
    shift = _CONDITION_SHIFT
    if cols is not None:
        level, slope, shift = level[:, cols], slope[:, cols], shift[:, cols]
    mean = slope[p]
    mean *= (week - st.start[p])[:, None]
    mean += level[p]
    present = (onset[p] <= week[:, None]).astype(np.float64)  # (Q, C)
    mean += present @ shift
    return mean


def _active_effects(query_key: np.ndarray, add_p: np.ndarray, add_start: np.ndarray,
                    add_end: np.ndarray, effect: np.ndarray, n_weeks: int) -> np.ndarray:
    """Summed effects of the additions active at each query (patient x n_weeks + week keys,
    sorted): an addition acts on weeks (start, end]. Difference array + cumsum, no loop; the
    cumsum runs over the rows where an addition starts or ends only (the zero rows between
    change no bit of it)."""
    n_query = len(query_key)
    out = np.zeros((n_query + 1, effect.shape[1]))
    lo = np.searchsorted(query_key, add_p * n_weeks + add_start + 1)
    hi = np.searchsorted(query_key, add_p * n_weeks + add_end + 1)
    np.add.at(out, lo, effect)
    np.add.at(out, hi, -effect)
    touched = np.zeros(n_query + 1, bool)
    touched[lo] = touched[hi] = True
    rows = np.flatnonzero(touched[:-1])
    running = np.zeros((len(rows) + 1, effect.shape[1]))
    np.cumsum(out[rows], axis=0, out=running[1:])
    latest = np.zeros(n_query, np.int64)  # 1 + position in rows of the last touched row <= query
    latest[rows] = np.arange(1, len(rows) + 1)
    return running[np.maximum.accumulate(latest)]


def lab_stage(p: SimulatorParams, st: BlockState, rng: np.random.Generator) -> LabStage:
    n, W = st.n, p.n_weeks
    t = tables()
    # Conditions that shift labs: week present from (-inf prevalent, inf never).
    onset = np.full((n, len(_LAB_CONDITIONS)), np.inf)
    k = t.lab_condition_index[st.present_c]
    keep = k >= 0
    onset[st.present_p[keep], k[keep]] = st.present_t[keep]
    burden = np.bincount(st.present_p, minlength=n)

    # Patient level at enrollment start and weekly slope.
    age0 = (st.start - st.birth) / WEEKS_PER_YEAR
    z0, z1 = st.z[:, 0].astype(np.float64), st.z[:, 1].astype(np.float64)
    level = (_TYPICAL + z0[:, None] * _Z_FRAILTY + z1[:, None] * _Z_CARDIOMETABOLIC
             + ((age0 - 45.0) / 10.0)[:, None] * _PER_DECADE + st.female[:, None] * _FEMALE
             + rng.standard_normal((n, _INTERCEPT_MIX.shape[0])) @ _INTERCEPT_MIX)
    slope = (_PER_DECADE / 10.0 + _DRIFT_SD * rng.standard_normal((n, N_LABS))) / WEEKS_PER_YEAR

    # Outpatient measurement visits, sorted by (patient, week) through one sort of keys.
    duration = st.end - st.start + 1
    age_factor = np.clip(np.exp(0.025 * (age0 - 45.0)), 0.3, 3.0)
    rate = np.minimum(p.lab_visit_rate * (0.15 + burden) * np.exp(0.5 * z0 - 0.125) * age_factor, 0.5)
    n_visits = rng.poisson(rate * duration)
    vp = np.repeat(np.arange(n), n_visits)
    vw = st.start[vp] + np.floor(rng.random(len(vp)) * duration[vp]).astype(np.int64)
    key = np.sort(vp * W + vw, kind="stable")  # sorted by patient already: timsort's runs
    vp, vw = key // W, key % W
    v_onset_present = onset[vp] <= vw[:, None]  # (V, C)
    measured = np.zeros((len(vp), N_LABS), bool)
    u = rng.random((len(vp), len(_PANELS)))
    cond_col = {c: j for j, c in enumerate(_LAB_CONDITIONS)}
    for j, (labs, base, conds, raised) in enumerate(_PANELS):
        prob = np.full(len(vp), base)
        if conds:
            prob[v_onset_present[:, [cond_col.get(c, 0) for c in conds if c in cond_col]].any(axis=1)] = raised
        measured[:, list(labs)] = (u[:, j] < prob)[:, None]
    # Noise only where a lab is measured (other cells of the (V, 9) matrix are never read).
    meas_cell = np.flatnonzero(measured)  # flat (V x 9) index of every measurement
    meas_v, meas_lab = np.divmod(meas_cell, N_LABS)
    untreated = _lab_mean(st, level, slope, onset, vp, vw)
    untreated.ravel()[meas_cell] += rng.standard_normal(len(meas_v)) * _NOISE[meas_lab]

    # Ladders: additions found level by level on a (candidate patients x measurements) grid.
    adds: list[tuple[np.ndarray, ...]] = []
    for li, ladder in enumerate(LADDERS):
        threshold = getattr(p, ladder.threshold_field)
        # Decision points: measurements whose inertia coin says "act" and whose untreated value
        # crosses the threshold (treatment only lowers the ladder's lab, so no other can).
        rows = np.flatnonzero(measured[:, ladder.lab])
        vals = untreated[rows, ladder.lab]
        sel = (rng.random(len(rows)) < p.ladder_add_probability) & (vals >= threshold)
        rows, vals = rows[sel], vals[sel]
        rp = vp[rows]
        m_counts = np.bincount(rp, minlength=n)
        cand_ids = np.flatnonzero(m_counts)
        width = int(m_counts.max(initial=0))
        if not len(cand_ids):
            continue
        slot = np.zeros(n, np.int64)
        slot[cand_ids] = np.arange(len(cand_ids))
        first_row = np.cumsum(m_counts) - m_counts
        col = np.arange(len(rp)) - first_row[rp]
        grid_val = np.full((len(cand_ids), width), -np.inf)
        grid_week = np.full((len(cand_ids), width), W, np.int64)
        grid_val[slot[rp], col] = vals
        grid_week[slot[rp], col] = vw[rows]
        last = np.full(len(cand_ids), -1)
        cols = np.arange(width)
        for step, fraction in enumerate(ladder.fractions):
            ok = (grid_val >= threshold) & (cols > last[:, None])
            hit = ok.any(axis=1)
            if not hit.any():
                break
            r = np.flatnonzero(hit)
            c = ok[r].argmax(axis=1)
            w0 = grid_week[r, c]
            value = grid_val[r, c]
            end_ = np.minimum(w0 + rng.geometric(1.0 / p.discontinue_weeks, len(r)) - 1, st.end[cand_ids[r]])
            end_ = np.maximum(end_, w0)
            size = (fraction * np.maximum(value - ladder.anchor, 0.0)
                    * np.exp(p.effect_sigma * rng.standard_normal(len(r)) - p.effect_sigma**2 / 2)
                    * np.exp(-0.15 * st.z[cand_ids[r], 0]))
            effect = np.zeros((len(r), N_LABS))
            effect[:, ladder.lab] = -size
            for lab, ratio in ladder.secondary:
                effect[:, lab] = -size * ratio
            for lab, per_level in ladder.fixed:
                effect[:, lab] = per_level[step]
            active = (grid_week[r] > w0[:, None]) & (grid_week[r] <= end_[:, None])
            grid_val[r] += np.where(active, effect[:, [ladder.lab]], 0.0)
            last[r] = c
            adds.append((cand_ids[r], np.full(len(r), li), np.full(len(r), step), w0, end_, effect))
    if adds:
        add_p, add_ladder, add_level, add_start, add_end = (np.concatenate([a[i] for a in adds]) for i in range(5))
        add_effect = np.concatenate([a[5] for a in adds])
        order = np.lexsort((add_level, add_ladder, add_start, add_p))
        add_p, add_ladder, add_level = add_p[order], add_ladder[order], add_level[order]
        add_start, add_end, add_effect = add_start[order], add_end[order], add_effect[order]
    else:
        add_p = add_ladder = add_level = add_start = add_end = np.zeros(0, np.int64)
        add_effect = np.zeros((0, N_LABS))
    visit_key = vp * W + vw
    unclipped = untreated + _active_effects(visit_key, add_p, add_start, add_end, add_effect, W)
    values = np.clip(unclipped, _LOW, _HIGH)
    clipped = np.bincount(vp[meas_v], weights=values.ravel()[meas_cell] != unclipped.ravel()[meas_cell], minlength=n)

    # Effect ground truth: per (addition, affected lab), the next outpatient measurement.
    e_add, e_lab, e_val, e_week, e_obs, e_cf = [], [], [], [], [], []
    for lab in range(N_LABS):
        affected = np.flatnonzero(add_effect[:, lab] != 0)
        if not len(affected):
            continue
        rows = np.flatnonzero(measured[:, lab])
        keys = visit_key[rows]
        nxt = np.searchsorted(keys, add_p[affected] * W + add_start[affected] + 1)
        found = nxt < len(rows)
        found[found] &= vp[rows[nxt[found]]] == add_p[affected[found]]
        row = rows[np.minimum(nxt, len(rows) - 1)] if len(rows) else np.zeros(len(nxt), np.int64)
        week = np.where(found, vw[row], -1)
        within = found & (week <= add_end[affected])
        obs = np.where(found, values[row, lab], np.nan)
        cf = np.where(found, np.clip(unclipped[row, lab] - np.where(within, add_effect[affected, lab], 0.0),
                                     _LOW[lab], _HIGH[lab]), np.nan)
        e_add.append(affected)
        e_lab.append(np.full(len(affected), lab))
        e_val.append(add_effect[affected, lab])
        e_week.append(week)
        e_obs.append(obs)
        e_cf.append(cf)
    if e_add:
        e_add_all = np.concatenate(e_add)
        order = np.lexsort((np.concatenate(e_lab), e_add_all))
        patient_first = np.searchsorted(add_p, add_p)  # index of each patient's first addition
        effect_rows = {
            "patient": add_p[e_add_all[order]],
            "effect_additions": (e_add_all - patient_first[e_add_all])[order],
            "effect_labs": np.concatenate(e_lab)[order],
            "effect_values": np.concatenate(e_val)[order],
            "next_weeks": np.concatenate(e_week)[order],
            "next_observed": np.concatenate(e_obs)[order],
            "next_counterfactual": np.concatenate(e_cf)[order],
        }
    else:
        effect_rows = {"patient": np.zeros(0, np.int64)} | {k: np.zeros(0) for k in EFFECT_COLUMNS}

    # Lab-driven onsets: piecewise-constant hazard on 26-week segments of each adult's window
    # (ragged: one row per segment), inverted exactly against one Exp(1) draw per condition.
    adult = np.flatnonzero(st.age_at(np.arange(n), st.end) >= 18)
    n_seg = -(-duration[adult] // ONSET_SEGMENT_WEEKS)
    seg_p = np.repeat(adult, n_seg)
    seg_first = np.cumsum(n_seg) - n_seg
    seg_start = st.start[seg_p] + _rank_within(np.repeat(np.arange(len(adult)), n_seg), len(adult)) * ONSET_SEGMENT_WEEKS
    seg_len = np.minimum(st.end[seg_p] + 1 - seg_start, ONSET_SEGMENT_WEEKS)
    seg_mid = seg_start + seg_len // 2
    cols = np.array([HBA1C, LDL, SBP, EGFR])
    col_of = {lab: j for j, lab in enumerate(cols)}
    untreated_mean = _lab_mean(st, level, slope, onset, seg_p, seg_mid, cols)
    treated_mean = untreated_mean + _active_effects(seg_p * W + seg_mid, add_p, add_start, add_end,
                                                    add_effect[:, cols], W)
    seg_age = st.age_at(seg_p, seg_mid)
    o_p, o_c, o_w, o_hr, o_thr = [], [], [], [], []
    for code, (base, age_slope, betas) in _LAB_ONSETS.items():
        c = _cid(code)
        log_hr = np.zeros(len(seg_p))
        log_untreated = np.zeros(len(seg_p))
        for lab, (beta, ref) in betas.items():
            log_hr += beta * (treated_mean[:, col_of[lab]] - ref)
            log_untreated += beta * (untreated_mean[:, col_of[lab]] - ref)
        hazard = (p.lab_onset_scale * base * seg_len * np.exp(np.minimum(log_hr, 5.0) + age_slope * (seg_age - 55.0))
                  * (seg_age >= 18))
        cum = np.cumsum(hazard)
        floor_ = cum[seg_first] - hazard[seg_first]  # cumulative hazard before each patient
        draw = rng.standard_exponential(len(adult))
        hit = np.flatnonzero(draw < cum[seg_first + n_seg - 1] - floor_)
        flat = np.searchsorted(cum, floor_[hit] + draw[hit], side="right")
        before = cum[flat] - hazard[flat]
        hp = adult[hit]
        frac = (floor_[hit] + draw[hit] - before) / hazard[flat]
        week = np.minimum(seg_start[flat] + np.floor(frac * seg_len[flat]).astype(np.int64), st.end[hp])
        sel = st.present_c == c
        first = np.full(n, np.inf)
        first[st.present_p[sel]] = st.present_t[sel]  # one onset per (patient, condition)
        new = first[hp] > week  # the patient does not have it yet
        o_p.append(hp[new])
        o_c.append(np.full(new.sum(), c))
        o_w.append(week[new])
        o_hr.append(np.exp(log_hr[flat[new]]))
        o_thr.append(np.exp(log_hr[flat[new]] - log_untreated[flat[new]]))
    on_p, on_c, on_w = np.concatenate(o_p), np.concatenate(o_c), np.concatenate(o_w)
    order = np.lexsort((on_c, on_w, on_p))
    onset_rows = {"patient": on_p[order], "onset_conditions": on_c[order], "onset_weeks": on_w[order],
                  "onset_hazard_ratios": np.concatenate(o_hr)[order],
                  "onset_treatment_hazard_ratios": np.concatenate(o_thr)[order]}
    # Follow-up visits of the new chronic conditions (the base simulator's rule).
    span = (st.end[on_p] + 1 - on_w).astype(np.float64)
    noise = rng.gamma(p.visit_shape, 1.0 / p.visit_shape, len(on_p))
    visit_rate = np.minimum(p.visit_rate[on_c] * st.utilisation[on_p] * noise, 0.5)
    rep = np.repeat(np.arange(len(on_p)), rng.poisson(visit_rate * span))
    fu_w = on_w[rep] + np.floor(rng.random(len(rep)) * span[rep]).astype(np.int64)
    return LabStage(
        patient_level=level, slope=slope, onset=onset, add_p=add_p, add_ladder=add_ladder,
        add_level=add_level, add_start=add_start, add_end=add_end, add_effect=add_effect,
        visit_p=vp, visit_w=vw, measured=measured, meas_v=meas_v, meas_lab=meas_lab, meas_cell=meas_cell,
        values=values, unclipped=unclipped,
        effect_rows=effect_rows, extra_p=np.concatenate([on_p, on_p[rep]]),
        extra_w=np.concatenate([on_w, fu_w]), extra_c=np.concatenate([on_c, on_c[rep]]),
        onset_rows=onset_rows, clipped=clipped,
    )


# ---- length of stay ground truth ---------------------------------------------------------------


def _log_los_mean(p: SimulatorParams, principal: np.ndarray, severity: np.ndarray,
                  n_diagnoses: np.ndarray, needs: np.ndarray, has: np.ndarray) -> np.ndarray:
    """mu of the log-normal LOS. ``needs``/``has``: (S, G) bool, helpful groups the stay's
    diagnoses need / the regimen contains; ``needs`` carries the largest penalty per group."""
    t = tables()
    missing_penalty = (needs * ~has).astype(np.float64)
    return (t.log_base_los[principal] + p.los_severity * severity
            + 0.04 * np.minimum(np.maximum(n_diagnoses - 1, 0), 5) + missing_penalty.sum(axis=1))


def _needs_from_pairs(stay: np.ndarray, condition: np.ndarray, n_stays: int) -> np.ndarray:
    """(S, G) penalty each stay's diagnoses attach to each helpful group (max over diagnoses)."""
    t = tables()
    out = np.zeros((n_stays, t.helpful_penalty.shape[1]))
    np.maximum.at(out, stay, t.helpful_penalty[condition])
    return out


def expected_length_of_stay(params: SimulatorParams, principal: np.ndarray, severity: np.ndarray,
                            diagnoses: np.ndarray, regimen: np.ndarray) -> np.ndarray:
    """True expected length of stay (days) of stays under ANY regimen: MiranDa's ground truth.

    ``principal``: (S,) condition id of each stay's principal diagnosis; ``severity``: (S,) as
    in ``ground_truth/admissions`` ``stay_severity``; ``diagnoses``: (S, 605) bool, the
    admission-week diagnoses of the stay (the words linked to it in its admission week);
    ``regimen``: (S, 243) bool multi-hot of medication classes given during the stay.
    """
    principal, severity = np.asarray(principal), np.asarray(severity, np.float64)
    diagnoses, regimen = np.asarray(diagnoses, bool), np.asarray(regimen, bool)
    n_stays = len(principal)
    if diagnoses.shape != (n_stays, N_CONDITIONS) or regimen.shape != (n_stays, N_MEDICATIONS):
        raise ValueError(
            f"expected_length_of_stay: diagnoses (S, {N_CONDITIONS}) and regimen (S, {N_MEDICATIONS}) "
            f"for S={n_stays} stays, got {diagnoses.shape} and {regimen.shape}"
        )
    stay, condition = np.nonzero(diagnoses)
    needs = _needs_from_pairs(stay, condition, n_stays)
    has = regimen.astype(np.float64) @ tables().group_member.astype(np.float64) > 0
    mu = _log_los_mean(params, principal, severity, diagnoses.sum(axis=1), needs, has)
    return np.exp(mu + params.los_sigma**2 / 2)


# ---- stage B: admissions, medications, procedures -------------------------------------------


def _rank_within(patient: np.ndarray, n: int) -> np.ndarray:
    """0-based position of each element within its patient (``patient`` sorted)."""
    counts = np.bincount(patient, minlength=n)
    return np.arange(len(patient)) - np.repeat(np.cumsum(counts) - counts, counts)


def _choose(options: np.ndarray, n_options: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Row-wise uniform choice among the first ``n_options`` entries of ``options``."""
    return options[np.arange(len(u)), np.minimum((u * n_options).astype(np.int64), n_options - 1)]


def encounter_stage(p: SimulatorParams, st: BlockState, rng: np.random.Generator, labs: LabStage,
                    word_p: np.ndarray, word_w: np.ndarray, word_c: np.ndarray) -> Record:
    """Admissions, their content, outpatient medications and procedures; assembles the record.
    ``word_*``: the final diagnosis words, sorted by (patient, week, condition)."""
    n, W, t = st.n, p.n_weeks, tables()
    z0 = st.z[:, 0].astype(np.float64)
    age0 = (st.start - st.birth) / WEEKS_PER_YEAR
    burden = np.bincount(st.present_p, minlength=n)
    # Stay severity: frailty, age and chronic burden, centred near 0 for admitted patients.
    severity_p = 0.5 * z0 + 0.015 * (age0 - 60.0) + 0.05 * (np.minimum(burden, 10) - 3) - 0.7

    # B1 candidate stays: per word a probability; one stay per patient-week.
    sev_mult = np.exp(0.35 * z0 + 0.015 * (age0 - 50.0))
    prob = np.where(t.admit_prob > 0, t.admit_prob, p.admission_background)[word_c]
    trig = rng.random(len(word_p)) < np.minimum(prob * sev_mult[word_p], 1.0)
    ti = np.flatnonzero(trig)
    week_key = word_p[ti] * W + word_w[ti]
    first = np.ones(len(ti), bool)
    first[1:] = week_key[1:] != week_key[:-1]
    ti = ti[first]
    c_p, c_w, c_principal = word_p[ti], word_w[ti], word_c[ti]
    n_cand = len(ti)
    c_admit = c_w * DAYS + rng.integers(0, DAYS, n_cand)
    # Admission-week diagnoses of each candidate: the words of that patient-week.
    all_key = word_p * W + word_w
    wk_lo = np.searchsorted(all_key, c_p * W + c_w)
    wk_hi = np.searchsorted(all_key, c_p * W + c_w, side="right")
    n_diag = wk_hi - wk_lo
    pair_stay = np.repeat(np.arange(n_cand), n_diag)
    pair_word = np.arange(len(pair_stay)) - np.repeat(np.cumsum(n_diag) - n_diag, n_diag) + wk_lo[pair_stay]
    needs = _needs_from_pairs(pair_stay, word_c[pair_word], n_cand)

    # B2 regimen: helpful groups with helpful_give_probability, filler classes at fixed rates.
    reg_s, reg_m = [], []
    n_groups = len(t.group_classes)
    given = (needs > 0) & (rng.random((n_cand, n_groups)) < p.helpful_give_probability)
    for g in range(n_groups):
        s = np.flatnonzero(given[:, g])
        reg_s.append(s)
        reg_m.append(t.group_classes[g][rng.integers(0, len(t.group_classes[g]), len(s))])
    for classes, rate in _FILLER:
        s = np.flatnonzero(rng.random(n_cand) < rate)
        ids = np.array([_mid(c) for c in classes])
        reg_s.append(s)
        reg_m.append(ids[rng.integers(0, len(ids), len(s))])
    reg_s, reg_m = np.concatenate(reg_s), np.concatenate(reg_m)
    reg_key = np.unique(reg_s * N_MEDICATIONS + reg_m)  # a class once per stay
    reg_s, reg_m = reg_key // N_MEDICATIONS, reg_key % N_MEDICATIONS
    has = np.zeros((n_cand, n_groups), bool)
    gm = t.group_member[reg_m]
    for g in range(n_groups):
        has[reg_s[gm[:, g]], g] = True

    # B3 length of stay.
    severity = severity_p[c_p] + 0.02 * (c_w - st.start[c_p]) / WEEKS_PER_YEAR
    mu = _log_los_mean(p, c_principal, severity, n_diag, needs, has)
    los = np.exp(mu + p.los_sigma * rng.standard_normal(n_cand))
    e_given = np.exp(mu + p.los_sigma**2 / 2)
    no_help = np.zeros_like(has)
    all_help = needs > 0
    e_without = np.exp(_log_los_mean(p, c_principal, severity, n_diag, needs, no_help) + p.los_sigma**2 / 2)
    e_all = np.exp(_log_los_mean(p, c_principal, severity, n_diag, needs, all_help) + p.los_sigma**2 / 2)
    c_disch = c_admit + np.rint(los).astype(np.int64)

    # Non-overlap: walk the candidates rank by rank within patient (a handful of ranks).
    rank = _rank_within(c_p, n)
    keep = np.zeros(n_cand, bool)
    last_discharge = np.full(n, -1, np.int64)
    for r in range(int(rank.max(initial=-1)) + 1):
        idx = np.flatnonzero(rank == r)
        ok = c_admit[idx] >= last_discharge[c_p[idx]]
        keep[idx[ok]] = True
        last_discharge[c_p[idx[ok]]] = c_disch[idx[ok]]
    absorbed = np.bincount(c_p[~keep], minlength=n)
    enroll_last_day = st.end * DAYS + DAYS - 1
    censored = c_disch > enroll_last_day[c_p]
    c_disch = np.minimum(c_disch, enroll_last_day[c_p])
    los = np.where(censored, (c_disch - c_admit).astype(np.float64), los)
    ki = np.flatnonzero(keep)
    reg_keep = keep[reg_s]
    new_index = np.cumsum(keep) - 1  # candidate -> kept stay position in the block
    s_p = c_p[ki]
    s_admit, s_disch = c_admit[ki], c_disch[ki]
    s_index = _rank_within(s_p, n)  # index of each stay within its patient
    admissions = Ragged.build(n, s_p, {
        schema.ADMIT_DAYS: s_admit, schema.DISCHARGE_DAYS: s_disch,
        schema.LENGTH_OF_STAY: los[ki]})
    stays = Ragged.build(n, s_p, {
        "stay_principal": c_principal[ki], "stay_severity": severity[ki],
        "stay_expected_los": e_given[ki], "stay_expected_los_without_helpful": e_without[ki],
        "stay_expected_los_all_helpful": e_all[ki], "stay_censored": censored[ki]})

    # B4 links: a word belongs to the latest stay of its patient admitted by its week, if the
    # word's week is not past that stay's discharge week.
    # A stay's words: keys from its admission week to its discharge week, cut at the next
    # admission (stays are sorted by key, one per patient-week, and a discharge week never
    # passes the patient's last week); found by two searches per stay, not one per word.
    s_admit_key = s_p * W + s_admit // DAYS
    s_last_key = np.minimum(s_p * W + s_disch // DAYS + 1, np.append(s_admit_key[1:], np.iinfo(np.int64).max))
    w_lo = np.searchsorted(all_key, s_admit_key)
    w_n = np.searchsorted(all_key, s_last_key) - w_lo
    condition_stays = np.full(len(word_p), schema.NO_STAY, np.int64)
    stay_of_word = np.repeat(np.arange(len(s_p)), w_n)
    condition_stays[w_lo[stay_of_word] + _rank_within(stay_of_word, len(s_p))] = s_index[stay_of_word]

    # Stay medications: regimen of kept stays, start admit week, end discharge week.
    rk = new_index[reg_s[reg_keep]]
    med_parts = [(s_p[rk], reg_m[reg_keep], s_admit[rk] // DAYS, s_disch[rk] // DAYS, s_index[rk])]
    # Stay procedures: curated for the principal, else one from its chapter; generic ones.
    proc_parts = []
    sp = c_principal[ki]
    u = rng.random((len(ki), 3))
    curated = t.inpatient_procs[sp]
    for jcol in range(3):
        sel = (curated[:, jcol] >= 0) & (u[:, jcol] < t.inpatient_probs[sp, jcol])
        proc_parts.append((s_p[sel], curated[sel, jcol], s_admit[sel] // DAYS, s_index[sel]))
    plain = (curated[:, 0] < 0) & (rng.random(len(ki)) < 0.5)
    chapters = t.chapter[sp[plain]]
    pick = rng.random(plain.sum())
    chosen = np.zeros(plain.sum(), np.int64)
    for ch, ids in t.chapter_procs.items():
        m = chapters == ch
        chosen[m] = ids[np.minimum((pick[m] * len(ids)).astype(np.int64), len(ids) - 1)]
    proc_parts.append((s_p[plain], chosen, s_admit[plain] // DAYS, s_index[plain]))
    for code, rate in _GENERIC_INPATIENT:
        sel = rng.random(len(ki)) < rate
        proc_parts.append((s_p[sel], np.full(sel.sum(), _pid(code)), s_admit[sel] // DAYS, s_index[sel]))
    # Stay labs: measured at admission with an acute shift; treatment effects included.
    in_week = s_admit // DAYS
    in_key = s_p * W + in_week
    in_mean = (_lab_mean(st, labs.patient_level, labs.slope, labs.onset, s_p, in_week)
               + _active_effects(in_key, labs.add_p, labs.add_start, labs.add_end, labs.add_effect, W))
    lab_parts = []
    clipped = labs.clipped.copy()
    for lab, shift in _INPATIENT_LABS:
        raw = in_mean[:, lab] + shift + _NOISE[lab] * 1.5 * rng.standard_normal(len(ki))
        val = np.clip(raw, _LOW[lab], _HIGH[lab])
        clipped += np.bincount(s_p, weights=(val != raw), minlength=n)
        lab_parts.append((s_p, np.full(len(ki), lab), in_week, val, s_index))

    # B5 outpatient medications (words outside any stay; ladder additions).
    out_words = np.flatnonzero(condition_stays == schema.NO_STAY)
    oc = word_c[out_words]
    # chronic: the first word of a tabled condition starts its classes.
    tabled = out_words[(t.chronic_med_ptr[1:] > t.chronic_med_ptr[:-1])[oc]]
    pc_key = word_p[tabled] * N_CONDITIONS + word_c[tabled]
    _, first_idx = np.unique(pc_key, return_index=True)
    fw = tabled[first_idx]
    deg = t.chronic_med_ptr[word_c[fw] + 1] - t.chronic_med_ptr[word_c[fw]]
    rep = np.repeat(np.arange(len(fw)), deg)
    row = t.chronic_med_ptr[word_c[fw]][rep] + _rank_within(rep, len(fw))
    start_ok = rng.random(len(rep)) < t.chronic_med_prob[row]
    mp = word_p[fw][rep][start_ok]
    ms = word_w[fw][rep][start_ok]
    me = np.minimum(ms + rng.geometric(1.0 / p.discontinue_weeks, len(mp)) - 1, st.end[mp])
    med_parts.append((mp, t.chronic_med_class[row][start_ok], ms, me, np.full(len(mp), schema.NO_STAY)))
    # acute courses
    acute = out_words[rng.random(len(out_words)) < t.acute_prob[oc]]
    ac = word_c[acute]
    cls_ = _choose(t.acute_classes[ac], t.acute_n_classes[ac], rng.random(len(acute)))
    a_start = word_w[acute]
    a_end = np.minimum(a_start + t.acute_weeks[ac] - 1 + rng.integers(0, 2, len(acute)), st.end[word_p[acute]])
    med_parts.append((word_p[acute], cls_, a_start, a_end, np.full(len(acute), schema.NO_STAY)))
    # ladder additions
    med_classes = np.array([[_mid(c) for c in ladder.classes] + [-1] * (5 - len(ladder.classes)) for ladder in LADDERS])
    med_parts.append((labs.add_p, med_classes[labs.add_ladder, labs.add_level], labs.add_start, labs.add_end,
                      np.full(len(labs.add_p), schema.NO_STAY)))

    # B6 outpatient procedures: per outpatient word by system; preventive care.
    op = out_words[rng.random(len(out_words)) < t.outpatient_prob[oc]]
    proc = _choose(t.outpatient_procs[word_c[op]], t.outpatient_n[word_c[op]], rng.random(len(op)))
    proc_parts.append((word_p[op], proc, word_w[op], np.full(len(op), schema.NO_STAY)))
    duration = st.end - st.start + 1
    for code, per_year, sex, min_age in _PREVENTIVE:
        eligible = (age0 >= min_age) & (st.female if sex else True)
        count = rng.poisson(per_year * duration / WEEKS_PER_YEAR * eligible)
        pp = np.repeat(np.arange(n), count)
        pw = st.start[pp] + np.floor(rng.random(len(pp)) * duration[pp]).astype(np.int64)
        proc_parts.append((pp, np.full(len(pp), _pid(code)), pw, np.full(len(pp), schema.NO_STAY)))

    def assemble(parts, names, week_pos: int, presorted: tuple | None = None) -> Ragged:
        """Concatenate parts sorted by (patient, week); a large part already in that order
        (``presorted``) is merged in by position instead of sorted again."""
        cols = [np.concatenate([part[i] for part in parts]) for i in range(len(names) + 1)]
        order = np.argsort(cols[0] * W + cols[week_pos], kind="stable")
        cols = [c[order] for c in cols]
        if presorted is not None:
            base_key = presorted[0] * W + presorted[week_pos]
            at = np.searchsorted(base_key, cols[0] * W + cols[week_pos], side="right") + np.arange(len(order))
            merged = []
            big_at = np.ones(len(presorted[0]) + len(at), bool)
            big_at[at] = False
            big_at = np.flatnonzero(big_at)
            for big, small in zip(presorted, cols, strict=True):
                out = np.empty(len(big) + len(small), np.result_type(big, small))
                out[big_at], out[at] = big, small
                merged.append(out)
            cols = merged
        return Ragged.build(n, cols[0], dict(zip(names, cols[1:], strict=True)))

    S = schema
    procedures = assemble(proc_parts, S.MODALITY_COLUMNS["procedures"], 2)
    medications = assemble(med_parts, S.MODALITY_COLUMNS["medications"], 2)
    vi, li = labs.meas_v, labs.meas_lab  # outpatient labs: sorted by (patient, week) already
    outpatient = (labs.visit_p[vi], li, labs.visit_w[vi], labs.values.ravel()[labs.meas_cell], np.full(len(vi), S.NO_STAY))
    lab_group = assemble(lab_parts, S.MODALITY_COLUMNS["labs"], 2, presorted=outpatient)

    adds = Ragged.build(n, labs.add_p, {
        "addition_weeks": labs.add_start, "addition_end_weeks": labs.add_end,
        "addition_ladders": labs.add_ladder, "addition_levels": labs.add_level,
        "addition_medications": med_classes[labs.add_ladder, labs.add_level]})
    er = labs.effect_rows
    effects = Ragged.build(n, er["patient"], {k: er[k] for k in EFFECT_COLUMNS})
    orr = labs.onset_rows
    onsets = Ragged.build(n, orr["patient"], {k: orr[k] for k in ONSET_COLUMNS})
    # Per-patient counts of what the rows cannot show (summed into the provenance).
    counts = {
        "absorbed_stays": absorbed.astype(np.float64),
        "censored_stays": np.bincount(s_p, weights=censored[ki], minlength=n),
        "clipped_lab_values": clipped,
        "lab_onsets": np.bincount(orr["patient"], minlength=n).astype(np.float64),
    }
    for li_, ladder in enumerate(LADDERS):
        counts[f"additions_{ladder.name}"] = np.bincount(labs.add_p, weights=labs.add_ladder == li_, minlength=n)
    return Record(procedures=procedures, medications=medications, labs=lab_group, admissions=admissions,
                  condition_stays=condition_stays.astype(np.int16), additions=adds, effects=effects,
                  stays=stays, onsets=onsets, counts=counts)


def empty_record(n: int, n_words: int) -> Record:
    """The record of a diagnosis-only simulation: every list empty."""
    zero = np.zeros(n + 1, np.int64)

    def group(cols) -> Ragged:
        return Ragged(zero, {k: np.zeros(0) for k in cols})

    S = schema
    return Record(
        procedures=group(S.MODALITY_COLUMNS["procedures"]), medications=group(S.MODALITY_COLUMNS["medications"]),
        labs=group(S.MODALITY_COLUMNS["labs"]), admissions=group(S.MODALITY_COLUMNS["admissions"]),
        condition_stays=np.full(n_words, S.NO_STAY, np.int16), additions=group(TREATMENT_COLUMNS),
        effects=group(EFFECT_COLUMNS), stays=group(STAY_COLUMNS), onsets=group(ONSET_COLUMNS), counts={},
    )


# ---- claims-likeness ---------------------------------------------------------------------------
LOS_BIN_DAYS = 0.1  # histogram resolution of lengths of stay (median in provenance)
LOS_BINS = 3650  # up to a year; longer stays land in the last bin


def claims_counters(rows: pa.Table) -> dict[str, Any]:
    """Additive counters of ``rows`` (sum them over chunks) for :func:`claims_figures`."""
    def flat(column: str) -> np.ndarray:
        return pc.list_flatten(rows[column]).to_numpy()

    def lengths(column: str) -> np.ndarray:
        return pc.list_value_length(rows[column]).to_numpy()

    start, end = rows[schema.ENROLL_START].to_numpy(), rows[schema.ENROLL_END].to_numpy()
    duration = (end - start + 1).astype(np.int64)
    n_stays = lengths(schema.ADMIT_DAYS)
    s_owner = np.repeat(np.arange(rows.num_rows), n_stays)
    year = (flat(schema.ADMIT_DAYS) // DAYS - start[s_owner]) // 52
    full = year < duration[s_owner] // 52
    years_with_stay = len(np.unique(s_owner[full] * 64 + year[full]))
    los = flat(schema.LENGTH_OF_STAY)
    n_meds = lengths(schema.MEDICATIONS)
    m_owner = np.repeat(np.arange(rows.num_rows), n_meds)
    distinct = np.unique(m_owner.astype(np.int64) * N_MEDICATIONS + flat(schema.MEDICATIONS))
    return {
        "patients": rows.num_rows,
        "patient_years": float(duration.sum() / WEEKS_PER_YEAR),
        "complete_years": int((duration // 52).sum()),
        "complete_years_with_admission": years_with_stay,
        "patients_with_admission": int((n_stays > 0).sum()),
        "admissions": int(n_stays.sum()),
        "los_sum": float(los.sum()),
        "los_histogram": np.bincount(np.minimum((los / LOS_BIN_DAYS).astype(np.int64), LOS_BINS - 1),
                                     minlength=LOS_BINS),
        "medications": int(n_meds.sum()),
        "medication_classes": len(distinct),
        "patients_with_medication": int((n_meds > 0).sum()),
        "labs": int(lengths(schema.LABS).sum()),
        "patients_with_lab": int((lengths(schema.LABS) > 0).sum()),
        "procedures": int(lengths(schema.PROCEDURES).sum()),
    }


def claims_figures(counters: dict[str, Any] | pa.Table) -> dict[str, float]:
    """Claims-likeness figures (see the module docstring for the published comparators)."""
    c = claims_counters(counters) if isinstance(counters, pa.Table) else counters
    hist = np.asarray(c["los_histogram"])
    median_bin = int(np.searchsorted(np.cumsum(hist), hist.sum() / 2)) if hist.sum() else 0
    return {
        "share_with_admission_per_year": c["complete_years_with_admission"] / max(c["complete_years"], 1),
        "patients_with_admission": c["patients_with_admission"],
        "admissions": c["admissions"],
        "admissions_per_1000_patient_years": 1000 * c["admissions"] / c["patient_years"],
        "mean_length_of_stay": c["los_sum"] / max(c["admissions"], 1),
        "median_length_of_stay": (median_bin + 0.5) * LOS_BIN_DAYS,
        "medications_per_patient": c["medications"] / c["patients"],
        "medication_classes_per_patient": c["medication_classes"] / c["patients"],
        "medication_classes_per_patient_year": c["medication_classes"] / c["patient_years"],
        "share_with_any_medication": c["patients_with_medication"] / c["patients"],
        "lab_measurements_per_patient_year": c["labs"] / c["patient_years"],
        "share_with_any_lab": c["patients_with_lab"] / c["patients"],
        "procedures_per_patient_year": c["procedures"] / c["patient_years"],
    }


__all__ = [
    "ADMISSIONS", "LADDERS", "ONSETS", "TREATMENTS", "TRUTH_SCHEMAS", "BlockState", "Record",
    "block_rng", "claims_counters", "claims_figures", "encounter_stage", "expected_length_of_stay",
    "lab_stage",
]  # fmt: skip
