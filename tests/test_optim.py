"""The optimizers of `mgpu train`: adamw_8bit is bitsandbytes' AdamW8bit without a device sync per parameter."""

from __future__ import annotations

import bitsandbytes as bnb  # Unsloth depends on it: a missing one is a broken install, not a skip
import pytest
import torch
from conftest import ROOT

from unsloth_mgpu_cli.errors import UserError


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


def _flat(params, bucket_mb=1.0):
    """Parameters as views of flat buffers, laid out by the engine's gradient synchroniser (one process)."""
    from unsloth_mgpu_cli import distributed as D

    return D.GradientSynchronizer(params, D.DistInfo(), "mean", bucket_size_mb=bucket_mb, param_views=True)


def _flat_optimizer(params, bucket_mb=1.0, **kw):
    """(our 8-bit AdamW updating flat runs, the synchroniser whose buffers the parameters are views of)."""
    from unsloth_mgpu_cli.optim import adamw_8bit_class

    sync = _flat(params, bucket_mb)
    opt = adamw_8bit_class()(params, lr=1e-2, **kw)
    opt.use_flat(sync.flat_buckets())
    return opt, sync


def _steps(opt, params, sync, seed=7, steps=4):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            grad = torch.randn(p.shape, generator=g).to(p.device)
            if sync is None:
                p.grad = grad
            else:
                p.grad.copy_(grad)  # into the flat gradient buffer, as backward accumulates
        opt.step()


# sizes: multiples of 256 and not, one below min_8bit_size (32-bit state, updated on its own) between 8-bit ones
SIZES = ((64, 128), (4096,), (100,), (5000,), (3, 1500), (7000,))


def _shaped(seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in SIZES]


def test_flat_update_equals_per_parameter_update_to_the_bit(device="cpu"):
    """Also run on CUDA by tests/test_gpu.py (bitsandbytes' CUDA kernels)."""
    from unsloth_mgpu_cli.optim import adamw_8bit_class

    flat, ref = _shaped(0, device), _shaped(0, device)
    sync = _flat(flat, bucket_mb=0.05)  # several buckets: runs end at bucket edges too
    assert len(sync.flat_buckets()) > 1
    opt = adamw_8bit_class()(flat, lr=1e-2, weight_decay=0.01)
    opt.use_flat(sync.flat_buckets())
    assert sum(len(r.members) for r in opt.runs) == 5 and len(opt.runs) >= 2  # the 100-element one is not in a run
    launches = []
    real = bnb.functional.optimizer_update_8bit_blockwise
    import bitsandbytes.functional as F

    def counting(*a, **k):
        launches.append(a[1].numel())
        return real(*a, **k)

    F.optimizer_update_8bit_blockwise = counting
    try:
        _steps(opt, flat, sync)
    finally:
        F.optimizer_update_8bit_blockwise = real
    assert len(launches) == 4 * len(opt.runs)  # one kernel per run and step, not one per parameter
    _steps(bnb.optim.AdamW8bit(ref, lr=1e-2, weight_decay=0.01), ref, None)
    for a, b in zip(flat, ref, strict=True):
        assert torch.equal(a, b)
    for _, g, members in sync.flat_buckets():  # the gradient gaps stay zero (the norm and finiteness see them)
        used = torch.zeros(g.numel(), dtype=torch.bool)
        for p, offset in members:
            used[offset : offset + p.numel()] = True
        assert used.any() and not g[~used].any()


def test_flat_state_saves_in_bitsandbytes_format_and_resumes_either_way():
    from unsloth_mgpu_cli.optim import adamw_8bit_class

    flat, ref = _shaped(0), _shaped(0)
    opt, sync = _flat_optimizer(flat)
    _steps(opt, flat, sync, steps=3)
    saved = opt.state_dict()
    ref_opt = bnb.optim.AdamW8bit(ref, lr=1e-2)
    _steps(ref_opt, ref, None, steps=3)
    assert saved.keys() == ref_opt.state_dict().keys()
    assert [opt.state[p]["state1"].shape for p in flat] == [ref_opt.state[p]["state1"].shape for p in ref]
    # a fresh flat optimizer resumes from the per-parameter optimizer's state, and the reverse
    resumed, back = _shaped(1), _shaped(1)
    with torch.no_grad():
        for a, b, c in zip(resumed, back, ref, strict=True):
            a.copy_(c)
            b.copy_(c)
    sync2 = _flat(resumed)
    opt2 = adamw_8bit_class()(resumed, lr=1e-2)
    opt2.use_flat(sync2.flat_buckets())
    opt2.load_state_dict(ref_opt.state_dict())
    back_opt = bnb.optim.AdamW8bit(back, lr=1e-2)
    back_opt.load_state_dict(saved)
    _steps(opt2, resumed, sync2, seed=9, steps=2)
    _steps(back_opt, back, None, seed=9, steps=2)
    _steps(ref_opt, ref, None, seed=9, steps=2)
    for a, b, c in zip(resumed, back, ref, strict=True):
        assert torch.equal(a, c) and torch.equal(b, c)
    assert all(r.bound for r in opt2.runs)  # the loaded state was moved into the flat buffers


