"""The HTTP transports under the gateway's calls to slurmrestd and to services.

Measured with bench/transport.py on this project's 2-core machine, 8
concurrent POSTs to a stub: httpx's default pool (httpcore over anyio) costs
about 0.8 ms of CPU per request and httpx's client layer 0.2 ms more
(cookies, redirects, URL merging: nothing the gateway uses); an httpx request
handed straight to a transport over aiohttp's connection pool about 0.25 ms.
So callers keep httpx's requests, responses and errors (and pytest-httpx, by
passing ``httpx.AsyncHTTPTransport()``) and skip the rest.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager

import aiohttp
import aiohttp.abc
import aiohttp.payload
import httpx
from aiohttp.client import DEFAULT_TIMEOUT

_USER_AGENT = "slurm-ai-gateway"


def session(
    limit: int,
    timeout: aiohttp.ClientTimeout | None = None,
    per_host: int = 0,
) -> aiohttp.ClientSession:
    """One connection pool; made on first use, as a session belongs to the
    running event loop."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, limit_per_host=per_host),
        cookie_jar=aiohttp.DummyCookieJar(),  # no cookies: nothing to parse or send
        auto_decompress=False,
        skip_auto_headers=("Accept-Encoding",),
        headers={"User-Agent": _USER_AGENT},
        timeout=timeout or DEFAULT_TIMEOUT,
    )


class AiohttpTransport(httpx.AsyncBaseTransport):
    """httpx requests over one aiohttp connection pool, aiohttp's failures
    raised as the httpx errors they are (a refused connection is a
    ConnectError, a dropped one a ReadError, only a timeout a timeout)."""

    def __init__(self, max_connections: int) -> None:
        self._limit = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Made on first use: a session belongs to the running event loop.
        if self._session is None:
            self._session = session(self._limit)
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout: dict[str, float | None] = request.extensions.get("timeout", {})
        with _as_httpx_errors(request):
            answer = await self._client().request(
                request.method,
                str(request.url),
                headers=request.headers.multi_items(),
                data=request.content or None,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    connect=timeout.get("pool"),
                    sock_connect=timeout.get("connect"),
                    sock_read=timeout.get("read"),
                ),
            )
        return httpx.Response(
            status_code=answer.status,
            headers=answer.raw_headers,
            stream=_Body(answer, request),
            request=request,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class _Body(httpx.AsyncByteStream):
    def __init__(self, answer: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._answer = answer
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _as_httpx_errors(self._request):
            async for chunk in self._answer.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        # Fully read: the connection goes back to the pool; otherwise it is closed.
        self._answer.release()


class DataAfterClose(httpx.RemoteProtocolError):
    """A whole answer came with ``Connection: close`` and then more bytes.

    slurmrestd 26.05 does this with every error answer: the JSON answer, then
    a second text/plain one on the same connection. aiohttp's parser refuses
    the lot; h11 (httpx's own transport) reads the first answer and stops.
    """


@contextmanager
def _as_httpx_errors(request: httpx.Request) -> Iterator[None]:
    try:
        yield
    except httpx.HTTPError:
        raise
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        error: type[httpx.TransportError]
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            error = httpx.ConnectTimeout
        elif isinstance(exc, asyncio.TimeoutError):
            error = httpx.ReadTimeout
        elif isinstance(exc, aiohttp.ClientConnectorError):
            error = httpx.ConnectError
        elif isinstance(exc, aiohttp.ClientResponseError):
            error = (
                DataAfterClose
                if str(exc.message).startswith("Data after `Connection: close`")
                else httpx.RemoteProtocolError
            )
        else:
            error = httpx.ReadError
        raise error(f"{type(exc).__name__}: {exc}", request=request) from exc


# Methods whose repetition does no more than their first run.
_REPEATABLE = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


class Outbound:
    """Sends ``httpx.Request``s to one base URL through one pooled transport."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float,
        connect_timeout: float,
        max_connections: int,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._transport = transport or AiohttpTransport(max_connections)
        # Whether the server sends bytes after a "Connection: close" answer
        # (DataAfterClose), which only aiohttp refuses; None: not known yet.
        self._trailing: bool | None = None if transport is None else False
        self._learning = asyncio.Lock()
        # The h11 transport for such a server, made on first need.
        self._lenient: httpx.AsyncHTTPTransport | None = None
        # httpx's transports read their timeouts from the request.
        self._extensions = {
            "timeout": {
                "connect": connect_timeout,
                "read": timeout,
                "write": timeout,
                "pool": timeout,
            }
        }
        self._headers = dict(headers or {})
        self._urls: dict[str, httpx.URL] = {}

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """The whole answer, read. Raises httpx's TransportError family."""
        request = httpx.Request(
            method,
            self._url(path),
            params=params,
            content=content,
            headers={**self._headers, **(headers or {})},
            extensions=self._extensions,
        )
        repeatable = method in _REPEATABLE
        if not repeatable:
            # A submit must never be sent twice: to a server that may answer
            # in a way aiohttp refuses, it goes through h11 from the start.
            if self._trailing is None:
                await self._learn()
            if self._trailing:
                return await self._read(self._h11(), request)
        try:
            return await self._read(self._transport, request)
        except DataAfterClose:
            self._trailing = True
            if not repeatable:
                raise httpx.RemoteProtocolError(
                    "the answer had bytes after 'Connection: close' and could not be "
                    f"read; {method} not sent again, as the server may have carried it out",
                    request=request,
                ) from None
            # The answer arrived whole and was lost to the trailing bytes: ask
            # again through h11, which stops after the first answer.
            return await self._read(self._h11(), request)

    def _url(self, path: str) -> httpx.URL:
        """Parsed once per URL: parsing is a tenth of a proxied prompt's CPU."""
        url = self._urls.get(path)
        if url is None:
            if len(self._urls) >= 4096:
                self._urls.clear()
            url = self._urls[path] = httpx.URL(self.base_url + path)
        return url

    async def _learn(self) -> None:
        """Find out, with one GET of the root (which slurmrestd refuses without
        a token), whether the server sends bytes after a closing answer."""
        async with self._learning:
            if self._trailing is not None:
                return
            probe = httpx.Request("GET", self.base_url + "/", extensions=self._extensions)
            try:
                await self._read(self._transport, probe)
                self._trailing = False
            except DataAfterClose:
                self._trailing = True
            except httpx.TransportError:
                pass  # learnt next time; the request itself fails on its own

    def _h11(self) -> httpx.AsyncHTTPTransport:
        if self._lenient is None:
            self._lenient = httpx.AsyncHTTPTransport()
        return self._lenient

    @staticmethod
    async def _read(transport: httpx.AsyncBaseTransport, request: httpx.Request) -> httpx.Response:
        response = await transport.handle_async_request(request)
        response.request = request
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    async def aclose(self) -> None:
        await self._transport.aclose()
        if self._lenient is not None:
            await self._lenient.aclose()
