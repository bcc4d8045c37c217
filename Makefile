# Two entry points on a fresh machine: `make demo` and `make test`. Both install first.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
ASSETS  := examples/assets/tiny-llama

.PHONY: install demo test test-unit test-fast assets system-deps clean

install: $(STAMP)

# torch is installed in the same pip command as everything else (docs/environment.md): alone, peft or
# accelerate resolve torch to a multi-GB CUDA build.
$(STAMP): requirements.txt src/kubetune/requirements.txt requirements-dev.txt pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

$(ASSETS)/config.json: | $(STAMP)
	$(BIN)/python -m kubetune.quickstart build-model --out $(ASSETS)

assets: $(ASSETS)/config.json

demo: install assets
	bash examples/quickstart.sh

# PostgreSQL and Chromium, which the control-plane and dashboard tests start (Debian packages).
system-deps:
	bash scripts/system-deps.sh

# Three workers (pytest-xdist) on 2 cores: the tests' training processes are single-threaded
# (OMP_NUM_THREADS=1) and many tests wait on servers, subprocesses starting or leases lapsing, so a third
# worker fills the idle time (19.7 min here instead of 23.0 with two). Work stealing: a worker that runs
# out of tests takes queued ones from another; the longest tests (marked `long`) are started first.
test: install assets system-deps
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n 3 --dist worksteal --durations=25

test-unit: install
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -m "not integration"

test-fast: test-unit

clean:
	rm -rf $(VENV) runs examples/assets .pytest_cache
