# WTC Analytics. `make demo` runs the whole pipeline on this machine; `make test` lints and tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SCALE ?= small
STREAM ?= redis
export DBT_PROFILES_DIR := $(CURDIR)/dbt

.PHONY: help venv setup start status stop demo test lint lint-monitoring format bench bench-stages docs clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

venv: $(VENV)/.installed  ## create the virtual environment with pinned dependencies

setup: venv  ## install missing Debian packages and service users (as root on Debian); fetch the pinned Kafka/Connect jars (mvn) into .cache/jvm when a JDK is there
	$(PY) -m ops.stack setup

start: venv  ## start Postgres, Redis and the SFTP server under .wtc/ and bootstrap them
	$(PY) -m ops.stack start

status: venv  ## what runs, where
	$(PY) -m ops.stack status

stop: venv  ## stop everything the demo started, gracefully
	$(PY) -m ops.stack stop

demo: venv  ## set up, run the whole pipeline, leave the API and docs serving (SCALE=small|starter, STREAM=redis|kafka)
	$(PY) -m ops.demo --scale $(SCALE) --stream $(STREAM)

lint: venv  ## ruff, mypy, the import rules, and sqlfluff with the dbt templater (offline: the profile's `lint` target)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(VENV)/bin/sqlfluff lint dbt/models dbt/macros dbt/tests --processes 2
	$(MAKE) --no-print-directory lint-monitoring

lint-monitoring: venv  ## promtool and amtool on the rendered monitoring config (local and compose)
	@command -v promtool >/dev/null || { echo "promtool missing: make setup"; exit 1; }
	@set -e; out=$$(mktemp -d); trap 'rm -rf "$$out"' EXIT; \
	for flavour in local compose; do \
	  $(PY) -m monitoring.config --out "$$out/$$flavour" $$([ $$flavour = compose ] && echo --compose) >/dev/null; \
	  promtool check config "$$out/$$flavour/prometheus.yml"; \
	  promtool check rules "$$out/$$flavour/rules.yml"; \
	  amtool check-config "$$out/$$flavour/alertmanager.yml"; \
	done

format: venv  ## apply ruff's and sqlfluff's formatting and fixes
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/sqlfluff fix dbt/models dbt/macros dbt/tests --processes 2

test: setup lint  ## lint, then the whole test suite against real servers
	$(VENV)/bin/pytest

bench: setup  ## the whole pipeline end to end, with baselines and a report (SCALE=small|starter|10x)
	$(PY) -m bench.pipeline --scale $(SCALE)

bench-stages: setup  ## the per-stage benchmarks (loader, dbt, HVS and API), one after the other
	$(PY) -m bench

docs: venv  ## generate and serve the dbt docs site
	$(PY) -m ops.demo --docs-only

clean: stop  ## stop everything and delete the state folder .wtc/
	rm -rf .wtc dbt/target dbt/logs
