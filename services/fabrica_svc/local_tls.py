"""The certificates of `fabrica run`: a local CA and one certificate per service, in ``<data dir>/tls/``.

Created at first start (runtime/certs.py), reused after; a certificate missing from the folder (e.g. the
collector's after its id changed), or within RENEW_BEFORE of its expiry, is issued (again) by the CA already
there. Private keys are written readable by
the owner only. The layout::

    tls/ca.pem, tls/ca-key.pem                     the CA (clients trust ca.pem: grpcurl -cacert tls/ca.pem)
    tls/<service>.pem, tls/<service>-key.pem       config, ingest, production: urn:fabrica:service:<name>
    tls/collector-<id>.pem, ...-key.pem            the collector <id>: urn:fabrica:collector:<id>

Every certificate is also a server certificate for localhost, 127.0.0.1 and ::1 (where `fabrica run` listens).
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from .runtime.certs import CertificateAuthority, Issued, write_private

log = logging.getLogger("fabrica.run")

#: A certificate this close to its end is issued again at start (they last a year, the CA ten).
RENEW_BEFORE = datetime.timedelta(days=30)


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path
    ca: Path

    def env(self) -> dict[str, str]:
        """As the FABRICA_TLS_* settings name them."""
        return {"FABRICA_TLS_CERT": str(self.cert), "FABRICA_TLS_KEY": str(self.key), "FABRICA_TLS_CA": str(self.ca)}


def _expiring(cert: Path) -> bool:
    try:
        end = x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc
    except ValueError:
        return True  # not a certificate (any more): issue it again
    return end - datetime.datetime.now(datetime.UTC) < RENEW_BEFORE


class LocalPki:
    """The CA in ``<data dir>/tls``, created on first use."""

    def __init__(self, data_dir: Path):
        self.folder = data_dir / "tls"
        self.ca_path = self.folder / "ca.pem"
        self._ca: CertificateAuthority | None = None

    def _authority(self) -> CertificateAuthority:
        if self._ca is None:
            key_path = self.folder / "ca-key.pem"
            if self.ca_path.exists() and key_path.exists():
                self._ca = CertificateAuthority.load(self.ca_path.read_bytes(), key_path.read_bytes())
            else:
                self.folder.mkdir(parents=True, exist_ok=True)
                self.folder.chmod(0o700)
                self._ca = CertificateAuthority.create()
                write_private(key_path, self._ca.key_pem)
                self.ca_path.write_bytes(self._ca.cert_pem)
                log.info("created a local CA in %s", self.folder)
        return self._ca

    def _files(self, stem: str, issue: str) -> CertFiles:
        ca = self._authority()
        cert, key = self.folder / f"{stem}.pem", self.folder / f"{stem}-key.pem"
        if not (cert.exists() and key.exists()) or _expiring(cert):
            issued: Issued = ca.issue_collector(issue) if stem.startswith("collector-") else ca.issue_service(issue)
            write_private(key, issued.key_pem)
            cert.write_bytes(issued.cert_pem)
        return CertFiles(cert, key, self.ca_path)

    def service(self, name: str) -> CertFiles:
        return self._files(name, name)

    def collector(self, collector_id: str) -> CertFiles:
        return self._files(f"collector-{collector_id}", collector_id)
