"""slurmrestd adapter: version negotiation, per-version translation, JWT auth."""

from gateway.slurm.adapters import SUPPORTED_VERSIONS, JobList
from gateway.slurm.client import SlurmClient
from gateway.slurm.errors import (
    SlurmAuthError,
    SlurmBusy,
    SlurmError,
    SlurmErrorDetail,
    SlurmJobNotFound,
    SlurmNodeNotFound,
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
    NodeInfo,
    PingResult,
    SubmitResult,
)
from gateway.slurm.tokens import (
    Credentials,
    FixedCredentials,
    MintedTokens,
    Minter,
    StaticToken,
    TokenProvider,
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
    "Minter",
    "NodeInfo",
    "PingResult",
    "SlurmAuthError",
    "SlurmBusy",
    "SlurmClient",
    "SlurmError",
    "SlurmErrorDetail",
    "SlurmJobNotFound",
    "SlurmNodeNotFound",
    "SlurmRequestRejected",
    "SlurmUnavailable",
    "SlurmUnexpectedResponse",
    "SlurmVersionUnsupported",
    "StaticToken",
    "SubmitResult",
    "TokenProvider",
]
