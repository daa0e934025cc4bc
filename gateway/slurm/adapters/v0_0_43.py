"""slurmrestd v0.0.43 (Slurm 25.05, 25.11, 26.05).

Differs from v0.0.44 in nothing the gateway sends or reads: v0.0.44 adds the
``EXPEDITING`` job state flag (kept as a flag like any other) and deprecates
ping's ``pinged`` and ``mode``. Checked live on Slurm 26.05.5.
"""

from __future__ import annotations

from typing import ClassVar

from gateway.slurm.adapters.v0_0_44 import V0044


class V0043(V0044):
    version: ClassVar[str] = "v0.0.43"
