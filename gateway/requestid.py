"""The current request's id, set by the access log and read by outbound calls.

Its own module so that the upstream adapters need not import the access log.
"""

from __future__ import annotations

from contextvars import ContextVar

REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
