"""Baseline: idle power per device, measured in the serving state (energy.md rule 6).

Measured over the same curve as requests: (E(t1) - E(t0)) / (t1 - t0) with the device
idle (the caller guarantees no request runs). Kept per device, latest wins, with its age.
"""
from __future__ import annotations

from dataclasses import dataclass

STALE_AFTER_S = 3600.0  # older baselines are flagged ENERGY_BASELINE_STALE


@dataclass(frozen=True)
class BaselineResult:
    index: int
    available: bool
    reason: str = ""
    power_w: float | None = None
    duration_s: float = 0.0
    measured_unix: float = 0.0
    measured_monotonic: float = 0.0
    method: str = ""
    age_s: float = 0.0  # filled in when read back (EnergyMeter.baseline)

    @property
    def stale(self) -> bool:
        return self.available and self.age_s > STALE_AFTER_S
