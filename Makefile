.DEFAULT_GOAL := all
PYTHON ?= python
DIST ?= dist

.PHONY: install
install:  ## install the package with its test and benchmark extras (editable)
	$(PYTHON) -m pip install -e ".[dev]"

.PHONY: build-dev
build-dev:  ## rebuild the native module in place after a Rust change (fast profile)
	$(PYTHON) -m maturin develop --profile fastdev

# The release wheel: abi3 (CPython >= 3.11), manylinux2014, linked through zig
# (the ziglang package) so that it runs on glibc 2.17 and newer.
.PHONY: wheel
wheel:  ## build the release wheel and the sdist into dist/
	PATH="$$($(PYTHON) -c 'import os, ziglang; print(os.path.dirname(ziglang.__file__))'):$$PATH" \
		$(PYTHON) -m maturin build --release --zig --compatibility manylinux2014 --auditwheel check -o $(DIST)
	$(PYTHON) -m maturin sdist -o $(DIST)

.PHONY: clean
clean:  ## remove build products and caches
	cargo clean
	rm -rf $(DIST) .pytest_cache .ruff_cache .mypy_cache .hypothesis
	find python tests benches -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -f python/h5ckpt/_native*.so

.PHONY: test
test:  ## Rust and Python tests
	cargo test
	$(PYTHON) -m pytest

.PHONY: lint
lint:  ## ruff, mypy, stubtest, rustfmt and clippy, as CI would want them
	ruff check python tests benches
	ruff format --check python tests benches
	$(PYTHON) -m mypy python/h5ckpt
	$(PYTHON) -m mypy.stubtest h5ckpt._native
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
