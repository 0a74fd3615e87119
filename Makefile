# make test: everything from a fresh machine (venv, pip, Debian packages, local SLURM) to the tests.
# make demo: train configs/tiny.toml on 2 CPU processes and show the report and the loss curve.
# make gpu-check [OUT=DIR]: on a GPU machine, everything a first GPU contact brings back, in at
# most 8 minutes with the machine's own python3 (no venv, pip or network); elsewhere a rehearsal.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# On a machine without CUDA, the CPU build of torch (on local disk here) goes in first, so that
# setup.py's range does not pull a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0
# ... and every other package at the version of the last green run (pip constraints; empty: the
# newest that setup.py's ranges allow).
CONSTRAINTS ?= tests/constraints.txt
# Whether the system's python3 has a torch that sees a GPU: torch is asked, not nvidia-smi (which
# a GPU machine may not have on PATH), and a .venv carried to a GPU machine cannot change the
# answer. Recursive (=): only the targets that use it pay for importing torch.
SYSTEM_CUDA = $(shell python3 -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' \
                >/dev/null 2>&1 && echo 1)
# make gpu-check: the system's python3 on a GPU machine, else the project's venv (a rehearsal;
# python3 where there is no venv). make bench: the same on a GPU, else the venv, set up first.
GPU_CHECK_PY = $(if $(SYSTEM_CUDA),python3,$(if $(wildcard $(PY)),$(PY),python3))
BENCH_PY = $(if $(SYSTEM_CUDA),python3,$(PY))
OUT ?= benchmarks/results
PROFILE ?= 0
# A second venv with the GPU image's torch 2.11, triton 3.6.0 and numpy (tests/
# gpu_image_requirements.txt): `make test` runs compile_check and the GPU-relevant tests in it.
IMAGE_VENV ?= .venv-gpuimage
IMAGE_PY := $(IMAGE_VENV)/bin/python
# The tests a GPU run depends on that take paths of their own under torch 2.11 and triton 3.6:
# every kernel launch (wrap_triton), the interpreter's loops, the model and FSDP2 with the
# kernels, sharded init, async checkpoints, the kernel choice and the trainer (see README).
IMAGE_TESTS ?= tests/test_kernel_attention.py tests/test_kernel_cross_entropy.py \
  tests/test_kernel_linear_cross_entropy.py tests/test_kernel_rmsnorm.py \
  tests/test_kernel_rotary.py tests/test_kernel_swiglu.py tests/test_kernel_model.py \
  tests/test_model.py tests/test_checkpoint.py tests/test_kernels_choice.py \
  "tests/test_parallel.py::test_sharded_init_gives_the_same_full_weights_at_any_layout[4-2-2]" \
  "tests/test_train.py::test_injected_nan_is_skipped_and_counted"
IMAGE_DESELECT ?= -k 'not gqa8:1-d64-seq131 and not each_gpu_launch_config'

.PHONY: setup system-deps test test-gpu-image lint demo bench gpu-check cluster-up cluster-down \
  config-reference

$(VENV)/.installed: setup.py $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -z "$(SYSTEM_CUDA)" ]; then \
	  $(PY) -m pip install -q $(TORCH_CPU) && \
	  $(PY) -m pip install -q -e '.[dev]' $(if $(CONSTRAINTS),-c $(CONSTRAINTS),); \
	else $(PY) -m pip install -q -e '.[dev]'; fi
	touch $@

setup: $(VENV)/.installed

# Skipped when complete: the stamp is written last, after every package is in.
$(IMAGE_VENV)/.installed: tests/gpu_image_requirements.txt
	rm -rf $(IMAGE_VENV)
	python3 -m venv $(IMAGE_VENV)
	$(IMAGE_PY) -m pip install -q -r tests/gpu_image_requirements.txt
	touch $@

test-gpu-image: $(IMAGE_VENV)/.installed
	PYTHONPATH=src $(IMAGE_PY) -m llamatrain.kernels.compile_check --arch 90
	PYTHONPATH=src $(IMAGE_PY) -m pytest -q -p no:cacheprovider $(IMAGE_TESTS) $(IMAGE_DESELECT)

system-deps:
	@command -v slurmctld >/dev/null 2>&1 || { \
	  echo "installing slurm-wlm (SLURM tests run a two-node cluster on localhost)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm >/dev/null; }

test: setup system-deps test-gpu-image
	$(PY) -m llamatrain.kernels.compile_check --arch 80 --arch 90 --arch 120
	$(PY) -m pytest -q tests

gpu-check:
	PYTHONPATH=src $(GPU_CHECK_PY) benchmarks/gpu_check.py --out $(OUT)

lint: setup
	$(VENV)/bin/ruff check src kernels tests benchmarks

demo: setup
	$(PY) -m llamatrain.demo

bench:
	$(if $(SYSTEM_CUDA),,$(MAKE) setup)
	PYTHONPATH=src $(BENCH_PY) benchmarks/run.py $(if $(filter 1,$(PROFILE)),--profile,)

cluster-up: system-deps
	launch/local-cluster up

cluster-down:
	launch/local-cluster down

config-reference: setup
	$(PY) -m llamatrain.config --markdown
