"""Answers relayed as they come: a stream's events (``relay``), a whole
answer's pieces (``passed_on``), and the token usage read from vLLM's answers
as they pass, into the token metrics.

Answers are relayed as they arrive, so usage is read on the way: from a
stream's whole events (``SseUsage``) and from the top-level ``usage`` of a
JSON answer (``AnswerUsage``). Each byte is looked at a bounded number of
times: a relayed stream of 1-byte reads once cost a copy of up to 64 KiB per
read.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator

import anyio
import msgspec

from gateway.metrics import PROMPT_TOKENS, PROMPTS, series
from gateway.upstream.answers import UpstreamError, UpstreamUnavailable
from gateway.upstream.limits import Lease


async def relay(
    first: bytes,
    chunks: AsyncGenerator[bytes, None],
    lease: Lease | None = None,
    *,
    metered: bool = True,
) -> AsyncGenerator[bytes, None]:
    """The chunks as they come; a failure after the headers ends the stream
    with an error event. Closing it closes the upstream (vLLM then aborts),
    and ``lease`` if given. ``metered``: whether its usage counts."""
    result = "client_gone"  # unless the stream ends
    usage = SseUsage() if metered else UNMETERED
    try:
        yield first
        usage.feed(first)
        async for chunk in chunks:
            yield chunk
            usage.feed(chunk)
            # When vLLM is ahead of us every read returns at once and this
            # loop never lets the event loop run, so nobody would notice a
            # client that went away until vLLM had finished. Yield to it.
            await asyncio.sleep(0)
        result = "ok"
    except (UpstreamError, UpstreamUnavailable) as exc:
        result = outcome(exc)
        error = {"error": {"message": str(exc), "type": "upstream_error"}}
        yield b"event: error\ndata: " + msgspec.json.encode(error) + b"\n\n"
    finally:
        series(PROMPTS, "true", result).inc()
        # Shielded: after a client left this runs in a cancelled anyio scope
        # (Litestar's streaming), where an await would be cancelled at once.
        with anyio.CancelScope(shield=True):
            await chunks.aclose()
        if lease is not None:
            lease.close()


async def passed_on(
    first: bytes, chunks: AsyncGenerator[bytes, None], *, metered: bool = True
) -> AsyncGenerator[bytes, None]:
    """A whole answer's pieces as they come, its usage read on the way (when
    ``metered``)."""
    outcome = "client_gone"  # unless it ends
    usage = AnswerUsage() if metered else UNMETERED
    try:
        usage.feed(first)
        yield first
        async for chunk in chunks:
            usage.feed(chunk)
            yield chunk
        outcome = "ok"
        usage.finish()
    except UpstreamError:
        outcome = "upstream_error"
        raise
    except UpstreamUnavailable as exc:
        outcome = "timeout" if exc.timeout else "unreachable"
        raise
    finally:
        series(PROMPTS, "false", outcome).inc()


def outcome(exc: Exception) -> str:
    """The prompt metric's outcome of an upstream failure."""
    if isinstance(exc, UpstreamUnavailable):
        return "timeout" if exc.timeout else "unreachable"
    return "upstream_error"


# More tokens than any answer has: an upstream saying so is not believed.
_MOST_TOKENS = 1 << 30


def count_tokens(prompt: int | None, completion: int | None) -> None:
    if prompt is not None and 0 < prompt < _MOST_TOKENS:
        series(PROMPT_TOKENS, "prompt").inc(prompt)
    if completion is not None and 0 < completion < _MOST_TOKENS:
        series(PROMPT_TOKENS, "completion").inc(completion)


class _Usage(msgspec.Struct):
    # OpenAI's chat and completions name them so; its Responses API and
    # Anthropic's Messages API name them input and output. Anthropic's input
    # leaves out the cached prompt tokens, counted apart.
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None

    def count(self) -> None:
        prompt = self.prompt_tokens
        if prompt is None and self.input_tokens is not None:
            prompt = self.input_tokens
            for cached in (self.cache_read_input_tokens, self.cache_creation_input_tokens):
                if cached is not None and cached > 0:
                    prompt += cached
        count_tokens(prompt, self.completion_tokens or self.output_tokens)


class _Response(msgspec.Struct):
    usage: _Usage | None = None


class _UsageChunk(msgspec.Struct):
    usage: _Usage | None = None
    # A Responses stream's last event (response.completed) holds the response.
    response: _Response | None = None


_read_usage = msgspec.json.Decoder(_UsageChunk).decode


