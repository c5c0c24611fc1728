"""A small certificate authority (with `cryptography`): the local CA `fabrica run` keeps in its data folder,
and the certificates it issues to each service and to the collector.

A certificate names who holds it in a URI SAN, which `runtime.tls.principal_from_peer` reads back:
``urn:fabrica:service:<name>`` for a service, ``urn:fabrica:collector:<id>`` for a collector. A server
certificate also carries the DNS and IP SANs its clients dial (``localhost``, ``127.0.0.1``). Keys are
ECDSA P-256; the CA is valid for ten years, the certificates it issues for one.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVICE_URI = "urn:fabrica:service:"
COLLECTOR_URI = "urn:fabrica:collector:"
#: A collector certificate's tenant (runtime/tenancy.py); without it the collector is of ``default``.
TENANT_URI = "urn:fabrica:tenant:"

#: What a server certificate of `fabrica run` answers to (its services listen on 127.0.0.1).
LOCAL_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")

_CA_DAYS = 3650
_CERT_DAYS = 365


def service_uri(name: str) -> str:
    return SERVICE_URI + name


def collector_uri(collector_id: str) -> str:
    return COLLECTOR_URI + collector_id


def tenant_uri(tenant: str) -> str:
    return TENANT_URI + tenant


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Fabrica"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])


def _general_names(names: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in names:
        if name.startswith("urn:"):
            out.append(x509.UniformResourceIdentifier(name))
            continue
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, PEM encoded."""

    cert_pem: bytes
    key_pem: bytes


class CertificateAuthority:
    """A CA key and self-signed certificate that issues server and client certificates."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate):
        self.key, self.cert = key, cert

    @classmethod
    def create(cls, common_name: str = "Fabrica local CA") -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=_CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @classmethod
    def load(cls, cert_pem: bytes, key_pem: bytes) -> CertificateAuthority:
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the CA key is not an EC key")
        return cls(key, x509.load_pem_x509_certificate(cert_pem))

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.key)

    def issue(self, common_name: str, names: Sequence[str], *, server: bool = True,
              client: bool = True) -> Issued:
        """A certificate for `common_name` with `names` as SANs (``urn:...`` become URI SANs, IP addresses
        IP SANs, the rest DNS names), usable as a server and/or client certificate."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usages = [u for u, on in ((ExtendedKeyUsageOID.SERVER_AUTH, server),
                                  (ExtendedKeyUsageOID.CLIENT_AUTH, client)) if on]
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=_CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(_general_names(names)), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))

    def issue_service(self, service: str, hosts: Sequence[str] = LOCAL_NAMES) -> Issued:
        """A service's certificate: a server certificate for `hosts`, and a client one naming the service."""
        return self.issue(f"fabrica {service}", [service_uri(service), *hosts])

    def issue_collector(self, collector_id: str, hosts: Sequence[str] = LOCAL_NAMES, *,
                        tenant: str | None = None) -> Issued:
        """A collector's certificate: its client identity (of `tenant`; ``default`` when None), and its admin
        API's server certificate."""
        names = [collector_uri(collector_id), *([tenant_uri(tenant)] if tenant else []), *hosts]
        return self.issue(f"fabrica collector {collector_id}", names)


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` readable by the owner only, atomically (a crash leaves the old file or none)."""
    scratch = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(scratch, path)
