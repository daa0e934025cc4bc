"""From a request's headers to a :class:`Principal`, or a 401/403.

Three kinds of credentials, each optional:

* ``Authorization: Bearer sgw_...``: an API key from the auth file;
* ``Authorization: Bearer <JWT>``: an OIDC token, checked against the issuer's
  JWKS (signature, issuer, audience, expiry, allowed algorithms), its user
  claim mapped to a Slurm user by the allow-list or the rule;
* ``X-SLURM-USER-TOKEN`` (with or without ``X-SLURM-USER-NAME``): the caller's
  own Slurm JWT; the caller acts as itself and its Slurm calls carry its token.
  Checked with the cluster's key when the gateway holds it, else by slurmrestd
  (one ping per token, within the budgets of gateway/auth/budget.py).

A checked token is remembered until it expires (at most five minutes), so a
caller sending the same token on every prompt costs one check, not one each.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import re
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jwt
import structlog

from gateway.auth.authfile import KEY_PREFIX, AuthFile, Directory, empty
from gateway.auth.budget import CheckBudget
from gateway.core.errors import Forbidden, Unauthenticated
from gateway.core.principal import SLURM_USER, TENANT, Method, Principal, Role, anonymous
from gateway.settings import Settings
from gateway.slurm import SlurmClient, SlurmError
from gateway.slurm.errors import SlurmUnavailable
from gateway.slurm.tokens import Credentials

log = structlog.get_logger(__name__)

TOKEN_HEADER = "x-slurm-user-token"  # noqa: S105 - a header name
USER_HEADER = "x-slurm-user-name"
_READ = (b"authorization", TOKEN_HEADER.encode(), USER_HEADER.encode())
# Anthropic's API, where a key may come as X-Api-Key.
ANTHROPIC_PREFIX = "/v1/messages"


def credentials(raw: Iterable[tuple[bytes, bytes]], *, api_key: bool = False) -> dict[str, str]:
    """Of a request's raw (ASGI) headers, those ``Authenticator.authenticate``
    reads, the first of each name as Litestar's ``Headers`` gives it: building
    those was a twentieth of a proxied request's CPU (py-spy under wrk).
    ``api_key``: an ``X-Api-Key`` (as Anthropic's SDKs send the key) stands
    for ``Authorization: Bearer`` when that is absent."""
    found: dict[str, str] = {}
    key: bytes | None = None
    for name, value in raw:
        if name in _READ:
            found.setdefault(name.decode("latin-1"), value.decode("latin-1"))
        elif api_key and key is None and name == b"x-api-key":
            key = value
    if key is not None:
        found.setdefault("authorization", f"Bearer {key.decode('latin-1')}")
    return found


_CACHE_SECONDS = 300.0
_CACHE_SIZE = 10_000
_LEEWAY = 30  # seconds of clock skew allowed on exp/nbf/iat
_DISCOVERY_RETRY_SECONDS = 30.0


class _Checked:
    """Tokens already checked: sha256(token) -> (principal or refusal, until)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[Principal | Exception, float]] = OrderedDict()

    def get(self, digest: bytes) -> Principal | Exception | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._entries[digest]
            return None
        self._entries.move_to_end(digest)  # least recently used goes first
        return entry[0]

    def put(self, digest: bytes, outcome: Principal | Exception, until: float) -> None:
        self._entries[digest] = (outcome, min(until, self._clock() + _CACHE_SECONDS))
        while len(self._entries) > _CACHE_SIZE:
            self._entries.popitem(last=False)


