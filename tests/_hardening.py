"""Shared pieces of the hardening tests (test_hardening, test_faults, test_observability).

* ``hard_root``: a model root of its own (so nothing here disturbs the shared ``server``'s
  cache or root) with copies of the tiny models, broken ones, and links that escape;
* ``hard_server``: a server on that root with the test-only fault hooks armed
  (``LLEM_FAULT_OOM`` / ``LLEM_FAULT_OOM_LOAD`` / ``LLEM_FAULT_SLOW_LOAD`` /
  ``LLEM_FAULT_COMPILE``, see ``llem_server.models``) and a queue of 2 per device;
* helpers to read a call's status, its ``google.rpc.RetryInfo`` and the JSON log lines.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from conftest import start_server, stop_server

# Statuses a request may end with; UNKNOWN or INTERNAL would be a server bug.
CLIENT_STATUSES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}

# Small models in hard_root: copies of the session's llama/gpt2, broken copies, fault triggers.
OOM_GEN, OOM_LOAD, SLOW_LOAD, COMPILE_FAIL = "oom-gen", "oom-load", "slow-load", "compile-fail"
HOST_OOM = "host-oom"


def make_hard_root(base: Path, model_root: Path) -> Path:
    root = base / "models"
    root.mkdir(parents=True)
    for name in ("llama", "gpt2"):
        shutil.copytree(model_root / name, root / name)
    for name in ("corrupt", "garbled", "missing", OOM_GEN, OOM_LOAD, SLOW_LOAD, COMPILE_FAIL, HOST_OOM, "other"):
        shutil.copytree(model_root / "llama", root / name)
    weights = root / "corrupt" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated mid-tensor
    (root / "garbled" / "model.safetensors").write_bytes(os.urandom(len(data)))  # not safetensors at all
    (root / "missing" / "model.safetensors").unlink()
    # Directories that are not models: a config.json naming no model_type, and no tokenizer.
    for name in ("no-model-type", "no-tokenizer"):
        shutil.copytree(model_root / "llama", root / name)
    (root / "no-model-type" / "config.json").write_text("{}")
    for f in (root / "no-tokenizer").glob("tokenizer*"):
        f.unlink()
    # Outside the root: a real model, and links to it from inside.
    outside = base / "outside"
    shutil.copytree(model_root / "llama", outside / "llama")
    (root / "escape").symlink_to(outside / "llama", target_is_directory=True)
    linked = root / "linked-weights"
    shutil.copytree(model_root / "llama", linked)
    (linked / "model.safetensors").unlink()
    (linked / "model.safetensors").symlink_to(outside / "llama" / "model.safetensors")
    (root / "inner").symlink_to(root / "llama", target_is_directory=True)  # stays inside: allowed
    (root / "not-a-model").mkdir()
    return root


# Fixtures imported into several test modules get one definition per module in pytest, so a
# "session" fixture would start one server per module: these keep one per session themselves.
_shared: dict[str, object] = {}


@pytest.fixture(scope="session")
def hard_root(model_root, tmp_path_factory) -> Path:
    if "root" not in _shared:
        _shared["root"] = make_hard_root(tmp_path_factory.mktemp("hard"), model_root)
    return _shared["root"]


@pytest.fixture(scope="session")
def hard_server(hard_root, tmp_path_factory, request):
    """Fault hooks armed for the oom-* and slow-load models; a queue of 2 per device; two models cached."""
    if "server" not in _shared:
        srv = start_server(tmp_path_factory.mktemp("hard-server"), hard_root, "--max-queue", "2", "--max-models", "2",
                           env={"LLEM_FAULT_OOM": OOM_GEN, "LLEM_FAULT_OOM_LOAD": OOM_LOAD, "LLEM_FAULT_SLOW_LOAD": SLOW_LOAD,
                                "LLEM_FAULT_COMPILE": COMPILE_FAIL, "LLEM_FAULT_HOST_OOM": HOST_OOM,
                                "HF_HUB_OFFLINE": "1"})
        _shared["server"] = srv
        request.addfinalizer(lambda: stop_server(srv))
    return _shared["server"]


def code_of(fn, *args, **kwargs) -> tuple[grpc.StatusCode, object]:
    """(status, response or RpcError) of a stub call."""
    try:
        return grpc.StatusCode.OK, fn(*args, **kwargs)
    except grpc.RpcError as err:
        return err.code(), err


def retry_delay(err: grpc.RpcError) -> float | None:
    """Seconds from the google.rpc.RetryInfo detail, or None when absent."""
    status = rpc_status.from_call(err)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None


def error_reason(err: grpc.RpcError) -> str | None:
    """The google.rpc.ErrorInfo reason (QUEUE_FULL, OUT_OF_MEMORY, …), or None when absent."""
    status = rpc_status.from_call(err)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            assert info.domain == "llem.v1"
            return info.reason
    return None


def field_violations(err: grpc.RpcError) -> list[tuple[str, str]]:
    status = rpc_status.from_call(err)
    out = []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.extend((v.field, v.description) for v in bad.field_violations)
    return out


def json_lines(server) -> list[dict]:
    """The server's structlog JSON lines (other output, e.g. progress bars, skipped)."""
    out = []
    for line in server.log().splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
