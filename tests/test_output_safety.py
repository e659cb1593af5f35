"""What `mgpu train --overwrite` and `mgpu export` may delete, and the modes of what they write.

--overwrite deletes only what a run wrote and refuses a folder holding anything else; an export replaces only an
empty folder or an earlier export, never the run or what contains it; adapters, checkpoints and exports are
readable by others as the umask says (not mkstemp's 0600). One tiny run (1 CPU worker, 2 steps) serves the module.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path

import pytest
from conftest import ROOT, assert_user_error, run_mgpu, start_mgpu, wait_until

pytestmark = pytest.mark.integration

DATA = ROOT / "recipes" / "data" / "quickstart.jsonl"
RECIPE = """\
model:
  name: builtin:tiny-llama
  max_seq_length: 128
dataset:
  path: {data}
  format: alpaca
training:
  max_steps: 2
  micro_batch_size: 2
  optimizer: adamw
  warmup_steps: 0
distributed:
  num_gpus: 1
  device: cpu
output:
  dir: {out}
  save_steps: 1
logging:
  progress: false
"""


def project(folder: Path, out: str = ".") -> Path:
    """A recipe with its data folder and a notes file, as a person keeps them; returns the recipe."""
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.jsonl").write_bytes(DATA.read_bytes())
    (folder / "NOTES.md").write_text("keep me\n")
    recipe = folder / "recipe.yaml"
    recipe.write_text(RECIPE.format(data="data/train.jsonl", out=out))
    return recipe


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished 2-step run, trained with --overwrite over an earlier run's files (umask 022)."""
    folder = tmp_path_factory.mktemp("run")
    recipe = project(folder, out="out")
    out = folder / "out"
    (out / "checkpoints" / "step-99").mkdir(parents=True)
    (out / "checkpoints" / "step-99" / "state.json").write_text("{}")
    (out / "adapter").mkdir()
    (out / "adapter" / "stale.bin").write_text("old")
    (out / "metrics.jsonl").write_text('{"step": 99}\n')
    (out / "recipe.resolved.yaml").write_text("old: true\n")
    (out / "report.png").write_text("old")
    (out / ".tmp-adapter-dead").mkdir()  # left by a run killed while saving
    (out / ".cache" / "unsloth_compiled_rank0").mkdir(parents=True)  # Unsloth's compiled modules (on CUDA)
    (out / ".cache" / "unsloth_compiled_rank0" / "stale.py").write_text("old")
    old = os.umask(0o022)
    try:
        proc = run_mgpu("train", str(recipe), "--overwrite", timeout=600)
    finally:
        os.umask(old)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out


# -- 2: --overwrite ------------------------------------------------------------------------------------


def test_overwrite_refuses_a_folder_holding_the_recipe_and_other_files(tmp_path):
    recipe = project(tmp_path)  # output.dir: . (the recipe's own folder)
    before = snapshot(tmp_path)
    # from that folder: it is also the current directory
    proc = run_mgpu("train", "recipe.yaml", "--overwrite", cwd=tmp_path, timeout=300)
    assert_user_error(proc, "output.dir", "the current directory", "recipe.yaml", "NOTES.md", "data/", "output.dir=")
    assert snapshot(tmp_path) == before  # nothing deleted, nothing written
    # from elsewhere: the folder still holds the recipe, the data and other files
    proc = run_mgpu("train", str(recipe), "--overwrite", timeout=300)
    assert_user_error(proc, "inputs of this run: recipe.yaml, data/train.jsonl", "no run wrote: NOTES.md")
    assert "current directory" not in proc.stdout + proc.stderr
    assert snapshot(tmp_path) == before


def test_a_run_rerun_from_its_own_resolved_recipe_may_overwrite_itself(run):
    from unsloth_mgpu_cli.engine import check_output_dir, run_inputs
    from unsloth_mgpu_cli.recipe import load_recipe

    resolved = run / "recipe.resolved.yaml"
    recipe = load_recipe(resolved).recipe
    assert resolved not in run_inputs(resolved, recipe) and Path(recipe.dataset.path) in run_inputs(resolved, recipe)
    check_output_dir(run, overwrite=True, resume=False, inputs=run_inputs(resolved, recipe))  # raises if refused


