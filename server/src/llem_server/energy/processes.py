"""Other processes on a metered GPU (warning ENERGY_OTHER_PROCESSES).

The energy counter measures the whole GPU: a request's energy includes whatever else ran
on it meanwhile (another job, a second server, a notebook), and another process's CUDA
context alone raises idle power (~81 to ~124 W on an H200, energy.md). ``exclusive``
speaks only of this server's requests, so the meter also watches NVML's list of compute
processes. The sampler thread reads it about once a second, never a request, and keeps
the listings as changes. A window that overlaps a listing with any process besides its
GPU's worker is warned; a process that came and went between two listings is not seen.

PIDs: the driver gives host PIDs, also inside a container with its own PID namespace,
where none of this server's workers appears under its own PID. Then a listing is judged
by its length: one process is taken to be the worker.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Callable

PROCESS_EVERY_S = 1.0  # how often the sampler thread lists the GPU's compute processes
KEEP_CHANGES = 256     # listings kept (only changes are kept: a steady GPU keeps one)


class ProcessWatch:
    """The compute processes NVML lists on one GPU, over time.

    ``read`` returns the PIDs (raises on failure); ``server_pids`` returns this server's
    workers as {pid: GPU index}. ``poll`` runs on the sampler thread; ``others`` on any.
    """

    def __init__(self, index: int, read: Callable[[], frozenset[int]], clock: Callable[[], float],
                 every_s: float = PROCESS_EVERY_S, keep: int = KEEP_CHANGES):
        self.index = index
        self._read = read
        self._clock = clock
        self._every = every_s
        self._changes: deque[tuple[float, frozenset[int] | None]] = deque(maxlen=keep)  # None: read failed
        self._last_poll: float | None = None
        self._lock = threading.Lock()
        self.server_pids: Callable[[], dict[int, int]] = dict

    def poll(self) -> None:
        now = self._clock()
        if self._last_poll is not None and now - self._last_poll < self._every:
            return
        self._last_poll = now
        try:
            pids: frozenset[int] | None = frozenset(self._read())
        except Exception:  # noqa: BLE001 - unknown until the next good read; never stops the sampler
            pids = None
        with self._lock:
            if not self._changes or self._changes[-1][1] != pids:
                self._changes.append((now, pids))

    def others(self, t0: float, t1: float) -> str:
        """Why this GPU was not this server's alone in [t0, t1], for people; '' if nothing was seen."""
        with self._lock:
            changes = list(self._changes)
        listings: list[frozenset[int]] = []
        for t, pids in changes:  # the listing in force at t0, and each one after it up to t1
            if t <= t0:
                listings = [pids] if pids is not None else []
            elif t <= t1 and pids is not None:
                listings.append(pids)
        if not listings:
            return ""
        ours = self.server_pids() or {}
        mine = {p for p, i in ours.items() if i == self.index}
        named: set[int] = set()
        unnamed: set[int] = set()  # listings where no PID of ours appears (host PIDs seen from a container)
        extra = 0
        for pids in listings:
            if pids & ours.keys():
                named |= pids - mine
            elif len(pids) > 1:
                unnamed |= pids
                extra = max(extra, len(pids) - 1)
        if not named and not extra:
            return ""
        head = f"GPU {self.index}: "
        if named:
            shown = ", ".join(f"{p} (this server's worker for GPU {ours[p]})" if p in ours else str(p)
                              for p in sorted(named))
            head += f"{len(named)} other compute process(es) used the GPU during this window (PID {shown})"
        else:
            head += (f"NVML listed {extra + 1} compute processes during this window where this server runs one "
                     f"(host PIDs {', '.join(map(str, sorted(unnamed)))})")
        return (head + ": the energy counter measures the whole GPU, so their energy is in this figure "
                       f"(processes are listed about every {self._every:g} s)")
