"""Run by tests/test_data_train.py in a subprocess (Unsloth patches transformers process-wide): the loss of a
packed row through Unsloth's model equals the same samples run one by one; a naive concatenation differs. Also
how this Unsloth says it attends packed rows (varlen.unsloth_packed_route, read by the GPU warning).

    python tests/packing_probe.py   -> prints one JSON line
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from unsloth import FastLanguageModel  # noqa: E402

from unsloth_mgpu_cli.models import ensure_builtin_model  # noqa: E402
from unsloth_mgpu_cli.varlen import unsloth_packed_route  # noqa: E402


def main() -> None:
    model, _ = FastLanguageModel.from_pretrained(
        model_name=str(ensure_builtin_model("builtin:tiny-llama")),
        max_seq_length=256,
        dtype=torch.float32,
        load_in_4bit=False,
    )
    model = FastLanguageModel.get_peft_model(
        model, r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_gradient_checkpointing=False
    )
    torch.manual_seed(0)
    samples = [torch.randint(10, 1000, (n,)) for n in (37, 60, 23, 45)]

    def loss_sum(ids, labels, pos=None) -> float:
        kw = {"input_ids": ids, "labels": labels, "use_cache": False}
        if pos is not None:
            kw["position_ids"] = pos
        with torch.no_grad():
            return float(model(**kw).loss) * int((labels[:, 1:] != -100).sum())

    one_by_one = sum(loss_sum(s[None], s[None].clone()) for s in samples)
    ids = torch.cat(samples)[None]
    labels = ids.clone()
    starts = torch.cumsum(torch.tensor([0] + [len(s) for s in samples[:-1]]), 0)
    labels[0, starts] = -100
    pos = torch.cat([torch.arange(len(s)) for s in samples])[None]
    print(
        json.dumps(
            {
                "one_by_one": one_by_one,
                "packed": loss_sum(ids, labels, pos),
                "naive": loss_sum(ids, labels, torch.arange(ids.shape[1])[None]),
                "route": unsloth_packed_route(),
            }
        )
    )


if __name__ == "__main__":
    main()
