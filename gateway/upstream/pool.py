"""aiohttp's connection pool alone, for the data path (prompts and /v1): on
that path even httpx's request and response objects cost as much CPU as the
call itself (py-spy under wrk, bench/proxy.py). With whole requests'
deadlines, and each upstream's share of the pool."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiohttp
import aiohttp.abc
import aiohttp.payload

from gateway.transport import session


class TransportFailure(Exception):
    """A request that got no answer: ``timeout`` tells a slow peer from a gone
    one; ``unsent`` that no connection was made, so not a byte was sent."""

    def __init__(self, kind: str, *, timeout: bool, unsent: bool = False) -> None:
        super().__init__(kind)
        self.kind = kind
        self.timeout = timeout
        self.unsent = unsent


# A body past this is sent in two writes (see _Pieces).
_FIRST_WRITE = 64 * 1024


class _Pieces(aiohttp.payload.BytesPayload):
    """A big body sent as its first 64 KiB, then the rest, from the caller's
    buffer: aiohttp joins the headers to the first write (on Python before
    3.12.9), which for a body sent in one write was a copy of all of it, held
    until the service had read it."""

    async def write_with_length(
        self, writer: aiohttp.abc.AbstractStreamWriter, content_length: int | None
    ) -> None:
        view = memoryview(self._value)[:content_length]
        await writer.write(view[:_FIRST_WRITE])
        if len(view) > _FIRST_WRITE:
            await writer.write(view[_FIRST_WRITE:])


class Pool:
    """aiohttp's connection pool, without httpx on top: for the prompt path,
    where each request's objects count (see VllmClient).

    ``timeout`` for each read; a ``deadline`` (loop time) for the answer's
    headers, which an upstream could otherwise trickle a byte at a time for
    ever (its body's readers keep it too: gateway/upstream/answers.py). Each
    upstream (host and port) has at most
    ``max_per_host`` connections, so that one that never answers cannot take
    the others' (gateway/upstream/limits.py admits requests below these caps;
    ``wait`` bounds a wait for a pooled connection all the same).
    """

    def __init__(
        self,
        *,
        timeout: float,
        connect_timeout: float,
        max_connections: int,
        max_per_host: int = 0,
        wait: float | None = None,
    ) -> None:
        self._limit = max_connections
        self._per_host = max_per_host
        # Getting a connection: a wait for a pooled one, then connecting.
        acquire = connect_timeout + wait if wait is not None else timeout
        self._timeout = aiohttp.ClientTimeout(
            connect=acquire, sock_connect=connect_timeout, sock_read=timeout
        )
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Made on first use: a session belongs to the running event loop.
        if self._session is None:
            self._session = session(self._limit, self._timeout, self._per_host)
        return self._session

    async def open(
        self,
        method: str,
        url: str,
        *,
        content: bytes | bytearray | None = None,
        headers: Mapping[str, str] | None = None,
        deadline: float | None = None,
    ) -> aiohttp.ClientResponse:
        """The answer with its body unread: read it, then release (or close) it.
        A timeout while reading it raises TimeoutError."""
        data = _Pieces(content) if content and len(content) > _FIRST_WRITE else content
        request = self._client().request(
            method, url, data=data, headers=headers, allow_redirects=False
        )
        try:
            if deadline is None:
                return await request
            async with asyncio.timeout_at(deadline):
                return await request
        except aiohttp.ConnectionTimeoutError as exc:
            raise TransportFailure(type(exc).__name__, timeout=True, unsent=True) from exc
        except TimeoutError as exc:
            raise TransportFailure(type(exc).__name__, timeout=True) from exc
        except aiohttp.ClientConnectorError as exc:
            # Refused or unreachable: the connection never opened.
            raise TransportFailure(type(exc).__name__, timeout=False, unsent=True) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise TransportFailure(type(exc).__name__, timeout=False) from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
