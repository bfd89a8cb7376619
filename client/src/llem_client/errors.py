"""One exception hierarchy for everything the client raises.

gRPC status codes map onto subclasses of :class:`LlemError`; the server's
``google.rpc`` details (``BadRequest`` field violations, ``RetryInfo``) are
parsed into attributes so that callers never have to touch the status proto.
Configuration mistakes found on the client side, before anything is sent, raise
:class:`ConfigurationError` (a ``ValueError``).
"""
from __future__ import annotations

from typing import Any

import grpc

__all__ = [
    "ConfigurationError",
    "LlemError",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "Unauthenticated",
    "FailedPrecondition",
    "ResourceExhausted",
    "Unavailable",
    "Cancelled",
    "DeadlineExceeded",
    "Internal",
    "from_rpc_error",
]


class ConfigurationError(ValueError):
    """A configuration the client can tell is wrong before sending it.

    ``problems`` lists ``(field_path, message)`` pairs, one per problem, so that
    a caller (or the CLI) can show every mistake at once instead of one per try.
    """

    def __init__(self, problems: list[tuple[str, str]] | str):
        if isinstance(problems, str):
            problems = [("", problems)]
        self.problems: list[tuple[str, str]] = list(problems)
        super().__init__(self._render())

    def _render(self) -> str:
        lines = [f"{path}: {msg}" if path else msg for path, msg in self.problems]
        if len(lines) == 1:
            return lines[0]
        return f"{len(lines)} configuration problems:\n" + "\n".join(f"  - {line}" for line in lines)


class LlemError(Exception):
    """An RPC that ended with a non-OK gRPC status.

    Attributes:
        code: the ``grpc.StatusCode`` (``None`` only for errors made client-side).
        details: the status message from the server.
        field_violations: ``(field, description)`` pairs from ``google.rpc.BadRequest``.
        retry_delay: seconds to wait before retrying, from ``google.rpc.RetryInfo``
            (``None`` when the server gave no hint).
        reason: the ``google.rpc.ErrorInfo`` reason (``"QUEUE_FULL"``, ``"OUT_OF_MEMORY"``,
            ``"OUTSIDE_MODEL_ROOT"`` …; llem.proto lists them), ``None`` when absent.
    """

    code: grpc.StatusCode | None = None

    def __init__(
        self,
        details: str = "",
        *,
        code: grpc.StatusCode | None = None,
        field_violations: list[tuple[str, str]] | None = None,
        retry_delay: float | None = None,
        reason: str | None = None,
    ):
        if code is not None:
            self.code = code
        self.details = details
        self.field_violations = list(field_violations or [])
        self.retry_delay = retry_delay
        self.reason = reason
        super().__init__(self._render())

    def new_violations(self) -> list[tuple[str, str]]:
        """The field violations the status message does not already say (servers often
        put a single violation in the message too)."""
        return [(f, d) for f, d in self.field_violations
                if not (d in self.details and f.rsplit(".", 1)[-1] in self.details)]

    def _render(self) -> str:
        name = self.code.name if self.code is not None else "ERROR"
        text = f"{name}: {self.details}" if self.details else name
        for field, desc in self.new_violations():
            text += f"\n  - {field}: {desc}"
        if self.retry_delay is not None:
            text += f"\n  (retry after {self.retry_delay:g} s)"
        return text


class InvalidArgument(LlemError):
    """The server rejected a field or a combination (see ``field_violations``)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(LlemError):
    """Model (or cache entry) not found."""

    code = grpc.StatusCode.NOT_FOUND


class PermissionDenied(LlemError):
    """Model outside the model root, remote code not allowed, ..."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(LlemError):
    """Missing or bad bearer token."""

    code = grpc.StatusCode.UNAUTHENTICATED


class FailedPrecondition(LlemError):
    """A package or GPU capability the request needs is missing on the server."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(LlemError):
    """Out of device memory or queue full; ``retry_delay`` says when to retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(LlemError):
    """Server unreachable, draining, or its worker died."""

    code = grpc.StatusCode.UNAVAILABLE


class Cancelled(LlemError):
    """The call was cancelled."""

    code = grpc.StatusCode.CANCELLED


class DeadlineExceeded(LlemError):
    """The call's deadline passed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(LlemError):
    """A server bug (the server never uses INTERNAL for a client mistake)."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[LlemError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        PermissionDenied,
        Unauthenticated,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        Cancelled,
        DeadlineExceeded,
        Internal,
    )
}

_DETAILS_KEY = "grpc-status-details-bin"


def _rich_status(call: Any):
    """The ``google.rpc.Status`` a call carries, or ``None``.

    ``rpc_status.from_call`` checks that code and message agree with the call's;
    when they do not (a proxy rewrote the message) the details are still worth
    having, so fall back to reading the trailer directly.
    """
    from google.rpc import status_pb2
    from grpc_status import rpc_status

    try:
        return rpc_status.from_call(call)
    except ValueError:
        pass
    except Exception:  # a call object without trailing metadata (e.g. a local error)
        return None
    try:
        for key, value in call.trailing_metadata() or ():
            if key == _DETAILS_KEY:
                return status_pb2.Status.FromString(value)
    except Exception:
        return None
    return None


def _parse_details(status) -> tuple[list[tuple[str, str]], float | None, str | None]:
    from google.rpc import error_details_pb2

    violations: list[tuple[str, str]] = []
    retry_delay: float | None = None
    reason: str | None = None
    if status is None:
        return violations, retry_delay, reason
    for any_msg in status.details:
        if any_msg.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            any_msg.Unpack(bad)
            violations.extend((v.field, v.description) for v in bad.field_violations)
        elif any_msg.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            any_msg.Unpack(info)
            retry_delay = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
        elif any_msg.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            any_msg.Unpack(info)
            reason = info.reason or None
    return violations, retry_delay, reason


def from_rpc_error(err: grpc.RpcError) -> LlemError:
    """Turn a ``grpc.RpcError`` (sync or ``grpc.aio``) into the matching :class:`LlemError`."""
    try:
        code = err.code()  # type: ignore[attr-defined]
        details = err.details() or ""  # type: ignore[attr-defined]
    except Exception:
        code, details = grpc.StatusCode.UNKNOWN, str(err)
    violations, retry_delay, reason = _parse_details(_rich_status(err))
    cls = _BY_CODE.get(code, LlemError)
    exc = cls(details, code=code, field_violations=violations, retry_delay=retry_delay, reason=reason)
    return exc
