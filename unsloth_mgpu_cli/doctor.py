"""`mgpu doctor`: is this machine ready to train on several GPUs?

    mgpu doctor               # table, a few seconds
    mgpu doctor --json        # one JSON document: {"checks": [{"name", "status", "value", "hint"}, ...], ...}
    mgpu doctor --probe       # also start one worker per GPU and time an all-reduce

The report is data: each check is a small function that takes what it judges as parameters (a size, a
version, a socket) and returns `Check`s, so tests inject faults without touching the machine; `gather_*`
functions read the real machine; `run_checks` joins the two. Rendering is at the bottom.

Nothing here imports unsloth (7-30 s, and it initialises CUDA): its presence and the library ranges it
declares come from package metadata. GPU facts come from NVML through `devices.py`, so the parent process
never initialises CUDA; `import torch` happens only to read its version, CUDA build and NCCL version.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as metadata
import importlib.util
import os
import platform
import shutil
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .devices import GIB, GPUInfo, GPULink, GPUSnapshot
from .hub import hub_host_resolves
from .hub import offline as hub_offline
from .memory import gb_text

Status = Literal["ok", "warn", "fail"]
GB = GIB  # memory and disk sizes in GB mean 2**30 bytes, as everywhere in mgpu (bandwidths in GB/s: 1e9)

# Libraries whose versions must sit inside the ranges the installed Unsloth declares. `required` ones fail
# when missing; the rest only matter for some runs (4-bit, Triton kernels) and warn.
LIBRARIES = {
    "transformers": True,
    "trl": True,
    "peft": True,
    "accelerate": True,
    "datasets": True,
    "bitsandbytes": False,
    "triton": False,
}


@dataclass
class Check:
    """One line of the report.

    Attributes:
        name: what was checked, e.g. "shared memory (/dev/shm)".
        status: "ok", "warn" (training works but something is slow, risky or missing) or "fail" (it will not work).
        value: what was measured, for people.
        hint: how to fix it; empty when there is nothing to do.
    """

    name: str
    status: Status
    value: str
    hint: str = ""


@dataclass
class Report:
    """All checks plus the raw facts behind them (for `--json`)."""

    checks: list[Check] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        """0 when no check fails (warnings allowed), 1 otherwise."""
        return 1 if any(c.status == "fail" for c in self.checks) else 0

    def counts(self) -> dict[str, int]:
        return {s: sum(c.status == s for c in self.checks) for s in ("ok", "warn", "fail")}

    def to_dict(self) -> dict[str, Any]:
        return {
            "checks": [asdict(c) for c in self.checks],
            "summary": {**self.counts(), "exit_code": self.exit_code},
            "seconds": round(self.seconds, 2),
            **self.facts,
        }


# ---------------------------------------------------------------------------------------------------------------
# Checks: pure functions of their inputs.


def check_python(version: tuple[int, ...], system: str, machine: str) -> Check:
    """Python >= 3.10 (the package needs it); Linux, because NCCL and Unsloth's GPU kernels are Linux-only."""
    value = f"Python {'.'.join(map(str, version[:3]))} on {system} {machine}"
    if tuple(version[:2]) < (3, 10):
        return Check("python", "fail", value, "install Python 3.10 or newer")
    if system != "Linux":
        return Check("python", "warn", value, "multi-GPU training (NCCL) needs Linux; elsewhere only CPU/gloo works")
    return Check("python", "ok", value)


def check_cpu(cores: int, workers: int) -> Check:
    """Each worker needs a core or two for data loading and the Python side of the training loop."""
    value = f"{cores} cores for {workers} worker(s)"
    if cores < workers:
        return Check("cpu cores", "warn", value, "fewer cores than workers: the input pipeline will starve the GPUs")
    if cores < 2 * workers:
        return Check("cpu cores", "warn", value, "under 2 cores per worker; keep dataloader workers at 0-1")
    return Check("cpu cores", "ok", value)


def check_ram(total_bytes: int, available_bytes: int, workers: int) -> Check:
    """Every worker loads its own copy of the model on the CPU first, so RAM scales with the worker count."""
    value = f"{gb_text(available_bytes)} available of {gb_text(total_bytes)}"
    per_worker = available_bytes / max(workers, 1)
    if per_worker < 4 * GB:
        hint = "under 4 GB per worker: loading a 7B+ model in every worker may swap or be OOM-killed"
        return Check("ram", "warn", value + f" ({gb_text(per_worker)} per worker)", hint)
    return Check("ram", "ok", value)


