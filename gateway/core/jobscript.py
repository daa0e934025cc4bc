"""The batch script of a service: the gateway's preamble, then the recipe's body.

The preamble first waits until the gateway has bound the job's metadata to
its job id (see metadata.py), then gives every recipe these shell helpers:

* ``gw_phase PHASE [REASON...]`` publishes the phase (building, starting,
  running, completed, failed) through the job's own comment, which slurmrestd
  returns;
* ``gw_endpoint HOST PORT`` publishes where the service listens;
* ``gw_free_port [PORT]`` prints a free TCP port on this node (random, tested
  by binding), or checks that PORT is free and fails the service if not;
* ``gw_fail REASON...`` publishes ``failed`` with the reason and exits;
* ``gw_start CMD...`` starts the service's server in the background in a
  session of its own (``setsid``; its pid in ``$GW_SERVER``); on every exit of
  the job script (the end, ``gw_fail``, a cancel or the time limit: SIGTERM)
  ``gw_stop_server`` ends that whole session, orphans included (vLLM's engine
  outlives a killed API server): SIGTERM, then SIGKILL after 10 s. A recipe
  that sets its own EXIT trap calls ``gw_stop_server`` in it;
* ``gw_own_listener PORT`` is 0 once something listens on PORT and every
  listening socket there is held by the server's session (the socket's inode
  in /proc/net/tcp{,6} among its fds), 1 if another process holds one, 2 if
  none listens; ``gw_wait_listener PORT [SECONDS]`` waits for 0 and fails the
  service otherwise (``gw_port_held PORT`` says why). An endpoint is published
  only after that, so that another user who binds the port first (between
  ``gw_free_port`` and the server's bind, say) never gets the service's key;
* with ``$GW_IDLE_STOP_SECONDS`` (a create's ``idle_stop_minutes``), the first
  publish of an endpoint starts ``gw_idle_watch``: it reads the server's vLLM
  metrics every ``$GW_IDLE_POLL_SECONDS`` (10) and, after that long with no
  request running, waiting or finished, signals the script (USR1), which
  publishes ``completed`` with the reason, stops the server and exits 0. The
  watcher ends in ``gw_stop_server``, so with the job.

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

from gateway.core import containers, metadata
from gateway.core.recipes import Recipe
from gateway.core.resources import Resources
from gateway.core.shell import quote
from gateway.slurm import JobSubmission

_PLACEHOLDER = re.compile(r"__(?:META|LIMIT|REASON|BIND_WAIT)__")
# The job's PATH: the system's, not the gateway's.
JOB_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The job's copy of its upstream key; the recipe hands it to the server.
KEY_VARIABLE = "GW_SERVICE_KEY"
# Seconds without a request after which the job stops itself (idle stop).
IDLE_VARIABLE = "GW_IDLE_STOP_SECONDS"
# How long a job waits for the gateway to bind its metadata to its job id
# (one update right after the submit) before it gives up and ends.
BIND_WAIT_SECONDS = 120

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
  gw_idle_start
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
  # The server's processes first: once the job says failed it ends at once,
  # so that a stop right after the failure finds it ended, not cancelled.
  gw_stop_server
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
# The live processes of session $1 and their descendants: a server started by
# gw_start and everything it forked, orphans included (they keep the session).
gw_session_pids() {
  cat /proc/[0-9]*/stat 2>/dev/null | awk -v root="$1" '
    { rest = $0; sub(/^.*\) /, "", rest); split(rest, f, " ")
      if (f[1] != "Z") { parent[$1] = f[2]; if ($1 == root || f[4] == root) keep[$1] = 1 } }
    END {
      do { more = 0
        for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; more = 1 }
      } while (more)
      for (p in keep) print p
    }'
}
gw_stop_session() {
  local sid=$1 grace=${2:-10} pids end
  pids=$(gw_session_pids "$sid")
  [ -n "$pids" ] || return 0
  kill -TERM $pids 2>/dev/null
  end=$(( SECONDS + grace ))
  while pids=$(gw_session_pids "$sid") && [ -n "$pids" ]; do
    if [ "$SECONDS" -ge "$end" ]; then
      echo "gateway: SIGKILL to what is left of the server after ${grace}s:" $pids >&2
      kill -KILL $pids 2>/dev/null
      [ "$SECONDS" -lt $(( end + 10 )) ] || return 1
    fi
    sleep 0.5
  done
}
GW_SERVER=
gw_start() {
  command -v setsid >/dev/null 2>&1 || gw_fail "setsid (util-linux) is not available on $(hostname)"
  # <&0: a background command's stdin would be /dev/null, not a heredoc given.
  setsid "$@" <&0 &
  GW_SERVER=$!
}
gw_stop_server() {
  gw_idle_unwatch
  [ -n "$GW_SERVER" ] || return 0
  trap '' TERM INT
  gw_stop_session "$GW_SERVER" "${1:-10}"
  GW_SERVER=
}
trap 'gw_stop_server' EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
# 0: something listens on TCP port $1 and every listening socket there is one
# of the server's (or of session $2's); 1: another process holds one; 2: none.
gw_own_listener() {
  local inodes inode tree p mine
  inodes=$(cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | awk -v want="$(printf ':%04X' "$1")" \
    '$4 == "0A" && substr($2, length($2) - 4) == want { print $10 }')
  [ -n "$inodes" ] || return 2
  tree=$(gw_session_pids "${2:-$GW_SERVER}")
  for inode in $inodes; do
    mine=
    for p in $tree; do
      if ls -l "/proc/$p/fd" 2>/dev/null | grep -qF "socket:[$inode]"; then mine=1; break; fi
    done
    [ -n "$mine" ] || return 1
  done
}
gw_port_held() {
  gw_fail "port $1 on $(hostname) is held by another process, not by this service's" \
    "server; nothing was published there"
}
gw_wait_listener() {
  local port=$1 limit=${2:-300} rc end
  end=$(( SECONDS + limit ))
  while :; do
    gw_own_listener "$port"
    rc=$?
    [ "$rc" -eq 0 ] && return 0
    [ "$rc" -eq 1 ] && gw_port_held "$port"
    if ! kill -0 "$GW_SERVER" 2>/dev/null; then
      wait "$GW_SERVER"
      gw_fail "the server exited with code $? before it listened on port $port"
    fi
    [ "$SECONDS" -lt "$end" ] || gw_fail "the server did not listen on port $port within ${limit}s"
    sleep 0.2
  done
}
# Idle stop ($GW_IDLE_STOP_SECONDS: the create's idle_stop_minutes). Once an
# endpoint is out, a watcher reads the server's /metrics (vLLM's names, behind
# the key) every $GW_IDLE_POLL_SECONDS; after that long with nothing running,
# waiting or finished it signals this script (USR1): completed, exit 0. A poll
# that fails changes nothing. bash's /dev/tcp: no curl or python needed.
GW_IDLE_WATCHER=
[[ ${GW_IDLE_STOP_SECONDS:-} =~ ^[0-9]{1,9}$ ]] || GW_IDLE_STOP_SECONDS=0
GW_IDLE_STOP_SECONDS=$(( 10#$GW_IDLE_STOP_SECONDS ))
[ "$GW_IDLE_STOP_SECONDS" -gt 0 ] || GW_IDLE_STOP_SECONDS=
[ -z "$GW_IDLE_STOP_SECONDS" ] || trap 'gw_idle_stopped' USR1
# "<running + waiting> <finished>" summed over vLLM's label sets at $1:$2.
gw_idle_poll() {
  local fd status line len=-1 rc=0 reader
  { exec {fd}<>"/dev/tcp/$1/$2"; } 2>/dev/null || return 1
  printf 'GET /metrics HTTP/1.0\r\nHost: %s:%s\r\nAuthorization: Bearer %s\r\n\r\n' \
    "$1" "$2" "$GW_SERVICE_KEY" >&"$fd" || rc=1
  [ "$rc" -eq 0 ] && IFS= read -r -t 5 -u "$fd" status || rc=1
  case "${status:-}" in "HTTP/1."[01]" 200"*) ;; *) rc=1 ;; esac
  while [ "$rc" -eq 0 ]; do
    IFS= read -r -t 5 -u "$fd" line || { rc=1; break; }
    line=${line%$'\r'}
    [ -n "$line" ] || break
    case "${line,,}" in content-length:*) len=${line#*:} len=${len//[!0-9]/} len=${len:--1} ;; esac
  done
  if [ "$rc" -eq 0 ]; then
    # Content-Length bytes (a server may keep the connection open), else to the end.
    reader=(head -c "$len")
    [ "$len" -ge 0 ] || reader=(cat)
    timeout 5 "${reader[@]}" <&"$fd" | LC_ALL=C awk -v len="$len" '
      { got += length($0) + 1 }
      /^vllm:(num_requests_running|num_requests_waiting|request_success_total)[{ ]/ {
        value = $0; sub(/^[^{ ]*([{].*[}])?[ \t]+/, "", value); split(value, v, /[ \t]+/)
        if ($0 ~ /^vllm:request_success_total/) done += v[1]; else busy += v[1]
        seen = 1 }
      END { if (!seen || got < len) exit 1; printf "%.0f %.0f\n", busy, done }'
    [ "${PIPESTATUS[0]}${PIPESTATUS[1]}" = 00 ] || rc=1
  fi
  exec {fd}>&-
  return "$rc"
}
gw_idle_watch() {
  local port=$1 host=${2:-127.0.0.1} limit=$GW_IDLE_STOP_SECONDS
  local period=${GW_IDLE_POLL_SECONDS:-10} nap now busy finished last='' since='' failed=''
  trap - EXIT TERM INT USR1
  [[ $period =~ ^[0-9]*\.?[0-9]+$ && $period =~ [1-9] ]] || period=10
  exec {nap}<> <(:)  # read -t on it is a sleep with no process to outlive us
  while kill -0 $$ 2>/dev/null; do
    # The key goes only where every listener on the port is the server's own.
    if gw_own_listener "$port" && now=$(gw_idle_poll "$host" "$port"); then
      read -r busy finished <<< "$now"
      if [ -z "$since" ] || [ "$busy" != 0 ] || [ "$finished" != "$last" ]; then
        since=$SECONDS last=$finished
      elif [ $(( SECONDS - since )) -ge "$limit" ]; then
        kill -USR1 $$
        return 0
      fi
    elif [ -z "$failed" ]; then
      failed=1
      echo "gateway: idle stop: cannot read the server's metrics on $host:$port;" \
        "it keeps trying, and the service runs on (said once)" >&2
    fi
    read -r -t "$period" -u "$nap" _ || :
  done
}
# Started once, by the first publish of an endpoint (gw_endpoint, or a recipe
# that sets GW_ENDPOINT and publishes starting or running itself).
gw_idle_start() {
  [ -n "$GW_IDLE_STOP_SECONDS" ] && [ -z "$GW_IDLE_WATCHER" ] && [ -n "$GW_ENDPOINT" ] || return 0
  case "$GW_PHASE" in starting | running) ;; *) return 0 ;; esac
  local host=${GW_ENDPOINT%:*}
  host=${host#\[} host=${host%\]}
  # A name (the node's): the server listens on every address; ask on loopback.
  case "$host" in *:*) ;; *[!0-9.]*) host=127.0.0.1 ;; esac
  gw_idle_watch "${GW_ENDPOINT##*:}" "$host" &
  GW_IDLE_WATCHER=$!
}
gw_idle_unwatch() {
  local pids
  trap '' USR1
  [ -n "$GW_IDLE_WATCHER" ] || return 0
  # The watcher and what it runs (a poll), so that nothing of it outlives the job.
  pids=$(gw_session_pids "$GW_IDLE_WATCHER")
  [ -z "$pids" ] || kill $pids 2>/dev/null || :
  GW_IDLE_WATCHER=
}
gw_idle_stopped() {
  local n=$GW_IDLE_STOP_SECONDS unit=" s"
  if [ $(( n % 60 )) -eq 0 ]; then n=$(( n / 60 )) unit=" min"; fi
  gw_phase completed "stopped itself after $n$unit without a request"
  gw_stop_server
  exit 0
}
# The gateway binds the metadata to this job's id with one update right after
# the submit; nothing is published before that, so that the job never writes
# its metadata unbound (a job whose create did not finish ends here).
gw_bind() {
  local out comment tries=0
  while [ "$tries" -lt __BIND_WAIT__ ]; do
    out=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null) || out=
    comment=${out#* Comment=}
    comment=${comment%%[ |]*}
    case "$comment" in
      "$GW_META".?*) GW_META=$comment; return 0 ;;
    esac
    sleep 1
    tries=$(( tries + 1 ))
  done
  echo "gateway: the gateway did not confirm this service within __BIND_WAIT__ s; ending" >&2
  exit 1
}
gw_bind
gw_phase building
"""


