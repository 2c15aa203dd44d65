"""``tsunagu probe turn`` and ``probe stun`` against real servers: every verdict caused for real.

Each failure cause is made to happen, not simulated: a wrong password, an expired TURN
REST credential, a server that denies its own relay addresses as peers, a self-signed
certificate checked the default way, a closed port, a UDP port where nothing answers, a
full server, and squid refusing the CONNECT or the proxy password. Against ``tsunagu serve``
and against coturn; the human output is checked for the verdict sentence and ``--json``
for the verdict code.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import ipaddress
import json
import os
import pty
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from support.certs import make_certificate
from support.interop import (
    HOST,
    HOST6,
    PASSWORD,
    USER,
    Coturn,
    ServeProcess,
    free_port,
    run_coturn,
    run_serve,
)
from support.proxy import Squid, run_squid
from tsunagu.auth.rest import mint_credentials
from tsunagu.cli import main
from tsunagu.tls import certificate_fingerprints

pytestmark = pytest.mark.interop

SECRET = "probe-rest-secret"
FAST = ("--seconds", "0.5", "--timeout", "3")
CREDENTIALS = ("-u", f"{USER}:{PASSWORD}")


def probe(*argv: str) -> tuple[int, str]:
    """Run ``tsunagu probe ...`` in this process; its exit status and standard output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["probe", *argv])
    return status, out.getvalue()


def probe_json(*argv: str) -> dict[str, Any]:
    status, out = probe(*argv, "--json")
    report: dict[str, Any] = json.loads(out)
    assert status == (0 if report["verdict"]["ok"] else 1)
    return report


def code_of(report: dict[str, Any]) -> str:
    return str(report["verdict"]["code"])


def verdict_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith("verdict: ")]
    assert lines, text
    return lines[-1]


def turn_url(port: int, transport: str = "udp") -> str:
    if transport == "tls":
        return f"turns:{HOST}:{port}?transport=tcp"
    return f"turn:{HOST}:{port}?transport={transport}"


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """Static user alice and TURN REST credentials from SECRET; loopback peers allowed."""
    tmp = tmp_path_factory.mktemp("serve")
    with run_serve(tmp, "--static-auth-secret", SECRET) as server:
        yield server


@pytest.fixture(scope="module")
def squid(serve: ServeProcess) -> Iterator[Squid]:
    """Allows authenticated CONNECT to the server's TCP and TLS ports only."""
    with run_squid([serve.port, serve.tls_port]) as proxy:
        yield proxy


def spki(server: ServeProcess) -> str:
    match = re.search(r" spki (\S+)", "\n".join(server.startup))
    assert match is not None, server.startup
    return match.group(1)


# --- tsunagu serve: it works ------------------------------------------------------------------


def test_relays_over_udp_tcp_and_tls(serve: ServeProcess) -> None:
    urls = [
        turn_url(serve.port, "udp"),
        turn_url(serve.port, "tcp"),
        turn_url(serve.tls_port, "tls"),
    ]
    report = probe_json("turn", *urls, *CREDENTIALS, *FAST, "--ca", str(serve.cert_path))
    assert code_of(report) == "ok", report["verdict"]
    assert [r["transport"] for r in report["results"]] == ["udp", "tcp", "tls"]
    for result in report["results"]:
        assert result["verdict"]["code"] == "ok"
        names = [step["name"] for step in result["steps"]]
        assert names[-4:] == ["allocate (peer)", "permission", "channel bind", "relay test"]
        relay = result["figures"]["relay"]
        assert relay["sent"] == 100 and relay["received"] >= 95
        assert relay["rtt_ms"]["p50"] > 0 and relay["throughput_mbps"] > 1.0
        assert relay["jitter_ms"] is not None
    tls = report["results"][2]["figures"]["tls"]
    assert tls["verified"] and tls["self_signed"] and "127.0.0.1" in tls["names"]


