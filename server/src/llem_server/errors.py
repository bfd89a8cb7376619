"""Service errors that carry a gRPC status and ``google.rpc`` details.

Code anywhere in the front process raises :class:`ServiceError`; the servicer
turns it into the RPC's status with :func:`abort`. Rich details travel in the
``grpc-status-details-bin`` trailer as a ``google.rpc.Status``:

* ``violations``   -> ``google.rpc.BadRequest`` (one field violation per problem,
  field paths like ``model.pytorch.load_in_8bit``), for a request's config problems
  (INVALID_ARGUMENT, and FAILED_PRECONDITION / PERMISSION_DENIED for fields this server
  cannot run or refuses);
* ``retry_delay_s`` -> ``google.rpc.RetryInfo``, for RESOURCE_EXHAUSTED /
  UNAVAILABLE where retrying can help;
* ``reason``       -> ``google.rpc.ErrorInfo`` (domain ``llem.v1``), on every error: one of
  :data:`REASONS`, so a program tells a full queue from an out-of-memory (both
  RESOURCE_EXHAUSTED) without reading the message. The proto's header lists them too.

Clients read them with ``grpc_status.rpc_status.from_call`` (``llem_client.errors``
does this). The trailer is bounded (see ``_MAX_DETAILS_BYTES``) because gRPC refuses
whole responses whose metadata is over the peer's limit (8 KiB by default): a
request with hundreds of bad fields must still get a readable INVALID_ARGUMENT.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = ["REASONS", "ServiceError", "abort", "status_from_name"]

DOMAIN = "llem.v1"
# ErrorInfo.reason values, with the status each comes with (documented in llem.proto).
REASONS = {
    "INVALID_REQUEST": "INVALID_ARGUMENT",
    "NOT_SUPPORTED_HERE": "FAILED_PRECONDITION",
    "REMOTE_CODE_NOT_ALLOWED": "PERMISSION_DENIED",
    "HUB_NOT_ALLOWED": "PERMISSION_DENIED",
    "MODEL_ROOT_NOT_SET": "PERMISSION_DENIED",
    "OUTSIDE_MODEL_ROOT": "PERMISSION_DENIED",
    "MODEL_UNREADABLE": "PERMISSION_DENIED",
    "MODEL_NOT_FOUND": "NOT_FOUND",
    "MODEL_INVALID": "FAILED_PRECONDITION",
    "PACKAGE_MISSING": "FAILED_PRECONDITION",
    "UNKNOWN_CONFIG_HASH": "NOT_FOUND",
    "OUT_OF_MEMORY": "RESOURCE_EXHAUSTED",
    "QUEUE_FULL": "RESOURCE_EXHAUSTED",
    "SHUTTING_DOWN": "UNAVAILABLE",
    "WORKER_RESTARTED": "UNAVAILABLE",
    "CANCELLED": "CANCELLED",
    "INTERNAL_ERROR": "INTERNAL",
}
# Where a raise names no reason: the one its status most often means.
_DEFAULT_REASON = {
    "INVALID_ARGUMENT": "INVALID_REQUEST",
    "FAILED_PRECONDITION": "NOT_SUPPORTED_HERE",
    "NOT_FOUND": "MODEL_NOT_FOUND",
    "RESOURCE_EXHAUSTED": "OUT_OF_MEMORY",
    "UNAVAILABLE": "SHUTTING_DOWN",
    "CANCELLED": "CANCELLED",
}

# Serialized google.rpc.Status budget. Base64 (the -bin encoding) adds a third, the
# message travels again as grpc-message: 4 KiB keeps the whole trailer well under 8 KiB.
_MAX_DETAILS_BYTES = 4096
_MAX_MESSAGE_CHARS = 1024
_MAX_DESCRIPTION_CHARS = 300

# grpc ends a call at its deadline a hair early by the server's clock: a call ending with
# less than this left is counted (logs, metrics) as past its deadline, not cancelled.
DEADLINE_SLACK_S = 0.05


def stop_code(context) -> grpc.StatusCode:
    """How a call that stopped before its answer ended: DEADLINE_EXCEEDED within
    DEADLINE_SLACK_S of its deadline, else CANCELLED (the caller went away)."""
    remaining = context.time_remaining() if context is not None else None
    past = remaining is not None and remaining < DEADLINE_SLACK_S
    return grpc.StatusCode.DEADLINE_EXCEEDED if past else grpc.StatusCode.CANCELLED


def status_from_name(name: str | grpc.StatusCode) -> grpc.StatusCode:
    """``"INVALID_ARGUMENT"`` (any case) -> ``grpc.StatusCode.INVALID_ARGUMENT``.

    Names that are not status codes map to INTERNAL: they come from our own worker
    process, so an unknown one is a server bug, never the client's fault.
    """
    if isinstance(name, grpc.StatusCode):
        return name
    try:
        return grpc.StatusCode[str(name).strip().upper()]
    except KeyError:
        return grpc.StatusCode.INTERNAL


def _clip(text: str, limit: int) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ServiceError(Exception):
    """An error with a gRPC status code and optional ``google.rpc`` details.

    Args:
        code: the status (a ``grpc.StatusCode`` or its name, e.g. ``"NOT_FOUND"``).
        message: what a person reads; say what to change, not just what failed.
        violations: ``(field_path, description)`` pairs -> ``BadRequest``.
        retry_delay_s: seconds after which a retry may succeed -> ``RetryInfo``.
        reason: one of :data:`REASONS` -> ``ErrorInfo`` (by default the status's usual one).
    """

    def __init__(
        self,
        code: grpc.StatusCode | str,
        message: str,
        *,
        violations: Iterable[tuple[str, str]] | None = None,
        retry_delay_s: float | None = None,
        reason: str | None = None,
    ):
        self.code: grpc.StatusCode = status_from_name(code)
        if self.code is grpc.StatusCode.OK:
            raise ValueError("a ServiceError cannot carry status OK")
        if reason not in REASONS:  # None, or a name from the worker that this front does not know
            reason = _DEFAULT_REASON.get(self.code.name, "INTERNAL_ERROR")
        self.reason: str = reason
        self.message: str = str(message)
        self.violations: list[tuple[str, str]] = [(str(f), str(d)) for f, d in (violations or ())]
        self.retry_delay_s: float | None = None if retry_delay_s is None else max(0.0, float(retry_delay_s))
        super().__init__(self.message)

    # -- constructors for the common cases ---------------------------------------

    @classmethod
    def invalid_argument(cls, violations: Sequence[tuple[str, str]], message: str | None = None) -> ServiceError:
        """INVALID_ARGUMENT listing every problem (the message summarises them too,
        for clients that do not read details)."""
        if message is None:
            parts = [f"{f}: {d}" if f else d for f, d in violations]
            message = "invalid request: " + "; ".join(parts) if parts else "invalid request"
        return cls(grpc.StatusCode.INVALID_ARGUMENT, message, violations=violations)

    @classmethod
    def resource_exhausted(cls, message: str, retry_delay_s: float | None = None,
                           reason: str | None = None) -> ServiceError:
        return cls(grpc.StatusCode.RESOURCE_EXHAUSTED, message, retry_delay_s=retry_delay_s, reason=reason)

    # -- wire form -----------------------------------------------------------------

    def to_rpc_status(self) -> status_pb2.Status:
        """The ``google.rpc.Status`` proto, details bounded to ``_MAX_DETAILS_BYTES``."""
        message = _clip(self.message, _MAX_MESSAGE_CHARS)
        if not self.violations:
            return self._build(message, [])
        # Only the first violations can fit: stop clipping once even their smallest wire form
        # (tag and length bytes, then one byte per character) fills the budget, so a list of
        # 400,000 costs no more than one of a few hundred (it took 1.5 s to build them all).
        violations, room = [], _MAX_DETAILS_BYTES
        for f, d in self.violations:
            f, d = _clip(f, 200), _clip(d, _MAX_DESCRIPTION_CHARS)
            room -= 2 + (len(f) + 2 if f else 0) + (len(d) + 2 if d else 0)
            if room < 0:
                break
            violations.append((f, d))
        total = len(self.violations)
        if len(violations) == total:
            status = self._build(message, violations)
            if status.ByteSize() <= _MAX_DETAILS_BYTES:
                return status
        # Too many problems for one trailer: keep as many of the first ones as fit
        # (binary search) and say how many were cut.
        def trimmed(keep: int) -> status_pb2.Status:
            more = ("…", f"{total - keep} more problems not shown")
            return self._build(message, violations[:keep] + [more])

        lo, hi = 0, min(len(violations), total - 1)  # invariant: trimmed(lo) fits or lo == 0
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if trimmed(mid).ByteSize() <= _MAX_DETAILS_BYTES:
                lo = mid
            else:
                hi = mid - 1
        return trimmed(lo)

    def _build(self, message: str, violations: list[tuple[str, str]]) -> status_pb2.Status:
        details: list[any_pb2.Any] = []
        if violations:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations
                ]
            )
            details.append(_pack(bad))
        if self.retry_delay_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(round(self.retry_delay_s * 1e9)))
            details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        # Last: clients that read only details[0] keep finding BadRequest / RetryInfo there.
        details.append(_pack(error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN)))
        return status_pb2.Status(code=self.code.value[0], message=message, details=details)

    def to_grpc_status(self) -> grpc.Status:
        """A ``grpc.Status`` for ``context.abort_with_status``."""
        return rpc_status.to_status(self.to_rpc_status())

    def __repr__(self) -> str:
        return f"ServiceError({self.code.name}, {self.message!r})"


def _pack(msg) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


async def abort(context: grpc.aio.ServicerContext, err: ServiceError) -> NoReturn:
    """End the RPC with ``err``'s status and rich details (raises, never returns).

    Works for unary and streaming handlers of ``grpc.aio`` servers
    (``abort_with_status`` is implemented by the aio ServicerContext).
    """
    await context.abort_with_status(err.to_grpc_status())
    raise AssertionError("unreachable: abort_with_status raises")  # pragma: no cover
