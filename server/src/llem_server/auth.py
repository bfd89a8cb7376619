"""Bearer-token authentication for the grpc.aio server.

Clients send ``authorization: Bearer <token>`` metadata. Tokens come from
``--auth-token-file`` (one per line; blank lines and ``#`` comments ignored).
Every RPC except the open prefixes (standard health service and reflection, so
that load balancers and Kubernetes probes work without a secret) must carry one
of them, else it ends with UNAUTHENTICATED before the servicer sees it.

Comparison: each presented token is hashed with SHA-256 and compared to every
known token's hash with ``hmac.compare_digest``, without stopping at the first
match. Comparing equal-length digests keeps the time independent of how much of
a token (or its length) a guess gets right, and of which token matched.

Bearer tokens travel in clear text without TLS: pair ``--auth-token-file`` with
``--tls-cert``/``--tls-key`` anywhere but a trusted network.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import grpc

from .logs import get_logger

__all__ = ["OPEN_PREFIXES", "BearerTokenInterceptor", "load_tokens"]

# Standard services that must answer without credentials (probes, grpcurl discovery).
OPEN_PREFIXES: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
)

# Guessable placeholders ("changeme", "secret") are the usual way token auth fails.
MIN_TOKEN_LENGTH = 16

_log = get_logger(component="auth")


def load_tokens(path: Path | str, *, min_length: int = MIN_TOKEN_LENGTH, warn: bool = True) -> list[str]:
    """Read tokens: one per line, surrounding whitespace stripped, blank lines and
    lines starting with ``#`` skipped.

    Raises:
        ValueError: no token in the file, a token shorter than ``min_length``,
            whitespace inside a token (a sign of an inline comment or a pasted
            ``Bearer x`` line, which would never match), or a character that is not
            printable ASCII. Messages give the line number, never the token.
        OSError: the file cannot be read.
    """
    path = Path(path)
    tokens: list[str] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if any(c.isspace() for c in line):
                raise ValueError(f"{path}:{lineno}: a token cannot contain whitespace")
            if not all(" " < c < "\x7f" for c in line):
                # gRPC metadata values are printable ASCII: a token with anything else (a byte
                # order mark from an editor, a non-ASCII letter) could never be sent, and the
                # server would refuse every caller.
                raise ValueError(f"{path}:{lineno}: a token must be printable ASCII "
                                 "(a byte order mark or a non-ASCII character?)")
            if len(line) < min_length:
                raise ValueError(f"{path}:{lineno}: token shorter than {min_length} characters")
            if line not in tokens:
                tokens.append(line)
    if not tokens:
        raise ValueError(f"{path}: no tokens (one per line; blank lines and # comments are ignored)")
    if warn and os.name == "posix" and path.stat().st_mode & 0o004:
        _log.warning("auth.token_file_world_readable", path=str(path))
    return tokens


def _digest(token: str | bytes) -> bytes:
    if isinstance(token, str):
        token = token.encode("utf-8", "surrogateescape")
    return hashlib.sha256(token).digest()


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuse RPCs without a valid ``authorization: Bearer <token>`` with UNAUTHENTICATED.

    Args:
        tokens: the accepted tokens (see :func:`load_tokens`).
        open_prefixes: method-path prefixes served without a token.
        token_file: where ``tokens`` came from; :meth:`reload` re-reads it
            (e.g. on SIGHUP) so tokens rotate without a restart.
    """

    def __init__(
        self,
        tokens: Iterable[str],
        *,
        open_prefixes: Iterable[str] = OPEN_PREFIXES,
        token_file: Path | str | None = None,
    ):
        self._digests = self._digests_of(tokens)
        self._open = tuple(open_prefixes)
        self._token_file = Path(token_file) if token_file is not None else None

    @classmethod
    def from_file(cls, path: Path | str, **kwargs) -> BearerTokenInterceptor:
        return cls(load_tokens(path), token_file=path, **kwargs)

    @staticmethod
    def _digests_of(tokens: Iterable[str]) -> tuple[bytes, ...]:
        digests = tuple(_digest(t) for t in tokens)
        if not digests:
            raise ValueError("at least one token is required")
        return digests

    def reload(self) -> int:
        """Re-read the token file; keep the old tokens if the new file is invalid
        (a half-written file must not lock everyone out). Returns the token count."""
        if self._token_file is None:
            raise RuntimeError("no token file to reload")
        try:
            self._digests = self._digests_of(load_tokens(self._token_file))
        except (OSError, ValueError) as exc:
            _log.error("auth.reload_failed", path=str(self._token_file), error=str(exc))
            raise
        _log.info("auth.reloaded", path=str(self._token_file), tokens=len(self._digests))
        return len(self._digests)

    def is_valid(self, presented: str | bytes) -> bool:
        """Constant-time check of one presented token against all known tokens."""
        d = _digest(presented)
        ok = False
        for known in self._digests:
            ok |= hmac.compare_digest(d, known)  # no early exit: time does not depend on which matched
        return ok

    def _authorized(self, metadata) -> tuple[bool, str]:
        """(ok, reason) for the call's metadata; reason is for logs, never includes the token."""
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            return False, "missing"
        for value in values:
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip() and self.is_valid(token.strip()):
                return True, "ok"
        return False, "invalid"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method.startswith(self._open):
            return await continuation(handler_call_details)
        ok, reason = self._authorized(handler_call_details.invocation_metadata)
        if ok:
            return await continuation(handler_call_details)
        # Unknown methods get UNAUTHENTICATED as well: no probing for names.
        return _deny_handler(method, reason)


def _deny_handler(method: str, reason: str) -> grpc.RpcMethodHandler:
    message = (
        "missing bearer token (send metadata 'authorization: Bearer <token>')"
        if reason == "missing"
        else "invalid bearer token"
    )

    async def deny(_requests, context: grpc.aio.ServicerContext):
        _log.warning("auth.denied", method=method[:200], reason=reason, peer=context.peer())
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    # A request-streaming handler whose iterator is never read, whatever the method's kind (the
    # wire does not say): gRPC then never reads the caller's message. A unary handler made it
    # read every body, up to 2 x --max-message-bytes, before refusing: 150 unauthenticated 30 MB
    # calls took the front process to 5.7 GB. No deserializer either: nothing is parsed.
    return grpc.stream_stream_rpc_method_handler(deny)
