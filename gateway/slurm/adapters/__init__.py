"""One adapter per slurmrestd API version, newest first.

The full implementation, in the newest shapes and named by no version, is
``current.py``; ``base.py`` holds what no version changes (paths, error
mapping). Each version module documents how its version differs from the next
newer one; the classes inherit in that order (``V0045`` from
``CurrentAdapter``, ``V0044`` from ``V0045``, ...), so a difference lives in
exactly one place.

Adding a version (say v0.0.46): write ``v0_0_46.py`` with ``class
V0046(CurrentAdapter)`` naming its version, make ``V0045`` inherit from it,
and put it first in ``ADAPTERS`` below. Record a cluster that serves it
(``make fixtures ONLY=<cluster>``, scripts/record_fixtures.py): its answers land
in ``tests/fixtures/slurmrestd/<release>/v0.0.46/`` and every recorded-answer
test in tests/unit/slurm/adapters/ then runs against them. Where a test
fails, the new version changed a shape: change it in ``current.py`` and give
``v0_0_45.py`` the old one back, saying so in its docstring.
"""

from __future__ import annotations

from gateway.slurm.adapters.base import Adapter, JobList, Request
from gateway.slurm.adapters.v0_0_38 import V0038
from gateway.slurm.adapters.v0_0_39 import V0039
from gateway.slurm.adapters.v0_0_40 import V0040
from gateway.slurm.adapters.v0_0_41 import V0041
from gateway.slurm.adapters.v0_0_42 import V0042
from gateway.slurm.adapters.v0_0_43 import V0043
from gateway.slurm.adapters.v0_0_44 import V0044
from gateway.slurm.adapters.v0_0_45 import V0045

ADAPTERS: dict[str, type[Adapter]] = {
    cls.version: cls for cls in (V0045, V0044, V0043, V0042, V0041, V0040, V0039, V0038)
}
SUPPORTED_VERSIONS: tuple[str, ...] = tuple(ADAPTERS)


def adapter_for(version: str) -> Adapter:
    try:
        return ADAPTERS[version]()
    except KeyError:
        raise ValueError(
            f"unsupported slurmrestd API version {version!r}; "
            f"supported: {', '.join(SUPPORTED_VERSIONS)}"
        ) from None


__all__ = ["ADAPTERS", "SUPPORTED_VERSIONS", "Adapter", "JobList", "Request", "adapter_for"]
