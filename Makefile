# Quick start: `make demo` runs the main job, `make test` runs the tests.
# Both install what they need into the current Python environment first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo test lint bench clean

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	@$(PYTHON) -c "import pybind11, setuptools, wheel, numpy, scipy, pytest, yaml, tqdm, hypothesis, matplotlib" \
		2>/dev/null || $(PIP) install -q pybind11 setuptools wheel numpy scipy pytest pyyaml tqdm \
		hypothesis matplotlib
	$(PIP) install -q --no-build-isolation --no-deps -e .

demo: install
	$(PYTHON) -m lplb.demo

test: install
	$(PYTHON) -m pytest -q tests

lint:
	@$(PYTHON) -c "import ruff" 2>/dev/null || $(PIP) install -q ruff
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

bench: install
	$(PYTHON) bench/bench_eplb.py
	$(PYTHON) bench/bench_quality.py

clean:
	rm -rf build *.egg-info eplb/_C*.so lplb/_C*.so
