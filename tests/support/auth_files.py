"""Auth file text for the tests (the format is gateway/auth/authfile.py's),
and who a caller turned out to be."""

from __future__ import annotations

import hashlib

from gateway.core.principal import Method, Principal, Role


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_entry(
    tenant: str = "t", slurm_user: str = "u", digest: str | None = None, **more: str
) -> str:
    """A ``[[keys]]`` entry; ``more`` adds string fields (``name``, ``role``)."""
    return (
        f'[[keys]]\ntenant = "{tenant}"\nslurm_user = "{slurm_user}"\n'
        f'sha256 = "{digest or sha(tenant + slurm_user)}"\n' + _fields(more)
    )


def oidc_entry(subject: str, slurm_user: str, tenant: str, **more: str) -> str:
    """An ``[[oidc_users]]`` entry; ``more`` adds string fields (``role``)."""
    return (
        f'[[oidc_users]]\nsubject = "{subject}"\nslurm_user = "{slurm_user}"\n'
        f'tenant = "{tenant}"\n' + _fields(more)
    )


def _fields(fields: dict[str, str]) -> str:
    return "".join(f'{name} = "{value}"\n' for name, value in fields.items())


def identity(principal: Principal) -> tuple[str, str, Role, Method]:
    """Tenant, Slurm user, role and how the caller authenticated."""
    return (principal.tenant, principal.slurm_user, principal.role, principal.method)
