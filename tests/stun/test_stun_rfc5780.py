"""The attributes of NAT behaviour discovery (RFC 5780 §7) and their RFC 3489 names, on the wire.

Built byte by byte from the RFC's figures, not with the codec under test.
"""

from __future__ import annotations

import pytest

from tsunagu.stun import (
    AttributeError_,
    ChangedAddress,
    ChangeRequest,
    MessageClass,
    Method,
    OtherAddress,
    Padding,
    ResponseOrigin,
    ResponsePort,
    SourceAddress,
    encode_message,
    parse_message,
)

TXID = bytes(range(12))


def tlv(kind: int, value: bytes) -> bytes:
    return kind.to_bytes(2, "big") + len(value).to_bytes(2, "big") + value + bytes(-len(value) % 4)


def request(*attributes: bytes) -> bytes:
    body = b"".join(attributes)
    return b"\x00\x01" + len(body).to_bytes(2, "big") + b"\x21\x12\xa4\x42" + TXID + body


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (0x00, ChangeRequest()),
        (0x04, ChangeRequest(change_ip=True)),  # A: "change IP"
        (0x02, ChangeRequest(change_port=True)),  # B: "change port"
        (0x06, ChangeRequest(change_ip=True, change_port=True)),
    ],
)
def test_change_request_flags(flags: int, expected: ChangeRequest) -> None:
    wire = request(tlv(0x0003, bytes((0, 0, 0, flags))))
    message = parse_message(wire)
    assert message.get(ChangeRequest) == expected
    assert encode_message(Method.BINDING, MessageClass.REQUEST, TXID, [expected]) == wire


def test_response_port_is_a_port_and_two_bytes_of_padding() -> None:
    wire = request(tlv(0x0027, b"\x9c\x41\x00\x00"))
    assert parse_message(wire).get(ResponsePort) == ResponsePort(40001)
    encoded = encode_message(Method.BINDING, MessageClass.REQUEST, TXID, [ResponsePort(40001)])
    assert encoded == wire


def test_padding_is_free_form() -> None:
    wire = request(tlv(0x0026, b"\xff" * 1500))
    assert parse_message(wire).get(Padding) == Padding(b"\xff" * 1500)


@pytest.mark.parametrize(
    ("cls", "kind"),
    [(ResponseOrigin, 0x802B), (OtherAddress, 0x802C), (SourceAddress, 0x0004)],
)
def test_address_attributes_have_mapped_address_form(cls: type, kind: int) -> None:
    # RFC 5780 §7.1: the same format as MAPPED-ADDRESS, not XOR-ed.
    value = b"\x00\x01" + (3479).to_bytes(2, "big") + bytes((192, 0, 2, 2))
    wire = b"\x01\x01\x00\x0c\x21\x12\xa4\x42" + TXID + tlv(kind, value)
    assert encode_message(Method.BINDING, MessageClass.SUCCESS, TXID, [cls("192.0.2.2", 3479)]) == (
        wire
    )
    assert parse_message(wire).attributes == [cls("192.0.2.2", 3479)]


def test_the_rfc5780_codes_and_their_rfc3489_names() -> None:
    # §7.4 says OTHER-ADDRESS has CHANGED-ADDRESS's number, but §9.1 registers 0x802C
    # (comprehension-optional); RFC 3489 clients read CHANGED-ADDRESS at 0x0005.
    assert (OtherAddress.TYPE, ChangedAddress.TYPE) == (0x802C, 0x0005)
    assert (ResponseOrigin.TYPE, SourceAddress.TYPE) == (0x802B, 0x0004)


def test_request_attributes_are_understood() -> None:
    # Comprehension-required (below 0x8000), and known: a server decides about them itself
    # rather than answering 420 for not knowing them.
    wire = request(
        tlv(0x0003, b"\x00\x00\x00\x06"), tlv(0x0027, b"\x9c\x41\x00\x00"), tlv(0x0026, b"")
    )
    assert parse_message(wire).unknown_required == ()


@pytest.mark.parametrize(
    ("kind", "value"),
    [(0x0003, b"\x00\x00\x06"), (0x0003, bytes(8)), (0x0027, b"\x9c\x41"), (0x802C, b"\x00")],
)
def test_malformed_values_raise_where_read(kind: int, value: bytes) -> None:
    message = parse_message(request(tlv(kind, value)))
    with pytest.raises(AttributeError_):
        message.attributes  # noqa: B018
