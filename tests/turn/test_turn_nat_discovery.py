"""NAT behaviour discovery (RFC 5780 §6, :mod:`tsunagu.turn.discovery`) in the core.

A server with two addresses A1, A2 and two ports P1, P2 answers a Binding from the address
CHANGE-REQUEST asks for (Table 1 of §6.1), to the port RESPONSE-PORT names, padded as
PADDING asks, always with RESPONSE-ORIGIN and OTHER-ADDRESS; a server (or an address, or a
transport) without an alternate answers 420 to what it cannot honour.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from support.turn_harness import CLIENT, NOW, error_code, make_server, stun, udp
from tsunagu.stun import (
    Attribute,
    ChangedAddress,
    ChangeRequest,
    MappedAddress,
    Message,
    MessageClass,
    Method,
    OtherAddress,
    Padding,
    ResponseOrigin,
    ResponsePort,
    Software,
    SourceAddress,
    UnknownAttribute,
    UnknownAttributes,
    XorMappedAddress,
    encode_message,
    parse_message,
)
from tsunagu.turn import NatDiscovery, PeerPolicy, Reply, TurnServer, TurnSettings

A1, A2 = "192.0.2.1", "192.0.2.2"
P1, P2 = 3478, 3479
DISCOVERY = NatDiscovery(((A1, A2),), (P1, P2))
IPV6_CLIENT = ("2001:db8::77", 40000)


def server_with(**settings: object) -> TurnServer:
    settings.setdefault("nat_discovery", DISCOVERY)
    return make_server(TurnSettings(**settings))[0]  # type: ignore[arg-type]


def ask(
    server: TurnServer,
    attributes: list[Attribute] | None = None,
    *,
    local: tuple[str, int] = (A1, P1),
    client: tuple[str, int] = CLIENT,
    protocol: str = "udp",
    fingerprint: bool = False,
    request: bytes | None = None,
    now: float = NOW,
) -> bytes | Reply | None:
    if request is None:
        request = stun(Method.BINDING, attributes or [], fingerprint=fingerprint)
    answer = server.receive(request, udp(client, local, protocol), now)
    assert answer is None or isinstance(answer, bytes | Reply)
    return answer


def change(ip: bool, port: bool) -> ChangeRequest:
    return ChangeRequest(change_ip=ip, change_port=port)


def parsed(answer: bytes | Reply | None) -> Message:
    assert answer is not None
    data = answer.data if isinstance(answer, Reply) else answer
    return parse_message(data, allow_rfc3489=True)


# --- without an alternate address: 420 ------------------------------------------------------


@pytest.mark.parametrize(
    ("attributes", "unknown"),
    [
        ([change(True, True)], (0x0003,)),
        ([change(True, False)], (0x0003,)),
        ([change(False, True)], (0x0003,)),
        ([ResponsePort(40000)], (0x0027,)),
        ([Padding(bytes(100))], (0x0026,)),
        ([change(True, True), ResponsePort(4000), Padding(b"")], (0x0003, 0x0027, 0x0026)),
    ],
)
def test_without_rfc5780_what_cannot_be_honoured_gets_420(
    attributes: list[Attribute], unknown: tuple[int, ...]
) -> None:
    server = make_server()[0]
    response = parsed(ask(server, attributes))
    assert response.message_class is MessageClass.ERROR
    assert error_code(response) == 420
    assert response.get(UnknownAttributes) == UnknownAttributes(unknown)
    assert server.responses == {420: 1}


def test_an_empty_change_request_is_answered_as_a_plain_binding() -> None:
    # JSTUN and Stuntman's client always send one; coturn answers it too.
    for server in (make_server()[0], server_with()):
        response = parsed(ask(server, [change(False, False)], local=(A1, 5000)))
        assert response.message_class is MessageClass.SUCCESS
        assert [type(a) for a in response.attributes] == [XorMappedAddress]


def test_a_plain_binding_without_rfc5780_is_unchanged() -> None:
    response = parsed(ask(make_server()[0]))
    assert [type(a) for a in response.attributes] == [XorMappedAddress]


@pytest.mark.parametrize(
    ("local", "protocol"),
    [
        ((A1, P1), "tcp"),  # a connection cannot answer from elsewhere
        ((A2, P2), "tls"),
        (("192.0.2.3", P1), "udp"),  # an address without a partner
        ((A1, 5000), "udp"),  # neither of the two ports
    ],
)
def test_where_there_is_no_alternate_it_is_as_without_rfc5780(
    local: tuple[str, int], protocol: str
) -> None:
    server = server_with()
    plain = parsed(ask(server, local=local, protocol=protocol))
    assert [type(a) for a in plain.attributes] == [XorMappedAddress]
    refused = parsed(ask(server, [change(True, False)], local=local, protocol=protocol))
    assert error_code(refused) == 420
    assert refused.get(UnknownAttributes) == UnknownAttributes((0x0003,))


# --- with the alternate: Table 1 ------------------------------------------------------------

LOCALS = [(A1, P1), (A1, P2), (A2, P1), (A2, P2)]


def _other(local: tuple[str, int]) -> tuple[str, int]:
    return (A2 if local[0] == A1 else A1, P2 if local[1] == P1 else P1)


@pytest.mark.parametrize("local", LOCALS)
@pytest.mark.parametrize(("change_ip", "change_port"), [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_table_1(local: tuple[str, int], change_ip: int, change_port: int) -> None:
    server = server_with()
    attributes: list[Attribute] = [change(bool(change_ip), bool(change_port))]
    answer = ask(server, attributes, local=local)
    ca, cp = _other(local)
    source = (ca if change_ip else local[0], cp if change_port else local[1])
    response = parsed(answer)
    if source == local:
        assert isinstance(answer, bytes)  # back the way it came
    else:
        assert answer == Reply(response.raw, source, CLIENT)
    assert response.message_class is MessageClass.SUCCESS
    assert response.get(XorMappedAddress) == XorMappedAddress(*CLIENT)
    # RFC 5780 §6.1: MAPPED-ADDRESS too; RESPONSE-ORIGIN is where it leaves from;
    # OTHER-ADDRESS is Ca:Cp whatever the flags.
    assert response.get(MappedAddress) == MappedAddress(*CLIENT)
    assert response.get(ResponseOrigin) == ResponseOrigin(*source)
    assert response.get(OtherAddress) == OtherAddress(ca, cp)
    assert server.responses == {200: 1}


def test_a_plain_binding_carries_response_origin_and_other_address() -> None:
    answer = ask(server_with())
    assert isinstance(answer, bytes)
    assert [type(a) for a in parsed(answer).attributes] == [
        XorMappedAddress,
        MappedAddress,
        ResponseOrigin,
        OtherAddress,
    ]
    assert len(answer) == 68  # 20 + 4 * 12: what the unauthenticated budget is about


def test_ipv6_pair() -> None:
    b1, b2 = "2001:db8::1", "2001:db8::2"
    server = server_with(nat_discovery=NatDiscovery(((A1, A2), (b1, b2)), (P1, P2)))
    answer = ask(server, [change(True, True)], local=(b2, P1), client=IPV6_CLIENT)
    assert isinstance(answer, Reply)
    assert (answer.source, answer.destination) == ((b1, P2), IPV6_CLIENT)
    assert parsed(answer).get(OtherAddress) == OtherAddress(b1, P2)


def test_behind_a_nat_the_public_addresses_are_advertised() -> None:
    discovery = replace(DISCOVERY, advertised=((A1, "203.0.113.1"), (A2, "203.0.113.2")))
    answer = ask(server_with(nat_discovery=discovery), [change(True, False)])
    assert isinstance(answer, Reply)
    assert answer.source == (A2, P1)  # sent from the local address...
    response = parsed(answer)  # ...named as the world sees it
    assert response.get(ResponseOrigin) == ResponseOrigin("203.0.113.2", P1)
    assert response.get(OtherAddress) == OtherAddress("203.0.113.2", P2)


def test_fingerprint_and_software_are_kept() -> None:
    answer = ask(server_with(software="tsunagu"), [change(False, True)], fingerprint=True)
    response = parsed(answer)
    assert response.check_fingerprint() is True
    assert response.get(Software) == Software("tsunagu")


def test_a_malformed_change_request_gets_400() -> None:
    request = stun(Method.BINDING, [UnknownAttribute(0x0003, b"\x00\x06")])
    assert error_code(parsed(ask(server_with(), request=request))) == 400


def test_no_stun_answers_no_binding_at_all() -> None:
    assert ask(server_with(no_stun=True), [change(True, True)]) is None


# --- RESPONSE-PORT --------------------------------------------------------------------------


def test_response_port_sends_to_that_port_of_the_client() -> None:
    answer = ask(server_with(), [ResponsePort(40001)])
    assert answer == Reply(parsed(answer).raw, (A1, P1), (CLIENT[0], 40001))
    # With a change, from the alternate too.
    answer = ask(server_with(), [ResponsePort(40001), change(True, True)], local=(A2, P2))
    assert isinstance(answer, Reply)
    assert (answer.source, answer.destination) == ((A1, P1), (CLIENT[0], 40001))
    # The XOR-MAPPED-ADDRESS is still where the request came from (RFC 5780 §4.6).
    assert parsed(answer).get(XorMappedAddress) == XorMappedAddress(*CLIENT)


def test_response_port_to_its_own_port_is_just_an_answer() -> None:
    answer = ask(server_with(), [ResponsePort(CLIENT[1])])
    assert isinstance(answer, bytes)


@pytest.mark.parametrize(
    "attributes",
    [
        [ResponsePort(40001), Padding(bytes(8))],  # RFC 5780 §6.1, §7.5
        [ResponsePort(0)],
        [ResponsePort(P2)],  # the server's own alternate port, on the client's IP
        [ResponsePort(20000)],  # one of its relay ports
    ],
)
def test_response_port_that_is_refused(attributes: list[Attribute]) -> None:
    client_on_the_server = (A1, 50000)
    policy = replace(
        PeerPolicy.create(),
        own=frozenset((ip, port) for ip in (A1, A2) for port in (P1, P2)),
        own_relay=(frozenset({A1}), 20000, 20100),
    )
    server = server_with(policy=policy)
    response = parsed(ask(server, attributes, client=client_on_the_server))
    assert error_code(response) == 400


# --- PADDING --------------------------------------------------------------------------------


@pytest.mark.parametrize("fingerprint", [False, True])
@pytest.mark.parametrize("size", [1500, 1501, 64, 0])
def test_padding_makes_the_response_as_large_as_the_request(size: int, fingerprint: bool) -> None:
    request = stun(
        Method.BINDING, [change(True, True), Padding(bytes(size))], fingerprint=fingerprint
    )
    answer = ask(server_with(), request=request)
    assert isinstance(answer, Reply)
    response = parsed(answer)
    padding = response.get(Padding)
    assert padding is not None and set(padding.value) <= {0}
    assert len(padding.value) % 4 == 0
    if len(request) >= 68 + 4 + 8 * fingerprint:
        assert len(request) - 3 <= len(answer.data) <= len(request)
    else:  # the request is smaller than a response: the PADDING is empty
        assert padding.value == b""
    assert response.check_fingerprint() is (True if fingerprint else None)


# --- RFC 3489 clients -----------------------------------------------------------------------


def rfc3489(attributes: list[Attribute]) -> bytes:
    request = encode_message(Method.BINDING, MessageClass.REQUEST, bytes(range(16)), attributes)
    assert request[4:8] != bytes.fromhex("2112a442")
    return request


def test_rfc3489_client_gets_source_and_changed_address() -> None:
    server = server_with(rfc3489_compat=True)
    answer = ask(server, request=rfc3489([change(True, False)]))
    assert isinstance(answer, Reply) and answer.source == (A2, P1)
    response = parsed(answer)
    assert response.rfc3489 and response.transaction_id == bytes(range(16))
    # What a classic client (Debian's stun) parses; nothing it could not.
    assert response.attributes == [
        MappedAddress(*CLIENT),
        SourceAddress(A2, P1),
        ChangedAddress(A2, P2),
    ]


def test_rfc3489_client_without_rfc5780_gets_420() -> None:
    server = make_server(TurnSettings(rfc3489_compat=True))[0]
    response = parsed(ask(server, request=rfc3489([change(False, True)])))
    assert response.rfc3489 and error_code(response) == 420
    assert response.get(UnknownAttributes) == UnknownAttributes((0x0003,))


def test_rfc5389_client_with_backward_compatibility_gets_the_new_names() -> None:
    response = parsed(ask(server_with(rfc3489_compat=True)))
    assert response.get(ResponseOrigin) is not None and response.get(SourceAddress) is None


# --- the unauthenticated budget --------------------------------------------------------------


def flood(server: TurnServer, attributes: list[Attribute], count: int) -> list[bytes | Reply]:
    rng = random.Random(5)
    answers = []
    for _ in range(count):
        request = stun(Method.BINDING, attributes, rng=rng)
        answer = ask(server, request=request)
        if answer is not None:
            answers.append(answer)
    return answers


def test_rfc5780_answers_count_against_the_budget() -> None:
    server = server_with(unauth_rate=1.0)  # a burst of 2
    assert len(flood(server, [change(True, True)], 5)) == 2
    assert server.drops["unauthenticated rate limit"] == 3
    # Beyond the budget, a request's retransmissions pay for its 68-byte answer: 20-byte
    # requests, so the fourth transmission is answered.
    request = stun(Method.BINDING, [])
    answers = [ask(server, request=request) for _ in range(4)]
    assert answers[:3] == [None, None, None] and isinstance(answers[3], bytes)


def test_plain_bindings_without_rfc5780_are_not_limited() -> None:
    server = make_server(TurnSettings(unauth_rate=1.0))[0]
    assert len(flood(server, [], 50)) == 50


def test_response_port_is_never_answered_beyond_the_budget() -> None:
    server = server_with(unauth_rate=1.0)
    assert len(flood(server, [ResponsePort(40001)], 4)) == 2
    request = stun(Method.BINDING, [ResponsePort(40001)])
    assert [ask(server, request=request) for _ in range(10)] == [None] * 10
    # The budget comes back with time.
    assert isinstance(ask(server, request=request, now=NOW + 1.0), Reply)


def test_padded_answers_pay_for_themselves() -> None:
    server = server_with(unauth_rate=1.0)
    answers = flood(server, [Padding(bytes(1500))], 20)
    # No larger than their requests: answered beyond the budget at once.
    assert len(answers) == 20
    assert server.unauthenticated.answered_over_budget == 18
