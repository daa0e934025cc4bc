"""Client of vLLM's OpenAI-compatible server: models, prompts, streamed prompts.

A prompt goes to ``/v1/chat/completions`` when the model has a chat template
and to ``/v1/completions`` otherwise. Which one works is learnt from vLLM's
answer (a 400 naming the chat template) and remembered per endpoint and model,
so the fallback costs one extra request once, not on every prompt.

Streams are passed through as vLLM sends them, chunk by chunk.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncGenerator
from typing import Any, Literal, NamedTuple

import aiohttp
import msgspec

from gateway.accesslog import REQUEST_ID
from gateway.transport import Pool, TransportFailure

Api = Literal["chat", "completions"]
# The most a model list (or a probe's answer) may take.
_SMALL_ANSWER = 1024 * 1024
# The most a completion may take (max_tokens is the model's business).
LARGE_ANSWER = 64 * 1024 * 1024


class UpstreamError(Exception):
    """vLLM answered with an error; ``status`` and ``message`` are vLLM's."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class UpstreamUnavailable(Exception):
    """vLLM could not be reached or did not answer in time; ``unsent``: no
    connection was made, so the request may go to another server."""

    def __init__(self, message: str, *, timeout: bool = False, unsent: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout
        self.unsent = unsent


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


class _ErrorBody(msgspec.Struct, frozen=True):
    message: str | None = None
    error: Any = None


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
    """Straight on aiohttp's connection pool (gateway/transport.py's Pool): on
    the prompt path even httpx's request and response objects cost as much
    CPU as the call itself (py-spy under wrk, bench/proxy.py)."""

    def __init__(
        self,
        *,
        timeout: float = 120.0,
        connect_timeout: float = 3.0,
        max_connections: int = 4096,
    ) -> None:
        self._http = Pool(
            timeout=timeout, connect_timeout=connect_timeout, max_connections=max_connections
        )
        self._api: dict[tuple[str, str], Api] = {}

    async def aclose(self) -> None:
        await self._http.aclose()

    async def models(self, endpoint: str, key: str | None = None) -> list[str]:
        return [card.id for card in await self.model_cards(endpoint, key)]

    async def model_cards(self, endpoint: str, key: str | None = None) -> list[ModelCard]:
        answer = await self._request("GET", f"{endpoint}/v1/models", key, limit=_SMALL_ANSWER)
        _raise_for_status(answer)
        try:
            return msgspec.json.decode(answer.content, type=_Models).data
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
            raise UpstreamError(502, "vLLM's /v1/models answer is not a model list") from None

    async def forward(
        self, endpoint: str, path: str, body: bytes, key: str | None = None
    ) -> aiohttp.ClientResponse:
        """``body`` POSTed to ``path`` as it came (the OpenAI front door); the
        answer with its body unread: read it, then release or close it."""
        return await self._start("POST", endpoint + path, key, content=body)

    async def ready(self, endpoint: str, model: str | None = None, key: str | None = None) -> bool:
        """``/health`` answers and ``/v1/models`` lists ``model`` (any, if None)."""
        try:
            health = await self._request("GET", f"{endpoint}/health", key, limit=_SMALL_ANSWER)
            if health.status != 200:
                return False
            served = await self.models(endpoint, key)
        except (UpstreamError, UpstreamUnavailable):
            return False
        return model in served if model else bool(served)

    async def complete(self, endpoint: str, prompt: Prompt, key: str | None = None) -> Completion:
        api = self._api.get((endpoint, prompt.model), "chat")
        answer = await self._request("POST", _url(endpoint, api), key, _body(api, prompt, False))
        if api == "chat" and _no_chat_template(answer):
            api = "completions"
            answer = await self._request(
                "POST", _url(endpoint, api), key, _body(api, prompt, False)
            )
        _raise_for_status(answer)
        self._api[(endpoint, prompt.model)] = api
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
        self, endpoint: str, prompt: Prompt, key: str | None = None
    ) -> AsyncGenerator[bytes, None]:
        """vLLM's SSE bytes, as they arrive. Closing the iterator (a client that
        went away) closes the upstream connection, which makes vLLM abort."""
        api = self._api.get((endpoint, prompt.model), "chat")
        response = await self._start("POST", _url(endpoint, api), key, _body(api, prompt, True))
        if api == "chat" and response.status == 400:
            refused = await read_all(response)
            if not _no_chat_template(refused):
                _raise_for_status(refused)
            api = "completions"
            response = await self._start("POST", _url(endpoint, api), key, _body(api, prompt, True))
        if response.status >= 400:
            _raise_for_status(await read_all(response))
        self._api[(endpoint, prompt.model)] = api
        async for chunk in iter_chunks(response):
            yield chunk

    async def _start(
        self,
        method: str,
        url: str,
        key: str | None,
        body: dict[str, Any] | None = None,
        *,
        content: bytes | None = None,
    ) -> aiohttp.ClientResponse:
        """The answer's status and headers; its body still to be read."""
        headers = auth_headers(key) or {}
        request_id = REQUEST_ID.get()
        if request_id is not None:
            # vLLM takes it as its engine's request id, and older releases
            # refuse a second one in flight: unique, found by its prefix.
            headers["X-Request-ID"] = f"{request_id}-{secrets.token_hex(4)}"
        if body is not None:
            content = msgspec.json.encode(body)
        if content is not None:
            headers["Content-Type"] = "application/json"
        try:
            return await self._http.open(method, url, content=content, headers=headers)
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
    ) -> Answer:
        """The whole answer, up to ``limit`` bytes: whatever listens on an
        endpoint is a job's, and must not make the gateway hold gigabytes."""
        return await read_all(await self._start(method, url, key, body), limit)


