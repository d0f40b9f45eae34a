# jitp: `make demo` and `make test` work from a fresh clone (they create .venv and install).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test check lint format bench clean console-deps

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m device_sim.demo

check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check jitp broker_plugins
	$(BIN)/mypy

test: check console-deps
	$(BIN)/python -m pytest -q

# The web console's browser tests run headless Debian chromium (through playwright).
console-deps:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium; }

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/join_storm.py

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache .hypothesis
