"""`mgpu export --format gguf`: held to llama.cpp's own converter (every key, every tensor's bytes) and read back
by an independent reader (transformers' GGUF loader), on a trained run, on Llama/Mistral/Qwen2 variants and on
SentencePiece models (a Llama 2-style Llama and a Gemma 2, with tokenizers trained here as theirs are built)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EQUIVALENCE_RUN, ROOT, assert_user_error, mgpu_env, run_mgpu
from sentencepiece_models import SPM_KINDS, SPM_PROMPT, sentencepiece_base, sentencepiece_model

from unsloth_mgpu_cli.gguf_export import QUANTS, llama3_rope_factors, pre_tokenizer
from unsloth_mgpu_cli.models import cache_dir, ensure_builtin_model

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
# llama.cpp's converter as released in the llama-cpp-python 0.3.36 sdist (it vendors llama.cpp), pinned by hash
SDIST = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
INDEX = "https://pypi.org/simple/llama-cpp-python/"
PROMPT = "### Instruction:\nAdd the two numbers.\n\n### Input:\n49 + 97\n\n### Response:\n"


# no file may grow past 1 MiB (run_mgpu's max_file_bytes): the tiny model's adapter fits; its f16 and f32 GGUF files
# (1.1 and 2.2 MiB) do not
SMALL_DISK = 1 << 20


@pytest.fixture(scope="session")
def converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py with its conversion/ and gguf-py/, fetched once into the cache."""
    dest = cache_dir() / "test-llama.cpp-converter" / SDIST_SHA256[:16]
    scripts = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py")
    if all((dest / script).is_file() for script in scripts):
        return dest
    try:
        data = fetch_sdist()
    except (OSError, subprocess.SubprocessError) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"cannot fetch llama.cpp's converter ({SDIST}): {exc}")
        pytest.skip(f"cannot fetch llama.cpp's converter ({SDIST}): {exc}")
    assert hashlib.sha256(data).hexdigest() == SDIST_SHA256
    prefix = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
    keep = (*scripts, "conversion/", "gguf-py/gguf/")
    tmp = dest.with_name(f".{dest.name}-{os.getpid()}")
    with tarfile.open(fileobj=io.BytesIO(data)) as sdist:
        members = [
            m for m in sdist.getmembers() if m.name.startswith(prefix) and m.name[len(prefix) :].startswith(keep)
        ]
        for m in members:
            m.name = m.name[len(prefix) :]
        sdist.extractall(tmp, members=members, filter="data")
    if all((dest / script).is_file() for script in scripts):  # another process got there first
        shutil.rmtree(tmp)
        return dest
    shutil.rmtree(dest, ignore_errors=True)  # a copy from before the LoRA converter was kept
    try:
        os.replace(tmp, dest)
    except OSError:  # another process's copy took the place meanwhile
        shutil.rmtree(tmp)
    return dest


def fetch_sdist() -> bytes:
    """The sdist's bytes: straight from PyPI's simple index (under a second), else through pip and whatever index
    its configuration names (a mirror; slower: pip prepares the sdist's metadata)."""
    try:
        page = urllib.request.urlopen(INDEX, timeout=60).read().decode()
        link = re.search(rf'href="([^"]*{re.escape(SDIST)})#sha256=([0-9a-f]+)"', page)
        if link is None:
            raise OSError(f"{SDIST} is not on {INDEX}")
        return urllib.request.urlopen(urllib.parse.urljoin(INDEX, link.group(1)), timeout=300).read()
    except OSError:
        with tempfile.TemporaryDirectory() as folder:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", folder]
                + ["llama-cpp-python==0.3.36"],
                check=True,
                capture_output=True,
                timeout=900,
            )
            return (Path(folder) / SDIST).read_bytes()


