"""How much a spoofed request can make the server send, and the per-IP limiter on it.

A UDP server that answers a forged source address is a reflector; what matters is the ratio
of bytes out to bytes in for requests anyone can send without credentials, and how many such
answers one victim address can receive.

The bound asserted here is for the smallest Allocate a client can legitimately send (RFC 8656
§7.1: REQUESTED-TRANSPORT is mandatory), i.e. 28 bytes. Its 401 carries ERROR-CODE (20 bytes),
REALM (4 + padded realm), NONCE (4 + 40: nonce cookie, feature bits and 24 characters of
base64) and PASSWORD-ALGORITHMS (12): 108 bytes with the default 7-byte realm, a ratio of
108 / 28 ≈ 3.86. A request with no attribute at all (20 bytes) draws the same 401, 5.4 times
its size; that is what :mod:`tsunagu.turn.unauthenticated` is for: full answers up to a
budget per source address (``unauth_rate`` per second, burst of twice that), and beyond it
an answer only once its request has been received often enough to have paid for it in
bytes, so that a flood gains nothing and a victim's retransmissions still get their 401.
"""

from __future__ import annotations

import pytest

from support.turn_harness import NOW, Client, error_code, make_server, stun, udp
from tsunagu.stun import (
    TRANSPORT_UDP,
    Attribute,
    ChannelNumber,
    Method,
    RequestedTransport,
    XorPeerAddress,
    parse_message,
)
from tsunagu.turn import TurnServer, TurnSettings

BOUND = 4.0


def ratio(server: TurnServer, request: bytes, client: tuple[str, int]) -> float:
    answer = server.receive(request, udp(client), NOW)
    assert isinstance(answer, bytes)
    return len(answer) / len(request)


def test_unauthenticated_allocate_amplification() -> None:
    server, _ = make_server()
    request = stun(Method.ALLOCATE, [RequestedTransport(TRANSPORT_UDP)])
    assert len(request) == 28
    answer = server.receive(request, udp(), NOW)
    assert isinstance(answer, bytes)
    assert error_code(parse_message(answer)) == 401
    realm = len(server.settings.realm)
    assert len(answer) == 20 + 20 + 4 + realm + (-realm % 4) + 44 + 12 == 108
    assert len(answer) / len(request) <= BOUND  # 3.857...


@pytest.mark.parametrize(
    ("method", "attributes"),
    [
        (Method.ALLOCATE, [RequestedTransport(TRANSPORT_UDP)]),
        (Method.CREATE_PERMISSION, [XorPeerAddress("8.8.8.8", 1)]),
        (Method.CHANNEL_BIND, [ChannelNumber(0x4000), XorPeerAddress("8.8.8.8", 1)]),
        (Method.BINDING, []),
        (0x0123, []),  # unknown method: 400
    ],
)
@pytest.mark.parametrize("client", [("198.51.100.7", 1), ("2001:db8::7", 1)])
def test_minimal_valid_requests_stay_under_the_bound(
    method: int, attributes: list[Attribute], client: tuple[str, int]
) -> None:
    server, _ = make_server(TurnSettings(rfc3489_compat=True))  # the largest Binding answer
    request = stun(method, attributes)
    assert ratio(server, request, client) <= BOUND


def test_attributeless_requests_are_bounded_by_the_limiter() -> None:
    server, _ = make_server()
    request = stun(Method.REFRESH)
    assert len(request) == 20
    assert ratio(server, request, ("198.51.100.7", 1)) == 108 / 20


def test_beyond_the_burst_an_answer_waits_until_its_request_paid_for_it() -> None:
    rate = 10.0
    server, _ = make_server(TurnSettings(unauth_rate=rate))
    victim = ("198.51.100.66", 1)
    burst = [stun(Method.ALLOCATE, [RequestedTransport(TRANSPORT_UDP)]) for _ in range(20)]
    assert all(server.receive(request, udp(victim), NOW) is not None for request in burst)
    # Over budget: a 28-byte request draws its 108-byte 401 on its 4th transmission.
    request = stun(Method.ALLOCATE, [RequestedTransport(TRANSPORT_UDP)])
    answers = [server.receive(request, udp(victim), NOW) for _ in range(4)]
    assert answers[:3] == [None, None, None]
    assert isinstance(answers[3], bytes) and len(answers[3]) == 108
    assert server.drops["unauthenticated rate limit"] == 3
    assert server.unauthenticated.answered_over_budget == 1
    # Another address has its own budget.
    assert server.receive(request, udp(("198.51.100.67", 1)), NOW) is not None
    # One full answer comes back every 1/rate seconds...
    assert server.receive(stun(Method.ALLOCATE), udp(victim), NOW + 0.5 / rate) is None
    assert server.receive(stun(Method.ALLOCATE), udp(victim), NOW + 1.5 / rate) is not None
    # ...and after long enough the full burst, never more.
    later = NOW + 3600
    answered = sum(
        server.receive(stun(Method.ALLOCATE), udp(victim), later) is not None
        for _ in range(int(3 * rate))
    )
    assert answered == 2 * rate


