"""Who is calling: a tenant acting as one Slurm user, with a role and limits."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from gateway.slurm.tokens import Credentials

# Portable user names, as Slurm and useradd take them.
SLURM_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class Role(enum.StrEnum):
    USER = "user"  # its own services only
    ADMIN = "admin"  # every service of the gateway


class Method(enum.StrEnum):
    KEY = "key"
    OIDC = "oidc"
    SLURM_TOKEN = "slurm-token"  # noqa: S105 - a method name
    NONE = "none"  # no authentication configured: loopback only


@dataclass(frozen=True, slots=True)
class Limits:
    """Most services and GPUs at once (None: no limit)."""

    max_services: int | None = None
    max_gpus: int | None = None

    @property
    def any(self) -> bool:
        return self.max_services is not None or self.max_gpus is not None


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    slurm_user: str
    role: Role
    method: Method
    limits: Limits = Limits()
    # The Slurm account jobs are charged to (None: the recipe's or the site's).
    account: str | None = None
    # Which key or subject, for the audit log (never a secret).
    label: str | None = None
    # Pass-through: the caller's own Slurm token, used for its calls.
    credentials: Credentials | None = field(default=None, repr=False)

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


def anonymous(slurm_user: str) -> Principal:
    """The caller when no authentication is configured (loopback only): the
    gateway's own Slurm user, seeing everything."""
    return Principal(tenant="local", slurm_user=slurm_user, role=Role.ADMIN, method=Method.NONE)
