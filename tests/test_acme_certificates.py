"""Certificates from an ACME CA: ordered from a real pebble, which validates HTTP-01 by
connecting to the answerer; renewal, and the causes of failures as an operator reads them."""

from __future__ import annotations

import asyncio
import datetime
import logging
import socket
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from acme import messages
from cryptography import x509

from support.pebble import Pebble, pebble_available, pebble_server
from tsunagu.acme_certificates import AcmeCertificates, AcmeError, describe
from tsunagu.config import parse_config

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        not pebble_available(), reason="pebble not installed (scripts/setup --test)"
    ),
]

NAME = "turn.tsunagu.test"
WAIT = 30.0


@pytest.fixture(scope="module")
def pebble() -> Iterator[Pebble]:
    with pebble_server() as server:
        yield server


def certificates(
    pebble: Pebble, state: Path, domains: tuple[str, ...] = (NAME,), **overrides: object
) -> AcmeCertificates:
    options: dict[str, object] = {
        "email": "ops@example.org",
        "directory": pebble.directory_url,
        "ca_file": str(pebble.ca_file),
        "http_port": pebble.http_port,
        "http_host": "127.0.0.1",
        "state_dir": state,
        "timeout": 10.0,
        "order_timeout": 30.0,
    }
    options.update(overrides)
    return AcmeCertificates(domains, **options)  # type: ignore[arg-type]


