"""Token usage read from answers as they pass (gateway/proxy/sse.py): what it
counts, and what reading costs per piece."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from gateway.proxy.sse import AnswerUsage, SseUsage, count_usage
from tests.support.front_door import CHAT, COMPLETION, AsgiClient, gateway, settings_with
from tests.support.http_stub import chunked, http_stub
from tests.support.polling import poll
from tests.support.services import service


def tokens() -> tuple[float, float]:
    def get(kind: str) -> float:
        value = REGISTRY.get_sample_value("gateway_prompt_tokens_total", {"kind": kind})
        return value or 0.0

    return get("prompt"), get("completion")


def counted(feed: object) -> tuple[float, float]:
    """The tokens counted while ``feed()`` runs."""
    before = tokens()
    feed()  # type: ignore[operator]
    after = tokens()
    return after[0] - before[0], after[1] - before[1]


def vllm_stream(events: int) -> bytes:
    """A chat stream as vLLM sends it, usage last (stream_options.include_usage)."""
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": " word"}, "finish_reason": None}],
    }
    usage = {**chunk, "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": events}}
    body = b"".join(b"data: " + json.dumps(chunk).encode() + b"\n\n" for _ in range(events))
    return body + b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n"


# -- streams -------------------------------------------------------------------------


def test_a_stream_a_byte_at_a_time_costs_each_byte_once() -> None:
    """As found: relayed in 1-byte reads, a stream cost ~30 µs more per read,
    as the reader copied all of the event read so far (up to 64 KiB) each
    time. Now a byte is copied at most once, whatever the reads."""
    stream = vllm_stream(300)
    reader = SseUsage()

    def feed() -> None:
        for i in range(len(stream)):
            reader.feed(stream[i : i + 1])

    started = time.perf_counter()
    got = counted(feed)
    took = time.perf_counter() - started
    print(
        f"\n{len(stream)} 1-byte reads: {reader.copied} bytes copied "
        f"({reader.copied / len(stream):.2f} per byte), {took / len(stream) * 1e6:.2f} µs per read"
    )
    assert got == (12, 300)
    assert reader.copied <= len(stream)


def test_an_event_that_never_ends_is_not_kept_past_the_limit() -> None:
    """A hostile service's endless event, a byte at a time: what is kept (and
    copied) stops at the limit; the events after it count again."""
    reader = SseUsage()
    endless = b"data: " + b"x" * (2 * SseUsage.LIMIT)
    for i in range(len(endless)):
        reader.feed(endless[i : i + 1])
    assert reader.copied <= SseUsage.LIMIT
    assert len(reader._held) == 0  # dropped, up to the event's end
    after = counted(lambda: reader.feed(b"\n\n" + vllm_stream(2)))
    assert after == (12, 2)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1000, 1 << 16])
def test_a_stream_in_reads_of_any_size_counts_its_usage_once(size: int) -> None:
    stream = vllm_stream(40)
    reader = SseUsage()

    def feed() -> None:
        for i in range(0, len(stream), size):
            reader.feed(stream[i : i + size])

    assert counted(feed) == (12, 40)
    assert reader.copied <= len(stream)


def test_usage_null_on_every_chunk_counts_nothing() -> None:
    reader = SseUsage()
    chunk = b'data: {"choices": [], "usage": null}\n\n'
    assert counted(lambda: reader.feed(chunk * 10)) == (0, 0)


def event(name: str, data: dict[str, object]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def test_a_responses_stream_counts_the_usage_of_its_completed_response() -> None:
    # As vLLM sends it: "usage": null until the last event, which holds the response.
    response = {"id": "resp_1", "object": "response", "usage": None}
    done = {**response, "usage": {"input_tokens": 14, "output_tokens": 5, "total_tokens": 19}}
    stream = (
        event("response.created", {"type": "response.created", "response": response})
        + event("response.output_text.delta", {"type": "response.output_text.delta", "delta": "x"})
        + event("response.completed", {"type": "response.completed", "response": done})
    )
    for size in (1, 7, len(stream)):
        reader = SseUsage()
        chunks = [stream[i : i + size] for i in range(0, len(stream), size)]
        assert counted(lambda r=reader, cs=chunks: [r.feed(c) for c in cs]) == (14, 5)


def test_an_anthropic_stream_counts_its_last_usage_only() -> None:
    # message_start has the input tokens in "message"; message_delta has the
    # totals at its top level.
    opened = {"usage": {"input_tokens": 14, "output_tokens": 0}}
    start = {"type": "message_start", "message": opened}
    delta = {"type": "message_delta", "usage": {"input_tokens": 14, "output_tokens": 5}}
    stream = event("message_start", start) + event("message_delta", delta)
    reader = SseUsage()
    assert counted(lambda: reader.feed(stream)) == (14, 5)


@pytest.mark.parametrize("kind", ["responses", "anthropic"])
def test_a_whole_answer_with_input_and_output_tokens_is_counted(kind: str) -> None:
    usage = {"input_tokens": 21, "output_tokens": 8}
    if kind == "responses":
        usage |= {"input_tokens_details": {"cached_tokens": 0}, "total_tokens": 29}
    answer = json.dumps({"id": "x", "type": "message", "usage": usage, "model": "m"}).encode()
    assert counted(lambda: count_usage(answer)) == (21, 8)
    pieces = AnswerUsage()

    def feed() -> None:
        for i in range(0, len(answer), 5):
            pieces.feed(answer[i : i + 5])
        pieces.finish()

    assert counted(feed) == (21, 8)


def test_anthropics_cached_prompt_tokens_count_as_prompt_tokens() -> None:
    # vLLM leaves the cached ones out of Anthropic's input_tokens, as Anthropic does.
    usage = {"input_tokens": 4, "cache_read_input_tokens": 10, "output_tokens": 3}
    answer = json.dumps({"type": "message", "usage": usage}).encode()
    assert counted(lambda: count_usage(answer)) == (14, 3)


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": -5, "completion_tokens": -1},
        {"input_tokens": -5, "output_tokens": 2**64 - 1},
        {"prompt_tokens": 2**40},
    ],
)
def test_usage_no_answer_can_have_is_not_believed_nor_fails_the_answer(
    usage: dict[str, int],
) -> None:
    answer = json.dumps({"object": "chat.completion", "usage": usage}).encode()
    assert counted(lambda: count_usage(answer)) == (0, 0)
    pieces = AnswerUsage()
    pieces.feed(answer)
    assert counted(pieces.finish) == (0, 0)


# -- whole answers -------------------------------------------------------------------

ANSWER = {
    "id": "cmpl-1",
    "object": "chat.completion",
    "choices": [
        {
            "message": {"content": 'text naming "usage": {"prompt_tokens": 99}'},
            "logprobs": None,
        }
    ],
    "usage": {
        "prompt_tokens": 7,
        "completion_tokens": 11,
        "total_tokens": 18,
        "prompt_tokens_details": {"cached_tokens": 2},
    },
    "prompt_logprobs": None,
}


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("size", [1, 2, 5, 9, 100, 1 << 20])
def test_a_whole_answer_in_pieces_counts_its_top_level_usage(size: int, compact: bool) -> None:
    text = json.dumps(ANSWER, separators=(",", ":") if compact else None).encode()
    usage = AnswerUsage()

    def feed() -> None:
        for i in range(0, len(text), size):
            usage.feed(text[i : i + size])
        usage.finish()

    assert counted(feed) == (7, 11)
    assert counted(lambda: count_usage(text)) == (7, 11)  # as the whole answer says


@pytest.mark.parametrize(
    "answer",
    [
        {"object": "list", "data": [{"embedding": [0.1]}]},
        {"object": "chat.completion", "usage": None},
        {"object": "chat.completion", "usage": "many"},
        {"object": "chat.completion", "usage": {"prompt_tokens": "x"}},
    ],
)
def test_an_answer_without_sound_usage_counts_nothing(answer: dict[str, object]) -> None:
    usage = AnswerUsage()
    text = json.dumps(answer).encode()
    assert counted(lambda: (usage.feed(text), usage.finish())) == (0, 0)


def test_what_a_long_answer_keeps_is_bounded() -> None:
    usage = AnswerUsage()
    usage.feed(b'{"usage": ' + b" " * 10_000)
    for _ in range(100):
        usage.feed(b" " * 65536)
    assert len(usage._found) <= AnswerUsage.KEEP


# -- through the relay -----------------------------------------------------------------


async def test_an_answer_in_pieces_is_passed_on_as_it_comes_with_its_usage_counted(
    tmp_path: Path,
) -> None:
    """Not held whole: each piece reaches the client before vLLM sends the next."""
    answer = json.dumps(COMPLETION).encode()
    pieces = [answer[:10], answer[10:-20], answer[-20:]]
    go_on = [asyncio.Event() for _ in pieces]
    async with (
        http_stub(chunked(pieces, go_on, "application/json")) as up,
        gateway(settings_with(tmp_path), service("1", url=up.url)) as gw,
    ):
        before = tokens()[1]
        client = AsgiClient(gw.app, CHAT, b'{"model": "m"}')
        task = asyncio.create_task(client.run())
        for i, may in enumerate(go_on):
            may.set()
            await poll(lambda: _now(len(client.bodies)), (i + 1).__le__, timeout=5, interval=0.01)
            assert client.bodies == pieces[: i + 1]
        await asyncio.wait_for(task, 5)
        after = tokens()[1]
    assert client.status == 200
    assert client.complete
    assert b"".join(client.bodies) == answer
    assert after == before + 11


async def _now(value: int) -> int:
    return value


def _completion_tokens() -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value("gateway_prompt_tokens_total", {"kind": "completion"})
    return value or 0.0


@pytest.mark.parametrize("cut", [5, 40, 70, 100])
def test_usage_is_counted_when_a_read_ends_inside_its_event(cut: int) -> None:
    last = (
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":7,'
        b'"total_tokens":10}}\n\ndata: [DONE]\n\n'
    )
    stream = b'data: {"choices":[{"text":" tok"}]}\n\n' + last
    split = len(stream) - len(last) + cut
    before = _completion_tokens()
    reader = SseUsage()
    for read in (stream[:split], stream[split:]):
        reader.feed(read)
    assert _completion_tokens() == before + 7


def test_a_stream_with_no_event_end_holds_a_bounded_remainder() -> None:
    reader = SseUsage()
    for _ in range(100):
        reader.feed(b"x" * 4096)  # a hostile upstream that never ends an event
    assert len(reader._held) <= SseUsage.LIMIT
    assert reader.copied <= SseUsage.LIMIT
