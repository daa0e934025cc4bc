"""slurmrestd adapter: version negotiation, per-version translation, JWT auth."""

from gateway.slurm.adapters import SUPPORTED_VERSIONS, JobList
from gateway.slurm.auth import (
    Credentials,
    FixedCredentials,
    MintedTokens,
    StaticToken,
    TokenProvider,
)
from gateway.slurm.client import SlurmClient
from gateway.slurm.errors import (
    SlurmAuthError,
    SlurmError,
    SlurmErrorDetail,
    SlurmJobNotFound,
    SlurmRequestRejected,
    SlurmUnavailable,
    SlurmUnexpectedResponse,
    SlurmVersionUnsupported,
)
from gateway.slurm.models import (
    JobExit,
    JobInfo,
    JobState,
    JobSubmission,
    PingResult,
    SubmitResult,
)

__all__ = [
    "SUPPORTED_VERSIONS",
    "Credentials",
    "FixedCredentials",
    "JobExit",
    "JobInfo",
    "JobList",
    "JobState",
    "JobSubmission",
    "MintedTokens",
    "PingResult",
    "SlurmAuthError",
    "SlurmClient",
    "SlurmError",
    "SlurmErrorDetail",
    "SlurmJobNotFound",
    "SlurmRequestRejected",
    "SlurmUnavailable",
    "SlurmUnexpectedResponse",
    "SlurmVersionUnsupported",
    "StaticToken",
    "SubmitResult",
    "TokenProvider",
]