def reference(converter: Path, model_dir: Path, outfile: Path, quant: str, pre: str = "gpt-2") -> Path:
    """llama.cpp's converter run on an HF folder; `pre`: the tokenizer.ggml.pre of a tokenizer not in its table."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "llama_cpp_convert.py"), str(converter), str(model_dir)]
        + ["--outtype", quant, "--outfile", str(outfile)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "EXPECTED_PRE": pre},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return outfile


def reference_lora(converter: Path, adapter: Path, base: Path, outfile: Path, quant: str) -> Path:
    """llama.cpp's convert_lora_to_gguf.py run on a PEFT adapter folder, with the base model's folder."""
    proc = subprocess.run(
        [sys.executable, str(converter / "convert_lora_to_gguf.py"), "--base", str(base), "--outtype", quant]
        + ["--outfile", str(outfile), str(adapter)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return outfile


def read(path: Path) -> tuple[dict, dict]:
    import gguf

    r = gguf.GGUFReader(path)
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {
        t.name: (t.tensor_type.name, tuple(int(n) for n in t.shape), np.asarray(t.data).tobytes()) for t in r.tensors
    }
    return kv, tensors


def differences(ours: Path, theirs: Path) -> list[str]:
    """Every key and tensor that differs; general.name is the folder's name in each and is left out."""
    (a, at), (b, bt) = read(ours), read(theirs)
    out = [f"key {k}: {a.get(k)!r:.60} != {b.get(k)!r:.60}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    out = [d for d in out if not d.startswith("key general.name:")]
    out += [f"tensor {n} only in one" for n in sorted(set(at) ^ set(bt))]
    out += [f"tensor {n}: {at[n][:2]} != {bt[n][:2]}" for n in sorted(set(at) & set(bt)) if at[n] != bt[n]]
    return out


def logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokenizer(PROMPT).input_ids])).logits[0].float()


