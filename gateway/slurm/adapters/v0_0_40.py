"""slurmrestd v0.0.40 (Slurm 23.11 to 25.05).

Differs from v0.0.41 only in what the gateway ignores: the submit answer also
carries a deprecated ``result`` object, and plain integers are accepted with a
warning where v0.0.41 takes them silently (we always send ``{set, number}``).
``job.script`` is accepted as in v0.0.41. Checked live on Slurm 24.11.5.
"""

from __future__ import annotations

from typing import ClassVar

from gateway.slurm.adapters.v0_0_41 import V0041


class V0040(V0041):
    version: ClassVar[str] = "v0.0.40"
