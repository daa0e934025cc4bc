"""slurmrestd v0.0.42 (Slurm 24.11 to 26.05).

Differs from v0.0.43: ``standard_output``/``standard_error`` are already
expanded (``/tmp/x-12.out``) and there is no ``stdout_expanded``; the inherited
expansion is a no-op on a path without ``%``. Checked live on Slurm 24.11.5
and 26.05.5 (where it is the oldest version served, marked deprecated).
"""

from __future__ import annotations

from typing import ClassVar

from gateway.slurm.adapters.v0_0_43 import V0043


class V0042(V0043):
    version: ClassVar[str] = "v0.0.42"
