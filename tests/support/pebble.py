"""A throwaway ACME certificate authority: Debian's ``pebble``, really validating HTTP-01.

:func:`pebble_server` starts, on loopback and on ports picked from the kernel:

- ``pebble-challtestsrv`` (from the same package) as DNS server only: it answers every A
  query with 127.0.0.1 and AAAA with nothing, so any name (``turn.tsunagu.test``) leads
  pebble's validation to this host;
- ``pebble`` with ``-dnsserver`` pointing there, its own TLS certificate made here (the
  package ships none), ``PEBBLE_VA_NOSLEEP=1`` (no random waits before validating),
  ``PEBBLE_WFE_NONCEREJECT=0`` (by default it rejects 5% of good nonces, to test clients'
  retries: a test must not fail by chance) and ``PEBBLE_AUTHZREUSE=0`` (each order is
  validated anew, so a failed challenge cannot be skipped by an earlier success).

Pebble's validator connects to ``http_port`` of the name for HTTP-01: the client under test
must answer there. Both processes are stopped by PID, with bounded waits.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from .certs import make_certificate

PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"
CHALLTESTSRV = shutil.which("pebble-challtestsrv") or "/usr/bin/pebble-challtestsrv"
HOST = "127.0.0.1"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0


def pebble_available() -> bool:
    return Path(PEBBLE).exists() and Path(CHALLTESTSRV).exists()


def _free_port(*, udp: bool = False) -> int:
    """A TCP port free on loopback (and for UDP too with ``udp``)."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if not udp:
            return port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port found")


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-3000:]
    except FileNotFoundError:
        return ""


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT)


@dataclass
class Pebble:
    """A running pebble. Give a client ``directory_url`` and ``ca_file``, and answer
    HTTP-01 on ``http_port``."""

    directory: Path
    #: The ACME directory, https://127.0.0.1:PORT/dir.
    directory_url: str
    #: The CA of pebble's own HTTPS listeners: what acme_ca_file is given.
    ca_file: Path
    #: Pebble's management interface (the roots of the certificates it issues).
    management_url: str
    #: The port pebble's validator connects to for HTTP-01 challenges.
    http_port: int
    #: The DNS server that resolves every name to 127.0.0.1 (UDP and TCP).
    dns_port: int
    log_path: Path

    def _get(self, url: str) -> bytes:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        with urllib.request.urlopen(url, context=context, timeout=10) as response:
            return bytes(response.read())

    def root_pem(self) -> bytes:
        """The root every certificate this pebble issues chains to (``/roots/0``); pebble
        makes a new one at each start."""
        return self._get(f"{self.management_url}/roots/0")

    def root(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.root_pem())

    def log(self) -> str:
        return _tail(self.log_path)


def _wait_ready(pebble: Pebble, processes: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    last: Exception | None = None
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args[0]} exited:\n{pebble.log()}")
        try:
            pebble._get(pebble.directory_url)
            with socket.create_connection((HOST, pebble.dns_port), timeout=1):
                return
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"pebble was not ready in {START_TIMEOUT:g} s ({last}):\n{pebble.log()}")


@contextlib.contextmanager
def pebble_server(*, validity: int | None = None) -> Iterator[Pebble]:
    """A pebble and its DNS server, stopped on exit. ``validity``: the lifetime in seconds
    of the certificates it issues (default: pebble's five years), for renewal tests."""
    directory = Path(tempfile.mkdtemp(prefix="tsunagu-pebble-", dir="/tmp"))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        cert, key = make_certificate(
            directory,
            "pebble",
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))],
        )
        acme_port, management_port, http_port = _free_port(), _free_port(), _free_port()
        dns_port, dns_management_port = _free_port(udp=True), _free_port()
        config = directory / "pebble-config.json"
        config.write_text(
            json.dumps(
                {
                    "pebble": {
                        "listenAddress": f"{HOST}:{acme_port}",
                        "managementListenAddress": f"{HOST}:{management_port}",
                        "certificate": str(cert),
                        "privateKey": str(key),
                        "httpPort": http_port,
                        # TLS-ALPN-01 is not used; a port nobody listens on.
                        "tlsPort": _free_port(),
                        "ocspResponderURL": "",
                        "externalAccountBindingRequired": False,
                        **({"certificateValidityPeriod": validity} if validity else {}),
                    }
                }
            )
        )
        pebble = Pebble(
            directory=directory,
            directory_url=f"https://{HOST}:{acme_port}/dir",
            ca_file=cert,
            management_url=f"https://{HOST}:{management_port}",
            http_port=http_port,
            dns_port=dns_port,
            log_path=directory / "pebble.log",
        )
        env = {
            "PATH": "/usr/bin:/bin",
            "PEBBLE_VA_NOSLEEP": "1",
            "PEBBLE_WFE_NONCEREJECT": "0",
            "PEBBLE_AUTHZREUSE": "0",
        }
        with open(pebble.log_path, "ab") as log:
            processes.append(
                subprocess.Popen(
                    [CHALLTESTSRV, "-dns01", f"{HOST}:{dns_port}", "-http01", "",
                     "-https01", "", "-tlsalpn01", "", "-defaultIPv4", HOST,
                     "-defaultIPv6", "", "-management", f"{HOST}:{dns_management_port}"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    cwd=directory, env=env,
                )
            )  # fmt: skip
            processes.append(
                subprocess.Popen(
                    [PEBBLE, "-config", str(config), "-dnsserver", f"{HOST}:{dns_port}"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    cwd=directory, env=env,
                )
            )  # fmt: skip
        _wait_ready(pebble, processes)
        yield pebble
    finally:
        for process in reversed(processes):
            _stop(process)
        shutil.rmtree(directory, ignore_errors=True)
