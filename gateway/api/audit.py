"""One JSON line per state-changing request (create, stop), refused ones included.

Handlers mark their route with ``opt={"audit": "<action>"}`` and may name the
service they acted on with :func:`note`; this middleware, outside
authentication, writes the line once the answer's status is known::

    {"event": "audit", "action": "service.create", "tenant": "team-a",
     "slurm_user": "alice", "auth": "key", "credential": "benchmark-ci",
     "service_id": "4242", "outcome": "ok", "status": 201, "request_id": "..."}

The request id comes from the access log's context, like every other line.
"""

from __future__ import annotations

from typing import Any

import structlog
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from gateway.api import problems
from gateway.core.principal import Principal
from gateway.slurm import SlurmError

log = structlog.get_logger("gateway.audit")
_NOTE = "gateway.audit"


def note(scope: Scope | Any, **fields: Any) -> None:
    """What the handler adds to its request's audit line (a service id, a replay)."""
    state = scope.setdefault("state", {})
    state.setdefault(_NOTE, {}).update(fields)


def audit_middleware(app: ASGIApp) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        handler = scope.get("route_handler")
        action = handler.opt.get("audit") if handler is not None else None
        if action is None:
            await app(scope, receive, send)
            return
        status = 500

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app(scope, receive, watched)
        except Exception as exc:
            # Refused before the handler (authentication): the answer is made
            # by the exception handlers outside; its status is the exception's.
            _write(scope, action, _status_of(exc), getattr(exc, "principal", None))
            raise
        _write(scope, action, status)

    return middleware


def _status_of(exc: Exception) -> int:
    """The status the exception handlers answer it with."""
    if isinstance(exc, SlurmError):
        return problems.from_slurm_error(exc).status_code
    status = getattr(exc, "status_code", 500)
    return status if isinstance(status, int) else 500


def _write(scope: Scope, action: str, status: int, refused: Principal | None = None) -> None:
    principal = scope.get("user") or refused
    noted: dict[str, Any] = scope.get("state", {}).get(_NOTE, {})
    service_id = noted.pop("service_id", None) or scope.get("path_params", {}).get("service_id")
    who: dict[str, Any] = {"tenant": None, "slurm_user": None, "auth": None}
    if isinstance(principal, Principal):
        who = {
            "tenant": principal.tenant,
            "slurm_user": principal.slurm_user or None,
            "auth": principal.method.value,
            "credential": principal.label,
            "role": principal.role.value,
        }
    outcome = "ok" if status < 400 else "refused" if status < 500 else "failed"
    log.info(
        "audit",
        action=action,
        **who,
        service_id=str(service_id) if service_id is not None else None,
        outcome=outcome,
        status=status,
        method=scope.get("method"),
        **noted,
    )
