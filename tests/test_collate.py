"""Collate and masks: exact layout on a hand example, the mask rules, and vectorisation."""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

from mirror.data import collate as C
from mirror.data import schema as S
from mirror.data.collate import CollateConfig, MaskSpec, collate
from mirror.data.vocab import EOS, PAD, SOS, diag_age_token

N_WEEKS = 20


def table(rows: list[dict]) -> pa.Table:
    """Rows with model columns (n_events is derived), typed as in ROW_SCHEMA."""
    fields = [S.ROW_SCHEMA.field(name) for name in S.MODEL_COLUMNS]
    full = [r | {S.N_EVENTS: len(r[S.CONDITIONS])} for r in rows]
    return pa.Table.from_pylist(full, schema=pa.schema(fields))


def patient(subject_id: int, sex: int, words: list[tuple[int, int, int]]) -> dict:
    """words: (condition, age group, week) in forward order."""
    return {
        S.SUBJECT_ID: subject_id,
        S.SEX: sex,
        S.CONDITIONS: [w[0] for w in words],
        S.AGE_GROUPS: [w[1] for w in words],
        S.WEEKS: [w[2] for w in words],
    }


HAND = [
    patient(10, -1, [(0, 4, 1), (7, 4, 3), (604, 23, 19)]),
    patient(11, 1, [(5, 0, 0)]),
    patient(12, 1, [(1, 2, 5), (1, 2, 5)]),
]


def random_table(n_rows: int, seed: int = 0, max_len: int = 100) -> pa.Table:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, n_rows)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    total = int(offsets[-1])
    return pa.table(
        {
            S.SUBJECT_ID: pa.array(np.arange(1000, 1000 + n_rows), pa.int64()),
            S.SEX: pa.array(rng.choice([-1, 1], n_rows).astype(np.int8)),
            S.N_EVENTS: pa.array(lengths.astype(np.int32)),
            S.CONDITIONS: pa.ListArray.from_arrays(offsets, pa.array(rng.integers(0, 605, total).astype(np.int16))),
            S.AGE_GROUPS: pa.ListArray.from_arrays(offsets, pa.array(rng.integers(0, 24, total).astype(np.int8))),
            S.WEEKS: pa.ListArray.from_arrays(offsets, pa.array(np.sort(rng.integers(0, N_WEEKS, total)).astype(np.int32))),
        }
    )


def dx(condition: int, age_group: int) -> int:
    return int(diag_age_token(condition, age_group))


def wk(week: int) -> int:
    return 3 + week


# --------------------------------------------------------------------------------------------
# Layout


def test_collate_hand_example_exact_layout():
    b = collate(table(HAND), CollateConfig(n_weeks=N_WEEKS))
    a1, a2, a3 = dx(0, 4), dx(7, 4), dx(604, 23)
    b1, c1 = dx(5, 0), dx(1, 2)
    assert b.subject_id.tolist() == [10, 11, 12]
    assert b.sex.dtype == torch.float32 and b.sex.tolist() == [-1.0, 1.0, 1.0]
    assert b.lengths.tolist() == [3, 1, 2]
    # T = L + 1 = 4; encoder reversed after <EOS>, decoder after <SOS>, targets end in <EOS>.
    assert b.enc_dx.tolist() == [[EOS, a3, a2, a1], [EOS, b1, PAD, PAD], [EOS, c1, c1, PAD]]
    assert b.enc_wk.tolist() == [[EOS, wk(19), wk(3), wk(1)], [EOS, wk(0), PAD, PAD], [EOS, wk(5), wk(5), PAD]]
    assert b.dec_dx.tolist() == [[SOS, a1, a2, a3], [SOS, b1, PAD, PAD], [SOS, c1, c1, PAD]]
    assert b.dec_wk.tolist() == [[SOS, wk(1), wk(3), wk(19)], [SOS, wk(0), PAD, PAD], [SOS, wk(5), wk(5), PAD]]
    assert b.tgt_dx.tolist() == [[a1, a2, a3, EOS], [b1, EOS, PAD, PAD], [c1, c1, EOS, PAD]]
    assert b.tgt_wk.tolist() == [[wk(1), wk(3), wk(19), EOS], [wk(0), EOS, PAD, PAD], [wk(5), wk(5), EOS, PAD]]
    assert b.masked.shape == (3, 3) and not b.masked.any()
    for name in ("subject_id", "lengths", "enc_dx", "enc_wk", "dec_dx", "dec_wk", "tgt_dx", "tgt_wk"):
        assert getattr(b, name).dtype == torch.int64, name
    assert b.n_tokens == 6 + 3


