"""Property tests: whatever the bytes, the codec raises only its own documented errors.

parse_message may raise StunError; reading attributes may raise AttributeError_ (both are
ValueError). Anything else escaping is a codec bug. Whatever parses must also survive a
decode/encode/decode cycle unchanged. Example counts are bounded to keep this file fast.
"""

from __future__ import annotations

import hashlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tsunagu.stun import (
    ATTRIBUTE_CLASSES,
    MAGIC_COOKIE,
    Attribute,
    AttributeError_,
    Data,
    ErrorCode,
    IceControlling,
    Lifetime,
    Message,
    MessageClass,
    Method,
    Nonce,
    PasswordAlgorithm,
    PasswordAlgorithms,
    Priority,
    Realm,
    RequestedTransport,
    Software,
    StreamFramer,
    StunError,
    UnknownAttributes,
    UseCandidate,
    Userhash,
    Username,
    XorMappedAddress,
    XorPeerAddress,
    encode_message,
    parse_message,
)
from tsunagu.stun.framing import FramingError

KEY = b"fuzz key"
SHA256_KEY = hashlib.sha256(b"fuzz:realm:key").digest()
COOKIE = MAGIC_COOKIE.to_bytes(4, "big")
CLASSES = sorted(ATTRIBUTE_CLASSES.values(), key=lambda cls: cls.TYPE)
KINDS = sorted(ATTRIBUTE_CLASSES) + [0x0000, 0x0030, 0x7FFF, 0x8FFF, 0xC0DE, 0xFFFF]


def bounded(examples: int) -> settings:
    return settings(
        max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )


def exercise(data: bytes, allow_rfc3489: bool) -> Message | None:
    """Parse ``data`` and call every accessor; return the message if it parsed."""
    try:
        message = parse_message(data, allow_rfc3489=allow_rfc3489)
    except StunError:
        return None
    assert len(message.transaction_id) == (16 if message.rfc3489 else 12)
    assert isinstance(message.unknown_required, tuple)
    assert all(kind < 0x8000 for kind in message.unknown_required)
    assert isinstance(message.has_integrity, bool)
    assert isinstance(message.check_integrity(KEY), bool)
    assert isinstance(message.check_integrity_sha256(SHA256_KEY), bool)
    assert message.check_fingerprint() in (None, True, False)
    for cls in CLASSES:
        assert isinstance(message.has(cls), bool)
        try:
            found = message.get(cls)
        except AttributeError_:
            continue
        assert found is None or type(found) is cls
        try:
            assert len(message.get_all(cls)) >= (found is not None)
        except AttributeError_:
            pass
    try:
        attributes = message.attributes
    except AttributeError_:
        return message
    assert list(message) == attributes
    reencode(message, attributes)
    return message


def reencode(message: Message, attributes: list[Attribute]) -> None:
    """Re-encoding what was decoded must give back the same message contents."""
    encoded = encode_message(
        message.method, message.message_class, message.transaction_id, attributes
    )
    again = parse_message(encoded, allow_rfc3489=message.rfc3489)
    assert (again.method, again.message_class) == (message.method, message.message_class)
    assert again.transaction_id == message.transaction_id
    assert again.attributes == attributes
    assert again.unknown_required == message.unknown_required


# --- strategies ------------------------------------------------------------------------------

