# The two commands of the quick start: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# The exact tested versions of every package (pyproject.toml holds the ranges).
LOCK := requirements.lock
UV := $(VENV)/bin/uv
UV_VERSION := $(shell sed -n "s/^uv==\([^ ]*\).*/\1/p" $(LOCK) 2>/dev/null)
export FLWR_HOME ?= $(CURDIR)/.flwr
export TF_CPP_MIN_LOG_LEVEL ?= 3
export TF_ENABLE_ONEDNN_OPTS ?= 0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION ?= 1
FLWR_CONFIG = $(FLWR_HOME)/config.toml

.PHONY: run test check lint clean setup lock flwr-config

setup: $(STAMP) flwr-config

# The venv with uv, at the version the lock names.
$(UV):
	@test -x $(VENV)/bin/python || { \
	  $(PYTHON) -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 12))' \
	    || { echo "needs Python 3.11 or 3.12: make setup PYTHON=python3.11"; exit 1; }; \
	  $(PYTHON) -m venv $(VENV); }
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"

# uv installs the locked set into .venv, then the project itself without resolving again;
# `uv pip check` fails when pyproject.toml asks for a package or a range the lock does not
# satisfy (then run `make lock`). Rebuilt when pyproject.toml or the lock changes (the
# stamp is older than them). --compile-bytecode as pip does: without .pyc files (and with
# PYTHONDONTWRITEBYTECODE set) every process would compile TensorFlow again on import.
$(STAMP): pyproject.toml $(LOCK) | $(UV)
	@echo "installing $(LOCK) into $(VENV) (a few hundred MB on a fresh machine)"
	$(UV) pip install --quiet --compile-bytecode --python $(VENV)/bin/python -r $(LOCK)
	$(UV) pip install --quiet --python $(VENV)/bin/python --no-deps -e .
	$(UV) pip check --python $(VENV)/bin/python
	@touch $(STAMP)

# `flwr run .` takes its SuperLink connection from $(FLWR_HOME)/config.toml: the default
# one written here runs the local Simulation Engine with one virtual SuperNode per merchant
# of the quick preset (8), one CPU each. Written when missing or still Flower's own
# default; a file edited by hand is left alone. (Flower 1.42 calls `options.` deprecated,
# with a warning, but applies them; `--federation-config` replaces them for one run.)
flwr-config: $(STAMP)
	@mkdir -p $(FLWR_HOME)
	@if [ ! -s $(FLWR_CONFIG) ] || { ! grep -qs num-supernodes $(FLWR_CONFIG) && \
	  $(VENV)/bin/python -c 'import sys, pathlib; \
	    from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML as d; \
	    sys.exit(pathlib.Path(sys.argv[1]).read_text() != d)' $(FLWR_CONFIG); }; then \
	  printf '%s\n' \
	    '# Written by `make setup`: `flwr run .` runs the quick preset (8 merchants)' \
	    '# on the local Simulation Engine, one CPU per virtual SuperNode.' \
	    '[superlink]' \
	    'default = "local"' \
	    '' \
	    '[superlink.local]' \
	    'address = ":local:"' \
	    'options.num-supernodes = 8' \
	    'options.backend.client-resources.num-cpus = 1' \
	    'options.backend.client-resources.num-gpus = 0.0' > $(FLWR_CONFIG); \
	  echo "wrote $(FLWR_CONFIG)"; \
	fi

# Re-resolve the lock after changing the dependencies in pyproject.toml; pins that still
# fit stay. The lock holds the dev and mlflow extras, so `make setup` installs both.
# `make lock LOCK_FLAGS=--upgrade` moves everything to the newest allowed.
lock: | $(UV)
	$(UV) pip compile pyproject.toml --extra dev --extra mlflow -o $(LOCK) --python-version 3.11 \
	  --python-platform x86_64-unknown-linux-gnu --generate-hashes \
	  --custom-compile-command "make lock" --quiet $(LOCK_FLAGS)

run: setup
	$(VENV)/bin/fedecay compare --preset quick

# Two pytest workers (pytest-xdist), one test file each at a time (a file's shared
# simulation runs once); TEST_WORKERS=1 runs the suite in one process.
TEST_WORKERS ?= 2
PYTEST := $(VENV)/bin/python -m pytest -q $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

# The whole suite; the 25 slowest tests are listed at the end to keep its time in view.
test: setup
	$(PYTEST) --durations=25

# The fast tier for the development loop: everything not marked slow.
check: setup
	$(PYTEST) -m "not slow"

# Both checks run; lint fails when either finds something.
lint: setup
	@status=0; \
	echo "ruff check ."; $(VENV)/bin/ruff check . || status=1; \
	echo "mypy common client server"; $(VENV)/bin/mypy common client server || status=1; \
	exit $$status

clean:
	rm -rf $(VENV) .flwr .pytest_cache .mypy_cache