def test_overwrite_refuses_a_run_folder_that_also_holds_other_files(tmp_path):
    recipe = project(tmp_path, out="out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "out" / "thesis.tex").write_text("months of work\n")
    before = snapshot(tmp_path)
    proc = run_mgpu("train", str(recipe), "--overwrite", timeout=300)
    assert_user_error(proc, "output.dir", "no run wrote: thesis.tex", "--overwrite deletes only")
    assert snapshot(tmp_path) == before


def test_refusal_without_overwrite_says_what_the_folder_holds(tmp_path):
    recipe = project(tmp_path, out="out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "NOTES.md").write_text("mine\n")
    proc = run_mgpu("train", str(recipe), timeout=300)
    assert_user_error(proc, "output.dir", "holds no run", "NOTES.md", "new or empty folder")
    assert "already holds a run" not in proc.stdout + proc.stderr
    (tmp_path / "out" / "NOTES.md").unlink()
    (tmp_path / "out" / "metrics.jsonl").write_text('{"step": 1}\n')
    proc = run_mgpu("train", str(recipe), timeout=300)
    assert_user_error(proc, "already holds a run (metrics.jsonl)", "--resume auto", "--overwrite")


def test_resume_auto_without_a_checkpoint_starts_a_stopped_run_again_but_keeps_a_finished_one(tmp_path):
    """A requeued job stopped before its first checkpoint (save_steps not reached): `--resume auto` starts it again
    from step 0; a finished run (summary.json, adapter/) is not replaced that way."""
    from unsloth_mgpu_cli.engine import check_output_dir
    from unsloth_mgpu_cli.errors import UserError

    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "recipe.resolved.yaml").write_text("x: 1\n")
    check_output_dir(out, overwrite=False, resume=True, nothing_to_resume=True)  # stopped early: starts again
    (out / "summary.json").write_text("{}")
    with pytest.raises(UserError, match="holds a finished run"):
        check_output_dir(out, overwrite=False, resume=True, nothing_to_resume=True)


def test_only_what_a_run_wrote_counts_as_the_run(tmp_path):
    from unsloth_mgpu_cli.checkpoint import survey_output_dir

    out = tmp_path / "out"
    for name in ("checkpoints/epoch=3.ckpt", "logs/events", "merged/config.json", "merged/model.safetensors"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "adapter").symlink_to(elsewhere, target_is_directory=True)

    def names(paths):
        return sorted(p.name for p in paths)

    # another tool's checkpoints/ and logs/: no run here, nothing is ours
    assert survey_output_dir(out) == ([], sorted(out.iterdir()))
    (out / "recipe.resolved.yaml").write_text("x")
    ours, others = survey_output_dir(out)
    # a run: its folders and an unmarked merged/ of model files (an export of an older version) are ours; a
    # symlink never is
    assert (names(ours), names(others)) == (["checkpoints", "logs", "merged", "recipe.resolved.yaml"], ["adapter"])
    (out / "merged" / "notes.xlsx").write_text("mine")
    assert "merged" in names(survey_output_dir(out)[1])
    (out / ".DS_Store").write_text("x")  # what a file browser leaves: not ours, no reason to refuse either
    assert ".DS_Store" not in names(sum(survey_output_dir(out), []))


def test_overwrite_replaces_only_the_earlier_run(run):
    assert not (run / "checkpoints" / "step-99").exists() and not (run / "adapter" / "stale.bin").exists()
    assert not (run / "report.png").exists() and not (run / ".tmp-adapter-dead").exists()
    assert not (run / ".cache" / "unsloth_compiled_rank0" / "stale.py").exists()
    assert [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"step": 99' in line] == []
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert {p.name for p in run.parent.iterdir()} == {"recipe.yaml", "data", "NOTES.md", "out"}


# -- 3: modes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o002], ids=["umask022", "umask002"])
def test_atomic_dir_gives_what_it_writes_the_modes_of_the_umask(tmp_path, umask):
    import torch
    from safetensors.torch import save_file

    from unsloth_mgpu_cli.checkpoint import atomic_dir

    old = os.umask(umask)
    try:
        dest = tmp_path / "adapter"
        for generation in range(2):  # a new folder, then replacing it
            with atomic_dir(dest) as tmp:
                save_file({"w": torch.zeros(2)}, str(tmp / "w.safetensors"))  # through mkstemp: 0600
                fd, name = tempfile.mkstemp(dir=tmp)
                os.close(fd)
                (tmp / f"gen{generation}").write_text("x")
    finally:
        os.umask(old)
    assert mode(dest) == 0o777 & ~umask
    assert (dest / "gen1").exists() and not (dest / "gen0").exists()
    assert {p.name: mode(p) for p in dest.iterdir()} == {p.name: 0o666 & ~umask for p in dest.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary or old folder left


def test_adapter_and_checkpoints_are_readable_by_others(run):
    for folder in (run / "adapter", run / "checkpoints" / "step-2"):
        assert mode(folder) == 0o755, folder
        for f in folder.iterdir():
            assert mode(f) == 0o644, f
    assert mode(run / "adapter" / "adapter_model.safetensors") == 0o644


# -- 1: export -----------------------------------------------------------------------------------------


def test_export_refuses_a_folder_it_did_not_write(run, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "important.txt").write_text("keep\n")
    proc = run_mgpu("export", str(run), "--merged", "--output", str(precious), timeout=300)
    assert_user_error(proc, "--output", "not empty", "important.txt", "new or empty folder")
    assert (precious / "important.txt").read_text() == "keep\n"
    assert [p.name for p in tmp_path.iterdir()] == ["precious"]


def test_export_names_a_damaged_adapter_a_checkpoint_folder_and_a_run_still_training(run, tmp_path):
    """A cut-short or missing adapter file was a traceback and exit 1 (peft then looked for the file on the hub);
    a checkpoint folder was 'not the folder of an mgpu run'; a live run was told to finish with --resume auto."""
    import shutil

    from unsloth_mgpu_cli import engine

    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("merged*"))
    weights = copy / "adapter" / "adapter_model.safetensors"
    os.truncate(weights, weights.stat().st_size - 4096)
    proc = run_mgpu("export", str(copy), timeout=300)
    assert_user_error(proc, f"{weights}: adapter_model.safetensors cut short", "a copy cut short?")
    weights.unlink()
    assert_user_error(run_mgpu("export", str(copy), timeout=300), "adapter_model.safetensors is missing")
    ckpt = copy / "checkpoints" / "step-2"
    proc = run_mgpu("export", str(ckpt), timeout=300)
    assert_user_error(proc, f"{ckpt} is a checkpoint, not a run folder", f"then `mgpu export {copy}`")
    shutil.rmtree(copy / "adapter")
    engine._lock_output_dir(copy)  # a `mgpu train` into it, as far as any other process can tell
    try:
        proc = run_mgpu("export", str(copy), timeout=300)
    finally:
        engine._OUTPUT_LOCK.close()
        engine._OUTPUT_LOCK = None
    assert_user_error(proc, f"the run is still training (pid {os.getpid()}", "run `mgpu export` once it has")
    assert "--resume" not in proc.stderr
    proc = run_mgpu("export", str(copy), timeout=300)  # the control: ended, so finish it
    assert_user_error(proc, "no adapter", f"mgpu train {copy / 'recipe.resolved.yaml'} --resume auto")


@pytest.mark.parametrize(
    "where, needle",
    [
        ("{run}", "is the run folder"),
        ("{run}/adapter", "is the run's adapter"),
        ("{run}/checkpoints/step-2", "inside the run's checkpoints/"),
        ("{run}/metrics.jsonl", "is the run's metrics.jsonl"),
        ("{run}/..", "contains the run folder"),
        (".", "contains the current directory"),
    ],
)
def test_export_never_writes_over_the_run(run, tmp_path, where, needle):
    before = snapshot(run)
    # cwd: an empty folder beside the run, so "." is neither the run nor one of its ancestors
    proc = run_mgpu("export", str(run), "--merged", "--output", where.format(run=run), cwd=tmp_path, timeout=300)
    assert_user_error(proc, "--output", needle)
    assert snapshot(run) == before
    assert list(tmp_path.iterdir()) == []


def test_export_is_marked_readable_and_replaced_by_the_next_export(run, umask_022, tmp_path):
    proc = run_mgpu("export", str(run), "--merged", timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (run / "merged" / "stale.txt").write_text("from the first export")
    # the second replaces the first, written where a symlinked merged/ points (a larger disk, say)
    bigger = tmp_path / "bigger"
    (run / "merged").rename(bigger)
    (run / "merged").symlink_to(bigger, target_is_directory=True)
    proc = run_mgpu("export", str(run), "--merged", timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (run / "merged").is_symlink() and (bigger / "model.safetensors").is_file()
    assert not (bigger / "stale.txt").exists()
    (run / "merged").unlink()
    bigger.rename(run / "merged")
    merged = run / "merged"
    assert (merged / ".mgpu-export.json").is_file() and (merged / "model.safetensors").is_file()
    assert mode(merged) == 0o755 and all(mode(f) == 0o644 for f in merged.iterdir())
    assert not [p for p in run.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    # an export counts as what mgpu wrote: a later --overwrite may delete it
    from unsloth_mgpu_cli.checkpoint import survey_output_dir

    ours, others = survey_output_dir(run)
    assert merged in ours and others == []


def test_a_second_run_into_the_folder_of_a_live_run_is_refused(tmp_path):
    """Nothing stopped two runs writing one output.dir: both trained, and metrics.jsonl held every step twice.
    The first run holds a lock (in mgpu's cache, not output.dir) until its process ends."""
    recipe = project(tmp_path, out="out")
    first = start_mgpu("train", str(recipe), MGPU_INJECT_FAULT="sleep:rank=0:step=1:seconds=10", OMP_NUM_THREADS="1")
    resolved = tmp_path / "out" / "recipe.resolved.yaml"
    wait_until(first, resolved.exists, 240, "the first run past its checks")
    second = run_mgpu("train", str(recipe), "--overwrite", timeout=300)
    # without --overwrite too: the lock is checked before the folder, whose message would say to resume it
    plain = run_mgpu("train", str(recipe), timeout=300)
    out, _ = first.communicate(timeout=300)
    assert_user_error(second, "output.dir", "is in use by another mgpu train on this host (pid", "wait for it to end")
    assert_user_error(plain, "output.dir", "is in use by another mgpu train on this host (pid")
    assert first.returncode == 0, out[-3000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # the first run's, once (the lock goes with its process: every resume test runs again)


def test_a_run_refused_by_its_workers_leaves_output_dir_as_it_was(tmp_path):
    """Nodes whose recipes differ are found only once the workers meet, after node 0 wrote recipe.resolved.yaml and
    its log folder: they are taken back (a folder it made is removed), an earlier run's files stay as they were."""
    from unsloth_mgpu_cli.engine import _OutputSnapshot

    fresh = tmp_path / "fresh"
    snap = _OutputSnapshot.take(fresh)
    (fresh / "logs" / "mgpu_new").mkdir(parents=True)
    (fresh / "recipe.resolved.yaml").write_text("new")
    snap.restore()
    assert not fresh.exists()

    run = tmp_path / "run"
    (run / "logs" / "mgpu_old").mkdir(parents=True)
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    (run / "recipe.resolved.yaml").write_text("old")
    (run / "metrics.jsonl").write_text("{}\n")
    before = sorted(map(str, run.rglob("*")))
    snap = _OutputSnapshot.take(run)
    (run / "recipe.resolved.yaml").write_text("# Resumed at step 2 with: ...\nnew")
    (run / "logs" / "mgpu_new").mkdir()
    (run / "STOP").write_text("")
    snap.restore()
    assert sorted(map(str, run.rglob("*"))) == before and (run / "recipe.resolved.yaml").read_text() == "old"
