# WTC Analytics. `make demo` runs the whole pipeline on this machine; `make test` lints and tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SCALE ?= small
STREAM ?= redis
export DBT_PROFILES_DIR := $(CURDIR)/dbt

.PHONY: help venv setup start status stop demo test lint format bench docs clean

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

lint: venv  ## ruff, and sqlfluff with the dbt templater (offline: the profile's `lint` target)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/sqlfluff lint dbt/models dbt/macros dbt/tests --processes 2

format: venv  ## apply ruff's and sqlfluff's formatting and fixes
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/sqlfluff fix dbt/models dbt/macros dbt/tests --processes 2

test: setup lint  ## lint, then the whole test suite against real servers
	$(VENV)/bin/pytest

bench: setup  ## benchmarks: ratios against baselines measured in the same run
	$(PY) -m bench

docs: venv  ## generate and serve the dbt docs site
	$(PY) -m ops.demo --docs-only

clean: stop  ## stop everything and delete the state folder .wtc/
	rm -rf .wtc dbt/target dbt/logs
