"""Records and features of the scorecard, checked against hand-computed values."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from test_metrics_fixtures import N_WEEKS, TINY, table_of, tiny_block, tiny_table

from mirror.data import schema as S
from mirror.data import validate as V
from mirror.metrics import features as F
from mirror.metrics.records import VALIDITY_RULES, PatientBlock, block_from_arrow


def _failed(block: PatientBlock, rule: str) -> np.ndarray:
    return (block.rule_failures >> VALIDITY_RULES.index(rule)) & 1 == 1


def test_block_reads_rows_and_flat_words():
    b = tiny_block()
    assert len(b) == 3 and b.n_words == 8
    assert b.lengths.tolist() == [3, 1, 4]
    assert b.conditions.tolist() == [5, 7, 5, 5, 7, 9, 5, 7]
    assert (b.rule_failures == 0).all()


def test_block_round_trips_through_arrow_and_take():
    b = tiny_block()
    again = block_from_arrow(b.to_table(), n_weeks=N_WEEKS)
    assert again.weeks.tolist() == b.weeks.tolist()
    picked = b.take(np.array([2, 0]))
    assert picked.subject_id.tolist() == [3, 1]
    assert picked.conditions.tolist() == [7, 9, 5, 7, 5, 7, 5]
    both = PatientBlock.concat([b.take([0]), b.take([1, 2])])
    assert both.offsets.tolist() == b.offsets.tolist()
    assert both.conditions.tolist() == b.conditions.tolist()


def test_validity_rules_are_recorded_per_patient_and_unsorted_weeks_resorted():
    bad = [
        (1, 0, -1100, [(5, 4, 10)]),  # sex 0
        (2, 1, -1100, [(5, 4, 20), (7, 4, 10)]),  # weeks go backwards
        (3, 1, -1100, [(5, 9, 10)]),  # age group 9 at 21 years
        (
            4,
            1,
            -1100,
            [(5, 4, 150)],
        ),  # week beyond the 100-week span (age still group 4? no: 23.2y -> 4)
        (5, 1, -1100, []),  # empty
    ]
    b = block_from_arrow(table_of(bad, enroll=(0, 99)), n_weeks=N_WEEKS)
    assert _failed(b, V.SEX).tolist() == [True, False, False, False, False]
    assert _failed(b, V.SORTED_TIMES).tolist() == [False, True, False, False, False]
    assert _failed(b, V.AGE_CONSISTENCY).tolist() == [False, False, True, False, False]
    assert _failed(b, V.WEEK_RANGE).tolist() == [False, False, False, True, False]
    assert _failed(b, V.ENROLLMENT).tolist() == [
        False,
        False,
        False,
        True,
        False,
    ]  # week 150 > enroll end
    assert _failed(b, V.EMPTY_SENTENCE).tolist() == [False, False, False, False, True]
    assert b.weeks[b.offsets[1] : b.offsets[2]].tolist() == [
        10,
        20,
    ]  # re-sorted with their conditions
    assert b.conditions[b.offsets[1] : b.offsets[2]].tolist() == [7, 5]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda t: t.set_column(5, S.N_EVENTS, pa.array([3, 2, 4], pa.int32())),
            "row 1: list_lengths",
        ),
        (
            lambda t: t.set_column(
                6, S.CONDITIONS, pa.array([[5, 7, 5], [605], [7, 9, 5, 7]], pa.list_(pa.int16()))
            ),
            "row 1: condition_range",
        ),
        (
            lambda t: t.set_column(
                8, S.WEEKS, pa.array([[10, 10, 20], [30], [0, 5, 5, -1]], pa.list_(pa.int32()))
            ),
            "row 2: week_encodable",
        ),
        (
            lambda t: t.set_column(1, S.SEX, pa.array([1, -1, 1], pa.int32())),
            "column 'sex' is int32",
        ),
    ],
)
def test_unscorable_records_raise_naming_file_row_and_rule(mutate, message):
    with pytest.raises(ValueError, match=message) as err:
        block_from_arrow(mutate(tiny_table()), n_weeks=N_WEEKS, file="shard.parquet")
    assert "shard.parquet" in str(err.value)


def test_multi_hot_matrices():
    b = tiny_block()
    cond = F.condition_matrix(b)
    assert cond.shape == (3, 605)
    assert cond.sum(axis=1).A1.tolist() == [2, 1, 3]
    assert sorted(cond[2].indices.tolist()) == [5, 7, 9]
    tok = F.token_matrix(b)
    assert sorted(tok[0].indices.tolist()) == [5 * 24 + 4, 7 * 24 + 4]


def test_neighbour_keys_count_distinct_tokens_and_words():
    indptr, keys = F.neighbour_keys(tiny_block())
    assert np.diff(indptr).tolist() == [2 + 3, 1 + 1, 3 + 4]
    k1, k2 = set(keys[indptr[0] : indptr[1]]), set(keys[indptr[1] : indptr[2]])
    assert k1 & k2 == {5 * 24 + 4}  # same diagnosis-age token, different weeks
    assert len(k1) + len(k2) - 2 * len(k1 & k2) == 5  # Hamming distance of patients 1 and 2


def test_record_hash_is_the_multiset_of_words_and_sex():
    base = F.record_hashes(tiny_block())
    assert len(set(base.tolist())) == 3
    reordered = [(1, 1, -1100, [(7, 4, 10), (5, 4, 10), (5, 4, 20)])] + TINY[1:]
    assert (F.record_hashes(block_from_arrow(table_of(reordered), n_weeks=N_WEEKS)) == base).all()
    other_sex = [(1, -1, -1100, TINY[0][3])]
    moved = [(1, 1, -1100, [(5, 4, 10), (7, 4, 10), (5, 4, 21)])]
    doubled = [(1, 1, -1100, TINY[0][3] + [(5, 4, 20)])]
    for variant in (other_sex, moved, doubled):
        assert F.record_hashes(block_from_arrow(table_of(variant), n_weeks=N_WEEKS))[0] != base[0]


def test_visits_group_words_by_week():
    b = tiny_block()
    v = F.visits(b)
    assert v.row.tolist() == [0, 0, 1, 2, 2, 2]
    assert v.week.tolist() == [10, 20, 30, 0, 5, 40]
    assert F.visits_per_patient(b, v).tolist() == [2, 1, 3]
    hashes, rows = F.visit_hashes(b)
    assert rows.tolist() == v.row.tolist()
    assert len(set(hashes.tolist())) == 6


def test_visit_set_hash_ignores_word_order_and_repeats_within_a_visit():
    base = F.visit_set_hashes(tiny_block())
    same_visits = [(1, -1, -1100, [(7, 4, 10), (5, 4, 10), (5, 4, 10), (5, 4, 20)])]
    assert (
        F.visit_set_hashes(block_from_arrow(table_of(same_visits), n_weeks=N_WEEKS))[0] == base[0]
    )
    one_visit_less = [(1, 1, -1100, [(5, 4, 10), (7, 4, 10)])]
    assert (
        F.visit_set_hashes(block_from_arrow(table_of(one_visit_less), n_weeks=N_WEEKS))[0]
        != base[0]
    )


def test_patient_features_numeric_columns():
    x = F.patient_features(tiny_block(), N_WEEKS).toarray()
    assert x.shape == (3, F.N_PATIENT_FEATURES)
    numeric = x[:, F.N_CONDITIONS + F.N_TOKENS :]
    col = {name: numeric[:, i] for i, name in enumerate(F.NUMERIC_FEATURES)}
    np.testing.assert_allclose(col["log1p_words"], np.log1p([3, 1, 4]), rtol=1e-6)
    np.testing.assert_allclose(col["log1p_visits"], np.log1p([2, 1, 3]), rtol=1e-6)
    np.testing.assert_allclose(col["log1p_span_weeks"], np.log1p([10, 0, 40]), rtol=1e-6)
    np.testing.assert_allclose(col["first_week"], [0.10, 0.30, 0.0], rtol=1e-6)
    assert col["sex"].tolist() == [1, -1, 1]
    assert x[:, : F.N_CONDITIONS].sum(axis=1).tolist() == [2, 1, 3]
