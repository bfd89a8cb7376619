"""Shared fixtures: tiny models built on the spot and real llem-server processes on loopback."""
from __future__ import annotations

from pathlib import Path

import pytest
from llem_server.launch import ServerProcess
from llem_server.launch import start_server as launch_server

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    """A model root holding ``llama/`` (pads right, has a pad token) and ``gpt2/`` (no pad token)."""
    from llem_server.demo import make_gpt2, make_llama

    root = tmp_path_factory.mktemp("models")
    make_llama(root / "llama")
    make_gpt2(root / "gpt2")
    return root


def start_server(tmp: Path, model_root: Path, *extra: str, timeout: float = 120.0,
                 env: dict | None = None) -> ServerProcess:
    """Start ``llem-server`` on a free loopback port and wait until it serves."""
    return launch_server(tmp, model_root, *extra, timeout=timeout, env=env)


def stop_server(server: ServerProcess, timeout: float = 30.0) -> int:
    return server.stop(timeout)


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
