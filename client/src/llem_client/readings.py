"""A phase's energy from two ``ReadEnergy`` readings (pure functions, no I/O)."""
from __future__ import annotations

from llem.v1 import llem_pb2


def energy_between(start: llem_pb2.ReadEnergyResponse, end: llem_pb2.ReadEnergyResponse) -> list[dict]:
    """Each GPU's energy between two readings, idle time between requests included.

    One dict per GPU of ``end``: ``index``, ``uuid``, ``duration_s`` and either ``energy_j``
    with ``uncertainty_j`` (the sum of both readings' bounds) and ``method``, or
    ``energy_j`` None with ``unavailable_reason`` (never a 0 that would read as measured).
    """
    before = {d.index: d for d in start.devices}
    out = []
    for e in end.devices:
        s = before.get(e.index)
        row = {"index": e.index, "uuid": e.uuid, "duration_s": end.monotonic_s - start.monotonic_s}
        if start.server_id != end.server_id:
            why = "the server restarted between the readings: the energy across it is unknown"
        elif s is None:
            why = "no reading of this GPU at the start"
        elif not s.available or not e.available:
            why = (s if not s.available else e).unavailable_reason or "not read"
        elif s.uuid != e.uuid:
            why = "the readings are of different GPUs"
        elif s.counter_resets != e.counter_resets:
            why = "the energy counter was reset between the readings: the energy across it is unknown"
        else:
            why = None
        if why is None:
            row.update(energy_j=e.energy_j - s.energy_j, uncertainty_j=e.uncertainty_j + s.uncertainty_j,
                       method=e.method)
        else:
            row.update(energy_j=None, uncertainty_j=None, unavailable_reason=why)
        out.append(row)
    return out
