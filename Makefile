# The README's two commands: `make demo` and `make test`. Both set themselves up.
VENV    ?= .venv
PYTHON  ?= python3
# A CPU build of torch (a bare `torch` requirement would pull a multi-GB CUDA build).
# On a GPU machine: make TORCH_SPEC='torch' ...
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lowbit-installed

.PHONY: demo test data install lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
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

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m pip install -q --no-deps torchao || echo "torchao unavailable: its row will be skipped"
	$(PY) benchmarks/bench_step.py

lint: $(STAMP)
	$(PY) -m pip install -q ruff && $(VENV)/bin/ruff check lowbit tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
