"""MGPU_PROFILE: the opt-in step profiler writes a report for exactly the steps asked for."""

from __future__ import annotations

import pytest
import torch

from unsloth_mgpu_cli.profiling import StepProfiler


def test_profiler_reports_the_requested_steps(tmp_path):
    prof = StepProfiler.from_env(rank=1, value=f"{tmp_path}:3:4:trace")
    model = torch.nn.Linear(32, 32)
    for step in range(1, 7):
        model(torch.randn(4, 32)).sum().backward()
        if step == 4:
            assert prof._prof is not None  # recording during steps 3..4
        prof.after_step(step)
    report = (tmp_path / "profile-rank1.txt").read_text()
    assert report.startswith("steps 3..4 (2): wall ")
    assert "aten::addmm" in report or "aten::linear" in report  # the operators of the profiled steps
    assert (tmp_path / "trace-rank1.json.gz").stat().st_size > 0
    assert prof._prof is None  # stopped after step 4: later steps run unprofiled


def test_profiler_is_off_unless_asked(monkeypatch):
    monkeypatch.delenv("MGPU_PROFILE", raising=False)
    assert StepProfiler.from_env(rank=0) is None
    with pytest.raises(ValueError, match="expected DIR"):
        StepProfiler.from_env(rank=0, value="/tmp/x:a:b")
