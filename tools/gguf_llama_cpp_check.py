"""Run a GGUF file in llama.cpp and compare it with the HF model it came from (outside the test suite).

    python tools/gguf_llama_cpp_check.py outputs/run/gguf/run.F32.gguf outputs/run/merged [--prompt TEXT]
    python tools/gguf_llama_cpp_check.py BASE.gguf outputs/run/merged --lora outputs/run/gguf/run.LoRA.F16.gguf

Needs llama-cpp-python (`pip install llama-cpp-python`: it builds llama.cpp, minutes) besides transformers. Prints
whether llama.cpp tokenises the prompt as the HF tokenizer does, the largest logit difference over every position
(absolute and relative to the largest logit), how often both pick the same next token, and whether the file's chat
template is the tokenizer's. tests/test_gguf.py holds the file to llama.cpp's converter; this runs it in llama.cpp.
"""

from __future__ import annotations

import argparse

PROMPT = (
    "### Instruction:\nAdd the two numbers, then reverse the words of the sentence that follows.\n\n"
    "### Input:\n49 + 97 and the quick brown fox jumps over the lazy dog\n\n### Response:\n"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf")
    parser.add_argument("hf_dir")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lora", help="a LoRA GGUF applied over GGUF (the base's): compared with HF_DIR, merged")
    args = parser.parse_args()

    import numpy as np
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.hf_dir)
    ids = tokenizer(args.prompt).input_ids
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    llm = Llama(
        model_path=args.gguf,
        n_ctx=max(128, 2 * len(ids)),
        logits_all=True,
        verbose=False,
        n_threads=args.threads,
        lora_path=args.lora,
    )
    # a BOS where the HF tokenizer adds one (llama.cpp adds one by default, Llama 3's and Llama 2's both ask for it)
    theirs = llm.tokenize(args.prompt.encode(), add_bos=bool(ids) and ids[0] == tokenizer.bos_token_id, special=False)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    diff, scale = float(np.abs(got - ref).max()), float(np.abs(ref).max())
    agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
    shown = f"{args.gguf} + {args.lora}" if args.lora else args.gguf
    same_template = llm.metadata.get("tokenizer.chat_template") == tokenizer.chat_template
    print(
        f"{shown}: tokens equal {theirs == ids} ({len(ids)}), largest logit difference {diff:.2e} "
        f"({diff / scale:.2e} of the largest logit), same next token {agree:.0%}, chat template equal {same_template}"
    )


if __name__ == "__main__":
    main()
