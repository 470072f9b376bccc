# The two set-up commands: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
AZURITE := .tools/azurite/node_modules/.bin/azurite-blob

# A module is byte-compiled when it is first imported, not all of them at install (most are never imported):
# where PYTHONDONTWRITEBYTECODE is set, every Python process of the suite would compile TensorFlow's modules
# again, and the suite would take twice as long.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test test-fast lint typecheck docs checks venv bench clean airflow chromium

venv: $(STAMP) $(AZURITE) chromium

# Debian's chromium, which the tests of the models page drive headless (installed once, as root).
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
		echo "chromium is missing (apt-get install chromium): the browser tests will fail" >&2
test test-fast: chromium

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile -e ".[airflow,test,s3,azure,docs]"
	touch $(STAMP)

# Azurite, the Azure Blob emulator of the Azure tests, from npm into .tools/ (once; see the script).
$(AZURITE):
	deploy/install_azurite.sh
test test-fast: $(AZURITE)

demo: $(STAMP)
	$(VENV)/bin/tf-export demo --workdir build/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# mypy over the package as it is imported (tf_export_pipeline, laid out in build/typecheck; see [tool.mypy] in
# pyproject.toml: the stages and their records are typed throughout).
typecheck: $(STAMP)
	@mkdir -p build/typecheck && ln -sfn ../../pipeline build/typecheck/tf_export_pipeline
	MYPYPATH=build/typecheck $(VENV)/bin/mypy -p tf_export_pipeline

# The documentation site into build/site (mkdocs.yml). Strict: a broken link or anchor, a page left out of the
# navigation or a module mkdocstrings cannot read fails it.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# Lint, types and the site side by side: each keeps about one core busy for a few seconds.
checks: $(STAMP)
	@$(MAKE) --no-print-directory -j3 lint typecheck docs

# The suite runs in two parts: most tests on TEST_WORKERS pytest-xdist workers (0: in this process),
# grouped so that a module's tests, and all of tests/airflow/, stay on one worker; then the tests
# marked `alone` (random kills, fault timing), handed out a test at a time and nothing else beside them.
# `tf-export` commands in the tests fork from a process per worker that imported TensorFlow once (tests/support/cli_forkserver.py). On 2 cores the
# suite stays CPU-bound (each run's fresh validation process, the Celery and Airflow servers).
# The slowest tests of each part are listed; build/durations.txt has the seconds per file.
TEST_WORKERS ?= 2
PYTEST_ARGS ?=

test: $(STAMP) checks
	@mkdir -p build
	@rc=0; \
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope -m "not long and not alone" --durations=25 \
		--junitxml=build/tests-parallel.xml $(PYTEST_ARGS) || rc=$$?; \
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope -m "alone and not long" --group-by-test --durations=10 \
		--junitxml=build/tests-alone.xml $(PYTEST_ARGS) || { r=$$?; [ $$r -eq 5 ] || rc=$$r; }; \
	$(PY) -m tests.summary build/tests-parallel.xml build/tests-alone.xml || rc=$$?; \
	exit $$rc

# The quick subset for the inner loop: neither the slow scenarios nor the `alone` ones.
test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope -m "not long and not alone and not slow" $(PYTEST_ARGS)

airflow: $(STAMP)
	VENV=$(VENV) deploy/airflow_local.sh

bench: $(STAMP)
	$(PY) bench/backfill.py

clean:
	rm -rf build .pytest_cache