def test_flat_run_falls_back_when_a_parameter_is_no_longer_a_view():

    flat, ref = _shaped(0), _shaped(0)
    opt, sync = _flat_optimizer(flat)
    flat[1].grad = flat[1].grad.clone()  # someone replaced a gradient: the flat buffer no longer holds it
    g = torch.Generator().manual_seed(7)
    for p, q in zip(flat, ref, strict=True):
        q.grad = torch.randn(p.shape, generator=g)
        p.grad.copy_(q.grad)
    opt.step()
    bnb.optim.AdamW8bit(ref, lr=1e-2).step()
    for a, b in zip(flat, ref, strict=True):
        assert torch.equal(a, b)


def test_control_one_weight_off_by_one_ulp_differs():
    """The bit-for-bit comparison above can fail: the smallest change of one starting weight shows."""
    from unsloth_mgpu_cli.optim import adamw_8bit_class

    flat, ref = _shaped(0), _shaped(0)
    with torch.no_grad():
        ref[3][0] = torch.nextafter(ref[3][0], torch.tensor(1e9))
    sync = _flat(flat)
    opt = adamw_8bit_class()(flat, lr=1e-2)
    opt.use_flat(sync.flat_buckets())
    _steps(opt, flat, sync)
    _steps(bnb.optim.AdamW8bit(ref, lr=1e-2), ref, None)
    assert [torch.equal(a, b) for a, b in zip(flat, ref, strict=True)] == [True, True, True, False, True, True]


def test_unaligned_parameters_are_updated_one_by_one():
    import unsloth_mgpu_cli.distributed as D
    from unsloth_mgpu_cli.optim import adamw_8bit_class

    flat, ref = _shaped(0), _shaped(0)
    old = D.FLAT_ALIGN
    D.FLAT_ALIGN = 4  # packed: parameters no longer start 256-element blocks
    try:
        sync = _flat(flat)
    finally:
        D.FLAT_ALIGN = old
    opt = adamw_8bit_class()(flat, lr=1e-2)
    opt.use_flat(sync.flat_buckets())
    assert all(offset % 256 == 0 for run in opt.runs for _, offset in run.members)
    _steps(opt, flat, sync)
    _steps(bnb.optim.AdamW8bit(ref, lr=1e-2), ref, None)
    for a, b in zip(flat, ref, strict=True):
        assert torch.equal(a, b)


def test_a_stepped_flat_optimizer_loads_another_state_into_its_flat_buffers():
    """load_state_dict after the flat buffers are bound (not only on a fresh optimizer) replaces what they hold."""

    flat, other = _shaped(0), _shaped(1)
    opt, sync = _flat_optimizer(flat)
    _steps(opt, flat, sync, steps=3)
    assert all(r.bound for r in opt.runs)
    other_opt = bnb.optim.AdamW8bit(other, lr=1e-2)
    _steps(other_opt, other, None, seed=11, steps=3)
    with torch.no_grad():
        for a, b in zip(flat, other, strict=True):
            a.copy_(b)
    opt.load_state_dict(other_opt.state_dict())
    _steps(opt, flat, sync, seed=9, steps=2)
    _steps(other_opt, other, None, seed=9, steps=2)
    for a, b in zip(flat, other, strict=True):
        assert torch.equal(a, b)


def test_a_masked_step_is_undone_on_the_device_or_kept_to_the_bit():
    """`step(skip=flag)`: the engine queues the next step before it reads the flag. Set, the update (flat runs and
    per-parameter tensors alike) is undone on the device, and `undo_step_count` takes back the host's counters:
    the optimizer is as it was, bit for bit. Unset, the step is the plain one."""

    masked, plain = _shaped(0), _shaped(0)
    (opt, sync), (ref, ref_sync) = (_flat_optimizer(p, bucket_mb=0.05, weight_decay=0.01) for p in (masked, plain))
    _steps(opt, masked, sync, steps=2)
    _steps(ref, plain, ref_sync, steps=2)
    assert opt.runs and any(p not in {m for r in opt.runs for m, _ in r.members} for p in masked)  # both paths

    def state(o, params):
        return [p.detach().clone() for p in params] + [
            v.clone() if torch.is_tensor(v) else v for p in params for k, v in sorted(o.state[p].items())
        ]

    before = state(opt, masked)
    g = torch.Generator().manual_seed(3)
    for p in masked:
        p.grad.copy_(torch.randn(p.shape, generator=g))
    opt.step(skip=torch.tensor(True))
    assert not torch.equal(opt.runs[0].flat["state1"], torch.zeros_like(opt.runs[0].flat["state1"]))
    opt.undo_step_count()
    after = state(opt, masked)
    assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in zip(before, after, strict=True))
    # not skipped: the plain step, to the bit (same gradients as the reference gets)
    g = torch.Generator().manual_seed(3)
    for p, q in zip(masked, plain, strict=True):
        grad = torch.randn(p.shape, generator=g)
        p.grad.copy_(grad)
        q.grad.copy_(grad)
    opt.step(skip=torch.tensor(False))
    ref.step()
    assert all(torch.equal(a, b) for a, b in zip(masked, plain, strict=True))
    got, want = state(opt, masked), state(ref, plain)
    assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in zip(got, want, strict=True))


