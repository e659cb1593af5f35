"""`mgpu doctor`: every check on this CPU machine, injected faults, the real CLI in a subprocess, the probe."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, mgpu_env, run_mgpu
from fake_nvml import FakeNVML, h200

from unsloth_mgpu_cli import doctor
from unsloth_mgpu_cli.devices import DeviceManager
from unsloth_mgpu_cli.doctor import (
    GB,
    check_disk,
    check_gpus,
    check_links,
    check_open_files,
    check_port,
    check_probe,
    check_python,
    check_shm,
    check_torch,
    check_unsloth,
    check_versions,
    check_visible_devices,
    run_checks,
)
from unsloth_mgpu_cli.probe import ProbeResult, run_probe

UNSLOTH_REQS = [
    "transformers!=4.53.0,!=4.54.0,<=5.17.0,>=4.52.4",
    "trl!=0.19.0,<=1.15.0,>=0.18.2",
    "peft!=0.11.0,>=0.18.0",
    'triton>=3.0.0; "linux" in sys_platform',
    'trl==0.7.0; extra == "colab"',  # an extra's pin must not apply to a plain install
]


def by_name(checks):
    return {c.name: c for c in checks}


# --- this machine ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report():
    return run_checks(output_dir=Path("outputs"))


def test_every_check_runs_here_with_a_status(report):
    names = {c.name for c in report.checks}
    for needed in ("python", "cpu cores", "ram", "shared memory (/dev/shm)", "open files limit", "torch", "nccl",
                   "CUDA_VISIBLE_DEVICES", "unsloth", "transformers", "trl", "peft", "accelerate", "bitsandbytes",
                   "triton", "datasets", "attention kernels", "packed rows", "disk: output", "disk: hf cache",
                   "disk: mgpu cache", "hugging face", "rendezvous port"):  # fmt: skip
        assert needed in names, needed
    for c in report.checks:
        assert c.status in ("ok", "warn", "fail") and c.value
        if c.status != "ok":
            assert c.hint, f"{c.name} is {c.status} without a hint"
    assert report.exit_code == (1 if any(c.status == "fail" for c in report.checks) else 0)


def test_no_gpu_is_a_warning_that_explains_cpu_mode(report):
    if report.facts["gpus"]:
        pytest.skip("this machine has GPUs")
    checks = by_name(report.checks)
    assert checks["gpus"].status == "warn" and "CPU" in checks["gpus"].hint
    assert checks["unsloth"].status == "warn" and "CPU, slowly" in checks["unsloth"].hint
    # the workers a run starts: `num_gpus: auto` is one CPU worker without GPUs (the cores check counted 2)
    assert report.facts["device"] == "cpu" and report.facts["workers"] == 1
    assert checks["cpu cores"].value.endswith("for 1 worker(s)")


def test_versions_are_judged_against_installed_unsloth_metadata(report):
    checks = by_name(report.checks)
    # This venv was installed by pip from Unsloth's own requirements, so they must agree.
    assert checks["transformers"].status == "ok" and "<=5.17.0" in checks["transformers"].value


def test_doctor_is_fast_without_probe(report):
    assert report.seconds < 10


# --- faults through the checks' inputs -------------------------------------------------------------------------


def test_incompatible_library_version_fails_with_pin_hint():
    checks = by_name(check_versions({"transformers": "4.53.0", "trl": "1.16.0", "peft": "0.21.2"}, UNSLOTH_REQS))
    assert checks["transformers"].status == "fail" and "!=4.53.0" in checks["transformers"].value
    assert checks["trl"].status == "fail" and "<=1.15.0" in checks["trl"].value
    assert 'pip install "trl' in checks["trl"].hint and "<=1.15.0" in checks["trl"].hint
    assert checks["peft"].status == "ok"


def test_extras_pins_do_not_apply_and_missing_libraries_are_named():
    checks = by_name(check_versions({"trl": "1.15.0", "transformers": None, "triton": None}, UNSLOTH_REQS))
    assert checks["trl"].status == "ok"  # the `extra == "colab"` pin trl==0.7.0 is ignored
    assert checks["transformers"].status == "fail" and "not installed" in checks["transformers"].value
    assert checks["triton"].status == "warn"  # optional: only some runs need it


def test_platform_markers_are_evaluated():
    on_mac = {"sys_platform": "darwin", "platform_system": "Darwin"}
    checks = by_name(check_versions({"triton": "2.0.0"}, UNSLOTH_REQS, marker_env=on_mac))
    assert checks["triton"].status == "ok"  # the linux-only range does not apply
    assert by_name(check_versions({"triton": "2.0.0"}, UNSLOTH_REQS))["triton"].status == "fail"


def test_tiny_shm_fails_small_warns_large_ok():
    assert check_shm(64 * 1024**2).status == "fail"  # Docker's default
    assert "--shm-size" in check_shm(64 * 1024**2).hint
    assert check_shm(1 * 1024**3).status == "warn"
    assert check_shm(16 * 1024**3, 16 * 1024**3).status == "ok"
    assert check_shm(None).status == "warn"


def test_full_disk_fails_and_low_disk_warns(tmp_path):
    assert check_disk("output", tmp_path, 100 * 1024**2).status == "fail"
    assert check_disk("output", tmp_path, 10 * GB).status == "warn"
    assert check_disk("output", tmp_path, 500 * GB).status == "ok"
    full = check_disk("output", tmp_path, 0)
    assert str(tmp_path) in full.value and full.hint


def test_disk_of_a_folder_not_yet_created_is_measured_at_its_parent(tmp_path):
    path, free = doctor.free_bytes_at(tmp_path / "not" / "yet")
    assert path == tmp_path / "not" / "yet" and free and free > 0


def test_a_disk_folder_that_cannot_be_written_fails_whatever_its_free_space(tmp_path):
    """--output-dir naming a file passed as "ok, 72.8 GB free"; /proc/x failed as "under 2 GB free"."""
    (tmp_path / "afile").write_text("x")
    assert doctor.unusable_folder(tmp_path / "new" / "run") is None  # measured at the existing parent
    assert doctor.unusable_folder(tmp_path / "afile" / "run") == f"{tmp_path / 'afile'} is a file, not a folder"
    assert "cannot write in /proc" in doctor.unusable_folder(Path("/proc/mgpu-run"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # the write probe left nothing
    check = check_disk("output", tmp_path / "afile", 500 * GB, unusable=doctor.unusable_folder(tmp_path / "afile"))
    assert check.status == "fail" and "is a file" in check.value and check.hint


def test_busy_port_fails_free_port_ok():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        busy = check_port(port)
        assert busy.status == "fail" and str(port) in busy.value and "MASTER_PORT" in busy.hint
    assert check_port(port).status == "ok"  # released


def test_busy_master_port_turns_the_report_to_exit_1(monkeypatch):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        env = {"MASTER_PORT": str(s.getsockname()[1]), "HF_HUB_OFFLINE": "1"}
        rep = run_checks(output_dir="outputs", env=env, nvml=FakeNVML([], fail_init=True))
    assert by_name(rep.checks)["rendezvous port"].status == "fail"
    assert rep.exit_code == 1 and rep.to_dict()["summary"]["exit_code"] == 1


def test_low_open_files_limit_warns():
    assert check_open_files(1024, 4096).status == "warn" and "ulimit" in check_open_files(1024, 4096).hint
    assert check_open_files(65536, 65536).status == "ok"


def test_python_and_torch_faults():
    assert check_python((3, 9, 18), "Linux", "x86_64").status == "fail"
    assert check_python((3, 11, 7), "Darwin", "arm64").status == "warn"
    assert check_torch(None, None, 0, None).status == "fail"
    assert check_torch("2.14.1+cpu", None, 2, "13.0").status == "fail"  # GPUs but CPU-only torch
    assert check_torch("2.14.1+cu130", "13.0", 2, "12.4").status == "fail"  # driver older than torch's CUDA
    assert check_torch("2.11.0+cu130", "13.0", 2, "13.0").status == "ok"


def test_unsloth_missing_fails():
    assert check_unsloth(None, None, 0).status == "fail"
    assert check_unsloth("2026.10.9", None, 2).status == "fail"
    assert check_unsloth("2026.10.9", "2026.10.9", 2).status == "ok"


# --- GPUs described by a fake NVML at the library edge ---------------------------------------------------------


def test_two_h200_with_nvlink_are_ok_end_to_end():
    nvml = FakeNVML([h200(0), h200(1)], nvlinks={(0, 1): 18})
    rep = run_checks(output_dir="outputs", env={}, nvml=nvml)
    checks = by_name(rep.checks)
    assert checks["gpu 0"].status == "ok" and "NVIDIA H200" in checks["gpu 0"].value and "bf16" in checks["gpu 0"].value
    assert checks["link gpu 0 <-> gpu 1"].status == "ok" and "NVLink x18" in checks["link gpu 0 <-> gpu 1"].value
    assert "gpus" not in checks and rep.facts["device"] == "cuda" and rep.facts["workers"] == 2
    assert "2 of 2" in checks["CUDA_VISIBLE_DEVICES"].value
    assert rep.facts["links"][0]["kind"] == "NVLink x18"


def test_gpu_used_by_another_process_and_old_gpu_warn():
    snap = DeviceManager(nvml=FakeNVML([h200(0, pids=[777], free_gib=60.0), h200(1, cc=(7, 5))]), env={}).snapshot()
    g0, g1 = check_gpus(snap.devices, None, snap.driver)
    assert g0.status == "warn" and "777" in g0.hint
    assert g1.status == "warn" and "float16" in g1.hint


def test_unknown_gpu_facts_are_left_out_not_printed_as_none():
    gpu = DeviceManager(nvml=FakeNVML([h200(0)]), env={}).snapshot().devices[0]
    gpu.utilization_pct, gpu.compute_capability = None, None
    (check,) = check_gpus([gpu], None, None)
    assert "None" not in check.value and "NVIDIA H200" in check.value


def test_nvml_error_after_init_is_reported_as_no_gpu():
    class Broken(FakeNVML):
        NVMLError = RuntimeError

        def nvmlDeviceGetCount(self):
            raise RuntimeError("Driver/library version mismatch")

    rep = run_checks(output_dir="outputs", env={}, nvml=Broken([h200(0)]))
    assert by_name(rep.checks)["gpus"].status == "warn" and "mismatch" in rep.facts["nvml_error"]


def test_pcie_without_p2p_warns():
    snap = DeviceManager(nvml=FakeNVML([h200(0), h200(1), h200(2)], p2p_pairs=[(0, 1)]), env={}).snapshot()
    links = by_name(check_links(snap.links))
    assert links["link gpu 0 <-> gpu 1"].status == "ok"
    assert links["link gpu 0 <-> gpu 2"].status == "warn" and "IOMMU" in links["link gpu 0 <-> gpu 2"].hint


def test_cuda_visible_devices_hiding_gpus_warns():
    assert check_visible_devices("", 2, 0, [], None).status == "warn"
    assert check_visible_devices("0,5", 2, 1, ["NVIDIA H200"], None).status == "warn"
    assert check_visible_devices(None, 2, 2, ["NVIDIA H200"] * 2, None).status == "ok"
    mixed = check_visible_devices(None, 2, 2, ["NVIDIA H200", "NVIDIA A10"], None)
    assert mixed.status == "warn" and "PCI_BUS_ID" in mixed.hint


def test_probe_results_become_checks():
    bad = check_probe(ProbeResult(False, "cuda", "nccl", 2, error="timed out after 5 s"), [])
    assert bad[0].status == "fail" and "timed out" in bad[0].value
    nvlinked = DeviceManager(nvml=FakeNVML([h200(0), h200(1)], nvlinks={(0, 1): 18}), env={}).snapshot().links
    slow = ProbeResult(True, "cuda", "nccl", 2, 256, 5.0, 5.0, [{"a": 0, "b": 1, "busbw_gbps": 5.0}], 3.0)
    checks = check_probe(slow, nvlinked)
    assert checks[0].status == "ok" and checks[1].status == "warn" and "NCCL_P2P" in checks[1].hint


# --- the real command, the import rules, the probe -------------------------------------------------------------


@pytest.mark.integration
def test_mgpu_doctor_json_in_a_subprocess(tmp_path):
    start = time.perf_counter()
    proc = run_mgpu("doctor", "--json", "--output-dir", str(tmp_path / "out"), timeout=120)
    elapsed = time.perf_counter() - start
    data = json.loads(proc.stdout)
    assert data["checks"]
    for c in data["checks"]:
        assert set(c) >= {"name", "status", "value", "hint"} and c["status"] in ("ok", "warn", "fail")
    fails = [c for c in data["checks"] if c["status"] == "fail"]
    assert proc.returncode == (1 if fails else 0), proc.stderr
    assert any(str(tmp_path / "out") in c["value"] for c in data["checks"] if c["name"] == "disk: output")
    assert elapsed < 15, f"doctor took {elapsed:.1f} s"
    # the documented shape (docs/doctor.md, "JSON"); "probe" only with --probe
    documented = {"checks", "summary", "seconds", "gpus", "links", "driver", "cuda_driver", "nvml_error", "torch"}
    assert set(data) == documented | {"device", "workers"}, sorted(data)
    counts = {s: sum(c["status"] == s for c in data["checks"]) for s in ("ok", "warn", "fail")}
    assert data["summary"] == {**counts, "exit_code": proc.returncode}
    assert set(data["torch"]) >= {"version", "cuda", "nccl", "nccl_available"} and data["workers"] >= 1
    assert data["device"] == ("cuda" if data["gpus"] else "cpu")  # CPU workers where no GPU is seen


def test_table_keeps_every_hint_whole_on_an_80_column_terminal(report):
    from rich.console import Console

    console = Console(width=80, record=True, highlight=False, color_system=None)
    doctor.print_report(report, console)
    text = console.export_text()
    assert "…" not in text
    cells = [line.split("│") for line in text.splitlines()]
    hints = "".join("".join(row[4].split()) for row in cells if len(row) == 6)  # the hint column, lines joined
    for c in report.checks:  # each hint, folded over lines, is still all there
        assert "".join(c.hint.split()) in hints, c.name


@pytest.mark.integration
def test_mgpu_doctor_table_exit_code_matches_fails():
    proc = run_mgpu("doctor", timeout=120)
    assert "mgpu doctor" in proc.stdout and "rendezvous port" in proc.stdout
    assert proc.returncode == (1 if "not ready" in proc.stdout else 0)


@pytest.mark.integration
def test_doctor_does_not_import_unsloth_or_initialise_cuda():
    code = (
        "import sys, json\n"
        "from unsloth_mgpu_cli.doctor import run_checks\n"
        "r = run_checks()\n"
        "import torch\n"
        "print(json.dumps({'unsloth': 'unsloth' in sys.modules, 'zoo': 'unsloth_zoo' in sys.modules,\n"
        "  'transformers': 'transformers' in sys.modules, 'cuda': torch.cuda.is_initialized(), 'n': len(r.checks)}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=mgpu_env(), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {"unsloth": False, "zoo": False, "transformers": False, "cuda": False, "n": seen["n"]}
    assert seen["n"] > 10


@pytest.mark.integration
def test_probe_on_cpu_with_two_gloo_workers_measures_bandwidth():
    result = run_probe(2, "cpu", timeout=120)
    assert result.ok, result.error
    assert (result.backend, result.world_size) == ("gloo", 2)
    assert result.busbw_gbps > 0 and result.algbw_gbps > 0
    assert [(p["a"], p["b"]) for p in result.pairs] == [(0, 1)]
    (check, pair) = check_probe(result, [])
    assert check.status == "ok" and "sum correct" in check.value and "GB/s" in check.value


@pytest.mark.integration
def test_probe_time_out_fails_instead_of_hanging():
    start = time.perf_counter()
    result = run_probe(2, "cpu", timeout=1.0)
    assert time.perf_counter() - start < 15
    assert not result.ok and "timed out" in result.error
    assert check_probe(result, [])[0].status == "fail"


@pytest.mark.integration
def test_mgpu_doctor_probe_json_on_cpu():
    proc = run_mgpu("doctor", "--json", "--probe", timeout=300)
    data = json.loads(proc.stdout)
    probe = by_name([doctor.Check(**c) for c in data["checks"]])["probe all-reduce"]
    assert probe.status == "ok", probe.value
    assert data["probe"]["busbw_gbps"] > 0 and data["probe"]["world_size"] == 2
    # the probe takes tens of seconds: stderr says what is going on (stdout stays one JSON document)
    assert "probing: one worker per GPU (2 on CPU) times an all-reduce; up to 120 s ..." in proc.stderr


def test_measured_pair_bandwidth_names_the_link_class():
    from unsloth_mgpu_cli.doctor import link_class

    assert link_class(297.8) == "NVLink-class"  # measured on 2 x H200 whose NVLink NVML cannot see in the VM
    assert link_class(40.0) == "PCIe-class"
    assert "P2P" in link_class(3.0)


def test_the_mgpu_cache_disk_is_where_unsloth_mgpu_cache_points(tmp_path):
    """The data cache honours UNSLOTH_MGPU_CACHE; the doctor's disk check used to measure ~/.cache regardless."""
    env = {**os.environ, "UNSLOTH_MGPU_CACHE": str(tmp_path / "cache")}
    checks = by_name(run_checks(output_dir=tmp_path, env=env).checks)
    assert str(tmp_path / "cache") in checks["disk: mgpu cache"].value, checks["disk: mgpu cache"].value


def test_hugging_face_downloads_on_without_a_resolvable_hub_is_a_warning():
    """`online` only meant HF_HUB_OFFLINE unset: on a host without DNS for the hub every download then failed after
    about 50 s of retries, while doctor said ok."""
    from unsloth_mgpu_cli.doctor import check_hf, hub_host_resolves

    cache = Path("/nonexistent-cache")
    bad = check_hf(cache, offline=False, token_present=True, hub_resolves=False)
    assert bad.status == "warn" and "does not resolve" in bad.value and "local folders or the cache" in bad.hint
    assert check_hf(cache, offline=False, token_present=True, hub_resolves=True).status == "ok"
    assert check_hf(cache, offline=False, token_present=True, hub_resolves=None).status == "warn"  # no answer in 2 s
    assert hub_host_resolves({"HF_ENDPOINT": "https://no-such-host.invalid"}) in (False, None)  # never resolves
