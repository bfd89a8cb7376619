"""CPU package energy from RAPL (``/sys/class/powercap/intel-rapl:N``).

Only top-level package zones (``intel-rapl:N`` named ``package-K``) are summed: their
sub-zones (core, uncore, dram) are parts of or beside the package and would count twice,
and the top-level ``psys`` zone (the whole platform, where the firmware offers it)
already contains the packages. ``energy_uj``
wraps at ``max_energy_range_uj`` (minutes at full load); sampling every ~100 ms sees at
most one wrap per read, which ``read`` unwraps into a continuous total.
"""
from __future__ import annotations

import os
import re
import threading

from .sampler import Reading, ReadError

_ZONE = re.compile(r"^intel-rapl:\d+$")


class RaplUnavailable(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _read_int(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


class RaplReader:
    """Probe on construction (raises RaplUnavailable with a reason); ``read`` for the sampler."""

    def __init__(self, root: str = "/sys/class/powercap"):
        self.root = root
        if not os.path.isdir(root):
            raise RaplUnavailable(f"no RAPL: {root} does not exist (not Linux, or no powercap driver for this CPU)")
        zones = sorted((z for z in os.listdir(root) if _ZONE.match(z)), key=lambda z: int(z.split(":")[1]))
        if not zones:
            raise RaplUnavailable(f"no RAPL: no intel-rapl:N package zones under {root}")
        self.zones: list[tuple[str, str, int]] = []  # (dir, name, max range uJ)
        skipped = []
        for z in zones:
            d = os.path.join(root, z)
            try:
                name = open(os.path.join(d, "name")).read().strip() if os.path.exists(os.path.join(d, "name")) else z
                if name != z and not name.startswith("package"):
                    skipped.append(name)  # psys: the platform, packages included
                    continue
                max_uj = _read_int(os.path.join(d, "max_energy_range_uj"))
                _read_int(os.path.join(d, "energy_uj"))
            except PermissionError:
                raise RaplUnavailable(
                    f"RAPL not readable: permission denied on {d}/energy_uj (root-only since Linux 5.10, "
                    "CVE-2020-8694): run the server as root or make energy_uj readable") from None
            except (OSError, ValueError) as exc:
                raise RaplUnavailable(f"RAPL not readable: {d}: {exc}") from None
            self.zones.append((d, name, max_uj))
        if not self.zones:
            raise RaplUnavailable(f"no RAPL: no package zone under {root} (only {', '.join(skipped)})")
        self.domains = [n for _, n, _ in self.zones]
        self._last: list[int | None] = [None] * len(self.zones)
        self._acc_uj = 0  # continuous total across wraps
        self._lock = threading.Lock()

    def read(self) -> Reading:
        """Continuous package energy in mJ (sum of zones, wraps undone)."""
        with self._lock:
            for i, (d, _, max_uj) in enumerate(self.zones):
                try:
                    v = _read_int(os.path.join(d, "energy_uj"))
                except (OSError, ValueError) as exc:
                    raise ReadError(f"RAPL read failed: {d}/energy_uj: {exc}") from None
                last = self._last[i]
                if last is not None:
                    self._acc_uj += v - last if v >= last else v + max_uj - last
                self._last[i] = v
            return Reading(self._acc_uj / 1000.0)
