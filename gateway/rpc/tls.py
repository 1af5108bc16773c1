"""Client-facing TLS on the gRPC front: gateway.tls's files, re-read when they change.

grpcio's dynamic server credentials ask a fetcher for the certificate at each new connection's
handshake: it answers None while the files are unchanged (grpc keeps what it has) and a new
configuration once they change, so no restart is needed and calls in progress keep their connection.
Files that do not load (half written) are not handed to grpc: the previous certificate stays.
ALPN is grpc's own (h2); grpc's TLS floor is 1.2.
"""
from __future__ import annotations

import logging
import ssl

import grpc

from gateway.config import TlsServerConfig
from gateway.core.tls import file_stamp, server_context

log = logging.getLogger("meshgate.rpc")


class RpcTls:
    def __init__(self, cfg: TlsServerConfig):
        self.cfg = cfg
        self.files = cfg.files(("h2",))
        self._stamp = self._now()
        self.reloads = 0

    def _now(self) -> tuple[tuple[int, int, int], ...]:
        return file_stamp(self.files.cert_file, self.files.key_file, self.files.client_ca_file)

    def _config(self) -> grpc.ServerCertificateConfiguration:
        server_context(self.files)  # raises on files that do not load: never hand grpc a broken pair
        with open(self.files.cert_file, "rb") as c, open(self.files.key_file, "rb") as k:
            pair = [(k.read(), c.read())]
        ca = None
        if self.files.client_ca_file is not None:
            with open(self.files.client_ca_file, "rb") as f:
                ca = f.read()
        return grpc.ssl_server_certificate_configuration(pair, root_certificates=ca)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's thread, at each handshake: None keeps the current certificate."""
        stamp = self._now()
        if stamp == self._stamp:
            return None
        try:
            config = self._config()
        except (OSError, ssl.SSLError) as e:
            log.warning("gRPC TLS: cannot load %s (keeping the previous certificate): %s", self.files.cert_file, e)
            return None
        self._stamp = stamp
        self.reloads += 1
        log.info("gRPC TLS: loaded a new certificate from %s", self.files.cert_file)
        return config

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._config(), self._fetch, require_client_authentication=self.cfg.require_client_cert)
