"""Baseline: idle power per device, measured in the serving state (energy.md rule 6).

Measured with the device idle (the caller guarantees no request runs). Where the
counter's update clock is known, over whole counter updates: the counter's energy from
the first to the last update inside the window over that many update periods (exact
energy, time from the period, not from read timing). Otherwise over the same curve as
requests: (E(t1) - E(t0)) / (t1 - t0). Kept per device, latest wins, with its age.
"""
from __future__ import annotations

from dataclasses import dataclass

STALE_AFTER_S = 3600.0  # older baselines are flagged ENERGY_BASELINE_STALE
# A baseline shorter than this (under ~10 counter updates), or with a bound over this share
# of its power, is answered with BASELINE_UNCERTAIN: its bound then dominates adjusted_j's.
SHORT_S = 1.0
UNCERTAIN_SHARE = 0.05


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
    uncertainty_w: float = 0.0
    # Models resident on the device while it was measured (None: not known): a start-up
    # baseline has none, and weights in memory can change the idle power of the serving state.
    models_loaded: int | None = None
    # Other processes seen on the GPU while it was measured (processes.py), for people; '' if none.
    other_processes: str = ""

    @property
    def stale(self) -> bool:
        return self.available and self.age_s > STALE_AFTER_S

    def warnings(self) -> list[tuple[str, str]]:
        if not self.available:
            return []
        out = []
        if self.duration_s < SHORT_S or self.uncertainty_w > UNCERTAIN_SHARE * self.power_w:
            out.append(("BASELINE_UNCERTAIN", f"GPU {self.index}: idle power {self.power_w:.2f} ± "
                                              f"{self.uncertainty_w:.2f} W from {self.duration_s:.2f} s; responses "
                                              "carry this bound in adjusted_uncertainty_j; a longer baseline (30 s "
                                              "by default) is tighter"))
        if self.other_processes:
            out.append(("ENERGY_OTHER_PROCESSES", f"{self.other_processes}: this idle power includes theirs, not "
                                                  "the serving state's alone"))
        return out
