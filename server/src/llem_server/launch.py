"""Start ``llem-server`` as a subprocess on a free loopback port and wait until it serves.

Shared by the tests and the benchmarks: the server binds port 0 and writes the port it
got to ``--port-file`` (atomically) once it serves.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class ServerProcess:
    """A running server: its address, process and log."""

    def __init__(self, address: str, proc: subprocess.Popen, log_path: Path):
        self.address, self.proc, self.log_path = address, proc, log_path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def channel(self):
        import grpc

        return grpc.insecure_channel(self.address)

    def stub(self):
        from llem.v1 import llem_pb2_grpc

        return llem_pb2_grpc.LlemServiceStub(self.channel())

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (the server drains), then SIGKILL for the whole process group if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


class ServerStarting:
    """A server started in the background; ``wait()`` returns the serving ``ServerProcess``."""

    def __init__(self, tmp: Path, model_root: Path, *extra: str, env: dict | None = None):
        tmp.mkdir(parents=True, exist_ok=True)
        self.port_file = tmp / "port"
        self.port_file.unlink(missing_ok=True)
        self.log_path = tmp / "server.log"
        cmd = [sys.executable, "-m", "llem_server", "--host", "127.0.0.1", "--port", "0", "--port-file",
               str(self.port_file), "--model-root", str(model_root), "--log-format", "json", *extra]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})}, start_new_session=True)

    def wait(self, timeout: float = 180.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while not self.port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"llem-server exited with {self.proc.returncode}:\n"
                                   f"{self.log_path.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                os.killpg(self.proc.pid, signal.SIGKILL)
                raise RuntimeError(f"llem-server did not start in {timeout}s:\n{self.log_path.read_text()[-4000:]}")
            time.sleep(0.05)
        return ServerProcess(f"127.0.0.1:{self.port_file.read_text().strip()}", self.proc, self.log_path)


def start_server(tmp: Path, model_root: Path, *extra: str, timeout: float = 180.0,
                 env: dict | None = None) -> ServerProcess:
    return ServerStarting(tmp, model_root, *extra, env=env).wait(timeout)
