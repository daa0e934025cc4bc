"""slurmrestd v0.0.41 (Slurm 24.05 to 25.11).

Differs from v0.0.42:

* ``update_time`` is parsed by Slurm's ``parse_time()``, so epoch seconds give
  HTTP 422; we send the relative form ``now-N`` (seconds), which needs no
  agreement on the server's time zone;
* cancel answers only ``errors[]`` (no per-job ``status[]``), and cancelling a
  finished job is a success;
* ping items have no ``responding``: a controller that answers is
  ``pinged: "UP"``.

Checked live on Slurm 24.11.5.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import ClassVar

import msgspec

from gateway.slurm.adapters import current
from gateway.slurm.adapters.v0_0_42 import V0042


class Ping(current.Ping, frozen=True):
    pinged: str = ""


class PingResponse(current.PingResponse, frozen=True):
    pings: list[Ping] = msgspec.field(default_factory=list)  # type: ignore[assignment]


class V0041(V0042):
    version: ClassVar[str] = "v0.0.41"
    ping_model: ClassVar[type[current.PingResponse]] = PingResponse

    def responding(self, ping: current.Ping) -> bool:
        if isinstance(ping, Ping) and ping.responding is None:
            return ping.pinged == "UP"
        return super().responding(ping)

    def update_time_param(self, since: datetime) -> dict[str, str]:
        # ``since`` is slurmctld's clock, "now" ours: three extra seconds cover
        # the rounding and some skew, at worst a full list.
        age = max(0, int(time.time() - since.timestamp())) + 3
        return {"update_time": f"now-{age}"}

    def parse_cancel(self, status: int, content: bytes, job_id: int) -> None:
        self.check(status, content, what=f"cancel job {job_id}")
