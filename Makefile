# ddm4d / DDMExtension: two user-facing targets.
#
#   make demo   isolated environment in .venv, then the demo on the bundled default model:
#               a synthetic (phantom) subject, frames ED -> ES, metrics against the true frames.
#               Output folder: demo-output/ (make demo OUT=somewhere/else)
#   make test   the same environment plus the test extra, then the whole pytest suite.
#
# The environment is made once and kept; `make clean-venv` removes it. PyTorch: installed as
# torch==$(TORCH_VERSION) only where the environment has no torch yet (pyproject.toml itself asks
# for torch>=2.2, so any torch you install into .venv beforehand, e.g. a CUDA build, is kept).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

PYTHON ?= python3
VENV ?= .venv
OUT ?= demo-output
TORCH_VERSION ?= 2.13.0
# extra pip options for that torch install (e.g. an --index-url of CPU-only builds)
TORCH_PIP_ARGS ?=
# extra options for scripts/demo.py, e.g. make demo DEMO_ARGS="--device cpu"
DEMO_ARGS ?=
# extra options for pytest, e.g. make test PYTEST_ARGS="-k generate -x"
PYTEST_ARGS ?=

# OpenMP threads that sleep instead of spinning while they wait: on a small machine that is busy
# with anything else (another process, a test's subprocess), spinning threads of PyTorch's CPU
# kernels were measured to make a training step 50x slower; sleeping ones cost next to nothing
export OMP_WAIT_POLICY ?= PASSIVE
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_NO_INPUT := 1
export PYTHONDONTWRITEBYTECODE := 1

VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
# stamps: the package (and its test extra) are re-installed when pyproject.toml changes
STAMP_BASE := $(VENV)/.ddm4d-base
STAMP_PKG := $(VENV)/.ddm4d-installed
STAMP_TEST := $(VENV)/.ddm4d-test-installed

.PHONY: help demo test venv install install-test clean-venv

# stamps of a venv whose python no longer runs (moved folder, removed interpreter) are dropped,
# so the environment is set up again instead of failing later with a puzzling error
ifneq ($(wildcard $(STAMP_BASE)),)
ifneq ($(shell "$(VPY)" -c "print('ok')" 2>/dev/null),ok)
$(info $(VENV) is broken (its python does not run): setting it up again)
$(shell rm -f "$(STAMP_BASE)" "$(STAMP_PKG)" "$(STAMP_TEST)")
endif
endif

help:
	@echo "make demo   set up $(VENV) and run scripts/demo.py (output in $(OUT)/; OUT=... to change)"
	@echo "make test   set up $(VENV) with the test extra and run the pytest suite"
	@echo "make clean-venv   remove $(VENV)"

# -------------------------------------------------------------------------- the environment

$(STAMP_BASE):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' || \
	  { echo "error: $(PYTHON) is Python $$($(PYTHON) -c 'import platform; print(platform.python_version())'); ddm4d needs Python >= 3.10 (make PYTHON=python3.11 ...)" >&2; exit 1; }
	@if [ -e "$(VENV)" ] && ! "$(VPY)" -c 'import sys' >/dev/null 2>&1; then \
	  echo "$(VENV) is broken (its python does not run): making it anew"; rm -rf "$(VENV)"; fi
	@if [ ! -x "$(VPY)" ]; then echo "creating $(VENV) with $$($(PYTHON) -c 'import sys; print(sys.executable, sys.version.split()[0])')"; \
	  $(PYTHON) -m venv "$(VENV)"; fi
	$(PIP) install --quiet --upgrade pip || echo "warning: could not upgrade pip in $(VENV); going on with $$($(PIP) --version)" >&2
	@if "$(VPY)" -c 'import torch' >/dev/null 2>&1; then \
	  echo "torch $$("$(VPY)" -c 'import torch; print(torch.__version__)') is already in $(VENV): kept"; \
	else \
	  echo "installing torch==$(TORCH_VERSION) into $(VENV) (takes a few minutes the first time)"; \
	  $(PIP) install --quiet "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS); \
	fi
	"$(VPY)" -W ignore -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")'
	@touch "$@"

venv: $(STAMP_BASE)

$(STAMP_PKG): $(STAMP_BASE) pyproject.toml
	@echo "installing ddm4d (editable) into $(VENV)"
	$(PIP) install --quiet -e .
	@touch "$@"

$(STAMP_TEST): $(STAMP_PKG) pyproject.toml
	@echo "installing ddm4d[test] into $(VENV)"
	$(PIP) install --quiet -e '.[test]'
	@touch "$@"

install: $(STAMP_PKG)

install-test: $(STAMP_TEST)

clean-venv:
	rm -rf "$(VENV)"

# -------------------------------------------------------------------------- the two targets

demo: $(STAMP_PKG)
	"$(VPY)" scripts/demo.py --out "$(OUT)" $(DEMO_ARGS)

test: $(STAMP_TEST)
	"$(VPY)" -m pytest -q $(PYTEST_ARGS)
