"""Simulated two-arm oncology trial (the dataset's ``trial/`` part) with true counterfactual twins.

The indication is adjuvant chemotherapy of early breast cancer, shaped like TWIN's NCT00174655
(PyTrial's demo trial): ~9 visits per participant, cycles every 21 days then follow-up every
~3 months, supportive medications and CTCAE adverse events at each visit, ~12 % severe outcomes.

The generative model, per participant (vectorised over blocks of ``simulator.BLOCK``)::

    baseline: age, sex (almost all female), BMI, ECOG, tumour size, positive nodes, stage,
        grade, HER2+, ER+, postmenopausal, prior therapy, LVEF (``BASELINE_FEATURES``)
    arm: permuted blocks of 4 consecutive participants, 2 per arm (1:1 randomisation)
    arm 0 "AC-T": 4 cycles doxorubicin + cyclophosphamide, then 4 cycles docetaxel
    arm 1 "TC-H": 6 cycles docetaxel + cyclophosphamide + trastuzumab (protocol G-CSF
        support: the more myelotoxic arm), then 2 cycles trastuzumab alone
    visit k of a cycle, adverse event a: Bernoulli(sigmoid(base[a] + phase[a]
        + cumulative agent exposure @ per-cycle effects (neuropathy, cardiotoxicity)
        + persistence[a] * (a present at the previous visit)
        + baseline risk: frailty loading x (age, ECOG, prior therapy, susceptibility),
          LVEF for cardiac events, BMI for thromboses, premenopausal for hot flashes))
    medications: Bernoulli(sigmoid(base + phase (antiemetics every cycle, docetaxel premeds,
        G-CSF) + AEs at the visit (antibiotics after febrile neutropenia, ...) + AEs at the
        previous visit (secondary G-CSF prophylaxis) + persistence))
    schedule: first cycle 0-14 days after randomisation; each next cycle 21 days later
        (-2..+3 days), 7 days later still after a dose-limiting AE; treatment stops early
        (per cycle 3 %, x12 odds after a severe AE); then Poisson(2.6) follow-up visits (at
        most 6) every 91 days (-8..+12), and follow-up ends 0-59 days after the last visit
    severe outcome: Bernoulli(sigmoid(intercept + w * distinct severe AEs
        + w * log(1 + all AEs) + age + ECOG))

**Ground truth, common random numbers.** Every uniform draw of a block is made once, before
either arm is simulated; the factual course (the randomised arm) and its twin (the other arm)
are both driven by those same draws, so the twin differs from the participant only by the arm.
``ground_truth/trial_counterfactual/<split>/part-NNNNN.parquet`` holds, row for row with
``trial/<split>/part-NNNNN.parquet``, the twin in ``TRIAL_SCHEMA`` (arm flipped) plus the
severe-outcome probability of each course and the true individual effect
``P(severe | arm 1) - P(severe | arm 0)`` under that participant's draws
(``COUNTERFACTUAL_SCHEMA``). Nothing of it is in ``trial/``.

**Invariants** guaranteed of every ``trial/`` row (``TRIAL_SCHEMA``)::

    subject_id = TRIAL_ID_OFFSET + participant index; split = split_codes(index), i.e.
        ``trial_split_codes(subject_id)`` (5 % tuning, 5 % held out below 1M participants)
    arm in {0, 1}; end_day >= the last visit day; enroll_day in [0, accrual_days)
    baseline: exactly len(BASELINE_FEATURES) finite values; sex 0/1 ("female")
    1 <= visits <= MAX_VISITS (14); visit_days strictly increasing, in [enroll_day, end_day]
    visit_treatments / visit_medications / visit_adverse_events: one list per visit, ids in
        range of TRIAL_TREATMENTS / TRIAL_MEDICATIONS / ADVERSE_EVENTS, increasing, no repeats
    treatment visits come first (each non-empty), follow-up visits after (empty treatments)

Determinism: block b of participants has its own stream ``SeedSequence(seed, spawn_key=(3, b))``
(the patient simulator uses spawn keys 0 and 1), so a participant depends only on (seed, index):
any chunking or worker count gives identical rows, and more participants append.

Speed and size (one core, CPU seconds on this shared box): simulating both arms ~48,000
participants per CPU-second; with Arrow tables and zstd Parquet (``write_trial``) ~18,000, so
a 5,000-participant trial takes ~0.3 s and 1M ~1 CPU-minute. On disk ~95 B per participant,
~105 B for its ground truth. One chunk (the usual trial) is written in-process; several run as
Ray tasks.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from mirror.data import schema
from mirror.data.simulator import BLOCK, COMPRESSION, _SplitFile
from mirror.data.splits import SPLIT_CODES, split_codes
from mirror.data.vocabularies import (
    ADVERSE_EVENTS,
    SEVERE_ADVERSE_EVENTS,
    TRIAL_MEDICATIONS,
    TRIAL_TREATMENTS,
)

GENERATOR_NAME = "mirror.data.trial"
GENERATOR_VERSION = "1.0.0"
INDICATION = "early breast cancer, adjuvant chemotherapy (shaped like NCT00174655)"
MAX_VISITS = 14  # visits per participant, at most (cycles + follow-ups)
CHUNK_PARTICIPANTS = 64 * BLOCK  # participants per file (~25 MB); a 5,000-person trial is one
ROW_GROUP_PARTICIPANTS = 16 * BLOCK
PARAMS_FILE = "trial_params.json"  # under ground_truth/
COUNTERFACTUAL_DIR = "trial_counterfactual"  # under ground_truth/

BASELINE_FEATURES = (
    "age", "female", "bmi", "ecog", "tumour_size_cm", "positive_nodes", "stage", "grade",
    "her2_positive", "er_positive", "postmenopausal", "prior_therapy", "lvef",
)  # fmt: skip
_F = {name: i for i, name in enumerate(BASELINE_FEATURES)}

# Ground-truth columns beside the twin's TRIAL_SCHEMA columns.
SEVERE_PROBABILITY = "severe_probability"  # float32: P(severe) of this row's course (the twin)
FACTUAL_SEVERE_PROBABILITY = "factual_severe_probability"  # float32: of the participant's course
ARM_EFFECT = "arm_effect"  # float32: P(severe | arm 1) - P(severe | arm 0), same draws
COUNTERFACTUAL_SCHEMA = pa.schema(
    list(schema.TRIAL_SCHEMA)
    + [pa.field(name, pa.float32(), nullable=False) for name in (SEVERE_PROBABILITY, FACTUAL_SEVERE_PROBABILITY, ARM_EFFECT)]
)

# Regimen phases: the agents given at a cycle of that phase. "off" = a follow-up visit.
_TX = {c.code: c.id for c in TRIAL_TREATMENTS}
PHASES: dict[str, tuple[int, ...]] = {
    "off": (),
    "AC": (_TX["TX:doxorubicin"], _TX["TX:cyclophosphamide"]),
    "T": (_TX["TX:docetaxel"],),
    "TCH": (_TX["TX:docetaxel"], _TX["TX:cyclophosphamide"], _TX["TX:trastuzumab"]),
    "H": (_TX["TX:trastuzumab"],),
}
_PHASE_INDEX = {name: i for i, name in enumerate(PHASES)}

# Adverse events: probability at a follow-up visit of a participant of average risk, then
# logit shifts at a cycle of each phase (AC, T, TCH, H), persistence (logit shift when present
# at the previous visit) and loading on the participant's general frailty.
_AE_TABLE = (
    ("Nausea", .06, 2.6, 1.2, 1.4, 0.0, 0.8, .2),
    ("Vomiting", .01, 2.4, 0.5, 0.8, 0.0, 0.6, .2),
    ("Fatigue", .20, 1.8, 1.6, 2.0, 0.6, 1.0, .4),
    ("Alopecia", .03, 4.5, 3.5, 4.0, 0.0, 2.5, .0),
    ("Diarrhea", .03, 0.5, 1.6, 2.0, 1.2, 0.5, .2),
    ("Constipation", .04, 1.5, 0.6, 0.9, 0.0, 0.8, .2),
    ("Mucositis oral", .01, 2.2, 1.5, 1.7, 0.0, 0.8, .1),
    ("Anorexia", .03, 1.5, 0.8, 1.1, 0.0, 0.8, .4),
    ("Peripheral sensory neuropathy", .03, 0.0, 1.2, 1.2, 0.0, 1.8, .2),
    ("Myalgia", .03, 0.3, 1.9, 1.9, 0.3, 0.5, .1),
    ("Arthralgia", .04, 0.3, 1.5, 1.5, 0.3, 0.8, .1),
    ("Rash maculo-papular", .01, 0.3, 1.2, 1.5, 0.5, 0.5, .0),
    ("Nail changes", .01, 0.3, 2.0, 2.0, 0.0, 2.0, .0),
    ("Edema limbs", .02, 0.0, 1.5, 1.6, 0.2, 1.5, .3),
    ("Fever", .02, 0.7, 0.6, 0.9, 0.6, 0.3, .1),
    ("Headache", .03, 0.3, 0.3, 0.6, 0.5, 0.3, .0),
    ("Insomnia", .04, 0.8, 0.8, 0.8, 0.0, 0.8, .1),
    ("Dysgeusia", .01, 1.3, 1.2, 1.4, 0.0, 1.0, .0),
    ("Anemia", .05, 1.5, 0.8, 1.4, 0.0, 1.5, .5),
    ("Neutrophil count decreased", .01, 2.6, 2.0, 3.2, 0.0, 0.5, .5),
    ("White blood cell decreased", .01, 2.3, 1.8, 2.9, 0.0, 0.5, .5),
    ("Platelet count decreased", .005, 1.5, 0.3, 1.3, 0.0, 0.5, .4),
    ("Hot flashes", .05, 0.6, 0.3, 0.7, 0.0, 1.2, .0),
    ("Cough", .04, 0.0, 0.3, 0.6, 0.4, 0.5, .2),
    ("Dyspnea", .03, 0.3, 0.6, 0.8, 0.3, 0.5, .4),
    ("Epistaxis", .01, 0.0, 0.8, 1.1, 0.5, 0.5, .0),
    ("Palmar-plantar erythrodysesthesia", .005, 1.0, 1.0, 1.0, 0.0, 1.0, .0),
    ("Infusion related reaction", .001, 0.0, 1.5, 2.6, 2.5, 0.0, .0),
    ("Abdominal pain", .03, 0.6, 0.5, 0.7, 0.0, 0.5, .2),
    ("Dizziness", .03, 0.5, 0.3, 0.4, 0.0, 0.5, .3),
    ("Weight loss", .02, 0.8, 0.3, 0.6, 0.0, 1.0, .3),
    ("Hypokalemia", .01, 0.6, 0.5, 0.7, 0.0, 0.5, .3),
    ("Conjunctivitis", .01, 0.0, 1.2, 1.2, 0.0, 0.8, .0),
    ("Pain in extremity", .03, 0.0, 1.0, 1.0, 0.2, 0.8, .2),
    ("Febrile neutropenia", .001, 1.5, 1.6, 2.9, 0.0, 0.0, .8),
    ("Sepsis", .0005, 0.3, 0.3, 1.1, 0.0, 0.0, .8),
    ("Pneumonia", .002, 0.0, 0.1, 0.5, 0.0, 0.0, .8),
    ("Pulmonary embolism", .001, 0.0, 0.0, 0.0, 0.0, 0.0, .6),
    ("Heart failure", .0005, 0.0, 0.0, 0.0, 0.3, 1.0, .6),
    ("Ejection fraction decreased", .002, 0.1, 0.0, 0.3, 0.8, 1.5, .3),
    ("Thromboembolic event", .001, 0.0, 0.0, 0.0, 0.0, 0.0, .6),
    ("Acute kidney injury", .0005, 0.0, 0.0, 0.0, 0.0, 0.0, .6),
    ("Dehydration", .002, 0.8, 0.0, 0.5, 0.0, 0.0, .6),
    ("Colitis", .0005, 0.0, 0.5, 0.7, 0.0, 0.0, .3),
    ("Anaphylaxis", .0002, 0.0, 0.5, 1.3, 0.8, 0.0, .0),
    ("Pneumonitis", .0005, 0.0, 0.3, 0.5, 0.0, 0.0, .3),
)  # fmt: skip
# Logit shift per earlier cycle of an agent (cumulative toxicity).
_AE_CUMULATIVE = {
    "Peripheral sensory neuropathy": {"TX:docetaxel": 0.25},
    "Ejection fraction decreased": {"TX:doxorubicin": 0.3, "TX:trastuzumab": 0.2},
    "Heart failure": {"TX:doxorubicin": 0.25, "TX:trastuzumab": 0.15},
    "Fatigue": {"TX:docetaxel": 0.05, "TX:doxorubicin": 0.05},
    "Anemia": {"TX:doxorubicin": 0.1, "TX:cyclophosphamide": 0.05},
}
# Participant-specific risks beyond frailty (see ``_risk_features``): logit per unit.
_AE_SPECIFIC = {
    "Heart failure": {"cardiac": 1.0},
    "Ejection fraction decreased": {"cardiac": 1.0},
    "Pulmonary embolism": {"thrombotic": 1.0},
    "Thromboembolic event": {"thrombotic": 1.0},
    "Hot flashes": {"premenopausal": 1.2},
    "Peripheral sensory neuropathy": {"thrombotic": 0.3},  # BMI: more neuropathy
}
# Adverse events that delay the next cycle by ``delay_days`` (besides every severe one).
_DOSE_LIMITING = ("Neutrophil count decreased", "Platelet count decreased", "Mucositis oral", "Diarrhea")

# Medications: probability at a follow-up visit, logit shifts at a cycle of each phase
# (AC, T, TCH, H), persistence, and the AEs that call for them (same visit; "prev:" = at the
# previous visit, e.g. secondary G-CSF prophylaxis after neutropenia).
_MED_TABLE = (
    ("A04A", .02, 7.0, 5.5, 6.5, 0.5, 0.0, {"Nausea": 2.0, "Vomiting": 2.5}),
    ("H02A", .02, 3.0, 4.5, 4.5, 0.0, 0.0, {"Infusion related reaction": 2.0, "Anaphylaxis": 3.0,
                                            "Pneumonitis": 3.0, "Rash maculo-papular": 1.0}),
    ("L03A", .002, 1.5, 2.0, 5.0, 0.0, 0.0, {"Febrile neutropenia": 2.0, "prev:Neutrophil count decreased": 2.5,
                                             "prev:Febrile neutropenia": 3.5}),
    ("N02A", .03, 0.3, 0.5, 0.5, 0.0, 1.5, {"Pain in extremity": 1.5, "Myalgia": 1.2, "Arthralgia": 1.0,
                                            "Abdominal pain": 1.2, "Mucositis oral": 1.0}),
    ("N02B", .10, 0.5, 0.8, 0.8, 0.0, 0.8, {"Fever": 2.0, "Headache": 2.0, "Myalgia": 1.5, "Arthralgia": 1.2}),
    ("J01C", .01, 0.0, 0.0, 0.0, 0.0, 0.0, {"Febrile neutropenia": 2.5, "Fever": 1.2, "Pneumonia": 3.0,
                                            "Sepsis": 3.0}),
    ("J01M", .005, 0.5, 0.8, 1.5, 0.0, 0.0, {"Febrile neutropenia": 3.0, "Neutrophil count decreased": 1.0,
                                             "Sepsis": 2.0}),
    ("A02B", .10, 1.0, 1.3, 1.3, 0.0, 2.0, {"Abdominal pain": 1.2, "Nausea": 0.5}),
    ("A06A", .02, 1.2, 0.5, 0.9, 0.0, 0.5, {"Constipation": 3.0}),
    ("A07D", .01, 0.0, 0.0, 0.0, 0.0, 0.0, {"Diarrhea": 3.0, "Colitis": 2.0}),
    ("B01A", .02, 0.0, 0.0, 0.0, 0.0, 3.0, {"Pulmonary embolism": 4.0, "Thromboembolic event": 4.0}),
    ("B03X", .005, 0.0, 0.0, 0.0, 0.0, 1.0, {"Anemia": 2.5}),
    ("N05B", .03, 0.8, 0.5, 0.5, 0.0, 1.0, {"Insomnia": 0.5, "Nausea": 0.5}),
    ("N05C", .05, 0.5, 0.3, 0.5, 0.0, 1.0, {"Insomnia": 2.5}),
    ("R06A", .02, 0.3, 1.5, 1.8, 1.0, 0.0, {"Infusion related reaction": 2.5, "Rash maculo-papular": 1.5,
                                            "Anaphylaxis": 3.0}),
    ("D07A", .01, 0.0, 0.0, 0.0, 0.0, 0.5, {"Rash maculo-papular": 3.0, "Palmar-plantar erythrodysesthesia": 2.0,
                                            "Nail changes": 1.0}),
    ("C03C", .01, 0.0, 0.0, 0.0, 0.0, 1.0, {"Edema limbs": 2.0, "Heart failure": 4.0, "Dyspnea": 0.8}),
    ("C07A", .04, 0.0, 0.0, 0.0, 0.0, 3.0, {"Heart failure": 3.0, "Ejection fraction decreased": 2.5}),
    ("J02A", .005, 0.0, 0.0, 0.0, 0.0, 0.0, {"Mucositis oral": 2.0, "Sepsis": 1.0, "Febrile neutropenia": 1.0}),
    ("A12B", .005, 0.0, 0.0, 0.0, 0.0, 0.0, {"Hypokalemia": 4.0, "Diarrhea": 0.5, "Vomiting": 0.5}),
)  # fmt: skip
_RISK_FEATURES = ("frailty", "cardiac", "thrombotic", "premenopausal")


AUTO_TRIAL_MIN, AUTO_TRIAL_MAX = 1000, 5000  # real two-arm trials: hundreds to a few thousand


def auto_trial_participants(n_patients: int) -> int:
    """The trial size ``generate`` picks by default: 1 % of the population, within the sizes
    of real two-arm trials."""
    return min(max(n_patients // 100, AUTO_TRIAL_MIN), AUTO_TRIAL_MAX)


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = np.asarray(p, np.float64)
    return np.log(p / (1.0 - p))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass(frozen=True)
class TrialParams:
    """The trial's design and the scalars of its outcome model (the per-AE and per-medication
    tables are fixed clinical knowledge in this module; ``tables()`` lists them)."""

    arm_names: tuple[str, str] = ("AC-T", "TC-H")
    # Phase of each planned cycle, per arm (keys of PHASES other than "off").
    arm_regimens: tuple[tuple[str, ...], tuple[str, ...]] = (
        ("AC",) * 4 + ("T",) * 4,
        ("TCH",) * 6 + ("H",) * 2,
    )
    accrual_days: int = 1095  # randomisation day uniform in [0, accrual_days)
    first_visit_max_days: int = 14  # first cycle 0..this many days after randomisation
    cycle_days: int = 21
    delay_days: int = 7  # extra days before the next cycle after a dose-limiting or severe AE
    followup_gap_days: int = 91
    mean_followups: float = 2.6  # Poisson mean of follow-up visits, cut at max_followups
    max_followups: int = 6
    female_fraction: float = 0.99
    susceptibility_sd: float = 0.5  # participant-level AE susceptibility (shared by both arms)
    stop_probability: float = 0.03  # per cycle, stopping treatment early without a severe AE
    stop_severe_odds: float = 12.0  # odds ratio of stopping after a cycle with a severe AE
    severe_intercept: float = -3.95
    severe_per_severe_ae: float = 1.7  # per distinct severe AE type over the course
    severe_per_log_ae: float = 0.25  # per unit of log(1 + all AEs over the course)
    severe_per_age_decade: float = 0.25
    severe_per_ecog: float = 0.4

    def __post_init__(self) -> None:
        if len(self.arm_names) != 2 or len(self.arm_regimens) != 2:
            raise ValueError(
                f"TrialParams.arm_names/arm_regimens: expected two arms, got "
                f"{len(self.arm_names)} names and {len(self.arm_regimens)} regimens"
            )
        for arm, regimen in enumerate(self.arm_regimens):
            allowed = sorted(set(PHASES) - {"off"})
            if not regimen or set(regimen) - set(allowed):
                raise ValueError(
                    f"TrialParams.arm_regimens[{arm}]: expected a non-empty sequence of {allowed}, "
                    f"got {list(regimen)}"
                )
            if len(regimen) + self.max_followups > MAX_VISITS:
                raise ValueError(
                    f"TrialParams: arm {arm} has {len(regimen)} cycles + max_followups "
                    f"{self.max_followups} > MAX_VISITS {MAX_VISITS}"
                )
        for name in ("accrual_days", "cycle_days", "followup_gap_days"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrialParams.{name}: expected >= 1, got {getattr(self, name)}")
        if self.cycle_days < 7 or self.followup_gap_days < 14:
            raise ValueError(
                "TrialParams: cycle_days must be >= 7 and followup_gap_days >= 14 (day jitter "
                f"keeps visits strictly increasing), got {self.cycle_days} and {self.followup_gap_days}"
            )
        for name in ("first_visit_max_days", "delay_days", "max_followups"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrialParams.{name}: expected >= 0, got {getattr(self, name)}")
        for name in ("female_fraction", "stop_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"TrialParams.{name}: expected in [0, 1], got {getattr(self, name)}")
        if self.mean_followups < 0 or self.susceptibility_sd < 0 or self.stop_severe_odds <= 0:
            raise ValueError(
                "TrialParams: mean_followups and susceptibility_sd must be >= 0 and "
                f"stop_severe_odds > 0, got {self.mean_followups}, {self.susceptibility_sd}, "
                f"{self.stop_severe_odds}"
            )

    def scalars(self) -> dict[str, Any]:
        return asdict(self)

    @cached_property
    def arrays(self) -> _Tables:
        return _Tables.of(self)

    def tables(self) -> dict[str, Any]:
        """The outcome model's tables, for humans (``ground_truth/trial_params.json``)."""
        phases = [p for p in PHASES if p != "off"]
        return {
            "phases": {p: [TRIAL_TREATMENTS[t].code for t in PHASES[p]] for p in PHASES},
            "adverse_events": [
                {"name": row[0], "followup_probability": row[1],
                 "phase_logit": dict(zip(phases, row[2:6], strict=True)), "persistence": row[6],
                 "frailty_loading": row[7], "per_earlier_cycle": _AE_CUMULATIVE.get(row[0], {}),
                 "specific_risk": _AE_SPECIFIC.get(row[0], {}), "severe": AE_ID[row[0]] in SEVERE_ADVERSE_EVENTS}
                for row in _AE_TABLE
            ],
            "dose_limiting": list(_DOSE_LIMITING),
            "medications": [
                {"code": row[0], "followup_probability": row[1],
                 "phase_logit": dict(zip(phases, row[2:6], strict=True)), "persistence": row[6],
                 "adverse_event_logit": row[7]}
                for row in _MED_TABLE
            ],
        }  # fmt: skip


