"""The hand-built Data indication is byte for byte what the general encoder makes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tsunagu.stun import MessageClass, Method, encode_message, parse_message
from tsunagu.stun.attributes import Data, XorPeerAddress
from tsunagu.stun.indication import data_indication

IPS = ["127.0.0.1", "203.0.113.9", "0.0.0.0", "2001:db8::1", "::1", "::ffff:192.0.2.1"]


@settings(max_examples=300, deadline=None)
@given(
    tid=st.binary(min_size=12, max_size=12),
    ip=st.sampled_from(IPS),
    port=st.integers(0, 0xFFFF),
    payload=st.binary(max_size=300),
)
def test_same_bytes_as_encode_message(tid: bytes, ip: str, port: int, payload: bytes) -> None:
    expected = encode_message(
        Method.DATA, MessageClass.INDICATION, tid, (XorPeerAddress(ip, port), Data(payload))
    )
    built = data_indication(tid, (ip, port), payload)
    assert built == expected
    message = parse_message(built)
    assert message.get(Data) == Data(payload)
    peer = message.get(XorPeerAddress)
    assert peer is not None and peer.port == port


@pytest.mark.parametrize("ip", ["127.0.0.1", "::1"])
def test_too_large_payload_is_refused(ip: str) -> None:
    # Two attribute headers, the peer address, and the payload padded to 4 bytes.
    room = (0xFFFF - 8 - (8 if ip == "127.0.0.1" else 20)) & ~3
    data_indication(bytes(12), (ip, 1), bytes(room))
    with pytest.raises(ValueError):
        data_indication(bytes(12), (ip, 1), bytes(room + 1))
