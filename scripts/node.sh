#!/usr/bin/env bash
# Node.js and npm for tests/tools/test_typescript_client.py: Debian's packages
# when the machine has no npm yet (nothing to do otherwise).
set -euo pipefail
if command -v npm >/dev/null 2>&1 && command -v node >/dev/null 2>&1; then
  exit 0
fi
echo "node: installing nodejs and npm with apt" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq nodejs npm >/dev/null
