"""The front process's view of every worker's model cache.

Workers hold the models; this mirror answers ListModels without asking them, routes a
config hash to the device that holds it, and counts the requests using each entry.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from llem.v1 import llem_pb2

READY, LOADING, FAILED = llem_pb2.MODEL_STATE_READY, llem_pb2.MODEL_STATE_LOADING, llem_pb2.MODEL_STATE_FAILED

# Failed loads listed with their reasons, the most recent ones: each distinct bad config
# is an entry (and a health status), so without a bound a client could grow ListModels
# past the message limit one failed LoadModel at a time.
MAX_FAILED = 32


@dataclass
class Entry:
    config_hash: str
    config: llem_pb2.ModelConfig
    device_index: int
    state: int = LOADING
    active: int = 0
    info: dict = field(default_factory=dict)  # from the worker: memory, load/compile time, use count, ...
    load_energy: llem_pb2.Energy | None = None
    load_energy_warnings: list = field(default_factory=list)
    load_energy_task: Any = None  # asyncio.Task measuring load_energy once the counter passes the load
    error: str = ""
    tokenizer: Any = None  # tokenizers.Tokenizer for decoding streams in this process
    last_used_unix: float = field(default_factory=time.time)
    use_count: int = 0
    failed_at: float = 0.0  # time.monotonic() of the last failed load

    def to_proto(self) -> llem_pb2.ModelInfo:
        info = self.info
        msg = llem_pb2.ModelInfo(
            config_hash=self.config_hash, state=self.state, device=info.get("device", ""),
            memory_bytes=int(info.get("memory_bytes", 0)), load_time_s=float(info.get("load_time_s", 0.0)),
            compile_time_s=float(info.get("compile_time_s", 0.0)), compiled=bool(info.get("compiled", False)),
            loaded_unix=float(info.get("loaded_unix", 0.0)), last_used_unix=self.last_used_unix,
            use_count=self.use_count, error=self.error, active_requests=self.active,
            resolved_revision=info.get("resolved_revision", ""),
        )
        msg.config.CopyFrom(self.config)
        for code, message in info.get("warnings", ()):
            msg.warnings.add(code=code, message=message)
        if self.load_energy is not None:
            msg.load_energy.CopyFrom(self.load_energy)
        return msg


class Registry:
    def __init__(self, on_change: Callable[[str, int | None], None] | None = None):
        self._entries: dict[str, Entry] = {}
        # on_change(config_hash, state or None when gone): health statuses follow it.
        self.on_change = on_change or (lambda h, s: None)

    def get(self, config_hash: str) -> Entry | None:
        return self._entries.get(config_hash)

    def reserve(self, config_hash: str, config: llem_pb2.ModelConfig, device_index: int) -> Entry:
        """Count one more request on this config; creates a LOADING entry if new.

        While requests hold an entry it stays the one entry for its hash (a failed one is
        retried in place), so every request reports its load to the entry that is listed.
        """
        entry = self._entries.get(config_hash)
        if entry is None:
            entry = Entry(config_hash, config, device_index)
            self._entries[config_hash] = entry
            self.on_change(config_hash, LOADING)
        elif entry.state == FAILED:
            entry.state, entry.error, entry.device_index = LOADING, "", device_index
            self.on_change(config_hash, LOADING)
        entry.active += 1
        return entry

    def release(self, entry: Entry) -> None:
        entry.active = max(0, entry.active - 1)
        if entry.active == 0 and entry.state == LOADING:
            # Nobody left to load it (cancelled, worker died, or it was unloaded under them).
            self._forget(entry)
        elif entry.active == 0 and entry.state == FAILED:
            self._drop_old_failures()

    def loaded(self, entry: Entry, info: dict, tokenizer_json: str | None) -> None:
        entry.info = info
        entry.state = READY
        entry.error = ""
        if tokenizer_json and entry.tokenizer is None:
            try:
                from tokenizers import Tokenizer

                entry.tokenizer = Tokenizer.from_str(tokenizer_json)
            except Exception:  # noqa: BLE001 - streams then carry ids only
                entry.tokenizer = None
        self.on_change(entry.config_hash, READY)

    def used(self, entry: Entry, info: dict) -> None:
        entry.info = info
        entry.use_count += 1
        entry.last_used_unix = time.time()

    def failed(self, entry: Entry, reason: str) -> None:
        """A failed load is remembered with its reason but never counted as ready."""
        if entry.state != READY:
            entry.state = FAILED
            entry.error = reason
            entry.failed_at = time.monotonic()
            self.on_change(entry.config_hash, FAILED)
            self._drop_old_failures()

    def _drop_old_failures(self) -> None:
        """Forget the oldest failed entries beyond MAX_FAILED, as an unload would. Entries that
        requests still hold stay (their requests report to them) and go once released."""
        idle = [e for e in self._entries.values() if e.state == FAILED and e.active == 0]
        for entry in sorted(idle, key=lambda e: e.failed_at)[: max(0, len(idle) - MAX_FAILED)]:
            self._forget(entry)

    def remove(self, config_hash: str) -> Entry | None:
        """The worker no longer holds this model (unloaded, evicted, or its worker restarted).

        Requests still holding the entry (queued behind the unload, or resent to a restarted
        worker) will load the model again: it stays listed as LOADING until one of them
        reports the load, or goes when the last of them is done.
        """
        entry = self._entries.get(config_hash)
        if entry is None:
            return None
        if entry.active == 0:
            self._forget(entry)
        else:
            entry.state, entry.info = LOADING, {}
            self.on_change(config_hash, LOADING)
        return entry

    def _forget(self, entry: Entry) -> None:
        if self._entries.get(entry.config_hash) is entry:
            del self._entries[entry.config_hash]
            self.on_change(entry.config_hash, None)

    def drop_device(self, device_index: int) -> None:
        for h in [h for h, e in self._entries.items() if e.device_index == device_index]:
            self.remove(h)

    def device_of(self, config_hash: str) -> int | None:
        entry = self._entries.get(config_hash)
        return None if entry is None or entry.state == FAILED else entry.device_index

    def loaded_on(self, device_index: int) -> int:
        """Models resident (READY) on a device."""
        return len(self.ready_on(device_index))

    def ready_on(self, device_index: int) -> list[str]:
        """Config hashes of the models resident (READY) on a device, most recently used first."""
        return [e.config_hash for e in self.list() if e.device_index == device_index and e.state == READY]

    def hashes_on(self, device_index: int) -> list[str]:
        return [h for h, e in self._entries.items() if e.device_index == device_index and e.active > 0]

    def list(self) -> list[Entry]:
        return sorted(self._entries.values(), key=lambda e: e.last_used_unix, reverse=True)
