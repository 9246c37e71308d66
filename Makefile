# lorakit: `make demo` and `make test` work from a fresh clone (they create .venv first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROMPT ?= \# Keeper's Log — Gull Rock Light, Week 2

.PHONY: venv demo test test-fast lint format docs bench bench-quality bench-gguf bench-plan bench-plan-gpu clean

# torch first: the pinned build (CPU here, CUDA on a GPU machine), so the range in pyproject.toml
# installs nothing else.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/lorakit models pull
	$(BIN)/lorakit train recipes/quickstart.yaml --overwrite
	$(BIN)/lorakit generate --adapter quickstart --compare --temperature 0 --max-new-tokens 80 "$(PROMPT)"

# pytest exits 5 when it collected no tests: that is a failure, not a pass.
test: venv
	$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest ran no tests"; exit 1; fi; exit $$rc

test-fast: venv
	$(BIN)/python -m pytest -m "not e2e"

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: venv
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

# Regenerate the recipe key reference in README.md from the schema.
docs: venv
	$(BIN)/python -m lorakit.recipe README.md

clean:
	rm -rf runs .pytest_cache .ruff_cache

# Speed/memory/loss benchmark (bench/results/); about 10 minutes on 2 cores. `python bench/run.py --quick` for a smoke run.
bench: venv
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/run.py

# Learning-quality benchmark: LoRA with lorakit's defaults vs a full fine-tune, and a learning-rate sweep
# (bench/results/quality.{json,md}); about 1.5 hours on 2 cores, resumable.
# `python bench/quality.py --quick` for a smoke run.
bench-gguf: venv  # needs llama-cpp-python, built from source once: see bench/gguf_parity.py
	$(BIN)/python bench/gguf_parity.py

bench-quality: venv
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/quality.py

bench-plan: venv  # lorakit plan's estimate against the allocator's measured peak, on this CPU
	$(BIN)/python bench/plan_accuracy.py

bench-plan-gpu: venv  # the same configurations on a CUDA machine (torch.cuda.max_memory_allocated)
	$(BIN)/python bench/plan_accuracy.py --gpu
