# Two commands for a fresh machine: `make demo` (the main job end to end on the embedded default)
# and `make test`. Both create the virtual environment first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-fast test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel first: pyproject's torch range admits it, so nothing pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m embedded.demo

# The CI variant of the demo: the same steps with a tiny network and schedule (about 2 minutes).
demo-fast: $(STAMP)
	$(BIN)/python -m embedded.demo --fast

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

# Minutes each on 2 CPUs; figures in bench_out/*.json, tables and machine in BENCHMARKS.md.
bench: $(STAMP)
	$(BIN)/python bench/inpaint.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/memory.py

clean:
	rm -rf $(VENV) demo_out bench_out
