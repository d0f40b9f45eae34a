# jitp: `make demo` and `make test` work from a fresh clone (they create .venv and install).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test check lint format bench clean console-deps interop-deps

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

test: check console-deps interop-deps
	$(BIN)/python -m pytest -q

# The web console's browser tests run headless Debian chromium (through playwright).
console-deps:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium; }

# The interop tests (tests/interop) drive real clients: Debian's mosquitto-clients, and MQTT.js from
# npm, pinned by tests/interop/node/package-lock.json, into its node_modules (git-ignored). Where node
# is missing, the MQTT.js tests are skipped, except under CI, which installs it (or they fail).
INTEROP_NODE := tests/interop/node
interop-deps: $(INTEROP_NODE)/node_modules/.package-lock.json
	@command -v mosquitto_rr >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq mosquitto-clients; }

$(INTEROP_NODE)/node_modules/.package-lock.json: $(INTEROP_NODE)/package.json $(INTEROP_NODE)/package-lock.json
	@if [ -n "$$CI" ] && ! command -v npm >/dev/null 2>&1; then \
		apt-get update -qq && apt-get install -y -qq nodejs npm; fi
	@if command -v npm >/dev/null 2>&1; then \
		npm ci --prefix $(INTEROP_NODE) --no-audit --no-fund --loglevel=error; \
	else echo "interop-deps: no npm here; the MQTT.js interop tests will be skipped"; fi

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/join_storm.py

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache .hypothesis
