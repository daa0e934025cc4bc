"""The routing fields of a multipart body (gateway/proxy/multipart.py), as
OpenAI's SDK and curl send them."""

from __future__ import annotations

import httpx

from gateway.proxy.multipart import boundary_of, form_fields


def encoded(data: dict[str, str], audio: bytes) -> tuple[str, bytes]:
    request = httpx.Request(
        "POST", "http://gw/v1/audio/transcriptions", data=data, files={"file": ("a.wav", audio)}
    )
    return request.headers["content-type"], request.read()


def test_the_model_and_stream_are_found_as_httpx_sends_them() -> None:
    content_type, body = encoded({"stream": "true", "model": "whisper/tiny"}, b"RIFF" * 1000)
    boundary = boundary_of(content_type)
    assert boundary is not None
    assert form_fields(body, boundary) == {"model": "whisper/tiny", "stream": "true"}


def test_the_model_is_found_past_a_file_that_holds_look_alike_parts() -> None:
    fake = b'--x\r\nContent-Disposition: form-data; name="model"\r\n\r\nnot-this\r\n'
    body = (
        b'--real\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        b"Content-Type: audio/wav\r\n\r\n" + fake * 100 + b"\r\n"
        b'--real\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n'
        b"--real--\r\n"
    )
    assert form_fields(body, b"real") == {"model": "whisper"}


def test_no_model_and_broken_bodies_find_nothing() -> None:
    content_type, body = encoded({"language": "en"}, b"RIFF")
    boundary = boundary_of(content_type)
    assert boundary is not None
    assert form_fields(body, boundary) == {}
    assert form_fields(body[: len(body) // 2], boundary) == {}
    assert form_fields(b"", boundary) == {}
    assert boundary_of("application/json") is None
    assert boundary_of("multipart/form-data") is None
    assert boundary_of('multipart/form-data; boundary="a b"') == b"a b"
