"""structlog set-up: key-value events, JSON in production, a console view in a terminal.

Usage::

    configure(json=True, level="info")          # once, in the CLI
    log = get_logger(request_id=rid)             # bind what every line should carry
    log.info("generate.done", config_hash=h, output_tokens=n, energy_j=e, status="OK")

Per-request fields can also be bound for a whole ``asyncio`` task with
``bound(request_id=..., config_hash=...)`` (structlog contextvars): every line
logged inside it, by any module, carries them. Values that are enums (such as
``grpc.StatusCode``) render as their names, so ``status`` reads ``"NOT_FOUND"``.
Standard-library logging (grpc, transformers) goes through the same renderer.
"""
from __future__ import annotations

import enum
import logging
import sys
from typing import Any

import structlog
from structlog.contextvars import bound_contextvars, clear_contextvars

__all__ = ["configure", "get_logger", "bind", "bound", "clear_contextvars"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "warn": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}

bound = bound_contextvars
bind = structlog.contextvars.bind_contextvars  # for the rest of this asyncio task (one RPC)


def _enum_names(_logger: Any, _method: str, event: dict) -> dict:
    for key, value in event.items():
        if isinstance(value, enum.Enum):
            event[key] = value.name
    return event


def configure(json: bool | None = True, level: str = "info", stream=None) -> None:
    """Configure structlog (and route stdlib logging through it).

    Args:
        json: True: one JSON object per line (production, log shippers); False: the
            human console renderer; None: JSON unless ``stream`` is a terminal.
        level: debug, info, warning, error or critical.
        stream: where lines go (default ``sys.stderr``, leaving stdout to the program).
    """
    try:
        lvl = _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"log level must be one of {sorted(set(_LEVELS) - {'warn'})}, not {level!r}") from None
    stream = stream if stream is not None else sys.stderr
    if json is None:
        json = not (hasattr(stream, "isatty") and stream.isatty())

    shared: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _enum_names,
    ]
    renderer = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=hasattr(stream, "isatty") and stream.isatty())
    )
    exc = [structlog.processors.format_exc_info] if json else []  # the console renders tracebacks itself

    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *exc, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,  # tests reconfigure; the cost is a dict lookup
    )

    # Library logs (grpc, transformers, asyncio) as the same kind of lines.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *exc, renderer],
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_llem", False)]:
        root.removeHandler(old)
    handler._llem = True  # type: ignore[attr-defined]  # so a second configure() replaces, not duplicates
    root.addHandler(handler)
    root.setLevel(lvl)


class OncePerMessage(logging.Filter):
    """Let each library message (logger and text) through once: some warn on every call
    (bitsandbytes, on each 8-bit matmul), which would bury the log."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


def get_logger(**bind: Any) -> structlog.typing.FilteringBoundLogger:
    """A logger with ``bind`` attached to every line (e.g. request_id, device).

    Lazy: safe to create at import time, before :func:`configure` runs (a plain
    ``.bind()`` would freeze whatever configuration existed at that moment)."""
    return structlog.get_logger(**bind)
