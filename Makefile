# hotswap: `make run` serves, `make test` passes, both from a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WHEELS := .wheels
STAMP := $(VENV)/.installed
RESOURCE := data/terms.tsv
# the memory-mapped store srv.py serves by default (SRV_MODE=store), built from RESOURCE
STORE := data/store/current
# ~2M terms: the import takes about two seconds on a 2-core machine
TERMS ?= 2000000
PREFIX ?= /opt/hotswap
UNIT_DIR ?= /etc/systemd/system

.PHONY: run test venv deps-system lint bench bench-scale install-systemd reload status stop clean fleet-demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# uWSGI compiles from PyPI once (about a minute); the wheel is kept for installs
	$(BIN)/pip wheel --quiet --find-links $(WHEELS) --wheel-dir $(WHEELS) 'uWSGI>=2.0.31,<2.1'
	$(BIN)/pip install --quiet --find-links $(WHEELS) -e '.[test,bench,fleet]'
	touch $@

venv: $(STAMP)

$(RESOURCE): | $(STAMP)
	$(BIN)/python scripts/gen_resource.py --terms $(TERMS) --version v1 -o $@

deps-system:
	bash scripts/install-system-deps.sh

$(STORE): $(RESOURCE) | $(STAMP)
	$(BIN)/python scripts/build_store.py $(RESOURCE) -o data/store --point --if-missing

run: $(STAMP) $(RESOURCE) $(STORE)
	$(BIN)/hotswap --ini srv.ini start

reload status stop: $(STAMP)
	$(BIN)/hotswap --ini srv.ini $@

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) deps-system lint
	$(BIN)/pytest

bench: $(STAMP) deps-system
	$(BIN)/python -m bench.bench

# deploy/ansible's rolling release over 4 local instances: a good release, the same again,
# one that breaks on host2 (see scripts/fleet_demo.py)
fleet-demo: $(STAMP)
	$(BIN)/python -m scripts.fleet_demo $(FLEET_ARGS)

# heap vs store across sizes and worker counts, and the per-worker alternatives (long)
bench-scale: $(STAMP)
	$(BIN)/python -m bench.scale

install-systemd: $(STAMP)
	bash deploy/install-systemd.sh $(PREFIX) $(UNIT_DIR)

# run/ holds the FIFOs, socket and locks of a live instance: removing them under it leaves
# the service unreachable (see docs/operations.md), so clean refuses while one runs.
clean:
	@if [ -x $(BIN)/hotswap ]; then $(BIN)/hotswap --ini srv.ini status >/dev/null 2>&1; \
	  rc=$$?; if [ $$rc -ne 3 ]; then echo "make clean: refused: an instance of srv.ini is" \
	  "running (hotswap status exits $$rc); stop it first: make stop" >&2; exit 1; fi; fi
	rm -rf run log .pytest_cache .ruff_cache
