# The README's two commands: `make demo` and `make test`. Both set themselves up.
VENV    ?= .venv
PYTHON  ?= python3
# torch pinned in its own pip call, before lowbit (whose unpinned `torch` requirement would
# otherwise pull whatever build the index serves). The pin alone is a CPU build only where
# pip's configured index serves one (the project's machines: `pip config list`); on plain
# PyPI for Linux the same pin is the multi-GB CUDA build — for a CPU build there:
#   make TORCH_INDEX=https://download.pytorch.org/whl/cpu test
# On a GPU machine: make TORCH_SPEC='torch' ...
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lowbit-installed

.PHONY: demo test data install lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Offline datasets from Debian (Fashion-MNIST, Python docs as a text corpus).
# Needs root and apt; tests that need them skip with a reason when they are absent.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ] && [ -d /usr/share/doc/python3.11/html/_sources ]; then \
		echo "datasets present"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist python3.11-doc >/dev/null; \
	else echo "cannot install datasets (need root + apt): apt-get install dataset-fashion-mnist python3.11-doc"; fi

demo: $(STAMP)
	$(VENV)/bin/lowbit demo

# pytest-xdist workers: one more than the cores (at most 8), tests handed out as workers
# free up (worksteal). The tests are single-threaded (conftest sets one torch thread), but
# a worker also waits — on the C++ compiler, on torchrun's ranks starting: with one worker
# per core, 2 cores were 1.6 busy (12 min 55 s); with three, 2.0 (10 min 16 s)
# (docs/benchmarks.md, "The test suite's time")
WORKERS ?= $(shell python3 -c "import os; n = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1; print(min(n + 1, 8))")
test: $(STAMP)
	$(PY) -m pytest -q -n $(WORKERS) --dist worksteal

bench: $(STAMP)
	$(PY) -m pip install -q --no-deps torchao || echo "torchao unavailable: its row will be skipped"
	$(PY) benchmarks/bench_step.py

lint: $(STAMP)
	$(PY) -m pip install -q ruff && $(VENV)/bin/ruff check lowbit tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
