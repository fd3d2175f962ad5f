# Two commands do all the set-up on a fresh machine:
#   make demo   builds a virtualenv, the tiny model zoo, and runs the demo
#   make test   builds the virtualenv and runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.splice-installed

.PHONY: demo test setup clean bench

setup: $(STAMP)

# torch first, pinned to the local CPU build, so nothing pulls a CUDA build.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip 2>/dev/null || true
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test,plot]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(VENV)/bin/splice demo

clean:
	rm -rf $(VENV) .pytest_cache build
