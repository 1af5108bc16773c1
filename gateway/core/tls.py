"""TLS contexts for every hop: the fronts clients reach, pool workers, and the gateway's upstream client.

Certificates are files; they are re-read when they change, without a restart. A listening side keeps
one `ServerTls`: its SSLContext's SNI callback runs at the start of every handshake (OpenSSL calls it
whether or not the client sent a name) and hands the connection the context made from the current
files. So a connection that is open keeps the certificate it was made with, and the next one gets the
new certificate. Files that fail to load (half written, key and certificate not matching yet) leave
the last good context in place, and the next handshake tries again.

The client side (`ClientTls`) does the same per new connection: the gateway's client certificate and
trusted CA may be replaced while kept-alive connections go on.

Settings: TLS 1.2 and 1.3 only; for 1.2 the ECDHE AEAD suites (forward secrecy, no CBC, no RSA key
exchange); 1.3's suites are OpenSSL's (all AEAD). ALPN is offered as the caller says (`http/1.1` for
HTTP/1.1 fronts).

Certificate parsing for the expiry gauges uses `cryptography` (imported where used).
"""
from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("meshgate.tls")

# TLS 1.2 suites with forward secrecy and AEAD only (the "intermediate" set of Mozilla's guidelines,
# less DHE: finite-field DH costs far more per handshake for nothing a modern client needs)
CIPHERS_TLS12 = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:" \
                "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True, slots=True)
class ServerFiles:
    """What a listening side needs (copied from its config section; core reads no config)."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None  # verify client certificates against this CA
    require_client_cert: bool = False  # refuse a handshake without a client certificate
    min_version: str = "1.2"
    alpn: tuple[str, ...] = ("http/1.1",)


@dataclass(frozen=True, slots=True)
class ClientFiles:
    ca_file: str | None = None  # None: the system's trust store
    cert_file: str | None = None  # the client certificate (mutual TLS), with key_file
    key_file: str | None = None
    min_version: str = "1.2"
    alpn: tuple[str, ...] = ("http/1.1",)


def file_stamp(*paths: str | None) -> tuple[tuple[int, int, int], ...]:
    """What tells a file changed: mtime, size and inode (a rename over it, as Kubernetes does)."""
    out = []
    for p in paths:
        if p is None:
            continue
        try:
            st = os.stat(p)
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append((0, 0, 0))
    return tuple(out)


def _base(ctx: ssl.SSLContext, min_version: str, alpn: tuple[str, ...]) -> ssl.SSLContext:
    ctx.minimum_version = VERSIONS[min_version]
    ctx.set_ciphers(CIPHERS_TLS12)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def server_context(f: ServerFiles) -> ssl.SSLContext:
    """A context from the files as they are now (raises ssl.SSLError / OSError when they are bad)."""
    ctx = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), f.min_version, f.alpn)
    ctx.load_cert_chain(f.cert_file, f.key_file)
    if f.client_ca_file is not None:
        ctx.load_verify_locations(cafile=f.client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED if f.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(f: ClientFiles) -> ssl.SSLContext:
    ctx = _base(ssl.create_default_context(cafile=f.ca_file), f.min_version, f.alpn)
    if f.cert_file is not None and f.key_file is not None:
        ctx.load_cert_chain(f.cert_file, f.key_file)
    return ctx


class ServerTls:
    """A listening side's TLS: `context` goes to create_server; each handshake gets the current files."""

    def __init__(self, files: ServerFiles):
        self.files = files
        self._stamp = file_stamp(files.cert_file, files.key_file, files.client_ca_file)
        self._current = server_context(files)  # bad files at start: the caller's error to report
        self.reloads = 0
        # The listening context: handshakes start on it, and the callback moves each to _current.
        self.context = server_context(files)
        self.context.sni_callback = self._on_hello

    def current(self) -> ssl.SSLContext:
        """The context made from the files as they are now (re-made when they changed)."""
        stamp = file_stamp(self.files.cert_file, self.files.key_file, self.files.client_ca_file)
        if stamp != self._stamp:
            try:
                ctx = server_context(self.files)
            except (OSError, ssl.SSLError) as e:
                # Keep the last good one; _stamp is left as it was, so the next handshake tries again.
                log.warning("TLS: cannot load %s (keeping the previous certificate): %s", self.files.cert_file, e)
                return self._current
            self._current, self._stamp = ctx, stamp
            self.reloads += 1
            log.info("TLS: loaded a new certificate from %s", self.files.cert_file)
        return self._current

    def _on_hello(self, sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                  ctx: ssl.SSLContext) -> None:
        sslobj.context = self.current()

    def expiry_s(self) -> float:
        """Seconds until the certificate now served expires (negative: expired)."""
        return cert_expiry_s(self.files.cert_file)


class ClientTls:
    """The gateway's upstream TLS: a context per new connection, re-made when the files change."""

    def __init__(self, files: ClientFiles, server_name: str | None = None):
        self.files = files
        self.server_name = server_name  # the name pools' certificates must carry; None: the URL's host
        self._stamp = file_stamp(files.ca_file, files.cert_file, files.key_file)
        self._current = client_context(files)

    def context(self) -> ssl.SSLContext:
        stamp = file_stamp(self.files.ca_file, self.files.cert_file, self.files.key_file)
        if stamp != self._stamp:
            try:
                self._current, self._stamp = client_context(self.files), stamp
                log.info("TLS: loaded new upstream TLS files")
            except (OSError, ssl.SSLError) as e:
                log.warning("TLS: cannot load the upstream TLS files (keeping the previous ones): %s", e)
        return self._current

    def expiry_s(self) -> float | None:
        return None if self.files.cert_file is None else cert_expiry_s(self.files.cert_file)


_expiry_cache: dict[str, tuple[tuple[tuple[int, int, int], ...], float]] = {}


def cert_expiry_s(path: str, now: float | None = None) -> float:
    """Seconds until the (first) certificate in a PEM file expires; negative once it has.
    NaN when the file cannot be read (a gauge shows that, rather than a scrape failing)."""
    stamp = file_stamp(path)
    cached = _expiry_cache.get(path)
    if cached is None or cached[0] != stamp:
        from cryptography import x509

        try:
            with open(path, "rb") as fh:
                cert = x509.load_pem_x509_certificate(fh.read())
            not_after = cert.not_valid_after_utc.timestamp()
        except (OSError, ValueError):
            not_after = float("nan")
        cached = _expiry_cache[path] = (stamp, not_after)
    return cached[1] - (time.time() if now is None else now)


def peer_names(peercert: dict[str, object] | None) -> set[str]:
    """The DNS names and common name of a verified peer certificate (ssl's getpeercert() form)."""
    if not peercert:
        return set()
    names = {v for k, v in peercert.get("subjectAltName", ()) if k == "DNS"}  # type: ignore[attr-defined]
    for rdn in peercert.get("subject", ()):  # type: ignore[attr-defined]
        names |= {v for k, v in rdn if k == "commonName"}
    return {str(n) for n in names}




class CertExpiryCollector:
    """Prometheus gauge `meshgate_tls_cert_expiry_seconds{cert=...}`: seconds until each configured
    certificate expires (negative once it has), read at scrape time from the files as they are now."""

    def __init__(self, files: dict[str, str | None]):
        self.files = {name: path for name, path in files.items() if path is not None}

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        g = GaugeMetricFamily("meshgate_tls_cert_expiry_seconds",
                              "Seconds until the certificate expires (negative: expired), by certificate.",
                              labels=["cert"])
        for name, path in self.files.items():
            g.add_metric([name], cert_expiry_s(path))
        yield g
