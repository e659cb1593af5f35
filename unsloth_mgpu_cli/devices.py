"""GPU facts through NVML (pynvml), never initialising CUDA in the calling process."""

from __future__ import annotations

import os


def _visible_indices(total: int) -> list[int]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(range(total))
    out = []
    for part in visible.split(","):
        part = part.strip()
        if part.isdigit() and int(part) < total:
            out.append(int(part))
        elif part:
            break  # CUDA stops at the first invalid entry (UUIDs are not resolved here)
    return out


def count_gpus() -> int:
    """GPUs this process may use (honours CUDA_VISIBLE_DEVICES); 0 without a driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return len(_visible_indices(pynvml.nvmlDeviceGetCount()))
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return 0


def gpu_memory_bytes() -> int | None:
    """Total memory of the smallest visible GPU, or None without GPUs."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            idx = _visible_indices(pynvml.nvmlDeviceGetCount())
            if not idx:
                return None
            return min(int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).total) for i in idx)
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None
