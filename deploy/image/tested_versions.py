"""Prints ``name==version`` for every package the gateway needs at run time,
as installed in the environment running this script (the one the tests ran
in), for deploy/image/build.sh to use as pip constraints: the image then holds
the versions that were tested, not whatever is newest on the day it is built.
"""

from __future__ import annotations

import importlib.metadata as metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT = "slurm-ai-gateway"


def needed(requirement: Requirement, extras: set[str]) -> bool:
    marker = requirement.marker
    if marker is None:
        return True
    return any(marker.evaluate({"extra": extra}) for extra in extras | {""})


def closure() -> dict[str, str]:
    pinned: dict[str, str] = {}
    todo = [(Requirement(r), {""}) for r in metadata.requires(PROJECT) or []]
    while todo:
        requirement, extras = todo.pop()
        if not needed(requirement, extras):
            continue
        name = canonicalize_name(requirement.name)
        if name in pinned and not requirement.extras:
            continue
        distribution = metadata.distribution(requirement.name)
        pinned[name] = distribution.version
        todo += [(Requirement(r), set(requirement.extras)) for r in distribution.requires or []]
    return pinned


if __name__ == "__main__":
    for name, version in sorted(closure().items()):
        print(f"{name}=={version}")
