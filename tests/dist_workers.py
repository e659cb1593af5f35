"""Worker functions for tests that launch real gloo process groups (importable by spawned children)."""

from __future__ import annotations

import os


def aggregate_known_tensors(aggregation: str, views: bool = False) -> dict:
    """Each rank holds grads [r+1, 10*(r+1) + {0,5,-3}]; returns the synchronised result."""
    os.environ["MGPU_DEVICE_TYPE"] = "cpu"
    import torch

    from unsloth_mgpu_cli import distributed as D

    info = D.setup_worker(timeout_seconds=60)
    try:
        r = info.rank
        values = {0: [1.0, 10.0, 7.0], 1: [2.0, 25.0, -3.0], 2: [3.0, 30.0, 100.0]}[r]
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
            sync.zero_grad(None)
            out["zeroed"] = p1.grad.tolist() + p2.grad.tolist()
        return out
    finally:
        D.teardown()
