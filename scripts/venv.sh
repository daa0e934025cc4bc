#!/usr/bin/env bash
# Creates .venv with the gateway and its development tools. Installs Debian's
# python3-venv first when the interpreter cannot make virtual environments.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
venv=${VENV:-.venv}

if ! command -v "$python" >/dev/null 2>&1 || ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
  echo "venv: installing python3 and python3-venv with apt" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq python3 python3-venv python3-pip >/dev/null
  python=python3
fi
# make lint runs shellcheck over the recipes' rendered job scripts.
if ! command -v shellcheck >/dev/null 2>&1; then
  echo "venv: installing shellcheck with apt" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq shellcheck >/dev/null
fi
"$python" - <<'PY'
import sys
if sys.version_info < (3, 11):
    raise SystemExit(f"venv: Python 3.11 or newer is needed, found {sys.version.split()[0]}")
PY
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q --config-settings editable_mode=compat -e '.[dev]'
# Swagger UI for the API reference (gateway/api/reference/assets, not in git).
"$venv/bin/python" scripts/reference_assets.py
touch "$venv/.installed"
