"""Shared fixtures: tiny models built on the spot and real llem-server processes on loopback."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    """A model root holding ``llama/`` (pads right, has a pad token) and ``gpt2/`` (no pad token)."""
    from llem_server.demo import make_gpt2, make_llama

    root = tmp_path_factory.mktemp("models")
    make_llama(root / "llama")
    make_gpt2(root / "gpt2")
    return root


@dataclass
class ServerProcess:
    address: str
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    def stub(self):
        from llem.v1 import llem_pb2_grpc

        return llem_pb2_grpc.LlemServiceStub(self.channel())


def start_server(tmp: Path, model_root: Path, *extra: str, timeout: float = 120.0, env: dict | None = None) -> ServerProcess:
    """Start ``llem-server`` on a free loopback port and wait until it serves."""
    tmp.mkdir(parents=True, exist_ok=True)
    port_file = tmp / "port"
    log_path = tmp / "server.log"
    cmd = [sys.executable, "-m", "llem_server", "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
           "--model-root", str(model_root), "--log-format", "json", *extra]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"llem-server exited with {proc.returncode}:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"llem-server did not start in {timeout}s:\n{log_path.read_text()}")
        time.sleep(0.1)
    return ServerProcess(f"127.0.0.1:{port_file.read_text().strip()}", proc, log_path)


def stop_server(server: ServerProcess, timeout: float = 30.0) -> int:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()
    return server.proc.returncode


@pytest.fixture(scope="session")
def server(model_root, tmp_path_factory):
    """The shared CPU server (no GPU here: energy says why it is absent)."""
    srv = start_server(tmp_path_factory.mktemp("server"), model_root, "--max-models", "3")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def sim_server(model_root, tmp_path_factory):
    """A server whose energy comes from a simulated NVML counter of known power (150 W)."""
    srv = start_server(tmp_path_factory.mktemp("sim-server"), model_root, "--energy-backend", "simulated",
                       "--simulated-power-w", "150", "--max-models", "2")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def stub(server):
    return server.stub()
