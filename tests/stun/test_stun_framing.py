"""StreamFramer: STUN messages and ChannelData on a TCP/TLS byte stream (RFC 8656 §12.5)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tsunagu.stun import (
    Data,
    MessageClass,
    Method,
    Software,
    StreamFramer,
    XorPeerAddress,
    encode_message,
    parse_message,
)
from tsunagu.stun.framing import FramingError

TID = bytes(range(12))


def channel_data(channel: int, payload: bytes, pad: bytes = b"\x00") -> tuple[bytes, bytes]:
    """(what the stream carries, what the framer must return) for one ChannelData."""
    frame = struct.pack("!HH", channel, len(payload)) + payload
    return frame + (pad * 3)[: -len(payload) % 4], frame


def stun(*attributes: Software | Data | XorPeerAddress) -> bytes:
    return encode_message(Method.SEND, MessageClass.INDICATION, TID, attributes)


def build_stream(pad: bytes = b"\x00") -> tuple[bytes, list[tuple[bool, bytes]]]:
    """STUN and ChannelData interleaved, with every ChannelData padding length."""
    stream = bytearray()
    expected: list[tuple[bool, bytes]] = []
    for index in range(10):
        message = stun(Software("x" * index), Data(bytes(range(index * 3))))
        stream += message
        expected.append((False, message))
        wire, frame = channel_data(0x4000 + index, bytes([index]) * index, pad)
        stream += wire
        expected.append((True, frame))
    empty = stun()
    stream += empty
    expected.append((False, empty))
    return bytes(stream), expected


Frames = list[tuple[bool, bytes]]


def feed_in_chunks(framer: StreamFramer, stream: bytes, sizes: list[int]) -> Frames:
    out: Frames = []
    offset = 0
    index = 0
    while offset < len(stream):
        size = sizes[index % len(sizes)] if sizes else 1
        index += 1
        framer.feed(stream[offset : offset + size])
        offset += size
        out += framer.frames()
    return out


def test_whole_stream_at_once() -> None:
    stream, expected = build_stream()
    framer = StreamFramer()
    framer.feed(stream)
    assert framer.frames() == expected
    assert framer.buffered == 0
    assert framer.frames() == []


def test_byte_by_byte() -> None:
    stream, expected = build_stream()
    framer = StreamFramer()
    frames: list[tuple[bool, bytes]] = []
    for position in range(len(stream)):
        framer.feed(stream[position : position + 1])
        frames += framer.frames()
    assert frames == expected
    assert framer.buffered == 0


def test_frames_are_what_a_datagram_would_carry() -> None:
    stream, expected = build_stream()
    framer = StreamFramer()
    framer.feed(stream)
    for is_channel, frame in framer.frames():
        if is_channel:
            assert len(frame) == 4 + struct.unpack_from("!H", frame, 2)[0]
        else:
            assert parse_message(frame).method == Method.SEND


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=97), min_size=1, max_size=40),
    pad=st.binary(min_size=1, max_size=1),
)
def test_random_chunking(sizes: list[int], pad: bytes) -> None:
    # Padding content is whatever the sender put there: the framer must not look at it.
    stream, expected = build_stream(pad)
    framer = StreamFramer()
    assert feed_in_chunks(framer, stream, sizes) == expected
    assert framer.buffered == 0


@settings(max_examples=100, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=40), min_size=1, max_size=12),
    cut=st.integers(min_value=0, max_value=10_000),
)
def test_random_channel_data_split_once(payloads: list[bytes], cut: int) -> None:
    stream = bytearray()
    expected: list[tuple[bool, bytes]] = []
    for number, payload in enumerate(payloads):
        wire, frame = channel_data(0x4000 + number, payload, b"\xee")
        stream += wire
        expected.append((True, frame))
    cut %= len(stream) + 1
    framer = StreamFramer()
    framer.feed(bytes(stream[:cut]))
    first = framer.frames()
    framer.feed(bytes(stream[cut:]))
    assert first + framer.frames() == expected
    assert framer.buffered == 0


@pytest.mark.parametrize("length", [1, 2, 3, 5])
def test_channel_data_waits_for_its_padding(length: int) -> None:
    wire, frame = channel_data(0x4ABC, b"p" * length)
    framer = StreamFramer()
    framer.feed(wire[: 4 + length])
    assert framer.frames() == []
    assert framer.buffered == 4 + length
    framer.feed(wire[4 + length :])
    assert framer.frames() == [(True, frame)]
    assert framer.buffered == 0


def test_partial_headers_are_kept() -> None:
    message = stun(Software("hello"))
    framer = StreamFramer()
    for size in range(1, 4):
        framer.feed(message[size - 1 : size])
        assert framer.frames() == []
        assert framer.buffered == size
    framer.feed(message[3:-1])
    assert framer.frames() == []
    framer.feed(message[-1:])
    assert framer.frames() == [(False, message)]


@pytest.mark.parametrize("first", range(0x80, 0x100, 0x07))
def test_garbage_first_byte(first: int) -> None:
    framer = StreamFramer()
    framer.feed(bytes([first, 0, 0, 0]))
    with pytest.raises(FramingError):
        framer.frames()


def test_every_garbage_first_byte_after_a_good_frame() -> None:
    message = stun()
    for first in range(0x80, 0x100):
        framer = StreamFramer()
        framer.feed(message + bytes([first, 0, 0, 4]) + bytes(4))
        with pytest.raises(FramingError):
            framer.frames()


@pytest.mark.parametrize("length", [1, 2, 3, 0xFFFF])
def test_stun_length_not_multiple_of_four(length: int) -> None:
    framer = StreamFramer()
    framer.feed(struct.pack("!HH", 0x0001, length) + bytes(16))
    with pytest.raises(FramingError):
        framer.frames()


def test_largest_frames_pass_when_drained() -> None:
    big_stun = encode_message(Method.SEND, MessageClass.INDICATION, TID, [Data(bytes(0xFFF8))])
    big_channel, big_frame = channel_data(0x4000, bytes(0xFFFF))
    stream = (big_stun + big_channel) * 3
    framer = StreamFramer()
    frames = feed_in_chunks(framer, stream, [4096])
    assert frames == [(False, big_stun), (True, big_frame)] * 3
    assert framer.buffered == 0


def test_one_large_read_of_many_frames_is_accepted() -> None:
    # The bound is on what stays buffered, not on the size of one read.
    message = stun(Software("s"))
    stream = message * 10_000
    assert len(stream) > 4 * 0xFFFF
    framer = StreamFramer()
    framer.feed(stream)
    assert len(framer.frames()) == 10_000


def test_undrained_buffer_is_bounded() -> None:
    message = stun(Software("s"))
    framer = StreamFramer()
    fed = 0
    with pytest.raises(FramingError):
        for _ in range(1000):
            framer.feed(message * 32)
            fed += len(message) * 32
    # Room for two of the largest frames, and not much more.
    assert 2 * (0xFFFF + 20) <= fed <= 4 * (0xFFFF + 20)


def test_many_small_frames_never_overflow() -> None:
    message = stun(Software("s"))
    framer = StreamFramer()
    total = 0
    for _ in range(2000):
        framer.feed(message * 8)
        total += len(framer.frames())
    assert total == 16_000
