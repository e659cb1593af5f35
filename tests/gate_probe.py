"""Run by tests/test_reliability.py in a subprocess (it forks: not from pytest's process): a DataGate whose child
tokenises with a pool of 2 processes gets Ctrl-C, and then at once the launcher's close() (SIGTERM), as when the
workers stopped before the child did. Prints the child's pool processes still running afterwards, as JSON.

    python tests/gate_probe.py DATA.jsonl
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import psutil

from unsloth_mgpu_cli import data
from unsloth_mgpu_cli.datagate import DataGate
from unsloth_mgpu_cli.models import resolve_model_path
from unsloth_mgpu_cli.recipe import load_recipe


def main() -> None:
    quickstart = os.path.join(os.path.dirname(__file__), "..", "recipes", "quickstart.yaml")
    recipe = load_recipe(quickstart, [f"dataset.path={sys.argv[1]}", "dataset.num_proc=2"]).recipe
    model_path = resolve_model_path(recipe.model.name)
    gate = DataGate.start(lambda: data.prepare(recipe, model_path) and None)
    child = psutil.Process(gate.pid)
    deadline = time.monotonic() + 120
    while len(child.children()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    pool = child.children()
    time.sleep(1.0)  # the pool's processes past their start (they ignore SIGINT from then on)
    os.kill(gate.pid, signal.SIGINT)  # Ctrl-C reaches the child...
    time.sleep(0.05)
    gate.close()  # ...and the launcher, whose workers stopped first, ends it
    time.sleep(2.0)
    left = [p.pid for p in pool if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    print(json.dumps({"pool": len(pool), "left": left}))


if __name__ == "__main__":
    main()