def test_human_output_shows_the_steps_and_the_verdict(serve: ServeProcess) -> None:
    status, out = probe("turn", turn_url(serve.port), *CREDENTIALS, *FAST)
    assert status == 0
    assert out.startswith(f"TURN {turn_url(serve.port)} as {USER}\n")
    for step in ("allocate", "allocate (peer)", "permission", "channel bind", "relay test"):
        assert re.search(rf"^  ok   {re.escape(step)} ", out, re.M), out
    assert "\r" not in out and "\x1b" not in out  # plain lines when not a terminal
    assert verdict_line(out).startswith("verdict: TURN over UDP works: ")
    assert "what to do: " in out


def test_tls_with_the_certificate_pinned(serve: ServeProcess) -> None:
    url = f"turns:localhost:{serve.tls_port}?transport=tcp"
    report = probe_json("turn", url, *CREDENTIALS, *FAST, "--pin", f"sha256/{spki(serve)}")
    assert code_of(report) == "ok", report["verdict"]
    assert report["results"][0]["figures"]["tls"]["trusted_by"] == "the pinned certificate"
    other = "sha256/" + "A" * 43 + "="
    report = probe_json("turn", url, *CREDENTIALS, *FAST, "--pin", other)
    assert code_of(report) == "tls-pin-mismatch"


def test_insecure_accepts_any_certificate_and_says_so(serve: ServeProcess) -> None:
    report = probe_json("turn", turn_url(serve.tls_port, "tls"), *CREDENTIALS, *FAST, "--insecure")
    assert code_of(report) == "ok", report["verdict"]
    tls = report["results"][0]["figures"]["tls"]
    assert not tls["verified"] and tls["trusted_by"] == "nothing (--insecure)"
    status, out = probe("turn", turn_url(serve.tls_port, "tls"), *CREDENTIALS, *FAST, "--insecure")
    assert "NOT verified" in out


def test_credentials_minted_from_the_secret(serve: ServeProcess) -> None:
    report = probe_json("turn", turn_url(serve.port), "--secret", SECRET, "--user", "dave", *FAST)
    assert code_of(report) == "ok", report["verdict"]


def test_stun_over_udp_tcp_and_tls(serve: ServeProcess) -> None:
    urls = [
        f"stun:{HOST}:{serve.port}",
        f"stun:{HOST}:{serve.port}?transport=tcp",
        f"stuns:{HOST}:{serve.tls_port}",
    ]
    report = probe_json("stun", *urls, "--ca", str(serve.cert_path))
    assert code_of(report) == "ok", report["verdict"]
    for result in report["results"]:
        figures = result["figures"]
        assert figures["mapped"] == figures["local"]
        assert figures["rtt_ms"]["min"] > 0
    status, out = probe("stun", urls[0])
    assert status == 0
    assert verdict_line(out).startswith(f"verdict: The STUN server {urls[0]}?transport=udp")
    assert "no NAT on the way" in out


# --- tsunagu serve: each failure --------------------------------------------------------------


def test_wrong_password(serve: ServeProcess) -> None:
    argv = ("turn", turn_url(serve.port), "-u", f"{USER}:not-the-password", *FAST)
    assert code_of(probe_json(*argv)) == "wrong-password"
    status, out = probe(*argv)
    assert status == 1
    assert verdict_line(out) == (
        f"verdict: The server refused the password for user {USER} (401 after the request "
        "was signed with it): wrong password, or no such user."
    )
    assert re.search(r"^  FAIL allocate .*stopped: wrong-password", out, re.M), out


def test_expired_rest_credential(serve: ServeProcess) -> None:
    username, password = mint_credentials(SECRET, "erin", -600, time.time())
    argv = ("turn", turn_url(serve.port, "tcp"), "-u", f"{username}:{password}", *FAST)
    assert code_of(probe_json(*argv)) == "credential-expired"
    status, out = probe(*argv)
    assert status == 1
    assert verdict_line(out).startswith(f"verdict: The TURN REST credential {username} expired")


def test_untrusted_self_signed_certificate(serve: ServeProcess) -> None:
    argv = ("turn", turn_url(serve.tls_port, "tls"), *CREDENTIALS, *FAST)
    assert code_of(probe_json(*argv)) == "tls-self-signed"
    status, out = probe(*argv)
    assert status == 1
    assert verdict_line(out).startswith(
        "verdict: The server's TLS certificate is self-signed, so it is not trusted"
    )


