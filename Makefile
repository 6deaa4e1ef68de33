# Two commands do all the set-up on a fresh machine:
#   make bench   builds everything and runs the benchmark suite against the reference layers (default sizes)
#   make test    builds everything and runs the tests
# Both create the virtual environment .venv (CPU build of torch, pinned in requirements-dev.txt) on first use.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
BENCH_ARGS ?=
TEST_ARGS ?=

.PHONY: env build test bench clean

env: $(VENV)/.installed

$(VENV)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

# No build isolation: the extension must compile against the torch in .venv. The build folder persists
# (build/), so a rebuild recompiles only what changed.
build: env
	$(BIN)/pip install -q --no-build-isolation --no-deps .

test: build
	$(BIN)/python -m pytest tests $(TEST_ARGS)

bench: build
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf build bench-results
