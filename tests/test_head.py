"""The output head on the labelled positions only (head.py): which positions and targets it keeps, and that the
loss and the gradients through real Unsloth are those of the whole head."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ROOT, run_probe

from unsloth_mgpu_cli.data import IGNORE_INDEX
from unsloth_mgpu_cli.head import INDEX_KEY, TARGETS_KEY, head_targets


def brute_force(labels: torch.Tensor) -> tuple[list[int], list[int]]:
    """Every (row, column) whose next column in the row is a target, flattened, and that target."""
    rows, width = labels.shape
    positions, targets = [], []
    for r in range(rows):
        for c in range(width - 1):
            if int(labels[r, c + 1]) != IGNORE_INDEX:
                positions.append(r * width + c)
                targets.append(int(labels[r, c + 1]))
    return positions, targets


@pytest.mark.parametrize("seed", range(20))
def test_head_targets_are_the_shifted_labels_that_take_loss(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows, width = int(rng.integers(1, 5)), int(rng.integers(2, 40))
    labels = torch.from_numpy(rng.integers(0, 50, (rows, width)))
    labels[torch.from_numpy(rng.random((rows, width)) < 0.5)] = IGNORE_INDEX
    positions, targets = brute_force(labels)
    got = head_targets(labels)
    if not positions:
        assert got == {}
        return
    assert got[INDEX_KEY].tolist() == positions
    assert got[TARGETS_KEY].shape == (1, len(positions))
    assert got[TARGETS_KEY][0].tolist() == targets


def test_head_targets_of_a_row_without_loss_are_empty() -> None:
    labels = torch.full((2, 7), IGNORE_INDEX)
    labels[1, 0] = 5  # a first token's label is never a target (nothing predicts it)
    assert head_targets(labels) == {}


def test_the_head_on_labelled_positions_gives_the_loss_and_gradients_of_the_whole_head() -> None:
    """Padded and packed micro-batches through the trainer's `_on_device`, real Unsloth (CPU): the same loss and
    LoRA gradients (float32: to the last bits), with the head given only the loss tokens' positions. Control: the
    same positions with the targets moved by one change the gradients by a large part of their size."""
    r = run_probe(ROOT / "tests" / "head_probe.py")
    assert r["hooked"], "the model's last decoder layer was not found"
    for name in ("padded", "packed"):
        m = r[name]
        assert m["positions_head"] == m["loss_tokens"] < m["positions_full"], (name, m)
        assert m["head_loss"] == pytest.approx(m["full_loss"], rel=1e-6), (name, m)
        assert m["grad_max_diff"] <= 1e-6 * m["grad_max"], (name, m)
        assert m["control_grad_max_diff"] > 0.1 * m["grad_max"], (name, m)
        assert m["control_loss"] != pytest.approx(m["full_loss"], rel=1e-6), (name, m)
