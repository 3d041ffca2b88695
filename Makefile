# emix — two commands for a newcomer:
#   make demo    install into .venv and run the demo (hub + two facilities on this machine)
#   make test    install everything (Debian packages too, when run as root) and run the tests

PYTHON ?= python3
VENV   := .venv
PIP    := $(VENV)/bin/pip
PLUGINS := $(wildcard plugins/*/pyproject.toml)

.PHONY: install demo test test-fast system-deps lint bench viewer

$(VENV)/.installed: pyproject.toml $(PLUGINS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test]' $(foreach p,$(PLUGINS),-e $(dir $(p)))
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/emix demo

# The OHIF viewer the hub serves at /viewer/ (npm pack @ohif/app): make viewer HOME_DIR=hub-home
viewer: install
	$(VENV)/bin/emix viewer install $(if $(HOME_DIR),--home $(HOME_DIR))

system-deps:
	bash .ci/system-deps

# The suite mostly waits on the real peers it starts (hub, PACS, browsers), so it runs
# four files at a time even on two cores; a file's tests stay on one worker.
TEST_WORKERS ?= 4

test: system-deps install
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

# The fast in-process loop (no real hub process, PACS or browser).
test-fast: install
	$(VENV)/bin/pytest -q -m "not e2e"

PLUGIN_PACKAGES := $(filter-out %.egg-info,$(wildcard plugins/*/emix_* examples/*/emix_*))

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy emix_core $(PLUGIN_PACKAGES)

bench: system-deps install
	$(VENV)/bin/python benchmarks/run.py
