# `make demo` and `make test` set everything up by themselves on a fresh machine.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# pip's find-links on this kind of machine print a warning per package; keep the log readable.
PIP := $(PY) -m pip install -q --disable-pip-version-check --progress-bar off
QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: demo test install install-seg clean bench bench-seg

install: $(VENV)/.installed

# torch is pinned to the CPU wheel here (an unpinned torch pulls a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip $(QUIET)
	$(PIP) torch==2.13.0 $(QUIET)
	$(PIP) -e ".[dev]" $(QUIET)
	touch $@

# The evaluation extra (jobs/evaluate.py and its tests): mmsegmentation 1.2.2 needs full mmcv 2.1.0,
# built here from source with its CPU ops (~9 min on 2 cores, once per venv: the stamp file below;
# pip caches the built wheel, so another venv on this machine installs it in seconds). mmcv's setup.py
# needs setuptools<70; torch wants >=77 back afterwards. The core `install` stays separate and fast.
install-seg: $(VENV)/.installed-seg

$(VENV)/.installed-seg: $(VENV)/.installed
	$(PIP) "setuptools<70" wheel ninja $(QUIET)
	MMCV_WITH_OPS=1 FORCE_CUDA=0 $(PIP) --no-build-isolation mmcv==2.1.0 $(QUIET)
	$(PIP) "setuptools>=77" $(QUIET)
	$(PIP) -e ".[seg,dev]" $(QUIET)
	$(PY) -c "import mmcv.ops, mmseg, mmengine"
	touch $@

# The demo's evaluate stage trains mmsegmentation segmenters, so it needs the seg extra too.
demo: install-seg
	VENV=$(VENV) bash jobs/demo.sh

# The tests exercise the real mmsegmentation (tests/test_evaluate.py), so they install the seg extra.
test: install-seg
	$(PY) -m pytest -q --durations=25 tests

bench: install
	$(PY) benchmarks/p1_scoring_cost.py
	$(PY) benchmarks/p2_calora_step.py
	$(PY) benchmarks/ray_train_overhead.py

# Segmenter training throughput: plain mmseg Runner vs the same run in a Ray task (needs the seg extra).
bench-seg: install-seg
	$(PY) benchmarks/segmenter_throughput.py

clean:
	rm -rf outputs .pytest_cache
