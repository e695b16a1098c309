# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# torch==2.13.0 is installed explicitly and only when torch is missing: an
# unpinned torch (or a dependency asking for one) would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEPS   := pyproject.toml setup.py src/gradguard/_cstats.c

.PHONY: demo test bench install clean mutate mutate-ast

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	touch $@

# The demo needs the package and its dashboard ([demo]); the tests need every extra.
$(VENV)/.installed-demo: $(VENV)/.torch $(DEPS)
	$(PY) -m pip install -q -e ".[demo]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.torch $(DEPS)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed-test

demo: $(VENV)/.installed-demo
	$(VENV)/bin/gradguard demo

# The dashboard/report tests drive a real headless Chromium (the Debian package);
# installed once, with sudo when not root.  An order-only prerequisite: only
# whether the file exists matters, never its date.
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "make test needs $@: install Chromium there"; exit 1; }
	SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
	$$SUDO apt-get update -q && \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium

# Two pytest-xdist workers (CI has 2 cores); a test file stays on one worker (--dist loadfile),
# so its module fixtures (dashboard server, browser) are built once.  TEST_JOBS=0: one process.
TEST_JOBS ?= 2

test: $(VENV)/.installed-test | $(CHROMIUM)
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder tests

bench: $(VENV)/.installed-test
	$(PY) -m pip install -q -e ".[test,bench]"
	$(VENV)/bin/gradguard bench

# Mutation score of the modules that hold the promises (not part of `make test`), with
# cosmic-ray: each sampled mutant runs its module's own test files (scripts/mutate_cr.py).
# Sampled so that it ends within the hour on 2 cores; MUTATE_ARGS="--sample 0" runs every
# mutant, --shard K/N splits a run.  `make mutate-ast`: the dependency-free fallback runner.
# See docs/testing.md.
MUTATE_ARGS ?= --sample 4 --seed 1

$(VENV)/.installed-mutate: $(VENV)/.installed-test
	$(PY) -m pip install -q -e ".[test,mutate]"
	touch $@

mutate: $(VENV)/.installed-mutate
	$(PY) scripts/mutate_cr.py $(MUTATE_ARGS)

mutate-ast: $(VENV)/.installed-test
	$(PY) scripts/mutate.py $(MUTATE_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info src/gradguard/*.so
