"""tls: TLS and mTLS handshakes against a real grpc.aio server, certificates made in the test."""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).parent))  # pki.py is a helper beside the tests, whatever pytest's import mode
from pki import TestPKI, make_test_pki  # noqa: E402

from llem_server.tls import TLSConfigError, server_credentials


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> TestPKI:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


async def _check_health(creds: grpc.ServerCredentials, channel_creds: grpc.ChannelCredentials, host: str) -> int:
    """Serve health over ``creds``; return the client's status (0 = SERVING answered)."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    try:
        async with grpc.aio.secure_channel(f"{host}:{port}", channel_creds) as ch:
            try:
                resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            except grpc.aio.AioRpcError as err:
                return err.code()
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
            return grpc.StatusCode.OK
    finally:
        await server.stop(None)


def _client(pki: TestPKI, *, root: Path | None = None, cert: Path | None = None, key: Path | None = None):
    return grpc.ssl_channel_credentials(
        root_certificates=(root or pki.ca_cert).read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_tls_handshake(pki, host):
    creds = server_credentials(pki.server_cert, pki.server_key)
    assert asyncio.run(_check_health(creds, _client(pki), host)) == grpc.StatusCode.OK


def test_tls_client_refuses_untrusted_server(pki):
    creds = server_credentials(pki.server_cert, pki.server_key)
    code = asyncio.run(_check_health(creds, _client(pki, root=pki.other_ca_cert), "127.0.0.1"))
    assert code == grpc.StatusCode.UNAVAILABLE


def test_mtls_with_client_cert(pki):
    creds = server_credentials(pki.server_cert, pki.server_key, client_ca=pki.ca_cert)
    chan = _client(pki, cert=pki.client_cert, key=pki.client_key)
    assert asyncio.run(_check_health(creds, chan, "127.0.0.1")) == grpc.StatusCode.OK


def test_mtls_refuses_client_without_cert(pki):
    creds = server_credentials(pki.server_cert, pki.server_key, client_ca=pki.ca_cert)
    assert asyncio.run(_check_health(creds, _client(pki), "127.0.0.1")) == grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_cert_from_another_ca(pki):
    creds = server_credentials(pki.server_cert, pki.server_key, client_ca=pki.ca_cert)
    chan = _client(pki, cert=pki.other_client_cert, key=pki.other_client_key)
    assert asyncio.run(_check_health(creds, chan, "127.0.0.1")) == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_cannot_talk_to_tls_server(pki):
    async def run():
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        port = server.add_secure_port("127.0.0.1:0", server_credentials(pki.server_cert, pki.server_key))
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
                return info.value.code()
        finally:
            await server.stop(None)

    assert asyncio.run(run()) == grpc.StatusCode.UNAVAILABLE


def test_config_errors_name_the_flag(pki, tmp_path: Path):
    with pytest.raises(TLSConfigError, match="--tls-cert"):
        server_credentials(tmp_path / "missing.crt", pki.server_key)
    with pytest.raises(TLSConfigError, match="--tls-key"):
        server_credentials(pki.server_cert, pki.server_cert)  # a cert where the key belongs
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(TLSConfigError, match="--tls-client-ca"):
        server_credentials(pki.server_cert, pki.server_key, client_ca=junk)
    enc = tmp_path / "enc.key"
    enc.write_text("-----BEGIN ENCRYPTED PRIVATE KEY-----\nxx\n-----END ENCRYPTED PRIVATE KEY-----\n")
    with pytest.raises(TLSConfigError, match="encrypted"):
        server_credentials(pki.server_cert, enc)
    # Another certificate's key: refused at start-up, not "Failed to bind to address" later.
    with pytest.raises(TLSConfigError, match="does not belong to the certificate"):
        server_credentials(pki.server_cert, pki.client_key)