def test_closed_port_refuses_the_connection() -> None:
    port = free_port()
    for transport in ("tcp", "tls"):
        report = probe_json("turn", turn_url(port, transport), *CREDENTIALS, *FAST)
        assert code_of(report) == "connection-refused"
    status, out = probe("turn", turn_url(port, "tcp"), *CREDENTIALS, *FAST)
    assert verdict_line(out) == (
        f"verdict: The connection to {HOST}:{port} was refused: nothing listens on that TCP port."
    )
    assert code_of(probe_json("stun", f"stun:{HOST}:{port}?transport=tcp")) == "connection-refused"


def test_udp_timeout_where_nothing_answers() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((HOST, 0))
        port = silent.getsockname()[1]
        started = time.monotonic()
        report = probe_json("turn", turn_url(port), *CREDENTIALS, "--timeout", "1")
        assert time.monotonic() - started < 3
        assert code_of(report) == "no-answer"
        assert "over UDP in 1.0 s" in report["verdict"]["sentence"]
        status, out = probe("stun", f"stun:{HOST}:{port}", "--timeout", "1")
        assert status == 1 and "verdict: No answer from" in out
        assert silent.recv(2048)  # the requests did arrive: nothing answered them


def test_peer_denied(tmp_path: Path) -> None:
    # Without --allowed-peer-ip, loopback peers are denied: the second allocation's relayed
    # address on 127.0.0.1 may not be a peer of the first.
    with run_serve(tmp_path / "serve", allowed_peers=False) as server:
        argv = ("turn", turn_url(server.port), *CREDENTIALS, *FAST)
        report = probe_json(*argv)
        assert code_of(report) == "peer-denied"
        failed = report["results"][0]["steps"][-1]
        assert failed["name"] == "permission" and not failed["ok"]
        status, out = probe(*argv)
        assert re.match(
            r"verdict: The server refused to relay to 127\.0\.0\.1:\d+: 403", verdict_line(out)
        )


def test_full_server_and_user_quota(tmp_path: Path) -> None:
    with run_serve(tmp_path / "full", "--workers", "1", "--total-quota", "1") as server:
        report = probe_json("turn", turn_url(server.port), *CREDENTIALS, *FAST)
        assert code_of(report) == "server-full"
        assert report["results"][0]["steps"][-1]["name"] == "allocate (peer)"
        # The first allocation was released: the next check meets the same refusal.
        status, out = probe("turn", turn_url(server.port, "tcp"), *CREDENTIALS, *FAST)
        assert verdict_line(out).startswith(
            "verdict: The server is full: 508 Insufficient Capacity"
        )
    with run_serve(tmp_path / "quota", "--workers", "1", "--user-quota", "1") as server:
        report = probe_json("turn", turn_url(server.port), *CREDENTIALS, *FAST)
        assert code_of(report) == "quota-reached"
        assert "486 Allocation Quota Reached" in report["verdict"]["sentence"]


# --- through squid ----------------------------------------------------------------------------


def test_tcp_and_tls_through_the_proxy(serve: ServeProcess, squid: Squid) -> None:
    urls = [turn_url(serve.port, "tcp"), turn_url(serve.tls_port, "tls")]
    argv = ("turn", *urls, *CREDENTIALS, *FAST, "--proxy", squid.url())
    report = probe_json(*argv, "--ca", str(serve.cert_path))
    assert code_of(report) == "ok", report["verdict"]
    for result in report["results"]:
        assert result["proxy"] == f"http://carol@{HOST}:{squid.port}"
        assert result["steps"][0]["name"] == "proxy"
    assert f"CONNECT {HOST}:{serve.port}" in squid.access_log()


