"""Builds the adapters the app needs from :class:`~gateway.settings.Settings`."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from pathlib import Path

from gateway.auth.authenticate import Authenticator
from gateway.auth.authfile import AuthFileError
from gateway.core.deployments.elastic import LoadReader
from gateway.core.deployments.spec import Deployment, DeploymentsFile, DeploymentsFileError
from gateway.core.errors import InvalidRequest
from gateway.core.metadata import MetaCodec
from gateway.core.model import Service
from gateway.core.principal import Method, Principal, Role
from gateway.core.recipes import RecipeCatalog
from gateway.settings import Settings, SettingsError, SlurmAuthMode, env_name
from gateway.slurm import (
    MintedTokens,
    Minter,
    SlurmAuthError,
    SlurmClient,
    StaticToken,
    TokenProvider,
)
from gateway.upstream.limits import Limits
from gateway.upstream.vllm import VllmClient


def token_provider(settings: Settings) -> TokenProvider:
    """The configured token source, checked now: a missing key file or a
    token that is not a JWT raises :class:`SettingsError` naming the variable."""
    if settings.slurm_auth is SlurmAuthMode.MINT:
        variable = "slurm_jwt_key_file"
    else:
        variable = "slurm_token_file" if settings.slurm_token_file is not None else "slurm_token"
    try:
        return _provider(settings)
    except SlurmAuthError as exc:
        raise SettingsError(f"{env_name(variable)}: {exc}") from None


def _provider(settings: Settings) -> TokenProvider:
    if settings.slurm_auth is SlurmAuthMode.MINT:
        assert settings.slurm_jwt_key_file is not None
        return MintedTokens.from_key_file(
            Path(settings.slurm_jwt_key_file),
            settings.slurm_user,
            lifespan=float(settings.slurm_jwt_lifespan),
        )
    user = settings.slurm_user or None
    if settings.slurm_token_file is not None:
        static = StaticToken(path=Path(settings.slurm_token_file), user_name=user)
    else:
        static = StaticToken(value=settings.slurm_token, user_name=user)
    static.check()
    return static


def slurm_client(settings: Settings, tokens: TokenProvider | None = None) -> SlurmClient:
    return SlurmClient(
        settings.slurm_url,
        tokens or token_provider(settings),
        api_version=settings.slurm_api_version,
        timeout=settings.slurm_timeout,
        connect_timeout=settings.slurm_connect_timeout,
        max_concurrency=settings.slurm_max_concurrency,
        queue_timeout=settings.slurm_queue_timeout_seconds,
    )


def vllm_client(settings: Settings) -> VllmClient:
    """The data path's client of services, with its deadlines and share-out."""
    return VllmClient(
        timeout=settings.vllm_timeout,
        connect_timeout=settings.vllm_connect_timeout,
        stream_timeout=settings.vllm_stream_timeout,
        limits=Limits(
            total=settings.vllm_max_connections,
            per_service=settings.vllm_max_per_service,
            per_tenant=settings.vllm_max_per_tenant,
            wait=settings.vllm_queue_seconds,
            budget=settings.vllm_max_buffered_bytes,
        ),
    )


def load_reader(client: VllmClient) -> LoadReader:
    """A running replica's requests running and waiting, and its count of
    finished ones, from its model server's /metrics (through its key)."""

    async def read(service: Service) -> tuple[float, float]:
        upstream = service.upstream
        if upstream is None:
            raise LookupError(f"service {service.id} has no endpoint")
        load = await client.load(upstream.url, upstream.key)
        return load.load, load.succeeded

    return read


