"""Run llama.cpp's convert_hf_to_gguf.py (the reference GGUF export tests/test_gguf.py compares with).

    python tests/llama_cpp_convert.py CONVERTER_DIR MODEL_DIR --outtype q8_0 --outfile out.gguf

One change to it: a byte-level BPE tokenizer whose pre-tokenizer hash is not in its table gets the name in
$EXPECTED_PRE instead of a refusal. The builtin test tokenizer is such a tokenizer (trained here, so in no
table); the test names what llama.cpp calls its splitting ("gpt-2", or "qwen2" where transformers' Qwen2
tokenizer splits it by Qwen2's regex). Every other key and tensor is the converter's own.
"""

from __future__ import annotations

import os
import runpy
import sys

converter = sys.argv[1]
sys.path.insert(0, converter)
sys.path.insert(1, os.path.join(converter, "gguf-py"))  # the gguf package the converter was released with

import conversion.base as base  # noqa: E402

known = base.TextModel.get_vocab_base_pre


def get_vocab_base_pre(self, tokenizer):  # type: ignore[no-untyped-def]
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return os.environ["EXPECTED_PRE"]


base.TextModel.get_vocab_base_pre = get_vocab_base_pre
script = os.path.join(converter, "convert_hf_to_gguf.py")
sys.argv = [script, *sys.argv[2:]]
runpy.run_path(script, run_name="__main__")
