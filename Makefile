# Two commands set everything up on a fresh machine:
#   make demo   -> venv + install + the whole pipeline on the embedded synthetic default
#   make test   -> venv + install (with test extras) + pytest
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATASET ?= demo
# the dataset folder for make extract (default: the preset's data/<dataset> under this directory)
DATA_DIR ?=
ARGS ?=

.PHONY: help install demo test test-all test-realdata extract train bench bench-gpu clean

help:
	@echo "make demo                 run the whole pipeline on synthetic data (offline encoders)"
	@echo "make test                 run the test suite (fast; slow/real-data checks excluded)"
	@echo "make test-realdata        also run the checks on ../shared/data/mvsa-single"
	@echo "make extract DATASET=hfm DATA_DIR=path/to/HFM   stage one for a preset in configs/ (ARGS='--device cuda ...')"
	@echo "make train DATASET=hfm    stage two from cache/\$$DATASET.h5 (ARGS='--set lr=5e-5 ...')"
	@echo "make bench                benchmarks -> bench/results.json, bench/results.md"
	@echo "make bench-gpu            the GPU acceptance run on this node's own python3 (no venv, installs nothing) -> bench/results-gpu.md"

# constraints.txt pins torch/torchvision for this project's machines; the package itself accepts a range
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[offline,test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/sppscl demo $(ARGS)

# the report's browser test needs Debian's chromium: installed here when running as root (CI is), quietly; where it
# cannot be installed the test skips and says why
test: install
	@if [ "$$(id -u)" = 0 ] && ! command -v chromium >/dev/null 2>&1; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
	  || echo "note: could not install chromium; the report's browser test will skip"; fi
	$(PY) -m pytest -q $(ARGS)

test-realdata: install
	$(PY) -m pytest -q -m "realdata and not slow" $(ARGS)

test-all: install
	$(PY) -m pytest -q -m "" $(ARGS)

extract: install
	$(VENV)/bin/sppscl extract --config $(DATASET) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) --out cache/$(DATASET).h5 $(ARGS)

train: install
	$(VENV)/bin/sppscl train --cache cache/$(DATASET).h5 $(ARGS)

bench: install
	$(PY) -m bench.run $(ARGS)

# no install step: on a GPU node the run uses the node's own torch (docs/gpu.md)
bench-gpu:
	$(PYTHON) -m bench.run --gpu $(ARGS)

clean:
	rm -rf runs/demo cache/demo.h5 cache/demo-data
