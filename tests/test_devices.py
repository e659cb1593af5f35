"""GPU facts through NVML: the real (GPU-less) machine, and a fake NVML describing GPUs at the library's edge."""

from __future__ import annotations

import os

import pytest
from fake_nvml import FakeNVML, h200

from unsloth_mgpu_cli.devices import DeviceManager, count_gpus, visible_physical_indices


def test_this_machine_is_read_without_crashing():
    snap = DeviceManager().snapshot()
    assert count_gpus() == len(snap.devices) == len(DeviceManager().get_available_devices())
    if not snap.devices:
        assert snap.links == []
        assert snap.error or snap.physical_count == 0 or "CUDA_VISIBLE_DEVICES" in os.environ


def test_nvml_failure_is_reported_not_raised():
    snap = DeviceManager(nvml=FakeNVML([h200(0)], fail_init=True)).snapshot()
    assert snap.devices == [] and "Not Found" in snap.error


def test_two_nvlinked_gpus_give_facts_and_link():
    nvml = FakeNVML([h200(0), h200(1, pids=[4242], free_gib=100.0)], nvlinks={(0, 1): 18})
    snap = DeviceManager(nvml=nvml, env={}).snapshot()
    assert nvml.initialised == 0  # shut down again
    a, b = snap.devices
    assert (a.index, a.name, a.compute_capability, a.bf16) == (0, "NVIDIA H200", "9.0", True)
    assert a.memory_total_gb == 140.0 and b.memory_free_gb == 100.0
    assert a["name"] == "NVIDIA H200"  # seed API: dict-style access
    assert b.processes == [{"pid": 4242, "used_gb": 2.0}]
    assert snap.driver == "580.95.05" and snap.cuda_driver == "13.0"
    (link,) = snap.links
    assert (link.a, link.b, link.nvlinks, link.p2p, link.topology) == (0, 1, 18, True, "same board")
    assert link.kind == "NVLink x18"


def test_pcie_pairs_with_and_without_p2p():
    nvml = FakeNVML([h200(0), h200(1), h200(2)], p2p_pairs=[(0, 1)])
    links = {(lk.a, lk.b): lk for lk in DeviceManager(nvml=nvml, env={}).snapshot().links}
    assert set(links) == {(0, 1), (0, 2), (1, 2)}
    assert links[(0, 1)].nvlinks == 0 and links[(0, 1)].kind.startswith("PCIe P2P")
    assert links[(0, 2)].p2p is False and "no P2P" in links[(0, 2)].kind


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, [0, 1, 2, 3]), ("", []), ("-1", []), ("1", [1]), ("3,1", [3, 1]), ("0,7,1", [0]), ("1,1", [1]),
     ("GPU-2aaa", [2]), ("GPU-nope,1", []), ("abc", [])],
)  # fmt: skip
def test_cuda_visible_devices_follows_cuda_rules(value, expected):
    uuids = [f"GPU-{i}aaa-{i}" for i in range(4)]
    assert visible_physical_indices(value, 4, uuids) == expected


def test_count_gpus_and_indices_honour_cuda_visible_devices():
    nvml = FakeNVML([h200(i) for i in range(4)])
    assert count_gpus(env={}, nvml=nvml) == 4
    assert count_gpus(env={"CUDA_VISIBLE_DEVICES": "2,3"}, nvml=nvml) == 2
    devs = DeviceManager(nvml=nvml, env={"CUDA_VISIBLE_DEVICES": "3,1"}).get_available_devices()
    # CUDA renumbers visible GPUs from 0; physical_index keeps nvidia-smi's number.
    assert [(d.index, d.physical_index) for d in devs] == [(0, 3), (1, 1)]


def test_one_lost_gpu_is_flagged_and_the_others_are_still_read():
    """NVML fails on one GPU (fallen off the bus): the host used to report no GPU at all, so a launch quietly
    fell back to CPU workers and the memory pre-flight compared against host RAM."""
    from unsloth_mgpu_cli.configgen import detect_gpu_memory
    from unsloth_mgpu_cli.devices import gpu_memory_bytes
    from unsloth_mgpu_cli.doctor import check_gpus
    from unsloth_mgpu_cli.memory_manager import MemoryManager

    nvml = FakeNVML([h200(0), h200(1), h200(2, free_gib=90.0)], nvlinks={(0, 2): 18}, lost={1})
    snap = DeviceManager(nvml=nvml, env={}).snapshot()
    assert snap.error is None and [(d.index, d.error) for d in snap.devices] == [
        (0, None),
        (1, "FakeNVMLError: GPU is lost"),
        (2, None),
    ]
    assert [(lk.a, lk.b) for lk in snap.links] == [(0, 2)]
    assert count_gpus(env={}, nvml=nvml) == 3  # CUDA numbers it all the same
    assert gpu_memory_bytes(env={}, nvml=nvml) == 140 * 2**30 and detect_gpu_memory(env={}, nvml=nvml)[0] == 3
    checks = {c.name: c for c in check_gpus(snap.devices, snap.error, snap.driver)}
    assert checks["gpu 1"].status == "fail" and "GPU is lost" in checks["gpu 1"].value
    assert checks["gpu 0"].status == "ok" and checks["gpu 2"].status == "warn"  # 50 GiB in use by others
    usage = MemoryManager(nvml=nvml).get_memory_usage()
    assert [u["device"] for u in usage] == ["cuda:0", "cuda:2"] and usage[1]["free_bytes"] == 90 * 2**30


def test_gpu_info_answers_like_the_seed_apis_dict():
    (gpu,) = DeviceManager(nvml=FakeNVML([h200(0)]), env={}).get_available_devices()
    assert "name" in gpu and 0 not in gpu and gpu.get("nope", 7) == 7 and gpu.get("memory_total_gb") == 140.0
    assert dict(gpu)["name"] == "NVIDIA H200" and set(gpu.keys()) >= {"index", "name", "memory_free_gb"}
    with pytest.raises(KeyError):
        gpu["nope"]
