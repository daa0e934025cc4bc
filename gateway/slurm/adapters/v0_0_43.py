"""slurmrestd v0.0.43 (Slurm 25.05, 25.11).

Differs from v0.0.44 in nothing the gateway reads or sends: both return the
raw ``standard_output`` pattern plus ``stdout_expanded``, take ``job.script``,
epoch ``update_time`` and answer cancels with ``status[]``. v0.0.44 only
deprecates ping's ``pinged`` and ``mode``, which we read as a fallback.

Not checked against a live 25.x daemon here.
"""

from __future__ import annotations

from typing import ClassVar

from gateway.slurm.adapters.v0_0_44 import V0044


class V0043(V0044):
    version: ClassVar[str] = "v0.0.43"
