# cxr-drift: every target creates and fills .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.installed
# Tests run on 2 workers by default; override with `make test PYTEST_ARGS="-k metrics"`.
PYTEST_ARGS ?=

.PHONY: install run demo test test-fast lint typecheck openapi bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.14.1 torchvision==0.29.1
	$(PIP) install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job: synthetic data -> demo model pairs for all three architectures -> the service on 127.0.0.1:8000.
run demo: $(STAMP)
	$(VENV)/bin/cxr-drift demo

test: $(STAMP)
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

openapi: $(STAMP)
	$(VENV)/bin/cxr-drift openapi --out openapi/openapi.json

bench: $(STAMP)
	$(PY) bench/drift_engine.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
