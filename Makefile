# The two commands of the README: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
WB     := $(VENV)/bin/workbench
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup data demo test test-fast bench clean help

help:
	@echo "make demo   set up .venv, fetch the sample data and run the quickstart notebook headless"
	@echo "make test   set up .venv and run the test suite"
	@echo "make bench  run the benchmarks in bench/"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	# Jupyter kernel "workbench" inside the venv (seen by the venv's JupyterLab; never overwrites a user-wide kernel)
	$(PY) -m ipykernel install --sys-prefix --name workbench --display-name "Python (workbench)"
	touch $(STAMP)

setup: $(STAMP)

# The real sample files (mskt 0.1.22 sdist from PyPI, cached under $$WORKBENCH_CACHE or ~/.cache/workbench).
data: setup
	$(WB) data fetch

demo: data
	$(WB) demo

test: data
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# PYMSKT_PYTHON: an interpreter with pymskt, for the side-by-side thickness figures (see bench/pymskt_reference.py)
PYMSKT_PYTHON ?=
bench: data
	$(PY) bench/dicom_io.py
	$(PY) bench/knee_analysis.py --quick --json outputs/bench_knee_analysis.json \
		$(if $(PYMSKT_PYTHON),--pymskt-python $(PYMSKT_PYTHON))
	$(PY) bench/rasterizer.py --quick --json outputs/bench_rasterizer.json
	$(PY) bench/nvdiffrec.py --quick --json outputs/bench_nvdiffrec.json

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
