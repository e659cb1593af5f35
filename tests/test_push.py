"""`mgpu push`: a run's adapter (or GGUF files) reaches a hub repo in one commit, with a card and no local path.

The hub is the edge: tests/fake_hub.py answers huggingface_hub's real requests on 127.0.0.1 (HF_ENDPOINT), so the
client, its commit format and our error handling all run for real.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import mgpu_env, run_mgpu
from fake_hub import TOKEN, FakeHub

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("push") / "gsm-lora"
    proc = run_mgpu(
        "train", "recipes/quickstart.yaml", "training.max_steps=2", "training.warmup_steps=0", f"output.dir={out}"
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out


def push(hub: FakeHub, *args: str, token: str | None = TOKEN, home: Path | None = None, **extra: str):
    env = mgpu_env(**{"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", **extra})
    env.pop("HF_TOKEN", None)
    if token is not None:
        env["HF_TOKEN"] = token
    if home is not None:
        env["HF_HOME"] = str(home)  # no stored `hf auth login` token there
    return run_mgpu("push", *args, env=env, timeout=120)


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_the_adapter_arrives_whole_with_a_card_and_no_local_path(run):
    with FakeHub() as hub:
        proc = push(hub, str(run), "me/gsm-lora")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"pushed: {hub.url}/me/gsm-lora/commit/" in proc.stdout
        pushed = hub.repos["me/gsm-lora"]["branches"]["main"]
        expected = {k: v for k, v in files_of(run / "adapter").items() if k != "README.md"}
        assert {k: v for k, v in pushed.items() if k != "README.md"} == expected  # byte for byte, no file more
        assert "adapter_model.safetensors" in pushed and "adapter_config.json" in pushed
        card = pushed["README.md"].decode()
        # peft's card names the base by its local path; ours does not publish this machine's folders
        assert str(Path.home()) in (run / "adapter" / "README.md").read_text()
        assert str(Path.home()) not in card and str(run.parent) not in card and "base_model:" not in card
        assert card.startswith("---\nlibrary_name: peft\n") and "- unsloth-mgpu" in card and "| steps | 2 |" in card
        assert hub.repos["me/gsm-lora"]["private"] is False
        assert TOKEN not in proc.stdout + proc.stderr
        # again, to a branch of the now existing repo (the hub answers 409 to the create; that is no error)
        proc = push(hub, str(run), "me/gsm-lora", "--revision", "try-2", "--private", "-m", "second")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert set(hub.repos["me/gsm-lora"]["branches"]["try-2"]) == set(pushed)


def test_gguf_files_alone_go_to_the_repo(run):
    proc = run_mgpu("export", str(run), "--format", "gguf", "--quant", "f16", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with FakeHub() as hub:
        proc = push(hub, str(run), "me/gsm-gguf", "--what", "gguf")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        pushed = hub.repos["me/gsm-gguf"]["branches"]["main"]
        gguf = {p.name: p.read_bytes() for p in (run / "gguf").glob("*.gguf")}
        assert {k: v for k, v in pushed.items() if k != "README.md"} == gguf and len(gguf) == 1
        assert "library_name: gguf" in pushed["README.md"].decode()


@pytest.mark.parametrize(
    ("args", "extra", "message"),
    [
        (["me/x", "--what", "merged"], {}, "holds no merged to push"),
        (["me/x", "--what", "everything"], {}, "expected one of adapter, merged, gguf, found 'everything'"),
        (["a/b/c"], {}, "argument REPO_ID"),
        (["me/x"], {"token": None}, "none found (HF_TOKEN is unset and `hf auth login` was not run)"),
        (["me/x"], {"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE: is set: pushing needs the hub"),
    ],
)
def test_what_cannot_be_pushed_exits_2_before_any_request(run, tmp_path, args, extra, message):
    with FakeHub() as hub:
        proc = push(hub, str(run), *args, home=tmp_path, **extra)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert hub.requests == []


def test_a_folder_that_holds_no_run_is_refused(tmp_path):
    with FakeHub() as hub:
        proc = push(hub, str(tmp_path), "me/x")
    assert proc.returncode == 2 and "holds no mgpu run" in proc.stderr and hub.requests == []


def test_a_refused_token_exits_2_and_is_not_shown(run):
    with FakeHub() as hub:
        proc = push(hub, str(run), "me/x", token="hf_not_the_right_one_0123456789")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "the hub refused it for me/x (HTTP 401)" in proc.stderr and "write access" in proc.stderr
    assert "hf_not_the_right_one" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


def test_a_hub_fault_exits_1_and_leaves_the_repo_without_the_files(run):
    with FakeHub(fail_commits=100) as hub:
        proc = push(hub, str(run), "me/x")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "the hub did not take the upload" in proc.stderr and "run the same command again" in proc.stderr
        assert hub.repos["me/x"]["branches"]["main"] == {}  # one commit: all files or none
    assert os.path.isfile(run / "adapter" / "adapter_model.safetensors")


def test_a_full_fine_tune_pushes_its_model_folder_as_merged(tmp_path):
    """A full fine-tune has no adapter and no `mgpu export` (its model/ already is the HF model): --what merged
    takes model/, and --what adapter says so."""
    out = tmp_path / "full"
    proc = run_mgpu(
        "train", "recipes/quickstart.yaml", "lora=null", "training.max_steps=1", "training.warmup_steps=0",
        f"output.dir={out}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with FakeHub() as hub:
        proc = push(hub, str(out), "me/full")
        assert proc.returncode == 2 and "a full fine-tune's weights (model/) go with --what merged" in proc.stderr
        proc = push(hub, str(out), "me/full", "--what", "merged")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        pushed = hub.repos["me/full"]["branches"]["main"]
        expected = {k: v for k, v in files_of(out / "model").items() if k != "README.md"}
        assert {k: v for k, v in pushed.items() if k != "README.md"} == expected and "config.json" in pushed


# ---------------------------------------------------------------------------------------------------
# output.push_to_hub: the same push at the end of `mgpu train`
# ---------------------------------------------------------------------------------------------------


def train_and_push(hub: FakeHub, out: Path, *overrides: str, token: str | None = TOKEN, home: Path | None = None):
    env = mgpu_env(**{"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"})
    env.pop("HF_TOKEN", None)
    if token is not None:
        env["HF_TOKEN"] = token
    if home is not None:
        env["HF_HOME"] = str(home)
    args = ("recipes/quickstart.yaml", "training.max_steps=1", "training.warmup_steps=0", f"output.dir={out}")
    return run_mgpu("train", *args, *overrides, env=env, timeout=400)


def test_a_recipe_pushes_its_adapter_to_a_private_repo_when_training_ends(tmp_path):
    with FakeHub() as hub:
        proc = train_and_push(hub, tmp_path / "run", "output.push_to_hub.repo_id=me/at-the-end")
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out
        assert f"pushed: {hub.url}/me/at-the-end/commit/" in proc.stdout
        repo = hub.repos["me/at-the-end"]
        assert repo["private"] is True  # unlike `mgpu push`, a recipe's repo is private unless it says otherwise
        adapter = {k: v for k, v in files_of(tmp_path / "run" / "adapter").items() if k != "README.md"}
        assert {k: v for k, v in repo["branches"]["main"].items() if k != "README.md"} == adapter
        assert TOKEN not in out and TOKEN not in (tmp_path / "run" / "recipe.resolved.yaml").read_text()
        assert "repo_id: me/at-the-end" in (tmp_path / "run" / "recipe.resolved.yaml").read_text()


def test_a_hub_fault_after_training_keeps_the_run_and_prints_the_command_that_retries(tmp_path):
    with FakeHub(fail_commits=100) as hub:
        proc = train_and_push(hub, tmp_path / "run", "output.push_to_hub.repo_id=me/later")
        err = proc.stderr
        assert proc.returncode == 1, proc.stdout + err
        assert "push failed" in err and "Traceback" not in err
        assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
        again = f"mgpu push {tmp_path / 'run'} me/later --what adapter --private"
        assert again in err, err
    with FakeHub() as hub:  # the printed command, once the hub answers again
        proc = push(hub, *again.split()[2:])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert (
            hub.repos["me/later"]["private"] is True
            and "adapter_model.safetensors" in hub.repos["me/later"]["branches"]["main"]
        )


@pytest.mark.parametrize(
    ("overrides", "token", "where", "message"),
    [
        (["output.push_to_hub.repo_id=me/x"], None, "hub token", "none found"),
        (
            ["output.push_to_hub.repo_id=me/x", "output.push_to_hub.what=gguf"],
            TOKEN,
            "output.push_to_hub.what",
            "add gguf to output.export",
        ),
        (
            [
                "output.push_to_hub.repo_id=me/x",
                "output.push_to_hub.what=adapter",
                "lora=null",
                "model.load_in_4bit=false",
            ],
            TOKEN,
            "output.push_to_hub.what",
            "saves no adapter",
        ),
        (["output.push_to_hub.repo_id=-bad-"], TOKEN, "output.push_to_hub.repo_id", "repo_id"),
        (["output.push_to_hub.repo=me/x"], TOKEN, "output.push_to_hub", "repo_id"),
    ],
)
def test_a_push_that_would_be_refused_is_refused_before_training(tmp_path, overrides, token, where, message):
    with FakeHub() as hub:
        proc = train_and_push(hub, tmp_path / "run", *overrides, token=token, home=tmp_path / "home")
        assert hub.requests == [] and not hub.repos  # nothing reached the hub
    err = proc.stderr
    assert proc.returncode == 2, proc.stdout + err
    assert where in err and message in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_hub_that_does_not_resolve_is_named_rather_than_the_offline_switch_it_caused():
    """`mgpu train` switches downloads off when the hub's name does not resolve (hub.py); a recipe's push must then say
    that the hub is unreachable, not ask the user to unset a variable they never set."""
    from unsloth_mgpu_cli.errors import UserError
    from unsloth_mgpu_cli.hub import UNRESOLVED
    from unsloth_mgpu_cli.push import hub_token

    with pytest.raises(UserError) as caught:
        hub_token({"HF_HUB_OFFLINE": "1", UNRESOLVED: "huggingface.co", "HF_TOKEN": TOKEN})
    assert "huggingface.co does not resolve" in caught.value.render()
    with pytest.raises(UserError) as caught:  # control: the user's own switch is named as such
        hub_token({"HF_HUB_OFFLINE": "1", "HF_TOKEN": TOKEN})
    assert "unset HF_HUB_OFFLINE" in caught.value.render()
