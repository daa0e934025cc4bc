# The two commands of README.md: `make run` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export GATEWAY_LOCAL_ROOT ?= /var/lib/slurm-gateway-local
# The cluster `make run` serves: c2205 (Slurm 22.05, has the local vLLM
# runtime), c2411 (Slurm 24.11) or c2605 (Slurm 26.05 from Debian sid).
CLUSTER ?= c2205

.PHONY: run test venv node browser image cluster vllm-runtime vllm-image cluster-down cluster-status lint format unit integration fixtures openapi docs bench clean

# A cluster with a site overlay of its own (deploy/local/site-c2605.toml: vLLM
# in Apptainer) runs with it.
SITE_FILE = $(firstword $(wildcard deploy/local/site-$(CLUSTER).toml) deploy/local/site.toml)

run: venv cluster vllm-runtime vllm-image
	GATEWAY_SLURM_CLUSTER_FILE=$(GATEWAY_LOCAL_ROOT)/$(CLUSTER)/cluster.json \
	GATEWAY_SITE_FILE=$${GATEWAY_SITE_FILE:-$(SITE_FILE)} \
	$(PY) -m gateway

test: lint node browser image cluster vllm-runtime vllm-image
	$(PY) -m pytest -ra --durations=25 tests

# The Swagger UI files too (seconds once, then a no-op): venv.sh runs only
# when its inputs change, and a clone may lack them.
venv: $(VENV)/.installed
	@$(PY) scripts/reference_assets.py

$(VENV)/.installed: pyproject.toml scripts/venv.sh
	VENV=$(VENV) scripts/venv.sh

# Node.js and npm for the TypeScript client check (tests/clients/typescript).
node:
	scripts/node.sh

# Debian's Chromium, which renders the API reference in tests/integration.
browser:
	scripts/browser.sh

# The gateway's OCI image localhost/slurm-gateway:<version> (deploy/image/): the
# first build on a machine debootstraps its base, later ones reuse every layer
# whose inputs did not change.
image: venv
	deploy/image/build.sh

cluster:
	deploy/local/cluster.sh up

# vLLM's CPU build and tiny local models, inside cluster c2205's chroot.
vllm-runtime: cluster
	deploy/local/vllm-runtime.sh

# The same vLLM as an OCI image, where cluster c2605's nodes read it (Apptainer).
vllm-image: image vllm-runtime
	deploy/local/vllm-image.sh

cluster-down:
	deploy/local/cluster.sh down

cluster-status:
	deploy/local/cluster.sh status

# Each recipe's job script as the gateway renders it, through shellcheck
# (scripts/venv.sh installs it): the checker sees bash, not Jinja.
lint: venv
	$(VENV)/bin/ruff check gateway tests scripts bench deploy
	$(VENV)/bin/ruff format --check gateway tests scripts bench deploy
	$(VENV)/bin/mypy gateway
	@set -o pipefail; for meta in recipes/*/*/recipe.toml; do \
	  echo "shellcheck $${meta%/*}"; \
	  $(PY) scripts/render_recipe.py "$${meta%/*}" | shellcheck -s bash - || exit 1; \
	done

format: venv
	$(VENV)/bin/ruff check --fix gateway tests scripts bench deploy
	$(VENV)/bin/ruff format gateway tests scripts bench deploy

unit: venv node
	$(PY) -m pytest -ra tests/unit tests/tools

integration: venv browser image cluster vllm-runtime vllm-image
	$(PY) -m pytest -ra tests/integration

# Latency of /prompt through the gateway against the same request straight to
# vLLM; then the control plane (creates, listing, polling with slurmctld's RPC
# counts, 10,000 queued services) against slurmrestd itself, on 22.05 and 24.11;
# then /v1 load through a deployment's walltime rollover against one without (24.11);
# then /v1 chat sessions with prefix affinity on against off (local stub processes).
bench: venv cluster vllm-runtime
	$(PY) bench/transport.py
	$(PY) bench/proxy.py
	$(PY) bench/prompt_latency.py
	$(PY) bench/control_plane.py --cluster c2205
	$(PY) bench/control_plane.py --cluster c2411
	$(PY) bench/rollover.py --cluster c2411
	$(PY) bench/prefix.py

# Re-record the adapter fixtures from the live daemons (tests/fixtures/slurmrestd);
# ONLY="c2605" limits it to the clusters named.
fixtures: venv cluster
	$(PY) scripts/record_fixtures.py $(ONLY)

# Regenerate openapi/openapi.json from the app (a unit test fails when it is stale).
openapi: venv
	$(PY) scripts/openapi.py

# Regenerate docs/configuration.md from gateway/settings.py (a unit test fails when it is stale).
docs: venv
	$(PY) scripts/settings_doc.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
