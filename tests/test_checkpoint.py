"""Checkpoint files, resume checks, eval split, sinks and report in-process (fast; no workers, no Unsloth)."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT

from unsloth_mgpu_cli import checkpoint as C
from unsloth_mgpu_cli.distributed import DistInfo
from unsloth_mgpu_cli.errors import UserError
from unsloth_mgpu_cli.recipe import load_recipe as load_recipe


def make_trainer(out: Path, seed: int = 0, lr: float = 1e-2, total: int = 10, wd: float = 0.01) -> SimpleNamespace:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total))  # linear decay
    return SimpleNamespace(
        info=DistInfo(),
        out=out,
        step=0,
        params=params,
        param_names=["weight", "bias"],
        optimizer=opt,
        scheduler=sched,
        recipe=SimpleNamespace(
            output=SimpleNamespace(save_total_limit=2),
            training=SimpleNamespace(
                learning_rate=lr, weight_decay=wd, adam_beta1=None, adam_beta2=None, adam_epsilon=None
            ),
        ),
        plan=SimpleNamespace(identity={"global_batch": 8}),
        run_state={"tokens": 0},
    )


def train_step(t: SimpleNamespace) -> None:
    loss = (t.params[0].sum() + t.params[1].sum()) ** 2
    loss.backward()
    t.optimizer.step()
    t.scheduler.step()
    t.optimizer.zero_grad()
    t.step += 1
    t.run_state["tokens"] += 10


def test_save_total_limit_null_keeps_every_checkpoint_and_the_disk_check_counts_them(tmp_path):
    """`output.save_total_limit: null` (transformers' "keep all") was refused: 'expected a valid integer'."""
    from unsloth_mgpu_cli.engine import check_free_space
    from unsloth_mgpu_cli.models import resolve_model_path
    from unsloth_mgpu_cli.recipe import Recipe

    t = make_trainer(tmp_path)
    for limit, kept in ((2, ["step-3", "step-4"]), (None, ["step-1", "step-2", "step-3", "step-4"])):
        t.recipe.output.save_total_limit = limit
        for _ in range(4):
            train_step(t)
            C.save_checkpoint(t)
        assert [p.name for p in C.list_checkpoints(tmp_path)][-len(kept) :] == kept
        assert len(C.list_checkpoints(tmp_path)) == len(kept), (limit, C.list_checkpoints(tmp_path))
        shutil.rmtree(tmp_path / "checkpoints")
        t.step = 0

    def recipe(limit: int | None) -> Recipe:
        output = {"save_steps": 10, "save_total_limit": limit}
        return Recipe.model_validate(
            {"model": {"name": "builtin:tiny-llama"}, "dataset": {"path": "d"}, "output": output}
        )

    def need(limit: int | None, steps: int) -> str:  # the bytes check_free_space asks for, read from its refusal
        with pytest.raises(UserError) as exc, pytest.MonkeyPatch.context() as m:
            m.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 1))
            check_free_space(tmp_path / "out", recipe(limit), resolve_model_path("builtin:tiny-llama"), steps)
        return exc.value.render()

    assert "(adapter + 3 checkpoint(s))" in need(2, 100)  # the limit, and one more while a new one is written
    assert "(adapter + 11 checkpoint(s))" in need(None, 100)  # every 10 steps of 100, and one more


@pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="needs Linux's /dev/full")
def test_a_full_disk_under_torch_save_is_a_checkpoint_write_error_too(tmp_path, monkeypatch):
    """On a full disk torch.save raises a RuntimeError ("[enforce fail at inline_container.cc] unexpected pos"), not
    an OSError: it ended the run with that text and no word of the checkpoint that is still usable."""
    t = make_trainer(tmp_path)
    train_step(t)
    C.save_checkpoint(t)
    train_step(t)
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real_save(obj, "/dev/full"))  # a real full disk
    with pytest.raises(C.CheckpointWriteError) as exc:
        C.save_checkpoint(t)
    msg = str(exc.value)
    assert "could not write checkpoint step-2" in msg and "MB free there" in msg
    assert "step-1 is intact" in msg and "--resume auto" in msg
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1"]
    assert C.write_failure(RuntimeError("CUDA error: an illegal memory access"), tmp_path) is None  # a bug stays one


