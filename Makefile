# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create the virtual environment (.venv) and install dagtrain into it first.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: demo test lint

$(BIN)/dagtrain: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/dagtrain
	$(BIN)/dagtrain demo --out demo-run

test: $(BIN)/dagtrain
	$(BIN)/python -m pytest

lint: $(BIN)/dagtrain
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
