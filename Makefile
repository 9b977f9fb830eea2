# Triplane: the project's commands. Everything runs from the project's own
# virtual environment (.venv), created on first use; `make demo` and `make test`
# work from a fresh clone with nothing but Python 3.11+ installed.
#
#   make demo                 fresh stack, payments workload, summary, exit 0
#   make test                 the test suite (PostgreSQL/Redis suites skip loudly
#                             when their server is not running; under CI=true
#                             they fail); a run that leaves a process running fails
#   make up                   the stack in the foreground until Ctrl-C
#   make bench [ONLY=ledger]  benchmarks; figures merged into bench/results.json
#   make fuzz [FUZZ_SEED=n]   every RPC of every plane fuzzed through the real
#                             stack, 10,000 cases a plane (FUZZ_CASES=...);
#                             figures merged into bench/results.json
#   make chaos [CHAOS_ARGS=]  mixed workload through a 2-replica stack while planes,
#                             Triton, a JetStream node and PostgreSQL are killed;
#                             nothing lost, duplicated, INTERNAL or late; figures
#                             merged into bench/results.json
#   make proto                regenerate the committed Python stubs from proto/
#   make proto-check          fail when regenerating the stubs changes the tree
#   make proto-breaking       buf breaking (FILE) against the previous commit
#   make lint                 ruff (lint + format check), mypy strict, buf lint,
#                             import-linter (the layer contracts)
#   make k8s-check            render every kustomization under k8s/ and validate
#                             it offline (kubernetes-validate --strict, checkov,
#                             in .venv-k8s); SLO rules up to date, promtool
#                             check/test rules; dashboards parse
#   make clean                remove state (.triplane/) and caches; keeps .venv
#   make distclean            clean, and remove .venv

SHELL := /bin/bash
.DEFAULT_GOAL := help

# The first interpreter on PATH that is Python 3.11 or newer (override: PYTHON=...).
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && \
	{ echo $$p; break; }; done)
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# Written once the project is installed. Re-installs when pyproject.toml changes
# or a new top-level package appears (an editable install maps the packages that
# existed when it ran, so a plane written later needs one more install).
STAMP := $(VENV)/.triplane-installed
PACKAGE_MARKERS := $(wildcard */__init__.py)