def check_shm(size_bytes: int | None, free_bytes: int | None = None) -> Check:
    """NCCL and DataLoader workers pass buffers through /dev/shm; Docker's default 64 MB breaks NCCL."""
    name = "shared memory (/dev/shm)"
    if size_bytes is None:
        return Check(name, "warn", "not found", "no /dev/shm: NCCL falls back to slower transports (Linux only)")
    value = f"{gb_text(size_bytes)}" + (f" ({gb_text(free_bytes)} free)" if free_bytes is not None else "")
    hint = "in Docker run with --ipc=host or --shm-size=16g; on Kubernetes mount an emptyDir with medium: Memory"
    if size_bytes < 512 * 1024**2:
        return Check(name, "fail", value, "too small for NCCL (it fails with 'unhandled system error'); " + hint)
    if size_bytes < 2 * GIB or (free_bytes is not None and free_bytes < 1 * GIB):
        return Check(name, "warn", value, "small: many workers or dataloader processes may run out; " + hint)
    return Check(name, "ok", value)


def check_open_files(soft: int | None, hard: int | None) -> Check:
    """NCCL, the c10d store and dataloaders open many sockets and files; 1024 runs out on 8 GPUs."""
    name = "open files limit"
    if soft is None:
        return Check(name, "ok", "unknown (no resource module)")
    value = f"soft {soft}, hard {hard}"
    if 0 <= soft < 4096:
        hint = "raise it: `ulimit -n 65536` in the shell that runs mgpu (hard limit: /etc/security/limits.conf)"
        return Check(name, "warn", value, hint)
    return Check(name, "ok", value)


def check_torch(version: str | None, cuda_build: str | None, gpu_count: int, driver_cuda: str | None) -> Check:
    """torch must be installed; with GPUs it must be a CUDA build the driver can run."""
    if version is None:
        return Check("torch", "fail", "not installed", "pip install torch (see pytorch.org for the CUDA build)")
    value = f"{version}, " + (f"CUDA {cuda_build} build" if cuda_build else "CPU-only build")
    if gpu_count and not cuda_build:
        return Check("torch", "fail", value, "GPUs found but torch cannot use them: install a CUDA build of torch")
    if gpu_count and driver_cuda and _version_tuple(driver_cuda)[:1] < _version_tuple(cuda_build)[:1]:
        return Check("torch", "fail", value + f"; driver supports CUDA {driver_cuda}",
                     "the NVIDIA driver is older than torch's CUDA: update the driver or install a torch for CUDA "
                     f"{driver_cuda}")  # fmt: skip
    return Check("torch", "ok", value)


def _version_tuple(text: str | None) -> tuple[int, ...]:
    parts = []
    for p in (text or "").split("."):
        if not p.isdigit():
            break
        parts.append(int(p))
    return tuple(parts)


def check_gpus(gpus: list[GPUInfo], nvml_error: str | None, driver: str | None) -> list[Check]:
    """One check per visible GPU; without any, a warning that training runs on CPU worker processes."""
    if not gpus:
        why = "no NVIDIA driver/NVML" if nvml_error else "none visible"
        return [Check("gpus", "warn", f"0 ({why})",
                      "training will run on CPU worker processes over gloo (slowly); install the NVIDIA driver "
                      "or check CUDA_VISIBLE_DEVICES to use GPUs")]  # fmt: skip
    checks = []
    for g in gpus:
        if g.error is not None:
            checks.append(Check(f"gpu {g.index}", "fail", f"NVML cannot read it (nvidia-smi index {g.physical_index}): "
                                f"{g.error}", "check `nvidia-smi`; a lost GPU needs a reset or a reboot; hide it "
                                "with CUDA_VISIBLE_DEVICES to train on the others"))  # fmt: skip
            continue
        used_by_others = g.memory_total_gb - g.memory_free_gb
        parts = [g.name, f"{g.memory_free_gb:.1f}/{g.memory_total_gb:.1f} GiB free"]
        parts += [f"cc {g.compute_capability}"] if g.compute_capability else []
        parts += ["bf16" if g.bf16 else "no bf16"]
        parts += [f"util {g.utilization_pct}%"] if g.utilization_pct is not None else []
        parts += [f"driver {driver}"] if driver else []
        value = ", ".join(parts)
        problems = []
        if g.processes:
            pids = ", ".join(str(p["pid"]) for p in g.processes)
            problems.append(f"{len(g.processes)} other process(es) on it (pid {pids})")
        elif used_by_others > 0.1 * g.memory_total_gb:
            problems.append(f"{used_by_others:.1f} GiB already in use")
        if g.utilization_pct is not None and g.utilization_pct > 10:
            problems.append(f"busy ({g.utilization_pct}%)")
        status: Status = "warn" if problems else "ok"
        hint = "; ".join(problems) + ": stop them or pick other GPUs with CUDA_VISIBLE_DEVICES" if problems else ""
        if not g.bf16:
            status = "warn"
            hint = (hint + "; " if hint else "") + "no bfloat16 (compute capability < 8.0): training uses float16"
        checks.append(Check(f"gpu {g.index}", status, value, hint))
    return checks


