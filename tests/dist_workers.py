"""Worker functions for tests that launch real gloo process groups (importable by spawned children)."""

from __future__ import annotations

import os


def aggregate_known_tensors(aggregation: str) -> dict:
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
        p1.grad = torch.tensor(values[:2])
        p2.grad = torch.tensor(values[2:])
        # a bucket size that forces two buckets, to exercise bucketing
        sync = D.GradientSynchronizer([p1, p2], info, aggregation, bucket_size_mb=8 / 2**20)
        assert len(sync.buckets) == 2
        sync.synchronize()
        return {"rank": r, "grads": p1.grad.tolist() + p2.grad.tolist()}
    finally:
        D.teardown()
