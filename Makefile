# Every target sets up what it needs on a fresh machine: the venv, redis-server, the control plane.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest
ARGS ?=

GO_TEST_FLAGS ?= -count=1 -p=1 -timeout=30m

.PHONY: help venv constraints run test test-unit test-integration test-e2e test-go atlantis lint \
        redis sandbox luacheck browser etcd control-plane cluster-up docs chart kind-e2e image-smoke bench \
        bench-full clean

help:
	@echo "make run              serve the lock service on http://127.0.0.1:4142 (embedded store)"
	@echo "make venv             the Python venv in .venv, at the pins of constraints.txt"
	@echo "make test             every tier: unit, integration, e2e, then the Go tests"
	@echo "make test-unit        the unit tests"
	@echo "make test-integration real redis-server and SQLite"
	@echo "make test-e2e         the real Kubernetes API server (builds the control plane)"
	@echo "make test-go          the Go module in atlantis/ against the service, Redis and Atlantis"
	@echo "make lint             ruff, luacheck, go vet, mypy (strict, package and tests), import contracts"
	@echo "make docs             regenerate the generated parts of docs/, crds/ and the chart"
	@echo "make chart            regenerate the chart's CRD templates and values.schema.json"
	@echo "make bench            every benchmark in bench/, small counts, goals met or missed"
	@echo "make bench-full       the same with full counts; writes docs/benchmarks.md"
	@echo "make cluster-up       start a local Kubernetes control plane for manual use"
	@echo "make constraints      re-pin dependencies to the newest versions pyproject.toml allows"
	@echo "make kind-e2e         the e2e suite on a kind cluster with the image (needs Docker)"
	@echo "make image-smoke      build the image and run it read-only (needs Docker)"
	@echo "make clean            remove the venv and build, test and lint caches"
	@echo "What the tests need (each installs or builds only what is missing):"
	@echo "make redis            Debian's redis-server"
	@echo "make sandbox          Debian's bubblewrap (the chart tests' sandbox)"
	@echo "make luacheck         Debian's lua-check (make lint)"
	@echo "make browser          Debian's chromium and chromium-driver (the console's tests)"
	@echo "make etcd             etcd from the Go module proxy, cached outside the repository"
	@echo "make control-plane    etcd, kube-apiserver, kube-controller-manager, kubectl, helm, cached"
	@echo "make atlantis         Atlantis's server binary, cached (make test-go)"

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[test,lint]'
	touch $@

# The newest versions pyproject.toml allows, resolved in a scratch venv and written as pins.
constraints:
	rm -rf .venv-constraints && python3 -m venv .venv-constraints
	.venv-constraints/bin/pip install --quiet -e '.[test,lint]'
	{ sed -n '1,3p' constraints.txt; .venv-constraints/bin/pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf .venv-constraints

venv: $(VENV)/.installed

run: venv
	$(VENV)/bin/enhanced-locking serve $(ARGS)

redis:
	hack/ensure-redis.sh

sandbox:
	hack/ensure-bubblewrap.sh

# Debian's lua-check: `make lint` checks the Redis backend's Lua scripts with it.
luacheck:
	hack/ensure-luacheck.sh

# Debian's chromium and chromium-driver: the console's browser tests (tests/e2e/test_console.py).
browser:
	hack/ensure-chromium.sh

control-plane:
	hack/build-control-plane.sh

# etcd alone, the one binary the unit and integration tests need (cached on its own; the
# control-plane build reuses it).
etcd:
	hack/build-control-plane.sh --etcd

cluster-up: venv control-plane
	hack/cluster-up.sh

# The control plane and Atlantis are built in the background while the unit and integration
# tiers run (they need only etcd); see hack/test-all.sh for the order.
test: venv redis sandbox luacheck browser etcd
	VENV="$(VENV)" MAKE="$(MAKE)" hack/test-all.sh

# The Go module in atlantis/ (the API client and Atlantis's lock database on the service),
# tested against live `enhanced-locking serve` processes, real redis-server and Atlantis itself.
test-go: venv redis atlantis
	cd atlantis && ENHANCED_LOCKING_ATLANTIS_BIN="$$(../hack/build-atlantis.sh --print-bin)" \
		go test $(GO_TEST_FLAGS) ./... $(ARGS)

# Atlantis's server binary, built from the Go module proxy and cached outside the repo.
atlantis:
	hack/build-atlantis.sh

test-unit: venv
	$(PYTEST) tests/unit

test-integration: venv redis
	$(PYTEST) tests/integration

test-e2e: venv sandbox browser control-plane
	$(PYTEST) tests/e2e

lint: venv luacheck
	$(VENV)/bin/ruff check operator tests bench hack
	$(PY) hack/lint_lua.py
	cd atlantis && go vet ./...
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

docs: venv
	$(PY) hack/gen_docs.py
	$(PY) hack/gen_crds.py
	$(PY) hack/gen_chart.py

# The chart's CRD templates (from crds/) and values.schema.json (from values.yaml).
chart: venv
	$(PY) hack/gen_chart.py

# The e2e suite on a kind cluster running the built image (needs Docker; see docs/06-kubernetes.md).
kind-e2e: venv
	hack/kind-e2e.sh $(ARGS)

# Build the image and run it read-only, as the chart does (needs a Docker engine).
image-smoke:
	hack/image-smoke.sh $(ARGS)

BENCH_SCRIPTS = $(filter-out bench/_%,$(sort $(wildcard bench/*.py)))

# Every benchmark with small counts (a few minutes in all), each table printed with its goals;
# docs/benchmarks.md is written by bench-full (the full counts).
bench: venv redis control-plane
	for script in $(BENCH_SCRIPTS); do BENCH_QUICK=1 $(PY) $$script || exit 1; done

bench-full: venv redis control-plane
	for script in $(BENCH_SCRIPTS); do $(PY) $$script || exit 1; done
	$(PY) hack/gen_docs.py

clean:
	rm -rf $(VENV) build dist operator/*.egg-info .pytest_cache .mypy_cache .ruff_cache
