"""Opt-in torch profiler around a few optimizer steps of `mgpu train` (issue #11: find what costs time).

    MGPU_PROFILE=/tmp/prof:30:33 mgpu train recipe.yaml      # profile steps 30..33 (1-based, inclusive)

Each rank writes `profile-rank<R>.txt` into the folder: wall time of the profiled steps, how much of it the GPU
was busy (sum of kernel times), and the operators sorted by device time and by host time. With `:trace` appended
(`MGPU_PROFILE=/tmp/prof:30:33:trace`) each rank also writes a gzipped Chrome trace (open it in Perfetto).
Unset (the default) the engine does nothing extra.
"""

from __future__ import annotations

import gzip
import os
import shutil
import time
from pathlib import Path
from typing import Any


class StepProfiler:
    """Starts `torch.profiler` after step `first - 1` and writes the report after step `last`."""

    def __init__(self, folder: Path, first: int, last: int, rank: int, trace: bool = False):
        self.folder, self.first, self.last, self.rank, self.trace = Path(folder), first, last, rank, trace
        self._prof: Any = None
        self._t0 = 0.0

    @classmethod
    def from_env(cls, rank: int, value: str | None = None) -> StepProfiler | None:
        value = os.environ.get("MGPU_PROFILE", "") if value is None else value
        if not value:
            return None
        parts = value.split(":")
        try:
            first, last = (int(parts[1]), int(parts[2])) if len(parts) >= 3 else (10, 12)
        except ValueError:
            raise ValueError(
                f"MGPU_PROFILE={value!r}: expected DIR[:FIRST:LAST[:trace]], e.g. /tmp/prof:30:33"
            ) from None
        return cls(Path(parts[0]), max(1, first), max(first, last), rank, trace=parts[-1] == "trace")

    def after_step(self, step: int) -> None:
        """Call after each optimizer step with the number of steps done so far."""
        import torch

        if step == self.first - 1 and self._prof is None:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.synchronize()
            self._prof = torch.profiler.profile(activities=acts, record_shapes=True)
            self._prof.__enter__()
            self._t0 = time.perf_counter()
        elif step == self.last and self._prof is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = time.perf_counter() - self._t0
            self._prof.__exit__(None, None, None)
            self._write(wall)
            self._prof = None

    def _write(self, wall: float) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        events = self._prof.key_averages()
        # kernels only: aten ops and the "## Call CompiledFxGraph" annotations also carry their kernels' time
        device_us = sum(
            _self_device_us(e)
            for e in events
            if str(getattr(e, "device_type", "")).endswith("CUDA") and not getattr(e, "is_user_annotation", False)
        )
        steps = self.last - self.first + 1
        lines = [
            f"steps {self.first}..{self.last} ({steps}): wall {wall * 1e3:.1f} ms ({wall * 1e3 / steps:.1f} ms/step); "
            f"GPU kernels {device_us / 1e3:.1f} ms ({device_us / 1e3 / steps:.1f} ms/step, "
            f"{device_us / 1e6 / max(wall, 1e-9):.0%} of wall)",
            "",
            "== by device time ==",
            events.table(sort_by="self_cuda_time_total", row_limit=45),
            "",
            "== by host time ==",
            events.table(sort_by="cpu_time_total", row_limit=45),
        ]
        (self.folder / f"profile-rank{self.rank}.txt").write_text("\n".join(lines))
        if self.trace:
            raw = self.folder / f"trace-rank{self.rank}.json"
            self._prof.export_chrome_trace(str(raw))
            with raw.open("rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            raw.unlink()


def _self_device_us(event: Any) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):  # renamed in torch 2.4+
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0
