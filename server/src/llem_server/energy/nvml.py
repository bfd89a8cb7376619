"""Thin reader over a pynvml-like module: the only place that calls NVML.

Every NVML exception is turned into a ``NvmlFailure`` carrying a sentence a person can
act on, with the NVML error name in it. Nothing here is called on a request path: the
samplers (background threads) and start-up code are the only callers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Clock event reasons (nvmlClocksEventReason*) that mean the GPU was held back by heat or
# by its power budget, the ones that make an energy figure unrepresentative.
THERMAL_REASONS = {0x20: "software thermal slowdown", 0x40: "hardware thermal slowdown"}
POWER_REASONS = {0x04: "software power cap", 0x80: "hardware power brake", 0x08: "hardware slowdown"}


class NvmlFailure(Exception):
    """An NVML call failed; ``reason`` is for people, ``code`` is NVML_ERROR_* or ''."""

    def __init__(self, reason: str, code: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.code = code


def error_name(nvml: Any, exc: BaseException) -> str:
    """NVML_ERROR_* name for an NVMLError (value looked up among the module's constants)."""
    value = getattr(exc, "value", None)
    if value is None:
        return type(exc).__name__
    for name in dir(nvml):
        if name.startswith("NVML_ERROR_") and getattr(nvml, name) == value:
            return name
    return f"NVML error {value}"


def describe(nvml: Any, exc: BaseException, what: str) -> NvmlFailure:
    """Map an exception from ``what`` (e.g. 'reading the energy counter') to a reason."""
    code = error_name(nvml, exc)
    detail = str(exc)
    tail = f"({code}: {detail})" if detail and detail != code else f"({code})"
    if code == "NVML_ERROR_LIBRARY_NOT_FOUND":
        return NvmlFailure(f"no NVIDIA driver: NVML could not be initialised {tail}", code)
    if code == "NVML_ERROR_DRIVER_NOT_LOADED":
        return NvmlFailure(f"NVIDIA driver not loaded: NVML could not be initialised {tail}", code)
    if code == "NVML_ERROR_NOT_SUPPORTED":
        return NvmlFailure(f"not supported by this GPU: {what} {tail}", code)
    if code == "NVML_ERROR_NO_PERMISSION":
        return NvmlFailure(f"no permission for NVML: {what} {tail}", code)
    if code == "NVML_ERROR_GPU_IS_LOST":
        return NvmlFailure(f"GPU is lost (fell off the bus or was reset): {what} {tail}", code)
    return NvmlFailure(f"NVML error {what} {tail}", code)


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


@dataclass
class Session:
    """An initialised NVML (or the reason there is none)."""

    nvml: Any = None
    reason: str = ""
    code: str = ""

    @property
    def ok(self) -> bool:
        return self.nvml is not None and not self.reason


def open_session(nvml: Any = None) -> Session:
    """Import pynvml lazily (when ``nvml`` is None) and initialise it. Never raises."""
    if nvml is None:
        try:
            import pynvml as nvml  # noqa: PLC0415 (kept lazy: the energy package is stdlib-only otherwise)
        except Exception as exc:  # ImportError, or a broken install
            return Session(None, f"no NVML: the nvidia-ml-py package (pynvml) cannot be imported ({exc})", "IMPORT")
    try:
        nvml.nvmlInit()
    except Exception as exc:
        f = describe(nvml, exc, "initialising NVML")
        return Session(None, f.reason, f.code)
    return Session(nvml)


def system_info(nvml: Any) -> dict[str, str]:
    """Driver, NVML and CUDA-driver versions; '' where NVML cannot tell."""
    out = {"driver_version": "", "nvml_version": "", "cuda_driver_version": ""}
    for key, fn in (("driver_version", "nvmlSystemGetDriverVersion"), ("nvml_version", "nvmlSystemGetNVMLVersion")):
        try:
            out[key] = _text(getattr(nvml, fn)())
        except Exception:
            pass
    try:
        v = int(nvml.nvmlSystemGetCudaDriverVersion())  # e.g. 12080 -> "12.8"
        out["cuda_driver_version"] = f"{v // 1000}.{(v % 1000) // 10}"
    except Exception:
        pass
    return out


class DeviceReader:
    """One GPU's NVML handle and readings. Raises NvmlFailure, never NVML's own errors."""

    def __init__(self, nvml: Any, index: int):
        self.nvml = nvml
        self.index = index
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            raise describe(nvml, exc, "counting GPUs") from exc
        if count == 0:
            raise NvmlFailure("no NVIDIA GPU: NVML is up but sees no GPU", "NO_GPU")
        if not 0 <= index < count:
            raise NvmlFailure(f"no GPU with index {index}: NVML sees {count} GPU(s)", "NO_GPU")
        try:
            self.handle = nvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as exc:
            raise describe(nvml, exc, f"opening GPU {index}") from exc

    def _call(self, fn: str, what: str, *args: Any) -> Any:
        try:
            return getattr(self.nvml, fn)(self.handle, *args)
        except Exception as exc:
            raise describe(self.nvml, exc, what) from exc

    def energy_mj(self) -> float:
        return float(self._call("nvmlDeviceGetTotalEnergyConsumption", "reading the total energy counter"))

    def power_w(self) -> float:
        return self._call("nvmlDeviceGetPowerUsage", "reading power usage") / 1000.0

    def temperature_c(self) -> float:
        return float(self._call("nvmlDeviceGetTemperature", "reading the temperature",
                                getattr(self.nvml, "NVML_TEMPERATURE_GPU", 0)))

    def event_reasons(self) -> int:
        fn = "nvmlDeviceGetCurrentClocksEventReasons"
        if not hasattr(self.nvml, fn):  # older nvidia-ml-py
            fn = "nvmlDeviceGetCurrentClocksThrottleReasons"
        return int(self._call(fn, "reading clock event reasons"))

    def compute_pids(self) -> frozenset[int]:
        """PIDs of the processes using this GPU for compute (host PIDs, also in a container).

        Under MPS the compute list holds the MPS server, which owns the one shared context,
        and NVML lists the clients apart: then the clients are the processes that matter
        (a process beside MPS, outside it, goes unseen)."""
        if hasattr(self.nvml, "nvmlDeviceGetMPSComputeRunningProcesses"):
            try:
                clients = self._call("nvmlDeviceGetMPSComputeRunningProcesses", "listing MPS client processes")
            except NvmlFailure:
                clients = []  # no MPS (NOT_SUPPORTED, or an older driver)
            if clients:
                return frozenset(int(p.pid) for p in clients)
        procs = self._call("nvmlDeviceGetComputeRunningProcesses", "listing compute processes")
        return frozenset(int(p.pid) for p in procs)

    def static(self) -> dict[str, Any]:
        """Name, UUID, power limit, persistence: read once at start; None where unknown."""
        info: dict[str, Any] = {"index": self.index}
        for key, fn, conv in (
            ("name", "nvmlDeviceGetName", _text),
            ("uuid", "nvmlDeviceGetUUID", _text),
            ("power_limit_w", "nvmlDeviceGetEnforcedPowerLimit", lambda v: v / 1000.0),
            ("persistence_mode", "nvmlDeviceGetPersistenceMode", lambda v: bool(v)),
        ):
            try:
                info[key] = conv(getattr(self.nvml, fn)(self.handle))
            except Exception:
                info[key] = None
        return info
