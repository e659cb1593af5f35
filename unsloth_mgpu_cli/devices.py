"""GPU facts read through NVML, without initialising CUDA in this process.

    from unsloth_mgpu_cli.devices import DeviceManager, count_gpus
    DeviceManager().get_available_devices()   # [] on a machine without an NVIDIA GPU
    count_gpus()                               # honours CUDA_VISIBLE_DEVICES

Why NVML and not `torch.cuda`: `torch.cuda.device_count()` / `is_available()` call into the CUDA driver, and a
parent that has touched CUDA can no longer fork workers safely; NVML answers the same questions (and more:
utilisation, other processes, NVLink) from the driver's management library. The doctor and the training
launcher both read GPUs through this module, so they agree on what is there.

Every NVML call goes through an injectable `nvml` module object, so tests can describe a machine with fake answers.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

GIB = 1024**3


@dataclass
class GPUInfo:
    """One GPU as CUDA in a worker process will see it.

    Attributes:
        index: CUDA index after `CUDA_VISIBLE_DEVICES` is applied (what `torch.cuda.set_device` takes).
        physical_index: NVML index (PCI bus order), the number `nvidia-smi` shows.
        name: marketing name, e.g. "NVIDIA H200".
        uuid: "GPU-..." identifier, stable across reboots.
        pci_bus_id: PCI address, used to match NVLink peers.
        memory_total_gb: device memory in GiB.
        memory_free_gb: memory not allocated by any process, in GiB.
        compute_capability: "major.minor", e.g. "9.0"; None when NVML cannot say.
        bf16: bfloat16 is supported in hardware (compute capability 8.0 or newer).
        utilization_pct: GPU busy percentage over the last sample period; None when unknown.
        processes: other processes holding memory on this GPU: dicts with `pid` and `used_gb`.
        error: why NVML could not read this GPU (e.g. "GPU is lost"); None when it could. Such a GPU stays in
            the list (CUDA numbers it all the same) with its other facts unknown; `mgpu doctor` fails on it.
    """

    index: int
    physical_index: int
    name: str
    uuid: str = ""
    pci_bus_id: str = ""
    memory_total_gb: float = 0.0
    memory_free_gb: float = 0.0
    compute_capability: str | None = None
    bf16: bool = False
    utilization_pct: int | None = None
    processes: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    # The seed API returned dicts; `device["name"]`, `"name" in device`, `device.get(...)`, `dict(device)` and
    # `device.keys()` keep working for code written against it.
    def __getitem__(self, key: str) -> Any:
        if not isinstance(key, str) or key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self.__dataclass_fields__

    def keys(self) -> list[str]:
        return list(self.__dataclass_fields__)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GPULink:
    """How two visible GPUs talk to each other.

    Attributes:
        a: CUDA index of the first GPU.
        b: CUDA index of the second GPU.
        nvlinks: number of active NVLink links joining them (0 when they share none).
        p2p: peer-to-peer reads between them are supported (NVML P2P status OK); None when unknown.
        topology: NVML's common-ancestor level: "same board", "single PCIe switch", "multiple PCIe switches",
            "host bridge", "NUMA node" or "across CPU sockets"; None when unknown.
    """

    a: int
    b: int
    nvlinks: int = 0
    p2p: bool | None = None
    topology: str | None = None

    @property
    def kind(self) -> str:
        if self.nvlinks:
            return f"NVLink x{self.nvlinks}"
        where = f" ({self.topology})" if self.topology else ""
        if self.p2p:
            return f"PCIe P2P{where}"
        if self.p2p is False:
            return f"PCIe, no P2P, through host memory{where}"
        return f"unknown{where}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kind": self.kind}


@dataclass
class GPUSnapshot:
    """Everything NVML told us in one session (one `nvmlInit`).

    Attributes:
        devices: the visible GPUs, in CUDA order.
        links: one entry per pair of visible GPUs.
        physical_count: GPUs in the machine, ignoring `CUDA_VISIBLE_DEVICES`.
        driver: NVIDIA driver version string.
        cuda_driver: highest CUDA version the driver supports, e.g. "13.0".
        error: why NVML could not be read (no driver, no library); None when it could.
    """

    devices: list[GPUInfo] = field(default_factory=list)
    links: list[GPULink] = field(default_factory=list)
    physical_count: int = 0
    driver: str | None = None
    cuda_driver: str | None = None
    error: str | None = None


def load_nvml() -> Any:
    """Import and return the `pynvml` module (from nvidia-ml-py)."""
    with warnings.catch_warnings():
        # Some pynvml builds warn about the old `pynvml` distribution on import; it says nothing about this machine.
        warnings.simplefilter("ignore", FutureWarning)
        import pynvml
    return pynvml


def _text(value: Any) -> str:
    # Older nvidia-ml-py returns bytes for names and bus ids, newer returns str.
    return value.decode() if isinstance(value, bytes) else str(value)


def visible_physical_indices(
    cuda_visible_devices: str | None, physical_count: int, uuids: list[str] | None = None
) -> list[int]:
    """Map `CUDA_VISIBLE_DEVICES` to NVML indices the way the CUDA runtime does.

    Args:
        cuda_visible_devices: the variable's value; None when unset (all GPUs visible).
        physical_count: number of GPUs NVML reports.
        uuids: NVML UUIDs by physical index, to resolve "GPU-..." entries (prefixes allowed, as in CUDA).

    Returns:
        Physical indices in CUDA order. Like CUDA, parsing stops at the first entry that names no GPU,
        so "0,7,1" on a 2-GPU machine means only GPU 0, and "" or "-1" hides every GPU.
    """
    if cuda_visible_devices is None:
        return list(range(physical_count))
    result: list[int] = []
    for token in cuda_visible_devices.split(","):
        token = token.strip()
        if token.lstrip("-").isdigit():
            idx = int(token)
            if idx < 0 or idx >= physical_count:
                break
        elif token.startswith("GPU-") and uuids:
            matches = [i for i, u in enumerate(uuids) if u.startswith(token)]
            if len(matches) != 1:
                break
            idx = matches[0]
        else:
            break
        if idx in result:
            break
        result.append(idx)
    return result


_TOPOLOGY_LEVELS = {
    0: "same board",
    10: "single PCIe switch",
    20: "multiple PCIe switches",
    30: "host bridge",
    40: "NUMA node",
    50: "across CPU sockets",
}


class DeviceManager:
    """Reads GPU facts through NVML; never initialises CUDA.

    Args:
        nvml: the NVML module to use; `pynvml` by default. Tests pass a fake one.
        env: environment to read `CUDA_VISIBLE_DEVICES` from; `os.environ` by default.
    """

    def __init__(self, nvml: Any = None, env: Mapping[str, str] | None = None):
        self._nvml = nvml
        self._env = os.environ if env is None else env

    def get_available_devices(self) -> list[GPUInfo]:
        """The GPUs a worker can use (after `CUDA_VISIBLE_DEVICES`); an empty list on a machine without one."""
        return self.snapshot().devices

    def snapshot(self, with_links: bool = True) -> GPUSnapshot:
        """Read devices, links and driver versions in one NVML session.

        Args:
            with_links: also query NVLink / P2P / topology for each pair (a few NVML calls per pair).
        """
        try:
            nvml = self._nvml or load_nvml()
            nvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded: no usable NVIDIA driver
            return GPUSnapshot(error=f"{type(exc).__name__}: {exc}")
        try:
            return self._read(nvml, with_links)
        except getattr(nvml, "NVMLError", Exception) as exc:  # e.g. driver/library version mismatch after an update
            return GPUSnapshot(error=f"{type(exc).__name__}: {exc}")
        finally:
            try:
                nvml.nvmlShutdown()
            except Exception:
                pass

    def _read(self, nvml: Any, with_links: bool) -> GPUSnapshot:
        snap = GPUSnapshot()
        snap.driver = _optional(lambda: _text(nvml.nvmlSystemGetDriverVersion()))
        cuda = _optional(nvml.nvmlSystemGetCudaDriverVersion)
        if cuda:
            snap.cuda_driver = f"{cuda // 1000}.{(cuda % 1000) // 10}"
        snap.physical_count = nvml.nvmlDeviceGetCount()
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(snap.physical_count)]
        uuids = [_optional(lambda h=h: _text(nvml.nvmlDeviceGetUUID(h))) or "" for h in handles]
        visible = visible_physical_indices(self._env.get("CUDA_VISIBLE_DEVICES"), snap.physical_count, uuids)
        for cuda_index, phys in enumerate(visible):
            try:
                snap.devices.append(_read_device(nvml, handles[phys], cuda_index, phys, uuids[phys]))
            except getattr(nvml, "NVMLError", Exception) as exc:  # one bad GPU; the others are still reported
                error = f"{type(exc).__name__}: {exc}"
                snap.devices.append(GPUInfo(cuda_index, phys, "(unreadable)", uuid=uuids[phys], error=error))
        if with_links:
            readable = [d for d in snap.devices if d.error is None]
            for i, a in enumerate(readable):
                for b in readable[i + 1 :]:
                    snap.links.append(_read_link(nvml, handles[a.physical_index], handles[b.physical_index], a, b))
        return snap


def _optional(fn: Any) -> Any:
    """Call an NVML query that some GPUs/drivers do not support; None instead of NVMLError_NotSupported."""
    try:
        return fn()
    except Exception:
        return None


def _read_device(nvml: Any, handle: Any, cuda_index: int, physical_index: int, uuid: str) -> GPUInfo:
    mem = nvml.nvmlDeviceGetMemoryInfo(handle)
    cc = _optional(lambda: nvml.nvmlDeviceGetCudaComputeCapability(handle))
    util = _optional(lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
    pci = _optional(lambda: nvml.nvmlDeviceGetPciInfo(handle))
    procs = _optional(lambda: nvml.nvmlDeviceGetComputeRunningProcesses(handle)) or []
    processes = []
    for p in procs:
        used = getattr(p, "usedGpuMemory", None)
        processes.append({"pid": p.pid, "used_gb": round(used / GIB, 2) if isinstance(used, int) else None})
    return GPUInfo(
        index=cuda_index,
        physical_index=physical_index,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        uuid=uuid,
        pci_bus_id=_text(pci.busId) if pci is not None else "",
        memory_total_gb=round(mem.total / GIB, 2),
        memory_free_gb=round(mem.free / GIB, 2),
        compute_capability=f"{cc[0]}.{cc[1]}" if cc else None,
        bf16=bool(cc and cc[0] >= 8),
        utilization_pct=util.gpu if util is not None else None,
        processes=processes,
    )


def _read_link(nvml: Any, ha: Any, hb: Any, a: GPUInfo, b: GPUInfo) -> GPULink:
    link = GPULink(a=a.index, b=b.index)
    # NVLink: count a's active links whose far end is b's PCI address.
    for n in range(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18)):
        try:
            if not nvml.nvmlDeviceGetNvLinkState(ha, n):
                continue
            remote = _text(nvml.nvmlDeviceGetNvLinkRemotePciInfo(ha, n).busId)
        except Exception:
            # NotSupported on the first link means no NVLink at all; later ones mean fewer links.
            if n == 0:
                break
            continue
        if b.pci_bus_id and remote.lower() == b.pci_bus_id.lower():
            link.nvlinks += 1
    status = _optional(lambda: nvml.nvmlDeviceGetP2PStatus(ha, hb, nvml.NVML_P2P_CAPS_INDEX_READ))
    if status is not None:
        link.p2p = status == nvml.NVML_P2P_STATUS_OK
    level = _optional(lambda: nvml.nvmlDeviceGetTopologyCommonAncestor(ha, hb))
    if level is not None:
        link.topology = _TOPOLOGY_LEVELS.get(int(level), f"level {int(level)}")
    return link


def count_gpus(env: Mapping[str, str] | None = None, nvml: Any = None) -> int:
    """Number of GPUs a worker may use: NVML's count filtered by `CUDA_VISIBLE_DEVICES`; 0 without a driver.

    Args:
        env: environment to read `CUDA_VISIBLE_DEVICES` from; `os.environ` by default.
        nvml: NVML module to use; `pynvml` by default.
    """
    return len(DeviceManager(nvml=nvml, env=env).snapshot(with_links=False).devices)


def detect_gpu_memory(env: Mapping[str, str] | None = None, nvml: Any = None) -> tuple[int, int | None]:
    """(number of visible NVIDIA GPUs, memory of the smallest in bytes) via NVML; (0, None) without a driver.

    Only the GPUs that `CUDA_VISIBLE_DEVICES` leaves visible count, as for `mgpu train`; one NVML cannot read
    counts (CUDA numbers it) but has no known memory. No CUDA context is created and torch is not imported.
    """
    devices = DeviceManager(nvml=nvml, env=env).snapshot(with_links=False).devices
    readable = [d for d in devices if d.error is None]
    return len(devices), (int(min(d.memory_total_gb for d in readable) * GIB) if readable else None)


def gpu_memory_bytes(env: Mapping[str, str] | None = None, nvml: Any = None) -> int | None:
    """Total memory of the smallest visible GPU in bytes (the generator plans for it); None without GPUs."""
    return detect_gpu_memory(env, nvml)[1]


def min_compute_capability(env: Mapping[str, str] | None = None, nvml: Any = None) -> str | None:
    """The lowest compute capability ("8.0") among the visible GPUs, via NVML; None without GPUs or when one is
    unreadable (then nothing can be promised about the kernels it runs)."""
    return lowest_capability(DeviceManager(nvml=nvml, env=env).snapshot(with_links=False).devices)


def lowest_capability(gpus: list[GPUInfo]) -> str | None:
    """The lowest of the GPUs' compute capabilities, compared as numbers ("10.0" > "9.0"); None without GPUs or
    when one is unknown."""
    found = [g.compute_capability for g in gpus]
    if not found or None in found:
        return None
    return min(found, key=lambda cc: tuple(int(part) for part in cc.split(".")))  # type: ignore[union-attr]
