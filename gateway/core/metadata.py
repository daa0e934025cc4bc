"""What the gateway keeps about a service, stored in Slurm with the job.

The job's ``comment`` holds everything, so any gateway replica can rebuild a
service from slurmrestd alone:

    gw1:<base64url(JSON metadata)>|phase=<phase>|endpoint=<host:port>|reason=<text>

The metadata part is written at submission and never changes; the job itself
rewrites the fields after it (``scontrol update jobid=... comment=...`` works
inside a job with no token) to publish its phase and endpoint. ``reason`` is
last, so it may contain anything but newlines.
"""

from __future__ import annotations

import base64
import binascii
import re

import msgspec

PREFIX = "gw1:"
PHASES = ("building", "starting", "running", "failed")
_ENDPOINT = re.compile(r"^[A-Za-z0-9.-]{1,253}:\d{1,5}$|^\[[0-9A-Fa-f:]+\]:\d{1,5}$")


class ServiceMeta(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Written once, at submission."""

    recipe: str
    created: float
    owner: str = ""
    environment: dict[str, str] = msgspec.field(default_factory=dict)
    resources: dict[str, str | int | None] = msgspec.field(default_factory=dict)
    name: str = ""


class Reported(msgspec.Struct, frozen=True, kw_only=True):
    """What the job published about itself."""

    phase: str | None = None
    endpoint: str | None = None
    reason: str | None = None


def encode(meta: ServiceMeta) -> str:
    raw = msgspec.json.encode(meta)
    return PREFIX + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode(comment: str) -> tuple[ServiceMeta, Reported] | None:
    """Parse a job comment; None for jobs the gateway did not launch."""
    if not comment.startswith(PREFIX):
        return None
    head, _, tail = comment.partition("|")
    blob = head[len(PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4))
        meta = msgspec.json.decode(raw, type=ServiceMeta)
    except (binascii.Error, ValueError, msgspec.DecodeError, msgspec.ValidationError):
        return None
    return meta, _reported(tail)


def _reported(tail: str) -> Reported:
    fields: dict[str, str] = {}
    rest = tail
    while rest:
        if rest.startswith("reason="):
            fields["reason"] = rest[len("reason=") :]
            break
        item, _, rest = rest.partition("|")
        key, sep, value = item.partition("=")
        if sep:
            fields[key] = value
    phase = fields.get("phase")
    endpoint = fields.get("endpoint")
    return Reported(
        phase=phase if phase in PHASES else None,
        endpoint=endpoint if endpoint and _ENDPOINT.match(endpoint) else None,
        reason=fields.get("reason") or None,
    )
