"""The web app beyond loopback: HTTPS with the generated certificate unless told otherwise,
and SIGHUP doing what ``tsunagu reload`` does, on a real ``tsunagu serve``."""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from support.interop import free_ports, relay_range
from tsunagu import serve
from tsunagu.config import parse_config
from tsunagu.serve import settings as serve_settings
from tsunagu.tls import GENERATED_CERT_NAME

READY = "tsunagu: ready"


class Serve:
    def __init__(self, tmp: Path, *extra: str) -> None:
        self.tmp = tmp
        self.log = tmp / "serve.log"
        self.out = tmp / "serve.out"
        self.web_port, turn_port, tls_port = free_ports(3)
        low, high = relay_range()
        command = [
            *(sys.executable, "-m", "tsunagu", "serve", "-L", "127.0.0.1"),
            *("--listening-port", str(turn_port), "--tls-listening-port", str(tls_port)),
            *("--min-port", str(low), "--max-port", str(high), "--workers", "1"),
            *("--web-port", str(self.web_port), "--room-access", "open"),
            *("--drain-timeout", "0", "--log-file", str(self.log), *extra),
        ]
        env = dict(os.environ, XDG_STATE_HOME=str(tmp / "state"), PYTHONUNBUFFERED="1")
        with open(self.out, "wb") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )

    def printed(self) -> str:
        return self.out.read_text(errors="replace")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for(self, read: str, text: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.printed() if read == "out" else self.log_text()
            if text in found:
                return found
            assert self.process.poll() is None, self.printed() + self.log_text()
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not seen:\n{self.printed()}{self.log_text()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=5)


def running(tmp: Path, *extra: str) -> Iterator[Serve]:
    # The ports are checked free on loopback, the web app may bind the wildcard: a port in
    # use elsewhere (another address, a connection's ephemeral port since) makes the server
    # exit saying so, and it starts again on other ports, as run_serve's servers do.
    for attempt in range(3):
        server = Serve(tmp, *extra)
        try:
            server.wait_for("out", READY)
            break
        except AssertionError:
            if attempt == 2 or "Address already in use" not in server.printed():
                raise
            server.stop()
    try:
        yield server
    finally:
        code = server.stop()
    assert code == 0, server.printed() + server.log_text()


def non_loopback_address() -> str | None:
    for ip in serve.local_addresses():
        if not ipaddress.ip_address(ip).is_loopback:
            return ip
    return None


def test_a_web_app_beyond_loopback_serves_https_and_sighup_reloads(tmp_path: Path) -> None:
    for server in running(tmp_path, "--web-ip", "0.0.0.0"):
        printed = server.printed()
        line = next(s for s in printed.splitlines() if "web app on" in s)
        found = re.search(r"web app on https://\S+ .*self-signed certificate sha256 (\S+)", line)
        assert found, line
        # The same certificate as TURN over TLS: one SPKI for a tester to accept.
        assert len(set(re.findall(r"\bspki (\S+)", printed))) == 1, printed
        cert_path = tmp_path / "state" / "tsunagu" / GENERATED_CERT_NAME
        # The certificate TURN over TLS uses, trusted as it is: the name checked too.
        context = ssl.create_default_context(cafile=str(cert_path))
        connection = http.client.HTTPSConnection(
            "127.0.0.1", server.web_port, context=context, timeout=10
        )
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        assert response.status == 200, response.read()
        sock = connection.sock
        assert isinstance(sock, ssl.SSLSocket)
        der = sock.getpeercert(binary_form=True)
        assert der is not None
        connection.close()
        colon_hex = hashlib.sha256(der).hexdigest().upper()
        assert found.group(1) == ":".join(colon_hex[i : i + 2] for i in range(0, 64, 2))
        # A browser elsewhere reaches one of the machine's addresses: the certificate names it.
        cert = x509.load_der_x509_certificate(der)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ips = {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
        address = non_loopback_address()
        if address is not None:
            assert address in ips, (address, ips)

        server.process.send_signal(signal.SIGHUP)
        log = server.wait_for("log", "SIGHUP: reload done")
        assert "SIGHUP: reloading, as tsunagu reload does" in log
        assert "tsunagu reload: user database read again" in log
        assert "SIGHUP: reload done: 1 workers answered" in log
        assert server.process.poll() is None


def test_plain_http_beyond_loopback_is_an_explicit_choice(tmp_path: Path) -> None:
    for server in running(tmp_path, "--web-ip", "0.0.0.0", "--web-plain-http", "--no-turn"):
        line = next(s for s in server.printed().splitlines() if "web app on" in s)
        assert line.startswith(f"tsunagu: web app on http://0.0.0.0:{server.web_port}/ (plain HTTP")
        assert "reverse proxy" in line
        connection = http.client.HTTPConnection("127.0.0.1", server.web_port, timeout=10)
        connection.request("GET", "/healthz")
        assert connection.getresponse().status == 200
        connection.close()
        assert not (tmp_path / "state" / "tsunagu" / GENERATED_CERT_NAME).exists()
        # Nothing to read again without TURN, and the signal does not stop the server.
        server.process.send_signal(signal.SIGHUP)
        server.wait_for("log", "SIGHUP: nothing to reload without TURN")
        assert server.process.poll() is None


@pytest.mark.parametrize(
    ("values", "https"),
    [
        ({}, False),
        ({"web_ip": "127.0.0.2"}, False),
        ({"web_ip": "::1"}, False),
        ({"cert": "c.pem"}, True),
        ({"web_ip": "10.1.2.3"}, True),
        ({"web_ip": "0.0.0.0", "room_access": "open"}, True),
        ({"web_ip": "203.0.113.5", "room_access": "open"}, True),
        ({"web_ip": "10.1.2.3", "web_plain_http": True}, False),
        ({"cert": "c.pem", "web_plain_http": True}, False),
        ({"web_ip": "10.1.2.3", "no_web": True}, False),
    ],
)
def test_when_the_web_app_serves_https(values: dict[str, object], https: bool) -> None:
    assert serve.web_serves_https(parse_config(values)) is https


def test_the_generated_certificate_names_the_web_address_and_the_public_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = parse_config({"web_ip": "10.1.2.3", "public_host": "turn.example.org"})
    hosts = serve.certificate_hosts(config, ["10.1.2.4"])
    assert hosts == ["10.1.2.4", "turn.example.org", "10.1.2.3"]
    monkeypatch.setattr(serve_settings, "local_addresses", lambda: ["127.0.0.1", "192.0.2.7"])
    wildcard = parse_config({"web_ip": "0.0.0.0", "room_access": "open"})
    assert serve.certificate_hosts(wildcard, ["127.0.0.1"]) == [
        "127.0.0.1",
        "localhost",
        "192.0.2.7",
    ]
    # Loopback stays plain HTTP: nothing more to name than TURN's.
    assert serve.certificate_hosts(parse_config({}), ["127.0.0.1"]) == ["127.0.0.1", "localhost"]
