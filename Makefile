# hotswap: `make run` serves, `make test` passes, both from a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WHEELS := .wheels
PIP_INSTALL := $(BIN)/pip install --quiet --find-links $(WHEELS)
# One stamp per set of extras, so each is installed once: `run` needs only what serves
# (uWSGI, Flask, click, lmdb); `test` adds pytest, ruff and ansible-core (the fleet tests);
# `bench` adds gunicorn and matplotlib (`make test` takes both).
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
BENCH_STAMP := $(VENV)/.installed-bench
RESOURCE := data/terms.tsv
# the memory-mapped store srv.py serves by default (SRV_MODE=store), built from RESOURCE
STORE := data/store/current
# ~2M terms: the import takes about two seconds on a 2-core machine
TERMS ?= 2000000
PREFIX ?= /opt/hotswap
UNIT_DIR ?= /etc/systemd/system

.PHONY: run test venv dev made-with deps-system lint bench bench-scale install-systemd release \
	reload status stop recover clean fleet-demo chaos

$(RUN_STAMP): pyproject.toml
	@bash scripts/check-prereqs.sh $(PYTHON) $(WHEELS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# uWSGI compiles from PyPI once (about a minute); the wheel is kept for installs
	$(BIN)/pip wheel --quiet --find-links $(WHEELS) --wheel-dir $(WHEELS) 'uWSGI>=2.0.31,<2.1'
	$(PIP_INSTALL) -e .
	echo $(PYTHON) > $(VENV)/.python
	touch $@

$(TEST_STAMP): $(RUN_STAMP)
	$(PIP_INSTALL) -e '.[test,fleet]'
	touch $@

$(BENCH_STAMP): $(RUN_STAMP)
	$(PIP_INSTALL) -e '.[bench]'
	touch $@

venv: $(RUN_STAMP)

# everything beyond `make run`'s install: the test, fleet and bench extras (pytest, ruff,
# ansible-core, matplotlib, gunicorn), for the docs' `.venv/bin/pytest …` lines and the bench
dev: $(TEST_STAMP) $(BENCH_STAMP)

$(RESOURCE): | $(RUN_STAMP)
	$(BIN)/python scripts/gen_resource.py --terms $(TERMS) --version v1 -o $@
	echo $(TERMS) > data/.terms

# TERMS= and PYTHON= act only when data/ or .venv is made: say so when one would be ignored
# (a warning, not a failure: what exists still serves)
made-with:
	@if [ "$(origin TERMS)" != file ] && [ -f data/.terms ] && [ "$$(cat data/.terms)" != "$(TERMS)" ]; then \
		echo "make: TERMS=$(TERMS) ignored: data/ was made with $$(cat data/.terms) terms (rm -r data to remake it)" >&2; fi
	@if [ "$(origin PYTHON)" != file ] && [ -f $(VENV)/.python ] && [ "$$(cat $(VENV)/.python)" != "$(PYTHON)" ]; then \
		echo "make: PYTHON=$(PYTHON) ignored: $(VENV) was made with $$(cat $(VENV)/.python) (rm -r $(VENV) to remake it)" >&2; fi

deps-system:
	bash scripts/install-system-deps.sh

$(STORE): $(RESOURCE) | $(RUN_STAMP)
	$(BIN)/python scripts/build_store.py $(RESOURCE) -o data/store --point --if-missing

run: $(RUN_STAMP) made-with $(RESOURCE) $(STORE)
	$(BIN)/hotswap --ini srv.ini start

# A new data release for the running instance to reload: `make release VERSION=v2`
# (the same terms, a new version: every term you looked up is still there).
release: $(RUN_STAMP)
	@test -n "$(VERSION)" || { echo "make release: say which, e.g. make release VERSION=v2" >&2; exit 1; }
	$(BIN)/python scripts/gen_resource.py --terms $(TERMS) --version $(VERSION) -o $(RESOURCE)
	$(BIN)/python scripts/build_store.py $(RESOURCE) -o data/store --point --if-missing

# make exits 2 whatever the CLI's code; scripts/make-cli.sh says the real code first
reload status stop recover: $(RUN_STAMP)
	@bash scripts/make-cli.sh $(BIN) $@

lint: $(TEST_STAMP)
	$(BIN)/ruff check .

# deps-system first: on a fresh root machine (CI) it also installs what compiles uWSGI.
# The bench extra too: tests/test_bench_smoke.py runs the harness and checks its plot.
# Two workers: most tests wait on uWSGI, Ansible or a drain rather than compute. Each test
# file stays on one worker (loadfile: its module-scoped services start once); `pytest` alone
# runs the same tests serially.
test: deps-system $(TEST_STAMP) $(BENCH_STAMP) lint
	$(BIN)/pytest -n 2 --dist loadfile

bench: deps-system $(BENCH_STAMP)
	$(BIN)/python -m bench.bench

# deploy/ansible's rolling release over 4 local instances: a good release, the same again,
# one that breaks on host2 (see scripts/fleet_demo.py)
fleet-demo: $(TEST_STAMP)
	$(BIN)/python -m scripts.fleet_demo $(FLEET_ARGS)

# heap vs store across sizes and worker counts, and the per-worker alternatives (long)
bench-scale: $(BENCH_STAMP)
	$(BIN)/python -m bench.scale

# builds its own venv from the system python under PREFIX (not this developer .venv)
install-systemd:
	bash deploy/install-systemd.sh $(PREFIX) $(UNIT_DIR)

# run/ holds the FIFOs, socket and locks of a live instance: removing them under it leaves
# the service unreachable (see docs/operations.md), so clean refuses while one runs.
clean:
	@if [ -x $(BIN)/hotswap ]; then $(BIN)/hotswap --ini srv.ini status >/dev/null 2>&1; \
	  rc=$$?; if [ $$rc -ne 3 ]; then echo "make clean: refused: an instance of srv.ini is" \
	  "running (hotswap status exits $$rc); stop it first: make stop" >&2; exit 1; fi; fi
	rm -rf run log .pytest_cache .ruff_cache

# random faults at random moments under load, every failed request attributed (docs/chaos.md);
# a soak: `make chaos CHAOS_ARGS="--swaps 40 --seed 7"`
chaos: $(TEST_STAMP) $(BENCH_STAMP)
	$(BIN)/python -m bench.chaos $(CHAOS_ARGS)
