"""OpenAI's Responses API with state, across services and gateway replicas.

A stored response lives in the vLLM process that made it (its response store
is in memory), so a request about it must reach that process. The gateway
names each response itself, and the name says where it lives: vLLM takes a
response's id from the body's ``request_id``, which the gateway sets to
``resp_<service id>_<32 hex digits>`` once it has picked the service. A
request naming such an id (``previous_response_id`` in a new one,
``GET /v1/responses/{id}``, its cancel) goes to that service, from any
replica, with nothing remembered; when that service has ended or is not the
caller's to use, it is a 404 naming the id.
"""

from __future__ import annotations

import re
import secrets

from gateway.core.errors import NotFound
from gateway.core.principal import Principal
from gateway.core.routing import ModelRouter
from gateway.core.services import Service

CREATE_PATH = "/v1/responses"
_ID = re.compile(r"resp_([A-Za-z0-9.-]{1,64})_[0-9a-f]{32}")


class ResponseNotFound(NotFound):
    """A response id no running service the caller may use holds."""

    def __init__(self, detail: str, param: str) -> None:
        super().__init__(detail)
        self.param = param
        self.code = "response_not_found"


def new_id(service_id: str) -> str:
    return f"resp_{service_id}_{secrets.token_hex(16)}"


def holder(response_id: str) -> str | None:
    """The service id a response id of the gateway's names; None for any other."""
    found = _ID.fullmatch(response_id)
    return found.group(1) if found else None


def stamped(body: bytes | bytearray, response_id: str) -> bytes:
    """``body`` (a JSON object) with ``request_id`` set last: JSON's last
    duplicate wins, so one the client sent gives way."""
    inner = bytes(body).rstrip()[:-1].rstrip()
    comma = b"" if inner.endswith(b"{") else b","
    return b'%s%s"request_id":"%s"}' % (inner, comma, response_id.encode("ascii"))


async def holding(
    router: ModelRouter, principal: Principal, response_id: str, model: str | None
) -> Service:
    """The running service that holds ``response_id`` (serving ``model``, if
    given), if the caller may use it; ResponseNotFound otherwise."""
    param = "previous_response_id" if model is not None else "response_id"
    service_id = holder(response_id)
    if service_id is None:
        raise ResponseNotFound(
            f"response {response_id[:100]!r} was not made through this gateway", param
        )
    found = await router.holding(principal, service_id, model)
    if found is None:
        raise ResponseNotFound(
            f"response {response_id[:100]!r} is gone: service {service_id}, which held it, "
            f"has ended{'' if model is None else f' or does not serve {model[:100]!r}'}, "
            "or is not yours to use",
            param,
        )
    return found
