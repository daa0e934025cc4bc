"""A streamed response that always closes its source.

When a client goes away, Litestar cancels the task that iterates the stream.
If that happens while a chunk is being sent, the source async generator is
left suspended at its ``yield`` and is only closed whenever it is garbage
collected, so an upstream connection behind it stays open and vLLM goes on
generating for nobody. This response closes the source as soon as sending ends,
however it ends.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import anyio
from litestar.response import Stream
from litestar.response.base import ASGIResponse
from litestar.response.streaming import ASGIStreamingResponse
from litestar.types import Receive, Send


class _ClosingASGIStreamingResponse(ASGIStreamingResponse):
    __slots__ = ()

    async def send_body(self, send: Send, receive: Receive) -> None:
        try:
            await super().send_body(send, receive)
        finally:
            source = self.iterator
            if isinstance(source, AsyncGenerator):
                with anyio.CancelScope(shield=True):
                    await source.aclose()


class ClosingStream(Stream):
    """``Stream`` over an async generator that is closed when sending ends."""

    def __init__(self, source: AsyncGenerator[bytes, None], **kwargs: Any) -> None:
        super().__init__(source, **kwargs)

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIResponse:
        response = super().to_asgi_response(*args, **kwargs)
        if type(response) is ASGIStreamingResponse:
            # Same slots, one more behaviour: swapping the class is enough.
            response.__class__ = _ClosingASGIStreamingResponse
        return response
