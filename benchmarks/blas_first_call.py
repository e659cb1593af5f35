"""How long the host spends in a bf16 matmul whose shape it has not seen (session 9, s9a: 3.6-4.9 ms per new row
count in Unsloth's fused loss, with the GPU idle). For each BLAS backend and each product of the loss (W: a vocabulary
chunk of the head, [V, H]): host ms of the first call with a new row count M, host ms of a second call with the same
M, and the kernel's GPU ms. Run on a GPU: python3 benchmarks/blas_first_call.py OUT.json"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

H, V = 2048, 24904


def host_ms(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t) * 1e3
    torch.cuda.synchronize()
    return ms


def trial(lib: str, case: str, ms: list[int]) -> dict:
    torch.backends.cuda.preferred_blas_library(lib)
    w = torch.randn(V, H, device="cuda", dtype=torch.bfloat16)
    first, again, gpu = [], [], []
    for m in ms:
        if case == "logits":  # [M, H] x [H, V]: hidden times the head
            a = torch.randn(m, H, device="cuda", dtype=torch.bfloat16)
            fn = lambda a=a: torch.mm(a, w.t())  # noqa: E731
        else:  # "grad_hidden": [M, V] x [V, H]
            a = torch.randn(m, V, device="cuda", dtype=torch.bfloat16)
            fn = lambda a=a: torch.mm(a, w)  # noqa: E731
        first.append(host_ms(fn))
        again.append(host_ms(fn))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        gpu.append(start.elapsed_time(end))
    return {
        "first_host_ms_median": round(statistics.median(first), 3),
        "first_host_ms_max": round(max(first), 3),
        "again_host_ms_median": round(statistics.median(again), 3),
        "gpu_ms_median": round(statistics.median(gpu), 3),
    }


def main() -> None:
    torch.manual_seed(0)
    out: dict = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name()}
    warm = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    torch.mm(warm, warm)
    rows = iter(range(101, 4000, 7))  # a row count is never used twice
    for lib in ("cublas", "cublaslt"):
        for case in ("logits", "grad_hidden"):
            out[f"{lib} {case}"] = trial(lib, case, [next(rows) for _ in range(12)])
    text = json.dumps(out, indent=1)
    print(text)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
