"""The server's own listening addresses are no peers, and its relay sockets no clients."""

from __future__ import annotations

import dataclasses

from support.turn_harness import NOW, PEER, SERVER, Client, error_code, make_server, stun, udp
from tsunagu.stun import (
    ChannelNumber,
    Data,
    MessageClass,
    Method,
    RequestedTransport,
    XorPeerAddress,
    encode_message,
)
from tsunagu.turn import PeerPolicy, TurnSettings

PUBLIC = "8.8.4.4"  # the server's own (global) address in these tests


def settings(allowed: tuple[str, ...] = ()) -> TurnSettings:
    policy = dataclasses.replace(
        PeerPolicy.create(allowed),
        own=frozenset({(PUBLIC, 3478), (PUBLIC, 5349)}),
        own_relay=(frozenset({PUBLIC}), 49152, 65535),
    )
    return TurnSettings(policy=policy)


def allocated(allowed: tuple[str, ...] = ()) -> Client:
    server, _ = make_server(settings(allowed))
    client = Client(server)
    assert client.allocate().message_class is MessageClass.SUCCESS
    return client


def test_a_listening_address_is_refused_as_a_peer() -> None:
    client = allocated()
    for port in (3478, 5349):
        response = client.request(Method.CREATE_PERMISSION, [XorPeerAddress(PUBLIC, port)])
        assert error_code(response) == 403
        response = client.request(
            Method.CHANNEL_BIND, [ChannelNumber(0x4001), XorPeerAddress(PUBLIC, port)]
        )
        assert error_code(response) == 403
    (summary,) = client.server.refusals.take()
    assert (summary.cause, summary.count) == ("peer denied", 4)
    assert {dict(facts)["rule"] for facts, _ in summary.details} == {
        "this server's own listening address"
    }


def test_other_ports_of_the_servers_address_are_peers() -> None:
    """Another client's relayed address on this server: relay to relay, the common case."""
    client = allocated()
    response = client.request(Method.CREATE_PERMISSION, [XorPeerAddress(PUBLIC, 50000)])
    assert response.message_class is MessageClass.SUCCESS
    # A Send indication to the listening port is dropped even with the IP's permission.
    send = encode_message(
        Method.SEND,
        MessageClass.INDICATION,
        bytes(12),
        [XorPeerAddress(PUBLIC, 3478), Data(b"loop")],
    )
    assert client.server.receive(send, client.five_tuple, NOW) is None
    assert client.server.drops["peer denied"] == 1
    send = encode_message(
        Method.SEND, MessageClass.INDICATION, bytes(12), [XorPeerAddress(PUBLIC, 50000), Data(b"x")]
    )
    assert client.server.receive(send, client.five_tuple, NOW) is not None


def test_an_allowed_range_opens_the_listening_address() -> None:
    client = allocated(allowed=(PUBLIC,))
    response = client.request(Method.CREATE_PERMISSION, [XorPeerAddress(PUBLIC, 3478)])
    assert response.message_class is MessageClass.SUCCESS


def test_requests_from_the_servers_relay_ports_are_ignored() -> None:
    server, _ = make_server(settings())
    request = stun(Method.ALLOCATE, [RequestedTransport(17)])
    assert server.receive(request, udp((PUBLIC, 50000), SERVER), NOW) is None
    assert server.drops["from own relay"] == 1
    # Its listening port, or another host, is a client as any.
    assert server.receive(request, udp((PUBLIC, 3478), SERVER), NOW) is not None
    assert server.receive(request, udp(PEER, SERVER), NOW) is not None
