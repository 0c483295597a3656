# The two commands a new user needs:  make run  (start the service)  and  make test  (every check).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint typecheck unit openapi lock clean

run: $(VENV)/.runtime-installed
	$(BIN)/python -m service --host $(HOST) --port $(PORT)

test: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

openapi: $(VENV)/.runtime-installed
	$(BIN)/python -m scripts.export_openapi

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime-installed: requirements.txt | $(VENV)/bin/python
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

$(VENV)/.dev-installed: requirements-dev.txt requirements.txt | $(VENV)/bin/python
	$(BIN)/pip install --disable-pip-version-check -q -r requirements-dev.txt
	touch $(VENV)/.runtime-installed $@

lock:
	rm -rf /tmp/featuremap-lock && $(PYTHON) -m venv /tmp/featuremap-lock
	/tmp/featuremap-lock/bin/pip install -q -r requirements.in
	{ echo "# Generated from requirements.in by pip freeze in a clean venv; regenerate with: make lock"; \
	  /tmp/featuremap-lock/bin/pip freeze | sed 's/^torch==\(.*\)+cpu/torch==\1/'; } > requirements.txt
	/tmp/featuremap-lock/bin/pip install -q -r requirements-dev.in
	{ echo "# Generated from requirements-dev.in by pip freeze in a clean venv; regenerate with: make lock"; \
	  /tmp/featuremap-lock/bin/pip freeze | sed 's/^torch==\(.*\)+cpu/torch==\1/'; } > requirements-dev.txt

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
