# sparseinfer developer commands. `make help` lists them.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
export VIRTUAL_ENV := $(abspath $(VENV))

.PHONY: help setup develop test lint demo bench wheel clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/'

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "maturin>=1.7,<2" "ruff>=0.5" numpy pytest hypothesis pytest-benchmark matplotlib tqdm
	touch $@

setup: $(VENV)/.installed  ## create the virtualenv with build, test and bench tools

develop: setup  ## build the extension (release) into the virtualenv
	$(VENV)/bin/maturin develop --release --quiet

lint: setup  ## rustfmt, clippy -D warnings, ruff
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --quiet -- -D warnings
	$(VENV)/bin/ruff check python tests bench
	$(VENV)/bin/ruff format --check python tests bench

test: develop lint  ## everything CI checks: lint, cargo test, pytest
	cargo test -p sparseinfer-core --quiet
	$(PY) -m pytest -q

demo: develop  ## the main job: every kernel format against numpy on a Llama-1B layer
	$(PY) -m sparseinfer demo

bench: develop  ## the kernel benchmark (minutes): JSON, table and plot into docs/
	$(PY) -m pytest bench/test_kernels_bench.py --benchmark-enable --benchmark-only -q \
		--benchmark-json=bench/results/kernels.json
	$(PY) bench/report.py bench/results/kernels.json docs/benchmarks

wheel: setup  ## the release wheel (abi3) into dist/
	$(VENV)/bin/maturin build --release --out dist --quiet

clean:
	rm -rf target dist $(VENV)
