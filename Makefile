# One entry point for people and CI. `make help` lists the targets.
PY ?= python3
PIP = $(PY) -m pip install --disable-pip-version-check -q

.DEFAULT_GOAL := help
.PHONY: help install test test-rust test-python lint bench bench-rust demo wheel fuzz

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install: ## install dependencies (torch only if missing) and build the package in place (with the crash tests' fault injection; `make wheel` builds without it)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) "torch>=2.4"
	$(PIP) "maturin>=1.7,<2" "safetensors>=0.4" "numpy>=1.26" "tqdm>=4.66" typing_extensions \
		"prometheus_client>=0.20" "matplotlib>=3.8" \
		"pytest>=8" "pytest-timeout>=2.3" "pytest-benchmark>=4" "ruff>=0.6" "mypy>=1.11" \
		"transformers>=5" "mfusepy>=3.1"
	MATURIN_PEP517_ARGS="--features faults" $(PIP) --no-build-isolation --no-deps -e .

test: install lint test-rust test-python ## everything: lints, Rust tests, Python tests

test-rust: ## Rust unit and property tests of the core
	cargo test -p apollo_sync_core

test-python: ## the Python test suite
	$(PY) -m pytest

lint: ## cargo fmt, clippy -D warnings, ruff, mypy, stubtest of the compiled module
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	$(PY) -m ruff check python tests benches
	$(PY) -m ruff format --check python tests benches
	$(PY) -m mypy
	$(PY) -m mypy.stubtest apollo_sync._core

demo: install ## the main job on a generated model: a producer trains, syncs, checks, rollback
	$(PY) -m apollo_sync demo

FUZZ_SECONDS ?= 180
fuzz: ## fuzz the log reader and the delta codec, FUZZ_SECONDS each (nightly + cargo-fuzz; not in test)
	cd rust/core && cargo +nightly run -q --manifest-path fuzz/Cargo.toml --example seeds -- fuzz/corpus
	cd rust/core && cargo +nightly fuzz run log_reader fuzz/corpus/log_reader -- -max_total_time=$(FUZZ_SECONDS)
	cd rust/core && cargo +nightly fuzz run delta_codec fuzz/corpus/delta_codec -- -max_total_time=$(FUZZ_SECONDS)

bench-rust: ## Criterion bench of the diff kernel (GB/s against memcmp)
	cargo bench -p apollo_sync_core --bench diff

bench: install ## end-to-end bench against the seed script and the machine's limits
	$(PY) benches/e2e.py --size-gb 1

wheel: ## the abi3 wheel, in dist/
	maturin build --release -o dist