def check_visible_devices(value: str | None, physical_count: int, visible: int, names: list[str],
                          device_order: str | None) -> Check:  # fmt: skip
    """`CUDA_VISIBLE_DEVICES` decides which GPUs the workers get; a typo silently hides GPUs."""
    name = "CUDA_VISIBLE_DEVICES"
    shown = "unset" if value is None else repr(value)
    text = f"{shown}: {visible} of {physical_count} GPU(s) visible"
    if value is not None and physical_count and visible == 0:
        return Check(name, "warn", text, "it hides every GPU; unset it or list GPU indices like 0,1")
    if value is not None and physical_count and visible < len([t for t in value.split(",") if t.strip()]):
        return Check(name, "warn", text, "some entries name no GPU; CUDA ignores everything after the first bad one")
    if len(set(names)) > 1 and device_order != "PCI_BUS_ID":
        return Check(name, "warn", text + "; mixed GPU models",
                     "set CUDA_DEVICE_ORDER=PCI_BUS_ID so CUDA numbers GPUs like nvidia-smi does")  # fmt: skip
    return Check(name, "ok", text)


def check_nccl(version: str | None, available: bool, gpu_count: int) -> Check:
    """NCCL carries the gradients between GPUs; on CPU workers use gloo and NCCL does not matter."""
    if gpu_count == 0:
        value = f"{version or 'not built in'} (not used: CPU workers use gloo)"
        return Check("nccl", "ok", value)
    if not available or version is None:
        return Check("nccl", "fail", "not available in this torch", "install a CUDA build of torch for Linux")
    if gpu_count == 1:
        return Check("nccl", "ok", f"{version} (one GPU: no inter-GPU traffic)")
    return Check("nccl", "ok", version)


def check_links(links: list[GPULink]) -> list[Check]:
    """One check per GPU pair: NVLink is best, PCIe peer-to-peer is fine, through host memory is slow."""
    checks = []
    for link in links:
        name = f"link gpu {link.a} <-> gpu {link.b}"
        if link.nvlinks or link.p2p:
            checks.append(Check(name, "ok", link.kind))
        elif link.p2p is False:
            checks.append(Check(name, "warn", link.kind,
                                "no peer-to-peer: all-reduce goes through CPU memory and scales poorly; check that "
                                "IOMMU/ACS is off in the BIOS, or run `mgpu doctor --probe` to measure"))  # fmt: skip
        else:
            checks.append(Check(name, "warn", link.kind, "NVML could not tell; run `mgpu doctor --probe` to measure"))
    return checks


def check_unsloth(unsloth: str | None, zoo: str | None, gpu_count: int) -> Check:
    """Unsloth (and unsloth_zoo, which it imports) must be installed; without a GPU it trains on CPU."""
    if unsloth is None:
        return Check("unsloth", "fail", "not installed", "pip install unsloth")
    if zoo is None:
        return Check("unsloth", "fail", f"{unsloth}, unsloth_zoo missing", "pip install unsloth_zoo")
    value = f"unsloth {unsloth}, unsloth_zoo {zoo}"
    if gpu_count == 0:
        hint = "Unsloth will train on CPU, slowly (set UNSLOTH_DISABLE_CPU_FALLBACK=1 to refuse instead)"
        return Check("unsloth", "warn", value + "; no GPU", hint)
    return Check("unsloth", "ok", value)


