"""Worker functions for tests that launch real gloo process groups (importable by spawned children)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def cpu_worker(timeout_seconds: int = 60) -> Iterator[Any]:
    """This process as one rank of a gloo group (what `D.launch` started), torn down on the way out."""
    os.environ["MGPU_DEVICE_TYPE"] = "cpu"
    from unsloth_mgpu_cli import distributed as D

    info = D.setup_worker(timeout_seconds=timeout_seconds)
    try:
        yield info
    finally:
        D.teardown()


def aggregate_known_tensors(cases: list[tuple[str, bool]]) -> dict:
    """Each rank holds grads [r+1, 10*(r+1) + {0,5,-3}]; returns the synchronised result of each (aggregation,
    grad_views) case, each with its own synchroniser, one group for all."""
    import torch

    from unsloth_mgpu_cli import distributed as D

    results = {}
    with cpu_worker(60) as info:
        r = info.rank
        values = {0: [1.0, 10.0, 7.0], 1: [2.0, 25.0, -3.0], 2: [3.0, 30.0, 100.0]}[r]
        for aggregation, views in cases:
            p1 = torch.nn.Parameter(torch.zeros(2))
            p2 = torch.nn.Parameter(torch.zeros(1))
            # a bucket size that forces two buckets, to exercise bucketing
            sync = D.GradientSynchronizer([p1, p2], info, aggregation, bucket_size_mb=8 / 2**20, grad_views=views)
            assert len(sync.buckets) == 2
            if views:
                # gradients accumulate into the flat buffers by autograd, as in training
                ((p1 * torch.tensor(values[:2])).sum() + (p2 * torch.tensor(values[2:])).sum()).backward()
                assert p1.grad.data_ptr() == sync.flats[0].data_ptr()
            else:
                p1.grad = torch.tensor(values[:2])
                p2.grad = torch.tensor(values[2:])
            assert bool(sync.grads_finite())
            sync.synchronize()
            out = {"rank": r, "grads": p1.grad.tolist() + p2.grad.tolist()}
            if views:
                sync.zero_grad()
                out["zeroed"] = p1.grad.tolist() + p2.grad.tolist()
            results[aggregation, views] = out
    return results


def mixed_dtype_steps(steps: int = 3) -> dict:
    """A bf16 weight (copy bucket) and two fp32 weights (a view bucket), as Unsloth's bf16 full fine-tuning has
    (fp32 norms): each step, rank r's gradients are (r+1) * (step+1) * [1, 2, ...]; returns the synchronised
    gradients of every step and the gradients left after `zero_grad`."""
    import torch

    from unsloth_mgpu_cli import distributed as D

    with cpu_worker(60) as info:
        w16 = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
        norm_a, norm_b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
        params = [w16, norm_a, norm_b]
        # 16 bytes per bucket: [w16] alone, then [norm_a, norm_b] together (fp32 only: views)
        sync = D.GradientSynchronizer(params, info, "sum", bucket_size_mb=20 / 2**20, grad_views=True)
        assert [len(b) for b in sync.buckets] == [1, 2] and sync.flats[0] is None and sync.flats[1] is not None
        opt = torch.optim.SGD(params, lr=0.0)
        out: dict = {"rank": info.rank, "grads": [], "zeroed": []}
        for step in range(steps):
            scale = float((info.rank + 1) * (step + 1))
            loss = sum((p.float() * torch.arange(1, p.numel() + 1) * scale).sum() for p in params)
            loss.backward()
            sync.synchronize()
            out["grads"].append([p.grad.float().tolist() for p in params])
            opt.step()
            sync.zero_grad()
            out["zeroed"].append([None if p.grad is None else p.grad.tolist() for p in params])
        return out


def bf16_gradients_summed() -> dict:
    """bf16 gradients that bf16 arithmetic cannot sum: 1 on one rank and 2**-8 on the two others (element j has
    its 1 on rank j % 3). Returns the gradient synchronised by `sum` and by `mean` and, as a control, a plain bf16
    all-reduce of it."""
    import torch
    import torch.distributed as dist

    from unsloth_mgpu_cli import distributed as D

    with cpu_worker(60) as info:
        values = [1.0 if j % 3 == info.rank else 2.0**-8 for j in range(9)]
        out: dict = {"rank": info.rank}
        for aggregation in ("sum", "mean"):
            w = torch.nn.Parameter(torch.zeros(9, dtype=torch.bfloat16))
            w.grad = torch.tensor(values, dtype=torch.bfloat16)
            D.GradientSynchronizer([w], info, aggregation, bucket_size_mb=1, grad_views=True).synchronize()
            out[aggregation] = [str(w.grad.dtype), w.grad.float().tolist()]
        control = torch.tensor(values, dtype=torch.bfloat16)
        dist.all_reduce(control, op=dist.ReduceOp.SUM)
        out["bf16"] = control.float().tolist()
        return out


def replaced_views() -> dict:
    """A library resets the gradients between steps (`model.zero_grad()`): the view bucket must still all-reduce."""
    import torch

    from unsloth_mgpu_cli import distributed as D

    with cpu_worker(60) as info:
        p = torch.nn.Parameter(torch.zeros(3))
        sync = D.GradientSynchronizer([p], info, "sum", grad_views=True)
        p.grad = None  # dropped before the backward
        (p * (info.rank + 1.0)).sum().backward()
        sync.synchronize()
        return {"rank": info.rank, "grad": p.grad.tolist(), "is_view": p.grad.data_ptr() == sync.flats[0].data_ptr()}


def sharded_mixed_dtypes() -> dict:
    """FSDP2 on a bf16 Llama whose norms are fp32 (Unsloth's bf16 full fine-tuning): one weighted step of SGD on
    each rank's half of a global batch, against the same step of an unsharded copy on the whole batch, and (the
    control, so the comparison must fail) of a copy on another batch. Returns the largest relative difference of
    the gathered weights, per dtype, for each reference."""
    import copy

    import torch
    from api_workers import tiny_llama

    from unsloth_mgpu_cli import distributed as D

    with cpu_worker(120) as info:
        model = tiny_llama(0).to(torch.bfloat16)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.data = p.data.float()  # in place: the Parameter stays the same object, as in Unsloth
        batch = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
        refs = {
            "same-batch": (copy.deepcopy(model), batch),
            "other-batch": (copy.deepcopy(model), batch.flip(0)[:, :8]),
        }
        mine = batch[info.rank * 2 : info.rank * 2 + 2]
        units = D.shard_model(model, info, "weighted")
        groups = [m for m in model.modules() if isinstance(m, torch.distributed.fsdp.FSDPModule)]
        tokens = 4 * 15  # loss tokens of the global batch (labels shift by one)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as Unsloth wraps the forward (fp32 norms, bf16 matmuls)
            (model(input_ids=mine, labels=mine).loss * (2 * 15 / tokens)).backward()
            for ref, ref_batch in refs.values():
                ref(input_ids=ref_batch, labels=ref_batch).loss.backward()
        opt.step()
        full = D.gather_full_tensors(list(model.named_parameters()))
        diffs: dict = {}
        for which, (ref, _) in refs.items():
            torch.optim.SGD(ref.parameters(), lr=1.0).step()
            diffs[which] = {}
            for name, p in ref.named_parameters():
                got = full[name]
                assert got.dtype == p.dtype, (name, got.dtype, p.dtype)
                rel = float((got.float() - p.detach().float()).norm() / p.detach().float().norm())
                key = str(p.dtype)
                diffs[which][key] = max(diffs[which].get(key, 0.0), rel)
        return {"rank": info.rank, "units": units, "groups": len(groups), "diffs": diffs}


def worker_affinity() -> dict:
    """The cores this worker may run on after setup_worker, and how many threads torch uses."""
    import torch

    from unsloth_mgpu_cli import distributed as D

    with cpu_worker(60) as info:
        # A rank that left at once could close its gloo sockets while the other was still connecting the full mesh
        # ("connectFullMesh failed ... Connection closed by peer", seen once in CI): both leave after a barrier.
        D.barrier(info)
        return {"rank": info.rank, "cores": sorted(os.sched_getaffinity(0)), "threads": torch.get_num_threads()}


def listening_addresses() -> dict:
    """The addresses that the launcher (the elastic agent's process: the rendezvous stores) and this worker listen
    on, while the run is up."""
    import psutil

    from unsloth_mgpu_cli import distributed as D

    def listening(pid: int) -> list[str]:
        conns = psutil.Process(pid).net_connections(kind="inet")
        return sorted({c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN})

    with cpu_worker(60) as info:
        D.barrier(info)
        return {"launcher": listening(int(os.environ[D.LAUNCHER_PID])), "worker": listening(os.getpid())}


def ranks_compare(per_rank: list) -> dict:
    """`check_ranks_agree` with `per_rank[rank]` as this rank's values: the error it raises, if any."""
    from unsloth_mgpu_cli import distributed as D
    from unsloth_mgpu_cli.errors import RanksDisagree

    with cpu_worker(60) as info:
        try:
            D.check_ranks_agree(per_rank[info.rank], info, "the nodes' recipes", "Run the same recipe.")
        except RanksDisagree as exc:
            return {"error": str(exc)}
        return {"error": None}


def ranks_disagree(per_rank: list) -> None:
    """`check_ranks_agree`, its error left to the launcher (as engine's worker leaves it)."""
    from unsloth_mgpu_cli import distributed as D

    with cpu_worker(60) as info:
        D.check_ranks_agree(per_rank[info.rank], info, "the nodes' recipes", "Run the same recipe.")
