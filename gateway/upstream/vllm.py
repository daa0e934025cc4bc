"""Client of vLLM's OpenAI-compatible server: models, prompts, streamed prompts.

A prompt goes to ``/v1/chat/completions`` when the model has a chat template
and to ``/v1/completions`` otherwise. Which one works is learnt from vLLM's
answer (a 400 naming the chat template) and remembered per service and model
(the most recently used few thousand), so the fallback costs one extra
request once, not on every prompt.

Streams are passed through as vLLM sends them, chunk by chunk.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections import OrderedDict
from collections.abc import AsyncGenerator
from typing import Any, Literal

import msgspec

from gateway.requestid import REQUEST_ID
from gateway.upstream.answers import (
    SMALL_ANSWER,
    Answer,
    Opened,
    UpstreamError,
    UpstreamUnavailable,
    iter_chunks,
    message_of,
    read_all,
)
from gateway.upstream.limits import Lease, Limits
from gateway.upstream.pool import Pool, Response, TransportFailure
from gateway.upstream.vllm_metrics import METRICS_ANSWER, Load, parse

Api = Literal["chat", "completions"]
# The most a completion may take (max_tokens is the model's business).
LARGE_ANSWER = 64 * 1024 * 1024
# Services and models whose API (chat or completions) is remembered.
_REMEMBERED = 4096
# What makes each request id sent unique: this process's own random prefix
# (replicas and workers differ) and a count (a random suffix a request, read
# from the kernel, was 3 % of a proxied request's CPU).
_SUFFIX = secrets.token_hex(3)
_SENT = itertools.count()


class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class _Message(msgspec.Struct, frozen=True):
    content: str | None = None


class _Choice(msgspec.Struct, frozen=True):
    text: str | None = None
    message: _Message | None = None
    finish_reason: str | None = None


class _Completion(msgspec.Struct, frozen=True):
    model: str = ""
    choices: list[_Choice] = []
    usage: Usage | None = None


class ModelCard(msgspec.Struct, frozen=True):
    """A model as vLLM's ``/v1/models`` lists it (the fields the gateway uses)."""

    id: str
    max_model_len: int | None = None


class _Models(msgspec.Struct, frozen=True):
    data: list[ModelCard] = []


class Completion(msgspec.Struct, frozen=True, kw_only=True):
    text: str
    model: str
    finish_reason: str | None
    usage: Usage
    api: Api


class Prompt(msgspec.Struct, frozen=True, kw_only=True):
    prompt: str
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None