AE_ID = {c.name: c.id for c in ADVERSE_EVENTS}
MED_ID = {c.code: c.id for c in TRIAL_MEDICATIONS}
if sorted(AE_ID[row[0]] for row in _AE_TABLE) != list(range(len(ADVERSE_EVENTS))):
    raise RuntimeError("trial: _AE_TABLE must list every adverse event exactly once")
if sorted(MED_ID[row[0]] for row in _MED_TABLE) != list(range(len(TRIAL_MEDICATIONS))):
    raise RuntimeError("trial: _MED_TABLE must list every trial medication exactly once")


@dataclass(frozen=True, eq=False)
class _Tables:
    """The outcome model as arrays, in vocabulary order."""

    regimen: np.ndarray  # (2, MAX_VISITS) phase index per cycle slot, 0 beyond the plan
    planned: np.ndarray  # (2,) planned cycles per arm
    phase_agents: np.ndarray  # (phases, treatments) float32 0/1
    ae_base: np.ndarray  # (A,) logit at a follow-up visit
    ae_phase: np.ndarray  # (phases, A)
    ae_persist: np.ndarray  # (A,)
    ae_cumulative: np.ndarray  # (treatments, A) per earlier cycle of an agent
    ae_risk: np.ndarray  # (risk features, A)
    severe: np.ndarray  # (A,) bool
    delaying: np.ndarray  # (A,) bool: dose-limiting or severe
    med_base: np.ndarray  # (M,)
    med_phase: np.ndarray  # (phases, M)
    med_persist: np.ndarray  # (M,)
    med_ae: np.ndarray  # (A, M) same visit
    med_prev_ae: np.ndarray  # (A, M) previous visit

    @classmethod
    def of(cls, p: TrialParams) -> _Tables:
        n_ph, n_tx, n_ae, n_med = len(PHASES), len(TRIAL_TREATMENTS), len(ADVERSE_EVENTS), len(TRIAL_MEDICATIONS)
        regimen = np.zeros((2, MAX_VISITS), np.int64)
        for arm, phases in enumerate(p.arm_regimens):
            regimen[arm, : len(phases)] = [_PHASE_INDEX[ph] for ph in phases]
        phase_agents = np.zeros((n_ph, n_tx), np.float32)
        for name, agents in PHASES.items():
            phase_agents[_PHASE_INDEX[name], list(agents)] = 1.0
        ae_base, ae_persist = np.zeros(n_ae), np.zeros(n_ae)
        ae_phase, ae_cumulative = np.zeros((n_ph, n_ae)), np.zeros((n_tx, n_ae))
        ae_risk = np.zeros((len(_RISK_FEATURES), n_ae))
        for name, p_follow, *phase_shift, persist, frailty in _AE_TABLE:
            a = AE_ID[name]
            ae_base[a], ae_phase[1:, a], ae_persist[a] = _logit(p_follow), phase_shift, persist
            ae_risk[0, a] = frailty
            for code, per_cycle in _AE_CUMULATIVE.get(name, {}).items():
                ae_cumulative[_TX[code], a] = per_cycle
            for risk, loading in _AE_SPECIFIC.get(name, {}).items():
                ae_risk[_RISK_FEATURES.index(risk), a] = loading
        severe = np.isin(np.arange(n_ae), sorted(SEVERE_ADVERSE_EVENTS))
        delaying = severe | np.isin(np.arange(n_ae), [AE_ID[n] for n in _DOSE_LIMITING])
        med_base, med_persist = np.zeros(n_med), np.zeros(n_med)
        med_phase, med_ae, med_prev_ae = np.zeros((n_ph, n_med)), np.zeros((n_ae, n_med)), np.zeros((n_ae, n_med))
        for code, p_follow, *phase_shift, persist, by_ae in _MED_TABLE:
            m = MED_ID[code]
            med_base[m], med_phase[1:, m], med_persist[m] = _logit(p_follow), phase_shift, persist
            for key, shift in by_ae.items():
                target = med_prev_ae if key.startswith("prev:") else med_ae
                target[AE_ID[key.removeprefix("prev:")], m] = shift
        f32 = np.float32
        return cls(
            regimen=regimen, planned=np.array([len(r) for r in p.arm_regimens]), phase_agents=phase_agents,
            ae_base=ae_base.astype(f32), ae_phase=ae_phase.astype(f32), ae_persist=ae_persist.astype(f32),
            ae_cumulative=ae_cumulative.astype(f32), ae_risk=ae_risk.astype(f32), severe=severe,
            delaying=delaying, med_base=med_base.astype(f32), med_phase=med_phase.astype(f32),
            med_persist=med_persist.astype(f32), med_ae=med_ae.astype(f32), med_prev_ae=med_prev_ae.astype(f32),
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# One block: the shared draws, then one course per arm.


@dataclass
class _Draws:
    """Everything random about a block of participants, drawn before any arm is simulated
    (common random numbers: the factual course and its twin read the same values)."""

    baseline: np.ndarray  # (n, F) float32
    arm: np.ndarray  # (n,) int8, the randomised arm
    enroll_day: np.ndarray  # (n,) int64
    risk: np.ndarray  # (n, A) float32 baseline AE logit shift (frailty, cardiac, ...)
    first_delay: np.ndarray  # (n,) days from randomisation to the first cycle
    u_ae: np.ndarray  # (n, MAX_VISITS, A) float32 uniforms
    u_med: np.ndarray  # (n, MAX_VISITS, M) float32 uniforms
    u_stop: np.ndarray  # (n, MAX_VISITS)
    jitter: np.ndarray  # (n, MAX_VISITS) int, day jitter of the gap after each visit
    n_followups: np.ndarray  # (n,)
    tail: np.ndarray  # (n,) days of follow-up after the last visit
    u_severe: np.ndarray  # (n,)

    def slice(self, lo: int, hi: int) -> _Draws:
        return _Draws(**{k: v[lo:hi] for k, v in vars(self).items()})


def _baseline(rng: np.random.Generator, n: int, p: TrialParams) -> np.ndarray:
    """Baseline features (``BASELINE_FEATURES`` order), roughly those of an adjuvant
    breast-cancer trial population."""
    age = np.round(np.clip(52.0 + 10.5 * rng.standard_normal(n), 24, 80))
    female = (rng.random(n) < p.female_fraction).astype(np.float64)
    bmi = np.round(np.clip(np.exp(np.log(26.5) + 0.18 * rng.standard_normal(n)), 16, 55), 1)
    ecog = np.digitize(0.03 * (age - 52) + rng.standard_normal(n), [0.3, 1.65]).astype(np.float64)
    size = np.round(np.clip(np.exp(np.log(2.3) + 0.5 * rng.standard_normal(n)), 0.3, 12), 1)
    nodes = np.minimum(rng.poisson(rng.gamma(0.6, 2.5, n)), 30).astype(np.float64)
    stage = np.where((size <= 2) & (nodes == 0), 1.0, np.where((size > 5) | (nodes >= 4), 3.0, 2.0))
    grade = np.digitize(rng.random(n), [0.15, 0.60]) + 1.0
    her2 = (rng.random(n) < 0.25).astype(np.float64)
    er = (rng.random(n) < np.where(her2 > 0, 0.55, 0.75)).astype(np.float64)
    post = (rng.random(n) < _sigmoid((age - 50) / 2.5)).astype(np.float64)
    prior = (rng.random(n) < 0.12).astype(np.float64)
    lvef = np.round(np.clip(63 + 5 * rng.standard_normal(n) - 0.1 * (age - 52), 45, 80))
    columns = {"age": age, "female": female, "bmi": bmi, "ecog": ecog, "tumour_size_cm": size,
               "positive_nodes": nodes, "stage": stage, "grade": grade, "her2_positive": her2,
               "er_positive": er, "postmenopausal": post, "prior_therapy": prior, "lvef": lvef}  # fmt: skip
    return np.stack([columns[name] for name in BASELINE_FEATURES], axis=1).astype(np.float32)


def _risk_features(baseline: np.ndarray, susceptibility: np.ndarray) -> np.ndarray:
    """(n, len(_RISK_FEATURES)): general frailty (age, ECOG, prior therapy, susceptibility),
    cardiac (low LVEF, age), thrombotic (BMI), premenopausal."""
    b = baseline.astype(np.float64)
    age, ecog, bmi, lvef = b[:, _F["age"]], b[:, _F["ecog"]], b[:, _F["bmi"]], b[:, _F["lvef"]]
    frailty = 0.35 * (age - 52) / 10 + 0.45 * ecog + 0.3 * b[:, _F["prior_therapy"]] + susceptibility
    cardiac = 0.12 * (60 - lvef) + 0.2 * (age - 52) / 10
    thrombotic = 0.05 * (bmi - 26.5)
    premenopausal = 1.0 - b[:, _F["postmenopausal"]]
    return np.stack([frailty, cardiac, thrombotic, premenopausal], axis=1)


def _draw_block(p: TrialParams, seed: int, block: int) -> _Draws:
    """All draws of block ``block`` (participants block*BLOCK ...), in a fixed order."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(3, block)))
    n, n_ae, n_med = BLOCK, len(ADVERSE_EVENTS), len(TRIAL_MEDICATIONS)
    baseline = _baseline(rng, n, p)
    # Permuted blocks of 4 consecutive participants: two per arm.
    arm = (np.argsort(rng.random((n // 4, 4)), axis=1) % 2).reshape(n).astype(np.int8)
    enroll_day = rng.integers(0, p.accrual_days, n)
    susceptibility = p.susceptibility_sd * rng.standard_normal(n)
    risk = (_risk_features(baseline, susceptibility) @ p.arrays.ae_risk).astype(np.float32)
    return _Draws(
        baseline=baseline,
        arm=arm,
        enroll_day=enroll_day,
        risk=risk,
        first_delay=rng.integers(0, p.first_visit_max_days + 1, n),
        u_ae=rng.random((n, MAX_VISITS, n_ae), dtype=np.float32),
        u_med=rng.random((n, MAX_VISITS, n_med), dtype=np.float32),
        u_stop=rng.random((n, MAX_VISITS)),
        jitter=rng.integers(-2, 4, (n, MAX_VISITS)),
        n_followups=np.minimum(rng.poisson(p.mean_followups, n), p.max_followups),
        tail=rng.integers(0, 60, n),
        u_severe=rng.random(n),
    )


@dataclass
class _Course:
    """One arm's simulated visits for a block; visit slots ``< n_visits`` are real."""

    arm: np.ndarray  # (n,) int8
    n_visits: np.ndarray  # (n,)
    n_cycles: np.ndarray  # (n,) treatment visits (the first ones)
    delayed: np.ndarray  # (n,) cycles delayed by an AE
    days: np.ndarray  # (n, MAX_VISITS) int64
    phase: np.ndarray  # (n, MAX_VISITS) phase index (0 = follow-up)
    adverse_events: np.ndarray  # (n, MAX_VISITS, A) bool
    medications: np.ndarray  # (n, MAX_VISITS, M) bool
    end_day: np.ndarray  # (n,)
    severe_probability: np.ndarray  # (n,) float64
    severe: np.ndarray  # (n,) bool


def _simulate_course(p: TrialParams, d: _Draws, arm: np.ndarray) -> _Course:
    """Visits of every participant of ``d`` had they been randomised to ``arm``. A loop over
    the 14 visit slots, vectorised over participants (visit k depends on visit k - 1)."""
    t = p.arrays
    n = len(arm)
    planned = t.planned[arm]
    on = np.ones(n, bool)  # still on treatment: the next visit is a cycle
    n_cycles = np.zeros(n, np.int64)
    delayed = np.zeros(n, np.int64)
    day = d.enroll_day + d.first_delay
    cumulative = np.zeros((n, t.phase_agents.shape[1]), np.float32)  # earlier cycles per agent
    prev_ae = np.zeros(d.risk.shape, np.float32)
    prev_med = np.zeros((n, len(t.med_base)), np.float32)
    days = np.zeros((n, MAX_VISITS), np.int64)
    phase = np.zeros((n, MAX_VISITS), np.int64)
    aes = np.zeros((n, MAX_VISITS, d.risk.shape[1]), bool)
    meds = np.zeros((n, MAX_VISITS, len(t.med_base)), bool)
    for k in range(MAX_VISITS):
        valid = on | (k - n_cycles < d.n_followups)
        ph = np.where(on, t.regimen[arm, k], 0)
        logit = t.ae_base + t.ae_phase[ph] + cumulative @ t.ae_cumulative + t.ae_persist * prev_ae + d.risk
        ae = (d.u_ae[:, k] < _sigmoid(logit)) & valid[:, None]
        ae_f = ae.astype(np.float32)
        med_logit = t.med_base + t.med_phase[ph] + ae_f @ t.med_ae + prev_ae @ t.med_prev_ae + t.med_persist * prev_med
        med = (d.u_med[:, k] < _sigmoid(med_logit)) & valid[:, None]
        days[:, k], phase[:, k], aes[:, k], meds[:, k] = day, ph, ae, med
        # The next visit: another cycle, or the first / next follow-up.
        severe_now = (ae & t.severe).any(axis=1)
        delay = on & (ae & t.delaying).any(axis=1)
        stop_p = np.where(severe_now, _odds_up(p.stop_probability, p.stop_severe_odds), p.stop_probability)
        ending = on & ((k + 1 >= planned) | (d.u_stop[:, k] < stop_p))
        cumulative += t.phase_agents[ph]
        n_cycles = np.where(ending, k + 1, n_cycles)
        on &= ~ending
        delayed += delay & on
        gap = np.where(on, p.cycle_days + d.jitter[:, k] + p.delay_days * delay,
                       p.followup_gap_days + 4 * d.jitter[:, k])  # fmt: skip
        day = day + gap
        prev_ae, prev_med = ae_f, med.astype(np.float32)
    n_visits = n_cycles + d.n_followups
    last_day = days[np.arange(n), n_visits - 1]
    b = d.baseline.astype(np.float64)
    distinct_severe = (aes & t.severe).any(axis=1).sum(axis=1)
    severe_logit = (
        p.severe_intercept
        + p.severe_per_severe_ae * distinct_severe
        + p.severe_per_log_ae * np.log1p(aes.sum(axis=(1, 2)))
        + p.severe_per_age_decade * (b[:, _F["age"]] - 52) / 10
        + p.severe_per_ecog * b[:, _F["ecog"]]
    )
    probability = _sigmoid(severe_logit)
    return _Course(
        arm=arm.astype(np.int8), n_visits=n_visits, n_cycles=n_cycles, delayed=delayed, days=days,
        phase=phase, adverse_events=aes, medications=meds, end_day=last_day + d.tail,
        severe_probability=probability, severe=d.u_severe < probability,
    )  # fmt: skip


def _odds_up(probability: float, odds_ratio: float) -> float:
    if probability in (0.0, 1.0):
        return probability
    odds = probability / (1 - probability) * odds_ratio
    return odds / (1 + odds)


def _nested(events: np.ndarray, valid: np.ndarray, outer: pa.Array) -> pa.ListArray:
    """(n, V, X) bool per visit slot -> list<list<int16>> of ids per real visit."""
    events = events & valid[:, :, None]
    inner = np.zeros(int(valid.sum()) + 1, np.int64)
    np.cumsum(events.sum(axis=2)[valid], out=inner[1:])
    ids = np.nonzero(events)[2].astype(np.int16)  # row-major: participant, visit, then id
    return pa.ListArray.from_arrays(outer, pa.ListArray.from_arrays(pa.array(inner.astype(np.int32)), pa.array(ids)))


def _course_table(subject_id: np.ndarray, d: _Draws, c: _Course) -> pa.Table:
    n = len(subject_id)
    valid = np.arange(MAX_VISITS) < c.n_visits[:, None]
    outer = np.zeros(n + 1, np.int64)
    np.cumsum(c.n_visits, out=outer[1:])
    outer = pa.array(outer.astype(np.int32))
    width = d.baseline.shape[1]
    baseline = pa.ListArray.from_arrays(
        pa.array(np.arange(n + 1, dtype=np.int32) * width), pa.array(d.baseline.reshape(-1))
    )
    treatments = _PHASE_AGENTS[c.phase]  # (n, V, T): the agents of each visit's phase
    columns = [
        pa.array(subject_id, pa.int64()),
        pa.array(c.arm, pa.int8()),
        pa.array(d.enroll_day.astype(np.int32)),
        pa.array(c.end_day.astype(np.int32)),
        baseline,
        pa.ListArray.from_arrays(outer, pa.array(c.days[valid].astype(np.int32))),
        _nested(treatments, valid, outer),
        _nested(c.medications, valid, outer),
        _nested(c.adverse_events, valid, outer),
        pa.array(c.severe),
    ]
    return pa.Table.from_arrays(columns, schema=schema.TRIAL_SCHEMA)


_PHASE_AGENTS = np.zeros((len(PHASES), len(TRIAL_TREATMENTS)), bool)
for _name, _agents in PHASES.items():
    _PHASE_AGENTS[_PHASE_INDEX[_name], list(_agents)] = True


@dataclass
class _Block:
    """A range of participants: ids, shared draws, factual course and twin course."""

    index: np.ndarray  # participant index (subject_id - TRIAL_ID_OFFSET)
    draws: _Draws
    factual: _Course
    twin: _Course

    def tables(self) -> tuple[pa.Table, pa.Table]:
        subject_id = schema.TRIAL_ID_OFFSET + self.index
        rows = _course_table(subject_id, self.draws, self.factual)
        twin = _course_table(subject_id, self.draws, self.twin)
        p_factual = self.factual.severe_probability
        p_twin = self.twin.severe_probability
        effect = np.where(self.factual.arm == 1, p_factual - p_twin, p_twin - p_factual)
        for name, values in ((SEVERE_PROBABILITY, p_twin), (FACTUAL_SEVERE_PROBABILITY, p_factual),
                             (ARM_EFFECT, effect)):  # fmt: skip
            twin = twin.append_column(COUNTERFACTUAL_SCHEMA.field(name), pa.array(values.astype(np.float32)))
        return rows, twin


def _simulate(p: TrialParams, seed: int, first: int, n: int) -> _Block:
    if first < 0 or n < 1:
        raise ValueError(f"simulate_trial_block: need first >= 0 and n >= 1, got first={first}, n={n}")
    parts = []
    for block in range(first // BLOCK, (first + n - 1) // BLOCK + 1):
        lo, hi = max(first - block * BLOCK, 0), min(first + n - block * BLOCK, BLOCK)
        parts.append(_draw_block(p, seed, block).slice(lo, hi))
    draws = _Draws(**{k: np.concatenate([getattr(part, k) for part in parts]) for k in vars(parts[0])})
    return _Block(
        index=np.arange(first, first + n, dtype=np.int64),
        draws=draws,
        factual=_simulate_course(p, draws, draws.arm),
        twin=_simulate_course(p, draws, 1 - draws.arm),
    )


def simulate_trial_block(p: TrialParams, seed: int, first: int, n: int) -> tuple[pa.Table, pa.Table]:
    """Participants ``first .. first + n - 1`` as (rows in TRIAL_SCHEMA, their twins in
    COUNTERFACTUAL_SCHEMA). Pure and Ray-free; each row depends only on (seed, index)."""
    return _simulate(p, seed, first, n).tables()


def trial_split_codes(subject_ids: np.ndarray) -> np.ndarray:
    """Split code per participant: ``splits.split_codes`` of the participant index (the id
    less ``TRIAL_ID_OFFSET``), so a trial gets tuning and held-out participants as patients do."""
    return split_codes(subject_ids)  # splits.split_codes indexes trial ids from the offset


# --------------------------------------------------------------------------------------------
# Writing the trial part.


def counterfactual_path(root: str | Path, split: str, chunk: int) -> Path:
    """Twin shard matching ``schema.trial_shard_path(root, split, chunk)`` row for row."""
    schema.trial_split_dir(root, split)  # checks the split name
    return Path(root) / schema.GROUND_TRUTH_DIR / COUNTERFACTUAL_DIR / split / f"part-{chunk:05d}.parquet"


def write_trial_chunk(p: TrialParams, seed: int, root: str, chunk: int, first: int, n: int,
                      row_group: int) -> dict[str, Any]:  # fmt: skip
    """Simulate participants ``first .. first + n - 1`` and write chunk ``chunk`` of every
    split (rows and twins). Returns counts only, never rows."""
    n_ae, n_med, n_tx = len(ADVERSE_EVENTS), len(TRIAL_MEDICATIONS), len(TRIAL_TREATMENTS)
    rows_out = {s: _SplitFile(schema.trial_shard_path(root, s, chunk), schema.TRIAL_SCHEMA, row_group)
                for s in schema.SPLITS}  # fmt: skip
    twin_out = {s: _SplitFile(counterfactual_path(root, s, chunk), COUNTERFACTUAL_SCHEMA, row_group)
                for s in schema.SPLITS}  # fmt: skip
    counts: dict[str, Any] = {
        "participants": {s: [0, 0] for s in schema.SPLITS},  # per arm
        "severe_outcomes": {s: [0, 0] for s in schema.SPLITS},
        "visits": [0, 0], "treatment_visits": [0, 0], "stopped_early": [0, 0], "delayed_cycles": [0, 0],
        "adverse_events": np.zeros(n_ae, np.int64), "medications": np.zeros(n_med, np.int64),
        "treatments": np.zeros(n_tx, np.int64), "arm_effect_sum": 0.0,
        "twin_severe_outcomes": 0, "twin_adverse_events": 0,
    }  # fmt: skip
    for lo in range(first, first + n, row_group):
        block = _simulate(p, seed, lo, min(row_group, first + n - lo))
        rows, twins = block.tables()
        codes = split_codes(block.index)
        f = block.factual
        for split, code in SPLIT_CODES.items():
            take = np.flatnonzero(codes == code)
            rows_out[split].add(rows.take(pa.array(take)))
            twin_out[split].add(twins.take(pa.array(take)))
            for arm in (0, 1):
                in_arm = f.arm[take] == arm
                counts["participants"][split][arm] += int(in_arm.sum())
                counts["severe_outcomes"][split][arm] += int(f.severe[take][in_arm].sum())
        for arm in (0, 1):
            in_arm = f.arm == arm
            counts["visits"][arm] += int(f.n_visits[in_arm].sum())
            counts["treatment_visits"][arm] += int(f.n_cycles[in_arm].sum())
            counts["stopped_early"][arm] += int((f.n_cycles < p.arrays.planned[f.arm])[in_arm].sum())
            counts["delayed_cycles"][arm] += int(f.delayed[in_arm].sum())
        counts["adverse_events"] += f.adverse_events.sum(axis=(0, 1))
        counts["medications"] += f.medications.sum(axis=(0, 1))
        valid = np.arange(MAX_VISITS) < f.n_visits[:, None]
        counts["treatments"] += (_PHASE_AGENTS[f.phase] & valid[:, :, None]).sum(axis=(0, 1))
        counts["arm_effect_sum"] += float(twins[ARM_EFFECT].to_numpy().astype(np.float64).sum())
        counts["twin_severe_outcomes"] += int(block.twin.severe.sum())
        counts["twin_adverse_events"] += int(block.twin.adverse_events.sum())
    counts["data_bytes"] = sum(out.close() for out in rows_out.values())
    counts["truth_bytes"] = sum(out.close() for out in twin_out.values())
    return counts


def _add(total: Any, part: Any) -> Any:
    """Element-wise sum of two nested count structures of the same shape."""
    if isinstance(part, dict):
        return {k: _add(total[k], v) for k, v in part.items()}
    if isinstance(part, list):
        return [_add(a, b) for a, b in zip(total, part, strict=True)]
    return total + part


def write_trial(root: str | Path, n_participants: int, seed: int, *, workers: int | None = None,
                params: TrialParams | None = None, chunk_size: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Simulate ``n_participants`` and write ``trial/`` plus its ground truth under ``root``.

    Returns the trial part's metadata (``DatasetMetadata.trial``): design, baseline feature
    names, counts per split and arm, and provenance. Chunks of ``chunk_size`` participants
    (a multiple of ``BLOCK``, default ``CHUNK_PARTICIPANTS``) each become one file per split;
    several chunks run as Ray tasks, at most ``workers`` in flight, one chunk runs here.
    Memory is bounded by a row group whatever N; rows never reach the driver.
    """
    if n_participants < 1:
        raise ValueError(f"n_participants: expected >= 1, got {n_participants}")
    chunk_size = chunk_size or CHUNK_PARTICIPANTS
    if chunk_size < 1 or chunk_size % BLOCK:
        raise ValueError(f"chunk_size: expected a positive multiple of {BLOCK} (the RNG block), got {chunk_size}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers: expected >= 1, got {workers}")
    p = params or TrialParams()
    root = Path(root).resolve()
    stale = [f for d in (root / schema.TRIAL_DIR, root / schema.GROUND_TRUTH_DIR / COUNTERFACTUAL_DIR)
             if d.exists() for f in d.rglob("*.parquet")]  # fmt: skip
    if stale:
        raise FileExistsError(
            f"{root}: already holds a trial part ({stale[0].relative_to(root)}, ...); write a trial into a "
            "dataset without one (generate_dataset(..., overwrite=True) clears its own)"
        )
    began = time.perf_counter()
    truth_dir = root / schema.GROUND_TRUTH_DIR
    truth_dir.mkdir(parents=True, exist_ok=True)
    (truth_dir / PARAMS_FILE).write_text(
        json.dumps({"generator": GENERATOR_NAME, "version": GENERATOR_VERSION, "scalars": p.scalars(),
                    "tables": p.tables()}, indent=2) + "\n"  # fmt: skip
    )
    row_group = min(ROW_GROUP_PARTICIPANTS, chunk_size)
    n_chunks = math.ceil(n_participants / chunk_size)
    jobs = [(c, c * chunk_size, min(chunk_size, n_participants - c * chunk_size)) for c in range(n_chunks)]
    if n_chunks == 1 or workers == 1:
        results = [write_trial_chunk(p, seed, str(root), c, lo, n, row_group) for c, lo, n in jobs]
    else:
        results = _run_on_ray(p, seed, root, jobs, row_group, workers)
    totals = results[0]
    for result in results[1:]:
        totals = _add(totals, result)

    per_split = {s: sum(totals["participants"][s]) for s in schema.SPLITS}
    if sum(per_split.values()) != n_participants:
        raise RuntimeError(f"trial: wrote {per_split} participants, expected {n_participants} in all")
    return {
        "generator": GENERATOR_NAME,
        "version": GENERATOR_VERSION,
        "seed": seed,
        "indication": INDICATION,
        "arm_names": list(p.arm_names),
        "arm_regimens": [list(r) for r in p.arm_regimens],
        "baseline_features": list(BASELINE_FEATURES),
        "subject_id_offset": schema.TRIAL_ID_OFFSET,
        "max_visits": MAX_VISITS,
        "participants": per_split,
        "participants_per_arm": totals["participants"],
        "severe_outcomes": {s: sum(v) for s, v in totals["severe_outcomes"].items()},
        "severe_outcomes_per_arm": totals["severe_outcomes"],
        "visits_per_arm": totals["visits"],
        "treatment_visits_per_arm": totals["treatment_visits"],
        "stopped_early_per_arm": totals["stopped_early"],
        "delayed_cycles_per_arm": totals["delayed_cycles"],
        "adverse_events": {c.name: int(v) for c, v in zip(ADVERSE_EVENTS, totals["adverse_events"], strict=True)},
        "medications": {c.code: int(v) for c, v in zip(TRIAL_MEDICATIONS, totals["medications"], strict=True)},
        "treatments": {c.code: int(v) for c, v in zip(TRIAL_TREATMENTS, totals["treatments"], strict=True)},
        "parameters": p.scalars(),
        "parameter_file": f"{schema.GROUND_TRUTH_DIR}/{PARAMS_FILE}",
        "ground_truth": {
            "counterfactual_dir": f"{schema.GROUND_TRUTH_DIR}/{COUNTERFACTUAL_DIR}",
            "mean_arm_effect": round(totals["arm_effect_sum"] / n_participants, 6),
            "twin_severe_outcomes": totals["twin_severe_outcomes"],
            "twin_adverse_events": totals["twin_adverse_events"],
        },
        "block_size": BLOCK,
        "chunk_size": chunk_size,
        "row_group_size": row_group,
        "compression": COMPRESSION,
        "chunks": n_chunks,
        "data_bytes": totals["data_bytes"],
        "ground_truth_bytes": totals["truth_bytes"],
        "seconds": round(time.perf_counter() - began, 2),
    }


def _run_on_ray(p: TrialParams, seed: int, root: Path, jobs: list[tuple[int, int, int]], row_group: int,
                workers: int | None) -> list[dict[str, Any]]:  # fmt: skip
    """Chunks as Ray tasks, at most ``workers`` in flight (default: the cluster's CPUs)."""
    import ray

    if not ray.is_initialized():
        ray.init()  # honours RAY_ADDRESS
    workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    task = ray.remote(num_cpus=1, max_retries=3)(write_trial_chunk)
    params_ref = ray.put(p)
    pending, results, queue = [], [], list(jobs)
    while queue or pending:
        while queue and len(pending) < workers:
            chunk, lo, n = queue.pop(0)
            pending.append(task.remote(params_ref, seed, str(root), chunk, lo, n, row_group))
        done, pending = ray.wait(pending, num_returns=1)
        results.append(ray.get(done[0]))
    return results


__all__ = [
    "ARM_EFFECT",
    "BASELINE_FEATURES",
    "COUNTERFACTUAL_SCHEMA",
    "FACTUAL_SEVERE_PROBABILITY",
    "MAX_VISITS",
    "SEVERE_PROBABILITY",
    "TrialParams",
    "counterfactual_path",
    "simulate_trial_block",
    "trial_split_codes",
    "write_trial",
    "write_trial_chunk",
]
