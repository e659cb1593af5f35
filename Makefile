# Each target is one thing a person or CI runs. `make demo` and `make test` set up .venv themselves.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
# torch is pinned to the CPU build on this project's dev/CI machines; on GPU hosts use `pip install -e .`.
TORCH   ?= torch==2.14.1
EXTRAS  := '.[dev,report]'
PYTEST  := $(PY) -m pytest
# Test processes for `make test` (pytest-xdist, one file per process): most tests wait on `mgpu train` subprocesses,
# and a 1-worker run leaves the second core of a 2-core CI machine idle. More on hosts with the cores to spare.
TEST_JOBS ?= 2

.PHONY: venv test test-quick test-gpu test-compat lint format schemas demo bench clean

# $(call install,VENV,PACKAGES): with uv when it installs (62 s for the whole stack in a fresh venv on the 2-core dev
# machine, pip 131 s), told where pip's configuration finds packages (tools/uv_flags.py: uv reads no pip.conf); with
# pip when uv fails.
# --compile-bytecode as pip does: where PYTHONDONTWRITEBYTECODE is set, nothing else would ever write the .pyc files.
define install
	@$(1)/bin/python -m pip install -q --disable-pip-version-check uv 2>&1 | grep -v '^WARNING: Location' || true
	@$(1)/bin/uv pip install --python $(1)/bin/python -q --compile-bytecode $$($(1)/bin/python tools/uv_flags.py) $(2) \
	  || { echo "uv could not install; installing with pip"; \
	       $(1)/bin/python -m pip install -q --disable-pip-version-check $(2) 2>&1 | grep -v '^WARNING: Location' || true; }
endef

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(call install,$(VENV),$(TORCH) -e $(EXTRAS))
	@$(PY) -c "import unsloth_mgpu_cli, torch, pydantic, typer" && touch $(STAMP)

venv: $(STAMP)

test: venv           ## the whole suite: unit + integration (real Unsloth on CPU, gloo)
	$(PYTEST) -q --durations=15 -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder

test-quick: venv     ## unit tests only (seconds)
	$(PYTEST) -q -m "not integration and not slow and not gpu"

test-gpu: venv       ## tests that need CUDA GPUs
	$(PYTEST) -q -m gpu

# The GPU image runs torch 2.11 (CI: 2.14.1): an API newer than 2.11 once broke every GPU run. This runs the
# distributed, sharded and engine tests under the GPU image's torch, on CPU, in a venv of its own (~6 GB, ~9 min).
COMPAT_VENV ?= .venv-torch211
test-compat:         ## the distributed/fsdp/engine tests under torch 2.11 (the GPU image's), on CPU
	@test -x $(COMPAT_VENV)/bin/python || python3 -m venv $(COMPAT_VENV)
	$(call install,$(COMPAT_VENV),torch==2.11.0 unsloth==2026.10.9 transformers==5.17.0 -e $(EXTRAS))
	$(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_distributed.py tests/test_fsdp.py \
	  tests/test_fsdp_qlora.py tests/test_engine_cpu.py tests/test_checkpoint_cpu.py tests/test_multinode.py

lint: venv
	$(VENV)/bin/ruff check unsloth_mgpu_cli unsloth_multigpu tests benchmarks examples tools
	$(VENV)/bin/ruff format --check unsloth_mgpu_cli unsloth_multigpu tests benchmarks examples tools

format: venv
	$(VENV)/bin/ruff format unsloth_mgpu_cli unsloth_multigpu tests benchmarks examples tools
	$(VENV)/bin/ruff check --fix unsloth_mgpu_cli unsloth_multigpu tests benchmarks examples tools

# The quick start asks for 2 workers (2 GPUs, or 2 CPU processes without a GPU); a host with one GPU runs one.
DEMO_ARGS ?= $(shell [ "$$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')" = 1 ] && echo distributed.num_gpus=1)
demo: venv           ## train the quick-start recipe (tiny model, bundled data; CPU or GPUs) and show the result
	$(VENV)/bin/mgpu train recipes/quickstart.yaml --overwrite $(DEMO_ARGS)

bench:               ## GPU host: mgpu vs Unsloth's TRL route on 1 and 2 GPUs, GSM8K QLoRA, global batch 128; see docs/BENCHMARKS.md (BENCH_ARGS=...)
	HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 python3 benchmarks/run.py --data $${DATA:-../shared/data/gsm8k_train_alpaca.json} --out $${OUT:-outputs/bench} $(BENCH_ARGS)

schemas: venv        ## regenerate schemas/recipe.schema.json (and the installed package's copy) from the pydantic recipe
	$(VENV)/bin/mgpu schema --output schemas/recipe.schema.json
	cp schemas/recipe.schema.json unsloth_mgpu_cli/schemas/recipe.schema.json

clean:
	rm -rf outputs .pytest_cache .ruff_cache
