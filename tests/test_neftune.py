"""NEFTune's noise (training.neftune_noise_alpha): per sample, independent of how samples are batched."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unsloth_mgpu_cli.neftune import NoisyEmbeddings, packed_layout, padded_layout

HIDDEN = 16
LENGTHS = np.array([5, 3, 7, 2])


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, HIDDEN)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids):
        return self.embed(input_ids)


def sample_noise(noise: NoisyEmbeddings, step: int, samples: list[int], packed: bool) -> dict[int, torch.Tensor]:
    """Each sample's noise as the hook would add it to a padded or packed micro-batch of `samples`."""
    rows = (packed_layout if packed else padded_layout)(samples, LENGTHS)
    width = sum(LENGTHS[samples]) if packed else max(LENGTHS[samples])
    with noise.batch(step, rows):
        out = noise.noise((len(rows), width, HIDDEN), "cpu")
    return {i: out[r, start : start + n] for r, row in enumerate(rows) for i, start, n in row}


def test_a_samples_noise_does_not_depend_on_batching_or_rank():
    """What makes N workers equal one: sample 2's noise is the same alone, padded with others or packed."""
    noise = NoisyEmbeddings(alpha=5.0, seed=42)
    alone = sample_noise(noise, 3, [2], packed=False)[2]
    padded = sample_noise(noise, 3, [0, 2, 1], packed=False)
    packed = sample_noise(noise, 3, [1, 3, 2], packed=True)
    assert torch.equal(padded[2], alone) and torch.equal(packed[2], alone)
    assert alone.shape == (7, HIDDEN)
    # fresh noise at every step and for every sample; the same again for the same (seed, step, sample)
    assert not torch.equal(sample_noise(noise, 4, [2], packed=False)[2], alone)
    assert not torch.equal(sample_noise(NoisyEmbeddings(5.0, seed=7), 3, [2], packed=False)[2], alone)
    assert not torch.equal(padded[0][:3], padded[1])


def test_noise_is_uniform_within_alpha_over_sqrt_of_the_samples_tokens_times_hidden():
    noise = NoisyEmbeddings(alpha=5.0, seed=0)
    rows = padded_layout([0, 3], LENGTHS)
    with noise.batch(0, rows):
        out = noise.noise((2, 5, HIDDEN), "cpu")
    for r, n in ((0, 5), (1, 2)):
        bound = 5.0 / math.sqrt(n * HIDDEN)
        drawn = out[r, :n]
        assert float(drawn.abs().max()) <= bound
        assert float(drawn.abs().max()) > 0.8 * bound and float(drawn.min()) < 0 < float(drawn.max())
    # the padding after sample 3's two tokens gets none
    assert torch.count_nonzero(out[1, 2:]) == 0


def test_the_hook_adds_noise_in_training_only_and_only_inside_a_batch():
    model, noise = Tiny(), NoisyEmbeddings(alpha=10.0, seed=1)
    noise.attach(model)
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]])
    clean = model.embed.weight[ids].detach()
    rows = padded_layout([0, 3], LENGTHS)
    model.train()
    assert torch.equal(model(ids).detach(), clean)  # outside a batch: nothing
    with noise.batch(0, rows):
        noisy = model(ids).detach()
        expected = noise.noise(ids.shape + (HIDDEN,), "cpu")
    assert torch.allclose(noisy - clean, expected, atol=1e-6) and torch.count_nonzero(expected) > 0
    model.eval()
    with noise.batch(0, rows):
        assert torch.equal(model(ids).detach(), clean)  # evaluation: nothing
    model.train()
    noise.detach()
    with noise.batch(0, rows):
        assert torch.equal(model(ids).detach(), clean)


def test_a_layout_that_does_not_fit_the_batch_is_an_error_not_silent_noise():
    model, noise = Tiny(), NoisyEmbeddings(alpha=5.0, seed=1)
    noise.attach(model)
    with noise.batch(0, padded_layout([0], LENGTHS)), pytest.raises(RuntimeError, match="2 rows, its layout 1"):
        model(torch.zeros((2, 5), dtype=torch.long))
