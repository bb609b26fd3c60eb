# bigmodel: `make demo` and `make test` each set up .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The data directory: ../shared/data beside a checkout, else $BIGMODEL_DATA_DIR, else TFDS.
DATA_DIR ?= $(or $(BIGMODEL_DATA_DIR),$(shell [ -d ../shared/data ] && cd ../shared/data && pwd))
export BIGMODEL_DATA_DIR := $(DATA_DIR)
export TF_CPP_MIN_LOG_LEVEL := 2
export TF_ENABLE_ONEDNN_OPTS := 0
EXTRAS ?= test
PYTEST_ARGS ?= -n 2 --durations=15

.PHONY: install demo test test-fast bench clean

install: $(VENV)/.installed-$(EXTRAS)

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

demo: install
	rm -rf out/demo
	$(VENV)/bin/bigmodel train --gin_file=experiments/gpt_shakespeare_char.gin --workdir=out/demo

test: install
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m pytest -q $(PYTEST_ARGS) tests

# The suite without its end-to-end tests (marked `slow`), for quick local runs; CI runs `make test`.
test-fast: install
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m pytest -q $(PYTEST_ARGS) -m "not slow" tests

bench: install
	$(VENV)/bin/bigmodel bench
	$(VENV)/bin/bigmodel bench --loop

clean:
	rm -rf out $(VENV)
