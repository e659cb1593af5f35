"""Memory management for the Python API: live use per device, an OOM pre-flight check, and clean-up.

    mm = unsloth_multigpu.MemoryManager()
    mm.check_fits("8B", seq_len=2048, micro_batch_size=4, method="qlora")   # raises before loading if too big
    with mm.phase("train"):
        trainer.train()
    print(mm.get_memory_usage(), mm.history)

Live readings come from the best source this process may use: torch's allocator in a worker that owns a
GPU (no new CUDA context is created when torch has not initialised CUDA), NVML otherwise (the launching
process never touches CUDA), and the process RSS / system RAM on CPU. The pre-flight check compares the
forecast behind `mgpu suggest` (`memory.estimate`) with the memory actually free now.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import time
from collections.abc import Iterator
from typing import Any

from .errors import Problem, UserError, is_number, is_whole
from .memory import METHODS, OPTIMIZERS, GiB, Method, TrainingSetup, estimate, resolve_architecture


class OutOfMemoryRisk(UserError):
    """The forecast peak does not fit in the memory that is free on some device."""


class MemoryManager:
    """Monitor memory, refuse set-ups that would run out of it, and release cached memory between phases.

    Args:
        memory_fraction: share of the free memory a forecast may use in `check_fits` (headroom for
            fragmentation and other processes).
        nvml: NVML module to use (tests pass a fake); `pynvml` by default.
    """

    def __init__(self, memory_fraction: float = 0.9, nvml: Any = None):
        if not (is_number(memory_fraction) and 0 < memory_fraction <= 1):
            raise ValueError(f"memory_fraction must be a number in (0, 1], e.g. 0.9; got {memory_fraction!r}")
        self.memory_fraction = memory_fraction
        self._nvml = nvml
        self.history: list[dict[str, Any]] = []

    # -- live readings ---------------------------------------------------------------------------------
    def get_memory_usage(self) -> list[dict[str, Any]]:
        """One entry per device this process can see: device, source, used/free/total bytes (+ torch peaks).

        Sources: "torch" (a process that has initialised CUDA: allocated, reserved and peak allocated of
        its own GPU), "nvml" (every visible GPU, whole-device use), "psutil" (no GPU: this process's RSS
        and the host's RAM).
        """
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            out = []
            for i in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(i)
                out.append(
                    {
                        "device": f"cuda:{i}",
                        "source": "torch",
                        "used_bytes": total - free,
                        "free_bytes": free,
                        "total_bytes": total,
                        "allocated_bytes": torch.cuda.memory_allocated(i),
                        "reserved_bytes": torch.cuda.memory_reserved(i),
                        "peak_allocated_bytes": torch.cuda.max_memory_allocated(i),
                    }
                )
            return out
        gpus = self._nvml_usage()
        if gpus:
            return gpus
        import psutil

        vm = psutil.virtual_memory()
        return [
            {
                "device": "cpu",
                "source": "psutil",
                "used_bytes": psutil.Process().memory_info().rss,
                "free_bytes": vm.available,
                "total_bytes": vm.total,
            }
        ]

    def _nvml_usage(self) -> list[dict[str, Any]]:
        """Every visible GPU's memory through NVML (`devices.DeviceManager`); a GPU NVML cannot read is left out."""
        from .devices import GIB, DeviceManager

        out = []
        for d in DeviceManager(nvml=self._nvml).snapshot(with_links=False).devices:
            if d.error is None:
                total, free = int(d.memory_total_gb * GIB), int(d.memory_free_gb * GIB)
                out.append(
                    {
                        "device": f"cuda:{d.index}",
                        "source": "nvml",
                        "used_bytes": total - free,
                        "free_bytes": free,
                        "total_bytes": total,
                    }
                )
        return out

    # -- pre-flight ------------------------------------------------------------------------------------
    def forecast(
        self,
        model: str,
        seq_len: int = 2048,
        micro_batch_size: int = 1,
        method: Method = "qlora",
        gradient_checkpointing: Any = "unsloth",
        optimizer: str = "adamw_8bit",
        lora_r: int = 16,
        num_gpus: int = 1,
        gpu_memory_bytes: int | None = None,
    ) -> Any:
        """The per-GPU peak forecast (`memory.MemoryBreakdown`) for `model` (a size like "8B", a folder or hub id).

        `gpu_memory_bytes` (one GPU's memory) sizes Unsloth's cross-entropy chunks, as `ConfigManager` and
        `mgpu suggest` do; None assumes plenty.

        Raises:
            UserError: a count that is not a positive integer, an unknown method or optimizer (each named).
        """
        counts = {"seq_len": seq_len, "micro_batch_size": micro_batch_size, "lora_r": lora_r, "num_gpus": num_gpus}
        problems = [Problem(k, f"expected a positive integer, found {v!r}") for k, v in counts.items()
                    if not (is_whole(v) and v >= 1)]  # fmt: skip
        if method not in METHODS:
            problems.append(Problem("method", f"expected qlora, lora or full, found {method!r}"))
        if optimizer not in OPTIMIZERS:
            problems.append(Problem("optimizer", f"expected adamw, adamw_8bit or sgd, found {optimizer!r}"))
        if not (isinstance(gradient_checkpointing, bool) or gradient_checkpointing == "unsloth"):
            problems.append(
                Problem(
                    "gradient_checkpointing",
                    f"expected True, False or 'unsloth' (as Unsloth's use_gradient_checkpointing), "
                    f"found {gradient_checkpointing!r}",
                )
            )
        if problems:
            raise UserError(problems, "invalid arguments")
        arch = resolve_architecture(str(model), where="model")
        setup = TrainingSetup(
            method=method,
            seq_len=seq_len,
            micro_batch_size=micro_batch_size,
            gradient_checkpointing=gradient_checkpointing,
            optimizer=optimizer,
            lora_r=lora_r,
            num_gpus=num_gpus,
            gpu_memory_bytes=gpu_memory_bytes,
        )
        return estimate(arch, setup)

    def check_fits(
        self,
        model: str,
        seq_len: int = 2048,
        micro_batch_size: int = 1,
        method: Method = "qlora",
        gradient_checkpointing: Any = "unsloth",
        optimizer: str = "adamw_8bit",
        lora_r: int = 16,
        num_gpus: int = 1,
        available_bytes: int | None = None,
    ) -> Any:
        """Refuse, before anything is loaded, a set-up whose forecast peak exceeds the free memory.

        Args:
            available_bytes: memory to compare against; None: the least free memory over the devices
                `get_memory_usage` reports (GPU when there is one, host RAM otherwise).

        Returns:
            The `MemoryBreakdown` when it fits.

        Raises:
            OutOfMemoryRisk: it does not fit; the message gives forecast, budget and what to change.
        """
        if available_bytes is not None and not (is_number(available_bytes) and available_bytes > 0):
            raise UserError(
                Problem(
                    "available_bytes",
                    f"expected a positive number of bytes, found {available_bytes!r}",
                    "e.g. 24 * 2**30 for 24 GB; or leave it out to use the free memory measured now",
                ),
                "invalid arguments",
            )
        if available_bytes is not None and available_bytes < 2**20:
            raise UserError(
                Problem(
                    "available_bytes",
                    f"{available_bytes!r} bytes is less than 1 MiB: the value is in bytes, not GB",
                    f"available_bytes={available_bytes} * 2**30 for {available_bytes} GB",
                ),
                "invalid arguments",
            )
        if available_bytes is None:
            device = min(self.get_memory_usage(), key=lambda d: d["free_bytes"])
            available_bytes, gpu_memory = device["free_bytes"], device["total_bytes"]
        else:
            gpu_memory = int(available_bytes)  # as get_optimal_config's available_memory: one GPU's memory
        breakdown = self.forecast(
            model, seq_len, micro_batch_size, method, gradient_checkpointing, optimizer, lora_r, num_gpus, gpu_memory
        )
        budget = int(available_bytes * self.memory_fraction)
        if breakdown.peak > budget:
            hint = (
                "lower micro_batch_size or seq_len"
                + (", use method='qlora'" if method != "qlora" else "")
                + (", turn gradient checkpointing on ('unsloth')" if gradient_checkpointing is False else "")
                + "; `mgpu suggest` finds settings that fit"
            )
            raise OutOfMemoryRisk(
                Problem(
                    "memory",
                    f"{model} ({method}, seq_len {seq_len}, micro-batch "
                    f"{micro_batch_size}) needs about {breakdown.peak / GiB:.1f} GB per GPU; "
                    f"{budget / GiB:.1f} GB usable ({self.memory_fraction:.0%} of "
                    f"{available_bytes / GiB:.1f} GB free)",
                    hint,
                ),
                "would run out of memory",
            )
        return breakdown

    # -- clean-up --------------------------------------------------------------------------------------
    def cleanup(self) -> dict[str, Any]:
        """Collect Python garbage and return the CUDA caching allocator's unused blocks to the driver.

        Returns:
            collected (objects freed by gc) and released_bytes (reserved CUDA memory given back; 0 on CPU).
        """
        collected = gc.collect()
        released = 0
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            before = torch.cuda.memory_reserved()
            torch.cuda.empty_cache()
            released = before - torch.cuda.memory_reserved()
        return {"collected": collected, "released_bytes": released}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Record the memory of a phase (load, train, evaluate...) and clean up when it ends.

        Appends {phase, seconds, peak_allocated_bytes (CUDA) or peak_rss_bytes and rss_bytes (CPU: the
        process's resident memory at its highest during the phase, and at its end), collected, released_bytes}
        to `history`. On Linux a CPU phase starts a new high-water mark for the whole process (VmHWM, which
        `resource.getrusage`'s ru_maxrss also reads).
        """
        torch = sys.modules.get("torch")
        cuda = torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            _reset_peak_rss()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            row: dict[str, Any] = {"phase": name, "seconds": time.perf_counter() - t0}
            if cuda:
                row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
            else:
                import psutil

                row["rss_bytes"] = psutil.Process().memory_info().rss
                row["peak_rss_bytes"] = max(_peak_rss(), row["rss_bytes"])
            row.update(self.cleanup())
            self.history.append(row)


def _reset_peak_rss() -> None:
    """Start a new high-water mark of resident memory (Linux: `5` to /proc/self/clear_refs resets VmHWM)."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def _peak_rss() -> int:
    """Highest resident memory since the last reset (Linux's VmHWM), else over the process's life (ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