def build(recipe: Recipe, unbound_meta: str, context: Mapping[str, Any]) -> str:
    """``unbound_meta``: :meth:`MetaCodec.unbound`; the job reads the bound
    metadata from its own comment before it publishes anything."""
    values = {
        "__META__": quote(unbound_meta),
        "__BIND_WAIT__": str(BIND_WAIT_SECONDS),
        "__LIMIT__": str(metadata.COMMENT_LIMIT),
        "__REASON__": str(metadata.REASON_MAX),
    }
    # One pass, so that no value is read again as a placeholder.
    preamble = _PLACEHOLDER.sub(lambda m: values[m.group(0)], _PREAMBLE)
    if containers.is_container(recipe.spec.runtime):
        preamble += containers.preamble(recipe.spec.runtime)
    return f"{preamble}# --- recipe {recipe.name} ---\n{recipe.render(context)}"


def submission(
    recipe: Recipe,
    resources: Resources,
    *,
    unbound_meta: str,
    environment: Mapping[str, str],
    key: str,
    job_name: str,
    job_dir: str,
    partition: str | None,
    account: str | None,
    begin_time: int | None,
    idle_stop_seconds: int | None = None,
) -> JobSubmission:
    """The batch job of a service: its script, and the request's variables
    and the upstream key as its environment (never as script text).
    ``partition``: the site's, unless the recipe names one for these resources.
    ``idle_stop_seconds``: the job stops itself after so long without a request."""
    context = recipe.template_values(resources.as_config())
    own = {KEY_VARIABLE: key}
    if idle_stop_seconds:
        own[IDLE_VARIABLE] = str(idle_stop_seconds)
    return JobSubmission(
        script=build(recipe, unbound_meta, context),
        name=job_name,
        working_directory=job_dir,
        environment={"PATH": JOB_PATH, **environment, **own},
        partition=recipe.partition(resources) or partition,
        account=account,
        standard_output=f"{job_dir}/{job_name}-%j.out",
        standard_error=f"{job_dir}/{job_name}-%j.err",
        nodes=resources.nodes,
        cpus_per_task=resources.cpus,
        memory_per_node_mb=resources.memory_mb,
        time_limit_minutes=resources.time_limit_minutes,
        gpus_per_node=resources.gpus or None,
        comment=unbound_meta,
        begin_time=begin_time,
    )
