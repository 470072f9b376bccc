# The two set-up commands: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint venv bench clean airflow

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[airflow,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tf-export demo --workdir build/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) lint
	$(PY) -m pytest -q

airflow: $(STAMP)
	VENV=$(VENV) deploy/airflow_local.sh

bench: $(STAMP)
	$(PY) bench/backfill.py

clean:
	rm -rf build .pytest_cache
