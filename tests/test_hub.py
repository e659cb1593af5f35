"""A machine that cannot resolve the hub's name (a compute node, an air-gapped host), downloads left on: hub ids
load from the cache at once, and what the cache lacks is refused at once naming the key. Before, each load waited
out the hub client's retries: 75 s for the tokenizer of a cached model, 50 s to refuse an uncached one."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, mgpu_env, run_mgpu

from unsloth_mgpu_cli import hub

NO_HUB = "https://no-such-host.invalid"  # .invalid never resolves (RFC 2606)


def test_downloads_switch_off_only_for_hub_ids_and_only_when_the_hub_does_not_resolve(tmp_path, capsys):
    env = {"HF_ENDPOINT": NO_HUB}
    assert hub.work_offline_if_unreachable(["builtin:tiny-llama", str(tmp_path), None], env) is None
    assert env == {"HF_ENDPOINT": NO_HUB}  # nothing loads from the hub: nothing switched, nothing said
    assert capsys.readouterr().err == ""
    assert hub.work_offline_if_unreachable(["org/model"], env) == "no-such-host.invalid"
    assert {k: env[k] for k in hub.OFFLINE_VARIABLES} == dict.fromkeys(hub.OFFLINE_VARIABLES, "1")
    assert env[hub.UNRESOLVED] == "no-such-host.invalid"
    assert "hub: no-such-host.invalid does not resolve" in capsys.readouterr().err
    assert hub.offline({"HF_HUB_OFFLINE": "true"}) and not hub.offline({"HF_HUB_OFFLINE": "0"})  # as HF reads it
    unknown = {"HF_ENDPOINT": NO_HUB}  # names not known (a hook-mode script): any load may go to the hub
    assert hub.work_offline_if_unreachable(None, unknown) == "no-such-host.invalid" and unknown["HF_HUB_OFFLINE"] == "1"
    # the controls: a hub whose name resolves; the user's own offline setting (either way); a proxy, where the
    # name need not resolve on this machine
    for extra in ({"HF_ENDPOINT": "http://localhost:8080"}, {"HF_HUB_OFFLINE": "0"}, {"HTTPS_PROXY": "http://p:3128"}):
        env = {"HF_ENDPOINT": NO_HUB, **extra}
        assert hub.work_offline_if_unreachable(["org/model"], env) is None and hub.UNRESOLVED not in env, extra


def _hub_cache_with(model_path: str, repo_id: str, root: Path) -> Path:
    """An HF hub cache holding `repo_id` as a download would leave it (refs/main -> one snapshot)."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(model_path, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return root


@pytest.mark.integration
def test_a_cached_hub_model_trains_at_once_and_an_uncached_one_is_refused_at_once(tmp_path, model_path):
    env = mgpu_env(HF_HUB_CACHE=str(_hub_cache_with(model_path, "someone/tiny", tmp_path / "hub")), HF_ENDPOINT=NO_HUB)
    for name in hub.OFFLINE_VARIABLES:
        env.pop(name)
    out = tmp_path / "run"
    proc = run_mgpu(
        "train",
        str(ROOT / "recipes" / "quickstart.yaml"),
        "model.name=someone/tiny",
        "training.max_steps=2",
        "training.warmup_steps=0",
        f"output.dir={out}",
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hub: no-such-host.invalid does not resolve from this machine" in proc.stderr
    assert "Retrying" not in proc.stdout + proc.stderr  # not one hub request was waited out
    # the adapter's save asks the hub nothing either (peft's check of the base model's vocabulary)
    assert "Could not find a config file" not in proc.stdout + proc.stderr
    assert (out / "adapter" / "adapter_config.json").is_file()
    proc = run_mgpu("export", str(out), env=env, timeout=300)  # loads the base model from the cache as well
    assert proc.returncode == 0 and "does not resolve" in proc.stderr, proc.stderr[-3000:]
    assert "Retrying" not in proc.stdout + proc.stderr and (out / "merged" / "config.json").is_file()
    proc = run_mgpu(
        "prepare", str(ROOT / "recipes" / "quickstart.yaml"), "model.name=someone/not-here", env=env, timeout=300
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "model.name (someone/not-here)" in proc.stderr
    assert (
        "not in the Hugging Face cache, and the hub's host name (no-such-host.invalid) does not resolve" in proc.stderr
    )


def test_hook_mode_workers_load_from_the_cache_when_the_hub_does_not_resolve(tmp_path):
    """A hook-mode script runs again in each worker, its model and data loads included: the launching call switches
    downloads off for them (the names it will load are not known; nothing could download anyway)."""
    script = tmp_path / "train.py"
    script.write_text(
        "import os, unsloth_multigpu\n"
        "info = unsloth_multigpu.dist_info()\n"
        "if info is None:\n"
        "    unsloth_multigpu.enable_multi_gpu(num_gpus=2, device='cpu')  # never returns\n"
        "env = os.environ\n"
        "print('WORKER', info.rank, env.get('HF_HUB_OFFLINE'), env.get('MGPU_HUB_UNRESOLVED'), flush=True)\n"
    )
    env = mgpu_env(HF_ENDPOINT=NO_HUB, MGPU_LOG_DIR=str(tmp_path / "logs"), OMP_NUM_THREADS="1")
    for name in hub.OFFLINE_VARIABLES:
        env.pop(name)
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "WORKER 0 1 no-such-host.invalid" in proc.stdout, proc.stdout[-2000:]
    assert "hub: no-such-host.invalid does not resolve from this machine" in proc.stderr
