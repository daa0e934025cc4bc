"""Resource requests as users write them ("64G", "8", "1") and as Slurm wants them."""

from __future__ import annotations

import re

import msgspec

from gateway.core.errors import InvalidRequest

_MEMORY = re.compile(r"\s*([0-9]{1,15}(?:\.[0-9]{1,15})?)\s*([KMGTkmgt]?)(?:[iI]?[bB])?\s*")
_COUNT = re.compile(r"[0-9]{1,9}")
_UNIT_MB = {"": 1.0, "K": 1 / 1024, "M": 1.0, "G": 1024.0, "T": 1024.0 * 1024}

MAX_NODES = 1024
MAX_CPUS = 4096
MAX_GPUS = 64
MAX_MEMORY_MB = 64 * 1024 * 1024  # 64 TiB
MAX_TIME_LIMIT = 365 * 24 * 60


class Resources(msgspec.Struct, frozen=True, kw_only=True):
    """Validated, Slurm-ready resources; ``gpus`` 0 means CPU-only."""

    nodes: int
    cpus: int
    memory_mb: int
    time_limit_minutes: int
    gpus: int

    def as_config(self) -> dict[str, str | int | None]:
        """In the request's own terms (what ``config.resources`` takes)."""
        return {
            "nodes": self.nodes,
            "cpu": str(self.cpus),
            "memory": self.memory,
            "time_limit": self.time_limit_minutes,
            "gpu": str(self.gpus) if self.gpus else None,
        }

    @property
    def memory(self) -> str:
        if self.memory_mb % (1024 * 1024) == 0:
            return f"{self.memory_mb // (1024 * 1024)}T"
        if self.memory_mb % 1024 == 0:
            return f"{self.memory_mb // 1024}G"
        return f"{self.memory_mb}M"


def parse_memory(value: str | int, field: str) -> int:
    """Slurm's memory syntax in MB: "64G", "512M", "1.5G", or a bare number of MB."""
    if isinstance(value, bool):
        raise InvalidRequest.field(field, "expected a size such as '64G' or '512M'")
    if isinstance(value, int):
        mb = value
    else:
        match = _MEMORY.fullmatch(value)
        if not match:
            raise InvalidRequest.field(
                field, f"{value!r} is not a size; use a number with K, M, G or T, e.g. '64G'"
            )
        mb = round(float(match.group(1)) * _UNIT_MB[match.group(2).upper()])
    if mb < 1 or mb > MAX_MEMORY_MB:
        raise InvalidRequest.field(field, f"must be between 1M and {MAX_MEMORY_MB // 1024**2}T")
    return mb


def parse_count(value: str | int, field: str, *, low: int, high: int) -> int:
    if isinstance(value, bool):
        raise InvalidRequest.field(field, "expected a whole number")
    if isinstance(value, str):
        text = value.strip()
        if not _COUNT.fullmatch(text):  # isdigit() also takes "²"
            raise InvalidRequest.field(field, f"{value!r} is not a whole number")
        number = int(text)
    else:
        number = value
    if number < low or number > high:
        raise InvalidRequest.field(field, f"must be between {low} and {high}, got {number}")
    return number
