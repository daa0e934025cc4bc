"""The auth file: tenants, their limits, API keys (as hashes) and the OIDC allow-list.

A TOML file, mounted from a Kubernetes Secret in a deployment::

    [defaults]                 # tenants not listed below
    max_services = 4

    [tenants.team-a]
    max_services = 8
    max_gpus = 8
    account = "proj-a"         # Slurm account its jobs are charged to

    [[keys]]
    name = "benchmark-ci"      # shown in the audit log
    tenant = "team-a"
    slurm_user = "alice"
    role = "user"              # or "admin": sees every service
    sha256 = "<hex of sha256(key)>"   # python -m gateway.auth new-key

    [[oidc_users]]
    subject = "alice@example.org"     # value of GATEWAY_OIDC_USER_CLAIM
    slurm_user = "alice"
    tenant = "team-a"          # default: the Slurm user

Only hashes are stored: the file leaks no key. Keys are 256 random bits, so
one SHA-256 is enough (a slow hash guards low-entropy passwords, not these).
The file is checked for changes at most once a second and re-read; a broken
edit keeps the previous version in force and is logged.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import msgspec
import structlog

from gateway.core.filewatch import FileWatch
from gateway.core.principal import SLURM_USER, TENANT, Limits, Method, Principal, Role

log = structlog.get_logger(__name__)

KEY_PREFIX = "sgw_"
Count = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class TenantSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    max_services: Count | None = None
    max_gpus: Count | None = None
    account: Name | None = None


class KeySpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    tenant: Name
    slurm_user: Name
    sha256: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
    role: Role = Role.USER
    name: Name | None = None


class OidcUserSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    subject: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    slurm_user: Name
    tenant: Name | None = None
    role: Role = Role.USER


class AuthFileSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    defaults: TenantSpec = TenantSpec()
    tenants: dict[Name, TenantSpec] = msgspec.field(default_factory=dict)
    keys: list[KeySpec] = msgspec.field(default_factory=list)
    oidc_users: list[OidcUserSpec] = msgspec.field(default_factory=list)


class AuthFileError(ValueError):
    pass


class Directory:
    """One parsed version of the file, indexed for lookups."""

    def __init__(self, spec: AuthFileSpec) -> None:
        self.spec = spec
        self.keys: dict[bytes, KeySpec] = {}
        # Built once per key and file version: a key is checked on every prompt.
        self._principals: dict[bytes, Principal] = {}
        for i, key in enumerate(spec.keys):
            where = f"keys[{i}]"
            _check_names(where, key.tenant, key.slurm_user)
            digest = bytes.fromhex(key.sha256)
            if digest in self.keys:
                raise AuthFileError(f"{where}.sha256: the same key is listed twice")
            self.keys[digest] = key
        self.oidc_users: dict[str, OidcUserSpec] = {}
        for i, user in enumerate(spec.oidc_users):
            where = f"oidc_users[{i}]"
            _check_names(where, user.tenant or user.slurm_user, user.slurm_user)
            if user.subject in self.oidc_users:
                raise AuthFileError(f"{where}.subject: {user.subject!r} is listed twice")
            self.oidc_users[user.subject] = user
        self.slurm_users = frozenset(
            [k.slurm_user for k in spec.keys] + [u.slurm_user for u in spec.oidc_users]
        )
        for name in spec.tenants:
            if not TENANT.fullmatch(name):
                raise AuthFileError(f"tenants.{name}: not a tenant name ({TENANT.pattern})")

    def tenant(self, name: str) -> TenantSpec:
        return self.spec.tenants.get(name, self.spec.defaults)

    def principal(
        self,
        *,
        tenant: str,
        slurm_user: str,
        role: Role,
        method: Method,
        label: str | None,
    ) -> Principal:
        spec = self.tenant(tenant)
        return Principal(
            tenant=tenant,
            slurm_user=slurm_user,
            role=role,
            method=method,
            limits=Limits(spec.max_services, spec.max_gpus),
            account=spec.account,
            label=label,
        )

    def by_key(self, presented: str) -> Principal | None:
        # A lookup by the key's hash, which is the constant-time comparison:
        # what its timing could reveal is about the hash of what was sent,
        # which says nothing about any stored key.
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        principal = self._principals.get(digest)
        if principal is not None:
            return principal
        found = self.keys.get(digest)
        if found is None:
            return None
        principal = self._principals[digest] = self.principal(
            tenant=found.tenant,
            slurm_user=found.slurm_user,
            role=found.role,
            method=Method.KEY,
            label=found.name or f"key {found.sha256[:8]}",
        )
        return principal


def _check_names(where: str, tenant: str, slurm_user: str) -> None:
    # The user first: an entry without a tenant takes its user as the tenant.
    if not SLURM_USER.fullmatch(slurm_user):
        raise AuthFileError(f"{where}.slurm_user: {slurm_user!r} is not a user name")
    if not TENANT.fullmatch(tenant):
        raise AuthFileError(f"{where}.tenant: {tenant!r} is not a tenant name ({TENANT.pattern})")


def parse(text: str) -> Directory:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise AuthFileError(f"not TOML: {exc}") from None
    tenants = raw.get("tenants")
    if isinstance(tenants, dict):
        # One at a time: msgspec's error path would not say which tenant.
        for name, table in tenants.items():
            try:
                msgspec.convert(table, TenantSpec)
            except msgspec.ValidationError as exc:
                message, _, path = str(exc).partition(" - at `$")
                where = f"tenants.{name}{path.rstrip('`')}"
                raise AuthFileError(f"{where}: {message}") from None
    try:
        spec = msgspec.convert(raw, AuthFileSpec)
    except msgspec.ValidationError as exc:
        raise AuthFileError(str(exc)) from None
    return Directory(spec)


class AuthFile:
    """The file, re-read when it changes (a renewed Secret, an added key)."""

    def __init__(
        self, path: Path, *, check_every: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = path
        self._watch = FileWatch(path, every=check_every, clock=clock)
        self.directory = self._load()  # a broken file stops start-up

    def _load(self) -> Directory:
        try:
            text = self._watch.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise AuthFileError(f"cannot read {self.path}: {exc}") from None
        return parse(text)

    def current(self) -> Directory:
        try:
            if not self._watch.changed():
                return self.directory
        except OSError as exc:
            log.error("auth_file_unreadable", path=str(self.path), error=str(exc))
            return self.directory
        try:
            self.directory = self._load()
        except AuthFileError as exc:
            # Keys in force stay in force: a typo must not lock everyone out.
            log.error("auth_file_rejected", path=str(self.path), error=str(exc)[:500])
        else:
            log.info(
                "auth_file_loaded",
                path=str(self.path),
                keys=len(self.directory.keys),
                oidc_users=len(self.directory.oidc_users),
            )
        return self.directory


def new_key() -> tuple[str, str]:
    """A fresh key and the hash the auth file stores for it."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, hashlib.sha256(key.encode()).hexdigest()


def empty() -> Directory:
    return Directory(AuthFileSpec())
