"""Checkpoints, exact resume, Ctrl-C, eval, export and report: the real `mgpu` on CPU with 2 gloo workers.

One uninterrupted 10-step run is the reference; a run SIGKILLed after step 6 and resumed from its step-5
checkpoint, and a run stopped by Ctrl-C and resumed, must both end with exactly the reference's adapter.
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, adapter, assert_user_error, run_mgpu, start_mgpu, wait_until

pytestmark = pytest.mark.integration

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
RUN = [
    "training.max_steps=10",
    "training.warmup_steps=1",
    "output.save_steps=5",
    "output.save_total_limit=3",
    "distributed.num_gpus=2",
    "dataset.eval_ratio=0.05",
    "training.eval_steps=5",
    "logging.progress=false",
    # bitsandbytes' 8-bit AdamW (its CPU implementation): its state, partly in flat buffers, must resume exactly
    "training.optimizer=adamw_8bit",
]


def start(out: Path, *extra: str, **env: str) -> subprocess.Popen[str]:
    """`mgpu train` in its own session, so the test can signal the whole process tree like a terminal does."""
    return start_mgpu("train", str(QUICKSTART), *RUN, f"output.dir={out}", *extra, **env)


def wait_for_step(proc: subprocess.Popen[str], out: Path, step: int, timeout: float = 300) -> None:
    wait_until(proc, lambda: step in steps_logged(out), timeout, f"step {step} logged")


def steps_logged(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]


def group_is_gone(pgid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def resume(out: Path, *extra: str):
    return run_mgpu("train", str(QUICKSTART), *RUN, f"output.dir={out}", *extra, "--resume", "auto", timeout=400)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ckpt")
    # its evaluation after step 5 takes 1.5 s longer, which neither step 5's tokens/s nor step 6's may count
    ref = run_mgpu(
        "train",
        str(QUICKSTART),
        *RUN,
        f"output.dir={base / 'ref'}",
        "logging.report_to=[tensorboard]",
        "logging.progress=true",  # plain lines (no terminal): the order of step, eval and checkpoint lines is checked
        "logging.steps=1",
        timeout=400,
        MGPU_INJECT_FAULT="slow_eval:rank=0:step=5:seconds=1.5",
    )
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]

    # SIGKILL of the whole tree after step 6 is logged, then resume. Rank 0 stalls in step 8, before its update:
    # step 7 is then queued but not settled, and step 6's row (written once step 7's collective brings the
    # ranks' device times for step 6) is in the file
    killed = start(base / "killed", MGPU_INJECT_FAULT="sleep:rank=0:step=8:seconds=600")
    wait_for_step(killed, base / "killed", 6)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(30)
    assert group_is_gone(killed.pid)
    killed_ckpts = sorted(p.name for p in (base / "killed" / "checkpoints").iterdir())
    killed_steps = steps_logged(base / "killed")
    resumed = resume(base / "killed")

    # Ctrl-C (SIGINT to the process group) while rank 0 is inside step 4 (step 2's row is written while step 3
    # is queued: see the killed run above)
    ctrl_c = start(base / "ctrlc", MGPU_INJECT_FAULT="sleep:rank=0:step=4:seconds=4")
    wait_for_step(ctrl_c, base / "ctrlc", 2)
    os.killpg(ctrl_c.pid, signal.SIGINT)
    ctrl_c_out, _ = ctrl_c.communicate(timeout=300)
    ctrl_c_ckpts = sorted(p.name for p in (base / "ctrlc" / "checkpoints").iterdir())
    ctrl_c_gone = group_is_gone(ctrl_c.pid)
    ctrl_c_resumed = resume(base / "ctrlc")

    # SIGTERM to the process group (SLURM's scancel or preemption, systemd's stop) inside step 4, which lasts longer
    # than the workers wait for the launcher's stop file before taking a SIGTERM as the run's teardown
    term = start(base / "sigterm", MGPU_INJECT_FAULT="sleep:rank=0:step=4:seconds=8")
    wait_for_step(term, base / "sigterm", 2)
    os.killpg(term.pid, signal.SIGTERM)
    term_out, _ = term.communicate(timeout=300)
    term_dir = base / "sigterm" / "checkpoints"
    term_ckpts = sorted(p.name for p in term_dir.iterdir()) if term_dir.is_dir() else []

    # SIGKILL of the launcher alone inside step 4 (the host's OOM killer, `kill -9 <pid>`): no stop file, no signal
    # to the workers from us; the kernel's parent-death signal must stop them at a step boundary with a checkpoint
    orphans = start(base / "orphans", MGPU_INJECT_FAULT="sleep:rank=0:step=4:seconds=4")
    wait_for_step(orphans, base / "orphans", 2)
    os.kill(orphans.pid, signal.SIGKILL)
    orphans.wait(30)
    orphans_gone = group_is_gone(orphans.pid, timeout=120)
    if not orphans_gone:
        os.killpg(orphans.pid, signal.SIGKILL)
    orphans_ckpts = sorted(p.name for p in (base / "orphans" / "checkpoints").iterdir())
    return {
        "base": base,
        "ref_out": ref.stdout,
        "killed_ckpts": killed_ckpts,
        "killed_steps": killed_steps,
        "resumed": resumed,
        "ctrl_c_rc": ctrl_c.returncode,
        "ctrl_c_out": ctrl_c_out,
        "ctrl_c_ckpts": ctrl_c_ckpts,
        "ctrl_c_gone": ctrl_c_gone,
        "ctrl_c_resumed": ctrl_c_resumed,
        "term_rc": term.returncode,
        "term_out": term_out,
        "term_ckpts": term_ckpts,
        "term_gone": group_is_gone(term.pid),
        "orphans_gone": orphans_gone,
        "orphans_ckpts": orphans_ckpts,
        "orphans_steps": steps_logged(base / "orphans"),
    }


def test_killed_run_resumed_from_step_5_equals_the_uninterrupted_run(runs):
    base = runs["base"]
    assert runs["killed_ckpts"] == ["step-5"] and 6 in runs["killed_steps"] and 7 not in runs["killed_steps"]
    assert runs["resumed"].returncode == 0, runs["resumed"].stdout[-3000:] + runs["resumed"].stderr[-3000:]
    assert "resuming" in runs["resumed"].stdout and "step-5" in runs["resumed"].stdout
    ref, got = adapter(base / "ref"), adapter(base / "killed")
    assert ref.keys() == got.keys()
    assert all(float(v.abs().max()) > 1e-4 for k, v in ref.items() if "lora_B" in k)  # it trained
    assert all(torch.equal(ref[k], got[k]) for k in ref), {k: float((ref[k] - got[k]).abs().max()) for k in ref}
    # step 6 was logged before the kill and again after the resume: exactly once in the file, same values
    rows = [json.loads(line) for line in (base / "killed" / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (base / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]
    assert [r.get("eval_loss") for r in rows] == [r.get("eval_loss") for r in ref_rows]
    # a checkpoint's state.json carries the metrics row of its own step (rows are otherwise written a step late)
    # each rank draws its own random numbers (dropout masks): their RNG states differ (they were one stream, twice)
    rng = torch.load(base / "ref" / "checkpoints" / "step-5" / "rng.pt", weights_only=True)
    assert not torch.equal(rng["rank0"]["cpu"], rng["rank1"]["cpu"])
    saved = json.loads((base / "ref" / "checkpoints" / "step-5" / "state.json").read_text())["run_state"]
    assert saved["last_metrics"] == ref_rows[4]
    # run totals survive the resume: the tokens of all 10 steps, not just the 5 after it
    summary = json.loads((base / "killed" / "summary.json").read_text())
    assert summary["resumed_from_step"] == 5 and summary["tokens"] < summary["run_tokens"]  # steps 6-10 only
    assert summary["run_tokens"] == json.loads((base / "ref" / "summary.json").read_text())["run_tokens"]


def test_resuming_a_finished_run_does_nothing_and_max_steps_below_it_is_refused(runs):
    """The parent sees it from the checkpoint: no workers start, and nothing in output.dir changes (the summary
    of the finished run used to be overwritten with 0 tokens and a NaN loss)."""
    ref = runs["base"] / "ref"
    before = {p: p.stat().st_mtime_ns for p in ref.rglob("*") if p.is_file()}
    done = resume(ref)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "nothing to do" in done.stdout and "finished at step 10" in done.stdout and "launching" not in done.stdout
    assert_user_error(resume(ref, "training.max_steps=7"), "training.max_steps", "below the step", "step-10")
    assert {p: p.stat().st_mtime_ns for p in ref.rglob("*") if p.is_file()} == before


def test_ctrl_c_saves_a_checkpoint_exits_130_and_resume_finishes(runs):
    out = runs["base"] / "ctrlc"
    assert runs["ctrl_c_rc"] == 130, runs["ctrl_c_out"][-3000:]
    assert "--resume auto" in runs["ctrl_c_out"] and "Traceback" not in runs["ctrl_c_out"]
    # the command to continue is this one: with its overrides (output.dir among them), not the bare recipe
    again = runs["ctrl_c_out"].split("Continue with: ")[1].splitlines()[0]
    assert again.startswith("mgpu train ") and f"output.dir={out}" in again and again.endswith("--resume auto")
    stopped = sorted(int(n.split("-")[1]) for n in runs["ctrl_c_ckpts"])
    # the stop's checkpoint at a step boundary, and before it at most the regular one of step 5
    assert 3 <= stopped[-1] < 10 and all(s == 5 for s in stopped[:-1]), runs["ctrl_c_ckpts"]
    assert runs["ctrl_c_gone"], "processes of the interrupted run were left behind"
    assert runs["ctrl_c_resumed"].returncode == 0, runs["ctrl_c_resumed"].stderr[-3000:]
    ref, got = adapter(runs["base"] / "ref"), adapter(out)
    assert got.keys() == ref.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert steps_logged(out) == list(range(1, 11))
    # it continued from the stop's checkpoint (a run from scratch would end with the same weights)
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == stopped[-1]


def test_sigterm_to_the_process_group_saves_a_checkpoint_and_exits_130(runs):
    assert runs["term_rc"] == 130, runs["term_out"][-3000:]
    assert "SIGTERM: finishing the current step" in runs["term_out"] and "--resume auto" in runs["term_out"]
    stopped = sorted(int(n.split("-")[1]) for n in runs["term_ckpts"])
    assert stopped, "no checkpoint saved: the workers took the SIGTERM as the run's teardown\n" + runs["term_out"]
    assert 3 <= stopped[-1] < 10 and all(s == 5 for s in stopped[:-1]), runs["term_ckpts"]
    assert runs["term_gone"], "processes of the stopped run were left behind"
    assert steps_logged(runs["base"] / "sigterm") == list(range(1, stopped[-1] + 1))


def test_a_second_ctrl_c_stops_at_once_with_ranks_stuck_in_cpp(tmp_path):
    # In step 4 rank 1 is stuck where Python's signal handlers cannot run (as in a hung NCCL collective or GPU
    # sync), and rank 0 waits for it inside gloo's all-reduce (C++ too): neither reaches a step boundary
    proc = start(tmp_path / "run", MGPU_INJECT_FAULT="stuck:rank=1:step=4:seconds=600")
    wait_for_step(proc, tmp_path / "run", 2)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(2)
    second = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    seconds = time.monotonic() - second
    assert proc.returncode == 130, out[-3000:]
    assert "stopped at once on a second SIGINT" in out and "--resume auto" in out, out[-3000:]
    assert "Traceback" not in out and "death signal" not in out, out[-3000:]  # no traceback, no torch warnings
    assert group_is_gone(proc.pid), "processes of the stopped run were left behind"
    assert seconds < 20, f"{seconds:.0f} s after the second Ctrl-C (torch's own grace before SIGKILL is 30 s)"


def test_workers_of_a_killed_launcher_checkpoint_and_exit(runs):
    # all gone, after saving the step they were in (nothing lost). Before the fix torch's own parent-death SIGINT
    # often came twice, and the second one aborted the workers without a checkpoint (about half of the tries).
    assert runs["orphans_gone"], "workers of the SIGKILLed launcher were left behind"
    stopped = sorted(int(n.split("-")[1]) for n in runs["orphans_ckpts"])
    assert 3 <= stopped[-1] < 10 and all(s == 5 for s in stopped[:-1]), runs["orphans_ckpts"]
    assert runs["orphans_steps"] == list(range(1, stopped[-1] + 1))


def test_resume_refuses_a_changed_global_batch_and_changes_nothing(runs):
    out = runs["base"] / "ref"
    before = {p.name: p.read_bytes() for p in (out / "recipe.resolved.yaml", out / "metrics.jsonl")}
    proc = resume(out, "training.micro_batch_size=2")
    assert_user_error(
        proc, "global batch", "checkpoint was trained with 8", "now gives 4", "training.micro_batch_size", "--overwrite"
    )
    assert {p.name: p.read_bytes() for p in (out / "recipe.resolved.yaml", out / "metrics.jsonl")} == before


def test_eval_loss_is_logged_every_eval_steps_and_at_the_end(runs):
    rows = [json.loads(line) for line in (runs["base"] / "ref" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if "eval_loss" in r}
    assert sorted(evals) == [5, 10]
    for r in evals.values():
        assert 0 < r["eval_loss"] < 20
        assert r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"]), rel=1e-9)
    assert evals[10]["eval_loss"] < evals[5]["eval_loss"]  # it learns something the held-out rows share
    # evaluating is not training: an eval step's tokens/s and the next step's are like the others' (the eval step's
    # window once shrank to nothing: 7e11 tokens/s, and the next step's took the eval time). Step 5's evaluation
    # lasts 1.5 s longer (slow_eval): ten steps' time here, far outside the 3x band if a window counted it.
    speeds = {r["step"]: r["tokens_per_second"] for r in rows if r["step"] > 1}  # step 1 compiles
    typical = statistics.median(v for k, v in speeds.items() if k not in (5, 6, 10))
    assert all(typical / 3 < speeds[k] < typical * 3 for k in (5, 6, 10)), speeds
    # in the log, a step's own line comes first, then its evaluation, then its checkpoint
    lines = runs["ref_out"].splitlines()
    at = {
        key: next((i for i, line in enumerate(lines) if line.startswith(key)), -1)
        for key in ("step 5/10 ", "eval step 5:", "checkpoint step-5 saved", "step 6/10 ")
    }
    assert -1 not in at.values() and list(at.values()) == sorted(at.values()), (at, runs["ref_out"][-3000:])
    summary = json.loads((runs["base"] / "ref" / "summary.json").read_text())
    assert summary["eval_s"] > 1.5 and summary["tokens_per_second"] == pytest.approx(
        summary["tokens"] / (summary["elapsed_s"] - summary["eval_s"]), rel=1e-6
    )
    # after the first step (what the bar showed): its tokens and its time left out
    after_first = (summary["tokens"] - rows[0]["tokens"]) / (
        summary["elapsed_s"] - summary["first_step_s"] - summary["eval_s"]
    )
    assert summary["steady_tokens_per_second"] == pytest.approx(after_first, rel=1e-6)


def test_tensorboard_gets_the_same_scalars(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["base"] / "ref" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 11))
    assert [e.step for e in acc.Scalars("eval/loss")] == [5, 10]


def test_report_prints_the_table_and_writes_the_png(runs):
    out = runs["base"] / "ref"
    proc = run_mgpu("report", str(out), timeout=120)
    assert proc.returncode == 0, proc.stderr
    for needle in ("tokens/s", "per worker (2 workers)", "GB per worker", "best eval loss", "report.png"):
        assert needle in proc.stdout, proc.stdout
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_merged_export_gives_the_logits_of_base_plus_adapter(runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = runs["base"] / "ref"
    proc = run_mgpu("export", str(out), "--merged", "--dtype", "float32", "--output", str(out / "merged32"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # into a pipe: a line as each slow phase starts and one that says where it went, timed; no bar frames or
    # library warnings
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert [line.split("] ", 1)[1].split(" ")[0] for line in lines] == ["loading", "merging", "writing", "wrote"], lines
    assert all(line.startswith("[") and " s] " in line for line in lines), lines
    assert f"wrote {out / 'merged32'} (float32, " in lines[-1] and " MiB); load it with " in lines[-1], lines
    assert lines[-1].endswith(f"AutoModelForCausalLM.from_pretrained('{out / 'merged32'}')"), lines
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged32"), dtype=torch.float32)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"], dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 13, 21, 34, 55]])
    with torch.no_grad():
        plain = base(ids).logits.clone()
        want = PeftModel.from_pretrained(base, str(out / "adapter"))(ids).logits
        got = merged(ids).logits
    assert float((want - plain).abs().max()) > 1e-3  # the adapter matters, so the comparison means something
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), float((got - want).abs().max())
    # the default 16-bit export
    proc = run_mgpu("export", str(out), "--merged")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "merged" / "config.json").read_text()).get("dtype") == "bfloat16"
    assert (out / "merged" / "model.safetensors").exists() and (out / "merged" / "tokenizer.json").exists()


def test_ctrl_c_while_the_workers_load_the_model_stops_before_the_first_step(tmp_path):
    """Before any step of the session there is nothing to finish or save: the workers used to load the model,
    train step 1 and write a checkpoint first (minutes on a real model, past `docker stop`'s 10 s)."""
    proc = start(tmp_path / "run")
    lines = []
    for line in proc.stdout:  # rank 0 prints Unsloth's banner while it imports Unsloth to load the model
        lines.append(line)
        if line.startswith("Unsloth"):
            break
    os.killpg(proc.pid, signal.SIGINT)
    rest, _ = proc.communicate(timeout=300)
    out = "".join(lines) + rest
    assert proc.returncode == 130, out[-3000:]
    assert "stopped before the first step of this session" in out and "--resume auto" in out, out[-3000:]
    assert not list((tmp_path / "run").glob("checkpoints/step-*")) and steps_logged(tmp_path / "run") == []
    assert group_is_gone(proc.pid), "processes of the stopped run were left behind"


def test_early_stopping_ends_every_rank_at_once_and_a_resume_has_nothing_left(tmp_path):
    """training.early_stopping_patience: with a threshold no evaluation can beat, the run ends at its third
    evaluation (patience 2), on both workers together, with a checkpoint, the adapter and the summary of a finished
    run; --resume auto then has nothing to do, and without the patience it trains on to max_steps."""
    out = tmp_path / "run"
    args = ("train", str(QUICKSTART), *RUN, f"output.dir={out}", "training.max_steps=20", "training.eval_steps=2")
    stop = ("training.early_stopping_patience=2", "training.early_stopping_threshold=100")
    proc = run_mgpu(*args, *stop, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "early stop at step 6: 2 evaluations in a row did not lower the eval loss by more than" in text, text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["stopped_early"] is True and summary["best_eval_step"] in (2, 4, 6)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6 and [r["step"] for r in rows if "eval_loss" in r] == [2, 4, 6]
    assert summary["best_eval_loss"] == min(r["eval_loss"] for r in rows if "eval_loss" in r)
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "checkpoints" / "step-6").is_dir()
    assert "stopped early" in text  # the summary table's eval row
    again = run_mgpu(*args, *stop, "--resume", "auto", timeout=400)
    assert again.returncode == 0 and "nothing to do" in again.stdout and "stopped early at step 6" in again.stdout
    go_on = run_mgpu(*args, "--resume", "auto", timeout=400)
    assert go_on.returncode == 0, go_on.stdout[-3000:] + go_on.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 20


def test_keep_best_leaves_the_best_evaluations_weights_as_the_adapter(tmp_path):
    """output.keep_best (transformers' load_best_model_at_end): eval on rows unlike the training data, whose loss
    is lowest at step 4 of 8 here, and the adapter is step 4's weights (those of its checkpoint), not step 8's."""
    import random

    from safetensors.torch import load_file

    rng = random.Random(0)
    words = lambda n: " ".join("".join(rng.choice("qxzjkvw") for _ in range(rng.randint(2, 7))) for _ in range(n))  # noqa: E731
    noise = tmp_path / "noise.jsonl"
    noise.write_text(
        "".join(json.dumps({"instruction": words(8), "input": "", "output": words(12)}) + "\n" for _ in range(16))
    )
    out = tmp_path / "run"
    proc = run_mgpu(
        "train", str(QUICKSTART), f"output.dir={out}", "training.max_steps=8", "training.warmup_steps=0",
        "training.lr_scheduler=constant", "training.learning_rate=0.01", f"dataset.eval_path={noise}",
        "training.eval_steps=2", "output.keep_best=true", "output.save_steps=2", "output.save_total_limit=null",
        "distributed.num_gpus=2", "logging.progress=false", timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    best = min(evals, key=evals.get)
    assert sorted(evals) == [2, 4, 6, 8] and best < 8, evals  # the case this test is about
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["best_eval_step"], summary["final_weights_step"], summary["steps"]) == (best, best, 8)
    assert f"the final weights are step {best}'s, the best evaluation's" in proc.stdout
    final = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
             for k, v in adapter(out).items()}  # fmt: skip

    def trainable(step: int) -> dict:
        return load_file(str(out / "checkpoints" / f"step-{step}" / "trainable.safetensors"))

    assert final.keys() == trainable(best).keys()
    assert all(torch.equal(final[k], trainable(best)[k]) for k in final)
    assert not all(torch.equal(final[k], trainable(8)[k]) for k in final)
    assert not (out / "adapter" / ".mgpu-best.json").exists() and (out / "best" / ".mgpu-best.json").is_file()
