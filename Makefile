# The two commands a new user needs:  make run  (start the service)  and  make test  (every check).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint typecheck unit openapi lock clean system-tools

run: $(VENV)/.runtime-installed
	$(BIN)/python -m service --host $(HOST) --port $(PORT)

test: $(VENV)/.dev-installed system-tools
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

# Debian tools the tests drive as real clients and peers: headless Chromium and its driver (the demo page),
# nginx (the scale-out check and `nginx -t`). Installed only when missing; needs root or sudo, as in CI.
SYSTEM_TOOLS := /usr/bin/chromium /usr/bin/chromedriver /usr/sbin/nginx
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-tools:
	@for tool in $(SYSTEM_TOOLS); do [ -x $$tool ] || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium chromium-driver nginx; \
	fi

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