class OidcVerifier:
    def __init__(self, settings: Settings) -> None:
        assert settings.oidc_issuer is not None
        assert settings.oidc_audience is not None
        self.issuer = settings.oidc_issuer
        self.audience = settings.oidc_audience
        self.algorithms = settings.oidc_algorithm_list()
        self.claim = settings.oidc_user_claim
        pattern = settings.oidc_user_pattern
        self.pattern = re.compile(pattern) if pattern else None
        self._jwks_url = settings.oidc_jwks_url
        self._jwks: jwt.PyJWKClient | None = None
        self._discovery_failed_at = float("-inf")

    def _client(self) -> jwt.PyJWKClient:
        """Runs in a worker thread: the first call may fetch the discovery document."""
        if self._jwks is None:
            # A failed discovery is not retried for every request that comes.
            if time.monotonic() - self._discovery_failed_at < _DISCOVERY_RETRY_SECONDS:
                raise jwt.PyJWKClientConnectionError("the issuer's discovery failed just now")
            try:
                url = self._jwks_url or _discover_jwks(self.issuer)
            except jwt.PyJWKClientConnectionError:
                self._discovery_failed_at = time.monotonic()
                raise
            # The key set is cached for five minutes; a token signed with an
            # unknown key (rotation) refetches it, at most every 30 s.
            self._jwks = jwt.PyJWKClient(url, cache_jwk_set=True, lifespan=300, timeout=5)
        return self._jwks

    def _signing_key(self, token: str) -> Any:
        return self._client().get_signing_key_from_jwt(token).key

    async def claims(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("the bearer token is neither an API key nor a JWT") from None
        if header.get("alg") not in self.algorithms:
            raise Unauthenticated(
                f"token algorithm {str(header.get('alg'))[:20]!r} is not accepted "
                f"(accepted: {', '.join(self.algorithms)})"
            )
        try:
            key = await asyncio.to_thread(self._signing_key, token)
        except jwt.PyJWKClientConnectionError as exc:
            log.error("oidc_jwks_unreachable", error=str(exc)[:300])
            raise Unauthenticated("the token's signing keys cannot be fetched now") from None
        except (jwt.PyJWKClientError, jwt.PyJWTError) as exc:
            raise Unauthenticated(f"the token's signing key is unknown: {exc}") from None
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=_LEEWAY,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the token has expired") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("the token is not issued for this gateway (audience)") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("the token is from another issuer") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"the token does not check out: {exc}") from None
        return claims

    def principal(self, claims: Mapping[str, Any], directory: Directory) -> Principal:
        subject = claims.get(self.claim)
        if not isinstance(subject, str) or not subject:
            raise Forbidden(f"the token has no {self.claim!r} claim to map to a Slurm user")
        listed = directory.oidc_users.get(subject)
        if listed is not None:
            return directory.principal(
                tenant=listed.tenant or listed.slurm_user,
                slurm_user=listed.slurm_user,
                role=listed.role,
                method=Method.OIDC,
                label=subject,
            )
        match = self.pattern.fullmatch(subject) if self.pattern else None
        if match is None:
            raise Forbidden(f"{self.claim} {subject[:100]!r} is not allowed to use this gateway")
        user = match.groupdict().get("user") or match.group(0)
        if not SLURM_USER.fullmatch(user) or not TENANT.fullmatch(user):
            raise Forbidden(f"{self.claim} {subject[:100]!r} maps to no valid Slurm user")
        return directory.principal(
            tenant=user, slurm_user=user, role=Role.USER, method=Method.OIDC, label=subject
        )


def _discover_jwks(issuer: str) -> str:
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    # The keys come over https, or over http only from a loopback issuer.
    schemes = ("https://",) if issuer.startswith("https://") else ("https://", "http://")
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:  # noqa: S310 - https checked
            document = json.loads(answer.read(1 << 20))
    except (OSError, ValueError) as exc:
        raise jwt.PyJWKClientConnectionError(f"discovery at {url} failed: {exc}") from None
    if not isinstance(document, dict) or document.get("issuer") != issuer:
        raise jwt.PyJWKClientConnectionError(f"discovery at {url} is for another issuer")
    jwks = document.get("jwks_uri")
    if not isinstance(jwks, str) or not jwks.startswith(schemes):
        raise jwt.PyJWKClientConnectionError(f"discovery at {url} names no usable jwks_uri")
    return jwks


class SlurmTokenVerifier:
    """A caller's own Slurm JWT: signature checked with the cluster's key when
    the gateway holds it (no call, no budget), otherwise by slurmrestd itself
    (a ping as the caller, within the budgets of gateway/auth/budget.py)."""

    def __init__(
        self,
        key_file: str | None,
        *,
        per_second: float = 5.0,
        per_client: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._key = Path(key_file).read_bytes() if key_file else None
        # Set once the app's client exists (Authenticator.bind).
        self.slurm: SlurmClient | None = None
        self.budget = CheckBudget(per_second=per_second, per_client=per_client, clock=clock)

    async def user(self, token: str, client: str | None = None) -> tuple[str, float]:
        """The token's user and expiry; raises Unauthenticated. ``client``: the
        sender's address, whose budget a check by slurmrestd is spent from."""
        try:
            claims = jwt.decode(
                token,
                self._key or b"",
                algorithms=["HS256"],
                leeway=_LEEWAY,
                # Without the key the signature is slurmctld's to check, but the
                # expiry is checked here either way.
                options={
                    "verify_signature": self._key is not None,
                    "verify_exp": True,
                    "require": ["exp"],
                },
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the Slurm token has expired") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"the Slurm token does not check out: {exc}") from None
        user = claims.get("sun") or claims.get("username")
        if not isinstance(user, str) or not SLURM_USER.fullmatch(user):
            raise Unauthenticated("the Slurm token names no user (claim 'sun')")
        expires = float(claims["exp"])
        if self._key is None:
            self.budget.spend(user, client)
            await self._ask_slurm(Credentials(user, token, expires))
            self.budget.verified(user)
        return user, expires

    async def _ask_slurm(self, credentials: Credentials) -> None:
        """A ping as the caller. 24.11 and later answer a refused token with 200
        and no controller responding (as an outage looks): then the gateway's
        own ping tells which it was."""
        assert self.slurm is not None, "Authenticator.bind() was not called"
        try:
            pings = await self.slurm.as_user(credentials).ping()
            accepted = any(p.responding for p in pings)
        except SlurmUnavailable:
            raise
        except SlurmError:
            accepted = False
        if accepted:
            return
        if any(p.responding for p in await self.slurm.ping()):
            raise Unauthenticated("slurmrestd refused the Slurm token")
        raise SlurmUnavailable("no Slurm controller responds: the token cannot be checked now")


class Authenticator:
    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        self.enabled = settings.authenticates
        self._clock = clock
        self._file = AuthFile(Path(settings.auth_file)) if settings.auth_file else None
        self._oidc = OidcVerifier(settings) if settings.oidc_issuer else None
        self._slurm_tokens = (
            SlurmTokenVerifier(
                # Mint mode holds the cluster's key: tokens are checked here.
                settings.slurm_jwt_key_file if settings.slurm_auth == "mint" else None,
                per_second=settings.slurm_token_checks_per_second,
                per_client=settings.slurm_token_checks_per_client,
            )
            if settings.auth_slurm_tokens
            else None
        )
        self._anonymous = anonymous(settings.slurm_user)
        self._denied = settings.denied_slurm_user_set()
        self._checked = _Checked(clock)

    def bind(self, slurm: SlurmClient) -> None:
        """The client that checks Slurm tokens when the gateway holds no key."""
        if self._slurm_tokens is not None:
            self._slurm_tokens.slurm = slurm

    def directory(self) -> Directory:
        return self._file.current() if self._file else _EMPTY

    def methods(self) -> list[str]:
        found = []
        if self._file:
            found.append(f"API keys ({self._file.path})")
        if self._oidc:
            found.append(f"OIDC ({self._oidc.issuer})")
        if self._slurm_tokens:
            found.append("Slurm tokens (X-SLURM-USER-TOKEN)")
        return found

    async def authenticate_asgi(self, scope: Mapping[str, Any]) -> Principal:
        """``authenticate`` of an ASGI request: its raw headers and its peer."""
        peer = scope.get("client")
        client = peer[0] if peer else None
        api_key = scope["path"].startswith(ANTHROPIC_PREFIX)
        return await self.authenticate(
            credentials(scope["headers"], api_key=api_key), client=client
        )

    async def authenticate(
        self, headers: Mapping[str, str], *, client: str | None = None
    ) -> Principal:
        """``client``: the caller's address (budgets of Slurm token checks)."""
        if not self.enabled:
            return self._anonymous
        authorization = headers.get("authorization")
        slurm_token = headers.get(TOKEN_HEADER)
        # Present counts, empty or not: an empty header is no way around a check.
        if authorization is not None and slurm_token is not None:
            raise Unauthenticated("send either Authorization or X-SLURM-USER-TOKEN, not both")
        if slurm_token is not None:
            principal = await self._by_slurm_token(slurm_token.strip(), client)
        elif authorization is not None:
            scheme, _, credential = authorization.partition(" ")
            credential = credential.strip()
            if scheme.lower() != "bearer" or not credential:
                raise Unauthenticated("use Authorization: Bearer <key or token>")
            principal = await self._by_bearer(credential)
        else:
            raise Unauthenticated("authentication required", invalid=False)
        if principal.slurm_user in self._denied:
            raise Forbidden(
                f"Slurm user {principal.slurm_user} may not be acted as through the gateway "
                "(GATEWAY_DENIED_SLURM_USERS)"
            )
        claimed = headers.get(USER_HEADER)
        if claimed is not None and claimed != principal.slurm_user:
            refusal = Forbidden(
                f"X-SLURM-USER-NAME {claimed[:64]!r} is not the caller's Slurm user "
                f"({principal.slurm_user}); nobody acts as another user here"
            )
            refusal.principal = principal  # who tried, for the audit line
            raise refusal
        return principal

    async def _by_bearer(self, credential: str) -> Principal:
        if credential.startswith(KEY_PREFIX) or self._oidc is None:
            found = self.directory().by_key(credential)
            if found is None:
                raise Unauthenticated("unknown API key")
            return found
        oidc = self._oidc
        return await self._cached(
            credential, lambda: self._oidc_principal(oidc, credential), method="oidc"
        )

    async def _oidc_principal(self, oidc: OidcVerifier, token: str) -> tuple[Principal, float]:
        claims = await oidc.claims(token)
        return oidc.principal(claims, self.directory()), float(claims["exp"])

    async def _by_slurm_token(self, token: str, client: str | None) -> Principal:
        token = token.removeprefix("SLURM_JWT=")
        verifier = self._slurm_tokens
        if verifier is None:
            raise Unauthenticated("this gateway does not take Slurm tokens (X-SLURM-USER-TOKEN)")

        async def check() -> tuple[Principal, float]:
            user, expires = await verifier.user(token, client)
            principal = self.directory().principal(
                tenant=user,
                slurm_user=user,
                role=Role.USER,
                method=Method.SLURM_TOKEN,
                label=user,
            )
            credentials = Credentials(user, token, expires)
            return dataclasses.replace(principal, credentials=credentials), expires

        return await self._cached(token, check, method="slurm-token")

    async def _cached(
        self,
        token: str,
        check: Callable[[], Awaitable[tuple[Principal, float]]],
        *,
        method: str,
    ) -> Principal:
        # Per method: an OIDC token sent as a Slurm token is checked as one.
        digest = hashlib.sha256(f"{method}\0{token}".encode("utf-8", "surrogateescape")).digest()
        known = self._checked.get(digest)
        if isinstance(known, Principal):
            return known
        if isinstance(known, Exception):
            raise known.with_traceback(None)
        try:
            principal, expires = await check()
        except (Unauthenticated, Forbidden) as exc:
            # A refused token is remembered briefly: a client retrying it in a
            # loop must not cost a JWKS fetch or a slurmrestd call each time.
            self._checked.put(digest, exc, self._clock() + 10)
            raise
        except SlurmError as exc:
            log.warning("token_check_failed", method=method, error=str(exc)[:300])
            raise
        self._checked.put(digest, principal, expires)
        return principal


_EMPTY = empty()