def check_versions(
    installed: Mapping[str, str | None],
    requirements: list[str],
    marker_env: Mapping[str, str] | None = None,
    unsloth_version: str | None = None,
) -> list[Check]:
    """Compare installed library versions with the `Requires-Dist` ranges Unsloth declares.

    Args:
        installed: library name -> installed version (None when missing), for the libraries in `LIBRARIES`
            or any others the caller wants judged.
        requirements: PEP 508 strings, e.g. Unsloth's and unsloth_zoo's metadata `Requires-Dist`. Entries for
            extras (`extra == "..."`) and other platforms are ignored; several entries for one library all apply.
        marker_env: environment for evaluating markers (defaults to this interpreter's).
        unsloth_version: named in the message of a failing check.

    Returns:
        One check per library in `installed`.
    """
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion, Version

    specs: dict[str, list[Requirement]] = {}
    for text in requirements:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        # Only the base requirements: entries under an extra (`extra == "colab"`) apply to other installs.
        if req.marker is not None and not req.marker.evaluate({**(marker_env or {}), "extra": ""}):
            continue
        specs.setdefault(canonicalize_name(req.name), []).append(req)
    checks = []
    for lib, version in installed.items():
        reqs = specs.get(canonicalize_name(lib), [])
        spec = SpecifierSet()
        for r in reqs:
            spec &= r.specifier
        required = LIBRARIES.get(lib, True)
        pin = ",".join(sorted({str(s) for s in spec}))
        if version is None:
            status: Status = "fail" if required else "warn"
            why = "" if required else f" (needed for {'4-bit QLoRA' if lib == 'bitsandbytes' else 'GPU kernels'})"
            checks.append(Check(lib, status, "not installed" + why, f'pip install "{lib}{pin}"'))
            continue
        try:
            bad = sorted({str(s) for s in spec if not s.contains(Version(version), prereleases=True)})
        except InvalidVersion:
            bad = [f"a parsable version, not {version!r}"]
        if bad:
            checks.append(Check(lib, "fail", f"{version}, but Unsloth {unsloth_version or ''} needs {', '.join(bad)}",
                                f'pip install "{lib}{pin}" (the range the installed Unsloth declares)'))  # fmt: skip
        else:
            checks.append(Check(lib, "ok", f"{version} (Unsloth: {_describe(spec)})"))
    return checks


def _describe(spec: Any) -> str:
    """A range for people: the bounds, and how many single versions are excluded (Unsloth lists many)."""
    bounds = sorted({str(s) for s in spec if s.operator not in ("!=", "==") or "*" in s.version}, reverse=True)
    pins = sorted({str(s) for s in spec if s.operator == "==" and "*" not in s.version})
    excluded = {s.version for s in spec if s.operator == "!="}
    parts = pins + [b for b in bounds if not b.startswith("!=")]
    if excluded:
        parts.append(f"not {len(excluded)} listed version(s)")
    return ", ".join(parts) or "any"


def check_packed_rows(gpus: list[GPUInfo]) -> Check:
    """How a packed row's attention would run here, so what `dataset.batching: auto` picks (varlen.py): one call of a
    variable-length kernel (auto: packed) or one SDPA call per sample (auto: balanced). Unsloth is not imported."""
    from .devices import lowest_capability
    from .varlen import varlen_kernel

    kernel, why = varlen_kernel("cuda" if gpus else "cpu", lowest_capability(gpus), "auto", "auto")
    if kernel is not None:
        return Check("packed rows", "ok", f"one call of {kernel} per row; dataset.batching auto: packed")
    value = f"one SDPA call per sample ({why}); dataset.batching auto: balanced"
    if not gpus:
        return Check("packed rows", "ok", value)
    hint = "packed rows ran 2.5x slower per step on an H200 this way: install flash-attn or torch 2.12+ to pack them"
    return Check("packed rows", "ok", value, hint)


def check_attention(xformers: str | None, flash_attn: str | None) -> Check:
    """Which attention kernels Unsloth could use; PyTorch SDPA always works, so this only informs."""
    found = [f"xformers {xformers}"] if xformers else []
    found += [f"flash-attn {flash_attn}"] if flash_attn else []
    if not found:
        return Check("attention kernels", "ok", "PyTorch SDPA (no xformers, no flash-attn)")
    hint = "installed, not imported: if it was built for another torch, Unsloth falls back to SDPA by itself"
    return Check("attention kernels", "ok", ", ".join(found) + " + PyTorch SDPA", hint)


