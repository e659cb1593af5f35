"""A fake NVML module: describes GPUs, NVLink and P2P at the library edge, for tests on GPU-less machines."""

from __future__ import annotations

from types import SimpleNamespace

GIB = 1024**3


class FakeNVMLError(Exception):
    pass


class FakeNVML:
    """Answers the NVML calls devices.py makes, for a machine described by `gpus` and `nvlinks`.

    Args:
        gpus: dicts with name, uuid, bus, total_gib, free_gib, cc, util, pids.
        nvlinks: {(physical a, physical b): number of links}; P2P is OK for linked pairs and `p2p_pairs`.
    """

    NVML_NVLINK_MAX_LINKS = 18
    NVML_P2P_CAPS_INDEX_READ = 0
    NVML_P2P_STATUS_OK = 0
    NVML_P2P_STATUS_NOT_SUPPORTED = 5

    def __init__(self, gpus, nvlinks=None, p2p_pairs=(), fail_init=False, lost=()):
        self.gpus = gpus
        self.nvlinks = nvlinks or {}
        self.p2p_pairs = set(p2p_pairs)
        self.fail_init = fail_init
        self.lost = set(lost)  # physical indices whose queries fail, as NVML answers for a GPU that fell off the bus
        self.initialised = 0

    def nvmlInit(self):
        if self.fail_init:
            raise FakeNVMLError("NVML Shared Library Not Found")
        self.initialised += 1

    def nvmlShutdown(self):
        self.initialised -= 1

    def nvmlSystemGetDriverVersion(self):
        return "580.95.05"

    def nvmlSystemGetCudaDriverVersion(self):
        return 13000

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUUID(self, h):
        return self.gpus[h]["uuid"]

    def nvmlDeviceGetName(self, h):
        return self.gpus[h]["name"].encode()  # older nvidia-ml-py returns bytes

    def nvmlDeviceGetMemoryInfo(self, h):
        if h in self.lost:
            raise FakeNVMLError("GPU is lost")
        g = self.gpus[h]
        return SimpleNamespace(total=int(g["total_gib"] * GIB), free=int(g["free_gib"] * GIB))

    def nvmlDeviceGetCudaComputeCapability(self, h):
        return self.gpus[h]["cc"]

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=self.gpus[h].get("util", 0), memory=0)

    def nvmlDeviceGetPciInfo(self, h):
        return SimpleNamespace(busId=self.gpus[h]["bus"])

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [SimpleNamespace(pid=p, usedGpuMemory=2 * GIB) for p in self.gpus[h].get("pids", [])]

    def _peers(self, h):
        peers = []
        for (a, b), n in self.nvlinks.items():
            if h in (a, b):
                peers += [b if h == a else a] * n
        return peers

    def nvmlDeviceGetNvLinkState(self, h, link):
        if not self.nvlinks:
            raise FakeNVMLError("Not Supported")
        return 1 if link < len(self._peers(h)) else 0

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h, link):
        return SimpleNamespace(busId=self.gpus[self._peers(h)[link]]["bus"].lower())

    def nvmlDeviceGetP2PStatus(self, ha, hb, cap):
        pair = (min(ha, hb), max(ha, hb))
        ok = pair in self.nvlinks or pair in self.p2p_pairs
        return self.NVML_P2P_STATUS_OK if ok else self.NVML_P2P_STATUS_NOT_SUPPORTED

    def nvmlDeviceGetTopologyCommonAncestor(self, ha, hb):
        return 0 if (min(ha, hb), max(ha, hb)) in self.nvlinks else 50


def h200(i, **kw):
    g = {"name": "NVIDIA H200", "uuid": f"GPU-{i}aaa-{i}", "bus": f"00000000:{i + 0x18:02X}:00.0",
         "total_gib": 140.0, "free_gib": 139.5, "cc": (9, 0), "util": 0}  # fmt: skip
    g.update(kw)
    return g