# Our Python packages (the generated stubs under triplane/*/v1 are excluded by
# pyproject's ruff and mypy settings). Planes still being written are picked up
# as soon as their directory exists.
PACKAGES := $(wildcard triplane money_plane policy_plane ai_plane gateway triplane_client triplane_sim triplane_tools console)
MYPY_TARGETS := $(PACKAGES) $(wildcard bench)
# Generated code: checked for drift by proto-check.
GENERATED := triplane/*/v1

PYTRITON_VERSION := 0.7.0
ONLY ?=
PYTEST_ARGS ?=
# `make fuzz`: cases per plane and the seed (tests/fuzz/harness.py's default
# when empty; a finding's seed reproduces it).
FUZZ_CASES ?= 10000
FUZZ_SEED ?=
DEMO_ARGS ?=

.PHONY: help venv demo up test fuzz chaos bench proto proto-check proto-breaking lint k8s-check clean distclean

help:
	@sed -n '1,/^$$/p' Makefile | sed -n 's/^# \{0,1\}//p'

venv: $(STAMP)

$(STAMP): pyproject.toml $(PACKAGE_MARKERS)
	@if [ -z "$(PYTHON)" ]; then \
		echo "make: Python 3.11 or newer is needed (none found on PATH; set PYTHON=...)" >&2; \
		exit 1; fi
	@[ -x "$(PY)" ] || { echo "creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@# tritonserver comes inside the nvidia-pytriton wheel, whose declared
	@# tritonclient[grpc] pins protobuf<7; only the binary is used, so the
	@# wheel goes in without its dependencies (see ai_plane/README.md).
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps 'nvidia-pytriton==$(PYTRITON_VERSION)'
	@touch $@

demo: venv
	$(BIN)/triplane demo $(DEMO_ARGS)

up: venv
	$(BIN)/triplane up

# Exit status 5 (no tests collected) is a failure, said out loud. Processes the
# run leaves behind (planes, nats-server, tritonserver) are killed and fail it,
# named (tests/conftest.py).
test: venv
	@rc=0; $(BIN)/pytest -q -rfEs -p no:cacheprovider --durations=20 $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; \
	exit $$rc

# The fuzz suite alone, at full size (`make test` runs it short). Its figures
# (fuzz_cases_total, fuzz_internal_total, fuzz_state_changes_total, per plane
# too) are merged into bench/results.json.
fuzz: venv
	TRIPLANE_FUZZ_CASES=$(FUZZ_CASES) TRIPLANE_FUZZ_WRITE_RESULTS=1 \
	$(if $(FUZZ_SEED),TRIPLANE_FUZZ_SEED=$(FUZZ_SEED)) \
	$(BIN)/pytest -q -rfEs -p no:cacheprovider $(PYTEST_ARGS) tests/fuzz

# The chaos run at full length (`make test` runs it short,
# tests/runtime/test_chaos.py): 2 replicas of every plane on a private
# PostgreSQL, a 3-node JetStream cluster and Redis, the fault schedule in
# rounds for CHAOS_ARGS' duration (default 240 s; `triplane chaos --help`).
CHAOS_ARGS ?=
chaos: venv
	$(BIN)/triplane chaos $(CHAOS_ARGS)

# The benchmarks' own baselines: Vowpal Wabbit (the bench extra) and Feast,
# which pins protobuf<7 and so lives in its own environment (.venv-feast).
BENCH_STAMP := $(VENV)/.triplane-bench-installed
FEAST_VENV := .venv-feast

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	@[ -x "$(FEAST_VENV)/bin/python" ] || $(PYTHON) -m venv $(FEAST_VENV)
	$(FEAST_VENV)/bin/python -m pip install --quiet --disable-pip-version-check feast
	@touch $@

bench: venv $(BENCH_STAMP)
	$(PY) -m bench $(if $(ONLY),--only $(ONLY),)

# protoc finds its mypy plugins (protoc-gen-mypy, protoc-gen-mypy_grpc) on PATH.
proto: venv
	PATH="$(abspath $(BIN)):$$PATH" PY=$(PY) scripts/gen_proto.sh

proto-check: proto
	@git diff --exit-code --stat -- $(GENERATED) || { \
		echo "proto-check: generated stubs differ from proto/; run 'make proto' and commit" >&2; \
		exit 1; }
	@untracked="$$(git status --porcelain --untracked-files=all -- $(GENERATED))"; \
	if [ -n "$$untracked" ]; then \
		echo "proto-check: generated files not committed:" >&2; echo "$$untracked" >&2; \
		exit 1; fi
	@echo "proto-check: generated stubs match proto/"

proto-breaking: venv
	BUF=$(BIN)/buf scripts/buf_breaking.sh

lint: venv
	@rc=0; \
	echo "== ruff check"; $(BIN)/ruff check . || rc=1; \
	echo "== ruff format --check"; $(BIN)/ruff format --check . || rc=1; \
	echo "== mypy (strict) $(MYPY_TARGETS)"; $(BIN)/mypy $(MYPY_TARGETS) || rc=1; \
	echo "== buf lint (workspace buf.yaml at the root)"; $(BIN)/buf lint || rc=1; \
	echo "== import-linter (the layers)"; $(BIN)/lint-imports || rc=1; \
	exit $$rc

# The manifest validators live in their own environment (.venv-k8s): checkov
# pulls in about a hundred packages that `make venv` (and so `make test`) need
# not install. Re-installed when the pinned versions change.
K8S_VENV := .venv-k8s
K8S_REQUIREMENTS := scripts/k8s-check-requirements.txt
K8S_STAMP := $(K8S_VENV)/.triplane-k8s-installed

$(K8S_STAMP): $(K8S_REQUIREMENTS)
	@[ -x "$(K8S_VENV)/bin/python" ] || { echo "creating $(K8S_VENV) with $(PYTHON)"; $(PYTHON) -m venv $(K8S_VENV); }
	$(K8S_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r $(K8S_REQUIREMENTS)
	@touch $@

k8s-check: venv $(K8S_STAMP)
	K8S_VENV=$(K8S_VENV) PY=$(PY) scripts/check_k8s.sh

clean:
	rm -rf .triplane build dist .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
