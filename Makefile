# The two commands of README.md: `make run` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export GATEWAY_LOCAL_ROOT ?= /var/lib/slurm-gateway-local
# The cluster `make run` serves: c2411 (Slurm 24.11) or c2205 (Slurm 22.05).
CLUSTER ?= c2411

.PHONY: run test venv cluster cluster-down cluster-status lint format unit integration fixtures openapi clean

run: venv cluster
	GATEWAY_SLURM_CLUSTER_FILE=$(GATEWAY_LOCAL_ROOT)/$(CLUSTER)/cluster.json \
	GATEWAY_SITE_FILE=$${GATEWAY_SITE_FILE:-deploy/local/site.toml} \
	$(PY) -m gateway

test: lint cluster
	$(PY) -m pytest -ra tests

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/venv.sh
	VENV=$(VENV) scripts/venv.sh

cluster:
	deploy/local/cluster.sh up

cluster-down:
	deploy/local/cluster.sh down

cluster-status:
	deploy/local/cluster.sh status

lint: venv
	$(VENV)/bin/ruff check gateway tests scripts
	$(VENV)/bin/ruff format --check gateway tests scripts
	$(VENV)/bin/mypy gateway

format: venv
	$(VENV)/bin/ruff check --fix gateway tests scripts
	$(VENV)/bin/ruff format gateway tests scripts

unit: venv
	$(PY) -m pytest -ra tests/unit

integration: venv cluster
	$(PY) -m pytest -ra tests/integration

# Re-record the adapter fixtures from the live daemons (tests/fixtures/slurmrestd).
fixtures: venv cluster
	$(PY) scripts/record_fixtures.py

# Regenerate openapi/openapi.json from the app (a unit test fails when it is stale).
openapi: venv
	$(PY) scripts/openapi.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
