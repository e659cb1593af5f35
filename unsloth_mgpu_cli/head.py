"""The output head on the labelled positions only.

A causal LM computes `lm_head` (hidden x vocabulary) and the cross-entropy for every position, and then ignores
the positions whose target is IGNORE_INDEX: the prompt of alpaca and chat data (60% of GSM8K's tokens), padding,
the last token of each sample. For those the head's matrix multiply (forward and the input gradient) and the
float32 softmax over the vocabulary are wasted. `LabelledHead` hooks the last decoder layer so that it hands on
only the positions whose next token takes loss, and the trainer passes their targets, already shifted, as
`shift_labels` (which Unsloth's fused loss and transformers' loss both take instead of shifting `labels`
themselves). The loss is the same mean over the same targets; the gradient of a dropped position was zero anyway.

On a Llama-3.2-1B-shaped model the head is about 6% of a step's matrix work with a 32k vocabulary and 21% with
Llama 3's 128k; small models with large vocabularies (Qwen2.5, Gemma) gain the most.
"""

from __future__ import annotations

from typing import Any

from .data import IGNORE_INDEX

INDEX_KEY = "head_index"  # a micro-batch's positions for the head (not a model argument: the trainer takes it out)
TARGETS_KEY = "shift_labels"  # transformers' and Unsloth's name for labels shifted by the caller


def head_targets(labels: Any) -> dict[str, Any]:
    """The head's inputs for one micro-batch, from its (host) labels of shape (rows, length).

    Returns `{INDEX_KEY: positions, TARGETS_KEY: targets}`: the flattened positions whose next token takes loss
    (the same row's next label is not IGNORE_INDEX; a row's last position never), and those next tokens, shape
    (1, positions). Packed rows need nothing more: their collate already gives each sample's first token no loss.
    Empty (no positions) when nothing takes loss: the model then runs as before.
    """
    import torch

    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    flat = shifted.reshape(-1)
    index = (flat != IGNORE_INDEX).nonzero().reshape(-1)
    if index.numel() == 0:
        return {}
    return {INDEX_KEY: index, TARGETS_KEY: flat[index].reshape(1, -1)}


class LabelledHead:
    """A forward hook on the model's last decoder layer that keeps the positions in `self.index` (a device tensor
    of flattened positions, set per micro-batch by the trainer; None: keep every position)."""

    def __init__(self) -> None:
        self.index: Any = None
        self.handle: Any = None

    def attach(self, model: Any) -> LabelledHead | None:
        """Hook the last decoder layer of `model` (a PEFT or plain causal LM); None when it has none to hook."""
        layer = last_decoder_layer(model)
        if layer is None:
            return None
        self.handle = layer.register_forward_hook(self._keep)
        return self

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def _keep(self, module: Any, args: Any, output: Any) -> Any:
        if self.index is None:
            return None  # output unchanged
        hidden = output[0] if isinstance(output, tuple) else output
        kept = hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.index).unsqueeze(0)
        return (kept, *output[1:]) if isinstance(output, tuple) else kept


def last_decoder_layer(model: Any) -> Any:
    """The last block of the decoder's `layers` list (Llama, Mistral, Qwen, Gemma and most causal LMs), or None."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
        return layers[-1]
    return None