def leaf(path: str) -> x509.Certificate:
    return x509.load_pem_x509_certificates(Path(path).read_bytes())[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def handshake(cert: str, key: str, root_pem: bytes, name: str) -> x509.Certificate:
    """Serve ``cert`` and ``key`` over TLS and connect as a client trusting ``root_pem`` only,
    checking ``name``: the chain as a TURN client or a browser gets it."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    client_context = ssl.create_default_context(cadata=root_pem.decode())
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=client_context, server_hostname=name),
            WAIT,
        )
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), WAIT)
    return x509.load_der_x509_certificate(der)


async def test_obtain_a_certificate_that_verifies_against_the_cas_root(
    pebble: Pebble, tmp_path: Path
) -> None:
    acme = certificates(pebble, tmp_path, (NAME, "web.tsunagu.test"))
    assert not acme.current()
    cert, key = await asyncio.wait_for(acme.obtain(), WAIT)
    assert (cert, key) == acme.paths()
    assert Path(cert).parent == tmp_path / "acme"
    for private in [key, *(tmp_path / "acme").glob("account-*.json")]:
        assert stat.S_IMODE(Path(private).stat().st_mode) == 0o600, private
    served = await handshake(cert, key, pebble.root_pem(), "web.tsunagu.test")
    assert served == leaf(cert)
    san = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {NAME, "web.tsunagu.test"}
    # A TLS client trusting another root refuses it: the chain really is the CA's.
    with pytest.raises(ssl.SSLCertVerificationError):
        await handshake(cert, key, pebble.ca_file.read_bytes(), NAME)

    assert acme.current()
    assert certificates(pebble, tmp_path, (NAME,)).current()
    assert not certificates(pebble, tmp_path, (NAME, "other.tsunagu.test")).current()
    # Pebble issues for five years; renewing 10 years before expiry means now.
    long = datetime.timedelta(days=3650)
    assert not certificates(pebble, tmp_path, renew_before=long).current()


async def test_forced_renewal_makes_a_new_certificate_and_calls_back(
    pebble: Pebble, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tsunagu.acme")
    first = certificates(pebble, tmp_path)
    cert, _ = await asyncio.wait_for(first.obtain(), WAIT)
    old = leaf(cert)
    [account] = (tmp_path / "acme").glob("account-*.json")
    account_text = account.read_text()

    renewing = certificates(pebble, tmp_path, renew_before=datetime.timedelta(days=3650))
    calls: list[tuple[str, str]] = []
    renewed = asyncio.Event()

    async def on_renewed(cert: str, key: str) -> None:
        calls.append((cert, key))
        renewed.set()

    task = asyncio.create_task(renewing.run(on_renewed))
    try:
        await asyncio.wait_for(renewed.wait(), WAIT)
        # The new certificate is no more current than the old one was under this
        # renew_before: it waits instead of ordering again and again.
        await asyncio.sleep(1.0)
        assert not task.done()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, WAIT)
    assert calls == [renewing.paths()]
    new = leaf(cert)
    assert new.serial_number != old.serial_number
    assert new.not_valid_after_utc >= old.not_valid_after_utc
    # Same account: registered once, its key and URL kept.
    assert account.read_text() == account_text
    assert sum("registered account" in r.getMessage() for r in caplog.records) == 1
    assert any("two thirds" in r.getMessage() for r in caplog.records)


async def test_run_sleeps_until_renewal_is_due_then_renews(tmp_path: Path) -> None:
    # Certificates of 20 s renewed 15 s before expiry: current for about 5 s.
    with pebble_server(validity=20) as short:
        acme = certificates(short, tmp_path, renew_before=datetime.timedelta(seconds=15))
        cert, _ = await asyncio.wait_for(acme.obtain(), WAIT)
        first = leaf(cert)
        assert acme.current()
        renewed: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

        async def on_renewed(cert: str, key: str) -> None:
            await renewed.put((cert, key))

        task = asyncio.create_task(acme.run(on_renewed))
        try:
            # Nothing until the certificate is due...
            await asyncio.sleep(1.0)
            assert renewed.empty() and acme.current()
            # ...then a new one, current again.
            assert await asyncio.wait_for(renewed.get(), WAIT) == acme.paths()
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, WAIT)
        second = leaf(cert)
        assert second.serial_number != first.serial_number
        assert second.not_valid_after_utc > first.not_valid_after_utc
        assert acme.current()
        await handshake(cert, acme.paths()[1], short.root_pem(), NAME)


async def test_a_failed_challenge_is_logged_with_the_cas_reason_and_retried(
    pebble: Pebble, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Answered on another port than the one the CA connects to: nothing answers there.
    acme = certificates(pebble, tmp_path, http_port=free_port(), retry_first=0.2, retry_max=0.4)
    with pytest.raises(AcmeError) as info:
        await asyncio.wait_for(acme.obtain(), WAIT)
    message = str(info.value)
    assert "\n" not in message
    assert "could not validate the challenge" in message, message
    assert f"{NAME}: connection" in message and "connection refused" in message, message
    assert not Path(acme.paths()[0]).exists()

    caplog.set_level(logging.INFO, logger="tsunagu.acme")
    called = asyncio.Event()

    async def on_renewed(cert: str, key: str) -> None:
        called.set()

    task = asyncio.create_task(acme.run(on_renewed))
    try:
        async with asyncio.timeout(WAIT):
            while sum(r.levelno == logging.ERROR for r in caplog.records) < 2:
                await asyncio.sleep(0.05)
        assert not task.done(), "run() must keep going after a failure"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, WAIT)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert all("connection refused" in e and "trying again in" in e for e in errors), errors
    assert not called.is_set()


async def test_an_unreachable_directory_is_a_clear_error(tmp_path: Path, pebble: Pebble) -> None:
    port = free_port()
    acme = certificates(pebble, tmp_path, directory=f"https://127.0.0.1:{port}/dir")
    with pytest.raises(AcmeError) as info:
        await asyncio.wait_for(acme.obtain(), WAIT)
    assert str(info.value) == (
        f"acme: {NAME}: cannot fetch the ACME directory https://127.0.0.1:{port}/dir:"
        " cannot reach the ACME server: connection refused"
    )
    # Nothing is kept for a CA that never answered.
    assert not (tmp_path / "acme").exists()

    # A server that accepts and never answers: the request's timeout ends it.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"https://127.0.0.1:{silent.getsockname()[1]}/dir"
        acme = certificates(pebble, tmp_path, directory=url, timeout=1.0)
        with pytest.raises(AcmeError, match="did not answer within 1 s"):
            await asyncio.wait_for(acme.obtain(), WAIT)

    # Pebble's certificate is its own: without the CA file, TLS says so and what to do.
    acme = certificates(pebble, tmp_path, ca_file=None)
    with pytest.raises(AcmeError) as info:
        await asyncio.wait_for(acme.obtain(), WAIT)
    assert "certificate verify failed" in str(info.value), info.value
    assert "acme_ca_file" in str(info.value)


async def test_a_challenge_port_already_taken_is_named(pebble: Pebble, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        acme = certificates(pebble, tmp_path, http_port=port)
        with pytest.raises(AcmeError, match=f"cannot listen on port {port} for the HTTP-01"):
            await asyncio.wait_for(acme.obtain(), WAIT)


def test_current_is_false_for_missing_or_broken_files(tmp_path: Path) -> None:
    acme = AcmeCertificates(
        [NAME],
        email=None,
        directory="https://ca.invalid/dir",
        ca_file=None,
        http_port=80,
        http_host=None,
        state_dir=tmp_path,
    )
    assert not acme.current()
    cert, key = acme.paths()
    Path(cert).parent.mkdir()
    Path(cert).write_text("not a certificate")
    Path(key).write_text("not a key")
    assert not acme.current()


def test_the_cas_problems_are_described_in_one_line() -> None:
    limited = messages.Error.with_code("rateLimited", detail="too many certificates (5) already")
    assert describe(limited, timeout=30, order_timeout=120) == (
        "rate limited by the CA: too many certificates (5) already"
    )
    refused = messages.Error.with_code("rejectedIdentifier", detail="forbidden name")
    assert describe(refused, timeout=30, order_timeout=120) == (
        "the CA refused: rejectedIdentifier: forbidden name"
    )


def test_from_config(tmp_path: Path) -> None:
    config = parse_config(
        {"acme_domains": "Turn.Example.org.,web.example.org", "acme_email": "ops@example.org"}
    )
    acme = AcmeCertificates.from_config(config, tmp_path)
    assert acme.domains == ("turn.example.org", "web.example.org")
    assert acme.directory == "https://acme-v02.api.letsencrypt.org/directory"
    assert (acme.http_port, acme.email, acme.ca_file) == (80, "ops@example.org", None)
    assert acme.paths()[0].startswith(str(tmp_path))
