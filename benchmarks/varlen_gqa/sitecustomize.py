"""Benchmark-only experiment (gpu_plan.sh s24b), not part of the package: torch 2.12's `enable_gqa` for torch 2.11.

Unsloth 2026.10.9 sends a packed row (ours, or TRL's padding-free and packed batches) to torch's variable-length
flash kernel `torch.nn.attention.varlen.varlen_attn` only when that function takes `enable_gqa` (torch 2.12 on);
the GPU image's torch 2.11 lacks it, so each sample of the row gets its own SDPA call. With
MGPU_BENCH_VARLEN_GQA=1 and this folder first on PYTHONPATH, varlen_attn gains the keyword (the key/value heads
repeated to the query's), so the benchmark measures what a packed row costs with a variable-length kernel.
"""

import os

if os.environ.get("MGPU_BENCH_VARLEN_GQA") == "1":
    import inspect

    import torch.nn.attention.varlen as _varlen

    _plain = _varlen.varlen_attn
    if "enable_gqa" not in inspect.signature(_plain).parameters:

        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, enable_gqa=False, **kwargs):
            if enable_gqa and key.shape[1] != query.shape[1]:
                groups = query.shape[1] // key.shape[1]
                key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
            return _plain(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **kwargs)

        varlen_attn.__signature__ = inspect.signature(_plain).replace(
            parameters=[
                *inspect.signature(_plain).parameters.values(),
                inspect.Parameter("enable_gqa", inspect.Parameter.KEYWORD_ONLY, default=False),
            ]
        )
        _varlen.varlen_attn = varlen_attn
