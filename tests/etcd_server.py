"""A real etcd on loopback for tests and benchmarks: free ports, a temporary data dir, and
stop/start on the same data (an outage that etcd comes back from, leases and all)."""
from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

from tests.servers import free_port


def etcd_binary() -> str | None:
    return shutil.which("etcd")


class EtcdServer:
    def __init__(self, data_dir: Path | None = None, tls: Path | None = None):
        """tls: a folder from make_certs(): clients must then speak TLS with a client certificate."""
        binary = etcd_binary()
        assert binary is not None, "etcd is not installed (apt-get install etcd-server)"
        self.binary = binary
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="meshgate-etcd-"))
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.data_dir.parent / f"{self.data_dir.name}.log"
        self.tls = tls

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self, timeout_s: float = 20.0) -> None:
        client = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        tls = [] if self.tls is None else [
            "--cert-file", str(self.tls / "server.pem"), "--key-file", str(self.tls / "server.key"),
            "--trusted-ca-file", str(self.tls / "ca.pem"), "--client-cert-auth"]
        self.proc = subprocess.Popen(
            [self.binary, *tls, "--name", "t", "--data-dir", str(self.data_dir / "data"),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"t={peer}", "--log-level", "warn"],
            stdout=subprocess.DEVNULL, stderr=self.log.open("ab"))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited: {self.log.read_text()[-2000:]}")
            if self._healthy():
                return
            time.sleep(0.05)
        raise RuntimeError(f"etcd did not start: {self.log.read_text()[-2000:]}")

    def _healthy(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.client_port), timeout=0.5) as raw:
                s = raw
                if self.tls is not None:
                    ctx = ssl.create_default_context(cafile=str(self.tls / "ca.pem"))
                    ctx.load_cert_chain(str(self.tls / "client.pem"), str(self.tls / "client.key"))
                    s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
                s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
                return b'"health":"true"' in s.recv(4096)
        except (OSError, ssl.SSLError):
            return False

    def stop(self) -> None:
        """Kill it (an outage: no goodbye to clients); the data stays for start()."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.log.unlink(missing_ok=True)


def make_certs(folder: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (openssl)."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    folder.mkdir(parents=True, exist_ok=True)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.pem")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):
        (folder / f"{name}.ext").write_text(ext + "\n")
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem")
    return folder
