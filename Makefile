# The two commands of the README: `make serve` and `make test`.
# Each bootstraps .venv from requirements.lock first (exact versions of every
# dependency, so generated code and tools never change under our feet).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test lint breaking fmt proto lock bench clean

# A .venv that cannot serve (its interpreter gone, older than 3.11, or without pip:
# a venv made where python3-venv was missing) is made again, never reused: its
# stamp would otherwise keep make from looking at it.
VENV_WORKS := $(shell $(BIN)/python -c 'import sys, pip; sys.exit(sys.version_info < (3, 11))' \
	>/dev/null 2>&1 && echo yes)
ifneq ($(VENV_WORKS),yes)
$(shell rm -f $(STAMP))
endif

$(STAMP): pyproject.toml requirements.lock
	@if [ "$(VENV_WORKS)" != yes ]; then \
	  $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	    echo "memsvc needs Python 3.11 or later: make PYTHON=python3.11 (or newer)" >&2; exit 1; }; \
	  rm -rf $(VENV); \
	  echo "$(PYTHON) -m venv $(VENV)"; \
	  $(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	    echo "could not create $(VENV) (Debian, Ubuntu: apt-get install python3-venv)" >&2; exit 1; }; \
	fi
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	touch $(STAMP)

## serve: run memsvc on the embedded default (in-process working memory, SQLite)
serve: $(STAMP)
	$(BIN)/memsvc serve $(ARGS)

## test: run the whole test suite (needs the local Redis and PostgreSQL, see README)
test: $(STAMP)
	$(BIN)/pytest $(ARGS)

## lint: buf lint, ruff, ruff format --check and mypy, as CI runs them
lint: $(STAMP)
	$(BIN)/buf lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## breaking: check proto/ for breaking changes against the main branch
breaking: $(STAMP)
	$(BIN)/buf breaking --against '.git#branch=main'

## fmt: apply ruff's fixes and formatting
fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## proto: regenerate memsvc/v1 from proto/
proto: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

## lock: re-resolve dependencies and rewrite requirements.lock
lock:
	rm -rf .lockenv && $(PYTHON) -m venv .lockenv
	.lockenv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	.lockenv/bin/python -m pip freeze --exclude-editable --disable-pip-version-check > requirements.lock
	rm -rf .lockenv

## bench: run the working-memory benchmark (see docs/performance.md)
bench: $(STAMP)
	$(BIN)/python -m bench.working_memory $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