def test_collate_handles_slices_chunks_and_record_batches():
    """Ray hands out slices of blocks and multi-chunk tables: all must give the same tensors."""
    full = random_table(50)
    cfg = CollateConfig(n_weeks=N_WEEKS, mask=MaskSpec(), seed=3)
    want = collate(full.slice(10, 25), cfg).as_dict()
    chunked = pa.concat_tables([full.slice(10, 7), full.slice(17, 18)])
    assert chunked.column(S.CONDITIONS).num_chunks == 2
    for got in (
        collate(chunked, cfg),
        collate(full.combine_chunks().to_batches()[0].slice(10, 25), cfg),
        collate({name: full.column(name).slice(10, 25) for name in full.column_names}, cfg),
    ):
        for name, tensor in got.as_dict().items():
            assert torch.equal(tensor, want[name]), name


def test_collate_reversal_matches_per_row_reference():
    """Every row of a random batch against a plain per-row construction of the contract."""
    t = random_table(64, seed=1)
    b = collate(t, CollateConfig(n_weeks=N_WEEKS))
    rows = t.to_pylist()
    for i, row in enumerate(rows):
        n = row[S.N_EVENTS]
        words = [dx(c, a) for c, a in zip(row[S.CONDITIONS], row[S.AGE_GROUPS], strict=True)]
        weeks = [wk(w) for w in row[S.WEEKS]]
        pad = [PAD] * (b.enc_dx.shape[1] - n - 1)
        assert b.enc_dx[i].tolist() == [EOS, *words[::-1], *pad]
        assert b.enc_wk[i].tolist() == [EOS, *weeks[::-1], *pad]
        assert b.dec_dx[i].tolist() == [SOS, *words, *pad]
        assert b.tgt_wk[i].tolist() == [*weeks, EOS, *pad]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda r: r[S.WEEKS].append(1), "subject_id 10: weeks and conditions differ"),
        (lambda r: r.update({S.WEEKS: [1, 2, N_WEEKS]}), "week out of range"),
        (lambda r: r.update({S.CONDITIONS: [], S.AGE_GROUPS: [], S.WEEKS: []}), "subject_id 10 has no events"),
    ],
)
def test_collate_rejects_rows_that_break_the_contract(change, match):
    rows = [dict(r, **{k: list(v) for k, v in r.items() if isinstance(v, list)}) for r in HAND]
    change(rows[0])
    fields = [S.ROW_SCHEMA.field(name) for name in S.MODEL_COLUMNS]
    t = pa.Table.from_pylist([r | {S.N_EVENTS: len(r[S.CONDITIONS])} for r in rows], schema=pa.schema(fields))
    with pytest.raises(ValueError, match=match):
        collate(t, CollateConfig(n_weeks=N_WEEKS))


def test_collate_names_a_missing_column():
    with pytest.raises(KeyError, match="no column 'weeks'"):
        collate(table(HAND).drop_columns([S.WEEKS]), CollateConfig(n_weeks=N_WEEKS))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="n_weeks"):
        CollateConfig(n_weeks=0)
    with pytest.raises(ValueError, match="MaskSpec.kind"):
        MaskSpec(kind="random")
    with pytest.raises(ValueError, match="MaskSpec.rate"):
        MaskSpec(rate=0.0)


# --------------------------------------------------------------------------------------------
# Masks


