"""slurmrestd v0.0.45 (Slurm 26.05), the newest version and the head of the chain.

Speaks exactly the shapes of :mod:`gateway.slurm.adapters.current`. Checked
live on Slurm 26.05.5 (``deploy/local/cluster.sh up c2605``).
"""

from __future__ import annotations

from typing import ClassVar

from gateway.slurm.adapters.current import CurrentAdapter


class V0045(CurrentAdapter):
    version: ClassVar[str] = "v0.0.45"
