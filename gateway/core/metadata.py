"""What the gateway keeps about a service, stored in Slurm with the job.

The job's ``comment`` holds everything, so any gateway replica can rebuild a
service from slurmrestd alone:

    gw3:<base64url(msgpack meta)>.<base64url(mac)>|phase=<phase>|endpoint=<host:port>|reason=<text>

The MAC covers the metadata and the job id, so the metadata is written in two
steps: the submission carries it without a MAC (``gw3:<blob>``, nothing
anybody accepts), then one job update writes it bound to the id Slurm gave.
The job waits for that before it publishes anything; then it rewrites the
fields after the metadata (``scontrol update jobid=... comment=...`` works
inside a job with no token) to publish its phase and endpoint. ``reason`` is
last, so it may contain anything but newlines.

Every cluster user can submit a job with any comment and read everyone's
comments (``squeue -o %k``), so a comment is untrusted input. The metadata is
authenticated with an HMAC under a secret all replicas share: a forged or
edited blob is not a service, and since the MAC names the job id, a comment
copied onto another job (the same Slurm user's included) is not one either.
The job's Slurm user is checked by the caller too.

Comments of the previous format (``gw2:``, MAC'd without the job id) are still
read, so that services made before the change keep working until their jobs
end; :meth:`MetaCodec.decode` marks them ``legacy`` and the caller believes one
only on the job it was written for (the lowest job id carrying its nonce,
submitted when its metadata says it was created). What follows
the blob is the job's own say about itself and is bounded and checked here;
whether an endpoint is on the job's node is checked by the caller.

Slurm refuses comments over :data:`COMMENT_LIMIT` bytes, at submission and at
every update, so the blob is compact (msgpack, no field names) and its size is
checked at creation against what the job must still be able to publish.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import re
import secrets
from typing import NamedTuple

import msgspec

PREFIX = "gw3:"
LEGACY_PREFIX = "gw2:"
# "completed": the job stopped itself (idle; see jobscript.py) and is ending.
PHASES = ("building", "starting", "running", "completed", "failed")
# slurmctld refuses a longer comment, at submit and at update.
COMMENT_LIMIT = 1024
# What the job appends after the blob must fit too: the longest phase and an
# endpoint of a 64-character host name, plus room for a useful reason.
ENDPOINT_MAX = 72
REASON_MIN = 120
REASON_MAX = 400
_MAC_BYTES = 16
# "." and the MAC's base64url, added when the metadata is bound to its job.
BIND_CHARS = 1 + -(-_MAC_BYTES * 4 // 3)
META_BUDGET = (
    COMMENT_LIMIT
    - len("|phase=completed|endpoint=|reason=")
    - ENDPOINT_MAX
    - REASON_MIN
    - BIND_CHARS
)
_HOST = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9-]{1,63})*|\[[0-9A-Fa-f:.]{2,45}\])$"
)
_PORT = re.compile(r"^[0-9]{1,5}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Seconds since the epoch a gateway could have written: 0 up to the year 9999.
_LATEST = 253402300799.0


class Placement(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """Where a job stands in a deployment (core/deployments): written by the
    reconciler so that any replica rebuilds every deployment from the jobs."""

    deployment: str
    # The digest of the spec it was made from: a changed spec is a new one.
    generation: str
    slot: int
    # The newest job of the slot when this one was submitted (0: none): with
    # the generation and slot, the submission's idempotency key.
    after: int = 0
    # Failures in a row in this slot before this job (its backoff).
    attempt: int = 0
    # Why it was submitted: "new", "replace", "walltime", "roll", "scale" or "demand".
    why: str = "new"
    # The time limit it was submitted with: one lower now is a scale-down
    # (plan.py), which every replica sees in the job (0: not recorded).
    minutes: int = 0


class ServiceMeta(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """Written once, at submission; encoded without field names to save space."""

    recipe: str
    created: float
    owner: str
    environment: dict[str, str] = msgspec.field(default_factory=dict)
    resources: dict[str, str | int | None] = msgspec.field(default_factory=dict)
    # Random per service: what its upstream key is derived from.
    nonce: bytes = b""
    # Who created it ("": not recorded, the job's Slurm user owns it).
    tenant: str = ""
    # Idempotency-Key marker (see MetaCodec.idempotency_marker) and the digest
    # of the request it came with; "" when the create had no key.
    idempotency: str = ""
    request_digest: str = ""
    # An admin offered it to every tenant (the OpenAI front door, /v1).
    shared: bool = False
    # A replica of a deployment (None: an ad hoc service).
    placement: Placement | None = None
    # The create's idle_stop_minutes (None: it does not stop itself). Last, so
    # that gateways without the field read the rest (msgspec ignores the extra).
    idle_stop_minutes: int | None = None


class Endpoint(msgspec.Struct, frozen=True):
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class Reported(msgspec.Struct, frozen=True, kw_only=True):
    """What the job published about itself, checked for shape only."""

    phase: str | None = None
    endpoint: Endpoint | None = None
    reason: str | None = None
    # A published value that was refused, and why (for the status reason).
    refused: str | None = None


class Decoded(NamedTuple):
    meta: ServiceMeta
    reported: Reported
    # The previous format: its MAC does not name the job (see the module doc).
    legacy: bool = False


class MetaCodec:
    """Writes and authenticates the metadata blob under the shared secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the metadata secret must be at least 16 bytes")
        self._legacy_mac_key = hmac.digest(secret, b"slurm-ai-gateway/metadata", hashlib.sha256)
        self._mac_key = hmac.digest(secret, b"slurm-ai-gateway/metadata/job", hashlib.sha256)
        self._upstream_key = hmac.digest(secret, b"slurm-ai-gateway/upstream", hashlib.sha256)
        # In every job name: which gateway (which secret) a job belongs to once
        # its comment is gone. Public, like job names; not a credential.
        self.job_tag = hmac.digest(secret, b"slurm-ai-gateway/job-name", hashlib.sha256)[:3].hex()
        self._idempotency_key = hmac.digest(secret, b"slurm-ai-gateway/idempotency", hashlib.sha256)

    def idempotency_marker(self, tenant: str, slurm_user: str, key: str) -> str:
        """What a job records of a create's Idempotency-Key: keyed, so comments
        (readable by every cluster user) do not show the client's keys."""
        message = "\0".join((tenant, slurm_user, key)).encode("utf-8", "surrogateescape")
        return hmac.digest(self._idempotency_key, message, hashlib.sha256)[:9].hex()

    def new_meta(
        self,
        *,
        recipe: str,
        created: float,
        owner: str,
        environment: dict[str, str],
        resources: dict[str, str | int | None],
        tenant: str = "",
        idempotency: str = "",
        request_digest: str = "",
        shared: bool = False,
        placement: Placement | None = None,
        idle_stop_minutes: int | None = None,
    ) -> ServiceMeta:
        return ServiceMeta(
            recipe=recipe,
            created=created,
            owner=owner,
            environment=environment,
            resources=resources,
            nonce=secrets.token_bytes(12),
            tenant=tenant,
            idempotency=idempotency,
            request_digest=request_digest,
            shared=shared,
            placement=placement,
            idle_stop_minutes=idle_stop_minutes,
        )

    def unbound(self, meta: ServiceMeta) -> str:
        """The comment a job is submitted with: the metadata, not yet valid."""
        return f"{PREFIX}{_b64(msgspec.msgpack.encode(meta))}"

    def bind(self, unbound: str, job_id: int) -> str:
        """The metadata of :meth:`unbound`, authenticated for job ``job_id``."""
        raw = _unb64(unbound[len(PREFIX) :])
        return f"{unbound}.{_b64(self._mac(raw, job_id))}"

    def encode(self, meta: ServiceMeta, job_id: int) -> str:
        return self.bind(self.unbound(meta), job_id)

    def _mac(self, raw: bytes, job_id: int) -> bytes:
        message = b"%d\0" % job_id + raw
        return hmac.digest(self._mac_key, message, hashlib.sha256)[:_MAC_BYTES]

    def decode(self, comment: str, job_id: int) -> Decoded | None:
        """The service a comment describes on job ``job_id``; None for anything
        the gateway did not write for that job (no prefix, a MAC for another
        job or none, a blob that does not parse)."""
        legacy = comment.startswith(LEGACY_PREFIX)
        if not legacy and not comment.startswith(PREFIX):
            return None
        head, _, tail = comment.partition("|")
        blob, _, mac_text = head[len(PREFIX) :].partition(".")
        try:
            raw = _unb64(blob)
            mac = _unb64(mac_text)
        except (binascii.Error, ValueError):
            return None
        if legacy:
            expected = hmac.digest(self._legacy_mac_key, raw, hashlib.sha256)[:_MAC_BYTES]
        else:
            expected = self._mac(raw, job_id)
        if not hmac.compare_digest(mac, expected):
            return None
        try:
            meta = msgspec.msgpack.decode(raw, type=ServiceMeta)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        if not (math.isfinite(meta.created) and 0 <= meta.created <= _LATEST):
            return None
        return Decoded(meta, parse_reported(tail), legacy)

    def legacy_encode(self, meta: ServiceMeta) -> str:
        """A comment of the previous format, as gateways before the binding
        wrote them (for tests of how they are still read)."""
        raw = msgspec.msgpack.encode(meta)
        mac = hmac.digest(self._legacy_mac_key, raw, hashlib.sha256)[:_MAC_BYTES]
        return f"{LEGACY_PREFIX}{_b64(raw)}.{_b64(mac)}"

    def upstream_key(self, meta: ServiceMeta) -> str:
        """The bearer key the service's endpoint requires: derived, never stored."""
        return hmac.digest(self._upstream_key, meta.nonce, hashlib.sha256).hex()[:40]


