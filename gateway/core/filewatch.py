"""A configuration file re-read when it changes (the auth file, the deployments
file): its inode, modification time and size, looked at no more often than
every ``every`` seconds. A mounted Secret or ConfigMap is swapped for a new
inode, which this sees too."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path


class FileWatch:
    def __init__(
        self, path: Path, *, every: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = path
        self.every = every
        self.clock = clock
        self._stamp: tuple[int, int, int] | None = None
        self._checked = float("-inf")

    def read(self) -> str:
        """The file's text, its version noted as read (OSError, UnicodeDecodeError)."""
        st = self.path.stat()
        text = self.path.read_text(encoding="utf-8")
        self._stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        return text

    def changed(self) -> bool:
        """Whether, when a look is due, the file differs from the version last
        seen. That version counts as seen from now, read or not, so a broken
        one is reported once. OSError when the file cannot be looked at."""
        now = self.clock()
        if now - self._checked < self.every:
            return False
        self._checked = now
        st = self.path.stat()
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        return True
