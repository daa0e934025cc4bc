"""The batch script of a service: the gateway's preamble, then the recipe's body.

The preamble gives every recipe three shell helpers:

* ``gw_phase PHASE [REASON...]`` publishes the phase (building, starting,
  running, failed) through the job's own comment, which slurmrestd returns;
* ``gw_endpoint HOST PORT`` publishes where the service listens;
* ``gw_free_port [PORT]`` prints a free TCP port on this node (random, tested
  by binding), or checks that PORT is free and fails the service if not;
* ``gw_fail REASON...`` publishes ``failed`` with the reason and exits.

No shared filesystem is involved: ``scontrol update`` from inside a job needs
no token, and the gateway reads the comment with the job. Slurm refuses a
comment over 1024 bytes, so a reason is cut to what fits (printable ASCII
only), and a publish Slurm refuses anyway is written to the job's log.

The service's upstream key arrives as ``$GW_SERVICE_KEY``; the preamble stops
exporting it, so only what the recipe hands it to (``VLLM_API_KEY=...``) sees it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from gateway.core import metadata
from gateway.core.recipes import Recipe
from gateway.core.shell import quote

_PLACEHOLDER = re.compile(r"__(?:META|LIMIT|REASON|RECIPE)__")

_PREAMBLE = r"""#!/bin/bash
# --- slurm-ai-gateway preamble: helpers for the recipe below ---
GW_META=__META__
GW_COMMENT_LIMIT=__LIMIT__
GW_PHASE=building
GW_ENDPOINT=
GW_REASON=
GW_SERVICE_KEY=${GW_SERVICE_KEY:-}
export -n GW_SERVICE_KEY
gw_publish() {
  local comment="$GW_META|phase=$GW_PHASE|endpoint=$GW_ENDPOINT" room out
  if [ -n "$GW_REASON" ]; then
    room=$(( GW_COMMENT_LIMIT - ${#comment} - 8 ))
    [ "$room" -gt 0 ] && comment="$comment|reason=${GW_REASON:0:room}"
  fi
  out=$(scontrol update jobid="$SLURM_JOB_ID" comment="$comment" 2>&1) \
    || echo "gateway: Slurm refused to publish the service state ($GW_PHASE): $out" >&2
}
gw_phase() {
  GW_PHASE=$1
  shift
  GW_REASON=$(printf '%s' "$*" | LC_ALL=C tr -c '[:print:]' ' ' | tr -d '|' | cut -c1-__REASON__)
  echo "gateway: phase $GW_PHASE${GW_REASON:+ ($GW_REASON)}" >&2
  gw_publish
}
gw_endpoint() {
  GW_ENDPOINT="$1:$2"
  echo "gateway: endpoint $GW_ENDPOINT" >&2
  gw_publish
}
gw_fail() {
  gw_phase failed "$@"
  exit 1
}
gw_port_free() {
  if command -v python3 >/dev/null 2>&1; then
    python3 -c 'import socket,sys
s=socket.socket()
try: s.bind(("", int(sys.argv[1])))
except OSError: sys.exit(1)' "$1"
  else
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}
gw_free_port() {
  if [ -n "${1:-}" ]; then
    gw_port_free "$1" || gw_fail "port $1 is not free on $(hostname) (in use or not permitted)"
    echo "$1"
    return
  fi
  local port tries=0
  while [ "$tries" -lt 50 ]; do
    port=$(( 20000 + RANDOM % 40000 ))
    if gw_port_free "$port"; then echo "$port"; return; fi
    tries=$(( tries + 1 ))
  done
  gw_fail "no free port found on $(hostname)"
}
gw_phase building
# --- recipe __RECIPE__ ---
"""


def build(recipe: Recipe, encoded_meta: str, context: Mapping[str, Any]) -> str:
    values = {
        "__META__": quote(encoded_meta),
        "__LIMIT__": str(metadata.COMMENT_LIMIT),
        "__REASON__": str(metadata.REASON_MAX),
        "__RECIPE__": recipe.name,
    }
    # One pass, so that no value is read again as a placeholder.
    preamble = _PLACEHOLDER.sub(lambda m: values[m.group(0)], _PREAMBLE)
    return preamble + recipe.render(context)


def render_context(
    recipe: Recipe, environment: Mapping[str, str], resources: Mapping[str, Any]
) -> dict[str, Any]:
    """What a recipe template may use. Values are shell-quoted on output."""
    return {
        "recipe": {"name": recipe.name, "description": recipe.spec.description},
        "env": dict(environment),
        "resources": dict(resources),
        "runtime": dict(recipe.spec.runtime),
        "service": {
            "kind": recipe.spec.service.kind,
            "health_path": recipe.spec.service.health_path,
        },
    }
