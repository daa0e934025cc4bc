"""The routing fields of a multipart/form-data body (OpenAI's audio routes):
``model`` and ``stream``, found without parsing the files.

The body is held whole like any other (up to the front door's 32 MiB, on the
memory budget) and goes to the service as it came; here only each part's
headers are read, and a part's content only when it is one of those fields
and short.
"""

from __future__ import annotations

import re

_BOUNDARY = re.compile(r'boundary=(?:"([^"]{1,70})"|([^\s;"]{1,70}))', re.IGNORECASE)
_NAME = re.compile(rb'(?im)^content-disposition:[^\r\n]*?\bname="([^"\r\n]{0,64})"')
_FIELDS = frozenset({"model", "stream"})
_HEADERS_MAX = 16 * 1024  # a part's headers
_VALUE_MAX = 4096  # a routing field's value (a model name: 512 characters)


def boundary_of(content_type: str) -> bytes | None:
    """The boundary of a multipart/form-data content type; None for any other."""
    if not content_type.lower().startswith("multipart/form-data"):
        return None
    found = _BOUNDARY.search(content_type)
    return (found.group(1) or found.group(2)).encode("latin-1") if found else None


def form_fields(body: bytes | bytearray, boundary: bytes) -> dict[str, str]:
    """``model`` and ``stream`` of the body, each from its first part."""
    delimiter = b"--" + boundary
    found: dict[str, str] = {}
    at = body.find(delimiter)
    while at >= 0 and len(found) < len(_FIELDS):
        at += len(delimiter)
        if body[at : at + 2] != b"\r\n":
            break  # "--": the last part has ended
        head_end = body.find(b"\r\n\r\n", at + 2, at + 2 + _HEADERS_MAX)
        if head_end < 0:
            break
        start = head_end + 4
        end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            break
        named = _NAME.search(bytes(body[at + 2 : head_end]))
        name = named.group(1).decode("latin-1") if named else ""
        if name in _FIELDS and name not in found and end - start <= _VALUE_MAX:
            found[name] = bytes(body[start:end]).decode("utf-8", errors="replace")
        at = end + 2
    return found