async def iter_chunks(response: aiohttp.ClientResponse) -> AsyncGenerator[bytes, None]:
    """The answer's body as it arrives. Closing the iterator (a client that
    went away) closes the upstream connection, which makes vLLM abort."""
    try:
        async for chunk in response.content.iter_any():
            yield chunk
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise UpstreamUnavailable(f"the stream from vLLM broke off: {type(exc).__name__}") from None
    finally:
        # Closed, not released: an unfinished answer must end the upstream
        # request (vLLM aborts on the disconnect). Synchronous, so a
        # cancelled client cannot interrupt it.
        response.close()


class Answer(NamedTuple):
    status: int
    content: bytes


async def read_all(response: aiohttp.ClientResponse, limit: int = _SMALL_ANSWER) -> Answer:
    """``response`` read whole and released, refused past ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in response.content.iter_any():
            size += len(chunk)
            if size > limit:
                # Not the URL: a tenant of a shared service is not told where it runs.
                raise UpstreamError(502, f"vLLM answered more than {limit} bytes")
            chunks.append(chunk)
    except TimeoutError:
        raise UpstreamUnavailable("vLLM did not answer in time", timeout=True) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamUnavailable(f"vLLM is unreachable: {type(exc).__name__}") from None
    finally:
        if size > limit:
            response.close()  # the rest is never read: the connection cannot be reused
        else:
            response.release()
    return Answer(response.status, b"".join(chunks))


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


def message_of(content: bytes, status: int) -> str:
    try:
        body = msgspec.json.decode(content, type=_ErrorBody)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
        return content[:500].decode("utf-8", errors="replace") or f"HTTP {status}"
    if isinstance(body.error, dict) and body.error.get("message"):
        return str(body.error["message"])[:500]
    return (body.message or (str(body.error) if body.error else f"HTTP {status}"))[:500]


def _no_chat_template(answer: Answer) -> bool:
    return answer.status == 400 and "chat template" in _error_message(answer).lower()


def _raise_for_status(answer: Answer) -> None:
    if answer.status >= 400:
        raise UpstreamError(answer.status, _error_message(answer))
