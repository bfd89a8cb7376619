"""TLS and mutual-TLS server credentials from PEM files.

``server_credentials(cert, key)`` serves TLS; with ``client_ca`` every client must
present a certificate signed by that CA (mTLS), otherwise the handshake fails
before any RPC, health included. Files are read once at start-up; errors name the
file and the flag so a misconfigured server says what to fix instead of failing
inside the gRPC core.
"""
from __future__ import annotations

from pathlib import Path

import grpc

__all__ = ["TLSConfigError", "server_credentials"]


class TLSConfigError(ValueError):
    """A certificate or key file that cannot be used."""


def _read_pem(path: Path | str, what: str, marker: bytes) -> bytes:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"{what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data or marker not in data:
        raise TLSConfigError(f"{what} {path}: not a PEM file with a {marker.decode().strip('- ')}")
    return data


def _check_pair(cert: Path | str, key: Path | str) -> None:
    """gRPC accepts a key that does not belong to the certificate and fails later, at bind,
    with "Failed to bind to address": OpenSSL (stdlib ssl) tells at once."""
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(cert), str(key))
    except ssl.SSLError as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        what = ("the key does not belong to the certificate" if "KEY_VALUES_MISMATCH" in str(reason)
                else f"OpenSSL cannot use them: {reason}")
        raise TLSConfigError(f"--tls-cert {cert} / --tls-key {key}: {what}") from None


def server_credentials(cert: Path | str, key: Path | str, client_ca: Path | str | None = None) -> grpc.ServerCredentials:
    """Credentials for ``server.add_secure_port``.

    Args:
        cert: server certificate chain, PEM (leaf first).
        key: its private key, PEM (unencrypted: the server starts unattended).
        client_ca: CA bundle, PEM, that client certificates must chain to. Given,
            clients without a valid certificate are refused (mTLS).
    """
    cert_pem = _read_pem(cert, "--tls-cert", b"CERTIFICATE-----")
    key_pem = _read_pem(key, "--tls-key", b"PRIVATE KEY-----")
    if b"ENCRYPTED" in key_pem:
        raise TLSConfigError(f"--tls-key {key}: encrypted private keys are not supported")
    ca_pem = _read_pem(client_ca, "--tls-client-ca", b"CERTIFICATE-----") if client_ca is not None else None
    _check_pair(cert, key)
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)],
        root_certificates=ca_pem,
        require_client_auth=ca_pem is not None,
    )