class VllmClient:
    """On the data path's own connection pool (gateway/upstream/pool.py): on
    the prompt path httpx's and then aiohttp's request and response objects
    cost as much CPU as the call itself (py-spy under wrk, bench/proxy.py)."""

    def __init__(
        self,
        *,
        timeout: float = 120.0,
        connect_timeout: float = 3.0,
        stream_timeout: float = 3600.0,
        limits: Limits | None = None,
    ) -> None:
        self.limits = limits or Limits()
        # A whole answer's time, and a stream's (each read gets ``timeout``).
        self._timeout = timeout
        self._stream_timeout = stream_timeout
        self._http = Pool(
            timeout=timeout,
            connect_timeout=connect_timeout,
            max_connections=self.limits.total,
            max_per_host=self.limits.per_service,
            wait=self.limits.wait,
        )
        self._api = _Apis(_REMEMBERED)
        self._loop: asyncio.AbstractEventLoop | None = None

    async def aclose(self) -> None:
        await self._http.aclose()

    async def models(self, endpoint: str, key: str | None = None) -> list[str]:
        return [card.id for card in await self.model_cards(endpoint, key)]

    async def model_cards(self, endpoint: str, key: str | None = None) -> list[ModelCard]:
        answer = await self._request("GET", f"{endpoint}/v1/models", key, limit=SMALL_ANSWER)
        _raise_for_status(answer)
        try:
            return msgspec.json.decode(answer.content, type=_Models).data
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
            raise UpstreamError(502, "vLLM's /v1/models answer is not a model list") from None

    async def load(self, endpoint: str, key: str | None = None) -> Load:
        """What vLLM's ``/metrics`` says it is doing: requests running and waiting."""
        answer = await self._request("GET", f"{endpoint}/metrics", key, limit=METRICS_ANSWER)
        _raise_for_status(answer)
        if answer.status >= 300:
            raise UpstreamError(502, f"vLLM's /metrics answered HTTP {answer.status}")
        try:
            return parse(answer.content.decode("utf-8", errors="replace"))
        except ValueError as exc:
            raise UpstreamError(502, f"vLLM's /metrics answer is unusable: {exc}") from None

    async def forward(
        self,
        endpoint: str,
        path: str,
        body: bytes | bytearray,
        key: str | None = None,
        stream: bool = False,
        method: str = "POST",
        headers: dict[str, str] | None = None,
    ) -> Opened:
        """``body`` POSTed to ``path`` as it came (the OpenAI front door), or
        nothing with another ``method``; the answer with its body unread: read
        it by its deadline, then release or close it."""
        deadline = self._deadline(stream)
        content = body if method == "POST" else None
        answer = await self._start(
            method, endpoint + path, key, content=content, deadline=deadline, headers=headers
        )
        return Opened(answer, deadline)

    async def ready(self, endpoint: str, model: str | None = None, key: str | None = None) -> bool:
        """``/health`` answers and ``/v1/models`` lists ``model`` (any, if None)."""
        try:
            health = await self._request("GET", f"{endpoint}/health", key, limit=SMALL_ANSWER)
            if health.status != 200:
                return False
            served = await self.models(endpoint, key)
        except (UpstreamError, UpstreamUnavailable):
            return False
        return model in served if model else bool(served)

    async def complete(
        self,
        endpoint: str,
        prompt: Prompt,
        key: str | None = None,
        *,
        service: str | None = None,
        lease: Lease | None = None,
        tenant: str | None = None,
    ) -> Completion:
        """The whole answer. With ``lease``, a slot at the upstream for
        ``tenant`` while it is asked, and its bytes held on the lease (the
        caller's to close once it has answered)."""
        remembered = (service or endpoint, prompt.model)
        api = self._api.get(remembered)
        if lease is not None:
            await lease.admit(endpoint, tenant)
        try:
            answer = await self._request(
                "POST", _url(endpoint, api), key, _body(api, prompt, False), lease=lease
            )
            if api == "chat" and _no_chat_template(answer):
                api = "completions"
                answer = await self._request(
                    "POST", _url(endpoint, api), key, _body(api, prompt, False), lease=lease
                )
        finally:
            if lease is not None:
                lease.leave()
        _raise_for_status(answer)
        self._api.learn(remembered, api)
        try:
            body = msgspec.json.decode(answer.content, type=_Completion)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
            raise UpstreamError(502, "vLLM's completion is not in the OpenAI shape") from None
        choice = body.choices[0] if body.choices else _Choice()
        text = (choice.message.content if choice.message else choice.text) or ""
        return Completion(
            text=text,
            model=body.model or prompt.model,
            finish_reason=choice.finish_reason,
            usage=body.usage or Usage(),
            api=api,
        )

    async def stream(
        self,
        endpoint: str,
        prompt: Prompt,
        key: str | None = None,
        *,
        service: str | None = None,
        lease: Lease | None = None,
        tenant: str | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """vLLM's SSE bytes, as they arrive. Closing the iterator (a client that
        went away) closes the upstream connection, which makes vLLM abort.
        With ``lease``, a slot at the upstream for ``tenant`` until then."""
        remembered = (service or endpoint, prompt.model)
        api = self._api.get(remembered)
        if lease is not None:
            await lease.admit(endpoint, tenant)
        try:
            deadline = self._deadline(stream=True)
            response = await self._start(
                "POST", _url(endpoint, api), key, _body(api, prompt, True), deadline=deadline
            )
            if api == "chat" and response.status == 400:
                refused = await read_all(response, lease=lease, deadline=deadline)
                if not _no_chat_template(refused):
                    _raise_for_status(refused)
                api = "completions"
                response = await self._start(
                    "POST", _url(endpoint, api), key, _body(api, prompt, True), deadline=deadline
                )
            if response.status >= 400:
                _raise_for_status(await read_all(response, lease=lease, deadline=deadline))
            self._api.learn(remembered, api)
            async for chunk in iter_chunks(response, deadline):
                yield chunk
        finally:
            # Here, not in the caller: this runs however the stream ends,
            # even when nobody started relaying it (then once it is collected).
            if lease is not None:
                lease.leave()

    async def _start(
        self,
        method: str,
        url: str,
        key: str | None,
        body: dict[str, Any] | None = None,
        *,
        content: bytes | bytearray | None = None,
        deadline: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        """The answer's status and headers (by ``deadline``, loop time); its
        body still to be read. ``headers``: the client's, passed on."""
        headers = {**headers, **(auth_headers(key) or {})} if headers else auth_headers(key) or {}
        request_id = REQUEST_ID.get()
        if request_id is not None:
            # vLLM takes it as its engine's request id, and older releases
            # refuse a second one in flight: unique, found by its prefix.
            headers["X-Request-ID"] = f"{request_id}-{_SUFFIX}{next(_SENT):x}"
        if body is not None:
            content = msgspec.json.encode(body)
        if content is not None:
            headers.setdefault("Content-Type", "application/json")
        try:
            return await self._http.open(
                method, url, content=content, headers=headers, deadline=deadline
            )
        except TransportFailure as exc:
            if exc.timeout:
                raise UpstreamUnavailable(
                    "vLLM did not answer in time", timeout=True, unsent=exc.unsent
                ) from None
            raise UpstreamUnavailable(
                f"vLLM is unreachable: {exc.kind}", unsent=exc.unsent
            ) from None

    async def _request(
        self,
        method: str,
        url: str,
        key: str | None,
        body: dict[str, Any] | None = None,
        *,
        limit: int = LARGE_ANSWER,
        lease: Lease | None = None,
    ) -> Answer:
        """The whole answer within the time for one, up to ``limit`` bytes and
        within the memory budget (on ``lease``, else only while it is read):
        whatever listens on an endpoint is a job's, and must not make the
        gateway hold gigabytes, or wait for ever."""
        own = self.limits.lease() if lease is None else None
        # Its deadline in the reads themselves: asyncio.timeout_at around them
        # cost 7 % of a prompt's CPU (py-spy under wrk).
        deadline = self._deadline(stream=False)
        try:
            answer = await self._start(method, url, key, body, deadline=deadline)
            return await read_all(answer, limit, lease or own, deadline)
        finally:
            if own is not None:
                own.close()

    def _deadline(self, stream: bool) -> float:
        seconds = self._stream_timeout if stream else self._timeout
        loop = self._loop
        if loop is None:
            # Kept: asyncio.get_running_loop() costs a getpid() system call each time.
            loop = self._loop = asyncio.get_running_loop()
        return loop.time() + seconds


class _Apis:
    """Which API works for a service's model: "chat" unless learnt otherwise;
    the least recently used forgotten past ``size`` (a caller names models)."""

    __slots__ = ("_known", "_size")

    def __init__(self, size: int) -> None:
        self._size = size
        # Only the exceptions are kept: models without a chat template.
        self._known: OrderedDict[tuple[str, str], Api] = OrderedDict()

    def get(self, key: tuple[str, str]) -> Api:
        api = self._known.get(key)
        if api is None:
            return "chat"
        self._known.move_to_end(key)
        return api

    def learn(self, key: tuple[str, str], api: Api) -> None:
        if api == "chat":
            self._known.pop(key, None)
            return
        self._known[key] = api
        self._known.move_to_end(key)
        if len(self._known) > self._size:
            self._known.popitem(last=False)

    def __len__(self) -> int:
        return len(self._known)


def auth_headers(key: str | None) -> dict[str, str] | None:
    """The service's bearer key (vLLM's ``--api-key``), which only the gateway knows."""
    return {"Authorization": f"Bearer {key}"} if key else None


def _url(endpoint: str, api: Api) -> str:
    return f"{endpoint}/v1/chat/completions" if api == "chat" else f"{endpoint}/v1/completions"


def _body(api: Api, prompt: Prompt, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": prompt.model, "stream": stream}
    if api == "chat":
        body["messages"] = [{"role": "user", "content": prompt.prompt}]
    else:
        body["prompt"] = prompt.prompt
    for key in ("max_tokens", "temperature", "top_p", "stop"):
        value = getattr(prompt, key)
        if value is not None:
            body[key] = value
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _error_message(answer: Answer) -> str:
    return message_of(answer.content, answer.status)


def _no_chat_template(answer: Answer) -> bool:
    return answer.status == 400 and "chat template" in _error_message(answer).lower()


def _raise_for_status(answer: Answer) -> None:
    if answer.status >= 400:
        raise UpstreamError(answer.status, _error_message(answer))
