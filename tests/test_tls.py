"""TLS on every listener when a certificate is configured; mutual TLS when a CA is too."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ftps.common import grpcutil
from ftps.v1 import registry_pb2, registry_pb2_grpc
from services.builder_registry.__main__ import create_server
from services.builder_registry.config import RegistrySettings


def _cert(name, issuer_key=None, issuer_name=None, *, ca=False, san=None):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name or subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(hours=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in san]), critical=False)
    cert = b.sign(issuer_key or key, hashes.SHA256())
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key, cert, pem(cert), key_pem


@pytest.fixture
def pki(tmp_path):
    ca_key, ca_cert, ca_pem, _ = _cert("ftps-test-ca", ca=True)
    _, _, srv_pem, srv_key = _cert("localhost", ca_key, ca_cert.subject, san=["localhost"])
    _, _, cli_pem, cli_key = _cert("gateway", ca_key, ca_cert.subject, san=["gateway"])
    files = {}
    for name, data in (("ca.pem", ca_pem), ("srv.pem", srv_pem), ("srv.key", srv_key),
                       ("cli.pem", cli_pem), ("cli.key", cli_key)):
        (tmp_path / name).write_bytes(data)
        files[name] = str(tmp_path / name)
    return files


def _list(channel):
    return registry_pb2_grpc.BuilderRegistryServiceStub(channel).ListTasks(registry_pb2.ListTasksRequest(), timeout=5)


def test_mutual_tls(storage_kwargs, pki):
    kw = dict(storage_kwargs, listen="localhost:0")
    server = create_server(RegistrySettings(**kw, tls_cert_file=pki["srv.pem"], tls_key_file=pki["srv.key"],
                                            tls_ca_file=pki["ca.pem"]))
    port = server.start("localhost:0")
    target = f"localhost:{port}"
    try:
        good = grpcutil.Tls.from_files(pki["cli.pem"], pki["cli.key"], pki["ca.pem"])
        assert _list(grpcutil.make_channel(target, tls=good)).tasks == []
        no_client_cert = grpcutil.Tls.from_files(ca_file=pki["ca.pem"])
        with pytest.raises(grpc.RpcError) as e:
            _list(grpcutil.make_channel(target, tls=no_client_cert))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError):
            _list(grpcutil.make_channel(target))  # plaintext to a TLS port
    finally:
        server.stop(0)


def test_server_tls_without_client_certs(storage_kwargs, pki):
    server = create_server(RegistrySettings(**storage_kwargs, tls_cert_file=pki["srv.pem"],
                                            tls_key_file=pki["srv.key"]))
    port = server.start("localhost:0")
    try:
        tls = grpcutil.Tls.from_files(ca_file=pki["ca.pem"])
        assert _list(grpcutil.make_channel(f"localhost:{port}", tls=tls)).tasks == []
    finally:
        server.stop(0)


def test_half_configured_tls_is_an_error():
    with pytest.raises(ValueError, match="go together"):
        grpcutil.Tls.from_files(cert_file="a.pem")