def count_usage(answer: bytes | bytearray) -> None:
    """Tokens of a whole answer (its top-level ``usage``), or of a stream's
    event (a Responses stream's in its ``response``), if it has them. An
    Anthropic stream's message_start has them in ``message``, its last event
    (message_delta) again, in all: only the last is counted."""
    if b'"usage"' not in answer:
        return
    try:
        chunk = _read_usage(answer)
    except msgspec.DecodeError:  # ValidationError included
        return
    usage = chunk.usage or (chunk.response.usage if chunk.response else None)
    if usage is not None:
        usage.count()


class _Unmetered:
    """In place of a usage reader where an answer's tokens do not count."""

    @staticmethod
    def feed(chunk: bytes) -> None:
        pass

    @staticmethod
    def finish() -> None:
        pass


UNMETERED = _Unmetered()

_END = b"\n\n"


class SseUsage:
    """Usage of a stream, from whole events only: a read may end inside one
    (seen when vLLM's last event crosses a TCP segment), so the start of an
    event is kept until its end comes. Almost every read ends an event, and
    then costs a search for the usage key. ``copied`` counts the bytes kept."""

    LIMIT = 1 << 16  # an event longer than any usage event is not kept

    __slots__ = ("_held", "_newline", "_skipping", "copied")

    def __init__(self) -> None:
        self._held = bytearray()  # the start of an event whose end has not come
        self._skipping = False  # inside an event over LIMIT: dropped to its end
        self._newline = False  # the last byte fed was "\n"
        self.copied = 0

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        start = 0
        if self._held or self._skipping:
            if self._newline and chunk[0] == 10:  # "\n\n" across the two reads
                end = 1
            else:
                end = chunk.find(_END)
                if end < 0:
                    self._keep(chunk, 0)
                    return
                end += 2
            if not self._skipping:
                self._held += memoryview(chunk)[:end]
                self.copied += end
                _usage_in(self._held)
            self._held.clear()
            self._skipping = False
            start = end
        if chunk.endswith(_END):
            _usage_in(chunk, start)
            return
        last = chunk.rfind(_END, start)
        if last >= 0:
            _usage_in(chunk, start, last + 2)
            start = last + 2
        self._keep(chunk, start)

    def _keep(self, chunk: bytes, start: int) -> None:
        self._newline = chunk[-1] == 10
        if self._skipping:
            return
        size = len(chunk) - start
        if len(self._held) + size > self.LIMIT:
            self._held.clear()
            self._skipping = True
            return
        self._held += memoryview(chunk)[start:]
        self.copied += size


def _usage_in(data: bytes | bytearray, start: int = 0, end: int | None = None) -> None:
    """Tokens from the events in ``data[start:end]`` that report usage (vLLM
    sends one, last, when asked to); others cost one substring search."""
    stop = len(data) if end is None else end
    if data.find(b'"usage":{', start, stop) < 0 and data.find(b'"usage": {', start, stop) < 0:
        return
    for event in data[start:stop].split(_END):
        count_usage(event.partition(b"data: ")[2])


_KEY = b'"usage"'


class AnswerUsage:
    """The top-level ``usage`` of a JSON answer read piece by piece.

    vLLM puts it after the choices. A key in JSON text cannot be inside a
    string (its quotes would be escaped), and only the top level has one, so
    the last ``"usage"`` is it: up to ``KEEP`` bytes from there are kept, and
    its object decoded once the answer is whole.
    """

    KEEP = 1024

    __slots__ = ("_edge", "_found")

    def __init__(self) -> None:
        self._found = bytearray()
        self._edge = b""  # the last bytes of the previous read: a key may straddle two

    def feed(self, chunk: bytes) -> None:
        at = chunk.rfind(_KEY)
        if at >= 0:
            self._found = bytearray(chunk[at : at + self.KEEP])
        else:
            straddling = self._edge + chunk[: len(_KEY) - 1]
            across = straddling.rfind(_KEY)
            if across >= 0:
                self._found = bytearray(straddling[across:])
                self._found += chunk[len(_KEY) - 1 : self.KEEP]
            elif self._found and len(self._found) < self.KEEP:
                self._found += chunk[: self.KEEP - len(self._found)]
        self._edge = (self._edge + chunk[-(len(_KEY) - 1) :])[-(len(_KEY) - 1) :]

    def finish(self) -> None:
        """Counts the tokens, if the answer had usage."""
        text = bytes(self._found[len(_KEY) :]).lstrip()
        if not text.startswith(b":"):
            return
        try:
            usage, _ = json.JSONDecoder().raw_decode(text[1:].lstrip().decode(errors="replace"))
            counts = msgspec.convert(usage, _Usage)
        except (ValueError, msgspec.ValidationError):
            return
        counts.count()
