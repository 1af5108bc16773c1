"""Certificates for TLS tests, made in the test with `cryptography` (gateway/cli/certs.py)."""
from __future__ import annotations

import os
import ssl
from pathlib import Path

from gateway.cli.certs import Issued, make_ca, make_cert

LOOPBACK = ("localhost", "127.0.0.1")


class TestPKI:
    """A CA and certificates from it, written under `folder`."""

    __test__ = False  # not a test class, whatever its name

    def __init__(self, folder: Path, ca_name: str = "test CA"):
        self.folder = folder
        self.ca = make_ca(ca_name)
        self.ca_file = str(self.ca.write(folder, "ca")[0])

    def issue(self, stem: str, names: tuple[str, ...] = LOOPBACK, server: bool = True, client: bool = False,
              days: float = 30, start_days: float = 0) -> tuple[str, str]:
        cert, key = make_cert(self.ca, names, server=server, client=client, days=days,
                              start_days=start_days).write(self.folder, stem)
        return str(cert), str(key)

    def replace(self, cert_file: str, key_file: str, names: tuple[str, ...] = LOOPBACK,
                client: bool = False) -> Issued:
        """New certificate and key over the old files, each by an atomic rename (as Kubernetes and
        cert-manager replace mounted Secrets): the key first, then the certificate."""
        issued = make_cert(self.ca, names, server=not client, client=client)
        for path, data in ((key_file, issued.key_pem()), (cert_file, issued.cert_pem())):
            tmp = f"{path}.tmp"
            Path(tmp).write_bytes(data)
            os.replace(tmp, path)
        return issued

    def client_context(self, cert: tuple[str, str] | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if cert is not None:
            ctx.load_cert_chain(*cert)
        return ctx


def peer_serial(der: bytes) -> int:
    from cryptography import x509

    return x509.load_der_x509_certificate(der).serial_number
