"""Typed failures of slurmrestd calls, carrying Slurm's own error numbers and text."""

from __future__ import annotations

import msgspec

# Slurm error numbers (slurm_errno.h) the gateway reacts to.
ESLURM_INVALID_JOB_ID = 2017
ESLURM_INVALID_NODE_NAME = 2018
ESLURM_ALREADY_DONE = 2021
SLURM_PROTOCOL_AUTHENTICATION_ERROR = 1007


class SlurmErrorDetail(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of slurmrestd's ``errors[]``, normalised across versions."""

    error_number: int
    error: str = ""
    description: str = ""
    source: str = ""

    def __str__(self) -> str:
        parts = [p for p in (self.error, self.description) if p]
        text = ": ".join(parts) or "unknown error"
        return f"{text} (error {self.error_number})"


class SlurmError(Exception):
    """Base of every slurmrestd failure. ``str()`` never contains credentials."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        errors: tuple[SlurmErrorDetail, ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.errors = errors

    @property
    def error_numbers(self) -> tuple[int, ...]:
        return tuple(e.error_number for e in self.errors)

    def __str__(self) -> str:
        if not self.errors:
            return self.message
        return f"{self.message}: " + "; ".join(str(e) for e in self.errors)


class SlurmUnavailable(SlurmError):
    """slurmrestd could not be reached, timed out, or said slurmctld is down."""


class SlurmBusy(SlurmUnavailable):
    """This replica already has as many slurmrestd calls in flight as allowed."""


class SlurmAuthError(SlurmError):
    """The token was refused (expired, forged, wrong user) or none could be made."""


class SlurmJobNotFound(SlurmError):
    """Slurm does not know the job id (never existed, or purged after MinJobAge)."""


class SlurmNodeNotFound(SlurmError):
    """Slurm knows no node of that name."""


class SlurmRequestRejected(SlurmError):
    """Slurm refused the request itself: bad partition, memory, node configuration."""


class SlurmUnexpectedResponse(SlurmError):
    """A body or status the adapter does not understand; never a bare KeyError."""


class SlurmVersionUnsupported(SlurmError):
    """The daemon serves no API version this gateway can speak."""
