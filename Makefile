# Two commands for a fresh machine: `make demo` (main job) and `make test` (the suite).
SHELL := /bin/bash
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_NO_USAGE_STATS := 1
export DO_NOT_TRACK := 1
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_CACHE_ROOT := $(CURDIR)/.cache/vllm
export XDG_CACHE_HOME := $(CURDIR)/.cache
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast profile eval clean

setup:
	bash scripts/setup_env.sh

demo: setup
	$(PY) -m hybridkv_vllm.demo

# ruff and mypy (the engine-agnostic core) first, seconds; TRITON_INTERPRET=1: the Triton kernels run on the CPU
# interpreter (vLLM's CPU build ignores Triton either way).
test: setup
	$(PY) -m ruff check .
	$(PY) -m mypy hybridkv_vllm/core
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m ruff check .
	$(PY) -m mypy hybridkv_vllm/core
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not engine" tests

clean:
	rm -rf .cache .tmp .pytest_cache
