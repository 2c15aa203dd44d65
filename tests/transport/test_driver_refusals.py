"""The driver writes what failed as one line per cause and client and interval, in words and
as structured fields (transport/failures.py), whatever the number of failed requests."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any, cast

import pytest

from support.turn_harness import NOW, Client, make_server, udp
from tsunagu.auth.rest import mint_credentials
from tsunagu.stun import Method, XorPeerAddress
from tsunagu.transport.driver import TurnDriver
from tsunagu.transport.failures import NOT_STUN, TLS_FAILED, describe
from tsunagu.turn import TurnSettings
from tsunagu.turn.refusals import RefusalSummary, RefusalTally


def driver_for(server: Any, interval: float = 10.0) -> TurnDriver:
    engine = SimpleNamespace(stream_framer=None, fold_counters=lambda allocation: None)
    loop = asyncio.get_running_loop()
    return TurnDriver(server, loop, cast(Any, engine), worker=2, report_interval=interval)


def lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "tsunagu"]


def fields(record: logging.LogRecord) -> dict[str, Any]:
    return cast(dict[str, Any], record.tsunagu_fields)  # type: ignore[attr-defined]


async def test_one_line_per_cause_and_client(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tsunagu")
    server, _ = make_server(TurnSettings(user_quota=1, address_quota=0))
    driver = driver_for(server)
    Client(server, udp(("198.51.100.1", 1))).allocate()  # alice's one allocation
    for n in range(2, 50):
        Client(server, udp(("198.51.100.1", n))).allocate()
    client = Client(server, udp(("198.51.100.2", 1)), "bob", "bob-pw")
    client.allocate()
    for _ in range(3):
        client.request(Method.CREATE_PERMISSION, [XorPeerAddress("10.1.2.3", 1)])
    driver.report_refusals()
    quota, peer = lines(caplog)
    assert quota.levelno == logging.WARNING
    assert quota.getMessage() == (
        "user quota reached for user 'alice' from 198.51.100.1: user id 'alice' already has"
        " 1 allocation on this worker process, the most --user-quota allows; 48 requests in"
        " the last 10 s (worker 2)"
    )
    assert fields(quota) == {
        "event": "refused",
        "cause": "user quota",
        "client": "198.51.100.1",
        "count": 48,
        "interval": 10.0,
        "worker": 2,
        "user": "alice",
        "user_id": "alice",
        "quota": 1,
    }
    assert peer.levelno == logging.INFO
    assert peer.getMessage() == (
        "peer denied for user 'bob' from 198.51.100.2: 10.1.2.3:1 (private range 10.0.0.0/8,"
        " denied by default); --allowed-peer-ip opens a range; 3 requests in the last 10 s"
        " (worker 2)"
    )
    assert fields(peer)["peer"] == "10.1.2.3:1"
    assert fields(peer)["rule"] == "private range 10.0.0.0/8, denied by default"
    caplog.clear()
    driver.report_refusals()  # nothing new: nothing written
    assert lines(caplog) == []


async def test_fifty_wrong_passwords_are_one_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tsunagu")
    server, _ = make_server()
    driver = driver_for(server)
    for port in range(1, 51):
        Client(server, udp(("198.51.100.9", port)), "alice", "guess").allocate()
    driver.report_refusals()
    [line] = lines(caplog)
    assert line.getMessage() == (
        "wrong password for user 'alice' in realm 'tsunagu' from 198.51.100.9: the message"
        " integrity check failed; 50 requests in the last 10 s (worker 2)"
    )
    assert fields(line)["cause"] == "wrong password" and fields(line)["count"] == 50


async def test_an_expired_credential_says_how_long_ago(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tsunagu")
    server, _ = make_server(secrets=["s3cret"])
    driver = driver_for(server)
    username, password = mint_credentials("s3cret", "erin", 60, NOW - 3725)
    Client(server, udp(("198.51.100.3", 1)), username, password).allocate()
    driver.report_refusals()
    [line] = lines(caplog)
    assert line.getMessage().startswith(
        f"expired TURN REST credential {username!r} from 198.51.100.3: expired 1 h 1 min"
        " before the last attempt (the client or its web backend must fetch a new one)"
    )
    assert fields(line)["expired_ago"] == 3665


async def test_a_stale_nonce_is_news_only_when_it_repeats(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="tsunagu")
    server, _ = make_server(TurnSettings(nonce_lifetime=60))
    driver = driver_for(server)
    client = Client(server, udp(("198.51.100.4", 4000)))
    client.allocate()
    client.request(Method.REFRESH, [], NOW + 100)  # one 438, then the fresh nonce works
    stuck = Client(server, udp(("198.51.100.5", 4000)))
    stuck.nonce = client.nonce  # a nonce made for another address, sent again and again
    for _ in range(3):
        stuck.exchange(stuck.build(Method.ALLOCATE), NOW + 100)
    driver.report_refusals()
    once, again = lines(caplog)
    assert once.levelno == logging.DEBUG and "routine" in once.getMessage()
    assert again.levelno == logging.INFO
    assert again.getMessage().startswith(
        "the client keeps failing with a stale nonce for user 'alice' from 198.51.100.5:4000:"
        " a nonce this server did not give this address"
    )


async def test_transport_failures_are_written_too(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tsunagu")
    server, _ = make_server()
    driver = driver_for(server)
    reason = "the client does not trust this server's certificate (its answer: unknown CA)"
    for _ in range(7):
        driver.failures.add(
            TLS_FAILED, "192.0.2.7", NOW, facts=(("port", 5349), ("reason", reason))
        )
    what = (("what", "an HTTP request"), ("transport", "tcp"), ("port", 3478))
    driver.failures.add(NOT_STUN, "192.0.2.8", NOW, facts=what)
    driver.report_refusals()
    tls, http = lines(caplog)
    assert tls.getMessage() == (
        f"TLS handshake failed from 192.0.2.7: {reason} (port 5349); 7 connections in the last"
        " 10 s (worker 2)"
    )
    assert http.getMessage() == (
        "connection closed, not STUN from 192.0.2.8: an HTTP request (tcp port 3478);"
        " 1 connection in the last 10 s (worker 2)"
    )


async def test_reports_run_on_the_loop_until_shutdown(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tsunagu")
    server, _ = make_server(TurnSettings(user_quota=1, address_quota=0))
    driver = driver_for(server, interval=0.05)
    driver.start_reports()
    for n in range(1, 4):
        Client(server, udp(("198.51.100.1", n))).allocate()
    await asyncio.sleep(0.2)
    [line] = [r.getMessage() for r in lines(caplog)]
    assert line.startswith("user quota reached") and "; 2 requests in the last 0.05 s" in line
    while server.next_event() is not None:  # no listener here to attach them to
        pass
    driver.shutdown()
    assert driver._report is None


def test_beyond_the_table_one_line_per_cause_names_the_busiest() -> None:
    tally = RefusalTally(limit=2)
    for n in range(10):
        tally.add("wrong password", f"203.0.113.{n}", NOW, user="alice")
    tally.add("wrong password", "203.0.113.5", NOW, user="alice")
    *_, beyond = tally.take()
    level, text, structured = describe(beyond, worker=0, interval=10)
    assert level == logging.INFO
    assert text == (
        "wrong password: 9 requests more from 8 other clients in the last 10 s (worker 0)"
        " (beyond the 100 clients logged one by one); most often '203.0.113.5' (2)"
    )
    assert structured["client"] is None and structured["clients"] == 8


@pytest.mark.parametrize(
    ("cause", "facts", "words"),
    [
        ("unknown user", (("realm", "r"),), "unknown user 'u' in realm 'r' from 192.0.2.1;"),
        ("wrong realm", (("realm", "x"),), "the client sent 'x', not this server's --realm"),
        ("address quota", (("address", "192.0.2.1"), ("quota", 5)), "address 192.0.2.1"),
        ("total quota", (("quota", 9),), "this server already has 9 allocations"),
        (
            "no relay port",
            (
                ("relay_ip", "192.0.2.9"),
                ("range", "49152-65535"),
                ("workers", 4),
                ("in_use", 4000),
                ("held_elsewhere", 32),
            ),
            "no free relay port on 192.0.2.9: this worker holds 4000 ports of 49152-65535"
            " (its share: 1/4 of them), and 32 more it tried are held by other programs",
        ),
        ("draining", (), "508 draining for user 'u' from 192.0.2.1: the server is stopping"),
        ("credential mismatch", (("allocation_user", "v"),), "allocation's ('v'): 441"),
    ],
)
def test_every_cause_has_words(cause: str, facts: Any, words: str) -> None:
    summary = RefusalSummary(cause, "192.0.2.1", 1, NOW, NOW, (("u", 1),), ((facts, 1),))
    if not facts:
        summary = RefusalSummary(cause, "192.0.2.1", 1, NOW, NOW, (("u", 1),))
    level, text, _ = describe(summary, worker=0, interval=10)
    assert words in text, text
