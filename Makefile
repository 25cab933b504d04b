# Quick start: `make demo` (install if needed, run the embedded end-to-end demo) and `make test`.
# The install uses the pinned constraints.txt; CPU torch is installed first so pip never pulls a CUDA build
# on a laptop (GPU clusters: set TORCH_SPEC / TORCH_PIP_ARGS, e.g. TORCH_PIP_ARGS="--index-url <cuda index>").
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cpldm-installed
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
DEMO_LAKE ?= ./demo-lake
DEMO_PRESET ?= demo
PYTEST_ARGS ?=

export AWS_ACCESS_KEY_ID ?= testing
export AWS_SECRET_ACCESS_KEY ?= testing
export AWS_DEFAULT_REGION ?= us-east-1
export AWS_EC2_METADATA_DISABLED := true
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S ?= 0.2
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test bench bench-quick clean-demo

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cpldm --lake $(DEMO_LAKE) demo --preset $(DEMO_PRESET)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks

bench-quick: $(STAMP)
	$(PY) -m benchmarks --quick

clean-demo:
	rm -rf $(DEMO_LAKE)
