"""`dataset.batching: auto`: packed rows where a variable-length attention kernel attends them in one call.

The GPU and flash-attn are edges this machine lacks: a fake NVML and the `has_module` argument stand for them.
torch is this machine's own (2.14, whose varlen_attn takes enable_gqa), and a function with torch 2.11's exact
signature stands for the GPU image's torch. The run on a real GPU is in docs/data.md (gpu_plan.sh s24c).
"""

from __future__ import annotations

import pytest
import torch
from fake_nvml import FakeNVML, h200

from unsloth_mgpu_cli import varlen
from unsloth_mgpu_cli.devices import min_compute_capability
from unsloth_mgpu_cli.recipe import load_recipe

NO_FLASH_ATTN = {"has_module": lambda name: False}


def varlen_attn_of_torch_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                              window_size=(-1, -1)):  # fmt: skip
    """torch 2.11.0's signature of torch.nn.attention.varlen.varlen_attn (printed on the GPU image, session 24)."""


def test_this_torch_has_varlen_attn_with_gqa_and_torch_2_11_has_not(monkeypatch):
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    assert varlen.torch_varlen_takes_gqa() is ((major, minor) >= (2, 12))
    import torch.nn.attention.varlen as module

    monkeypatch.setattr(module, "varlen_attn", varlen_attn_of_torch_2_11)
    assert not varlen.torch_varlen_takes_gqa()


def test_the_kernel_that_attends_a_packed_row_in_one_call():
    kernel, why = varlen.varlen_kernel("cuda", "9.0", "auto", "auto", **NO_FLASH_ATTN, torch_varlen=lambda: True)
    assert kernel == "torch's varlen_attn" and "has varlen_attn with enable_gqa" in why
    kernel, why = varlen.varlen_kernel("cuda", "8.0", "flash", "bfloat16", has_module=lambda n: n == "flash_attn")
    assert kernel == "flash-attn's flash_attn_varlen_func"
    # the GPU image: torch 2.11, no flash-attn
    kernel, why = varlen.varlen_kernel("cuda", "9.0", "auto", "auto", **NO_FLASH_ATTN, torch_varlen=lambda: False)
    assert kernel is None and "neither flash-attn nor torch's varlen_attn with enable_gqa (torch 2.12+" in why


@pytest.mark.parametrize(
    ("device", "capability", "attention", "dtype", "reason"),
    [
        ("cpu", None, "auto", "auto", "on CPU Unsloth attends a packed row one sample at a time"),
        ("cuda", "7.5", "auto", "auto", "compute capability 7.5 has no variable-length flash kernel"),
        ("cuda", None, "auto", "auto", "NVML did not report"),
        ("cuda", "9.0", "efficient", "auto", "model.attention: efficient turns off the flash kernel"),
        ("cuda", "9.0", "math", "auto", "model.attention: math"),
        ("cuda", "9.0", "auto", "float32", "model.dtype: float32"),
    ],
)
def test_no_kernel_where_unsloth_would_attend_sample_by_sample(device, capability, attention, dtype, reason):
    kernel, why = varlen.varlen_kernel(
        device, capability, attention, dtype, has_module=lambda n: True, torch_varlen=lambda: True
    )
    assert kernel is None and reason in why


def recipe(*overrides):
    return load_recipe("recipes/quickstart.yaml", list(overrides)).recipe


def test_auto_is_the_default_and_resolves_to_packed_or_balanced(monkeypatch):
    r = recipe()
    assert r.dataset.batching == "auto"
    note = varlen.resolve_batching(r, "cpu", None)
    assert r.dataset.batching == "balanced"
    assert note == (
        "dataset.batching balanced: no variable-length attention kernel for packed rows "
        "(on CPU Unsloth attends a packed row one sample at a time)"
    )
    monkeypatch.setattr(varlen, "torch_varlen_takes_gqa", lambda: True)
    r = recipe()
    monkeypatch.setattr(varlen.importlib.util, "find_spec", lambda name: None)  # no flash-attn
    assert varlen.resolve_batching(r, "cuda", "9.0").startswith("dataset.batching packed: one call of torch's")
    assert r.dataset.batching == "packed"
    r = recipe("model.attention=efficient")
    assert varlen.resolve_batching(r, "cuda", "9.0").startswith("dataset.batching balanced")
    # a mode the recipe names is kept, whatever the machine
    for mode in ("padded", "balanced", "packed"):
        r = recipe(f"dataset.batching={mode}")
        assert varlen.resolve_batching(r, "cpu", None) is None and r.dataset.batching == mode


def test_the_lowest_compute_capability_of_the_visible_gpus():
    assert min_compute_capability(nvml=FakeNVML([h200(0), h200(1, cc=(8, 6))]), env={}) == "8.6"
    assert (
        min_compute_capability(nvml=FakeNVML([h200(0), h200(1, cc=(8, 6))]), env={"CUDA_VISIBLE_DEVICES": "0"}) == "9.0"
    )
    # compared as numbers: as text "10.0" < "9.0"
    assert min_compute_capability(nvml=FakeNVML([h200(0), h200(1, cc=(10, 0))]), env={}) == "9.0"
    assert min_compute_capability(nvml=FakeNVML([h200(0)], fail_init=True), env={}) is None
    assert min_compute_capability(nvml=FakeNVML([]), env={}) is None


def test_doctor_says_how_packed_rows_would_run_and_what_auto_picks():
    from unsloth_mgpu_cli.devices import GPUInfo
    from unsloth_mgpu_cli.doctor import check_packed_rows

    def gpu(i, cc):
        return GPUInfo(index=i, physical_index=i, name="NVIDIA H200", compute_capability=cc)

    cpu = check_packed_rows([])
    assert (cpu.status, cpu.hint) == ("ok", "") and cpu.value.endswith("dataset.batching auto: balanced")
    # this machine's torch (2.14) has varlen_attn with enable_gqa: on Hopper cards, packed
    hopper = check_packed_rows([gpu(0, "9.0"), gpu(1, "9.0")])
    assert hopper.value == "one call of torch's varlen_attn per row; dataset.batching auto: packed", hopper
    # one older card decides for the run: every rank must attend the same way
    mixed = check_packed_rows([gpu(0, "9.0"), gpu(1, "7.5")])
    assert mixed.value.startswith("one SDPA call per sample (compute capability 7.5") and "flash-attn" in mixed.hint
    assert mixed.value.endswith("dataset.batching auto: balanced")
