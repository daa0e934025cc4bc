"""Shell scripts the tests run, run without root: hostile text and recipes
with stand-ins may call anything (``hostname a`` once renamed the machine the
suite ran on), so under root they run as nobody, with no groups and no way
back (``setpriv``), in a folder of their own that nobody may write."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

NOBODY = 65534
# Signals at their defaults, as slurmstepd starts a job: a suite started in
# the background inherits SIGINT ignored (bash without job control does that),
# and a script cannot trap a signal it was started ignoring.
DEFAULT_SIGNALS = ["env", "--default-signal=INT,QUIT"]


def unprivileged(argv: Sequence[str]) -> list[str]:
    """``argv``, run as nobody when the tests run as root."""
    if os.geteuid() != 0:
        return [*DEFAULT_SIGNALS, *argv]
    if shutil.which("setpriv") is None:
        raise RuntimeError("tests that run scripts as root need setpriv (util-linux)")
    return [
        *DEFAULT_SIGNALS, "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
        "--no-new-privs", "--inh-caps=-all", *argv,
    ]  # fmt: skip


def run(argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    return subprocess.run(unprivileged(argv), **kwargs)


def popen(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    return subprocess.Popen(unprivileged(argv), **kwargs)


@contextmanager
def folder() -> Iterator[Path]:
    """A fresh folder the scripts may write (pytest's tmp_path is root's only)."""
    path = Path(tempfile.mkdtemp(prefix="gw-test-"))
    try:
        if os.geteuid() == 0:
            os.chown(path, NOBODY, NOBODY)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
