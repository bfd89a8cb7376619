"""Other processes on a metered GPU (warning ENERGY_OTHER_PROCESSES).

The energy counter measures the whole GPU: a request's energy includes whatever else ran
on it meanwhile (another job, a second server, a notebook), and another process's CUDA
context alone raises idle power (~81 to ~124 W on an H200, energy.md). ``exclusive``
speaks only of this server's requests, so the meter also watches NVML's lists of compute
and MPS-client processes. The sampler thread reads them about once a second and soon
after a window opens, never on a request's path, and keeps the listings as changes. A
window that overlaps a listing with any process besides its GPU's worker (and the
worker's own children, e.g. compile helpers) is warned. A process that starts during a
window is seen at the next listing, about a second later: one that starts in a window's
last second may go unseen. Under MPS the MPS clients are listed (nvml.compute_pids).

PIDs: the driver gives host PIDs, also inside a container with its own PID namespace,
where the worker does not appear under its own PID. Until the GPU's worker has appeared
in a listing, a listing is judged by its length (one process is taken to be the worker),
and children cannot be told apart there.
"""
from __future__ import annotations

import threading
from collections import deque
from pathlib import Path
from typing import Callable

PROCESS_EVERY_S = 1.0  # how often the sampler thread lists the GPU's processes
SOON_GAP_S = 0.5       # a window's opening asks for a listing, at most this often
FAILED_AFTER = 3       # consecutive failed listings before the processes are "unknown"
KEEP_CHANGES = 1024    # listings kept (only changes: a steady GPU keeps one)


def _parent(pid: int, proc: Path) -> int | None:
    try:
        stat = (proc / str(pid) / "stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[1])  # after "(comm) state": the parent's PID
    except (OSError, ValueError, IndexError):
        return None


def descendants(pids: frozenset[int], ancestors: set[int], proc: Path = Path("/proc")) -> frozenset[int]:
    """Those of ``pids`` whose chain of parents reaches one of ``ancestors`` (Linux /proc)."""
    out = set()
    for pid in pids:
        p, hops = pid, 0
        while p and p > 1 and hops < 64:
            p, hops = _parent(p, proc), hops + 1
            if p in ancestors:
                out.add(pid)
                break
    return frozenset(out)


class ProcessWatch:
    """The processes NVML lists on one GPU, over time.

    ``read`` returns the PIDs (raises on failure); ``server_pids`` returns this server's
    workers as {pid: GPU index}. ``poll`` runs on the sampler thread; ``soon`` and
    ``others`` on any.
    """

    def __init__(self, index: int, read: Callable[[], frozenset[int]], clock: Callable[[], float],
                 every_s: float = PROCESS_EVERY_S, keep: int = KEEP_CHANGES, proc: Path = Path("/proc")):
        self.index = index
        self._read = read
        self._clock = clock
        self._every = every_s
        self._proc = proc
        # (time, PIDs listed or None when unknown, those of them that are our workers' children)
        self._changes: deque[tuple[float, frozenset[int] | None, frozenset[int]]] = deque(maxlen=keep)
        self._last_poll: float | None = None
        self._soon = False
        self._failures = 0
        self.last_error = ""
        self._comparable = False  # one of our PIDs was listed: PIDs are in our namespace
        self._lock = threading.Lock()
        self.server_pids: Callable[[], dict[int, int]] = dict

    def soon(self) -> None:
        """A window opened: list at the next read (``SOON_GAP_S`` apart at most) so the
        listing in force at its start is fresh."""
        self._soon = True

    @property
    def failing(self) -> str:
        """Why the processes are unknown now ('' while listings succeed)."""
        return self.last_error if self._failures >= FAILED_AFTER else ""

    def _ours(self) -> dict[int, int]:
        try:
            return dict(self.server_pids() or {})
        except Exception:  # noqa: BLE001 - a broken callback must not lose a figure
            return {}

    def poll(self) -> None:
        now = self._clock()
        if self._last_poll is not None:
            gap = now - self._last_poll
            if gap < self._every and not (self._soon and gap >= SOON_GAP_S):
                return
        self._last_poll, self._soon = now, False
        try:
            pids = frozenset(self._read())
        except Exception as exc:  # noqa: BLE001 - never stops the sampler
            self._failures += 1
            self.last_error = getattr(exc, "reason", None) or repr(exc)
            if self._failures == FAILED_AFTER:  # persistent: the last listing no longer holds
                with self._lock:
                    self._changes.append((now, None, frozenset()))
            return  # a passing failure keeps the last good listing in force
        self._failures, self.last_error = 0, ""
        with self._lock:
            last = self._changes[-1] if self._changes else None
        if last is not None and last[1] == pids:
            return
        ours = self._ours()
        # This GPU's own worker listed under its own PID: the driver's PIDs are ours (a
        # container's PID namespace would give host PIDs). Any PID of ours would let one
        # host PID equal by chance to a sibling's flip it for good.
        self._comparable |= any(p in pids for p, i in ours.items() if i == self.index)
        children = descendants(pids - ours.keys(), set(ours), self._proc) if self._comparable and ours else frozenset()
        with self._lock:
            self._changes.append((now, pids, children))

    def others(self, t0: float, t1: float) -> str:
        """What else used this GPU in [t0, t1], for people ("1 other process(es) used GPU 0
        meanwhile (PID 4242)"); '' if nothing was seen."""
        with self._lock:
            changes = list(self._changes)
        listings: list[tuple[frozenset[int], frozenset[int]]] = []
        for t, pids, children in changes:  # the listing in force at t0, and each one after it up to t1
            if t <= t0:
                listings = [(pids, children)] if pids is not None else []
            elif t <= t1 and pids is not None:
                listings.append((pids, children))
        if not listings:
            return ""
        ours = self._ours()
        mine = {p for p, i in ours.items() if i == self.index}
        named: set[int] = set()
        unnamed: set[int] = set()  # listings judged by length (host PIDs seen from a container)
        extra = 0
        for pids, children in listings:
            if self._comparable:
                named |= pids - mine - children
            elif len(pids) > 1:
                unnamed |= pids
                extra = max(extra, len(pids) - 1)
        if not named and not extra:
            return ""
        if named:
            shown = ", ".join(f"{p} (this server's worker for GPU {ours[p]})" if p in ours else str(p)
                              for p in sorted(named))
            return f"{len(named)} other process(es) used GPU {self.index} meanwhile (PID {shown})"
        return (f"NVML listed {extra + 1} processes on GPU {self.index} meanwhile where this server runs one "
                f"(host PIDs {', '.join(map(str, sorted(unnamed)))})")
