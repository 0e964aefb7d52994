.DEFAULT_GOAL := all
PYTHON ?= python

.PHONY: install
install:  ## install the package with its test and benchmark extras (editable)
	$(PYTHON) -m pip install -e ".[dev]"

.PHONY: build-dev
build-dev:  ## rebuild the native module in place after a Rust change
	$(PYTHON) -m pip install -e . --no-deps

.PHONY: test
test:  ## Rust and Python tests
	cargo test
	$(PYTHON) -m pytest

.PHONY: lint
lint:  ## ruff, rustfmt and clippy, as CI would want them
	ruff check python tests benches
	ruff format --check python tests benches
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features python -- -D warnings

.PHONY: format
format:
	ruff check --fix python tests benches
	ruff format python tests benches
	cargo fmt --all

.PHONY: bench
bench:  ## the benchmark harness (not part of the tests)
	$(PYTHON) benches/run.py

.PHONY: all
all: lint test
