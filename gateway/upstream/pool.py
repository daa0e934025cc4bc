"""Kept-alive connections to the services (gateway/upstream/http1.py), for the
data path (prompts and /v1) and the probes: bounded in all and per service,
with whole requests' deadlines."""

from __future__ import annotations

import asyncio
import math
import ssl
from collections import deque
from collections.abc import Mapping
from urllib.parse import urlsplit

from gateway.upstream.http1 import Connection

_USER_AGENT = b"slurm-ai-gateway"
# A connection idle this long is not reused: the service may close it at any
# moment (uvicorn, under vLLM, does after 5 s), and a request sent as it does
# is lost.
IDLE_REUSE = 3.0


class TransportFailure(Exception):
    """A request that got no answer: ``timeout`` tells a slow peer from a gone
    one; ``unsent`` that no connection was made, so not a byte was sent."""

    def __init__(self, kind: str, *, timeout: bool, unsent: bool = False) -> None:
        super().__init__(kind)
        self.kind = kind
        self.timeout = timeout
        self.unsent = unsent


class Response:
    """An answer whose body is still to be read: ``read`` it, then ``release``
    (or ``close``) it."""

    __slots__ = ("_connection", "_timeout", "content_length", "content_type", "loop", "status")

    def __init__(self, connection: Connection, timeout: float) -> None:
        self._connection = connection
        # Kept: asyncio.get_running_loop() costs a getpid() system call each time.
        self.loop = connection.loop
        self._timeout = timeout
        self.status = connection.status
        self.content_type = connection.content_type
        self.content_length = connection.content_length

    async def read(self, deadline: float = math.inf) -> bytes:
        """What has come of the body since the last read; b"" at its end.
        TimeoutError when nothing comes for the pool's ``timeout``, or at
        ``deadline`` (loop time); an OSError when the service breaks off."""
        return await self._connection.read(self._timeout, deadline)

    def release(self) -> None:
        self._connection.release()

    def close(self) -> None:
        self._connection.close()


class _Target:
    """What a URL's requests need, split once (URLs repeat: a service's routes)."""

    __slots__ = ("host", "key", "port", "prefix", "tls")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise TransportFailure(f"unusable URL {url[:100]!r}", timeout=False, unsent=True)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.key = f"{parts.scheme}://{self.host}:{self.port}"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = parts.netloc.rpartition("@")[2]
        # The start of every request to this URL: the request line and Host.
        self.prefix = b"%s HTTP/1.1\r\nHost: %s\r\nUser-Agent: %s\r\n" % (
            path.encode("ascii", "strict"),
            host.encode("ascii", "strict"),
            _USER_AGENT,
        )


