# bnwatch — the README's commands.  Each target creates .venv if missing and installs the
# pinned versions from constraints.txt into it; nothing needs to be done by hand first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
PIP := $(BIN)/python -m pip
PIP_INSTALL := $(PIP) install --quiet --disable-pip-version-check -c constraints.txt
# the local PostgreSQL for the store tests (CI fails, rather than skips, without one)
export BNWATCH_TEST_POSTGRES_URL ?= postgresql://postgres@127.0.0.1:5432/test

.PHONY: demo test lint bench constraints clean help prometheus-tools deploy-tools browser-tools

help:
	@echo "make demo   - set up .venv and run 'bnwatch demo' on the embedded default (SQLite)"
	@echo "make test   - set up .venv and run ruff, mypy, import-linter and pytest"
	@echo "make bench  - run the benchmarks (prints tables of ratios)"
	@echo "make lint   - ruff, mypy and import-linter only"

# the demo needs the runtime and scikit-learn only; the tests add the dev tools on top
$(DEMO_STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check --upgrade "pip>=24"
	$(PIP_INSTALL) -e '.[demo]'
	touch $(DEMO_STAMP)

$(STAMP): $(DEMO_STAMP)
	$(PIP_INSTALL) -e '.[dev]'
	touch $(STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/bnwatch demo

lint: $(STAMP)
	$(BIN)/ruff check bnwatch tests benchmarks migrations dashboard
	$(BIN)/ruff format --check bnwatch tests benchmarks migrations dashboard
	$(BIN)/mypy
	$(BIN)/lint-imports

# promtool + prometheus for tests/export and deploy/prometheus (skipped locally without them,
# required in CI): installed from Debian when make runs as root, otherwise a hint
prometheus-tools:
	@if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else \
	    echo "promtool/prometheus not found: apt-get install prometheus (tests/export skip them; CI fails)"; \
	  fi; \
	fi

# docker-compose (Debian's parser validates docker-compose.yml without an engine) and amtool for
# tests/deploy (skipped locally without them, required in CI): from Debian as root, else a hint
deploy-tools:
	@if ! command -v docker-compose >/dev/null || ! command -v amtool >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends docker-compose prometheus-alertmanager >/dev/null; \
	  else \
	    echo "docker-compose/amtool not found: apt-get install docker-compose prometheus-alertmanager (tests/deploy skip them; CI fails)"; \
	  fi; \
	fi

# Debian's chromium for the dashboard's browser test (tests/dashboard/test_browser.py; skipped
# locally without it, required in CI): from Debian as root, else a hint
browser-tools:
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  else \
	    echo "chromium not found: apt-get install chromium (the browser test skips; CI fails)"; \
	  fi; \
	fi

# pytest-xdist: one worker per core (every test has its own database, ports and temp files)
PYTEST_WORKERS ?= auto
test: lint prometheus-tools deploy-tools browser-tools
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist worksteal

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/store.py
	$(BIN)/python benchmarks/recalibration.py
	$(BIN)/python benchmarks/recalibration.py --seed 0 1 2 3 4 --no-ablations
	$(BIN)/python benchmarks/detection.py
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/dashboard.py
	$(BIN)/python benchmarks/dashboard_reads.py
	$(BIN)/python benchmarks/reports.py

constraints: $(STAMP)
	@echo "# Pinned versions for 'make' (pip install -c constraints.txt). Regenerate: make constraints" > constraints.txt.new
	$(PIP) freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu/torch==\1/' >> constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
