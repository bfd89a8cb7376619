"""llem_client.Client / AsyncClient against the real llem-server (tiny model, CPU)."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

import llem_client
from llem.v1 import llem_pb2

MODEL = "llama"
KW = dict(model=MODEL, precision="fp32", decoder={"preset": "deterministic"}, max_output_tokens=4)


def test_generate_with_dict_config(server):
    with llem_client.Client(server.address) as c:
        r = c.generate(["Hello", "Energy is"], pytorch={"batch_size": 2}, random_seed=3, request_id="t-1", **KW)
    assert isinstance(r, llem_pb2.GenerateResponse)
    assert r.request_id == "t-1" and len(r.config_hash) == 64
    assert [x.index for x in r.completions] == [0, 1]
    assert r.usage.output_tokens == sum(x.output_tokens for x in r.completions) <= 8
    assert r.effective_config.random_seed == 3
    # energy is either measured or absent with a reason: never a silent zero
    assert r.energy.available or r.energy.unavailable_reason


def test_generate_stream_ends_with_totals(server):
    with llem_client.Client(server.address) as c:
        msgs = list(c.generate_stream(["Hello"], **KW))
    assert msgs[-1].WhichOneof("event") == "final"
    chunks = [m.chunk for m in msgs[:-1]]
    final = msgs[-1].final
    assert sum(len(ch.token_ids) for ch in chunks) == final.usage.output_tokens


def test_server_errors_map_to_the_hierarchy(server):
    with llem_client.Client(server.address) as c:
        with pytest.raises(llem_client.NotFound):
            c.generate(["x"], model="no-such-model", max_output_tokens=1)
        with pytest.raises(llem_client.InvalidArgument) as ei:
            c.generate(["x"], model=MODEL, pytorch={"load_in_4bit": True, "load_in_8bit": True}, max_output_tokens=1)
        assert any("load_in" in f for f, _ in ei.value.field_violations)


def test_generate_future_answers_raises_and_cancels(server):
    """The call ``llem-client run --in-flight`` keeps queued: same answer as ``generate``,
    the same exception types, and a cancel that ends it with CancelledError."""
    from concurrent.futures import CancelledError

    from llem_client import _core

    with llem_client.Client(server.address) as c:
        req = _core.generate_request(["Hello"], request_id="fut-1", **KW)
        call = c.generate_future(req)
        r = call.result(timeout=60)
        assert call.done() and r.request_id == "fut-1" and r.usage.output_tokens >= 1
        assert r.completions[0].token_ids == c.generate_request(req).completions[0].token_ids
        bad = _core.generate_request(["x"], model="no-such-model", max_output_tokens=1)
        with pytest.raises(llem_client.NotFound):
            c.generate_future(bad).result(timeout=60)
        long = _core.generate_request(["Hello"], model=MODEL, precision="fp32", max_output_tokens=4000,
                                      decoder={"preset": "deterministic", "min_new_tokens": 4000})
        call = c.generate_future(long, timeout=None)
        assert call.cancel()
        with pytest.raises(CancelledError):
            call.result(timeout=60)
        assert c.health().status == 1  # SERVING: the cancelled call left the server well


def test_load_list_unload(server):
    with llem_client.Client(server.address) as c:
        loaded = c.load_model("gpt2", precision="fp32", pytorch={"batch_size": 2}, strip_generation_fields=True)
        h = loaded.config_hash
        assert h in [m.config_hash for m in c.list_models().models]
        assert c.unload_model(h).unloaded
        assert c.server_info().server_version
        assert c.health().status == 1  # SERVING


def test_async_client(server):
    async def main():
        async with llem_client.AsyncClient(server.address) as c:
            rs = await asyncio.gather(*(c.generate([f"prompt {i}"], **KW) for i in range(2)))
            assert all(r.usage.output_tokens > 0 for r in rs)
            msgs = [m async for m in c.generate_stream(["Hello"], **KW)]
            assert msgs[-1].HasField("final")

    asyncio.run(main())


def test_mtls_with_the_cli_flags_and_the_library(model_root, tmp_path):
    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import start_server, stop_server
    from pki import make_test_pki

    pki = make_test_pki(tmp_path / "pki")
    srv = start_server(tmp_path / "srv", model_root, "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                       "--tls-client-ca", str(pki.ca_cert))
    try:
        with llem_client.Client(srv.address, root_certificates=pki.ca_cert, certificate_chain=pki.client_cert,
                                private_key=pki.client_key, timeout=30) as c:
            assert c.server_info().server_version
        with llem_client.Client(srv.address, root_certificates=pki.ca_cert, timeout=30) as c, \
                pytest.raises(llem_client.LlemError):  # no client certificate: the handshake fails
            c.server_info()
        p = subprocess.run(
            [sys.executable, "-m", "llem_client.cli", "health", "--server", srv.address, "--ca-cert", str(pki.ca_cert),
             "--client-cert", str(pki.client_cert), "--client-key", str(pki.client_key)],
            capture_output=True, text=True, timeout=60,
        )
        assert p.returncode == 0 and p.stdout.strip() == "SERVING", p.stderr
    finally:
        stop_server(srv)


def test_bearer_token_against_an_auth_server(model_root, tmp_path):
    token = "t" * 24
    (tmp_path / "tokens").write_text(token + "\n")
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llem_server", "--port", "0", "--port-file", str(port_file), "--model-root", str(model_root),
         "--devices", "cpu", "--auth-token-file", str(tmp_path / "tokens")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ},
    )
    try:
        deadline = time.time() + 120
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None and time.time() < deadline, "auth server did not start"
            time.sleep(0.1)
        addr = f"127.0.0.1:{port_file.read_text().strip()}"
        with llem_client.Client(addr, token=token) as c:
            assert c.list_models() is not None
        with llem_client.Client(addr, token="wrong-token-wrong") as c, pytest.raises(llem_client.Unauthenticated):
            c.list_models()
        with llem_client.Client(addr) as c, pytest.raises(llem_client.Unauthenticated):
            c.list_models()
    finally:
        proc.terminate()
        proc.wait(30)
