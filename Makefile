# `make run` and `make test` set up .venv on first use, so both work on a
# fresh clone with only python3 (3.11 or newer) installed.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
BENCH_STAMP := $(VENV)/.bench-stamp

.PHONY: run test lint format clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

run: $(STAMP)
	$(BIN)/fleetvm serve

lint: $(STAMP)
	$(BIN)/ruff format --check fleetvm tests benchmarks
	$(BIN)/ruff check fleetvm tests benchmarks

# Each run gets its own pytest base directory, removed afterwards: pytest's
# clean-up of old runs under /tmp/pytest-of-USER can raise ResourceWarning,
# which the suite treats as an error.
test: lint
	@basetemp=$$(mktemp -d /tmp/fleetvm-pytest-XXXXXX); \
	$(BIN)/python -m pytest --basetemp=$$basetemp; status=$$?; \
	rm -rf $$basetemp; exit $$status

# Starts PostgreSQL and Redis if they are down and stops them afterwards; the
# benchmark starts and stops everything else. BENCH_ARGS=--quick for a short run.
bench: $(BENCH_STAMP)
	@started=$$(scripts/services start postgresql redis) || exit 1; \
	stop() { [ -z "$$started" ] || scripts/services stop $$started; }; \
	trap 'stop; exit 130' INT TERM; \
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS); status=$$?; \
	trap - INT TERM; stop; exit $$status

format: $(STAMP)
	$(BIN)/ruff format fleetvm tests benchmarks
	$(BIN)/ruff check --fix fleetvm tests benchmarks

clean:
	rm -rf $(VENV) .fleetvm
