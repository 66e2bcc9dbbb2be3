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
.PHONY: help install test lint format demo shards synthetic bench bench-shards bench-data bench-model bench-scaling eval clean gpu-check gpu-wheels

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

# pytest-xdist: one worker per core, whole files per worker (module fixtures are built once), files handed out in
# collection order (tests/conftest.py puts the minute-long ones first; xdist's default reorder by test count sent
# test_compile's 3 tests last, one worker compiling alone for 4 minutes). Most tests wait on processes they start,
# so 2 workers on 2 cores took the suite from 883 s to 523-548 s. TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= $(shell nproc 2>/dev/null || echo 2)
test: install lint  ## set up, lint and run the whole test suite (slow tests included), one worker per core
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

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

# make gpu-check: the GPU side on one GPU (benchmarks/gpu_check.py, README "make gpu-check"). No `install`: a GPU
# machine runs it from a plain checkout with its own python3 (CUDA torch), plus .gpu-wheels/ (`make gpu-wheels`)
# unpacked once into .gpu-wheels/site when there is no .venv. OUT may be a file or a folder.
DEVICE ?= cuda
OUT ?= gpu-check.json
GPU_WHEELS := .gpu-wheels
gpu-check:  ## validate the GPU side on one GPU in <= 6 min: one table + OUT=gpu-check.json (DEVICE=cpu: tiny, on CPU)
	@site=; if [ ! -x $(PY) ] && ls $(GPU_WHEELS)/*.whl >/dev/null 2>&1; then \
	  if [ ! -f $(GPU_WHEELS)/site/.stamp ] || [ -n "$$(find $(GPU_WHEELS) -maxdepth 1 -name '*.whl' -newer $(GPU_WHEELS)/site/.stamp)" ]; then \
	    echo "gpu-check: installing $(GPU_WHEELS)/*.whl into $(GPU_WHEELS)/site (no network, no deps)"; rm -rf $(GPU_WHEELS)/site; \
	    python3 -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target $(GPU_WHEELS)/site $(GPU_WHEELS)/*.whl \
	      && touch $(GPU_WHEELS)/site/.stamp || exit 1; fi; \
	  site=:$(abspath $(GPU_WHEELS))/site; fi; \
	PYTHONPATH="$(CURDIR)$$site$${PYTHONPATH:+:$$PYTHONPATH}" $(if $(wildcard $(PY)),$(PY),python3) \
	  benchmarks/gpu_check.py --device "$(DEVICE)" --out "$(OUT)"

# The wheels a GPU machine without this venv lacks (Python 3.12, x86_64), at the venv's versions. omegaconf 2.4
# vendors its antlr4 runtime; deepspeed is an sdist, built here as a pure-Python wheel without its C++ ops (JIT-built
# if ever needed; the loop uses torch_adam). DALI (~200 MB) and wandb are left out: the check treats both as optional.
GPU_WHEEL_PKGS := omegaconf webdataset braceexpand cityscapesScripts pyquaternion appdirs coloredlogs humanfriendly \
	hjson py-cpuinfo pydantic pydantic_core annotated-types typing-inspection typing_extensions msgpack einops psutil
gpu-wheels: install  ## download into .gpu-wheels/ the wheels a GPU machine lacks (py3.12 x86_64; deepspeed built here)
	rm -rf $(GPU_WHEELS).tmp && mkdir -p $(GPU_WHEELS).tmp
	$(PY) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d $(GPU_WHEELS).tmp \
	  $$($(PY) -c 'import importlib.metadata as m, sys; print(*(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' $(GPU_WHEEL_PKGS))
	DS_BUILD_OPS=0 $(PY) -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
	  -w $(GPU_WHEELS).tmp deepspeed==$$($(PY) -c 'import importlib.metadata as m; print(m.version("deepspeed"))')
	@ls $(GPU_WHEELS).tmp/deepspeed-*-py3-none-any.whl >/dev/null || { echo "gpu-wheels: deepspeed wheel is not py3-none-any"; exit 1; }
	rm -rf $(GPU_WHEELS) && mv $(GPU_WHEELS).tmp $(GPU_WHEELS)
	@ls $(GPU_WHEELS); du -sh $(GPU_WHEELS)

clean:  ## remove runs, demo data and shards (keeps .venv)
	rm -rf runs data shards/demo
