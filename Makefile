# The two commands of the README:
#   make up    install into .venv (first time) and run the whole stack on the embedded nats-server
#   make test  install into .venv (first time), lint and type-check, and run the test suite
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: up test lint bench bench-e2e bench-sink profile-sink bench-isolation bench-gateway install clean prometheus check-asyncapi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(VENV)/bin/chora up

# tests/integration/test_prometheus.py evaluates the dashboards against a real Prometheus
# (Debian's package); it is installed here when missing and apt-get is at hand.
prometheus:
	@command -v prometheus >/dev/null || ! command -v apt-get >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null)

# ruff (lint and format) and mypy, configured in pyproject.toml
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# two workers (pytest-xdist), a test module at a time each (its module-scoped stack is set up once)
test: $(STAMP) prometheus lint
	$(VENV)/bin/python -m pytest -n 2 --dist loadscope

# the project (all five services, to content_validated), the FastStream peer (pull and push, in
# a venv of its own) and plain nats-py, in one run with the same N: one table with the ratios,
# and under it what one wake-up costs on this machine (bench.wakeup)
PEER_VENV ?= .venv-peer
PEER_STAMP := $(PEER_VENV)/.installed-stamp

$(PEER_STAMP): bench/peer-requirements.txt
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install --quiet -r bench/peer-requirements.txt
	touch $(PEER_STAMP)

bench: $(STAMP) $(PEER_STAMP)
	$(VENV)/bin/python -m bench.compare --peer-python $(PEER_VENV)/bin/python
	$(VENV)/bin/python -m bench.sink --repeat 3

# the project alone, JSON (throughput, latency by stage, CPU per request per process)
bench-e2e: $(STAMP)
	$(VENV)/bin/python -m bench.e2e

# the telemetry sink alone from a pre-filled stream, against the nats-py push-consumer ceiling
# in the same run (events/s, ratio, CPU per message, peak RSS, every sequence once)
bench-sink: $(STAMP)
	$(VENV)/bin/python -m bench.sink --repeat 3

# where the sink's CPU goes: py-spy samples `chora service run telemetry` during bench-sink
# (collapsed stacks in var/sink-profile.txt, for flamegraph.pl or speedscope)
profile-sink: $(STAMP)
	mkdir -p var
	$(VENV)/bin/python -m bench.sink --events 50000 --profile var/sink-profile.txt

# what isolating renders costs: per render (in-loop vs the worker pool) and the full stack both ways
bench-isolation: $(STAMP)
	$(VENV)/bin/python -m bench.isolation

# contracts/asyncapi.json parsed by the official AsyncAPI parser (npm @asyncapi/parser, installed
# into tools/node_modules on first use; needs node and npm). A dev-time check: pytest does not need npm.
tools/node_modules/@asyncapi/parser/package.json: tools/package.json
	cd tools && npm install --no-audit --no-fund --ignore-scripts

check-asyncapi: tools/node_modules/@asyncapi/parser/package.json
	node tools/check_asyncapi.mjs

# the gateway's cost: POST /v1/generate through it next to the same requests over NATS
bench-gateway: $(STAMP)
	$(VENV)/bin/python -m bench.gateway

clean:
	rm -rf $(VENV) $(PEER_VENV) var .pytest_cache tools/node_modules