def test_disk_full_mid_save_keeps_the_previous_checkpoint_usable(tmp_path, monkeypatch):
    t = make_trainer(tmp_path)
    train_step(t)
    C.save_checkpoint(t)  # two earlier checkpoints: the message names the newest
    train_step(t)
    C.save_checkpoint(t)
    saved_weights = [p.detach().clone() for p in t.params]
    train_step(t)
    real_save = torch.save

    def disk_full(obj, f, *a, **k):  # the file-write edge: some bytes land, then the disk is full
        Path(f).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(C.CheckpointWriteError) as exc:
        C.save_checkpoint(t)
    monkeypatch.setattr(torch, "save", real_save)
    msg = str(exc.value)
    assert "step-3" in msg and "No space left on device" in msg and "step-2 is intact" in msg
    assert "--resume auto" in msg
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-1", "step-2"]  # no half-written step-3, no temp folder
    assert C.find_resume_checkpoint(tmp_path, "auto") == folder / "step-2"
    fresh = make_trainer(tmp_path, seed=1)
    state = C.load_checkpoint(folder / "step-2", fresh)
    assert state["step"] == 2 and state["run_state"] == {"tokens": 20}
    assert all(torch.equal(a, b) for a, b in zip(fresh.params, saved_weights, strict=True))


def test_a_full_disk_while_the_final_adapter_is_written_names_the_checkpoint_that_holds_the_weights(tmp_path):
    """save_final: the disk fills while adapter/ is written (after the last checkpoint): a CheckpointWriteError that
    says which checkpoint holds the trained weights, and nothing half-written."""
    from unsloth_mgpu_cli.trainer import Trainer

    def disk_full(folder: str, **kwargs) -> None:  # the file-write edge: some bytes land, then the disk is full
        (Path(folder) / "adapter_model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    for step in (2, 4):
        (tmp_path / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step-{step}" / "state.json").write_text(json.dumps({"step": step}))
    fake = SimpleNamespace(
        sharded=False,
        info=DistInfo(),
        out=tmp_path,
        recipe=SimpleNamespace(
            lora=SimpleNamespace(target_modules=["q_proj"]),
            dataset=SimpleNamespace(sources=list),
            output=SimpleNamespace(keep_best=False),
        ),
        model=SimpleNamespace(save_pretrained=disk_full),
        tokenizer=SimpleNamespace(save_pretrained=lambda folder, **kw: None),
    )
    with pytest.raises(C.CheckpointWriteError) as exc:
        Trainer.save_final(fake)
    msg = str(exc.value)
    assert "could not write adapter/ (No space left on device" in msg, msg
    assert "the checkpoint step-4 holds the trained weights" in msg and "--resume auto" in msg, msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]  # no adapter/, no temporary folder


def test_resumed_state_continues_bit_for_bit(tmp_path):
    a = make_trainer(tmp_path)
    for _ in range(3):
        train_step(a)
    C.save_checkpoint(a)
    for _ in range(2):
        train_step(a)
    b = make_trainer(tmp_path, seed=5)  # other initial weights: the checkpoint must overwrite everything
    b.step = C.load_checkpoint(tmp_path / "checkpoints" / "step-3", b)["step"]
    for _ in range(2):
        train_step(b)
    assert all(torch.equal(x, y) for x, y in zip(a.params, b.params, strict=True))
    assert a.scheduler.get_last_lr() == b.scheduler.get_last_lr()


def test_a_resume_follows_the_recipes_learning_rate_and_schedule(tmp_path):
    """docs/checkpoints.md: the learning rate and max_steps may change between runs. The checkpoint's scheduler
    state carried the old base rate, and the optimizer the old step's rate: both were silently kept."""
    a = make_trainer(tmp_path)
    for _ in range(3):
        train_step(a)
    C.save_checkpoint(a)
    b = make_trainer(tmp_path, seed=5, lr=4e-3, total=20)  # a lower rate, over a longer run
    C.load_checkpoint(tmp_path / "checkpoints" / "step-3", b)
    assert b.optimizer.param_groups[0]["lr"] == pytest.approx(4e-3 * (1 - 3 / 20))
    train_step(b)
    assert b.optimizer.param_groups[0]["lr"] == pytest.approx(4e-3 * (1 - 4 / 20))
    # the same recipe: the very rate the checkpoint holds (bit for bit: see the test above)
    c = make_trainer(tmp_path, seed=5)
    C.load_checkpoint(tmp_path / "checkpoints" / "step-3", c)
    assert c.optimizer.param_groups[0]["lr"] == a.optimizer.param_groups[0]["lr"]


def test_a_resume_follows_the_recipes_weight_decay(tmp_path):
    """The optimizer's state brought back its run's weight decay too, so a new training.weight_decay was ignored."""
    a = make_trainer(tmp_path, wd=0.1)
    train_step(a)
    C.save_checkpoint(a)
    b = make_trainer(tmp_path, wd=0.0)
    C.load_checkpoint(tmp_path / "checkpoints" / "step-1", b)
    assert [g["weight_decay"] for g in b.optimizer.param_groups] == [0.0]


def test_keeps_the_newest_k_and_ignores_half_written_folders(tmp_path):
    t = make_trainer(tmp_path)
    for _ in range(3):
        train_step(t)
        C.save_checkpoint(t)
    (tmp_path / "checkpoints" / ".tmp-step-4-abc").mkdir()
    (tmp_path / "checkpoints" / "step-9").mkdir()  # no state.json: never completed
    assert [p.name for p in C.list_checkpoints(tmp_path)] == ["step-2", "step-3"]
    C.clean_stale(tmp_path)
    assert not (tmp_path / "checkpoints" / ".tmp-step-4-abc").exists()


def test_truncate_metrics_drops_rows_past_the_checkpoint_and_torn_lines(tmp_path):
    rows = [json.dumps({"step": s, "loss": 1.0}) for s in range(1, 8)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 8, "lo')
    assert C.truncate_metrics(tmp_path, 5) == 3
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert C.truncate_metrics(tmp_path, 5) == 0


def test_resume_check_names_what_changed(tmp_path):
    ckpt = tmp_path / "step-5"
    ckpt.mkdir()
    saved = {"model": "m", "data": "abc", "global_batch": 8, "seed": 42}
    (ckpt / "state.json").write_text(json.dumps({"step": 5, "identity": saved}))
    C.check_resume_compatible(ckpt, dict(saved))  # unchanged: fine
    with pytest.raises(UserError) as exc:
        C.check_resume_compatible(ckpt, {**saved, "global_batch": 16, "seed": 7})
    text = exc.value.render()
    assert "global batch" in text and "trained with 8" in text and "now gives 16" in text
    assert "training.seed" in text and "model" not in text.split("problems):")[1].split("seed")[0]
    # the checkpoint's optimizer state and tensor layout belong to its optimizer and strategy
    saved = {**saved, "optimizer": "adamw_8bit", "strategy": "ddp"}
    (ckpt / "state.json").write_text(json.dumps({"step": 5, "identity": saved}))
    with pytest.raises(UserError) as exc:
        C.check_resume_compatible(ckpt, {**saved, "optimizer": "adamw", "strategy": "fsdp"})
    text = exc.value.render()
    assert "set training.optimizer back" in text and "set distributed.strategy back" in text, text
    # a section: only its keys that changed (both whole dicts were printed)
    lora = {"r": 16, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    saved = {**saved, "lora": lora}
    (ckpt / "state.json").write_text(json.dumps({"step": 5, "identity": saved}))
    with pytest.raises(UserError) as exc:
        C.check_resume_compatible(ckpt, {**saved, "lora": {**lora, "r": 8}})
    text = exc.value.render()
    assert "trained with {'r': 16}, the recipe now gives {'r': 8}" in text and "set lora.r back" in text, text
    # where a second stage started (lora.init_from) is not part of the run's identity: the checkpoint holds the weights
    staged = load_recipe(ROOT / "recipes" / "quickstart.yaml").recipe
    staged.lora.init_from = "/somewhere/adapter"
    assert "init_from" not in C.run_identity(staged, "abc", 8)["lora"]
    # a key the checkpoint's version did not have is no change (a session-20 checkpoint, before lora.use_dora)
    C.check_resume_compatible(ckpt, {**saved, "lora": {**lora, "use_dora": False, "loraplus_lr_ratio": None}})
    with pytest.raises(UserError, match="set lora.r back"):
        C.check_resume_compatible(ckpt, {**saved, "lora": {**lora, "r": 8, "use_dora": False}})


def test_resume_from_a_folder_that_is_no_checkpoint_names_the_ones_there(tmp_path):
    with pytest.raises(UserError) as exc:
        C.find_resume_checkpoint(tmp_path, str(tmp_path / "checkpoints" / "step-99"))
    assert f"{tmp_path} holds no checkpoint yet" in exc.value.render()
    for step in (10, 14):
        (tmp_path / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step-{step}" / "state.json").write_text(json.dumps({"step": step}))
    with pytest.raises(UserError) as exc:
        C.find_resume_checkpoint(tmp_path, str(tmp_path / "checkpoints" / "step-99"))
    text = exc.value.render()
    assert f"no such folder: {tmp_path}/checkpoints/step-99" in text
    assert f"one of: {tmp_path}/checkpoints/step-10, {tmp_path}/checkpoints/step-14" in text, text
    (tmp_path / "checkpoints" / "step-99").mkdir()  # there, but without state.json
    with pytest.raises(UserError, match="not a checkpoint folder \\(no state.json\\)"):
        C.find_resume_checkpoint(tmp_path, str(tmp_path / "checkpoints" / "step-99"))
    # --resume auto passes over it (newer than the newest checkpoint) and says so (it was skipped silently); these
    # state.json-only checkpoints are damaged as well, so it ends with the newest one's error
    notes: list[str] = []
    with pytest.raises(UserError, match="step-14"):
        C.find_resume_checkpoint(tmp_path, "auto", notes)
    assert notes[0] == "--resume auto: passed over step-99, which is damaged (state.json is missing)", notes
    assert [n for n in notes if "step-99" in n] == notes[:1]


def test_another_runs_checkpoint_is_refused_into_a_folder_with_checkpoints_of_its_own(tmp_path):
    """It went through: the run's own step-150 and step-166 were deleted by retention at the next saves, and
    metrics.jsonl joined this run's first 20 steps to the other run's."""
    for run, step in (("other", 20), ("mine", 150), ("mine", 166)):
        (tmp_path / run / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (tmp_path / run / "checkpoints" / f"step-{step}" / "state.json").write_text(json.dumps({"step": step}))
    theirs = tmp_path / "other" / "checkpoints" / "step-20"
    with pytest.raises(UserError) as exc:
        C.find_resume_checkpoint(tmp_path / "mine", str(theirs))
    text = exc.value.render()
    assert f"{theirs} is a checkpoint of another run" in text and "(step-150, step-166)" in text
    assert "output.dir=NEW_DIR" in text and "--resume auto" in text
    # the controls: into a new folder, and the run's own checkpoint
    assert C.find_resume_checkpoint(tmp_path / "new", str(theirs)) == theirs
    own = tmp_path / "mine" / "checkpoints" / "step-150"
    assert C.find_resume_checkpoint(tmp_path / "mine", str(own)) == own


def test_eval_split_is_seeded_disjoint_and_complete():
    from unsloth_mgpu_cli.data import split_eval_indices

    train, held = split_eval_indices(100, 0.1, seed=3)
    assert len(held) == 10 and len(train) == 90
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(100))
    again = split_eval_indices(100, 0.1, seed=3)
    assert np.array_equal(again[1], held) and not np.array_equal(split_eval_indices(100, 0.1, seed=4)[1], held)
    with pytest.raises(UserError, match="dataset.eval_ratio"):
        split_eval_indices(1, 0.5, seed=0)


def test_recipe_eval_keys_are_checked():
    from unsloth_mgpu_cli.recipe import load_recipe

    base = {"model": {"name": "builtin:tiny-llama"}, "dataset": {"path": "x.jsonl"}}
    with pytest.raises(UserError) as exc:
        load_recipe(None, ["dataset.eval_ratio=0.1", "dataset.eval_path=e.jsonl"], data=base, check_paths=False)
    assert "dataset.eval_ratio" in exc.value.render()
    with pytest.raises(UserError) as exc:
        load_recipe(None, ["training.eval_steps=10"], data=base, check_paths=False)
    assert "training.eval_steps" in exc.value.render()
    ok = load_recipe(None, ["training.eval_steps=10", "dataset.eval_ratio=0.1"], data=base, check_paths=False)
    assert ok.recipe.training.eval_steps == 10


def test_missing_wandb_is_a_user_error_naming_the_file_line_with_the_pip_hint(monkeypatch, tmp_path):
    from unsloth_mgpu_cli import sinks
    from unsloth_mgpu_cli.recipe import load_recipe

    real = sinks.importlib.util.find_spec
    monkeypatch.setattr(sinks.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    path = tmp_path / "r.yaml"
    path.write_text(
        "model:\n  name: builtin:tiny-llama\ndataset:\n  path: x.jsonl\nlogging:\n  report_to: [tensorboard, wandb]\n"
    )
    with pytest.raises(UserError) as exc:
        sinks.check_sinks_available(load_recipe(path, [], check_paths=False))
    text = exc.value.render()
    assert f"logging.report_to.1 ({path}:6)" in text and "pip install" in text, text
    assert "tensorboard" not in text.split("wandb")[0]
    # set on the command line: the message says so
    loaded = load_recipe(path, ["logging.report_to=[wandb]"], check_paths=False)
    with pytest.raises(UserError) as exc:
        sinks.check_sinks_available(loaded)
    assert "logging.report_to.0 (command line)" in exc.value.render()


def test_report_summarises_the_whole_run(tmp_path):
    from unsloth_mgpu_cli.report import summarize, write_plots

    rows = [
        {
            "step": s,
            "loss": 3.0 - s / 10,
            "learning_rate": 1e-3,
            "tokens": 100,
            "tokens_per_second": 50.0,
            "elapsed_s": 2.0 * s,
            "peak_memory_gb": [1.0 + s / 10, 2.0],
        }
        for s in range(1, 5)
    ]
    rows[1]["eval_loss"], rows[3]["eval_loss"] = 2.5, 2.7
    s = summarize(tmp_path, rows)
    assert s["tokens"] == 400 and s["elapsed_s"] == 8.0 and s["tokens_per_second"] == 50.0
    assert s["tokens_per_second_per_gpu"] == 25.0 and s["peak_memory_gb"] == [1.4, 2.0]
    assert s["unit"] == "GPU"  # no summary.json saying "cpu": the runs this tool exists for
    assert (s["final_eval_loss"], s["best_eval_loss"], s["best_eval_step"]) == (2.7, 2.5, 2)
    assert write_plots(rows, tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_report_of_a_run_still_going_counts_every_steps_tokens_and_its_workers(tmp_path):
    """Rows logged every 50 steps: summing their per-step tokens undercounted 50-fold; each row now carries the
    running total. The device comes from the resolved recipe written at the start (CPU workers, not GPUs)."""
    from unsloth_mgpu_cli.report import summarize

    rows = [{"step": s, "loss": 2.0, "tokens": 100, "run_tokens": 100 * s, "elapsed_s": s / 10} for s in (50, 100)]
    (tmp_path / "recipe.resolved.yaml").write_text("distributed:\n  num_gpus: 2\n  device: cpu\n")
    s = summarize(tmp_path, rows)
    assert s["tokens"] == 10_000 and s["tokens_per_second"] == 1_000.0 and not s["finished"]
    assert s["unit"] == "worker"


def test_report_of_a_finished_run_shows_the_throughput_train_printed(tmp_path, capsys):
    """`mgpu train` prints its summary's throughput (after the first step, and over the whole run without
    evaluation); the report showed tokens over the logged rows' time instead, another number for the same run."""
    import json

    from unsloth_mgpu_cli.report import print_report, summarize

    rows = [{"step": s, "loss": 2.0, "tokens": 100, "run_tokens": 100 * s, "elapsed_s": s / 10} for s in (1, 2)]
    summary = {"tokens_per_second": 750.0, "steady_tokens_per_second": 1_500.0, "world_size": 1}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    s = summarize(tmp_path, rows)
    assert (s["tokens_per_second"], s["steady_tokens_per_second"]) == (750.0, 1_500.0)
    print_report(tmp_path, s, None)
    flat = " ".join(capsys.readouterr().out.split())
    assert "1,500 total after the first step" in flat and "; 750" in flat and "over the whole run" in flat, flat
    # after a resume the summary's throughput is its last session's, and says so
    (tmp_path / "summary.json").write_text(json.dumps({**summary, "resumed_from_step": 1}))
    print_report(tmp_path, summarize(tmp_path, rows), None)
    flat = " ".join(capsys.readouterr().out.split())
    assert "over its last session (resumed from step 1)" in flat and "whole run" not in flat, flat


def test_report_and_export_refuse_a_folder_without_a_run(tmp_path):
    from conftest import assert_user_error, run_mgpu

    assert_user_error(run_mgpu("report", str(tmp_path), timeout=120), "no metrics.jsonl")
    proc = run_mgpu("export", str(tmp_path), timeout=120)  # never a run: no "resume it" hint (--merged: the default)
    assert_user_error(proc, "no adapter", "not the folder of an mgpu run", "give the output.dir")
    assert "--resume" not in proc.stderr
    assert_user_error(run_mgpu("report", str(tmp_path / "nope"), timeout=120), "no such folder")
    (tmp_path / "recipe.resolved.yaml").write_text("model: {}\n")  # a run that started and logged nothing yet
    assert_user_error(run_mgpu("report", str(tmp_path), timeout=120), "has not logged a step yet")
    assert_user_error(run_mgpu("export", str(tmp_path), "--merged", timeout=120), "no adapter", "--resume auto")


def test_a_torch_adamw_checkpoint_is_refused_by_the_8bit_optimizer_with_a_clear_error(tmp_path):
    """adamw_8bit used torch's AdamW on CPU before session 6: such a checkpoint's moments do not fit bitsandbytes."""
    pytest.importorskip("bitsandbytes")
    from unsloth_mgpu_cli.optim import adamw_8bit_class

    old = make_trainer(tmp_path)
    train_step(old)
    C.save_checkpoint(old)
    new = make_trainer(tmp_path)
    new.optimizer = adamw_8bit_class()(new.params, lr=1e-2)
    with pytest.raises(RuntimeError, match="holds torch AdamW moments.*without --resume"):
        C.load_checkpoint(tmp_path / "checkpoints" / "step-1", new)
    same = make_trainer(tmp_path)  # the control: torch AdamW loads its own checkpoint
    assert C.load_checkpoint(tmp_path / "checkpoints" / "step-1", same)["step"] == 1


def test_wandb_sink_logs_offline_numbers_only_and_a_resume_continues_the_same_run(tmp_path, monkeypatch):
    """W&B is an outside service (not installed here): a stand-in `wandb` module with only `init` (wandb 0.31 has no
    wandb.util.generate_id, which the sink once called) records what the sink asks of it."""
    import os
    import re
    import sys
    import types

    from unsloth_mgpu_cli.recipe import load_recipe
    from unsloth_mgpu_cli.sinks import MetricSinks

    calls: list = []

    class Run:
        def log(self, scalars, step):
            calls.append(("log", step, scalars))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    recipe = load_recipe(
        None,
        ["logging.report_to=[wandb]", "logging.wandb_project=proj"],
        check_paths=False,
        data={"model": {"name": "builtin:tiny-llama"}, "dataset": {"path": "x.jsonl"}},
    ).recipe
    sinks = MetricSinks(recipe, tmp_path)
    sinks.write({"step": 3, "loss": 2.5, "grad_norm": float("nan"), "look_ahead": True, "peak_memory_gb": [1.0, 2.0]})
    sinks.close()
    assert os.environ["WANDB_MODE"] == "offline"  # clusters without internet: `wandb sync` later
    (_, init), log, finish = calls
    assert init["project"] == "proj" and init["dir"] == str(tmp_path) and re.fullmatch(r"[0-9a-f]{8}", init["id"])
    assert init["config"]["training"]["learning_rate"] == recipe.training.learning_rate
    assert log == ("log", 3, {"loss": 2.5, "peak_memory_gb/rank0": 1.0, "peak_memory_gb/rank1": 2.0})
    assert finish == ("finish",)
    # a resumed run logs into the same W&B run (the id kept in output.dir), not a new one
    calls.clear()
    MetricSinks(recipe, tmp_path, start_step=3).close()
    assert calls[0][1]["id"] == init["id"] and calls[0][1]["resume"] == "allow"


def _checkpoints(tmp_path: Path, steps: int = 3) -> Path:
    t = make_trainer(tmp_path)
    for _ in range(steps):
        train_step(t)
        C.save_checkpoint(t)
    return tmp_path / "checkpoints"


@pytest.mark.parametrize(
    "damage, file, says",
    [
        (lambda f: f.write_bytes(f.read_bytes()[:-7]), "trainable.safetensors", "cut short"),
        (lambda f: f.write_bytes(b"\x00" * 4), "trainable.safetensors", "cannot be read"),
        (lambda f: f.unlink(), "optimizer.pt", "optimizer.pt is missing"),
        (lambda f: f.write_bytes(f.read_bytes()[:100]), "optimizer.pt", "cannot be read"),
        (lambda f: f.write_text("{"), "state.json", "cannot be read"),
    ],
    ids=["tensors-cut", "tensors-garbage", "optimizer-missing", "optimizer-cut", "state-garbled"],
)
def test_a_damaged_checkpoint_is_named_and_auto_resumes_from_the_newest_intact_one(tmp_path, damage, file, says):
    """A full disk or a copy cut short: `--resume auto` passes the damaged one over (saying so); `--resume PATH`
    is refused before anything is written, naming the file and the older intact checkpoint."""
    folder = _checkpoints(tmp_path)  # steps 2 and 3 kept
    damage(folder / "step-3" / file)
    notes: list[str] = []
    assert C.find_resume_checkpoint(tmp_path, "auto", notes) == folder / "step-2"
    assert len(notes) == 1 and "step-3" in notes[0] and says in notes[0], notes
    with pytest.raises(UserError) as exc:
        C.verify_safe_to_load(C.find_resume_checkpoint(tmp_path, str(folder / "step-3")))
    text = exc.value.render()
    assert file in text and says in text and "damaged checkpoint" in text, text
    assert f"--resume {folder / 'step-2'}" in text  # the way out
    assert C.checkpoint_damage(folder / "step-2") is None


def test_a_checkpoint_that_needs_code_to_load_is_refused_as_unsafe(tmp_path):
    folder = _checkpoints(tmp_path, steps=1)
    torch.save({"x": SimpleNamespace(a=1)}, folder / "step-1" / "rng.pt")  # an object weights_only refuses
    with pytest.raises(UserError) as exc:
        C.verify_safe_to_load(folder / "step-1")
    text = exc.value.render()
    assert "unsafe checkpoint" in text and "rng.pt" in text and "Unsupported global" in text, text
    assert "weights_only` set to `False`" not in text  # torch's advice, the unsafe way out, is not repeated
    notes: list[str] = []
    with pytest.raises(UserError):  # the only one: --resume auto gives its error rather than start from 0
        C.find_resume_checkpoint(tmp_path, "auto", notes)
    # random bytes are damage, not danger (they were called "unsafe", with torch's weights_only=False advice)
    (folder / "step-1" / "rng.pt").write_bytes(bytes(range(256)) * 2)
    with pytest.raises(UserError) as exc:
        C.verify_safe_to_load(folder / "step-1")
    text = exc.value.render()
    assert "damaged checkpoint" in text and "cannot be read: not a whole torch.save file" in text, text
    assert "weights_only` set to `False`" not in text


def test_every_checkpoint_damaged_gives_the_newest_ones_error(tmp_path):
    folder = _checkpoints(tmp_path)  # steps 2 and 3 kept
    for step in (2, 3):
        (folder / f"step-{step}" / "rng.pt").unlink()
    notes: list[str] = []
    with pytest.raises(UserError) as exc:  # rather than a silent start from step 0
        C.find_resume_checkpoint(tmp_path, "auto", notes)
    text = exc.value.render()
    assert "every checkpoint is damaged: step-3 (rng.pt is missing); step-2 (rng.pt is missing)" in text, text
    assert "no intact one is left" in text and "--overwrite" in text
    assert len(notes) == 2


def test_the_summary_notes_an_export_older_than_the_adapter(tmp_path, capsys):
    """A run resumed after `mgpu export` leaves merged/ holding the earlier weights: the summary says so."""
    import os

    from unsloth_mgpu_cli.checkpoint import EXPORT_MARKER
    from unsloth_mgpu_cli.render import print_summary

    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / EXPORT_MARKER).write_text("{}")
    (tmp_path / "adapter").mkdir()
    summary = {"steps": 4, "tokens": 10, "world_size": 1, "output_dir": str(tmp_path)}
    print_summary(summary)  # exported after the adapter: current
    assert "earlier adapter" not in capsys.readouterr().out
    os.utime(tmp_path / "merged" / EXPORT_MARKER, (1, 1))  # exported before the adapter was last written
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / EXPORT_MARKER).write_text("{}")
    os.utime(tmp_path / "gguf" / EXPORT_MARKER, (1, 1))
    print_summary(summary)
    out = " ".join(capsys.readouterr().out.split())
    assert "gguf/, merged/ in the output folder export(s) an earlier adapter" in out
    assert f"run `mgpu export {tmp_path} --format gguf` and `mgpu export {tmp_path}` again" in out
    print_summary(summary, frozenset({"gguf/"}))  # output.export rewrites gguf/ next: only merged/ is noted
    out = " ".join(capsys.readouterr().out.split())
    assert "note: merged/ in the output folder" in out and "--format gguf" not in out


def test_the_summary_of_a_resumed_run_says_what_this_session_covers_and_shows_the_eval_loss(tmp_path, capsys):
    """After `--resume auto` the summary printed `steps 30` beside this session's tokens and time, with no word of
    the resume; and it left out the evaluation loss that summary.json holds."""
    from unsloth_mgpu_cli.render import people_console, print_summary

    summary = {
        "steps": 30,
        "resumed_from_step": 20,
        "elapsed_s": 0.9,
        "first_step_s": 0.3,
        "tokens": 7_444,
        "run_tokens": 22_359,
        "tokens_per_second": 8_000.0,
        "steady_tokens_per_second": 9_000.0,
        "final_eval_loss": 5.8899,
        "best_eval_loss": 5.8,
        "world_size": 2,
        "output_dir": str(tmp_path),
    }
    print_summary(summary)
    printed = capsys.readouterr().out
    assert all(line == line.rstrip() for line in printed.splitlines()), printed  # no padding in a log
    out = " ".join(printed.split())
    assert "30 (resumed from step 20: this session trained steps 21-30)" in out, out
    assert "7,444 this session" in out and "22,359 over the whole run" in out, out
    assert "8,000 over the whole session" in out and "5.8899 at the end, best 5.8000" in out, out
    print_summary({k: v for k, v in summary.items() if k not in ("resumed_from_step", "final_eval_loss")})
    out = " ".join(capsys.readouterr().out.split())
    assert "resumed from" not in out and "this session" not in out and "eval loss" not in out, out
    assert "8,000 over the whole run" in out, out
    assert not people_console().is_terminal and people_console().soft_wrap  # a log's lines stay whole


def test_a_run_continued_into_a_new_folder_is_compared_with_the_recipe_its_checkpoint_was_trained_with(tmp_path):
    """It was compared with the new folder's recipe, which did not exist: every key was reported as changed
    ("dataset.batching: None -> balanced; ...", 60 of them), on screen and in the recipe's header."""
    from unsloth_mgpu_cli.checkpoint import check_resume_compatible
    from unsloth_mgpu_cli.engine import _start_output_dir
    from unsloth_mgpu_cli.recipe import Recipe, to_yaml

    def recipe(out: Path, steps: int, seq: int = 128) -> Recipe:
        return Recipe.model_validate(
            {
                "model": {"name": "builtin:tiny-llama", "max_seq_length": seq},
                "dataset": {"path": "d.jsonl"},
                "training": {"max_steps": steps, "warmup_steps": 1},
                "output": {"dir": str(out)},
            }
        )

    first, new = tmp_path / "first", tmp_path / "new"
    _start_output_dir(first, recipe(first, 30), False, None, None)
    ckpt = first / "checkpoints" / "step-20"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"step": 20, "identity": {"data": "5ace7dbf"}}))
    changed = _start_output_dir(new, recipe(new, 40), False, str(ckpt), ckpt)
    assert changed == [f"output.dir: {first} -> {new}", "training.max_steps: 30 -> 40"]
    assert (
        f"# Resumed at step 20 with: output.dir: {first} -> {new}; training.max_steps: 30 -> 40\n"
        in (new / "recipe.resolved.yaml").read_text()
    )
    # a checkpoint copied without its run's recipe: nothing to compare with, nothing claimed
    alone = tmp_path / "copied" / "step-20"
    shutil.copytree(ckpt, alone)
    assert _start_output_dir(tmp_path / "third", recipe(tmp_path / "third", 40), False, str(alone), alone) == []
    # the tokenised data changed: named by the keys that changed it, not only by two fingerprints
    with pytest.raises(UserError) as exc:
        check_resume_compatible(ckpt, {"data": "1c66acf3"}, to_yaml(recipe(first, 30, seq=256)))
    text = exc.value.render()
    assert "tokenised data changed (model.max_seq_length: 128 -> 256)" in text
    assert "set model.max_seq_length back" in text
    with pytest.raises(UserError, match="trained with '5ace7dbf', the recipe now gives '1c66acf3'"):  # no recipe given
        check_resume_compatible(ckpt, {"data": "1c66acf3"})


def test_a_resume_with_changed_settings_says_so_and_the_resolved_recipe_keeps_the_record(tmp_path, capsys):
    """Changing the learning rate or max_steps on --resume is allowed, but it was silent, and recipe.resolved.yaml
    was replaced: the only record of the values steps 1-10 used was gone."""
    from unsloth_mgpu_cli.engine import _print_launch, _start_output_dir
    from unsloth_mgpu_cli.recipe import Recipe

    def recipe(lr: float, steps: int) -> Recipe:
        training = {"learning_rate": lr, "max_steps": steps, "warmup_steps": 1}
        return Recipe.model_validate(
            {"model": {"name": "builtin:tiny-llama"}, "dataset": {"path": "d.jsonl"}, "training": training}
        )

    out = tmp_path / "run"
    _start_output_dir(out, recipe(3e-3, 10), False, None, None)
    ckpt = out / "checkpoints" / "step-10"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"step": 10}))
    assert _start_output_dir(out, recipe(3e-3, 10), False, "auto", ckpt) == []  # the same recipe: nothing to say
    changed = _start_output_dir(out, recipe(1e-4, 14), False, "auto", ckpt)
    assert changed == ["training.learning_rate: 0.003 -> 0.0001", "training.max_steps: 10 -> 14"]
    (ckpt.parent / "step-14").mkdir()
    (ckpt.parent / "step-14" / "state.json").write_text(json.dumps({"step": 14}))
    again = _start_output_dir(out, recipe(1e-4, 20), False, "auto", ckpt.parent / "step-14")
    assert again == ["training.max_steps: 14 -> 20"]
    text = (out / "recipe.resolved.yaml").read_text()
    assert "# Resumed at step 10 with: training.learning_rate: 0.003 -> 0.0001; training.max_steps: 10 -> 14\n" in text
    assert "# Resumed at step 14 with: training.max_steps: 14 -> 20\n" in text and "max_steps: 20" in text
    nodes = SimpleNamespace(under_torchrun=False, describe=lambda: "")
    _print_launch(recipe(1e-4, 20), nodes, "auto", ckpt, [], again)
    printed = " ".join(capsys.readouterr().out.split())
    assert (
        "note: settings changed since the checkpoint (recorded in recipe.resolved.yaml): training.max_steps: 14 -> 20"
        in printed
    )
