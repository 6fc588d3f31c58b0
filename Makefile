# The two commands of the quick start: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
export FLWR_HOME ?= $(CURDIR)/.flwr
export TF_CPP_MIN_LOG_LEVEL ?= 3
export TF_ENABLE_ONEDNN_OPTS ?= 0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION ?= 1

.PHONY: run test check lint clean setup

setup: $(STAMP)

# Rebuilt when pyproject.toml changes (the stamp is older than it).
$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/fedecay compare --preset quick

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# The fast tier for the development loop: everything not marked slow.
check: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .flwr .pytest_cache
