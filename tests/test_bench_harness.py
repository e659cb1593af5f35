"""Unit tests of the benchmark harness's pure functions (benchmarks/run.py, benchmarks/trl_baseline.py).

The end-to-end plumbing is checked by `python3 benchmarks/run.py --cpu-smoke` (minutes: real Unsloth on CPU).
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
from conftest import ROOT


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


run = _load("run")
trl = _load("trl_baseline")


def test_split_batch_keeps_the_global_batch():
    assert run.split_batch(16, 1, 8) == (8, 2)
    assert run.split_batch(16, 2, 8) == (8, 1)
    assert run.split_batch(16, 8, 8) == (2, 1)
    assert run.split_batch(24, 1, 16) == (12, 2)  # largest micro-batch <= 16 that divides 24
    for n in (1, 2, 4, 8):
        micro, accum = run.split_batch(64, n, 8)
        assert micro * accum * n == 64
    with pytest.raises(ValueError):
        run.split_batch(16, 3, 8)


def _rows(times, tokens, samples=4, losses=None):
    return [
        {"step": i + 1, "elapsed_s": t, "tokens": tok, "samples": samples, "loss": (losses[i] if losses else 1.0)}
        for i, (t, tok) in enumerate(zip(times, tokens, strict=True))
    ]


def test_steady_state_leaves_out_the_warmup_steps():
    # step 1 takes 30 s (compile), then 1 s per step with 100 tokens
    rows = _rows([30, 31, 32, 33, 34], [999, 100, 100, 100, 100])
    st = run.steady_state(rows, warmup=1)
    assert st["tokens_per_second"] == pytest.approx(100.0)
    assert st["samples_per_second"] == pytest.approx(4.0)
    assert st["steps"] == 4 and st["seconds"] == pytest.approx(4.0)
    assert run.steady_state(rows, warmup=3)["tokens"] == 200
    assert run.steady_state(rows, warmup=5) is None  # nothing after the warm-up
    assert run.steady_state(rows, warmup=0) is None  # no origin before the first window
    # one slow step (a new shape's first use) moves the mean, not the median
    slow = run.steady_state(_rows([30, 31, 32, 35, 36], [999, 100, 100, 100, 100]), warmup=1)
    assert slow["seconds_per_step"] == pytest.approx(1.5) and slow["median_seconds_per_step"] == pytest.approx(1.0)


def test_rank_balance_splits_the_step_into_the_slowest_rank_and_the_rest():
    # steps of 1 s; rank 1 is 50% slower than rank 0 in its micro-batches (0.6 vs 0.4 s) after the warm-up
    rows = [{"step": s, "elapsed_s": float(s), "compute_s": [0.9, 0.9] if s <= 2 else [0.4, 0.6]} for s in range(1, 6)]
    b = run.rank_balance(rows, warmup=2)
    assert b["steps"] == 3 and b["mean_compute_s"] == [0.4, 0.6]
    assert b["imbalance"] == pytest.approx(0.2)  # slowest 0.6 / mean 0.5
    assert b["busy"] == pytest.approx(0.6)  # the slowest rank's 0.6 s of each 1 s step
    assert b["steps_compiling"] == 0 and b["slowest_rank_s_other"] == pytest.approx(0.6)
    # a step in which a rank compiled a graph is counted apart
    rows[3]["compiles"], rows[3]["compute_s"] = [0, 2], [0.4, 0.9]
    c = run.rank_balance(rows, warmup=2)
    assert c["steps_compiling"] == 1 and c["slowest_rank_s_compiling"] == pytest.approx(0.9)
    assert c["slowest_rank_s_other"] == pytest.approx(0.6)
    rows[3]["compute_s"] = [0.4, 0.6]
    # windows of several steps, or no compute_s (TRL): nothing to say
    assert run.rank_balance([{**r, "step": 5 * r["step"]} for r in rows], warmup=2) is None
    assert run.rank_balance([{"step": s, "elapsed_s": float(s)} for s in range(1, 6)], warmup=2) is None


def test_steady_state_with_logging_windows():
    # logged every 5 steps: windows end at 5, 10, 15
    rows = [
        {"step": 5, "elapsed_s": 50, "tokens": 5, "samples": 20},
        {"step": 10, "elapsed_s": 55, "tokens": 500, "samples": 20},
        {"step": 15, "elapsed_s": 60, "tokens": 700, "samples": 20},
    ]
    st = run.steady_state(rows, warmup=7)  # origin: end of step 5 (last window ending <= 7)
    assert st["tokens_per_second"] == pytest.approx(1200 / 10)
    assert st["seconds_per_step"] == pytest.approx(1.0)


def test_ours_rows_recovers_window_tokens_from_tokens_per_second():
    metrics = [
        {"step": 1, "elapsed_s": 20.0, "tokens_per_second": 10.0, "loss": 3.0},
        {"step": 2, "elapsed_s": 20.5, "tokens_per_second": 400.0, "loss": 2.0},
    ]
    rows = run.ours_rows(metrics, global_batch=16)
    assert [r["tokens"] for r in rows] == pytest.approx([200.0, 200.0])
    assert [r["samples"] for r in rows] == [16, 16]
    assert rows[1]["loss"] == 2.0


def test_trl_rows_sum_ranks_and_time_from_launch():
    rank0 = {
        "rank": 0,
        "launch_time": 100.0,
        "losses": {"1": 5.0, "2": 4.0},
        "steps": [
            {"step": 1, "t": 130.0, "tokens": 300, "samples": 8},
            {"step": 2, "t": 131.0, "tokens": 310, "samples": 8},
        ],
    }
    rank1 = {
        "rank": 1,
        "launch_time": 100.0,
        "losses": {},
        "steps": [
            {"step": 1, "t": 130.1, "tokens": 200, "samples": 8},
            {"step": 2, "t": 131.1, "tokens": 290, "samples": 8},
        ],
    }
    rows = run.trl_rows([rank1, rank0])
    assert rows == [
        {"step": 1, "elapsed_s": 30.0, "tokens": 500, "samples": 16, "loss": 5.0},
        {"step": 2, "elapsed_s": 31.0, "tokens": 600, "samples": 16, "loss": 4.0},
    ]


def test_loss_at_samples_compares_equal_numbers_of_examples():
    # unpacked: 16 examples a step; loss at 64 examples over the last 32 -> steps 3 and 4
    rows = _rows([1, 2, 3, 4, 5], [1] * 5, samples=16, losses=[5, 4, 3, 2, 1])
    got = run.loss_at_samples(rows, target=64, window=32)
    assert got["loss"] == pytest.approx(2.5) and got["steps"] == [3, 4]
    # packed: 50 examples a step reaches 64 during step 2; its first example (50) lies in (32, 64]
    packed = _rows([1, 2, 3], [1] * 3, samples=50, losses=[9, 8, 7])
    assert run.loss_at_samples(packed, target=64, window=32)["steps"] == [2]
    assert run.loss_at_samples(rows, target=1000, window=32) is None


def test_count_batch_padded_padding_free_and_packed():
    import torch

    padded = {
        "input_ids": torch.tensor([[5, 6, 7, 0], [5, 6, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
    }
    assert [int(x) for x in trl.count_batch(padded, pad_token_id=0)] == [5, 2]
    # padding-free: two samples (3 + 2 tokens) flattened into one row, padded by 3 to a multiple of 8
    flat = {
        "input_ids": torch.tensor([[1, 5, 6, 1, 7, 0, 0, 0]]),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 0, 0]]),
    }
    assert [int(x) for x in trl.count_batch(flat, pad_token_id=0)] == [5, 2]
    # a pad id inside a sample is a real token (it is not at position 0 in a trailing run)
    inner = {"input_ids": torch.tensor([[1, 0, 6, 1, 0]]), "position_ids": torch.tensor([[0, 1, 2, 0, 1]])}
    assert [int(x) for x in trl.count_batch(inner, pad_token_id=0)] == [5, 2]
    # packed rows without attention_mask: every position-0 start is a sample
    packed = {
        "input_ids": torch.ones(2, 6, dtype=torch.long),
        "position_ids": torch.tensor([[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 0, 1]]),
    }
    assert [int(x) for x in trl.count_batch(packed, pad_token_id=0)] == [12, 5]


def test_plan_runs_puts_the_head_to_head_first():
    names = [r.name for r in run.plan_runs(["ours", "trl-pf"], [1, 2], ["1b"])]
    assert names == ["ours-1b-2gpu", "trl-pf-1b-2gpu", "ours-1b-1gpu", "trl-pf-1b-1gpu"]


def _result(system, gpus, tps, first=30.0, peak=(4.0,)):
    return {
        "name": f"{system}-1b-{gpus}gpu",
        "system": system,
        "size": "1b",
        "gpus": gpus,
        "status": "ok",
        "tokens_per_second": tps,
        "samples_per_second": tps / 100,
        "first_step_s": first,
        "peak_memory_gb": list(peak) * gpus,
        "micro_batch": 8,
        "grad_accum": 2 // gpus,
        "loss_at_samples": {"loss": 2.0, "samples": 960},
        "batching": "padded micro-batches",
    }


def test_derive_and_render():
    results = [
        _result("ours", 2, 1900.0, first=40.0),
        _result("trl-pf", 2, 1000.0),
        _result("trl-pack", 2, 1500.0),
        _result("ours", 1, 1000.0, first=32.0),
        {
            "name": "trl-pf-1b-1gpu",
            "system": "trl-pf",
            "size": "1b",
            "gpus": 1,
            "status": "failed",
            "error": "Traceback\nRuntimeError: boom | bad",
            "micro_batch": 8,
            "grad_accum": 2,
        },
    ]
    results[0]["steady_state"] = {"median_seconds_per_step": 0.2}
    results[0]["peak_reserved_gb"] = [9.04, 8.5]  # what the allocator held, in brackets after the live peak
    results[3]["steady_state"] = {"median_seconds_per_step": 0.36}
    comps = run.derive(results)
    scaling = next(c for c in comps if c["what"].startswith("ours 1b: 2 GPUs"))
    assert scaling["median_step_scaling"] == pytest.approx(1.8)
    assert scaling["scaling"] == pytest.approx(1.9) and scaling["efficiency"] == pytest.approx(0.95)
    assert scaling["first_step_ratio"] == pytest.approx(1.25) and scaling["peak_memory_ratio"] == pytest.approx(1.0)
    head = next(c for c in comps if "speedup" in c and c["gpus"] == 2)
    assert head["versus"] == "trl-pack" and head["speedup"] == pytest.approx(1900 / 1500)
    table = run.render_table(results, comps, header="H")
    assert "| ours-1b-2gpu | padded micro-batches | 2 | 8 x 1 x 2 | 1,900 |" in table
    assert "| 4.0, 4.0 (reserved 9.0, 8.5) |" in table and "| 4.0 | 2.000 @ 960 |" in table  # TRL runs: none given
    assert "failed: RuntimeError: boom / bad" in table  # last error line, pipes escaped
    assert "tokens/s x1.90 (95% of linear); median step x1.80" in table and "ours / TRL tokens/s = 1.27" in table


def test_trl_batching_says_when_unsloth_changed_the_mode():
    assert run.trl_batching({"packing": True, "padding_free": True}, "trl-pack") == "packed"
    assert run.trl_batching({"packing": False, "padding_free": True}, "trl-pf") == "padding-free"
    # Unsloth on CPU turns packing off (no FlashAttention): the table must not call that run packed
    assert run.trl_batching({"packing": False, "padding_free": False}, "trl-pack").startswith("padded (asked: packed")


def _per_step(seconds_per_step, steps, first=30.0, tokens=100.0):
    """Rows of a run: step 1 takes `first` s (compile), then `seconds_per_step`; each step trains `tokens`."""
    return [{"step": s, "elapsed_s": first + (s - 1) * seconds_per_step, "tokens": tokens} for s in range(1, steps + 1)]


def test_same_steps_compares_a_cut_run_over_the_steps_both_did():
    two, one = _per_step(0.1, 30), _per_step(0.2, 15, first=40.0)  # the 1-GPU run was cut after step 15
    s = run.same_steps(two, one, warmup=20)  # 15 - 20 < 5 steps: the window starts after step 5
    assert (s["first_step"], s["last_step"]) == (6, 15)
    assert s["a_tokens_per_second"] == pytest.approx(1000.0) and s["b_tokens_per_second"] == pytest.approx(500.0)
    assert s["ratio"] == pytest.approx(2.0)  # the compile of step 1 (30 vs 40 s) is left out
    assert run.same_steps(two, _per_step(0.2, 30), warmup=20)["first_step"] == 21  # enough steps after warm-up
    assert run.same_steps(two, _per_step(0.2, 7), warmup=20) is None  # 2 common steps after step 5: too few
    assert run.same_steps(two, [r for r in one if r["step"] != 9], warmup=20) is None  # a gap: no per-step rows
    # derive: only for a pair where a run was cut short, and named with its window
    ok = {"name": "ours-1b-2gpu", "system": "ours", "size": "1b", "gpus": 2, "status": "ok", "per_step": two}
    cut = {"name": "ours-1b-1gpu", "system": "ours", "size": "1b", "gpus": 1, "status": "timeout (60 s)"}
    comps = run.derive([ok, {**cut, "per_step": one}], warmup=20)
    assert [c["what"] for c in comps] == ["ours 1b: 2 GPUs / 1 GPU, steps 6-15 of both"]
    assert comps[0]["same_steps"]["ratio"] == pytest.approx(2.0)
    assert "tokens/s x2.00 over the same steps (1,000 vs 500; a run was cut short)" in run.render_table([], comps)
    assert not any("same_steps" in c for c in run.derive([ok, {**cut, "status": "ok", "per_step": one}], warmup=20))
