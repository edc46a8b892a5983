# fflnode: the two quick-start commands are `make testnet` and `make test`.
# Both create .venv when missing and install everything from nothing. torch is
# installed first and pinned: any other torch spec makes pip fetch CUDA wheels.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fflnode-installed
TORCH_SPEC := torch==2.13.0
TESTNET_OUT ?= testnet-out
NATIVE_SRC := $(wildcard native/*.c native/*.h)

# The native io_uring build is required here: the Makefile is how CI and the
# quick start build, and a silent fallback would hide a broken extension.
export FFLNODE_REQUIRE_NATIVE ?= 1

.PHONY: deps native-deps test testnet lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel

native-deps:
	@tools/ensure_liburing.sh

$(STAMP): $(BIN)/python pyproject.toml setup.py $(NATIVE_SRC)
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[test,harness]'
	@touch $@

deps: native-deps $(STAMP)

# Two workers: half the suite's wall time is waiting (start barriers, grace periods,
# peers' processes), and every multi-process test must pass under load anyway. The
# network-namespace tests share one bridge subnet, so they run on one worker.
test: deps
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

testnet: deps
	$(BIN)/fflnode testnet --nodes 4 --out $(TESTNET_OUT)

lint: deps
	$(BIN)/ruff check fflnode fflnode_harness tests tools

clean:
	rm -rf $(VENV) build *.egg-info $(TESTNET_OUT) fflnode/prism/_uring*.so
