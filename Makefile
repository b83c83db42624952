# spectral-merge: every job of the project is a target here.
#   make setup     build .venv with the pinned environment (idempotent; a second run is quick)
#   make figures   main job: redraw every figure and README table from results/*.json (runs a notebook only where its results are missing)
#   make test      ruff lint, unit/property/contract tests + every notebook (and the book's lab) in SMOKE mode under nbval
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PY      := $(BIN)/python
STAMP   := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
BUILD   := build/notebooks
PYTEST_ARGS ?=

# where notebooks 01-06 run their merge grids (lib.executors): inline, processes:N, dask:local,
# dask:tcp://host:8786, slurm:...; records go to the record store as they are computed, so a killed
# `make reproduce` resumes where it stopped. e.g. make reproduce EXECUTOR=processes:2
EXECUTOR ?= inline
export EXECUTOR
export PYTHONHASHSEED := 0
export TOKENIZERS_PARALLELISM := false
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: help setup test lint unit nbval figures report smoke reproduce experts lab lab-03 bench clean strip book book-check
.PHONY: gpu-check records-import

help:
	@grep -E '^#   make' Makefile | sed 's/^#   //'
	@echo "  make smoke | reproduce | experts | report | lab | book | book-check | bench | clean   (see README.md)"

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

test: lint unit nbval

# ruff.toml says which rules and why; `ruff check --fix .` repairs the import order
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

unit: setup
	$(BIN)/pytest -q $(PYTEST_ARGS) tests

# nbval executes each notebook top to bottom in SMOKE mode (tiny slices, about a minute each);
# --nbval-lax checks that every cell runs, not that outputs match a stored copy.
nbval: setup
	SMOKE=1 $(BIN)/pytest -q -p no:cacheprovider --nbval-lax $(NOTEBOOKS) book/lab.ipynb

figures: setup
	$(PY) -m lib figures --run-missing
	$(PY) -m lib report

# README.md's results and runtimes tables, rewritten from results/*.json
report: setup
	$(PY) -m lib report

smoke: setup
	@mkdir -p $(BUILD)
	@for nb in $(NOTEBOOKS); do \
	  echo "== $$nb (SMOKE)"; \
	  SMOKE=1 $(BIN)/papermill --log-level WARNING -k python3 $$nb $(BUILD)/$$(basename $$nb) || exit 1; \
	done

experts: setup
	$(PY) -m lib experts$(if $(filter 1,$(LORA)), --lora)

# notebook 07 needs the LoRA experts too (the opt-in plan of make experts LORA=1)
reproduce: setup experts
	$(PY) -m lib experts --lora
	@mkdir -p $(BUILD)
	@for nb in $(NOTEBOOKS); do \
	  echo "== $$nb (full, EXECUTOR=$(EXECUTOR))"; \
	  SMOKE=0 $(BIN)/papermill --log-level WARNING -k python3 $$nb $(BUILD)/$$(basename $$nb) || exit 1; \
	done
	$(PY) -m lib figures
	$(PY) -m lib report

# JupyterLab on the course book's first chapter (ipywidgets is installed: tqdm.auto bars are widgets);
# LAB_ARGS=--no-browser etc. (as root, e.g. in a container, JupyterLab needs --allow-root: added)
LAB_FIRST ?= notebooks/00_marchenko_pastur.ipynb
lab: setup
	$(BIN)/jupyter lab --notebook-dir=. --LabApp.default_url=/lab/tree/$(LAB_FIRST) \
	  $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

# notebook 03 itself under the lab preset (issue 19): its outputs go to build/lab/, never results/
lab-03: setup
	mkdir -p build/lab
	PRESET=lab SPECTRAL_MERGE_RESULTS=build/lab/results SPECTRAL_MERGE_FIGURES=build/lab/figures \
	  $(BIN)/papermill -k python3 notebooks/03_text_sst2_cola.ipynb build/lab/03_text_sst2_cola.ipynb

# the course book (issue 19): notebooks 00-06 executed from results/*.json (FROM_RESULTS=1), the
# exercises' solutions computed from them, README's tables from lib.report -> static HTML in build/book/
book: setup
	$(PY) book/build.py $(BOOK_ARGS)

# every page of build/book/ in headless Chromium (Debian: apt-get install chromium): images load, no
# broken internal link or anchor, no console error; one screenshot per chapter in build/book-screenshots/
book-check: setup
	$(PY) book/check.py

bench: setup
	$(PY) benchmarks/spectral.py
	$(PY) benchmarks/merge.py
	$(PY) benchmarks/stream_merge.py --quick
	$(PY) benchmarks/lowrank.py
	$(PY) benchmarks/evaluate.py
	$(PY) benchmarks/from_results.py
	$(PY) benchmarks/spectral.py --weightwatcher
	$(PY) benchmarks/costs.py && $(PY) benchmarks/report.py

# issue 20: the GPU paths on a GPU machine, with that machine's own interpreter (no .venv):
# pytest -m gpu, the bench on the GPU, benchmarks/results/gpu_check.json; without CUDA the GPU
# parts are reported as skipped. GPU_PYTHON=.venv/bin/python to try it here.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# the committed record shards (results/records/*.jsonl) into the record store: a fresh session continuing a
# grid seed by seed (`python -m lib records compute 05_drm --seeds 1`; the notebooks import them themselves)
records-import: setup
	$(PY) -m lib records import

strip: setup
	$(BIN)/nbstripout $(NOTEBOOKS)

clean:
	rm -rf build results/smoke figures/smoke .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
