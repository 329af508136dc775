"""How far a transfer has come, in the numbers a person reads (bytes, instances, rate)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    bytes_done: int  # original bytes of instances stored (or already present)
    bytes_total: int
    instances_done: int
    instances_total: int
    rate: float  # original bytes per second, smoothed
    eta: float | None  # seconds, None while unknown

    @property
    def fraction(self) -> float:
        return self.bytes_done / self.bytes_total if self.bytes_total else 1.0
