"""A throwaway PKI for tests: a CA, a server cert for 127.0.0.1/localhost, a client cert.

Made with ``cryptography`` on the spot (EC P-256: fast to generate), so no key
material lives in the repository.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class TestPKI:
    __test__ = False  # not a pytest test class

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path  # an unrelated CA, and a client cert it signed
    other_client_cert: Path
    other_client_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def _write_cert(cert: x509.Certificate, path: Path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _ca(cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # keyCertSign, cRLSign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(ca_key, ca_cert: x509.Certificate, cn: str, usage, sans: list[x509.GeneralName] | None = None):
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def make_test_pki(tmp_path: Path) -> TestPKI:
    """Write a CA, server and client certificates (PEM) under ``tmp_path``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca("llem test CA")
    srv_key, srv_cert = _leaf(
        ca_key, ca_cert, "localhost", ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    cli_key, cli_cert = _leaf(ca_key, ca_cert, "llem test client", ExtendedKeyUsageOID.CLIENT_AUTH)
    other_ca_key, other_ca_cert = _ca("unrelated CA")
    oth_key, oth_cert = _leaf(other_ca_key, other_ca_cert, "stranger", ExtendedKeyUsageOID.CLIENT_AUTH)

    paths = {}
    for stem, key, cert in [
        ("ca", ca_key, ca_cert),
        ("server", srv_key, srv_cert),
        ("client", cli_key, cli_cert),
        ("other-ca", other_ca_key, other_ca_cert),
        ("other-client", oth_key, oth_cert),
    ]:
        _write_key(key, tmp_path / f"{stem}.key")
        _write_cert(cert, tmp_path / f"{stem}.crt")
        paths[stem] = (tmp_path / f"{stem}.crt", tmp_path / f"{stem}.key")
    return TestPKI(
        ca_cert=paths["ca"][0], ca_key=paths["ca"][1],
        server_cert=paths["server"][0], server_key=paths["server"][1],
        client_cert=paths["client"][0], client_key=paths["client"][1],
        other_ca_cert=paths["other-ca"][0],
        other_client_cert=paths["other-client"][0], other_client_key=paths["other-client"][1],
    )
