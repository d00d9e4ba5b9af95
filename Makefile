# meterproof's front door. Every target sets up what it needs on a fresh Debian/Ubuntu
# machine (apt packages when missing, a venv, the project), then runs one thing.

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV     ?= .venv
PY       := $(VENV)/bin/python
MP       := $(VENV)/bin/meterproof
APT_PKGS := mosquitto mosquitto-clients redis-server postgresql python3-venv patroni etcd-server openssl
PYTEST_ARGS ?=
# Test processes: the tests mostly wait on their servers, so two share 2 cores well.
# 0 runs the suite in one process.
PYTEST_WORKERS ?= 2

.PHONY: help setup system-packages test lint typecheck pytest demo bench chaos fuzz certs device-cert revoke stack-up stack-down clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

system-packages: ## apt-get install what is missing (mosquitto, redis, postgresql, patroni, etcd, venv, openssl)
	@missing=""; for p in $(APT_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  sudo=""; [ "$$(id -u)" -ne 0 ] && sudo="sudo"; \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

node_modules/.installed: package.json package-lock.json
	@command -v npm >/dev/null || { sudo=""; [ "$$(id -u)" -ne 0 ] && sudo="sudo"; \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq nodejs npm; }
	npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	@touch $@

setup: system-packages $(VENV)/.installed node_modules/.installed ## system packages + venv + project + the EVM toolchain (npm: solc, ganache)

lint: setup ## ruff
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup ## mypy --strict on the meterproof package
	@mkdir -p .run/typecheck && ln -sfn ../.. .run/typecheck/meterproof
	$(VENV)/bin/mypy

pytest: setup ## the test suite against real servers (Mosquitto, PostgreSQL, Redis, Patroni/etcd, ganache)
	@$(VENV)/bin/pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose" >&2; exit 1; fi; \
	exit $$rc

test: lint typecheck pytest ## everything CI runs: lint, types, tests

demo: setup ## local stack + PKI + registry + workers + bridge + a simulated fleet, then a summary
	$(MP) demo

bench: setup ## the benchmark suite; writes docs/benchmarks.md
	$(MP) bench

chaos: setup ## the fault campaign; writes docs/reliability.md
	$(MP) chaos

fuzz: setup ## 100,000+ generated and mutated payloads through decode, verify and judge
	@$(PY) -c 'import atheris' 2>/dev/null || $(PY) -m pip install -q atheris || echo "atheris unavailable: running without it" >&2
	$(MP) fuzz

certs: setup ## the PKI: CA, broker certificate, CRL, oracle key, service identities (creates only what is missing)
	$(MP) certs init

device-cert: setup ## make device-cert METER=<id> [ALG=EdDSA]
	@test -n "$(METER)" || { echo "usage: make device-cert METER=<meter id> [ALG=EdDSA|ES256|RS256|PS256]" >&2; exit 2; }
	$(MP) certs issue "$(METER)" --alg "$(or $(ALG),EdDSA)"

revoke: setup ## make revoke METER=<id>
	@test -n "$(METER)" || { echo "usage: make revoke METER=<meter id>" >&2; exit 2; }
	$(MP) certs revoke "$(METER)"

stack-up: setup ## start Mosquitto, PostgreSQL and Redis on loopback (.run/), migrated; creates the PKI if missing
	$(MP) stack up

stack-down: setup ## stop the local stack
	$(MP) stack down

clean: ## remove the venv and runtime state (keeps certs/out)
	-$(MP) stack down --purge 2>/dev/null
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache
