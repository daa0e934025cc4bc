"""What the core asks of the batch scheduler: exactly these calls, no more.

``gateway.slurm.SlurmClient`` is the real one (slurmrestd); the core depends
on this protocol only, so that its tests can run against the in-memory
``gateway.testing.scheduler.FakeScheduler`` instead of mocked HTTP.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Protocol

from gateway.core.principal import Principal
from gateway.slurm import (
    Credentials,
    JobList,
    JobSubmission,
    Minter,
    NodeInfo,
    SlurmClient,
    SubmitResult,
    TokenProvider,
)


class Scheduler(Protocol):
    """Slurm, as one user: the gateway's own, or the one a view acts as."""

    def as_user(self, credentials: Credentials) -> Scheduler:
        """The same scheduler acting with a caller's own credentials."""
        ...

    def with_tokens(self, tokens: TokenProvider) -> Scheduler:
        """The same scheduler acting with other tokens (another user's, minted)."""
        ...

    async def user_name(self) -> str:
        """The Slurm user this one acts as."""
        ...

    async def list_jobs(self, changed_since: datetime | None = None) -> JobList:
        """Every job the scheduler holds (``unchanged`` when none changed since)."""
        ...

    async def submit(self, job: JobSubmission) -> SubmitResult: ...

    async def update_comment(self, job_id: int, comment: str) -> None: ...

    async def release(self, job_id: int) -> None:
        """Let a job held by its begin time start now."""

    async def shorten(self, job_id: int, minutes: int) -> None:
        """Lower a job's time limit."""

    async def cancel(self, job_id: int, signal: str | None = None) -> None:
        """Cancelling a job that already ended is not an error."""
        ...

    async def get_node(self, name: str) -> NodeInfo: ...

    async def list_nodes(self) -> list[NodeInfo]: ...


class ActingAs:
    """The scheduler acting as a given Slurm user: the caller's own token when
    it sent one, else tokens minted for that user (with the cluster's key),
    else the gateway's own."""

    def __init__(
        self, scheduler: Scheduler, minter: Minter | None, gateway_user: Callable[[], str]
    ) -> None:
        self.scheduler = scheduler
        self.minter = minter
        self.gateway_user = gateway_user
        self._users: dict[str, Scheduler] = {}

    def __call__(self, user: str, principal: Principal | None = None) -> Scheduler:
        credentials = principal.credentials if principal is not None else None
        if credentials is not None and credentials.user_name == user:
            return self.scheduler.as_user(credentials)
        if self.minter is None or user == self.gateway_user():
            return self.scheduler
        client = self._users.get(user)
        if client is None:
            if len(self._users) > 10_000:
                self._users.clear()
            client = self._users[user] = self.scheduler.with_tokens(self.minter.for_user(user))
        return client


def _slurm_is_a_scheduler(client: SlurmClient) -> Scheduler:
    return client  # mypy checks that SlurmClient has every call above
