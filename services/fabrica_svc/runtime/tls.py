"""TLS for every gRPC port and channel, and the identity a verified client certificate proves.

Settings (every service; read by runtime/settings.py, which stops the service with one line naming the
setting when a file is missing, unreadable or not PEM):

=========================  ====================================================================
FABRICA_TLS_CERT           PEM certificate (chain) the service presents: as a server on its ports,
                           and as a client on its channels to peers (collector → config/ingest,
                           production → ingest/config)
FABRICA_TLS_KEY            its PEM private key
FABRICA_TLS_CA             PEM CA bundle: verifies the servers it dials and the client certificates
                           on its peer port
FABRICA_PEER_PORT          the mutual-TLS port (-1: none, 0: any free port): the same services as
                           the gRPC port, but the handshake requires a client certificate signed by
                           FABRICA_TLS_CA. Collectors and services call here.
FABRICA_INSECURE           1: plaintext is allowed when no certificate is configured (development
                           only; logged as a warning at start)
=========================  ====================================================================

Why two ports: grpcio (1.85, Python) can either require a client certificate in the handshake or not ask
for one at all (``ssl_server_credentials(require_client_auth=...)`` maps to gRPC core's
REQUEST_AND_REQUIRE or DONT_REQUEST; "request, verify if given" is not exposed). Users and the gateway
come with bearer tokens and no client certificate, so the gRPC port serves TLS without asking for one;
machines (collectors, services) come with certificates, so they call the peer port, where the handshake
refuses anyone without a certificate of the CA. One server serves both ports with the same handlers and
interceptor; per call, the interceptor asks runtime/auth.py's Authenticator.identify who the caller is: a bearer
token first, then :func:`principal_from_peer` (the verified client certificate).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from . import principal, tenancy
from .certs import COLLECTOR_URI, SERVICE_URI, TENANT_URI

log = logging.getLogger(__name__)

#: The auth-context key under which gRPC lists the URI SANs of the verified peer certificate.
PEER_URI_KEY = "peer_uri"


class TlsFileError(ValueError):
    """A TLS file cannot be used; the message names the setting (runtime/settings.py makes it a SettingsError)."""


@dataclass(frozen=True)
class TlsConfig:
    """The PEM contents of the certificate, key and CA a service uses (read once, at settings time)."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes
    #: Where they came from, for messages and the banner.
    cert_path: Path | None = None
    ca_path: Path | None = None

    def server_credentials(self, *, require_client_cert: bool) -> grpc.ServerCredentials:
        """TLS for a port: with `require_client_cert`, a client certificate signed by the CA is required
        in the handshake (the peer port); without, none is requested (the gRPC port)."""
        return grpc.ssl_server_credentials(
            [(self.key_pem, self.cert_pem)],
            root_certificates=self.ca_pem if require_client_cert else None,
            require_client_auth=require_client_cert,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """TLS for a channel to a peer: the server is verified against the CA, and this service's
        certificate is presented as its client certificate."""
        return grpc.ssl_channel_credentials(self.ca_pem, self.key_pem, self.cert_pem)


def _read(setting: str, raw: str) -> tuple[Path, bytes]:
    path = Path(raw)
    try:
        return path, path.read_bytes()
    except FileNotFoundError:
        raise TlsFileError(f"{setting}={raw}: no such file") from None
    except OSError as exc:
        raise TlsFileError(f"{setting}={raw}: cannot be read: {exc.strerror or exc}") from None


def load_tls(cert: str, key: str, ca: str) -> TlsConfig:
    """Read and check the three files (each must exist, be readable and hold what it is named for)."""
    for setting, value in (("FABRICA_TLS_CERT", cert), ("FABRICA_TLS_KEY", key), ("FABRICA_TLS_CA", ca)):
        if not value:
            raise TlsFileError(f"{setting} is not set: TLS needs FABRICA_TLS_CERT, FABRICA_TLS_KEY and "
                               "FABRICA_TLS_CA (or set none of them and FABRICA_INSECURE=1 for plaintext, "
                               "development only)")
    cert_path, cert_pem = _read("FABRICA_TLS_CERT", cert)
    _, key_pem = _read("FABRICA_TLS_KEY", key)
    ca_path, ca_pem = _read("FABRICA_TLS_CA", ca)
    try:
        leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError:
        raise TlsFileError(f"FABRICA_TLS_CERT={cert}: not a PEM certificate") from None
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise TlsFileError(f"FABRICA_TLS_KEY={key}: not an unencrypted PEM private key") from None
    try:
        x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        raise TlsFileError(f"FABRICA_TLS_CA={ca}: not a PEM certificate bundle") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if (private.public_key().public_bytes(serialization.Encoding.DER, pub)
            != leaf.public_key().public_bytes(serialization.Encoding.DER, pub)):
        raise TlsFileError(f"FABRICA_TLS_KEY={key}: is not the key of FABRICA_TLS_CERT={cert}")
    return TlsConfig(cert_pem, key_pem, ca_pem, cert_path, ca_path)


def principal_from_uris(uris: list[str]) -> principal.Principal | None:
    """The principal a verified certificate's URI SANs name: ``urn:fabrica:collector:<id>`` →
    ``collector:<id>`` (role collector) of the tenant its ``urn:fabrica:tenant:<code>`` names (``default``
    without one), ``urn:fabrica:service:<name>`` → ``service:<name>`` (viewer), installation-wide (``*``:
    it names the tenant per request, runtime/tenancy.py); None when it names neither, or names a tenant
    that is not a tenant code. A collector URI wins over a service URI in the same certificate."""
    tenants = [uri[len(TENANT_URI):] for uri in uris if uri.startswith(TENANT_URI)]
    for uri in uris:
        if uri.startswith(COLLECTOR_URI) and (cid := uri[len(COLLECTOR_URI):]):
            tenant = tenants[0] if tenants else tenancy.DEFAULT
            if len(set(tenants)) > 1 or not tenancy.is_code(tenant):
                return None
            return principal.Principal(subject=f"collector:{cid}", roles=frozenset({principal.COLLECTOR}),
                                       collector_id=cid, via="certificate", tenant=tenant)
    for uri in uris:
        if uri.startswith(SERVICE_URI) and (name := uri[len(SERVICE_URI):]):
            return principal.Principal(subject=f"service:{name}", roles=frozenset({principal.VIEWER}),
                                       via="certificate", tenant=tenancy.ALL)
    return None


def principal_from_peer(context: grpc.aio.ServicerContext) -> principal.Principal | None:
    """The principal the peer's client certificate proves, or None (no certificate, or one that names no
    Fabrica identity). gRPC lists a certificate's SANs in the auth context only after it verified the
    certificate against the port's CA in the handshake (the peer port), so what is read here is proven."""
    auth = context.auth_context()
    if auth.get("transport_security_type") != [b"ssl"]:
        return None
    uris = [v.decode("utf-8", "replace") for v in auth.get(PEER_URI_KEY, [])]
    return principal_from_uris(uris)