def gguf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained LoRA run, its float32 merged export, and its GGUF exports (q8_0, f16, bf16, f32 in one folder)."""
    out = tmp_path_factory.mktemp("gguf") / "run"
    proc = run_mgpu("train", str(QUICKSTART), *EQUIVALENCE_RUN, "distributed.num_gpus=1", f"output.dir={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exports = [["--dtype", "float32"], ["--format", "gguf"]] + [["--format", "gguf", "--quant", q] for q in QUANTS[1:]]
    for args in exports:
        proc = run_mgpu("export", str(out), *args, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out


@pytest.mark.integration
def test_the_gguf_holds_the_trained_model_and_its_tokenizer(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = [".mgpu-export.json", "Modelfile", "run.BF16.gguf", "run.F16.gguf", "run.F32.gguf", "run.Q8_0.gguf"]
    assert sorted(p.name for p in (run / "gguf").iterdir()) == files
    tok = AutoTokenizer.from_pretrained(str(run / "merged"))
    merged = logits(AutoModelForCausalLM.from_pretrained(str(run / "merged"), dtype=torch.float32), tok)
    base = AutoModelForCausalLM.from_pretrained(str(ensure_builtin_model("builtin:tiny-llama")), dtype=torch.float32)
    scale = float(merged.abs().max())
    # f32: transformers undoes llama.cpp's q/k row order and gets the merged model's logits back
    assert float((logits(gguf_model(run / "gguf" / "run.F32.gguf"), tok) - merged).abs().max()) < 1e-5 * scale
    assert float((logits(base, tok) - merged).abs().max()) > 1e-2 * scale  # the control: the adapter mattered
    q8 = float((logits(gguf_model(run / "gguf" / "run.Q8_0.gguf"), tok) - merged).abs().max())
    assert 0 < q8 < 2e-2 * scale
    # the tokenizer: every token in id order, the merges, the special ids and the run's chat template
    import json

    kv, _ = read(run / "gguf" / "run.Q8_0.gguf")
    spec = json.loads((run / "merged" / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    assert kv["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert kv["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert kv["tokenizer.ggml.pre"] == "gpt-2" and kv["tokenizer.ggml.model"] == "gpt2"
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"]) == (
        tok.bos_token_id,
        tok.eos_token_id,
    )
    assert kv["tokenizer.chat_template"] == tok.chat_template
    assert kv["general.file_type"] == 7 and kv["general.architecture"] == "llama"


@pytest.mark.integration
def test_the_modelfile_gives_ollama_the_last_file_and_the_prompt_the_run_trained_on(run):
    """An alpaca run learned our alpaca prompt, which no chat template gives: the Modelfile's TEMPLATE must render
    an instruction exactly as training did, and stop at the EOS that ends every trained response."""
    from transformers import AutoTokenizer

    from unsloth_mgpu_cli.data import render_alpaca

    text = (run / "gguf" / "Modelfile").read_text()
    assert re.search(r"^FROM ./run\.F32\.gguf$", text, re.M), text  # the fixture's last export
    template = re.search(r'^TEMPLATE """(.*)"""$', text, re.M | re.S).group(1)
    prompt, _ = render_alpaca({"instruction": "Add the two numbers.", "input": "", "output": "x"})
    rendered = template.replace("{{ .Prompt }}", "Add the two numbers.").replace("{{ .Response }}", "146")
    assert rendered == prompt + "146"
    eos = AutoTokenizer.from_pretrained(str(run / "merged")).eos_token
    assert f"PARAMETER stop {json.dumps(eos, ensure_ascii=False)}" in text.splitlines()


@pytest.mark.integration
@pytest.mark.parametrize("quant", QUANTS)
def test_the_gguf_is_what_llama_cpps_converter_writes_from_the_merged_export(run, converter, tmp_path, quant):
    ours = run / "gguf" / f"run.{quant.upper()}.gguf"
    theirs = reference(converter, run / "merged", tmp_path / "ref.gguf", quant)
    assert differences(ours, theirs) == []
    # the control: the comparison sees a difference where there is one (the same model in another quantisation)
    other = run / "gguf" / f"run.{'Q8_0' if quant != 'q8_0' else 'F16'}.gguf"
    assert any(d.startswith("tensor blk.0.attn_q.weight") for d in differences(ours, other))


@pytest.mark.integration
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_the_lora_gguf_is_what_llama_cpps_lora_converter_writes_and_adds_up_to_the_merged_model(
    run, converter, tmp_path, quant
):
    """`--format gguf-lora`: the adapter alone, key for key and tensor for tensor as convert_lora_to_gguf.py writes
    it; and base + alpha / r x B A, per pair as llama.cpp applies it, gives the merged GGUF's weights."""
    proc = run_mgpu("export", str(run), "--format", "gguf-lora", "--quant", quant, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ours = run / "gguf" / f"run.LoRA.{quant.upper()}.gguf"
    builtin = ensure_builtin_model("builtin:tiny-llama")
    assert differences(ours, reference_lora(converter, run / "adapter", builtin, tmp_path / "ref.gguf", quant)) == []
    kv, tensors = read(ours)
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora" and kv["adapter.lora.alpha"] == 16.0
    assert len(tensors) == 2 * 7 * 2  # a pair for each of the seven projections of both layers
    if quant == "f16":
        base = reference(converter, builtin, tmp_path / "base.gguf", "f32")
        assert lora_applied_vs_merged(ours, base, run / "gguf" / "run.F32.gguf") < 2e-3  # f16 halves, f32 merge


def lora_applied_vs_merged(lora_file: Path, base_file: Path, merged_file: Path) -> float:
    """The largest relative difference between base + alpha / r x B A (each pair of the LoRA GGUF applied as
    llama.cpp applies it, to the base GGUF's tensor) and the merged GGUF's tensor; asserts that every pair changed
    its tensor."""
    import gguf

    alpha = float(gguf.GGUFReader(lora_file).fields["adapter.lora.alpha"].contents())
    lora, base, merged = ({t.name: t for t in gguf.GGUFReader(f).tensors} for f in (lora_file, base_file, merged_file))

    def array(t) -> torch.Tensor:  # a tensor as its GGML rows (ne reversed), in float32
        return torch.from_numpy(np.array(t.data, dtype=np.float32).reshape([int(n) for n in reversed(t.shape)]))

    worst = 0.0
    for name in (n[: -len(".lora_a")] for n in lora if n.endswith(".lora_a")):
        a, b = array(lora[name + ".lora_a"]), array(lora[name + ".lora_b"])
        applied, want = array(base[name]) + alpha / a.shape[0] * (b @ a), array(merged[name])
        worst = max(worst, float((applied - want).abs().max() / want.abs().max()))
        assert float((array(base[name]) - want).abs().max()) > 0  # the adapter changed this tensor
    return worst


@pytest.mark.integration
def test_an_rslora_adapters_lora_gguf_adds_up_to_its_merged_model(tmp_path):  # in this process: no CLI startups
    """rsLoRA scales by alpha / sqrt(r), llama.cpp by alpha / r: the file's alpha makes up the difference (the
    converter's file, with alpha as it is, put llama.cpp 1.46 of the largest logit from the merged model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    builtin = ensure_builtin_model("builtin:tiny-llama")
    run, base = tmp_path / "rs", tmp_path / "base"
    torch.manual_seed(1)
    config = LoraConfig(r=16, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "down_proj"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(builtin)), config)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    model.save_pretrained(str(run / "adapter"))
    AutoTokenizer.from_pretrained(str(builtin)).save_pretrained(str(run / "adapter"))
    (run / "recipe.resolved.yaml").write_text(f"model:\n  name: {builtin}\n")
    shutil.copytree(builtin, base / "model")  # the base as a full fine-tune's run, for its own GGUF
    from unsloth_mgpu_cli.export import export_gguf, export_gguf_lora

    merged, lora, base_file = (
        export_gguf(run, None, "f32"),
        export_gguf_lora(run, None, "f32"),
        export_gguf(base, None, "f32"),
    )
    assert lora.name == "rs.LoRA.F32.gguf" and read(lora)[0]["adapter.lora.alpha"] == 64.0  # 16 x sqrt(16)
    assert lora_applied_vs_merged(lora, base_file, merged) < 1e-5


def test_what_a_lora_gguf_cannot_hold_is_refused_and_rslora_gets_its_own_scale(tmp_path):
    from unsloth_mgpu_cli.errors import UserError
    from unsloth_mgpu_cli.gguf_export import check_lora_adapter

    config = {"r": 16, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    for extra, needle in (
        ({"use_dora": True}, "a DoRA adapter"),
        ({"rank_pattern": {"q_proj": 8}}, "per-module ranks or alphas"),
        ({"modules_to_save": ["lm_head"]}, "whole trained modules (lm_head)"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "LoRA on embed_tokens"),
    ):
        (tmp_path / "adapter_config.json").write_text(json.dumps(config | extra))
        with pytest.raises(UserError) as err:
            check_lora_adapter(tmp_path)
        assert needle in str(err.value) and "--format gguf" in str(err.value), str(err.value)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    assert check_lora_adapter(tmp_path)[1] == 16.0
    # rsLoRA scales by alpha / sqrt(r); llama.cpp by alpha / r: the file holds alpha x sqrt(r)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"use_rslora": True}))
    assert check_lora_adapter(tmp_path)[1] == 64.0


KINDS = ["mistral", "qwen2", "llama3-rope"]


def tiny(kind: str, folder: Path) -> Path:
    """A full fine-tune's run folder (model/ only) holding a small random model of `kind` with the builtin
    tokenizer: Mistral; Qwen2 (q/k/v biases, tied embeddings); Llama 3.1's rope (a rope_freqs tensor)."""
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    dims = dict(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(0)
    if kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**dims, head_dim=32, sliding_window=None))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**dims, tie_word_embeddings=True))
    else:
        rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
        rope["original_max_position_embeddings"] = 64
        model = LlamaForCausalLM(LlamaConfig(**dims, max_position_embeddings=512, rope_parameters=rope))
    # named apart from the kind: transformers' GGUF reader takes a general.name with "mistral" in it for its own
    # "mistral" architecture, which its gguf mapping then does not know (llama.cpp reads general.architecture)
    run = folder / f"tiny-{sorted(KINDS).index(kind)}"
    model.save_pretrained(str(run / "model"))
    AutoTokenizer.from_pretrained(str(ensure_builtin_model("builtin:tiny-llama"))).save_pretrained(str(run / "model"))
    return run


