#!/usr/bin/env bash
# Debian's Chromium for tests/integration/test_api_reference.py, which renders
# the API reference headless (nothing to do when it is already installed).
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
echo "browser: installing chromium with apt" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium >/dev/null
