# celery-sqs-heartbeat: `make` lists the targets. Every target creates the virtual
# environment and installs what it needs, so a fresh clone needs nothing else.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Reinstalled whenever pyproject.toml changes.
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
# Other Pythons (the matrix's, LocalStack's) are found on PATH, then in pyenv's versions.
PYENV_ROOT ?= $(or $(shell pyenv root 2>/dev/null),$(HOME)/.pyenv)
empty :=
space := $(empty) $(empty)
PYTHONS_PATH := $(subst $(space),:,$(wildcard $(PYENV_ROOT)/versions/3.*/bin))
WITH_PYTHONS := PATH="$$PATH:$(PYTHONS_PATH)"

# LocalStack's own SQS, in a virtual environment of its own. localstack-core 2026.3
# declares Python >= 3.10 but imports warnings.deprecated, which is new in 3.13. The
# other pins keep its dependencies installable (measured on 2026.3.0).
LOCALSTACK_PYTHON ?= python3.13
LOCALSTACK_VENV   ?= .venv-localstack
LOCALSTACK_STAMP  := $(LOCALSTACK_VENV)/.installed
LOCALSTACK_PACKAGES := "localstack-core[base-runtime]==2026.3.0" "cbor2<6" "pyopenssl<26" \
	"cryptography<47" service_identity

.PHONY: help venv test unit integration lint typecheck docs demo bench soak clean dist \
	test-localstack matrix

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(STAMP)  ## Create .venv and install the package with its test tools

test: lint typecheck docs  ## The whole suite: lint, mypy --strict, docs, unit and integration tests
	$(BIN)/python -m pytest

unit: $(STAMP)  ## Unit tests only (no worker processes)
	$(BIN)/python -m pytest -m "not integration"

integration: $(STAMP)  ## Real celery workers against moto's SQS server on loopback
	$(BIN)/python -m pytest -m integration

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check celery_sqs_heartbeat tests examples benchmarks noxfile.py

typecheck: $(STAMP)  ## mypy --strict on the package
	$(BIN)/mypy

# Not --quiet: it hides the warnings that --strict turns into a failure.
docs: $(STAMP)  ## Build the docs site into site/ (warnings are errors)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

demo: $(STAMP)  ## Two workers on an embedded SQS: a long task runs twice without the heartbeat, once with it; draws the timeline
	$(BIN)/python examples/demo.py

bench: $(STAMP)  ## Measure what the heartbeat costs (~30 min); writes docs/performance.md and its charts
	$(BIN)/python -m benchmarks.run

dist: $(STAMP)  ## Build the sdist and the wheel into dist/ and check them with twine
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/twine check --strict dist/*

$(LOCALSTACK_STAMP): Makefile
	$(WITH_PYTHONS) $(LOCALSTACK_PYTHON) -m venv $(LOCALSTACK_VENV)
	$(LOCALSTACK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCALSTACK_VENV)/bin/python -m pip install --quiet $(LOCALSTACK_PACKAGES)
	touch $@

test-localstack: $(STAMP) $(LOCALSTACK_STAMP)  ## The integration suite against LocalStack's SQS on loopback
	$(BIN)/python tests/support/run_on_localstack.py --localstack-python $(LOCALSTACK_VENV)/bin/python

matrix: $(STAMP)  ## Python 3.10-3.13 x Celery 5.4-5.7 with nox; prints a table (~30 min)
	mkdir -p matrix-results
	$(WITH_PYTHONS) $(BIN)/python -m nox --no-error-on-missing-interpreters --report matrix-results/report.json; \
	status=$$?; $(BIN)/python noxfile.py --table matrix-results/report.json; exit $$status

soak: $(STAMP)  ## 10,000 short + 50 long tasks, two workers: each runs once, nothing left, threads and memory flat (~5 min)
	$(BIN)/python -m benchmarks.soak

clean:  ## Remove the virtual environment and caches
	rm -rf $(VENV) $(LOCALSTACK_VENV) .nox dist matrix-results site .pytest_cache .mypy_cache \
		.ruff_cache *.egg-info localstack.log
