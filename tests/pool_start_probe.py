"""Run by tests/test_reliability.py: a Ctrl-C reaches a tokenising pool's processes while they start. Their start is
slowed (2 s before the pool's initializer runs), so that the signal lands before they ignore SIGINT; it is sent to
them alone, so that the parent's own stop (tested elsewhere) cannot end them first. Prints how prepare ended
("done", or the exception's name), then the pool processes still running, as JSON.

    python tests/pool_start_probe.py DATA.jsonl
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import psutil

from unsloth_mgpu_cli import data
from unsloth_mgpu_cli.models import resolve_model_path
from unsloth_mgpu_cli.recipe import load_recipe

real_init = data._init_worker


def slow_start(*args: object) -> None:  # a pool process slow to reach its initializer (a loaded machine)
    time.sleep(2.0)
    real_init(*args)


def ctrl_c_once_the_pool_forks(seen: list[int]) -> None:
    me = psutil.Process()
    while len(me.children()) < 2:
        time.sleep(0.01)
    seen.extend(c.pid for c in me.children())
    for pid in seen:
        os.kill(pid, signal.SIGINT)


def main() -> None:
    quickstart = os.path.join(os.path.dirname(__file__), "..", "recipes", "quickstart.yaml")
    recipe = load_recipe(quickstart, [f"dataset.path={sys.argv[1]}", "dataset.num_proc=2"]).recipe
    model_path = resolve_model_path(recipe.model.name)
    data._init_worker = slow_start
    pool: list[int] = []
    threading.Thread(target=ctrl_c_once_the_pool_forks, args=(pool,), daemon=True).start()
    try:
        data.prepare(recipe, model_path)
        print("done")
    except Exception as exc:  # a pool process that died: BrokenProcessPool
        print(type(exc).__name__)
    time.sleep(0.5)
    left = [p for p in pool if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    print(json.dumps({"pool": len(pool), "left": left}), flush=True)


if __name__ == "__main__":
    main()
