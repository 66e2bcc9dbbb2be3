# frrn-dist: every command a user runs. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTHON ?= python3
CITYSCAPES ?=
SHARDS_OUT ?= shards/cityscapes
# The DeepSpeed CPU comm op is JIT-built once and cached here, so later starts take seconds, not minutes.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/frrn-dist/torch_extensions

.DEFAULT_GOAL := help
.PHONY: help install test lint format demo shards synthetic bench bench-shards bench-data bench-model bench-scaling eval clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  make %-14s %s\n", $$1, $$2}'

# torch first, pinned: it takes the CPU wheel on this machine's disk. An unpinned torch (pulled in by deepspeed)
# would fetch a several-GB CUDA build. Re-run only when pyproject.toml changes.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

install: $(STAMP)  ## create .venv and install the project with its pinned versions (idempotent)

lint: install  ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install  ## ruff format and fix in place
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: install lint  ## set up, lint and run the whole test suite (slow tests included)
	$(PY) -m pytest

demo: install  ## set up, make synthetic Cityscapes, pack it, train FRRN-A on 2 CPU ranks, evaluate
	PYTHON=$(PY) bash launch/demo.sh

synthetic: install  ## write a synthetic Cityscapes-layout dataset to data/synthetic (see --help for sizes)
	$(PY) -m frrn_dist.synthetic --out data/synthetic

shards: install  ## pack a Cityscapes folder: make shards CITYSCAPES=/path/to/cityscapes [SHARDS_OUT=shards/cityscapes]
	@test -n "$(CITYSCAPES)" || { echo "usage: make shards CITYSCAPES=/path/to/cityscapes (with leftImg8bit/ and gtFine/)"; exit 2; }
	$(PY) -m frrn_dist.shards --root "$(CITYSCAPES)" --out "$(SHARDS_OUT)"

eval: install  ## evaluate a run: make eval RUN=runs/<name> (official Cityscapes scores at full resolution)
	@test -n "$(RUN)" || { echo "usage: make eval RUN=runs/<name>"; exit 2; }
	$(PY) launch/evaluate.py --checkpoint "$(RUN)"

bench: bench-shards bench-data bench-model bench-scaling  ## run every benchmark and print the figures

bench-shards: install  ## packing speed with 1 and 2 workers on full-resolution synthetic frames
	$(PY) benchmarks/bench_shards.py

bench-data: install  ## decode+augment throughput: DALI CPU vs fallback loader vs PNG-folder baseline
	$(PY) benchmarks/bench_data.py

bench-model: install  ## FRRN-A speed and activation memory: fp32/bf16, checkpointing, channels_last; the planner
	$(PY) benchmarks/bench_model.py

bench-scaling: install  ## compute per image and bytes all-reduced per step; projected multi-GPU scaling
	$(PY) benchmarks/bench_scaling.py

clean:  ## remove runs, demo data and shards (keeps .venv)
	rm -rf runs data shards/demo