class Pool:
    """Connections kept alive per service (host and port): at most
    ``max_connections`` in all and ``max_per_host`` to one (0: no bound
    of its own), so that one that never answers cannot take the others'
    (gateway/upstream/limits.py admits requests below these caps; ``wait``
    bounds a wait for a free connection all the same).

    ``timeout`` for each read; a ``deadline`` (loop time) for the answer's
    headers, which an upstream could otherwise trickle a byte at a time for
    ever (its body's readers keep it too: gateway/upstream/answers.py)."""

    def __init__(
        self,
        *,
        timeout: float,
        connect_timeout: float,
        max_connections: int,
        max_per_host: int = 0,
        wait: float | None = None,
    ) -> None:
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._wait = wait if wait is not None else timeout
        self._limit = max_connections
        self._per_host = max_per_host or max_connections
        self._idle: dict[str, list[Connection]] = {}
        self._open: dict[str, int] = {}
        self._total = 0
        self._waiting: deque[tuple[str, asyncio.Future[Connection | None]]] = deque()
        self._targets: dict[str, _Target] = {}
        self._tls: ssl.SSLContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the one its connections are of

    async def open(
        self,
        method: str,
        url: str,
        *,
        content: bytes | bytearray | None = None,
        headers: Mapping[str, str] | None = None,
        deadline: float | None = None,
    ) -> Response:
        """The answer with its body unread: read it, then release (or close) it."""
        target = self._target(url)
        head = bytearray(method.encode("ascii"))
        head += b" "
        head += target.prefix
        for name, value in (headers or {}).items():
            if "\r" in value or "\n" in value:
                broken = f"header {name} has a line break"
                raise TransportFailure(broken, timeout=False, unsent=True)
            head += b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1"))
        if content is not None or method in ("POST", "PUT", "PATCH"):
            head += b"Content-Length: %d\r\n" % len(content or b"")
        head += b"\r\n"
        loop = self._loop
        if loop is None:
            # Kept: asyncio.get_running_loop() costs a getpid() system call each time.
            loop = self._loop = asyncio.get_running_loop()
        connection = await self._acquire(target, loop)
        try:
            await connection.send(bytes(head), content)
            await connection.headers(self._timeout, deadline if deadline is not None else 1e308)
        except TimeoutError as exc:
            connection.close()
            raise TransportFailure("TimeoutError", timeout=True) from exc
        except OSError as exc:
            connection.close()
            raise TransportFailure(type(exc).__name__, timeout=False) from exc
        except BaseException:
            connection.close()  # cancelled: the service must not go on with it
            raise
        return Response(connection, self._timeout)

    async def aclose(self) -> None:
        for idle in list(self._idle.values()):
            for connection in list(idle):
                connection.close()
        for _, waiter in self._waiting:
            if not waiter.done():
                waiter.cancel()

    # -- connections ------------------------------------------------------------------

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            try:
                target = _Target(url)
            except (ValueError, UnicodeError) as exc:
                raise TransportFailure(f"unusable URL: {exc}", timeout=False, unsent=True) from exc
            if len(self._targets) >= 4096:
                self._targets.clear()  # services come and go
            self._targets[url] = target
        return target

    async def _acquire(self, target: _Target, loop: asyncio.AbstractEventLoop) -> Connection:
        key = target.key
        idle = self._idle.get(key)
        now = loop.time()
        while idle:
            connection = idle.pop()  # the most recently used: the likeliest alive
            if now - connection.idle_since < IDLE_REUSE and not connection.closed:
                return connection
            connection.close()
        if not self._room(key):
            self._free_idle_elsewhere(key)
        if not self._room(key):
            waiter: asyncio.Future[Connection | None] = loop.create_future()
            entry = (key, waiter)
            self._waiting.append(entry)
            try:
                async with asyncio.timeout(self._wait + self._connect_timeout):
                    handed = await waiter
            except BaseException as exc:
                if entry in self._waiting:
                    self._waiting.remove(entry)
                elif waiter.done() and not waiter.cancelled():
                    self._pass_on(waiter.result())  # given as this one gave up
                if isinstance(exc, TimeoutError):
                    raise TransportFailure("PoolTimeout", timeout=True, unsent=True) from exc
                raise
            if handed is not None:
                return handed
        self._open[key] = self._open.get(key, 0) + 1
        self._total += 1
        try:
            return await self._connect(target, loop)
        except BaseException:
            self._gone(key)
            raise

    async def _connect(self, target: _Target, loop: asyncio.AbstractEventLoop) -> Connection:
        tls: ssl.SSLContext | None = None
        if target.tls:
            tls = self._tls = self._tls or ssl.create_default_context()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: Connection(target.key, self._freed),
                    target.host,
                    target.port,
                    ssl=tls,
                )
        except TimeoutError as exc:
            raise TransportFailure("ConnectionTimeoutError", timeout=True, unsent=True) from exc
        except OSError as exc:
            # Refused or unreachable: the connection never opened.
            raise TransportFailure(type(exc).__name__, timeout=False, unsent=True) from exc
        return connection

    def _room(self, key: str) -> bool:
        return self._total < self._limit and self._open.get(key, 0) < self._per_host

    def _free_idle_elsewhere(self, key: str) -> None:
        """At the bound in all: an idle connection to another service makes room."""
        if self._total < self._limit:
            return
        for other, idle in self._idle.items():
            if other != key and idle:
                idle.pop(0).close()
                return

    def _freed(self, connection: Connection, reusable: bool) -> None:
        """A connection's answer ended (``reusable``: kept alive), or it closed."""
        key = connection.key
        if reusable:
            for entry in self._waiting:
                if entry[0] == key and not entry[1].done():
                    self._waiting.remove(entry)
                    entry[1].set_result(connection)  # handed over as it is
                    return
            self._idle.setdefault(key, []).append(connection)
            return
        idle = self._idle.get(key)
        if idle and connection in idle:
            idle.remove(connection)
        self._gone(key)

    def _pass_on(self, handed: Connection | None) -> None:
        if handed is not None:
            self._freed(handed, True)
        else:
            self._make_room()

    def _gone(self, key: str) -> None:
        left = self._open.get(key, 1) - 1
        if left:
            self._open[key] = left
        else:
            self._open.pop(key, None)
            self._idle.pop(key, None)
        self._total -= 1
        self._make_room()

    def _make_room(self) -> None:
        """Room for one more connection: the first waiter that it fits."""
        for entry in self._waiting:
            if not entry[1].done() and self._room(entry[0]):
                self._waiting.remove(entry)
                entry[1].set_result(None)
                return
