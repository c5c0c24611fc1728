"""Certificates for tests of TLS and identity: a real CA (runtime/certs.py, the one `fabrica run` uses) whose
files are written to a folder, the FABRICA_TLS_* environment of a service or collector holding one of its
certificates (and a token verifier: a local signing key in the same folder, since a service that is not in
development mode verifies tokens), and client channels that present one."""

from __future__ import annotations

from pathlib import Path

import grpc

from fabrica_svc.runtime.auth import LocalKey, ensure_local_key
from fabrica_svc.runtime.certs import CertificateAuthority, Issued
from fabrica_svc.runtime.channels import PEER_CHANNEL_OPTIONS


class Pki:
    """A CA in `folder`, issuing certificates on demand: ``pki.env("ingest")`` is the environment of a
    service with a certificate naming it (``urn:fabrica:service:ingest``), ``pki.env(collector="demo")`` of
    the collector ``demo``."""

    def __init__(self, folder: Path, name: str = "test CA"):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.ca = CertificateAuthority.create(name)
        self.ca_path = folder / "ca.pem"
        self.ca_path.write_bytes(self.ca.cert_pem)
        self._issued: dict[str, Issued] = {}
        #: The signing key whose public half the services of `env` verify tokens with.
        self.key: LocalKey = ensure_local_key(folder)

    def issued(self, service: str | None = None, *, collector: str | None = None) -> Issued:
        key = f"collector-{collector}" if collector else f"service-{service}"
        if key not in self._issued:
            self._issued[key] = (self.ca.issue_collector(collector) if collector
                                 else self.ca.issue_service(service or "test"))
            (self.folder / f"{key}.pem").write_bytes(self._issued[key].cert_pem)
            (self.folder / f"{key}-key.pem").write_bytes(self._issued[key].key_pem)
        return self._issued[key]

    def env(self, service: str | None = None, *, collector: str | None = None) -> dict[str, str]:
        self.issued(service, collector=collector)
        key = f"collector-{collector}" if collector else f"service-{service}"
        return {"FABRICA_TLS_CERT": str(self.folder / f"{key}.pem"),
                "FABRICA_TLS_KEY": str(self.folder / f"{key}-key.pem"),
                "FABRICA_TLS_CA": str(self.ca_path),
                "FABRICA_JWT_PUBLIC_KEY_FILE": str(self.key.public_key_file)}

    def credentials(self, service: str | None = None, *, collector: str | None = None,
                    client_cert: bool = True) -> grpc.ChannelCredentials:
        """Client credentials trusting this CA, presenting the certificate of `service` or `collector`
        (none with ``client_cert=False``)."""
        if not client_cert:
            return grpc.ssl_channel_credentials(self.ca.cert_pem)
        issued = self.issued(service, collector=collector)
        return grpc.ssl_channel_credentials(self.ca.cert_pem, issued.key_pem, issued.cert_pem)

    def channel(self, address: str, service: str | None = None, *, collector: str | None = None,
                client_cert: bool = True) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(address, self.credentials(service, collector=collector,
                                                                 client_cert=client_cert),
                                       options=PEER_CHANNEL_OPTIONS)
