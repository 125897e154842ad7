# `make bench` and `make test` do all the set-up: a .venv with torch (a CPU build
# where there is no NVIDIA GPU), the dev requirements and the package itself.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: setup bench bench-full test test-long test-cuda-build test-compat lint format clean

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

# The extension built with nvcc against a CUDA torch in .venv-cuda, checked on the CPU.
test-cuda-build:
	bash .ci/cuda_build.sh

# The triton backend's interpreter suite and compile report on the oldest supported Triton.
test-compat: $(STAMP)
	bash .ci/compat.sh

clean:
	rm -rf $(VENV) .venv-cuda .venv-compat build *.egg-info
