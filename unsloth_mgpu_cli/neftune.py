"""NEFTune: uniform noise on the input embeddings while training (Jain et al. 2023, "NEFTune: Noisy Embeddings
Improve Instruction Finetuning"; TRL's and axolotl's `neftune_noise_alpha`).

    training:
      neftune_noise_alpha: 5

Each sample's embeddings get noise drawn uniformly from [-m, m], m = alpha / sqrt(L * d), L the sample's tokens
and d the hidden size; evaluation and inference see none.

Two differences from transformers' hook, both so that N workers still equal one process over the same global
batch (the project's central claim):
- the noise of a sample is drawn from its own generator, seeded by (training.seed, optimizer step, sample index).
  It does not depend on which rank runs the sample, its place in a micro-batch, padding or packing, or an
  out-of-memory split; a resumed run draws what the uninterrupted one drew.
- L is the sample's own length. transformers takes the batch's padded width (or a packed row's length), so its
  noise on a sample shrinks when a longer sample shares the batch. The paper's L is the sample's length.
Padding gets no noise (it is masked out of attention and loss).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

# One row of a micro-batch: (sample index, first position in the row, tokens) for each sample it holds.
RowLayout = Sequence[tuple[int, int, int]]


def padded_layout(samples: Sequence[int], lengths: Any) -> list[list[tuple[int, int, int]]]:
    """One right-padded row per sample (`TokenizedData.collate` without packing)."""
    return [[(int(i), 0, int(lengths[i]))] for i in samples]


def packed_layout(samples: Sequence[int], lengths: Any) -> list[list[tuple[int, int, int]]]:
    """All samples back to back in one row (`TokenizedData.collate(packed=True)`)."""
    row, start = [], 0
    for i in samples:
        n = int(lengths[i])
        row.append((int(i), start, n))
        start += n
    return [row]


def sample_seed(seed: int, step: int, sample: int) -> int:
    """A well-mixed 63-bit seed for one sample's noise at one optimizer step (0-based)."""
    state = np.random.SeedSequence([int(seed), int(step), int(sample)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class NoisyEmbeddings:
    """A forward hook on the model's input embeddings that adds NEFTune noise to the samples of `batch(...)`.

    Outside a `with noise.batch(...)` block, or with the embedding module in eval mode, it adds nothing.
    """

    def __init__(self, alpha: float, seed: int):
        if alpha <= 0:
            raise ValueError(f"NEFTune alpha must be positive, found {alpha}")
        self.alpha, self.seed = float(alpha), int(seed)
        self._step: int | None = None
        self._rows: list[list[tuple[int, int, int]]] | None = None
        self._generators: dict[str, Any] = {}
        self._handle: Any = None

    def attach(self, model: Any) -> NoisyEmbeddings:
        """Hook the model's input embeddings (for a PEFT model, those of the base model)."""
        self._handle = model.get_input_embeddings().register_forward_hook(self._hook)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @contextmanager
    def batch(self, step: int, rows: list[list[tuple[int, int, int]]]) -> Iterator[None]:
        """Noise for the forward passes inside: optimizer step `step` (0-based), rows laid out as `rows`."""
        self._step, self._rows = step, rows
        try:
            yield
        finally:
            self._step, self._rows = None, None

    def noise(self, shape: Sequence[int], device: Any) -> Any:
        """The noise for an embeddings output of `shape` (rows, positions, hidden) under the current batch."""
        import torch

        rows, step = self._rows, self._step
        assert rows is not None and step is not None
        if len(rows) != shape[0]:
            raise RuntimeError(f"NEFTune: the batch has {shape[0]} rows, its layout {len(rows)}")
        hidden = int(shape[-1])
        out = torch.zeros(tuple(shape), dtype=torch.float32, device=device)
        gen = self._generator(device)
        for r, row in enumerate(rows):
            for sample, start, n in row:
                if n <= 0:
                    continue
                gen.manual_seed(sample_seed(self.seed, step, sample))
                draw = torch.rand((n, hidden), generator=gen, device=device, dtype=torch.float32)
                out[r, start : start + n] = draw.mul_(2.0).sub_(1.0).mul_(self.alpha / math.sqrt(n * hidden))
        return out

    def _generator(self, device: Any) -> Any:
        import torch

        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device)
        return self._generators[key]

    def _hook(self, module: Any, args: Any, output: Any) -> Any:
        if not module.training or self._rows is None:
            return None
        return output + self.noise(output.shape, output.device).to(output.dtype)
