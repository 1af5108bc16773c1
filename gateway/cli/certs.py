"""`meshgate certs`: a development CA and certificates for the embedded mesh (and for tests).

    meshgate certs --out certs/            # ca.pem/ca-key.pem, gateway.pem (server), mesh-client.pem,
                                            # pool.pem (server), each with its -key.pem
    meshgate certs --out certs/ --name gateway.example --name 10.0.0.5

Keys are ECDSA P-256 (cheap handshakes); certificates carry the names given (DNS names, or IP
addresses), plus localhost and 127.0.0.1 so the embedded mesh on loopback verifies. A development CA
is not for production: use your own CA or cert-manager there (configs/k8s).
"""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def write(self, folder: Path, stem: str) -> tuple[Path, Path]:
        """stem.pem and stem-key.pem (the key readable by its owner only)."""
        folder.mkdir(parents=True, exist_ok=True)
        cert, key = folder / f"{stem}.pem", folder / f"{stem}-key.pem"
        cert.write_bytes(self.cert_pem())
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(self.key_pem())
        return cert, key


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshgate dev"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str = "meshgate dev CA", days: int = 365) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return Issued(cert, key)


def make_cert(ca: Issued, names: tuple[str, ...], server: bool = True, client: bool = False,
              days: float = 90, start_days: float = 0) -> Issued:
    """A leaf certificate signed by `ca` for `names` (the first is the common name), valid from
    `start_days` from now (negative: in the past) for `days`."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=start_days)
    alt: list[x509.GeneralName] = []
    for n in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
    cert = (x509.CertificateBuilder().subject_name(_name(names[0])).issuer_name(ca.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
            .sign(ca.key, hashes.SHA256()))
    return Issued(cert, key)


def write_dev_mesh(out: Path, names: tuple[str, ...] = (), days: int = 90) -> dict[str, Path]:
    """The files the TLS example config (configs/local-tls.yaml) names, under `out`."""
    all_names = tuple(dict.fromkeys(names + LOOPBACK))
    ca = make_ca()
    ca_cert, _ = ca.write(out, "ca")
    files = {"ca": ca_cert}
    for stem, server, client in (("gateway", True, False), ("pool", True, False), ("mesh-client", False, True)):
        cert, key = make_cert(ca, all_names if stem != "mesh-client" else ("meshgate-gateway",),
                              server=server, client=client, days=days).write(out, stem)
        files[stem], files[f"{stem}-key"] = cert, key
    return files


def main(args: argparse.Namespace) -> int:
    files = write_dev_mesh(Path(args.out), tuple(args.name), args.days)
    for what, path in files.items():
        print(f"{what:12s} {path}")
    return 0
