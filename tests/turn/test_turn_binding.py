"""Binding (RFC 8489 §6.3.1, RFC 3489 compatibility) and the STUN-only / no-STUN switches."""

from __future__ import annotations

import random

from support.turn_harness import (
    CLIENT,
    NOW,
    Client,
    error_code,
    make_server,
    stun,
    success,
    udp,
)
from tsunagu.stun import (
    TRANSPORT_UDP,
    MappedAddress,
    MessageClass,
    Method,
    RequestedTransport,
    Software,
    UnknownAttribute,
    UnknownAttributes,
    XorMappedAddress,
    encode_message,
    parse_message,
)
from tsunagu.turn import TurnServer, TurnSettings


def binding(server: TurnServer, data: bytes, client: tuple[str, int] = CLIENT) -> bytes | None:
    answer = server.receive(data, udp(client), NOW)
    assert answer is None or isinstance(answer, bytes)
    return answer


def test_binding_answers_with_xor_mapped_address_only(server: TurnServer) -> None:
    txid = bytes(range(12))
    answer = binding(server, stun(Method.BINDING, txid=txid))
    assert answer is not None
    response = parse_message(answer)
    assert success(response)
    assert response.method == Method.BINDING
    assert response.transaction_id == txid
    assert response.get(XorMappedAddress) == XorMappedAddress(*CLIENT)
    # By default nothing else: no MAPPED-ADDRESS, no SOFTWARE, no FINGERPRINT.
    assert [type(a) for a in response.attributes] == [XorMappedAddress]
    assert response.fingerprint_offset is None
    assert not response.has_integrity
    assert server.responses[200] == 1


def test_binding_over_ipv6_reports_the_ipv6_address(server: TurnServer) -> None:
    client6 = ("2001:db8::77", 40000)
    answer = server.receive(stun(Method.BINDING), udp(client6, ("2001:db8::1", 3478)), NOW)
    assert isinstance(answer, bytes)
    assert parse_message(answer).get(XorMappedAddress) == XorMappedAddress(*client6)


def test_rfc3489_compat_adds_mapped_address() -> None:
    server, _ = make_server(TurnSettings(rfc3489_compat=True))
    answer = binding(server, stun(Method.BINDING))
    assert answer is not None
    response = parse_message(answer)
    assert response.get(XorMappedAddress) == XorMappedAddress(*CLIENT)
    assert response.get(MappedAddress) == MappedAddress(*CLIENT)


def test_rfc3489_request_without_cookie_gets_mapped_address() -> None:
    server, _ = make_server(TurnSettings(rfc3489_compat=True))
    txid16 = bytes(range(100, 116))  # no magic cookie: all 16 bytes are the id
    request = encode_message(Method.BINDING, MessageClass.REQUEST, txid16)
    assert request[4:8] != bytes.fromhex("2112a442")
    answer = binding(server, request)
    assert answer is not None
    assert answer[4:20] == txid16
    response = parse_message(answer, allow_rfc3489=True)
    assert response.rfc3489
    assert success(response)
    assert response.get(MappedAddress) == MappedAddress(*CLIENT)
    assert response.get(XorMappedAddress) is None


def test_rfc3489_request_is_dropped_without_compat(server: TurnServer) -> None:
    request = encode_message(Method.BINDING, MessageClass.REQUEST, bytes(16))
    assert binding(server, request) is None
    assert server.drops["malformed"] == 1


def test_rfc3489_non_binding_request_is_ignored() -> None:
    server, binder = make_server(TurnSettings(rfc3489_compat=True))
    request = encode_message(
        Method.ALLOCATE, MessageClass.REQUEST, bytes(16), [RequestedTransport(TRANSPORT_UDP)]
    )
    assert binding(server, request) is None
    assert not binder.binds and not server.allocations


def test_software_is_sent_when_configured() -> None:
    server, _ = make_server(TurnSettings(software="tsunagu test"))
    answer = binding(server, stun(Method.BINDING))
    assert answer is not None
    assert parse_message(answer).get(Software) == Software("tsunagu test")


def test_fingerprint_is_mirrored() -> None:
    server, _ = make_server()
    with_fp = binding(server, stun(Method.BINDING, fingerprint=True))
    assert with_fp is not None
    response = parse_message(with_fp)
    assert response.check_fingerprint() is True
    without = binding(server, stun(Method.BINDING))
    assert without is not None
    assert parse_message(without).check_fingerprint() is None


def test_bad_fingerprint_is_dropped(server: TurnServer) -> None:
    request = bytearray(stun(Method.BINDING, fingerprint=True))
    request[-1] ^= 0x01
    assert binding(server, bytes(request)) is None
    assert server.drops["bad fingerprint"] == 1


def test_binding_with_unknown_required_attribute_gets_420(server: TurnServer) -> None:
    request = stun(Method.BINDING, [UnknownAttribute(0x7777, b"abcd")])
    answer = binding(server, request)
    assert answer is not None
    response = parse_message(answer)
    assert error_code(response) == 420
    assert response.get(UnknownAttributes) == UnknownAttributes((0x7777,))


def test_unknown_optional_attribute_is_ignored(server: TurnServer) -> None:
    answer = binding(server, stun(Method.BINDING, [UnknownAttribute(0xC0DE, b"x")]))
    assert answer is not None
    assert success(parse_message(answer))


def test_responses_and_other_indications_are_dropped(server: TurnServer) -> None:
    rng = random.Random(3)
    for klass in (MessageClass.SUCCESS, MessageClass.ERROR):
        assert binding(server, stun(Method.BINDING, klass=klass, rng=rng)) is None
    assert binding(server, stun(Method.BINDING, klass=MessageClass.INDICATION, rng=rng)) is None
    assert server.drops["unexpected message"] == 3
    assert not server.responses


def test_unknown_method_gets_400(server: TurnServer) -> None:
    answer = binding(server, stun(0x0123))
    assert answer is not None
    assert error_code(parse_message(answer)) == 400


def test_no_stun_drops_binding_but_serves_turn() -> None:
    server, _ = make_server(TurnSettings(no_stun=True))
    assert binding(server, stun(Method.BINDING)) is None
    assert success(Client(server).allocate())


def test_stun_only_answers_binding_and_forbids_turn() -> None:
    server, binder = make_server(TurnSettings(stun_only=True))
    answer = binding(server, stun(Method.BINDING))
    assert answer is not None and success(parse_message(answer))
    for method in (Method.ALLOCATE, Method.REFRESH, Method.CREATE_PERMISSION):
        response = Client(server).request(method, [RequestedTransport(TRANSPORT_UDP)])
        assert error_code(response) == 403
        assert not response.has_integrity
    assert not binder.binds and not server.allocations
