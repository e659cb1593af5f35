"""`mgpu doctor --probe`: start one worker per GPU, all-reduce, check the sum and time it.

    mgpu doctor --probe
    python -m unsloth_mgpu_cli.probe --nproc 2 --device cpu --result /tmp/probe.json   # what the doctor runs

The doctor's process never touches CUDA or a process group: it runs this module as a child process (in its
own session) with a wall-clock limit and kills the whole session when the limit passes, so a stuck
rendezvous or a hung NCCL kernel becomes a failed check instead of a hang. Inside the child, PyTorch's
elastic agent (`elastic_launch`, the machinery behind `torchrun`) starts the workers with a c10d
rendezvous on 127.0.0.1; each worker reads RANK / WORLD_SIZE / LOCAL_RANK, pins its GPU and joins an NCCL
(CUDA) or gloo (CPU) process group.

Bandwidth follows nccl-tests: algbw = bytes / time, busbw = algbw x 2(n-1)/n for all-reduce, which is
comparable across world sizes and close to the link's usable speed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MIB = 1024**2


@dataclass
class ProbeResult:
    """What the probe measured.

    Attributes:
        ok: every worker joined, the all-reduce sums were right, and nothing timed out.
        device: "cuda" or "cpu".
        backend: "nccl" or "gloo".
        world_size: worker processes started.
        size_mb: all-reduce message size in MiB.
        algbw_gbps: all-reduce algorithm bandwidth over all workers, GB/s.
        busbw_gbps: all-reduce bus bandwidth over all workers, GB/s.
        pairs: per pair of workers: `a`, `b`, `busbw_gbps` (a 2-worker all-reduce between just those two).
        seconds: wall time of the whole probe, start-up included.
        error: why it failed; None when ok.
    """

    ok: bool
    device: str
    backend: str
    world_size: int
    size_mb: float = 0.0
    algbw_gbps: float | None = None
    busbw_gbps: float | None = None
    pairs: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_probe(
    nproc: int, device: str, timeout: float = 120.0, size_mb: float | None = None, iters: int | None = None
) -> ProbeResult:
    """Run the all-reduce probe in a child process and wait at most `timeout` seconds.

    Args:
        nproc: workers to start (one per GPU on CUDA).
        device: "cuda" (NCCL) or "cpu" (gloo).
        timeout: wall-clock limit for everything, start-up included; past it the child session is killed.
        size_mb: all-reduce message size; 256 MiB on CUDA, 8 MiB on CPU by default.
        iters: timed repetitions after warm-up; 20 on CUDA, 5 on CPU by default.

    Returns:
        The measurement, or `ok=False` with the reason (time-out, wrong sum, worker error).
    """
    backend = "nccl" if device == "cuda" else "gloo"
    size_mb = size_mb or (256.0 if device == "cuda" else 8.0)
    iters = iters or (20 if device == "cuda" else 5)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mgpu-probe-") as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "unsloth_mgpu_cli.probe", "--nproc", str(nproc), "--device", device,
               "--size-mb", str(size_mb), "--iters", str(iters), "--timeout", str(max(int(timeout), 1)),
               "--result", str(result_path)]  # fmt: skip
        env = dict(os.environ)
        # Workers must import this very package (a checkout may not be the installed copy).
        package_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("OMP_NUM_THREADS", "1")
        # A new session, so that on time-out one killpg reaches the agent and every worker it spawned.
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # fmt: skip
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_session(proc)
            return ProbeResult(False, device, backend, nproc, size_mb, seconds=round(time.perf_counter() - start, 2),
                               error=f"timed out after {timeout:g} s (workers did not finish; killed)")  # fmt: skip
        seconds = round(time.perf_counter() - start, 2)
        if proc.returncode != 0 or not result_path.exists():
            tail = "\n".join(output.strip().splitlines()[-15:])
            return ProbeResult(False, device, backend, nproc, size_mb, seconds=seconds,
                               error=f"probe exited with code {proc.returncode}:\n{tail}")  # fmt: skip
        data = json.loads(result_path.read_text())
    data["seconds"] = seconds
    return ProbeResult(**data)


def _kill_session(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


# ---------------------------------------------------------------------------------------------------------------
# Child side: the elastic agent and the workers. Nothing below runs in the doctor's own process.


def _worker(device: str, size_mb: float, iters: int, timeout: int) -> dict[str, Any]:
    """One rank: join the group, check a small all-reduce is exact, then time a large one (world and per pair)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from .distributed import show_only_own_gpu

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device == "cuda":
        # As a training worker: before any CUDA call, only this rank's GPU is visible (cuda:0), so the NCCL
        # communicator and every tensor live there and NCCL finds its peers as training's workers do.
        show_only_own_gpu(os.environ, int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"]))
        torch.cuda.set_device(0)
        dev = torch.device("cuda", 0)
        dist.init_process_group("nccl", timeout=timedelta(seconds=timeout), device_id=dev)
    else:
        torch.set_num_threads(1)
        dev = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
    try:
        # Correctness: rank r contributes r+1 everywhere, so every element must become n(n+1)/2.
        check = torch.full((1024,), float(rank + 1), device=dev)
        dist.all_reduce(check)
        expected = world * (world + 1) / 2
        if not bool(torch.all(check == expected)):
            raise RuntimeError(f"all-reduce sum wrong on rank {rank}: {check[0].item()} != {expected}")

        numel = int(size_mb * MIB) // 4
        buf = torch.ones(numel, dtype=torch.float32, device=dev)
        algbw = _time_all_reduce(buf, iters, None, dev)
        out: dict[str, Any] = {"algbw_gbps": algbw, "busbw_gbps": algbw * 2 * (world - 1) / world, "pairs": []}
        if world == 2:
            out["pairs"].append({"a": 0, "b": 1, "busbw_gbps": out["busbw_gbps"]})
        else:
            # new_group is collective: every rank creates every pair group, in the same order.
            for a in range(world):
                for b in range(a + 1, world):
                    group = dist.new_group([a, b])
                    if rank in (a, b):
                        bw = _time_all_reduce(buf, iters, group, dev)
                        out["pairs"].append({"a": a, "b": b, "busbw_gbps": bw})  # 2 ranks: busbw == algbw
                    dist.barrier()
        return out
    finally:
        dist.destroy_process_group()


def _time_all_reduce(buf: Any, iters: int, group: Any, dev: Any) -> float:
    import torch
    import torch.distributed as dist

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(2):  # warm-up: connection set-up and NCCL channel allocation happen here
        dist.all_reduce(buf, group=group)
    sync()
    dist.barrier(group=group)
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(buf, group=group)
    sync()
    elapsed = time.perf_counter() - t0
    return buf.numel() * buf.element_size() * iters / elapsed / 1e9


def _launch(nproc: int, device: str, size_mb: float, iters: int, timeout: int) -> dict[str, Any]:
    """Start `nproc` workers with the elastic agent and merge rank 0's numbers with every rank's pair timings."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from .distributed import LOOPBACK_RDZV, LaunchSpec, free_port, nccl_on_loopback, register_loopback_rendezvous

    # one host: every socket on loopback, as for `mgpu train` (see distributed.build_launch_config)
    register_loopback_rendezvous()
    nccl_on_loopback(os.environ, LaunchSpec(nproc_per_node=nproc, device_type=device))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"mgpu-probe-{os.getpid()}",
        rdzv_backend=LOOPBACK_RDZV,
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        local_addr="127.0.0.1",
        rdzv_configs={"join_timeout": timeout},
        max_restarts=0,  # a probe that needs a restart has already answered the question
        monitor_interval=0.1,
        start_method="spawn",
    )
    results = elastic_launch(config, _worker)(device, size_mb, iters, timeout)
    first = results[0]
    pairs: dict[tuple[int, int], dict[str, Any]] = {}
    for rank in sorted(results):  # both ends time a pair; keep the lower rank's number, like rank 0's for the world
        for p in results[rank]["pairs"]:
            pairs.setdefault((p["a"], p["b"]), p)
    return {
        "ok": True,
        "device": device,
        "backend": "nccl" if device == "cuda" else "gloo",
        "world_size": nproc,
        "size_mb": size_mb,
        "algbw_gbps": round(first["algbw_gbps"], 3),
        "busbw_gbps": round(first["busbw_gbps"], 3),
        "pairs": [{**p, "busbw_gbps": round(p["busbw_gbps"], 3)} for _, p in sorted(pairs.items())],
    }


def main(argv: list[str] | None = None) -> int:
    """The probe's child process: run the workers and write their JSON result to `--result` (exit 0 once written)."""
    parser = argparse.ArgumentParser(description="All-reduce probe (run by `mgpu doctor --probe`).")
    parser.add_argument("--nproc", type=int, required=True)
    parser.add_argument("--device", choices=["cuda", "cpu"], required=True)
    parser.add_argument("--size-mb", type=float, default=8.0)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--timeout", type=int, default=120)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args(argv)
    data = _launch(args.nproc, args.device, args.size_mb, args.iters, args.timeout)
    args.result.write_text(json.dumps(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