@pytest.mark.integration
@pytest.mark.parametrize("kind", KINDS)
def test_other_architectures_match_llama_cpps_converter_and_load_back(converter, tmp_path, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tiny(kind, tmp_path)
    proc = run_mgpu("export", str(run), "--format", "gguf", "--quant", "f32", timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    tensors = {"llama3-rope": 22, "qwen2": 26}.get(kind, 21)  # + rope_freqs; + q/k/v biases, no lm_head (tied)
    assert f"converting {tensors} tensors to f32" in proc.stdout
    ours = run / "gguf" / f"{run.name}.F32.gguf"
    # transformers loads the builtin tokenizer in a Qwen2 model as Qwen2's tokenizer, which splits by Qwen2's regex
    pre = "qwen2" if kind == "qwen2" else "gpt-2"
    assert read(ours)[0]["tokenizer.ggml.pre"] == pre
    assert differences(ours, reference(converter, run / "model", tmp_path / "ref.gguf", "f32", pre)) == []
    if kind == "llama3-rope":
        return  # transformers' GGUF reader ignores rope_freqs; test_llama3_rope_factors_... checks the tensor
    tok = AutoTokenizer.from_pretrained(str(run / "model"))
    hf = logits(AutoModelForCausalLM.from_pretrained(str(run / "model"), dtype=torch.float32), tok)
    assert float((logits(gguf_model(ours), tok) - hf).abs().max()) < 1e-5 * float(hf.abs().max())


def full_fine_tune_of(base: Path, run: Path) -> Path:
    """A full fine-tune's run folder of `base` as `mgpu train` leaves one: model/ with the tokenizer as transformers
    5 saves it (tokenizer.json alone: no tokenizer.model, no added_tokens_decoder), the recipe naming the base."""
    from transformers import AutoTokenizer

    (run / "model").mkdir(parents=True)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(base / name, run / "model" / name)
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(run / "model"))
    assert sorted(p.name for p in (run / "model").glob("tokenizer*")) == ["tokenizer.json", "tokenizer_config.json"]
    (run / "recipe.resolved.yaml").write_text(f"model:\n  name: {base}\n")
    return run


@pytest.mark.integration
@pytest.mark.parametrize("kind", list(SPM_KINDS))
def test_sentencepiece_models_match_llama_cpps_converter_on_the_base_and_load_back(converter, tmp_path, kind):
    """A full fine-tune whose model/ holds only tokenizer.json: the export takes the base's tokenizer.model (the
    piece scores llama.cpp's tokenizer merges by) and gives the file the converter writes from the base's folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unsloth_mgpu_cli.export import export_gguf

    base = sentencepiece_base(kind, tmp_path)
    run = full_fine_tune_of(base, tmp_path / f"tiny-{kind}")
    ours = export_gguf(run, None, "f32")  # in this process (the CLI's path is the tests above and below)
    assert ours == run / "gguf" / f"{run.name}.F32.gguf"
    assert differences(ours, reference(converter, base, tmp_path / "ref.gguf", "f32")) == []
    kv, _ = read(ours)
    assert (kv["tokenizer.ggml.model"], kv["tokenizer.ggml.pre"]) == ("llama", "default")
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(base / "tokenizer.model"))
    assert kv["tokenizer.ggml.tokens"] == [sp.IdToPiece(i) for i in range(1024)]
    normal = [i for i in range(1024) if not (sp.IsControl(i) or sp.IsUnknown(i) or sp.IsByte(i))]
    normal = [i for i in normal if sp.IdToPiece(i) not in ("<mask>", "<start_of_turn>", "<end_of_turn>")]
    assert [kv["tokenizer.ggml.scores"][i] for i in normal] == [sp.GetScore(i) for i in normal]
    assert len(set(sp.GetScore(i) for i in normal)) == len(normal)  # merge ranks, not one score for all
    if kind == "gemma2":
        turn = kv["tokenizer.ggml.tokens"].index("<start_of_turn>")
        assert kv["tokenizer.ggml.token_type"][turn] == 4 and kv["tokenizer.ggml.add_space_prefix"] is False
        assert kv["gemma2.attn_logit_softcapping"] == 50.0 and kv["gemma2.attention.sliding_window"] == 64
    tok = AutoTokenizer.from_pretrained(str(run / "model"))
    assert kv["tokenizer.ggml.add_bos_token"] is True and tok(SPM_PROMPT).input_ids[0] == tok.bos_token_id
    if kind == "llama2":  # transformers rebuilds Gemma's tokenizer from a GGUF as Unigram, so only Llama's here
        gguf_tok = AutoTokenizer.from_pretrained(str(ours.parent), gguf_file=ours.name)  # it adds no BOS
        plain = tok(SPM_PROMPT, add_special_tokens=False).input_ids
        assert gguf_tok(SPM_PROMPT, add_special_tokens=False).input_ids == plain
    hf = logits(AutoModelForCausalLM.from_pretrained(str(run / "model"), dtype=torch.float32), tok)
    back = logits(gguf_model(ours), tok)
    assert float((back - hf).abs().max()) < 1e-5 * float(hf.abs().max())


@pytest.mark.integration
def test_a_lora_run_on_a_sentencepiece_base_exports_its_tokenizer_model_in_both_exports(converter, tmp_path):
    """The merged HF export carries the base's tokenizer.model and the special tokens, so llama.cpp's converter
    run on it writes what `--format gguf` writes; transformers still reads the tokenizer as trained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = sentencepiece_base("llama2", tmp_path)
    run = tmp_path / "lora"
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)), LoraConfig(r=4, target_modules=["q_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)  # a trained adapter's B is not zero: the merge changes the weights
    model.save_pretrained(str(run / "adapter"))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(run / "adapter"))
    (run / "recipe.resolved.yaml").write_text(f"model:\n  name: {base}\n")
    from unsloth_mgpu_cli.export import export_gguf, export_merged

    merged, ours = export_merged(run, None, "float32"), export_gguf(run, None, "f32")  # in this process
    assert (merged / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    assert differences(ours, reference(converter, merged, tmp_path / "ref.gguf", "f32")) == []
    # the control: the base's file differs from the merged model's in the adapted tensors only
    other = differences(ours, reference(converter, base, tmp_path / "base.gguf", "f32"))
    assert other and all(d.startswith("tensor blk.") and ".attn_q." in d for d in other), other
    tok = AutoTokenizer.from_pretrained(str(base))
    ids = tok(SPM_PROMPT).input_ids
    assert ids[0] == tok.bos_token_id and AutoTokenizer.from_pretrained(str(merged))(SPM_PROMPT).input_ids == ids


@pytest.mark.integration
def test_a_sentencepiece_tokenizer_without_its_model_or_with_anothers_is_refused_before_the_weights_load(tmp_path):
    base = sentencepiece_base("gemma2", tmp_path)
    run = full_fine_tune_of(base, tmp_path / "run")
    model_file = (base / "tokenizer.model").read_bytes()
    (base / "tokenizer.model").unlink()
    proc = run_mgpu("export", str(run), "--format", "gguf")
    assert_user_error(proc, "a SentencePiece tokenizer without its tokenizer.model", "put the base model's")
    out = tmp_path / "out"  # a run that asks for the export is refused before it trains
    args = [f"model.name={base}", f"output.dir={out}", "output.export=[gguf]", "distributed.num_gpus=1"]
    proc = run_mgpu("train", str(QUICKSTART), *args)
    assert_user_error(proc, "output.export", f"model.name ({base})", "without its tokenizer.model")
    assert not out.exists()
    from unsloth_mgpu_cli.errors import UserError
    from unsloth_mgpu_cli.export import export_gguf

    (run / "model" / "tokenizer.model").write_bytes(sentencepiece_model("llama2"))  # another tokenizer's model
    with pytest.raises(UserError, match=r"this SentencePiece model is not the run's tokenizer: id 0 is '<unk>'"):
        export_gguf(run)  # in this process, as the rest of this test
    assert not (run / "gguf").exists()
    (run / "model" / "tokenizer.model").write_bytes(model_file)  # the right one, copied in as the hint says
    assert export_gguf(run) == run / "gguf" / "run.Q8_0.gguf"


def test_a_hub_bases_tokenizer_model_is_found_in_the_hf_cache_offline_at_the_recipes_revision(tmp_path):
    """sentencepiece_source for a hub id: the cached snapshot's tokenizer.model (offline, as an export after training
    runs), at the revision named; None for a repo or revision whose snapshot has none."""
    import subprocess

    repo = tmp_path / "hub" / "models--acme--spm-7b"
    for ref, commit, has_model in (("main", "a" * 40, True), ("v2", "b" * 40, False)):
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
        if has_model:
            (repo / "snapshots" / commit / "tokenizer.model").write_bytes(b"spm " + ref.encode())
    code = (
        "from unsloth_mgpu_cli.export import sentencepiece_source as s; "
        "print(s(['acme/spm-7b'])); print(s(['acme/spm-7b'], 'v2')); print(s(['acme/other']))"
    )
    env = mgpu_env(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    found, other_revision, other_repo = out.stdout.strip().splitlines()
    assert Path(found).read_bytes() == b"spm main"
    assert (other_revision, other_repo) == ("None", "None")


def test_llama3_rope_factors_are_transformers_llama3_scaling():
    """The rope_freqs tensor divides each default frequency into the one transformers' llama3 rope uses."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    rope["original_max_position_embeddings"] = 8192
    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072, rope_parameters=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    factors = llama3_rope_factors(rope, 128)
    assert torch.allclose(plain / factors, scaled, rtol=1e-5)
    assert float(factors.min()) == 1.0 and float(factors.max()) == 8.0  # both ends and a blend between


def test_a_byte_fallback_tokenizer_is_not_taken_for_a_byte_level_one(tmp_path):
    """A tokenizer.json of BPE with byte fallback is a SentencePiece tokenizer: plan_conversion asks for its
    tokenizer.model, and pre_tokenizer (the byte-level BPE route) refuses it."""
    from transformers import AutoTokenizer

    from unsloth_mgpu_cli.errors import UserError
    from unsloth_mgpu_cli.gguf_export import is_sentencepiece_json

    builtin = ensure_builtin_model("builtin:tiny-llama")
    tok = AutoTokenizer.from_pretrained(str(builtin))
    assert pre_tokenizer(tok, builtin) == "gpt-2" and not is_sentencepiece_json(builtin)
    spec = json.loads((builtin / "tokenizer.json").read_text())
    spec["model"]["byte_fallback"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError) as err:
        pre_tokenizer(tok, tmp_path)
    assert "byte fallback" in str(err.value) and "convert_hf_to_gguf.py" in str(err.value)


@pytest.mark.integration
def test_bad_gguf_arguments_and_models_exit_2_before_anything_loads(tmp_path):
    run = tiny("mistral", tmp_path)
    assert_user_error(run_mgpu("export", str(run), "--format", "gguf", "--quant", "q4_k_m"), "--quant", "q8_0")
    assert_user_error(run_mgpu("export", str(run), "--format", "gguf", "--dtype", "float16"), "--dtype", "--quant f16")
    assert_user_error(run_mgpu("export", str(run), "--quant", "q8_0"), "--quant", "--format gguf")
    assert_user_error(run_mgpu("export", str(run), "--format", "onnx"), "--format", "hf, gguf or gguf-lora")
    proc = run_mgpu("export", str(run), "--format", "gguf-lora")
    assert_user_error(proc, "is a full fine-tune: it has no adapter to write as a LoRA GGUF", "--format gguf")
    proc = run_mgpu("export", str(run), "--format", "gguf", "--output", str(tmp_path / "model.gguf"))
    assert_user_error(proc, "--output", "expected a folder, found a file name", f"named {run.name}.Q8_0.gguf")
    config = run / "model" / "config.json"
    config.write_text(
        config.read_text().replace("MistralForCausalLM", "GPT2LMHeadModel").replace('"mistral"', '"gpt2"')
    )
    assert_user_error(run_mgpu("export", str(run), "--format", "gguf"), "GPT2LMHeadModel", "convert_hf_to_gguf.py")
    assert not (run / "gguf").exists()


@pytest.mark.integration
def test_a_full_disk_leaves_the_earlier_gguf_files_and_no_part_file(run):
    """The disk fills while the file is written (RLIMIT_FSIZE: a write past 1 MiB fails with EFBIG, as on a full
    disk): exit 2 naming the folder, the F32 and Q8_0 files of before untouched, nothing half-written left."""
    before = {p.name: p.stat().st_mtime_ns for p in (run / "gguf").iterdir()}
    proc = run_mgpu("export", str(run), "--format", "gguf", "--quant", "f16", max_file_bytes=SMALL_DISK)
    assert_user_error(proc, "argument --output", f"cannot write {run / 'gguf'}", "writing run.F16.gguf")
    assert {p.name: p.stat().st_mtime_ns for p in (run / "gguf").iterdir()} == before


@pytest.mark.integration
def test_a_4bit_base_is_dequantized_before_the_merge_in_both_exports(run, tmp_path):
    """A QLoRA run on a pre-quantized base (as unsloth/...-bnb-4bit models are): both exports merge the adapter
    into the dequantized weights QLoRA trained on. Before, the HF export crashed in save_pretrained and the GGUF
    export met 4-bit tensors it could not name."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    builtin = str(ensure_builtin_model("builtin:tiny-llama"))
    base4 = tmp_path / "tiny-llama-bnb-4bit"
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    AutoModelForCausalLM.from_pretrained(builtin, quantization_config=nf4, device_map="cpu").save_pretrained(base4)
    AutoTokenizer.from_pretrained(builtin).save_pretrained(base4)
    qrun = tmp_path / "qlora"
    shutil.copytree(run / "adapter", qrun / "adapter")
    config = json.loads((qrun / "adapter" / "adapter_config.json").read_text())
    (qrun / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base4)}))
    recipe = (run / "recipe.resolved.yaml").read_text().replace("builtin:tiny-llama", str(base4))
    (qrun / "recipe.resolved.yaml").write_text(recipe)
    for args in (["--dtype", "float32"], ["--format", "gguf", "--quant", "f32"]):
        proc = run_mgpu("export", str(qrun), *args, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "dequantizing the base's bitsandbytes weights" in proc.stdout

    tok = AutoTokenizer.from_pretrained(str(qrun / "merged"))
    dequantized = AutoModelForCausalLM.from_pretrained(str(base4), dtype=torch.float32, device_map="cpu").dequantize()
    expected = logits(PeftModel.from_pretrained(dequantized, str(qrun / "adapter")), tok)  # unmerged
    scale = float(expected.abs().max())
    merged = AutoModelForCausalLM.from_pretrained(str(qrun / "merged"), dtype=torch.float32)
    assert getattr(merged.config, "quantization_config", None) is None
    assert float((logits(merged, tok) - expected).abs().max()) < 1e-4 * scale
    assert float((logits(gguf_model(qrun / "gguf" / "qlora.F32.gguf"), tok) - expected).abs().max()) < 1e-4 * scale
    # the control: merged into the unquantized base the logits are not these (the 4-bit rounding shows)
    plain = AutoModelForCausalLM.from_pretrained(str(run / "merged"), dtype=torch.float32)
    assert float((logits(plain, tok) - expected).abs().max()) > 1e-3 * scale


@pytest.mark.integration
def test_output_export_writes_both_exports_when_training_ends(tmp_path):
    out = tmp_path / "run"
    proc = run_mgpu(
        "train",
        str(QUICKSTART),
        *EQUIVALENCE_RUN,
        "training.max_steps=2",
        "distributed.num_gpus=1",
        f"output.dir={out}",
        "output.export=[hf,gguf,gguf-lora]",
        "output.gguf_quant=f16",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[export" in proc.stdout and f"wrote {out / 'gguf' / 'run.F16.gguf'}" in proc.stdout
    assert (out / "merged" / "model.safetensors").is_file() and (out / "gguf" / "run.F16.gguf").is_file()
    assert (out / "gguf" / "run.LoRA.F16.gguf").is_file()  # beside the merged file, in the same folder
    assert "earlier adapter" not in proc.stdout


@pytest.mark.integration
def test_output_export_that_would_fail_is_refused_before_training(tmp_path):
    out = tmp_path / "run"
    (out / "merged").mkdir(parents=True)
    (out / "merged" / "notes.txt").write_text("mine")  # not an export: the hf export may not replace it
    proc = run_mgpu("train", str(QUICKSTART), "distributed.num_gpus=1", f"output.dir={out}", "output.export=[hf]")
    assert_user_error(
        proc, "output.export", "the hf export would fail when training ends", "drop hf from output.export"
    )
    assert sorted(p.name for p in out.iterdir()) == ["merged"]  # nothing trained, nothing written
    full = run_mgpu("validate", str(QUICKSTART), "lora=null", "output.export=[hf]")
    assert_user_error(full, "output.export", "a full fine-tune already writes the HF model")
    full = run_mgpu("validate", str(QUICKSTART), "lora=null", "output.export=[gguf-lora]")
    assert_user_error(full, "output.export", "a full fine-tune has no adapter to write as a LoRA GGUF")
    from unsloth_mgpu_cli.errors import UserError
    from unsloth_mgpu_cli.export import check_recipe_exports
    from unsloth_mgpu_cli.recipe import load_recipe

    dora = load_recipe(
        QUICKSTART, [f"output.dir={tmp_path / 'dora'}", "output.export=[gguf-lora]", "lora.use_dora=true"]
    )
    with pytest.raises(UserError, match="the gguf-lora export would fail .*lora.use_dora: a DoRA adapter"):
        check_recipe_exports(dora.recipe)  # what `mgpu train` runs before training, as above


@pytest.mark.integration
def test_an_output_export_that_fails_after_training_keeps_the_weights_and_names_the_retry(tmp_path):
    """The disk fills during the export after training (RLIMIT_FSIZE: no file past 1 MiB; the adapter is far
    smaller, the f32 GGUF is 2.2 MiB): exit 2 naming the export command, the adapter saved."""
    out = tmp_path / "run"
    args = [*EQUIVALENCE_RUN, "training.max_steps=2", "distributed.num_gpus=1", f"output.dir={out}"]
    proc = run_mgpu(
        "train", str(QUICKSTART), *args, "output.export=[gguf]", "output.gguf_quant=f32", timeout=600,
        max_file_bytes=SMALL_DISK,
    )  # fmt: skip
    assert_user_error(proc, "cannot write", "training finished and its weights are saved", f"mgpu export {out}")
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not [p.name for p in out.iterdir() if "gguf" in p.name]  # no gguf/, no temporary folder


@pytest.mark.parametrize(
    ("dataset", "template"),
    [
        ({"format": "alpaca"}, True),
        ({"format": "chat"}, False),  # Ollama takes the chat template the GGUF carries
        ({"format": "text"}, False),
        ({"format": "alpaca", "mix": [{"path": "a.jsonl"}, {"path": "b.jsonl", "format": "chat"}]}, False),
        ({"format": "alpaca", "mix": [{"path": "a.jsonl"}, {"path": "b.jsonl", "format": "alpaca"}]}, True),
    ],
)
def test_the_modelfile_holds_the_alpaca_prompt_only_for_runs_trained_on_it_alone(dataset, template):
    from unsloth_mgpu_cli.gguf_export import ollama_modelfile

    text = ollama_modelfile("run.Q8_0.gguf", "<|eot_id|>", dataset)
    assert text.splitlines()[1] == "FROM ./run.Q8_0.gguf" and 'PARAMETER stop "<|eot_id|>"' in text
    assert ("TEMPLATE" in text.replace("# no TEMPLATE", "")) is template, text


@pytest.mark.integration
def test_ctrl_c_during_an_export_says_so_and_leaves_nothing_half_written(run, tmp_path):
    """typer turned a Ctrl-C in a command into a silent exit 130; train and prepare said theirs, export did not."""
    import signal

    target = tmp_path / "merged"
    proc = subprocess.Popen(
        [sys.executable, "-m", "unsloth_mgpu_cli", "export", str(run), "--output", str(target)],
        cwd=ROOT, env=mgpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        first = proc.stdout.readline()  # "[ 3.0 s] loading the base model ...": the command runs
        os.killpg(proc.pid, signal.SIGINT)
        out = first + proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and "loading the base model" in first, out[-3000:]
    assert "interrupted: mgpu export stopped before it finished" in out and "Traceback" not in out, out[-3000:]
    assert not target.exists() or not any(target.iterdir())
