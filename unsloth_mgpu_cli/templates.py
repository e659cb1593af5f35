"""The starter recipe written by `mgpu init`, and the small generated dataset the quick start trains on.

The dataset is generated (seeded) rather than downloaded, so the quick start needs no network. Its
tasks (adding numbers, reversing words, upper-casing, counting letters) are easy enough that even the
tiny random model's loss falls visibly within a few hundred steps.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .errors import Problem, UserError

QUICKSTART_DATA_NAME = "quickstart.jsonl"

_WORDS = (
    "apple banana cherry grape lemon mango olive peach pear plum red green blue black white gold silver "
    "cat dog fox owl bee ant cow hen pig yak sun moon star rain snow wind tree leaf rock sand"
).split()

# The recipe schema shipped inside the package (a copy of schemas/recipe.schema.json, written by `make schemas`).
SCHEMA_FILE = Path(__file__).parent / "schemas" / "recipe.schema.json"


def schema_comment() -> str:
    """The first line of a written recipe: editors with the YAML language server validate against the schema."""
    return f"# yaml-language-server: $schema={SCHEMA_FILE.as_uri()}"


STARTER_RECIPE = """\
{schema}
# A starter recipe: LoRA on the builtin tiny Llama (random weights, built locally) with a bundled dataset.
# Runs anywhere, CPU included:   mgpu validate {name}   then   mgpu train {name}
# Replace model.name with a hub id or local folder (e.g. unsloth/Llama-3.1-8B) for real work.

model:
  name: builtin:tiny-llama      # hub id, local folder, or builtin:tiny-llama
  max_seq_length: 128
  dtype: auto                   # auto | bfloat16 | float16 | float32
  load_in_4bit: false           # true = QLoRA (CUDA only)

lora:                           # `lora: null` for full fine-tuning (without this section: default LoRA)
  r: 16
  alpha: 16
  dropout: 0.0
  target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
  # use_dora: true              # DoRA; or loraplus_lr_ratio: 16 (LoRA+: B matrices at 16 x the rate)

dataset:
  path: data/{data}             # .json/.jsonl/.csv/.parquet (relative to this file) or a hub dataset id
  format: alpaca                # alpaca | chat | text

training:
  epochs: 1
  max_steps: 60                 # overrides epochs when set
  micro_batch_size: 4           # per GPU (or CPU worker)
  gradient_accumulation_steps: 1
  learning_rate: 3.0e-3
  optimizer: adamw              # adamw | adamw_8bit | sgd
  lr_scheduler: cosine          # constant | linear | cosine | cosine_with_restarts | inverse_sqrt | warmup_stable_decay
  warmup_steps: 5               # or warmup_ratio: 0.1 (a fraction of the steps)
  # neftune_noise_alpha: 5      # NEFTune: noise on the input embeddings while training
  seed: 42

distributed:
  num_gpus: auto                # workers; auto = every visible GPU (1 worker on CPU)
  device: auto                  # auto | cuda | cpu
  aggregation: weighted         # mean | sum | weighted | median

output:
  dir: outputs/starter
  save_steps: 50
"""


def generate_quickstart_rows(n: int = 512, seed: int = 0) -> list[dict[str, str]]:
    """Deterministic alpaca rows for the quick start."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            rows.append({"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b)})
        elif kind == 1:
            words = rng.sample(_WORDS, rng.randint(2, 5))
            rows.append(
                {
                    "instruction": "Reverse the order of the words.",
                    "input": " ".join(words),
                    "output": " ".join(reversed(words)),
                }
            )
        elif kind == 2:
            word = rng.choice(_WORDS)
            rows.append({"instruction": "Write the word in capital letters.", "input": word, "output": word.upper()})
        else:
            word = rng.choice(_WORDS)
            rows.append(
                {"instruction": "How many letters does the word have?", "input": word, "output": str(len(word))}
            )
    return rows


def quickstart_jsonl() -> str:
    """The bundled quick-start data (recipes/data/quickstart.jsonl) as JSON Lines text."""
    return "".join(json.dumps(r) + "\n" for r in generate_quickstart_rows())


def write_starter(path: Path, force: bool = False) -> tuple[Path, str | None]:
    """Write the starter recipe and its dataset (data/quickstart.jsonl beside it); checks everything first.

    Returns the recipe's path and, when a dataset file of another content was already there (kept: it may be the
    user's), a line saying so.

    Raises:
        UserError: the recipe exists (without `force`), its folder or the data folder is a file, or a write fails.
    """
    path = Path(path)
    data = path.parent / "data" / QUICKSTART_DATA_NAME
    if path.exists() and not force:
        raise UserError(
            Problem("argument PATH", f"{path} exists", "pass --force to overwrite it, or choose another path"),
            "invalid arguments",
        )
    blocked = next((a for a in (data.parent, *data.parent.parents) if a.exists() and not a.is_dir()), None)
    if blocked is not None:
        where = "the recipe's folder" if blocked in (path.parent, *path.parent.parents) else "the starter's data folder"
        raise UserError(
            Problem(
                "argument PATH",
                f"{where} {blocked} is a file",
                f"choose a path in another folder, e.g. mgpu init {Path('starter') / path.name}",
            ),
            "invalid arguments",
        )
    content = quickstart_jsonl()
    kept = None
    if data.is_file() and data.read_text(encoding="utf-8", errors="replace") != content:
        kept = f"kept the existing {data} (not the starter's dataset): the recipe trains on it"
    try:
        data.parent.mkdir(parents=True, exist_ok=True)
        if not data.exists():
            data.write_text(content, encoding="utf-8")
        path.write_text(
            STARTER_RECIPE.format(schema=schema_comment(), name=path.name, data=QUICKSTART_DATA_NAME), encoding="utf-8"
        )
    except OSError as exc:
        raise UserError(
            Problem(
                "argument PATH",
                f"cannot write {exc.filename or path}: {exc.strerror or exc}",
                "choose a writable folder",
            ),
            "invalid arguments",
        ) from exc
    return path, kept
