"""The optimizers of `mgpu train`: adamw_8bit is bitsandbytes' AdamW8bit without a device sync per parameter."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    # 8-bit states from 4096 elements on (bitsandbytes' min_8bit_size), 32-bit below: both paths
    return [torch.nn.Parameter(torch.randn(n, generator=g)) for n in (8192, 4096, 100, 5000)]


def _train(opt_cls, params, steps=4):
    opt = opt_cls(params, lr=1e-2, weight_decay=0.01)
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return opt


def test_adamw_8bit_matches_bitsandbytes_bit_for_bit_without_a_sync_per_parameter(monkeypatch):
    import bitsandbytes.optim.optimizer as bnb_optimizer

    from unsloth_mgpu_cli.optim import adamw_8bit_class

    syncs = []
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda t: syncs.append(t))  # the edge: a device synchronisation
    ours, theirs = _params(0), _params(0)
    opt = _train(adamw_8bit_class(), ours)
    assert syncs == []
    _train(bnb.optim.AdamW8bit, theirs)
    assert len(syncs) == 4 * 4  # bitsandbytes: one per parameter per step
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    assert opt.state[ours[0]]["state1"].dtype == torch.uint8  # really the 8-bit states
    assert isinstance(opt, bnb.optim.AdamW8bit)


def test_control_another_learning_rate_differs():
    from unsloth_mgpu_cli.optim import adamw_8bit_class

    ours, theirs = _params(0), _params(0)
    _train(adamw_8bit_class(), ours)
    opt = bnb.optim.AdamW8bit(theirs, lr=2e-2, weight_decay=0.01)
    g = torch.Generator().manual_seed(7)
    for _ in range(4):
        for p in theirs:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    assert not torch.equal(ours[0], theirs[0])


def test_paged_optimizer_keeps_the_original_step(monkeypatch):
    from unsloth_mgpu_cli.optim import adamw_8bit_class

    opt = adamw_8bit_class()(_params(0), lr=1e-2)
    opt.is_paged = True
    called = []
    monkeypatch.setattr(bnb.optim.AdamW8bit, "step", lambda self, closure=None: called.append(1))
    opt.step()
    assert called == [1]
