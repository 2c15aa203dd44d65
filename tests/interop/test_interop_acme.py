"""``tsunagu serve --acme-domain`` against Debian's pebble: the certificate TURN over TLS and
the web app serve is obtained at start, renewed before it expires and put in service in
every worker while a TLS allocation keeps relaying; a CA that does not answer at start
does not stop the server.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509

from support.interop import run_serve, turn_allocate, udp_echo_server
from support.pebble import Pebble, pebble_available, pebble_server

pytestmark = [
    pytest.mark.interop,
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        not pebble_available(), reason="pebble not installed (scripts/setup --test)"
    ),
]

log = logging.getLogger(__name__)

NAME = "turn.tsunagu.test"


def trusting(pebble: Pebble) -> ssl.SSLContext:
    """A client that trusts only what this pebble issues, and checks the name."""
    return ssl.create_default_context(cadata=pebble.root_pem().decode())


def served(port: int, context: ssl.SSLContext) -> x509.Certificate:
    """The certificate a new TLS client gets on ``port`` (verified by ``context``)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname=NAME) as tls,
    ):
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")


def acme_options(pebble: Pebble) -> list[str]:
    return [
        "--acme-domain",
        NAME,
        "--acme-email",
        "ops@example.org",
        "--acme-directory",
        pebble.directory_url,
        "--acme-ca-file",
        str(pebble.ca_file),
        "--acme-http-port",
        str(pebble.http_port),
    ]


async def test_a_certificate_obtained_at_start_is_renewed_in_every_worker_without_a_drop(
    tmp_path: Path,
) -> None:
    # Pebble's certificates last 20 s here: renewal comes at two thirds of that.
    with (
        pebble_server(validity=20) as pebble,
        run_serve(tmp_path / "serve", *acme_options(pebble), web=True) as server,
    ):
        context = trusting(pebble)
        first = served(server.tls_port, context)
        assert served(server.web_port, context).serial_number == first.serial_number
        names = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == [NAME]
        assert "acme: certificate for turn.tsunagu.test obtained" in server.log_text()

        async with udp_echo_server() as (_, peer):
            # aioice names the server by its address: the chain is checked, not the name.
            by_address = trusting(pebble)
            by_address.check_hostname = False
            tls_client = await turn_allocate(server, "tcp", ssl=by_address)
            assert await tls_client.echo(b"before", peer) == b"before"
            started = time.monotonic()
            renewed = "renewed certificate in service in"
            assert await server.wait_for_log_async(renewed, timeout=40), server.log_text()[-3000:]
            log.info("renewed %.1f s after the first echo", time.monotonic() - started)
            line = next(text for text in server.log_text().splitlines() if renewed in text)
            assert f"in {server.workers} of {server.workers} workers" in line
            # Every worker serves the renewed certificate to new clients.
            serials = {served(server.tls_port, context).serial_number for _ in range(8)}
            assert len(serials) == 1 and first.serial_number not in serials
            # The allocation made over the first certificate's connection still relays.
            assert await tls_client.echo(b"after", peer) == b"after"
            await tls_client.close()


async def test_a_ca_that_does_not_answer_at_start_leaves_a_working_server(
    tmp_path: Path,
) -> None:
    with pebble_server() as pebble:
        options = acme_options(pebble)
    # Pebble is gone: the order fails, the generated certificate serves meanwhile.
    with run_serve(tmp_path / "serve", *options) as server:
        assert "serving a self-signed certificate meanwhile" in server.log_text()
        context = ssl.create_default_context(cafile=str(server.cert_path))
        context.check_hostname = False
        assert served(server.tls_port, context).serial_number
        client = await turn_allocate(server, "tcp", ssl=context)
        await client.close()
