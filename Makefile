# Two commands for a fresh machine: `make demo` (the main job end to end on the embedded default)
# and `make test`. Both create the virtual environment first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-fast test lint bench clean prometheus eval-grid

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel first: pyproject's torch range admits it, so nothing pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,export]'
	touch $(STAMP)

# img2dataset itself writes the inputs of tests/test_img2dataset.py. In a virtualenv of its own: it
# pins albumentations, wandb and others this project does not need, and runs as its command.
IMG2DATASET_VENV := .venv-img2dataset
$(IMG2DATASET_VENV)/.installed:
	$(PYTHON) -m venv $(IMG2DATASET_VENV)
	$(IMG2DATASET_VENV)/bin/pip install -q img2dataset==1.47.0
	touch $@

demo: $(STAMP)
	$(BIN)/python -m embedded.demo

# The CI variant of the demo: the same steps with a tiny network and schedule (about 2 minutes).
demo-fast: $(STAMP)
	$(BIN)/python -m embedded.demo --fast

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# tests/test_metrics.py scrapes a real Prometheus (Debian's package): installed here when missing
# (as root, with apt-get); without it `make test` stops with what to install.
prometheus:
	@command -v prometheus >/dev/null 2>&1 || [ -x /usr/bin/prometheus ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; \
	  else \
	    echo "make: prometheus is missing; install it (sudo apt-get install -y prometheus) or run make as root" >&2; exit 1; \
	  fi; }

test: $(STAMP) lint prometheus $(IMG2DATASET_VENV)/.installed
	GLCIC_REQUIRE_PROMETHEUS=1 GLCIC_REQUIRE_IMG2DATASET=1 $(BIN)/python -m pytest -q

# Minutes each on 2 CPUs; figures in bench_out/*.json, tables and machine in BENCHMARKS.md.
bench: $(STAMP)
	$(BIN)/python bench/inpaint.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/memory.py

# README's picture: the evaluate grid of the shipped weights on the validation split (about a minute).
PHOTOS ?= ../shared/photos
eval-grid: $(STAMP)
	$(BIN)/python bench/eval_grid.py --photos $(PHOTOS)

clean:
	rm -rf $(VENV) $(IMG2DATASET_VENV) demo_out bench_out
