# Everything sets itself up in a local virtualenv (.venv): torch==2.14.1, the CUTLASS/CuTe
# headers (nvidia-cutlass), pybind11, ninja, cmake, numpy, pytest, hypothesis.
#   make test    build the extension (CUDA kernels where nvcc exists) and run the test suite;
#                also configures and compiles the C++ benchmarks (CMake) when nvcc exists
#   make bench   the main job: on a GPU the NSA-vs-full-attention benchmarks, else a CPU demo
# Build knobs (see setup.py): NSA_CUDA_ARCHS, NSA_CUDA_DTYPES, NSA_CUDA_HEADDIMS, MAX_JOBS.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MAX_JOBS ?= $(shell nproc)
NVCC := $(firstword $(wildcard $(CUDA_HOME)/bin/nvcc /usr/local/cuda/bin/nvcc) $(shell command -v nvcc))
export MAX_JOBS

.PHONY: venv build test bench cmake clean

$(VENV)/.ready:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 numpy pybind11 ninja cmake pytest hypothesis expecttest setuptools wheel
	$(PY) -m pip install -q --no-deps nvidia-cutlass==4.2.0.0
	touch $@

venv: $(VENV)/.ready

build: $(VENV)/.ready
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import nsa_cuda; print('nsa_cuda build:', nsa_cuda.build_info())"

cmake: $(VENV)/.ready
ifneq ($(NVCC),)
	$(VENV)/bin/cmake -S . -B build-cmake -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja \
	  -DCMAKE_CUDA_COMPILER=$(NVCC) -DCMAKE_CUDA_ARCHITECTURES="$${NSA_CMAKE_ARCHS:-90a}"
	$(VENV)/bin/cmake --build build-cmake -j $(MAX_JOBS)
else
	@echo "cmake: no nvcc found, skipping the C++ benchmarks"
endif

test: build cmake
	$(PY) -m pytest -q -p no:cacheprovider -rfEs tests

bench: build
	@if $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
	  for b in bench/bench_*.py; do $(PY) $$b || exit 1; done; \
	else \
	  $(PY) bench/cpu_demo.py; \
	fi

clean:
	rm -rf build build-cmake nsa_cuda/_C*.so *.egg-info
