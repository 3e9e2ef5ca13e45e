"""Pytest fixtures for the local Graph / Entra server (tests/support/graph_server.py).

Use with ``from tests.support.graph_fixtures import *``:

    graph_server      a running TLS server with one app (TENANT, CLIENT_ID, CLIENT_SECRET);
                      REQUESTS_CA_BUNDLE and SSL_CERT_FILE point at its test CA
    graph_settings()  Settings aimed at a server (authority, Graph, client id, secret)
    graph_client()    a GraphClient on a server, whose sleeps are recorded, not slept
    loopback_only     any connection or name lookup beyond loopback fails the test
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import socket
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aadrun.config import Settings
from aadrun.graph import GraphClient
from tests.support.graph_server import GraphServer, Pki

TENANT = "11111111-1111-1111-1111-111111111111"
CLIENT_ID = "22222222-2222-2222-2222-222222222222"
CLIENT_SECRET = "test-secret-value"
FEDERATED_CLIENT_ID = "33333333-3333-3333-3333-333333333333"

__all__ = ["TENANT", "CLIENT_ID", "CLIENT_SECRET", "FEDERATED_CLIENT_ID", "make_pki", "graph_settings",
           "graph_client", "loopback_only", "graph_pki", "graph_server"]


def _cert(subject: str, issuer: x509.Name | None, key, signer, *, ca: bool) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
                              critical=False))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    else:
        builder = (builder
                   .add_extension(x509.SubjectAlternativeName([
                       x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    return builder.sign(signer, hashes.SHA256())


def make_pki(directory: Path) -> Pki:
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost, as PEM files."""
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert("aadrun test CA", None, ca_key, ca_key, ca=True)
    cert = _cert("127.0.0.1", ca.subject, key, ca_key, ca=False)
    files = Pki(str(directory / "ca.pem"), str(directory / "server.pem"), str(directory / "server-key.pem"))
    Path(files.ca_file).write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    Path(files.cert_file).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    Path(files.key_file).write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return files


def _is_loopback(host) -> bool:
    if host in ("localhost", None):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture
def loopback_only(monkeypatch):
    """Fail any name lookup or TCP connection beyond loopback (no test traffic leaves the host)."""
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            raise AssertionError(f"test tried to reach {address[0]}")
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if not _is_loopback(host.decode() if isinstance(host, bytes) else host):
            raise AssertionError(f"test tried to resolve {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture(scope="session")
def graph_pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("graph-pki"))


@pytest.fixture
def graph_server(graph_pki, monkeypatch, loopback_only):
    """A fresh server per test, TLS with the session's test CA (trusted through the
    environment, as MSAL and requests read it)."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", graph_pki.ca_file)
    monkeypatch.setenv("SSL_CERT_FILE", graph_pki.ca_file)
    server = GraphServer(graph_pki).start()
    server.add_app(TENANT, CLIENT_ID, secret=CLIENT_SECRET)
    server.add_app(TENANT, FEDERATED_CLIENT_ID, federated_subject=server.google_subject)
    try:
        yield server
    finally:
        server.stop()


def graph_settings(server: GraphServer, *, client_id: str = CLIENT_ID, secret: str | None = CLIENT_SECRET,
                   **overrides) -> Settings:
    return dataclasses.replace(Settings(), authority_url=server.authority_url, graph_url=server.graph_url,
                               client_id=client_id, client_secret=secret, **overrides)


def graph_client(server: GraphServer, *, tenant: str = TENANT, sleeps: list | None = None,
                 metadata_url: str | None = None, **settings) -> GraphClient:
    """A client for ``server``; each wait it would sleep is appended to ``sleeps`` instead.
    Without a secret it uses workload identity federation against the server's metadata endpoint."""
    record = sleeps if sleeps is not None else []
    return GraphClient(graph_settings(server, **settings), tenant, metadata_url=metadata_url or server.metadata_url,
                       sleep=record.append)
