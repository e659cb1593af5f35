"""Which attention route Unsloth takes for a packed row here, and what each candidate kernel costs.

Run on the GPU machine (`bash benchmarks/gpu_plan.sh s24`). Prints the torch / xformers versions, whether
xformers' block-diagonal kernel and torch's `varlen_attn` run, Unsloth's choice for packed and dense calls, and
the time of one forward + backward of a packed row (64 GSM8K-like samples, GQA 32/8 heads of 64, the 1B) through each
route that runs: one SDPA call per sample (Unsloth's fallback), xformers' block-diagonal mask, and torch varlen
with the key/value heads repeated.
"""

from __future__ import annotations

import inspect
import time

import torch
import torch.nn.functional as F


def timed(fn, repeat: int = 10) -> float:
    """Median milliseconds of fn() (forward and backward), after two warm-up calls."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
    gen = torch.Generator().manual_seed(0)
    lengths = (torch.randint(120, 330, (64,), generator=gen)).tolist()  # GSM8K rows: about 120-330 tokens
    total, heads, kv_heads, dim = sum(lengths), 32, 8, 64
    print(f"packed row: {len(lengths)} samples, {total} tokens, heads {heads}/{kv_heads}, head dim {dim}")
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(1, heads, total, dim, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(1, kv_heads, total, dim, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(1, kv_heads, total, dim, device=dev, dtype=dt, requires_grad=True)
    bounds = torch.tensor([0, *lengths], device=dev).cumsum(0)

    def per_sample() -> None:
        outs = []
        for i in range(len(lengths)):
            a, b = int(bounds[i]), int(bounds[i + 1])
            outs.append(
                F.scaled_dot_product_attention(
                    q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, enable_gqa=True
                )
            )
        torch.cat(outs, 2).sum().backward()

    print(f"one SDPA call per sample: {timed(per_sample):.2f} ms")

    def dense() -> None:
        full = torch.cat([torch.full((n,), i, device=dev) for i, n in enumerate(lengths)])
        mask = (full[:, None] == full[None, :]).tril()
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).sum().backward()

    print(f"one SDPA call, dense {total}x{total} mask: {timed(dense):.2f} ms")

    try:
        import xformers
        import xformers.ops as xops
        from xformers.ops.fmha.attn_bias import BlockDiagonalCausalMask

        bias = BlockDiagonalCausalMask.from_seqlens(lengths)

        def block_diagonal() -> None:
            groups = heads // kv_heads
            qx = q.transpose(1, 2).reshape(1, total, kv_heads, groups, dim)
            kx = k.transpose(1, 2)[:, :, :, None].expand(1, total, kv_heads, groups, dim)
            vx = v.transpose(1, 2)[:, :, :, None].expand(1, total, kv_heads, groups, dim)
            xops.memory_efficient_attention(qx, kx, vx, attn_bias=bias).sum().backward()

        print("xformers", xformers.__version__, f"block-diagonal: {timed(block_diagonal):.2f} ms")
    except Exception as exc:  # the probe reports what fails, whatever it is
        print("xformers does not run:", repr(exc)[:400])

    try:
        from torch.nn.attention.varlen import varlen_attn

        print("varlen_attn", inspect.signature(varlen_attn))
        cu = bounds.to(torch.int32)
        params = inspect.signature(varlen_attn).parameters
        causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}

        def varlen() -> None:
            qv = q[0].transpose(0, 1)
            kv = k[0].transpose(0, 1).repeat_interleave(heads // kv_heads, 1)
            vv = v[0].transpose(0, 1).repeat_interleave(heads // kv_heads, 1)
            varlen_attn(qv, kv, vv, cu, cu, max(lengths), max(lengths), **causal).sum().backward()

        print(f"torch varlen_attn (kv heads repeated): {timed(varlen):.2f} ms")
    except Exception as exc:
        print("torch varlen_attn does not run:", repr(exc)[:400])

    import unsloth  # noqa: F401  (after the kernels: its import patches torch)
    from unsloth.utils import attention_dispatch as dispatch

    print(
        "unsloth:",
        {
            name: getattr(dispatch, name, "absent")
            for name in ("HAS_FLASH_ATTENTION", "HAS_XFORMERS", "_NATIVE_BEATS_XFORMERS", "_SDPA_PACKED_SEGMENTS")
        },
        "torch varlen loaded:",
        getattr(dispatch, "_TORCH_VARLEN_ATTN", None) is not None,
    )
    print(
        "unsloth backend: packed",
        dispatch.select_attention_backend(True),
        "dense",
        dispatch.select_attention_backend(False),
    )


if __name__ == "__main__":
    main()