def check_disk(label: str, path: Path, free_bytes: int | None, warn_below: float = 20 * GB,
               fail_below: float = 2 * GB, unusable: str | None = None) -> Check:  # fmt: skip
    """Free space where models are cached and checkpoints written: an 8B model is 16 GB, a checkpoint more.
    `unusable`: why nothing can be written there (a file in the way, no permission), which matters more."""
    name = f"disk: {label}"
    if unusable is not None:
        return Check(name, "fail", unusable, "point it at a folder you can write to")
    if free_bytes is None:
        return Check(name, "warn", f"{path}: cannot stat", "check that the folder (or a parent) exists and is readable")
    value = f"{gb_text(free_bytes)} free at {path}"
    if free_bytes < fail_below:
        return Check(name, "fail", value, f"under {gb_text(fail_below)}: free space or point it at a larger disk")
    if free_bytes < warn_below:
        return Check(name, "warn", value, "may not hold a 7B+ model and its checkpoints; free space or move it")
    return Check(name, "ok", value)


def check_hf(cache: Path, offline: bool, token_present: bool, hub_resolves: bool | None = True) -> Check:
    """Where models are cached, whether downloads are allowed (and the hub's name resolves), whether gated models
    can be fetched."""
    value = f"cache {cache}; {'offline' if offline else 'online'}; token {'set' if token_present else 'not set'}"
    if not offline and not hub_resolves:
        return Check(
            "hugging face",
            "warn",
            value.replace("online", "downloads on, but the hub's host name does not resolve"),
            "no download can work: mgpu train loads hub ids from the cache only (it sets HF_HUB_OFFLINE=1) and "
            "refuses what the cache lacks; use local folders or the cache, or fix DNS / HF_ENDPOINT",
        )
    if offline and not cache.exists():
        return Check("hugging face", "warn", value, "offline with no cache: only local model folders will load")
    if not token_present:
        return Check("hugging face", "ok", value, "gated models (Llama, Gemma) need HF_TOKEN or `hf auth login`")
    return Check("hugging face", "ok", value)


def check_port(port: int, host: str = "127.0.0.1") -> Check:
    """The rendezvous port must be free for the c10d store of the launcher."""
    name = "rendezvous port"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, port))
    except OSError as exc:
        return Check(name, "fail", f"{host}:{port} in use ({exc.strerror})",
                     "pick another port (MASTER_PORT / --rdzv-endpoint) or stop what holds it")  # fmt: skip
    return Check(name, "ok", f"{host}:{port} free")


def check_probe(result: Any, links: list[GPULink]) -> list[Check]:
    """Turn a `probe.ProbeResult` into checks; slow NVLink pairs get a warning."""
    label = f"{result.world_size} x {result.device} ({result.backend})"
    if not result.ok:
        return [Check("probe all-reduce", "fail", f"{label}: {result.error}",
                      "look for the error above; NCCL_DEBUG=INFO shows how NCCL connects")]  # fmt: skip
    checks = [Check("probe all-reduce", "ok",
                    f"{label}: sum correct; busbw {result.busbw_gbps:.2f} GB/s, algbw {result.algbw_gbps:.2f} GB/s "
                    f"({result.size_mb:g} MiB, {result.seconds:.1f} s)")]  # fmt: skip
    nvlinked = {(lk.a, lk.b) for lk in links if lk.nvlinks}
    for p in result.pairs:
        status: Status = "ok"
        hint = ""
        # NVLink 3+ moves well over 100 GB/s; under 20 means NCCL is not using it (P2P disabled, IOMMU, container).
        if (p["a"], p["b"]) in nvlinked and p["busbw_gbps"] < 20:
            status, hint = "warn", "slow for NVLink: check NCCL_P2P_DISABLE / NCCL_P2P_LEVEL and NCCL_DEBUG=INFO"
        value = (
            f"busbw {p['busbw_gbps']:.2f} GB/s"
            if result.device != "cuda"
            else (f"busbw {p['busbw_gbps']:.2f} GB/s ({link_class(p['busbw_gbps'])})")
        )
        checks.append(Check(f"probe pair {p['a']} <-> {p['b']}", status, value, hint))
    return checks


def link_class(busbw_gbps: float) -> str:
    """What a measured GPU-pair bandwidth says about the link, when NVML cannot tell (e.g. inside a VM).

    PCIe 4.0/5.0 x16 carries about 25/50 GB/s each way; NVLink 3/4 several hundred. NCCL's bus bandwidth on
    a pair reaches most of that, so over 100 GB/s can only be NVLink (or NVSwitch).
    """
    if busbw_gbps >= 100:
        return "NVLink-class"
    if busbw_gbps >= 10:
        return "PCIe-class"
    return "slower than PCIe: P2P likely off, traffic through host memory"


