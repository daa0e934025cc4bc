"""A tiny, real OIDC issuer for the tests: discovery document and JWKS served
over HTTP on 127.0.0.1, RSA keys made with ``cryptography``, tokens signed
with pyjwt. Keys can be added while it runs (rotation), and tokens can be
forged every way an attacker would try (see :meth:`Issuer.forged`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from typing import Any, Self

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.jwks import JsonServer, new_key, public_jwk, public_pem
from tests.support.lifecycle import Running

AUDIENCE = "slurm-ai-gateway-tests"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json_b64(value: dict[str, Any]) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode())


class Issuer(Running):
    """``with Issuer() as issuer: issuer.token("gwteam@example.org")``."""

    def __init__(self, audience: str = AUDIENCE) -> None:
        self.audience = audience
        self._lock = threading.Lock()
        self.keys: dict[str, rsa.RSAPrivateKey] = {}
        self.current = self.add_key()
        self.jwks_fetches = 0
        self.http = JsonServer(self._answer)
        self.url = self.http.url

    def _answer(self, path: str) -> Any:
        if path == "/.well-known/openid-configuration":
            return {
                "issuer": self.url,
                "jwks_uri": f"{self.url}/jwks",
                "id_token_signing_alg_values_supported": ["RS256"],
            }
        if path == "/jwks":
            with self._lock:
                self.jwks_fetches += 1
            return self.jwks()
        return 404

    # -- keys ---------------------------------------------------------------

    def add_key(self) -> str:
        """A new signing key in the JWKS (rotation); its kid, now the current one."""
        kid = f"k-{uuid.uuid4().hex[:8]}"
        with self._lock:
            self.keys[kid] = new_key()
        self.current = kid
        return kid

    def jwks(self) -> dict[str, Any]:
        with self._lock:
            keys = list(self.keys.items())
        return {"keys": [public_jwk(key, kid) for kid, key in keys]}

    def public_pem(self, kid: str | None = None) -> bytes:
        return public_pem(self.keys[kid or self.current])

    # -- tokens -------------------------------------------------------------

    def claims(self, subject: str, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.url,
            "aud": self.audience,
            "sub": uuid.uuid4().hex,
            "preferred_username": subject,
            "iat": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,  # every token differs (the gateway caches checks)
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(
        self,
        subject: str,
        *,
        kid: str | None = None,
        key: rsa.RSAPrivateKey | None = None,
        **overrides: Any,
    ) -> str:
        """A token signed RS256 with the issuer's key ``kid`` (or ``key``);
        ``overrides`` replace claims (None drops one)."""
        kid = kid or self.current
        signing = key or self.keys[kid]
        return jwt.encode(
            self.claims(subject, **overrides), signing, algorithm="RS256", headers={"kid": kid}
        )

    def forged(self, how: str, subject: str) -> str:
        """A token for ``subject`` made the way an attacker would."""
        if how == "alg-none":
            header = {"alg": "none", "typ": "JWT", "kid": self.current}
            return f"{_json_b64(header)}.{_json_b64(self.claims(subject))}."
        if how == "hs256-public-key":
            # Algorithm confusion: HMAC with the public key (as the JWKS
            # publishes it) as the secret. pyjwt refuses to make one, so by hand.
            header = {"alg": "HS256", "typ": "JWT", "kid": self.current}
            signing_input = f"{_json_b64(header)}.{_json_b64(self.claims(subject))}"
            mac = hmac.new(self.public_pem(), signing_input.encode(), hashlib.sha256).digest()
            return f"{signing_input}.{_b64(mac)}"
        if how == "signature-changed":
            header_b64, payload_b64, signature = self.token(subject).split(".")
            raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
            raw[len(raw) // 2] ^= 0x01  # one bit, in the middle
            return f"{header_b64}.{payload_b64}.{_b64(bytes(raw))}"
        if how == "payload-changed":
            # A valid token for another subject, its payload swapped for ours.
            header_b64, _, signature = self.token("gwuser@example.org").split(".")
            return f"{header_b64}.{_json_b64(self.claims(subject))}.{signature}"
        if how == "foreign-key":
            # Signed by a key of nobody's JWKS, with the kid of the real one.
            return self.token(subject, key=new_key())
        raise ValueError(f"no forgery {how!r}")

    # -- running ------------------------------------------------------------

    def start(self) -> Self:
        self.http.start()
        return self

    def stop(self) -> None:
        self.http.stop()