def test_loraplus_puts_b_matrices_and_1d_parameters_in_a_faster_group_that_resumes_with_its_rate():
    """lora.loraplus_lr_ratio: PEFT's create_loraplus_optimizer grouping (lora_B and 1-D parameters at ratio x the
    rate); the schedule scales both groups, and a resume (`_follow_the_recipe`) keeps the ratio."""
    from unsloth_mgpu_cli.checkpoint import _follow_the_recipe
    from unsloth_mgpu_cli.optim import build_optimizer, build_scheduler, lr_scales
    from unsloth_mgpu_cli.recipe import load_recipe

    names = ["q.lora_A.weight", "q.lora_B.weight", "q.lora_magnitude_vector", "v.lora_A.weight", "v.lora_B.weight"]
    params = [torch.nn.Parameter(torch.zeros((4, 2) if "lora" in n and "magnitude" not in n else (4,))) for n in names]
    quick = ROOT / "recipes" / "quickstart.yaml"
    plain = load_recipe(quick, ["training.warmup_steps=2", "training.learning_rate=1e-3"]).recipe
    plus = load_recipe(quick, ["training.warmup_steps=2", "training.learning_rate=1e-3", "lora.loraplus_lr_ratio=16"])
    assert lr_scales(names, params, plain) == [1.0] * 5
    scales = lr_scales(names, params, plus.recipe)
    assert scales == [1.0, 16.0, 16.0, 1.0, 16.0]
    for kind in ("adamw", "adamw_8bit", "sgd"):
        plus.recipe.training.optimizer = kind
        opt = build_optimizer(params, plus.recipe, "cpu", scales)
        assert [(g["lr"], len(g["params"])) for g in opt.param_groups] == [(1e-3, 2), (16e-3, 3)], kind
    assert len(build_optimizer(params, plain, "cpu", lr_scales(names, params, plain)).param_groups) == 1
    sched = build_scheduler(opt, plus.recipe, total_steps=10)
    opt.step()
    sched.step()  # halfway through the warmup
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5e-3, 8e-3])
    state = (opt.state_dict(), sched.state_dict())
    fresh = build_optimizer(params, plus.recipe, "cpu", scales)
    again = build_scheduler(fresh, plus.recipe, total_steps=10)
    fresh.load_state_dict(state[0])
    again.load_state_dict(state[1])
    _follow_the_recipe(again, plus.recipe.training)
    assert [g["lr"] for g in fresh.param_groups] == pytest.approx([0.5e-3, 8e-3])
    assert again.base_lrs == pytest.approx([1e-3, 16e-3])


def test_adam_betas_and_epsilon_reach_both_adamw_kinds_and_a_resume_takes_the_recipes():
    from unsloth_mgpu_cli.checkpoint import _follow_the_recipe
    from unsloth_mgpu_cli.optim import build_optimizer, build_scheduler
    from unsloth_mgpu_cli.recipe import load_recipe

    quick = ROOT / "recipes" / "quickstart.yaml"
    given = ["training.adam_beta1=0.8", "training.adam_beta2=0.95", "training.adam_epsilon=1e-6"]
    for kind in ("adamw", "adamw_8bit"):
        recipe = load_recipe(quick, [f"training.optimizer={kind}", *given]).recipe
        opt = build_optimizer(_params(0), recipe, "cpu")
        assert opt.param_groups[0]["betas"] == (0.8, 0.95) and opt.param_groups[0]["eps"] == 1e-6, kind
        default = build_optimizer(_params(0), load_recipe(quick, [f"training.optimizer={kind}"]).recipe, "cpu")
        assert default.param_groups[0]["betas"] == (0.9, 0.999) and default.param_groups[0]["eps"] == 1e-8
    # the 8-bit flat path (one kernel per run of parameters) reads them: equal to bitsandbytes' own with them
    flat, ref = _shaped(0), _shaped(0)
    sync = _flat(flat, bucket_mb=0.05)
    opt = build_optimizer(flat, recipe, "cpu")
    opt.use_flat(sync.flat_buckets())
    _steps(opt, flat, sync)
    t = recipe.training
    _steps(
        bnb.optim.AdamW8bit(ref, lr=t.learning_rate, weight_decay=t.weight_decay, betas=(0.8, 0.95), eps=1e-6),
        ref,
        None,
    )
    assert all(torch.equal(a, b) for a, b in zip(flat, ref, strict=True))
    assert opt.runs and not torch.equal(flat[0], _shaped(0)[0])
    # a resume continues with the recipe's values, not the checkpoint's
    sched = build_scheduler(default, recipe, total_steps=10)
    _follow_the_recipe(sched, recipe.training)
    assert default.param_groups[0]["betas"] == (0.8, 0.95) and default.param_groups[0]["eps"] == 1e-6
    with pytest.raises(UserError, match="training.adam_beta2.*found optimizer sgd"):
        load_recipe(quick, ["training.optimizer=sgd", "training.adam_beta2=0.95"])