def test_proxy_refuses_the_port(serve: ServeProcess, squid: Squid) -> None:
    port = free_port()  # not among the ports squid allows
    argv = ("turn", turn_url(port, "tcp"), *CREDENTIALS, *FAST, "--proxy", squid.url())
    assert code_of(probe_json(*argv)) == "proxy-refused"
    status, out = probe(*argv)
    assert verdict_line(out).startswith(
        f"verdict: The HTTP proxy http://carol@{HOST}:{squid.port} refused to connect to "
        f"{HOST}:{port} (HTTP/1.1 403 Forbidden)"
    )


def test_wrong_proxy_password(serve: ServeProcess, squid: Squid) -> None:
    proxy = squid.url(password="wrong")
    argv = ("turn", turn_url(serve.port, "tcp"), *CREDENTIALS, *FAST, "--proxy", proxy)
    report = probe_json(*argv)
    assert code_of(report) == "proxy-auth-failed"
    assert "407" in report["verdict"]["sentence"]
    status, out = probe(*argv)
    assert "verdict: The HTTP proxy" in out and "refused the proxy credentials" in out


# --- a terminal -------------------------------------------------------------------------------


def test_progress_display_on_a_terminal(serve: ServeProcess) -> None:
    command = [sys.executable, "-m", "tsunagu", "probe", "turn", turn_url(serve.port)]
    command += [*CREDENTIALS, "--seconds", "1"]
    primary, secondary = pty.openpty()
    env = dict(os.environ, LANG="C.UTF-8", PYTHONIOENCODING="utf-8")
    process = subprocess.Popen(command, stdout=secondary, stderr=secondary, env=env)
    os.close(secondary)
    output = b""
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            if not select.select([primary], [], [], 0.5)[0]:
                if process.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(primary, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(primary)
        assert process.wait(10) == 0, output
    text = output.decode()
    assert "\r\x1b[K" in text and "✓ allocate" in text
    assert "sent, " in text  # live counts during the relay test
    assert "verdict: TURN over UDP works" in text


# --- coturn -----------------------------------------------------------------------------------


COTURN_NAME = "turn.example.org"


@pytest.fixture(scope="module")
def coturn_tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for turn.example.org only (not for 127.0.0.1)."""
    directory = tmp_path_factory.mktemp("coturn-cert")
    san = x509.DNSName(COTURN_NAME)
    return make_certificate(directory, COTURN_NAME, san, datetime.timedelta(days=1))


def pin_of(cert_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return "sha256/" + certificate_fingerprints(cert)[1]


@pytest.fixture(scope="module")
def coturn(
    tmp_path_factory: pytest.TempPathFactory, coturn_tls: tuple[Path, Path]
) -> Iterator[Coturn]:
    assert shutil.which("turnserver"), "coturn is part of the test setup (scripts/setup --test)"
    with run_coturn(tmp_path_factory.mktemp("coturn"), tls=coturn_tls) as server:
        yield server


def test_coturn_relays_over_udp_tcp_and_tls(coturn: Coturn, coturn_tls: tuple[Path, Path]) -> None:
    urls = [
        turn_url(coturn.port, "udp"),
        turn_url(coturn.port, "tcp"),
        turn_url(coturn.tls_port, "tls"),
    ]
    report = probe_json("turn", *urls, *CREDENTIALS, *FAST, "--pin", pin_of(coturn_tls[0]))
    assert code_of(report) == "ok", report
    assert all(r["figures"]["relay"]["received"] >= 95 for r in report["results"])


def test_coturn_certificate_for_another_name(coturn: Coturn, coturn_tls: tuple[Path, Path]) -> None:
    # Trusted as a CA, but issued for turn.example.org and reached as 127.0.0.1.
    tls = turn_url(coturn.tls_port, "tls")
    argv = ("turn", tls, *CREDENTIALS, *FAST, "--ca", str(coturn_tls[0]))
    assert code_of(probe_json(*argv)) == "tls-name-mismatch"
    status, out = probe(*argv)
    assert verdict_line(out).startswith(
        f"verdict: The server's TLS certificate is not valid for {HOST}"
    )


def test_coturn_expired_certificate(tmp_path: Path) -> None:
    san = x509.IPAddress(ipaddress.ip_address(HOST))
    cert, key = make_certificate(tmp_path, HOST, san, -datetime.timedelta(days=1))
    with run_coturn(tmp_path / "coturn", tls=(cert, key)) as server:
        url = turn_url(server.tls_port, "tls")
        argv = ("turn", url, *CREDENTIALS, *FAST, "--ca", str(cert))
        assert code_of(probe_json(*argv)) == "tls-expired"
        status, out = probe(*argv)
        assert verdict_line(out).startswith("verdict: The server's TLS certificate has expired")


def test_coturn_failures(coturn: Coturn) -> None:
    udp = turn_url(coturn.port)
    assert code_of(probe_json("turn", udp, "-u", f"{USER}:nope", *FAST)) == "wrong-password"
    tls = turn_url(coturn.tls_port, "tls")
    assert code_of(probe_json("turn", tls, *CREDENTIALS, *FAST)) == "tls-self-signed"
    report = probe_json("stun", f"stun:{HOST}:{coturn.port}")
    assert code_of(report) == "ok"


def test_coturn_expired_rest_credential(tmp_path: Path) -> None:
    extra = ("--use-auth-secret", "--static-auth-secret", SECRET)
    with run_coturn(tmp_path, *extra) as server:
        fresh = probe_json("turn", turn_url(server.port), "--secret", SECRET, *FAST)
        assert code_of(fresh) == "ok", fresh
        username, password = mint_credentials(SECRET, "frank", -600, time.time())
        report = probe_json("turn", turn_url(server.port), "-u", f"{username}:{password}", *FAST)
        assert code_of(report) == "credential-expired"


def test_coturn_peer_denied(tmp_path: Path) -> None:
    with run_coturn(tmp_path, loopback_peers=False) as server:
        report = probe_json("turn", turn_url(server.port), *CREDENTIALS, *FAST)
        assert code_of(report) == "peer-denied"


def test_coturn_full(tmp_path: Path) -> None:
    with run_coturn(tmp_path / "total", "--total-quota", "1") as server:
        report = probe_json("turn", turn_url(server.port), *CREDENTIALS, *FAST)
        # coturn answers its total quota with 486, not 508.
        assert code_of(report) == "quota-reached", report["verdict"]
    with run_coturn(tmp_path / "user", "--user-quota", "1") as server:
        report = probe_json("turn", turn_url(server.port), *CREDENTIALS, *FAST)
        assert code_of(report) == "quota-reached", report["verdict"]


def test_coturn_through_the_proxy(coturn: Coturn) -> None:
    with run_squid([coturn.port]) as proxy:
        url = turn_url(coturn.port, "tcp")
        report = probe_json("turn", url, *CREDENTIALS, *FAST, "--proxy", proxy.url())
        assert code_of(report) == "ok", report["verdict"]
        report = probe_json("turn", url, *CREDENTIALS, *FAST, "--proxy", proxy.url(password="bad"))
        assert code_of(report) == "proxy-auth-failed"


def test_a_port_that_is_not_stun() -> None:
    # A web server's answer to the Binding request, then it closes the connection.
    with socket.create_server((HOST, 0)) as listener:
        port = listener.getsockname()[1]

        def answer() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.recv(2048)
                connection.sendall(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")

        thread = threading.Thread(target=answer)
        thread.start()
        report = probe_json("stun", f"stun:{HOST}:{port}?transport=tcp")
        thread.join(5)
    assert code_of(report) == "not-stun", report["verdict"]
    assert "it speaks HTTP on this port (HTTP/1.1 400 Bad Request)" in report["verdict"]["sentence"]


def test_ipv6_server(tmp_path: Path) -> None:
    # A server on ::1 alone has IPv6 relay addresses only: the probe asks for one.
    with run_serve(tmp_path / "serve6", hosts=(HOST6,)) as server:
        urls = [f"turn:[{HOST6}]:{server.port}", f"turn:[{HOST6}]:{server.port}?transport=tcp"]
        report = probe_json("turn", *urls, *CREDENTIALS, *FAST)
        assert code_of(report) == "ok", report["verdict"]
        assert report["results"][0]["figures"]["relayed"][0].startswith(f"[{HOST6}]:")
