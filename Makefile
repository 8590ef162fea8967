# Two commands for a fresh CPU machine (README): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo smoke test bench

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel from local disk: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'

setup: $(PY)

smoke: setup
	$(PY) -m opd_megatron smoke --config conf/smoke_tiny.yaml

demo: setup
	OMP_NUM_THREADS=1 $(PY) tools/run_demo.py

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests
