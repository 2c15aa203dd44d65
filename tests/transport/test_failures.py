"""What the transport says about a failed TLS handshake or bytes that are not STUN
(transport/failures.py), from the errors real OpenSSL handshakes raise."""

from __future__ import annotations

import ssl
import warnings
from pathlib import Path

import pytest

from tsunagu.tls import ensure_certificate, server_ssl_context
from tsunagu.transport.failures import NOT_TLS, TLS_CLOSED, TLS_FAILED, not_stun, tls_failure


@pytest.fixture(scope="module")
def server_context(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    material = ensure_certificate(
        None, None, ["localhost"], tmp_path_factory.mktemp("tls") / "state"
    )
    return server_ssl_context(material)


def server_error(server_context: ssl.SSLContext, client: ssl.SSLContext | bytes) -> BaseException:
    """The exception the server side of a handshake raises against ``client`` (a client
    context, or raw bytes the client sends instead of TLS)."""
    s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_context.wrap_bio(s_in, s_out, server_side=True)
    if isinstance(client, bytes):
        s_in.write(client)
        with pytest.raises(ssl.SSLError) as raised:
            server.do_handshake()
        return raised.value
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    peer = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    for _ in range(10):
        try:
            peer.do_handshake()
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError:
            pass  # the client gave up: its alert is in c_out
        s_in.write(c_out.read())
        try:
            server.do_handshake()
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            return exc
        c_in.write(s_out.read())
    raise AssertionError("the handshake did not fail")


def test_a_client_that_does_not_trust_the_certificate(server_context: ssl.SSLContext) -> None:
    exc = server_error(server_context, ssl.create_default_context())
    cause, reason, code = tls_failure(exc)
    assert (cause, code) == (TLS_FAILED, "TLSV1_ALERT_UNKNOWN_CA")
    assert reason.startswith("the client does not trust this server's certificate")


def test_a_client_that_finds_another_name(server_context: ssl.SSLContext, tmp_path: Path) -> None:
    material = ensure_certificate(None, None, ["localhost"], tmp_path / "other")
    client = ssl.create_default_context(cafile=str(material.cert_path))
    client.check_hostname = False  # trusts the other certificate only: ours is unknown
    cause, reason, code = tls_failure(server_error(server_context, client))
    assert cause == TLS_FAILED and "certificate" in reason, (code, reason)


def test_an_old_protocol_version(server_context: ssl.SSLContext) -> None:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client.minimum_version = ssl.TLSVersion.TLSv1
        client.maximum_version = ssl.TLSVersion.TLSv1_1
    client.set_ciphers("ALL:@SECLEVEL=0")
    cause, reason, _ = tls_failure(server_error(server_context, client))
    assert cause == TLS_FAILED and reason.startswith("protocol version"), reason


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12), "plain TCP, not TLS"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "a plain HTTP request, not TLS"),
    ],
)
def test_bytes_that_are_not_tls(server_context: ssl.SSLContext, data: bytes, expected: str) -> None:
    cause, reason, _ = tls_failure(server_error(server_context, data))
    assert cause == NOT_TLS and reason.startswith(expected), reason


def test_a_timeout_and_a_reset() -> None:
    assert tls_failure(TimeoutError(), 10.0)[:2] == (
        TLS_FAILED,
        "the handshake did not finish within 10 s",
    )
    assert tls_failure(ConnectionResetError())[0] == TLS_CLOSED


@pytest.mark.parametrize(
    ("data", "protocol", "words"),
    [
        (b"\x16\x03\x01\x02\x00\x01", "tcp", "a TLS handshake on the plain TCP port"),
        (b"GET / HTTP/1.1\r\n", "tls", "an HTTP request"),
        (b"SSH-2.0-OpenSSH", "tcp", "an SSH client"),
        (b"\xff\xfe\x00\x01", "tcp", "bytes that are neither STUN nor ChannelData (starting"),
    ],
)
def test_not_stun_says_what_it_looks_like(data: bytes, protocol: str, words: str) -> None:
    assert not_stun(data, protocol).startswith(words)


def test_channel_data_without_an_allocation() -> None:
    assert not_stun(b"\x40\x00\x00\x04abcd", "tcp", channel_data=True) == (
        "ChannelData before any allocation"
    )
    assert not_stun(b"GET / HTTP/1.1", "tcp", channel_data=True) == "an HTTP request"