# ---------------------------------------------------------------------------------------------------------------
# Gathering: read the real machine.


def dist_version(name: str) -> str | None:
    """Installed version of a distribution, from metadata only (the package is not imported)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def unsloth_requirements() -> list[str]:
    """`Requires-Dist` of the installed unsloth and unsloth_zoo (empty when they are missing)."""
    reqs: list[str] = []
    for dist in ("unsloth", "unsloth_zoo"):
        try:
            reqs += metadata.requires(dist) or []
        except metadata.PackageNotFoundError:
            pass
    return reqs


def module_version(module: str, dist: str) -> str | None:
    """Version of an importable module without importing it: found on the path, version from metadata."""
    if importlib.util.find_spec(module) is None:
        return None
    return dist_version(dist) or "unknown version"


def shm_stats(path: str = "/dev/shm") -> tuple[int | None, int | None]:
    """(size, free) of the shared-memory filesystem in bytes; (None, None) where there is none."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None, None
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


def free_bytes_at(path: Path) -> tuple[Path, int | None]:
    """Free space on the filesystem that holds `path`, or would hold it once created (nearest existing parent)."""
    p = path.expanduser().absolute()
    while not p.exists() and p.parent != p:
        p = p.parent
    try:
        return path.expanduser().absolute(), shutil.disk_usage(p).free
    except OSError:
        return path.expanduser().absolute(), None


def unusable_folder(path: Path) -> str | None:
    """Why no file can be written at `path` (a folder, existing or to be made), or None: it, or its nearest existing
    parent, is a file, or refuses a new entry. Checked by making and removing an empty folder there, since
    permissions lie for root (and /proc takes no files whatever they say)."""
    import tempfile

    p = path.expanduser().absolute()
    while not p.exists() and p.parent != p:
        p = p.parent
    if not p.is_dir():
        return f"{p} is a file, not a folder"
    try:
        tempfile.mkdtemp(prefix=".mgpu-doctor-", dir=p)
    except OSError as exc:
        return f"cannot write in {p}: {exc.strerror or exc}"
    else:
        return None
    finally:
        for left in p.glob(".mgpu-doctor-*"):
            with contextlib.suppress(OSError):
                left.rmdir()


def open_files_limit() -> tuple[int | None, int | None]:
    """The (soft, hard) limit on open files; (None, None) where the platform has no such limit."""
    try:
        import resource
    except ImportError:  # Windows
        return None, None
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def hf_cache_dir(env: Mapping[str, str]) -> Path:
    """The hub cache folder, resolved the way huggingface_hub does (without importing it)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return Path(env[var]).expanduser()
    return hf_home(env) / "hub"


def hf_home(env: Mapping[str, str]) -> Path:
    """Hugging Face's home folder: HF_HOME, else $XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface."""
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser()
    xdg = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface"


def hf_token_present(env: Mapping[str, str]) -> bool:
    """Whether a token is configured (env or token file). The token itself is never read into the report."""
    if env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN"):
        return True
    token_file = Path(env["HF_TOKEN_PATH"]).expanduser() if env.get("HF_TOKEN_PATH") else hf_home(env) / "token"
    try:
        return token_file.is_file() and token_file.stat().st_size > 0
    except OSError:
        return False


def torch_facts() -> dict[str, Any]:
    """torch version, CUDA build and NCCL version. Importing torch does not initialise CUDA; these calls do not."""
    try:
        import torch
    except ImportError:
        return {"version": None, "cuda": None, "nccl": None, "nccl_available": False}
    import torch.distributed as dist

    nccl = None
    nccl_available = bool(dist.is_available() and dist.is_nccl_available())
    if nccl_available:
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))  # reads the linked library; no device touched
        except Exception:
            nccl = None
    return {"version": torch.__version__, "cuda": torch.version.cuda, "nccl": nccl, "nccl_available": nccl_available}


