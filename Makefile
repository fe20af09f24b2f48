# The two commands of the README: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
WB     := $(VENV)/bin/workbench
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup data browser demo test test-fast bench clean help

help:
	@echo "make demo   set up .venv, fetch the sample data and run the quickstart notebook headless"
	@echo "make test   set up .venv and run the test suite (installs Debian's chromium for the browser tests)"
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

# Debian's chromium (and chromium-driver) for the browser tests (tests/browser.py drives /usr/bin/chromium
# with Playwright; no browser is downloaded).  Installed when missing and we are root; otherwise a note,
# and the browser tests skip with the reason.
CHROMIUM ?= /usr/bin/chromium
CHROMEDRIVER ?= /usr/bin/chromedriver
APT_BROWSER := DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver
browser:
	@if [ -x "$(CHROMIUM)" ] && [ -x "$(CHROMEDRIVER)" ]; then \
		exit 0; \
	elif [ "$$(id -u)" != 0 ]; then \
		if [ -x "$(CHROMIUM)" ]; then \
			echo "make browser: chromium-driver is missing (not needed by the tests); as root: $(APT_BROWSER)"; \
		else \
			echo "make browser: $(CHROMIUM) is missing and this is not root, so it cannot be installed;" \
			     "the browser tests will be skipped. Install it with: sudo $(APT_BROWSER)"; \
		fi; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "make browser: no apt-get here: install chromium yourself (or set WORKBENCH_CHROMIUM);" \
		     "without it the browser tests are skipped"; \
	else \
		echo "make browser: installing Debian's chromium and chromium-driver"; \
		$(APT_BROWSER) >/dev/null || { apt-get update -qq && $(APT_BROWSER) >/dev/null; } \
		|| echo "make browser: apt-get could not install chromium; the browser tests will be skipped"; \
	fi

demo: data
	$(WB) demo

test: data browser
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
	$(PY) bench/interactive.py --json outputs/bench_interactive.json

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