values = st.one_of(
    st.binary(max_size=48),
    st.sampled_from([0, 1, 4, 8, 12, 16, 20, 24, 32]).flatmap(
        lambda n: st.binary(min_size=n, max_size=n)
    ),
    # Address-shaped values: reserved byte, family, port, then 4 or 16 bytes.
    st.tuples(
        st.binary(min_size=1, max_size=1),
        st.sampled_from([b"\x01", b"\x02", b"\x03"]),
        st.binary(min_size=2, max_size=2),
        st.sampled_from([4, 16, 15]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
    ).map(b"".join),
)


@st.composite
def structured_messages(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A well-framed header and a well-framed run of attributes with arbitrary values."""
    body = bytearray()
    for kind, value in draw(st.lists(st.tuples(st.sampled_from(KINDS), values), max_size=8)):
        pad = draw(st.binary(min_size=3, max_size=3))
        body += kind.to_bytes(2, "big") + len(value).to_bytes(2, "big") + value
        body += pad[: -len(value) % 4]
    message_type = draw(st.integers(min_value=0, max_value=0x3FFF))
    rfc3489 = draw(st.booleans())
    cookie = draw(st.binary(min_size=4, max_size=4)) if rfc3489 else COOKIE
    header = message_type.to_bytes(2, "big") + len(body).to_bytes(2, "big") + cookie
    return header + draw(st.binary(min_size=12, max_size=12)) + bytes(body), rfc3489


TID = bytes(range(12))
SEEDS = [
    encode_message(
        Method.BINDING,
        MessageClass.REQUEST,
        TID,
        [Software("seed"), Priority(1), IceControlling(7), Username("a:b"), UseCandidate()],
        integrity_key=KEY,
        fingerprint=True,
    ),
    encode_message(
        Method.ALLOCATE,
        MessageClass.REQUEST,
        TID,
        [
            Userhash(bytes(32)),
            Realm("example.org"),
            Nonce("obMatJos2AAACnonce"),
            PasswordAlgorithm(2),
            RequestedTransport(17),
            Lifetime(600),
        ],
        integrity_key=KEY,
        integrity_sha256_key=SHA256_KEY,
        fingerprint=True,
    ),
    encode_message(
        Method.ALLOCATE,
        MessageClass.ERROR,
        TID,
        [
            ErrorCode(420, "Unknown Attribute"),
            UnknownAttributes((0x7777, 0x0030, 0x1234)),
            PasswordAlgorithms(((2, b""), (1, b"par"))),
            Nonce("n"),
        ],
        fingerprint=True,
    ),
    encode_message(
        Method.DATA,
        MessageClass.INDICATION,
        TID,
        [XorPeerAddress("2001:db8::7", 9), Data(b"payload\x00\xff")],
    ),
    encode_message(
        Method.BINDING,
        MessageClass.SUCCESS,
        bytes(range(50, 66)),
        [XorMappedAddress("192.0.2.9", 1)],
        integrity_key=KEY,
    ),
]


@st.composite
def mutated_seeds(draw: st.DrawFn) -> tuple[bytes, bool]:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        position = draw(st.integers(min_value=0, max_value=len(data) - 1))
        data[position] = draw(st.integers(min_value=0, max_value=255))
    cut = draw(st.integers(min_value=0, max_value=len(data) + 8))
    if cut < len(data):
        data = data[: max(cut, 20)]
    elif cut > len(data):
        data += draw(st.binary(min_size=cut - len(data), max_size=cut - len(data)))
    if draw(st.booleans()) and len(data) >= 4:
        # Keep the header length honest so the walk goes past the first check.
        data[2:4] = (len(data) - 20).to_bytes(2, "big")
    return bytes(data), draw(st.booleans())


# --- properties --------------------------------------------------------------------------------


@bounded(1000)
@given(data=st.binary(max_size=200), allow_rfc3489=st.booleans())
def test_random_bytes(data: bytes, allow_rfc3489: bool) -> None:
    exercise(data, allow_rfc3489)


@bounded(1500)
@given(case=structured_messages())
def test_structured_messages(case: tuple[bytes, bool]) -> None:
    data, rfc3489 = case
    message = exercise(data, allow_rfc3489=True)
    if message is not None:
        assert message.rfc3489 == (data[4:8] != COOKIE)
    if not rfc3489:
        # A framed message with the cookie passes the header checks unless an integrity
        # attribute or FINGERPRINT is out of shape.
        try:
            parse_message(data)
        except StunError as exc:
            assert any(word in str(exc) for word in ("MESSAGE-INTEGRITY", "FINGERPRINT"))


@bounded(1500)
@given(case=mutated_seeds())
def test_mutated_valid_messages(case: tuple[bytes, bool]) -> None:
    data, allow_rfc3489 = case
    exercise(data, allow_rfc3489)


def test_seeds_are_valid() -> None:
    for seed in SEEDS:
        message = exercise(seed, allow_rfc3489=True)
        assert message is not None
        assert message.check_fingerprint() in (None, True)
        assert message.check_integrity(KEY) or not message.integrity_offset


@bounded(1500)
@given(cls=st.sampled_from(CLASSES), value=values)
def test_attribute_decode_is_total_and_stable(cls: type[Attribute], value: bytes) -> None:
    for transaction_id in (TID, bytes(range(40, 56))):
        try:
            decoded = cls.decode(value, transaction_id)
        except AttributeError_:
            continue
        assert type(decoded) is cls
        assert cls.decode(decoded.encode(transaction_id), transaction_id) == decoded


@bounded(500)
@given(chunks=st.lists(st.binary(max_size=64), max_size=20), valid_prefix=st.booleans())
def test_framer_random_input(chunks: list[bytes], valid_prefix: bool) -> None:
    framer = StreamFramer()
    if valid_prefix:
        chunks = [SEEDS[0], b"\x40\x01\x00\x01x\x00\x00\x00", *chunks]
    try:
        for chunk in chunks:
            framer.feed(chunk)
            for is_channel, frame in framer.frames():
                declared = int.from_bytes(frame[2:4], "big")
                assert len(frame) == (4 if is_channel else 20) + declared
                assert (0x40 <= frame[0] < 0x80) == is_channel
    except FramingError:
        pass
