# The two commands a new user needs:  make run  (start the service)  and  make test  (every check).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint typecheck unit openapi lock clean system-tools device-wheels

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

# For bench/cuda.py and the CUDA tests on a lent GPU machine (see bench/README.md): wheels, for its Python 3.12, of
# the packages it lacks (it has torch, onnxruntime, numpy, Pillow, safetensors, prometheus-client, tqdm, pytest,
# hypothesis, SciPy, OpenCV and Matplotlib), at the versions of requirements-dev.txt, into .whl/ (ignored by git).
DEVICE_WHEELS := annotated-doc annotated-types anyio click fastapi h11 httpcore2 httptools httpx2 idna opentelemetry-api \
  orjson pydantic pydantic_core pydantic-settings python-dotenv python-multipart starlette typing-inspection \
  truststore typing_extensions uvicorn
device-wheels: | $(VENV)/bin/python
	rm -rf .whl
	$(BIN)/pip download --disable-pip-version-check -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl \
	  $$(for p in $(DEVICE_WHEELS); do grep -i "^$$p==" requirements-dev.txt || echo "$$p: no version" >&2; done)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
