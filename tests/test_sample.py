"""Sampling writes only valid patients, counts every rejection, and its output validates."""

from __future__ import annotations

import torch

from mirror.data import schema, vocab
from mirror.data.simulator import generate_dataset
from mirror.data.validate import validate_dataset
from mirror.models.base import GenerationContext
from mirror.models.sentences import sample_sentence_rows
from mirror.synthesize import SYNTHETIC_ID_OFFSET, female_fraction, sample_patients


class ThreeKindsOfSentence:
    """A generator whose rows cycle through: valid, never ends, weeks going backwards."""

    latent_dim = 4

    def generate(self, z: torch.Tensor, sex: torch.Tensor, max_words: int, **options):
        b = z.shape[0]
        dx = torch.full((b, max_words), vocab.PAD)
        wk = torch.full((b, max_words), vocab.PAD)
        n = torch.zeros(b, dtype=torch.long)
        token = int(vocab.diag_age_token(5, 6))  # condition 5 at age 30-34
        kind = torch.arange(b) % 3
        valid, endless, backwards = kind == 0, kind == 1, kind == 2
        dx[valid, :3] = token
        wk[valid, :3] = torch.tensor([10, 12, 12]) + vocab.N_SPECIAL
        n[valid] = 3
        dx[endless] = token
        wk[endless] = 40 + vocab.N_SPECIAL
        n[endless] = max_words  # alive after every step: no <EOS>
        dx[backwards, :2] = token
        wk[backwards, :2] = torch.tensor([20, 10]) + vocab.N_SPECIAL
        n[backwards] = 2
        return dx, wk, n

    def sample_latent(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, generator=generator)

    def sample_rows(self, n: int, *, rng: torch.Generator, first_id: int, context: GenerationContext):
        return sample_sentence_rows(self, schema.MAX_WORDS, n, rng=rng, first_id=first_id, context=context)


def test_sampling_rejects_invalid_sentences_and_writes_a_valid_dataset(ray_cluster, tmp_path):
    real = tmp_path / "real"
    generate_dataset(real, 600, seed=2, workers=1)
    out = tmp_path / "synthetic"
    report = sample_patients(
        ThreeKindsOfSentence(), real, n_patients=100, out_dir=out,
        female_share=female_fraction(real), seed=0, batch_size=90,
    )
    assert report.written == 100
    # A third of every batch is valid; the other two thirds are rejected, one rule each.
    assert report.rejected["no_eos"] == report.rejected["week_order"]
    assert abs(report.rejected["no_eos"] - report.drawn / 3) <= 4  # <= 1 per batch
    assert report.rejected["empty"] == report.rejected["age_time"] == 0
    assert report.written + 2 * report.rejected["no_eos"] <= report.drawn
    result = validate_dataset(out)
    assert result.ok, result.summary()
    meta = schema.DatasetMetadata.read(out)
    assert meta.patients == {schema.TRAIN: 100, schema.TUNING: 0, schema.HELD_OUT: 0}
    assert meta.provenance["rejected"]["no_eos"] == report.rejected["no_eos"]
    ids = schema.split_files(out, schema.TRAIN)
    import pyarrow.parquet as pq

    subject_ids = pq.read_table(ids[0], columns=[schema.SUBJECT_ID]).column(0).to_pylist()
    assert subject_ids[0] == SYNTHETIC_ID_OFFSET  # cannot collide with real ids
