"""What the tests run beside the code under test (a gateway process, an OIDC
issuer): started by ``start()`` or on entering a ``with`` block, stopped by
``stop()`` or on leaving it."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Running:
    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
