"""slurmrestd v0.0.44 (Slurm 25.11, 26.05).

Differs from v0.0.45 in nothing the gateway sends or reads: ping items still
carry the deprecated ``pinged`` ("UP") and ``mode`` beside ``responding``;
job records and descriptions lack fields we neither send nor read
(``container_type``, ``cores_per_socket``, ``memory_update_*``) and records
still carry ``power``. v0.0.45 adds requeue and ``conf`` endpoints, which we do
not use. Checked live on Slurm 26.05.5.
"""

from __future__ import annotations

from typing import ClassVar

from gateway.slurm.adapters.v0_0_45 import V0045


class V0044(V0045):
    version: ClassVar[str] = "v0.0.44"
