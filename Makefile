# `make bench` and `make test` do all the set-up: a .venv with torch (a CPU build
# where there is no NVIDIA GPU), the dev requirements and the package itself.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: setup bench bench-full test test-long test-cuda-build test-compat test-peft-suite gpu-check lint
.PHONY: format clean

setup: $(STAMP)

$(PY):
	python3 -m venv $(VENV)

# torch only if absent, and never a CUDA build on a machine without a GPU.
$(STAMP): $(PY) setup.py pyproject.toml requirements-dev.txt $(shell find csrc -type f)
	$(PY) -m pip install -q --upgrade pip
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
		if [ "$(HAS_GPU)" = "1" ]; then $(PY) -m pip install -q torch; \
		else $(PY) -m pip install -q torch==2.13.0; fi; \
	fi
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q -e . --no-build-isolation
	touch $(STAMP)

bench: $(STAMP)
	$(PY) benchmarks/bench_lora_linear.py
	$(PY) benchmarks/bench_lora_linear.py --qlora

bench-full: $(STAMP)
	$(PY) benchmarks/bench_lora_linear.py --full

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest -q -m "not slow"

test-long: lint
	$(PY) -m pytest -q
	bash .ci/compile_reports.sh
	bash .ci/peft_suite.sh

# peft's own LoRA tests, offline, as shipped and with every model patched by patch_peft.
test-peft-suite: $(STAMP)
	bash .ci/peft_suite.sh

# The extension built with nvcc against a CUDA torch in .venv-cuda, checked on the CPU.
test-cuda-build:
	bash .ci/cuda_build.sh

# The supported floor (Python 3.12, torch 2.11, Triton 3.6) in .venv-compat: the triton
# backend's interpreter suite, its compile report and the CPU tests of op, layer and _C.
test-compat:
	bash .ci/compat.sh

# On a GPU machine, with its own python3 and nothing installed: build, GPU tests, the
# headline benchmark and a profile, each step under its own timeout (benchmarks/gpu_check.py).
# COMMIT=<hash> names the commit where the tree is a copy without .git.
GPU_CHECK_OUT ?= gpu-check-out
gpu-check:
	python3 benchmarks/gpu_check.py $(GPU_CHECK_OUT) $(if $(COMMIT),--commit $(COMMIT))

clean:
	rm -rf $(VENV) .venv-cuda .venv-compat build *.egg-info gpu-check-out