def test_a_flood_from_the_victims_address_does_not_deny_it_its_401() -> None:
    """The flood shares the victim's IP (a spoofer, or a neighbour behind the same NAT)."""
    server, _ = make_server(TurnSettings(unauth_rate=10.0))
    victim = udp(("198.51.100.66", 5000))
    request = stun(Method.ALLOCATE, [RequestedTransport(TRANSPORT_UDP)])
    answered_at = None
    for step in range(2000):  # 1,000 forged requests a second for two seconds
        now = NOW + step / 1000
        server.receive(stun(Method.REFRESH), udp(("198.51.100.66", 6000 + step % 50)), now)
        if step % 500 == 100:  # the victim starts after the flood, retransmits every 0.5 s
            answer = server.receive(request, victim, now)
            if answer is not None and answered_at is None:
                answered_at = step
    # Its fourth transmission (4 x 28 bytes >= 108) at the latest.
    assert answered_at is not None and answered_at <= 1600
    answer = server.receive(request, victim, NOW + 2)
    assert isinstance(answer, bytes) and error_code(parse_message(answer)) == 401


def test_over_budget_bytes_out_never_exceed_bytes_in() -> None:
    rate = 10.0
    server, _ = make_server(TurnSettings(unauth_rate=rate))
    bytes_in = bytes_out = 0
    for step in range(10_000):
        # Attribute-less requests (20 bytes, the worst ratio), each sent twice.
        request = stun(Method.REFRESH)
        for _ in range(2):
            bytes_in += len(request)
            answer = server.receive(request, udp(("198.51.100.66", 7)), NOW + step / 1000)
            bytes_out += len(answer or b"")
    budget = (2 * rate + rate * 10) * 108  # the burst and 10 s of refill, full size
    assert bytes_out <= bytes_in + budget
    assert bytes_out / bytes_in < 1.05


def test_rate_limit_covers_every_unauthenticated_error() -> None:
    server, _ = make_server(TurnSettings(unauth_rate=1.0))
    victim = udp(("198.51.100.66", 1))
    for request in (stun(0x0123), stun(Method.REFRESH)):  # a 400 and a 401
        assert server.receive(request, victim, NOW) is not None
    assert server.receive(stun(Method.ALLOCATE), victim, NOW) is None


def test_authenticated_answers_are_not_limited() -> None:
    server, _ = make_server(TurnSettings(unauth_rate=1.0))
    client = Client(server)
    assert error_code(client.allocate(transport=False)) == 400  # spends the one 401 token
    for _ in range(10):
        assert error_code(client.allocate(transport=False)) == 400


def test_limiter_tables_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import tsunagu.turn.unauthenticated as limiter_module

    monkeypatch.setattr(limiter_module, "_BUCKET_LIMIT", 8)
    monkeypatch.setattr(limiter_module, "_PENDING_LIMIT", 16)
    server, _ = make_server(TurnSettings(unauth_rate=1.0))
    request = stun(Method.ALLOCATE)
    for n in range(50):
        assert server.receive(request, udp((f"198.51.100.{n}", 1)), NOW) is not None
        assert len(server.unauthenticated._buckets) <= 8  # whatever the sources
    assert server.responses[401] == 50
    for n in range(100):  # one address over its budget, many pending requests
        server.receive(stun(Method.ALLOCATE), udp(("198.51.100.1", n)), NOW)
        assert len(server.unauthenticated._pending) <= 16


def test_streams_are_never_limited() -> None:
    server, _ = make_server(TurnSettings(unauth_rate=1.0))
    tcp = udp(("198.51.100.66", 1), protocol="tcp")
    assert all(server.receive(stun(Method.ALLOCATE), tcp, NOW) is not None for _ in range(50))