def noise_for(lengths: np.ndarray, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((len(lengths), int(lengths.max())))


def expected_k(n: np.ndarray, rate: float) -> np.ndarray:
    return np.maximum(1, np.floor(rate * n + 0.5)).astype(int)


def test_training_mask_follows_the_seed_rule():
    lengths = np.repeat(np.arange(1, 101), 200)  # 20,000 sentences of every length 1..100
    mask = C.training_mask(lengths, noise_for(lengths), rate=0.1, min_words=10)
    assert mask.shape == (len(lengths), 100)
    per_sentence = mask.sum(axis=1)
    short = lengths <= 10
    assert per_sentence[short].sum() == 0  # sentences of <= 10 words are never masked
    k = expected_k(lengths[~short], 0.1)
    assert np.array_equal(per_sentence[~short], k)  # exactly k = max(1, round(10% n)) each
    fraction = per_sentence[~short].sum() / lengths[~short].sum()
    assert 0.095 < fraction < 0.105, fraction  # ~10% of words in sentences longer than 10
    # The end: the last ceil(k/2) words are always masked; the first word never is.
    long_mask, n = mask[~short], lengths[~short]
    j = np.arange(100)[None, :]
    at_end = (j >= (n - (k + 1) // 2)[:, None]) & (j < n[:, None])
    assert (long_mask | ~at_end).all()
    assert not long_mask[:, 0].any()
    assert not (mask & (j >= lengths[:, None])).any()  # never beyond the sentence
    # The interior picks are spread over the interior, not stuck in one place.
    interior_hits = (long_mask & ~at_end).sum(axis=0)
    assert (interior_hits[1:80] > 0).all()


def test_training_mask_rate_is_a_parameter():
    lengths = np.full(1000, 60)
    mask = C.training_mask(lengths, noise_for(lengths), rate=0.25, min_words=10)
    assert (mask.sum(axis=1) == 15).all()
    assert mask[:, 52:60].all()  # ceil(15/2) = 8 end words


def test_interpolation_mask_is_interior_only():
    lengths = np.repeat(np.arange(1, 61), 100)
    mask = C.interpolation_mask(lengths, noise_for(lengths, 1), rate=0.2)
    k = np.where(lengths >= 3, np.minimum(expected_k(lengths, 0.2), lengths - 2), 0)
    assert np.array_equal(mask.sum(axis=1), k)
    assert not mask[:, 0].any()
    last = np.zeros_like(mask)
    last[np.arange(len(lengths)), lengths - 1] = True
    assert not (mask & last).any()


def test_extrapolation_mask_is_the_last_words():
    lengths = np.array([1, 2, 10, 15, 31])
    mask = C.extrapolation_mask(lengths, rate=0.1)
    assert mask.astype(int).tolist() == [
        [1] + [0] * 30,
        [0, 1] + [0] * 29,
        [0] * 9 + [1] + [0] * 21,
        [0] * 13 + [1, 1] + [0] * 16,  # round_half_up(1.5) = 2
        [0] * 28 + [1, 1, 1],
    ]


def test_masked_words_become_pad_in_the_encoder_only():
    t = random_table(200, seed=2)
    plain = collate(t, CollateConfig(n_weeks=N_WEEKS))
    b = collate(t, CollateConfig(n_weeks=N_WEEKS, mask=MaskSpec(), seed=7))
    assert b.masked.any()
    for name in ("enc_wk", "dec_dx", "dec_wk", "tgt_dx", "tgt_wk"):
        assert torch.equal(getattr(b, name), getattr(plain, name)), name
    # Word i sits at enc column n - i.
    rows, words = torch.nonzero(b.masked, as_tuple=True)
    cols = b.lengths[rows] - words
    assert (b.enc_dx[rows, cols] == PAD).all()
    assert (plain.enc_dx[rows, cols] != PAD).all()
    changed = b.enc_dx != plain.enc_dx
    assert changed.sum() == b.masked.sum()


def test_mask_depends_on_patient_seed_and_epoch_not_on_the_batch():
    t = random_table(120, seed=4)
    cfg = CollateConfig(n_weeks=N_WEEKS, mask=MaskSpec(), seed=11)
    whole = collate(t, cfg).masked
    for start, size in ((0, 40), (40, 17), (57, 63)):
        part = collate(t.slice(start, size), cfg).masked
        assert torch.equal(part, whole[start : start + size, : part.shape[1]])
    assert not torch.equal(collate(t, cfg, epoch=1).masked, whole)
    other_seed = CollateConfig(n_weeks=N_WEEKS, mask=MaskSpec(), seed=12)
    assert not torch.equal(collate(t, other_seed).masked, whole)


def test_patient_noise_is_uniform():
    u = C.patient_noise(np.arange(5000), 100, seed=0)
    assert u.shape == (5000, 100) and u.min() >= 0.0 and u.max() < 1.0
    counts = np.histogram(u, bins=10, range=(0, 1))[0]
    assert np.abs(counts / u.size - 0.1).max() < 0.002


# --------------------------------------------------------------------------------------------
# Vectorisation


def lines_executed(fn) -> int:
    """Python lines run by ``fn`` in the mirror package (a per-row or per-token loop in
    collate would make this grow with the batch)."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        if "/mirror/" not in frame.f_code.co_filename:
            return None
        if event == "line":
            count += 1
        return tracer

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


@pytest.mark.parametrize("mask", [None, MaskSpec("training"), MaskSpec("interpolation"), MaskSpec("extrapolation")])
def test_collate_runs_the_same_python_lines_for_any_batch_size(mask):
    cfg = CollateConfig(n_weeks=N_WEEKS, mask=mask)
    small, large = random_table(4, seed=5), random_table(4096, seed=6)
    assert lines_executed(lambda: collate(small, cfg)) == lines_executed(lambda: collate(large, cfg))
