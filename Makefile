# The README's two commands. Both create .venv and install the project on a fresh machine.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)
	command -v chromium >/dev/null || ! command -v apt-get >/dev/null \
		|| (apt-get update && apt-get install -y chromium) \
		|| echo "chromium not installed: the report's browser check will be skipped"

demo: $(STAMP)
	$(BIN)/rbcbatch demo --out demo_out

test: install
	$(BIN)/ruff check rbcbatch tests
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check rbcbatch tests
	$(BIN)/lint-imports
	$(BIN)/ruff format --check rbcbatch tests

clean:
	rm -rf $(VENV) demo_out .pytest_cache