def metadata_codec(settings: Settings) -> MetaCodec:
    """The codec of job comments, under the configured secret (checked now)."""
    if settings.secret_file is not None:
        variable = "secret_file"
        try:
            secret = Path(settings.secret_file).read_bytes().strip()
        except OSError as exc:
            raise SettingsError(
                f"{env_name(variable)}: cannot read {settings.secret_file}: {exc.strerror}"
            ) from None
    elif settings.secret is not None:
        variable = "secret"
        secret = settings.secret.encode()
    else:
        # Mint mode: every replica has the cluster's JWT key, so derive from it.
        # Rotating that key then hides the services started before.
        variable = "slurm_jwt_key_file"
        assert settings.slurm_jwt_key_file is not None
        try:
            key = Path(settings.slurm_jwt_key_file).read_bytes()
        except OSError as exc:
            raise SettingsError(f"{env_name(variable)}: cannot read: {exc.strerror}") from None
        secret = hmac.digest(key, b"slurm-ai-gateway/secret", hashlib.sha256)
    try:
        return MetaCodec(secret)
    except ValueError as exc:
        raise SettingsError(f"{env_name(variable)}: {exc}") from None


def authenticator(settings: Settings) -> Authenticator:
    """Client authentication as configured; a broken auth file stops start-up."""
    try:
        return Authenticator(settings)
    except AuthFileError as exc:
        raise SettingsError(f"{env_name('auth_file')}: {exc}") from None
    except OSError as exc:
        raise SettingsError(f"{env_name('slurm_jwt_key_file')}: cannot read: {exc}") from None


def minter(settings: Settings) -> Minter | None:
    """With the cluster's key, tokens for every tenant's Slurm user."""
    if settings.slurm_auth is not SlurmAuthMode.MINT or settings.slurm_jwt_key_file is None:
        return None
    try:
        key = Path(settings.slurm_jwt_key_file).read_bytes()
    except OSError as exc:
        raise SettingsError(f"{env_name('slurm_jwt_key_file')}: cannot read: {exc}") from None
    return Minter(key, lifespan=float(settings.slurm_jwt_lifespan))


def deployments_file(settings: Settings, recipes: RecipeCatalog) -> DeploymentsFile | None:
    """The declared deployments; a file that cannot be read or parsed stops start-up."""
    if settings.deployments_file is None:
        return None
    try:
        return DeploymentsFile(Path(settings.deployments_file), recipes)
    except DeploymentsFileError as exc:
        raise SettingsError(f"{env_name('deployments_file')}: {exc}") from None


def deployment_principal(
    authenticate: Authenticator, gateway_user: Callable[[], str], denied: frozenset[str]
) -> Callable[[Deployment], Principal]:
    """Who a deployment's jobs are made as: its tenant (the auth file's limits
    and account) and that tenant's Slurm user; a shared one, the gateway's own
    user only (a job's user can rewrite what the job publishes, and a shared
    replica takes every tenant's prompts)."""

    def principal(deployment: Deployment) -> Principal:
        tenant, user = deployment.spec.tenant, deployment.spec.slurm_user
        label = f"deployment {deployment.name}"
        if user is not None and user in denied:
            raise InvalidRequest.field("slurm_user", f"{user} is in GATEWAY_DENIED_SLURM_USERS")
        if tenant is None:
            if user is not None and user != gateway_user():
                raise InvalidRequest.field(
                    "slurm_user",
                    f"a shared deployment runs as the gateway's own Slurm user "
                    f"({gateway_user()}), not {user}",
                )
            return Principal(
                tenant="",
                slurm_user=gateway_user(),
                role=Role.ADMIN,
                method=Method.NONE,
                label=label,
            )
        directory = authenticate.directory()
        users = sorted(
            {k.slurm_user for k in directory.spec.keys if k.tenant == tenant}
            | {
                u.slurm_user
                for u in directory.spec.oidc_users
                if (u.tenant or u.slurm_user) == tenant
            }
        )
        if user is None:
            if len(users) != 1:
                found = ", ".join(users) or "none"
                raise InvalidRequest.field(
                    "slurm_user",
                    f"tenant {tenant} has {len(users)} Slurm users in the auth file ({found}); "
                    "name the one its jobs run as",
                )
            user = users[0]
        elif user not in users:
            raise InvalidRequest.field(
                "slurm_user", f"{user} is not a Slurm user of tenant {tenant} in the auth file"
            )
        if user in denied:
            raise InvalidRequest.field("slurm_user", f"{user} is in GATEWAY_DENIED_SLURM_USERS")
        return directory.principal(
            tenant=tenant, slurm_user=user, role=Role.USER, method=Method.KEY, label=label
        )

    return principal