def run_checks(output_dir: Path | str = "outputs", probe: bool = False, probe_timeout: float = 120.0,
               env: Mapping[str, str] | None = None, nvml: Any = None) -> Report:  # fmt: skip
    """Check this machine and return the report (nothing is printed).

    Args:
        output_dir: folder whose disk is checked for checkpoints (`./outputs` by default).
        probe: also start one worker per GPU (2 CPU workers without GPUs) and time an all-reduce.
        probe_timeout: wall-clock limit for the probe, start-up included.
        env: environment to read (defaults to `os.environ`).
        nvml: NVML module to use (defaults to `pynvml`); tests pass a fake one.
    """
    from .devices import DeviceManager

    start = time.perf_counter()
    env = os.environ if env is None else env
    report = Report()
    add = report.checks.append

    snap: GPUSnapshot = DeviceManager(nvml=nvml, env=env).snapshot()
    gpus = snap.devices
    # a run's workers: one per GPU; without GPUs `distributed.num_gpus: auto` starts one CPU worker (the probe, 2)
    workers = len(gpus) or 1

    add(check_python(sys.version_info, platform.system(), platform.machine()))
    add(check_cpu(os.cpu_count() or 1, workers))
    try:
        import psutil

        vm = psutil.virtual_memory()
        add(check_ram(vm.total, vm.available, workers))
    except ImportError:
        add(Check("ram", "warn", "unknown", "pip install psutil"))
    add(check_shm(*shm_stats()))
    add(check_open_files(*open_files_limit()))

    tf = torch_facts()
    add(check_torch(tf["version"], tf["cuda"], len(gpus), snap.cuda_driver))
    report.checks += check_gpus(gpus, snap.error, snap.driver)
    add(check_visible_devices(env.get("CUDA_VISIBLE_DEVICES"), snap.physical_count, len(gpus),
                              [g.name for g in gpus], env.get("CUDA_DEVICE_ORDER")))  # fmt: skip
    add(check_nccl(tf["nccl"], tf["nccl_available"], len(gpus)))
    report.checks += check_links(snap.links)

    add(check_unsloth(dist_version("unsloth"), dist_version("unsloth_zoo"), len(gpus)))
    installed = {lib: dist_version(lib) for lib in LIBRARIES}
    report.checks += check_versions(installed, unsloth_requirements(), unsloth_version=dist_version("unsloth"))
    add(check_attention(module_version("xformers", "xformers"), module_version("flash_attn", "flash-attn")))
    add(check_packed_rows(gpus))

    cache = hf_cache_dir(env)
    from .models import cache_dir

    for label, path in (("output", Path(output_dir)), ("hf cache", cache), ("mgpu cache", cache_dir(env))):
        add(check_disk(label, *free_bytes_at(path), unusable=unusable_folder(path)))
    offline = hub_offline(env)
    add(check_hf(cache, offline, hf_token_present(env), True if offline else hub_host_resolves(env)))

    from .distributed import free_port

    port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT", "").isdigit() else free_port()
    add(check_port(port))

    report.facts = {
        "gpus": [g.to_dict() for g in gpus],
        "links": [lk.to_dict() for lk in snap.links],
        "driver": snap.driver,
        "cuda_driver": snap.cuda_driver,
        "nvml_error": snap.error,
        "torch": tf,
        "device": "cuda" if gpus else "cpu",
        "workers": workers,
    }
    if probe:
        from .probe import run_probe

        result = run_probe(len(gpus) or 2, "cuda" if gpus else "cpu", timeout=probe_timeout)
        report.checks += check_probe(result, snap.links)
        report.facts["probe"] = result.to_dict()
    report.seconds = time.perf_counter() - start
    return report


# ---------------------------------------------------------------------------------------------------------------
# Rendering.

_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red"}


def print_report(report: Report, console: Any = None) -> None:
    """Print the report as a Rich table plus a one-line verdict."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console(highlight=False)
    table = Table(title="mgpu doctor", title_justify="left", show_lines=False)
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    # fold, not "…": a path or a variable name in a hint must survive a narrow terminal whole
    table.add_column("value", overflow="fold")
    table.add_column("hint", style="dim", overflow="fold")
    for c in report.checks:
        table.add_row(escape(c.name), f"[{_STYLE[c.status]}]{c.status}[/]", escape(c.value), escape(c.hint))
    console.print(table)
    n = report.counts()
    verdict = "[bold red]not ready[/]" if report.exit_code else "[green]ready[/]"
    where = f"{len(report.facts.get('gpus', []))} GPU(s)" if report.facts.get("gpus") else "CPU workers (no GPU)"
    console.print(f"{verdict}: {n['ok']} ok, {n['warn']} warn, {n['fail']} fail; trains on {where} "
                  f"({report.seconds:.1f} s)")  # fmt: skip
