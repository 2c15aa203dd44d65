"""Against a real ``tsunagu serve``: every failed call leaves a log line naming its cause.

Real clients fail the ways users' clients do: aioice with a wrong password fifty times, a
relay to a denied peer, Python's ssl with default verification against the self-signed
certificate, plain TCP STUN on a TLS-only port (``--no-tcp``: every TCP port takes TLS and
plain STUN alike otherwise), HTTP on it, coturn's uclient with an unknown user. The server
writes one line per cause and client and 10 s interval (and per worker process), with the
count; stopping it writes what is pending. The same with ``--log-format json``: every line
of the log is a JSON object, the failure lines with their fields, the audit records with
theirs.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
from collections.abc import Iterator
from typing import Any

import aioice.stun
import pytest

from support.audit import log_lines
from support.interop import HOST, USER, ServeProcess, run_serve, turn_allocate

pytestmark = pytest.mark.interop

ATTEMPTS = 50
DENIED_PEER = ("127.0.0.2", 9)  # loopback: denied by default (only 127.0.0.1 is allowed here)
BINDING = b"\x00\x01\x00\x00\x21\x12\xa4\x42"


async def wrong_passwords(server: ServeProcess) -> None:
    for _ in range(ATTEMPTS):
        with pytest.raises(aioice.stun.TransactionFailed):
            await turn_allocate(server, password="not-the-password")


async def denied_peer(server: ServeProcess) -> None:
    client = await turn_allocate(server)
    with pytest.raises(aioice.stun.TransactionFailed):
        await client.inner.send_data(b"x", DENIED_PEER)
    await client.close()


def untrusting_tls_client(server: ServeProcess) -> None:
    with socket.create_connection((HOST, server.tls_port), timeout=5) as sock:
        with pytest.raises(ssl.SSLCertVerificationError):
            ssl.create_default_context().wrap_socket(sock, server_hostname="localhost")


def closed_after_sending(server: ServeProcess, data: bytes) -> None:
    with socket.create_connection((HOST, server.tls_port), timeout=5) as sock:
        sock.sendall(data)
        try:
            assert sock.recv(100) == b""  # closed at once
        except ConnectionResetError:
            pass


def plain_stun_on_the_tls_port(server: ServeProcess) -> None:
    closed_after_sending(server, BINDING + os.urandom(12))


def http_on_the_tls_port(server: ServeProcess) -> None:
    closed_after_sending(server, b"GET / HTTP/1.1\r\nHost: turn\r\n\r\n")


def uclient_wrong_password(server: ServeProcess) -> None:
    command = ["turnutils_uclient", "-u", "bob", "-w", "guess", "-y", "-n", "1", "-p"]
    command += [str(server.port), HOST]
    subprocess.run(command, capture_output=True, timeout=30, check=False)


@pytest.fixture(scope="module", params=["text", "json"])
def failed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, ServeProcess, list[dict[str, Any]]]]:
    """A server that saw every kind of failure, stopped; its log lines, parsed."""
    fmt = request.param
    tmp = tmp_path_factory.mktemp(f"failures-{fmt}")
    with run_serve(tmp, "--log-format", fmt, "--no-tcp") as server:
        asyncio.run(wrong_passwords(server))
        asyncio.run(denied_peer(server))
        untrusting_tls_client(server)
        plain_stun_on_the_tls_port(server)
        http_on_the_tls_port(server)
        uclient_wrong_password(server)
        server.stop()  # every worker writes what it has not written yet
        text = server.log_text()
        yield fmt, server, log_lines(text)


def failure_lines(lines: list[dict[str, Any]], words: str) -> list[dict[str, Any]]:
    return [line for line in lines if line["logger"] == "tsunagu" and words in line["message"]]


def test_fifty_wrong_passwords_are_counted_not_repeated(
    failed: tuple[str, ServeProcess, list[dict[str, Any]]],
) -> None:
    fmt, server, lines = failed
    found = failure_lines(lines, f"wrong password for user '{USER}' in realm 'tsunagu' from {HOST}")
    # One line per worker process that served some of them (and at most one more each, if
    # the attempts straddled the end of an interval): never one per attempt.
    assert 1 <= len(found) <= 2 * server.workers, found
    counts = [int(line["message"].split("; ")[-1].split()[0]) for line in found]
    assert sum(counts) == ATTEMPTS, found
    assert all(line["level"] == "INFO" for line in found)
    if fmt == "json":
        assert sum(line["count"] for line in found) == ATTEMPTS
        assert {(line["cause"], line["client"], line["user"]) for line in found} == {
            ("wrong password", HOST, USER)
        }


def test_a_denied_peer_is_named_with_its_rule(
    failed: tuple[str, ServeProcess, list[dict[str, Any]]],
) -> None:
    fmt, _, lines = failed
    rule = "loopback range 127.0.0.0/8, denied by default"
    [line] = failure_lines(lines, f"peer denied for user '{USER}' from {HOST}")
    assert f"127.0.0.2:9 ({rule})" in line["message"], line
    # The allocation that never reached a peer says the likely cause.
    [ended] = failure_lines(lines, "without relaying to any peer")
    assert ended["level"] == "WARNING"
    assert f"peer 127.0.0.2 not allowed: {rule}" in ended["message"]
    assert "likely cause: the peer addresses the client named are denied" in ended["message"]
    if fmt == "json":
        assert (line["cause"], line["peer"], line["rule"]) == ("peer denied", "127.0.0.2:9", rule)


def test_a_client_that_does_not_trust_the_certificate(
    failed: tuple[str, ServeProcess, list[dict[str, Any]]],
) -> None:
    fmt, server, lines = failed
    [line] = failure_lines(lines, f"TLS handshake failed from {HOST}")
    assert "the client does not trust this server's certificate" in line["message"]
    assert f"(port {server.tls_port})" in line["message"]
    if fmt == "json":
        assert line["tls_error"] == "TLSV1_ALERT_UNKNOWN_CA" and line["port"] == server.tls_port


def test_plain_tcp_on_a_tls_only_port(
    failed: tuple[str, ServeProcess, list[dict[str, Any]]],
) -> None:
    fmt, server, lines = failed
    [line] = failure_lines(
        lines,
        f"not TLS on a TLS-only port from {HOST}: plain STUN, and this port takes TLS only"
        f" (--no-tcp) (port {server.tls_port})",
    )
    if fmt == "json":
        assert (line["cause"], line["client"], line["port"]) == ("not TLS", HOST, server.tls_port)


def test_http_on_a_tls_port_is_summarised(
    failed: tuple[str, ServeProcess, list[dict[str, Any]]],
) -> None:
    fmt, _, lines = failed
    [line] = failure_lines(lines, "spoke neither TLS nor STUN (first byte 0x47 'G' x1)")
    assert line["message"].endswith(f"most from {HOST} (1)")
    if fmt == "json":
        assert line["cause"] == "neither TLS nor STUN" and line["top"] == {HOST: 1}


def test_uclient_with_a_wrong_user(failed: tuple[str, ServeProcess, list[dict[str, Any]]]) -> None:
    fmt, _, lines = failed
    found = failure_lines(lines, f"unknown user 'bob' in realm 'tsunagu' from {HOST}")
    assert found, [line["message"] for line in lines]


def test_every_line_is_in_the_chosen_format(
    failed: tuple[str, ServeProcess, list[dict[str, Any]]],
) -> None:
    fmt, server, lines = failed
    text = server.log_text()
    assert len(lines) == len(text.splitlines()), text[:3000]
    if fmt == "json":
        assert all(line.startswith("{") for line in text.splitlines()), text[:3000]
        for line in lines:
            assert {"time", "level", "logger", "message"} <= line.keys()
    # Every worker process wrote to the same file in the same format.
    assert len([line for line in lines if line["message"] == "stopped"]) == server.workers
    audits = server.audit_records()
    assert audits and all(record["event"] == "allocation-ended" for record in audits)
    if fmt == "json":
        failures = [line for line in lines if line.get("event") == "refused"]
        assert {line["cause"] for line in failures} >= {
            "wrong password",
            "peer denied",
            "TLS handshake failed",
            "not TLS",
            "neither TLS nor STUN",
            "unknown user",
        }
