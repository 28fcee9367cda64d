# `make demo` and `make test` set everything up by themselves on a fresh machine.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# pip's find-links on this kind of machine print a warning per package; keep the log readable.
PIP := $(PY) -m pip install -q --disable-pip-version-check --progress-bar off
QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: demo test install install-seg clean bench

install: $(VENV)/.installed

# torch is pinned to the CPU wheel here (an unpinned torch pulls a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip $(QUIET)
	$(PIP) torch==2.13.0 $(QUIET)
	$(PIP) -e ".[dev]" $(QUIET)
	touch $@

# Optional evaluation extra: full mmcv 2.1.0 built from source (~9 min on 2 cores, cached by pip).
install-seg: install
	$(PIP) "setuptools<70" wheel ninja $(QUIET)
	MMCV_WITH_OPS=1 FORCE_CUDA=0 $(PIP) --no-build-isolation mmcv==2.1.0 $(QUIET)
	$(PIP) -e ".[seg]" $(QUIET)

demo: install
	VENV=$(VENV) bash jobs/demo.sh

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) benchmarks/p1_scoring_cost.py
	$(PY) benchmarks/p2_calora_step.py
	$(PY) benchmarks/ray_train_overhead.py

clean:
	rm -rf outputs .pytest_cache