def comment_room(unbound: str) -> int:
    """How far the metadata (as submitted, before binding) is over (positive)
    or under its budget."""
    return len(unbound.encode()) - META_BUDGET


def parse_reported(tail: str) -> Reported:
    fields: dict[str, str] = {}
    rest = tail
    while rest:
        if rest.startswith("reason="):
            fields["reason"] = rest[len("reason=") :]
            break
        item, _, rest = rest.partition("|")
        key, sep, value = item.partition("=")
        if sep and key not in fields:
            fields[key] = value
    phase = fields.get("phase")
    reason = _CONTROL.sub(" ", fields.get("reason", ""))[:REASON_MAX].strip()
    endpoint: Endpoint | None = None
    refused: str | None = None
    raw_endpoint = fields.get("endpoint", "")
    if raw_endpoint:
        endpoint = parse_endpoint(raw_endpoint)
        if endpoint is None:
            shown = _CONTROL.sub(" ", raw_endpoint)[:80]
            refused = f"the job published an endpoint that is not host:port ({shown!r})"
    return Reported(
        phase=phase if phase in PHASES else None,
        endpoint=endpoint,
        reason=reason or None,
        refused=refused,
    )


def parse_endpoint(text: str) -> Endpoint | None:
    """``host:port`` with a DNS name, IPv4 or bracketed IPv6 host and a port 1-65535."""
    host, sep, port = text.rpartition(":")
    if not sep or not _PORT.match(port) or not _HOST.match(host) or len(host) > 253:
        return None
    number = int(port)
    if not 1 <= number <= 65535:
        return None
    return Endpoint(host, number)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    if not text or not re.fullmatch(r"[A-Za-z0-9_-]+", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
