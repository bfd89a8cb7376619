"""logs: JSON lines carry bound request fields; console mode renders; stdlib logs join in."""
from __future__ import annotations

import asyncio
import io
import json
import logging

import grpc
import pytest
import structlog

from llem_server import logs


@pytest.fixture(autouse=True)
def _restore():
    yield
    structlog.reset_defaults()
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_llem", False)]:
        root.removeHandler(h)
    logs.clear_contextvars()


def _lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def test_logger_made_before_configure_follows_it():
    early = logs.get_logger(component="auth")  # as modules do at import time
    buf = io.StringIO()
    logs.configure(json=True, stream=buf)
    early.info("hello")
    assert _lines(buf) == [{"component": "auth", "event": "hello", "level": "info",
                            "timestamp": _lines(buf)[0]["timestamp"]}]


def test_json_lines_with_bound_fields():
    buf = io.StringIO()
    logs.configure(json=True, level="info", stream=buf)
    log = logs.get_logger(request_id="r-1")
    with logs.bound(config_hash="abc123"):
        log.info("generate.done", output_tokens=5, energy_j=1.25, status=grpc.StatusCode.NOT_FOUND)
    log.debug("not shown at info")
    log.info("after", tokens=1)
    first, second = _lines(buf)
    assert first["event"] == "generate.done" and first["level"] == "info"
    assert first["request_id"] == "r-1" and first["config_hash"] == "abc123"
    assert first["output_tokens"] == 5 and first["energy_j"] == 1.25
    assert first["status"] == "NOT_FOUND"  # enums as names
    assert "timestamp" in first
    assert "config_hash" not in second  # the binding ended with the block


def test_contextvars_are_per_task():
    buf = io.StringIO()
    logs.configure(json=True, stream=buf)

    async def request(rid: str):
        with logs.bound(request_id=rid):
            await asyncio.sleep(0)
            logs.get_logger().info("step")

    async def main():
        await asyncio.gather(request("a"), request("b"))

    asyncio.run(main())
    assert sorted(line["request_id"] for line in _lines(buf)) == ["a", "b"]


def test_stdlib_logging_and_exceptions_are_json():
    buf = io.StringIO()
    logs.configure(json=True, level="warning", stream=buf)
    logging.getLogger("grpc._server").warning("something %s", "odd")
    logging.getLogger("grpc._server").info("hidden")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logs.get_logger().exception("failed")
    lib, exc = _lines(buf)
    assert lib["event"] == "something odd" and lib["logger"] == "grpc._server"
    assert "RuntimeError: boom" in exc["exception"]


def test_console_mode_and_reconfigure_does_not_duplicate():
    buf = io.StringIO()
    logs.configure(json=False, level="debug", stream=buf)
    logs.configure(json=False, level="debug", stream=buf)
    logs.get_logger(device=0).debug("worker.ready", pid=123)
    logging.getLogger("x").info("lib line")
    text = buf.getvalue()
    assert "worker.ready" in text and "device=0" in text and "pid=123" in text
    assert text.count("lib line") == 1
    with pytest.raises(ValueError):
        logs.configure(level="loud")


def test_auto_json_when_not_a_terminal():
    buf = io.StringIO()  # not a tty
    logs.configure(json=None, stream=buf)
    logs.get_logger().info("x")
    assert _lines(buf)[0]["event"] == "x"
