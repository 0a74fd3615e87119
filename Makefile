# make test: everything from a fresh machine (venv, pip, Debian packages, local SLURM) to the tests.
# make demo: train configs/tiny.toml on 2 CPU processes and show the report and the loss curve.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# On a machine without CUDA, the CPU build of torch (on local disk here) goes in first, so that
# setup.py's range does not pull a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0
# GPU machines may have no venv and no internet: use what is installed there, from the source tree.
GPU_PY ?= $(if $(wildcard $(VENV)/bin/python),$(PY),python3)
# make bench: on a GPU machine the system's torch as it is; elsewhere the venv, set up first.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
BENCH_PY := $(if $(HAS_GPU),$(GPU_PY),$(PY))
PROFILE ?= 0

.PHONY: setup system-deps test test-gpu lint demo bench cluster-up cluster-down config-reference

$(VENV)/.installed: setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q $(TORCH_CPU); fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

system-deps:
	@command -v slurmctld >/dev/null 2>&1 || { \
	  echo "installing slurm-wlm (SLURM tests run a two-node cluster on localhost)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm >/dev/null; }

test: setup system-deps
	$(PY) -m llamatrain.kernels.compile_check --arch 80 --arch 90 --arch 120
	$(PY) -m pytest -q tests

test-gpu:
	LLAMATRAIN_TEST_DEVICE=cuda PYTHONPATH=src $(GPU_PY) -m pytest -q tests/test_kernel_*.py
	PYTHONPATH=src $(GPU_PY) benchmarks/kernels.py --first-timing
	PYTHONPATH=src $(GPU_PY) benchmarks/loss_memory.py --dim 4096

lint: setup
	$(VENV)/bin/ruff check src kernels tests benchmarks

demo: setup
	$(PY) -m llamatrain.demo

bench: $(if $(HAS_GPU),,setup)
	PYTHONPATH=src $(BENCH_PY) benchmarks/run.py $(if $(filter 1,$(PROFILE)),--profile,)

cluster-up: system-deps
	launch/local-cluster up

cluster-down:
	launch/local-cluster down

config-reference: setup
	$(PY) -m llamatrain.config --markdown
