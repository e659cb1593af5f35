"""Run by tests/test_data_train.py (CPU) and tests/test_gpu.py (CUDA) in a subprocess (Unsloth patches transformers
process-wide): the loss of a packed row through Unsloth's model equals the same samples run one by one, with the
sample lengths found in the positions or given as `packed_seq_lengths` (what `TokenizedData.collate(packed=True)`
passes); a naive concatenation differs. Also how this Unsloth says it attends packed rows
(varlen.unsloth_packed_route, read by the GPU warning).

On CUDA (`--cuda`: bfloat16) it also counts the forward's host-device syncs (torch's sync debug mode) with the
lengths found in the positions and with them given, and gives the loss with wrong lengths (one segment per pair of
samples), which must differ from the right ones if Unsloth reads the keyword at all.

    python tests/packing_probe.py [--cuda]   -> prints one JSON line
"""

from __future__ import annotations

import json
import os
import sys
import warnings

os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from unsloth import FastLanguageModel  # noqa: E402

from unsloth_mgpu_cli.models import ensure_builtin_model  # noqa: E402
from unsloth_mgpu_cli.varlen import unsloth_packed_route  # noqa: E402


def main() -> None:
    cuda = "--cuda" in sys.argv[1:]
    device = "cuda" if cuda else "cpu"
    model, _ = FastLanguageModel.from_pretrained(
        model_name=str(ensure_builtin_model("builtin:tiny-llama")),
        max_seq_length=256,
        dtype=torch.bfloat16 if cuda else torch.float32,
        load_in_4bit=False,
        **({"device_map": {"": 0}} if cuda else {}),
    )
    model = FastLanguageModel.get_peft_model(
        model, r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_gradient_checkpointing=False
    )
    torch.manual_seed(0)
    samples = [torch.randint(10, 1000, (n,)) for n in (37, 60, 23, 45)]
    syncs: dict[str, int] = {}

    def loss_sum(ids, labels, pos=None, lengths=None, name: str | None = None) -> float:
        kw = {"input_ids": ids.to(device), "labels": labels.to(device), "use_cache": False}
        if pos is not None:
            kw["position_ids"] = pos.to(device)
        if lengths is not None:
            kw["packed_seq_lengths"] = lengths  # on the host, as the trainer passes it
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            if cuda and name:
                torch.cuda.synchronize()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            try:
                loss = model(**kw).loss
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
        if name:
            syncs[name] = sum("synchroniz" in str(w.message) for w in caught)
        return float(loss) * int((labels[:, 1:] != -100).sum())

    one_by_one = sum(loss_sum(s[None], s[None].clone()) for s in samples)
    ids = torch.cat(samples)[None]
    labels = ids.clone()
    lens = [len(s) for s in samples]
    starts = torch.cumsum(torch.tensor([0] + lens[:-1]), 0)
    labels[0, starts] = -100
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    lengths = torch.tensor(lens, dtype=torch.int32)
    wrong = torch.tensor([lens[0] + lens[1], lens[2] + lens[3]], dtype=torch.int32)
    loss_sum(ids, labels, pos, lengths)  # warm-up: Unsloth builds its kernels' caches on the first packed call
    result = {
        "one_by_one": one_by_one,
        "packed": loss_sum(ids, labels, pos, name="positions"),
        "packed_lengths": loss_sum(ids, labels, pos, lengths, name="lengths"),
        "wrong_lengths": loss_sum(ids, labels, pos, wrong),
        "naive": loss_sum(ids, labels, torch.arange(ids.shape[1])[None]),
        "route": unsloth_packed_route(),
    }
    if cuda:
        result["syncs"] = syncs
    print(json.dumps(result))


if __name__ == "__main__":
    main()
