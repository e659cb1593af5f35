"""Run by tests/test_head.py (CPU) and tests/test_gpu.py (CUDA) in a subprocess (Unsloth patches transformers
process-wide): the loss and the LoRA gradients of a micro-batch are the same whether the model's head sees every
position or, through the trainer's `_on_device` and `head.LabelledHead`, only those whose next token takes loss.
For a padded micro-batch (prompts, padding) and a packed row of the same samples (`TokenizedData.collate`), with
LoRA on all seven projections. Control: the same positions with the targets shifted by one give another loss.

    python tests/head_probe.py [--cuda]   -> prints one JSON line
"""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from unsloth import FastLanguageModel  # noqa: E402

from unsloth_mgpu_cli.data import IGNORE_INDEX, TokenizedData  # noqa: E402
from unsloth_mgpu_cli.head import TARGETS_KEY, LabelledHead, last_decoder_layer  # noqa: E402
from unsloth_mgpu_cli.models import ensure_builtin_model  # noqa: E402
from unsloth_mgpu_cli.trainer import Trainer  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def samples(seed: int = 0) -> TokenizedData:
    """Four samples (prompt without loss, then a response) in a TokenizedData built in memory."""
    rng = np.random.default_rng(seed)
    ids, labels = [], []
    for prompt, response in ((20, 17), (31, 29), (9, 14), (26, 19)):
        x = rng.integers(10, 1000, prompt + response)
        y = x.copy()
        y[:prompt] = IGNORE_INDEX
        ids.append(x)
        labels.append(y)
    data = TokenizedData.__new__(TokenizedData)
    data.input_ids = np.concatenate(ids)
    data.labels = np.concatenate(labels)
    data.offsets = np.cumsum([0] + [len(x) for x in ids])
    data.loss_counts = np.asarray([int((y[1:] != IGNORE_INDEX).sum()) for y in labels])
    data.pad_token_id = 0
    return data


def main() -> None:
    cuda = "--cuda" in sys.argv[1:]
    device = torch.device("cuda" if cuda else "cpu")
    model, _ = FastLanguageModel.from_pretrained(
        model_name=str(ensure_builtin_model("builtin:tiny-llama")),
        max_seq_length=256,
        dtype=torch.bfloat16 if cuda else torch.float32,
        load_in_4bit=False,
        **({"device_map": {"": 0}} if cuda else {}),
    )
    model = FastLanguageModel.get_peft_model(
        model, r=8, lora_alpha=8, target_modules=PROJECTIONS, use_gradient_checkpointing=False, random_state=0
    )
    # the trainer's own method, on a stand-in for the rest of a Trainer (the model, the hook, the device)
    trainer = SimpleNamespace(head=None, info=SimpleNamespace(device=device))
    trainer._head_keeps = lambda index: Trainer._head_keeps(trainer, index)
    hooked = LabelledHead().attach(model)
    seen: list[int] = []
    # hooks run in the order they were registered: this one sees what LabelledHead's hands on towards the head
    last_decoder_layer(model).register_forward_hook(
        lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).shape[:-1].numel())
    )
    data = samples()
    result: dict[str, object] = {"hooked": hooked is not None}

    def run(host: dict, head: LabelledHead | None, roll: bool = False) -> tuple[float, torch.Tensor, int]:
        model.zero_grad(set_to_none=True)
        trainer.head = head
        batch = Trainer._on_device(trainer, host)
        if roll:
            batch[TARGETS_KEY] = torch.roll(batch[TARGETS_KEY], 1, dims=1)
        seen.clear()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        trainer._head_keeps(None)
        grads = torch.cat([p.grad.float().reshape(-1) for p in model.parameters() if p.requires_grad])
        return float(loss.detach()), grads, seen[-1]

    for name, packed in (("padded", False), ("packed", True)):
        host = data.collate([0, 1, 2, 3], packed=packed, pad_to=8)
        full_loss, full_grads, full_positions = run(host, None)
        head_loss, head_grads, head_positions = run(host, hooked)
        control_loss, control_grads, _ = run(host, hooked, roll=True)
        result[name] = {
            "full_loss": full_loss,
            "head_loss": head_loss,
            "control_loss": control_loss,
            "grad_max_diff": float((full_grads - head_grads).abs().max()),
            "control_grad_max_diff": float((full_grads - control_grads).abs().max()),
            "grad_max": float(full_grads.abs().max()),
            "positions_full": full_positions,
            "positions_head": head_positions,
            "loss_tokens": int(data.loss_counts.sum()),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
