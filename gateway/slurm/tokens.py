"""Where the gateway's Slurm credentials come from.

Three providers share one small protocol:

* :class:`MintedTokens` holds the cluster's HS256 key and signs its own tokens
  (what ``scontrol token`` does), renewing them before they expire;
* :class:`StaticToken` reads a token from an environment variable or a file and
  re-reads the file when it changes (a mounted Kubernetes Secret);
* :class:`FixedCredentials` carries a caller's own user and token, for
  pass-through requests.

Tokens and keys never appear in ``repr``, logs or exceptions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import jwt

from gateway.slurm.errors import SlurmAuthError


@dataclass(frozen=True, slots=True)
class Credentials:
    """What slurmrestd needs on every request."""

    user_name: str
    token: str = field(repr=False)
    expires_at: float | None = None

    def headers(self) -> dict[str, str]:
        # 22.05 needs both headers; newer releases accept them too.
        return {"X-SLURM-USER-NAME": self.user_name, "X-SLURM-USER-TOKEN": self.token}


class TokenProvider(Protocol):
    async def credentials(self) -> Credentials:
        """Return credentials valid for at least the next request."""
        ...


class MintedTokens:
    """Signs HS256 tokens with the cluster's ``jwt_key`` for one Slurm user.

    A token is renewed once less than ``renew_before`` seconds of its life are
    left, so a request never leaves with a token about to expire.
    """

    def __init__(
        self,
        key: bytes,
        user_name: str,
        *,
        lifespan: float = 1800.0,
        renew_before: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not key:
            raise SlurmAuthError("the JWT key is empty")
        if lifespan <= 1:
            raise ValueError("lifespan must be more than one second")
        self._key = key
        self._user_name = user_name
        self._lifespan = lifespan
        # Default: renew in the last fifth of the token's life, at most a minute.
        self._renew_before = renew_before if renew_before is not None else min(60.0, lifespan / 5)
        self._clock = clock
        self._current: Credentials | None = None
        self.minted = 0

    @classmethod
    def from_key_file(cls, path: Path, user_name: str, *, lifespan: float = 1800.0) -> MintedTokens:
        try:
            key = path.read_bytes()
        except OSError as exc:
            raise SlurmAuthError(f"cannot read the JWT key file {path}: {exc.strerror}") from None
        return cls(key, user_name, lifespan=lifespan)

    def __repr__(self) -> str:
        return f"MintedTokens(user_name={self._user_name!r}, lifespan={self._lifespan})"

    async def credentials(self) -> Credentials:
        now = self._clock()
        current = self._current
        if (
            current is None
            or current.expires_at is None
            or (current.expires_at - now <= self._renew_before)
        ):
            current = self._mint(now)
        return current

    def _mint(self, now: float) -> Credentials:
        issued = int(now)
        expires = issued + int(self._lifespan)
        token = jwt.encode(
            {"sun": self._user_name, "iat": issued, "exp": expires},
            self._key,
            algorithm="HS256",
        )
        self._current = Credentials(self._user_name, token, float(expires))
        self.minted += 1
        return self._current


def _claims(token: str) -> dict[str, object]:
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise SlurmAuthError("the configured Slurm token is not a JWT") from None
    return dict(claims)


def _unprefixed(token: str) -> str:
    """The raw token, also from scontrol's ``SLURM_JWT=...`` line."""
    return token.strip().removeprefix("SLURM_JWT=").strip()


class StaticToken:
    """A token made elsewhere (``scontrol token``, a secret store).

    With ``path`` the file is stat'ed on every call and re-read when it
    changed; with ``value`` the token is fixed. The user is taken from
    ``user_name`` or from the token's ``sun``/``username`` claim.
    """

    def __init__(
        self,
        *,
        value: str | None = None,
        path: Path | None = None,
        user_name: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if (value is None) == (path is None):
            raise ValueError("give exactly one of value or path")
        self._value = _unprefixed(value) if value is not None else None
        self._path = path
        self._user_name = user_name
        self._clock = clock
        self._stamp: tuple[int, int, int] | None = None
        self._current: Credentials | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        source = f"path={self._path!s}" if self._path else "value=<hidden>"
        return f"StaticToken({source}, user_name={self._user_name!r})"

    def check(self) -> None:
        """Read and parse the token now, so a bad one stops start-up; its
        expiry is left to each call, since a mounted file may be renewed."""
        if self._path is not None:
            self._reload_if_changed(self._path)
        else:
            assert self._value is not None
            self._current = self._build(self._value)

    async def credentials(self) -> Credentials:
        if self._path is not None:
            async with self._lock:
                self._reload_if_changed(self._path)
        elif self._current is None:
            assert self._value is not None
            self._current = self._build(self._value)
        current = self._current
        assert current is not None
        if current.expires_at is not None and current.expires_at <= self._clock():
            source = f"file {self._path}" if self._path else "variable"
            raise SlurmAuthError(f"the Slurm token from the {source} has expired")
        return current

    def _reload_if_changed(self, path: Path) -> None:
        try:
            st = path.stat()
        except OSError as exc:
            raise SlurmAuthError(f"cannot read the token file {path}: {exc.strerror}") from None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp and self._current is not None:
            return
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise SlurmAuthError(f"cannot read the token file {path}: {exc}") from None
        text = _unprefixed(text)
        if not text:
            raise SlurmAuthError(f"the token file {path} is empty")
        self._current = self._build(text)
        self._stamp = stamp

    def _build(self, token: str) -> Credentials:
        claims = _claims(token)
        user = self._user_name or claims.get("sun") or claims.get("username")
        if not isinstance(user, str) or not user:
            raise SlurmAuthError("the Slurm token names no user; set the user name")
        exp = claims.get("exp")
        return Credentials(user, token, float(exp) if isinstance(exp, int | float) else None)


class Minter:
    """Holds the cluster's key and mints tokens for any Slurm user, one renewing
    :class:`MintedTokens` per user (jobs run as each tenant's own user)."""

    def __init__(self, key: bytes, *, lifespan: float = 1800.0) -> None:
        if not key:
            raise SlurmAuthError("the JWT key is empty")
        self._key = key
        self._lifespan = lifespan
        self._users: dict[str, MintedTokens] = {}

    def __repr__(self) -> str:
        return f"Minter(users={len(self._users)})"

    def for_user(self, user_name: str) -> MintedTokens:
        if user_name == "root":
            raise SlurmAuthError("the gateway does not mint tokens for root")
        tokens = self._users.get(user_name)
        if tokens is None:
            if len(self._users) > 10_000:
                self._users.clear()
            tokens = self._users[user_name] = MintedTokens(
                self._key, user_name, lifespan=self._lifespan
            )
        return tokens


class FixedCredentials:
    """A caller's own user and token, used for one request (pass-through)."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials

    def __repr__(self) -> str:
        return f"FixedCredentials(user_name={self._credentials.user_name!r})"

    async def credentials(self) -> Credentials:
        return self._credentials
