"""Splitting a TCP or TLS byte stream into STUN messages and ChannelData (RFC 8656 §12.5).

On a stream the first two bits of each frame tell its kind: 00 is a STUN message whose
header gives its length, 01 is ChannelData whose 4-byte header gives the application data
length, and which is padded to a multiple of four bytes on streams. Anything else means the
peer is not speaking TURN and the connection should be closed.
"""

from __future__ import annotations

__all__ = ["FramingError", "StreamFramer"]

_MAX_BUFFER = 2 * (0xFFFF + 20)


class FramingError(ValueError):
    """The stream does not carry STUN or ChannelData; close the connection."""


class StreamFramer:
    """Incremental framer: ``feed()`` bytes, then iterate ``frames()``.

    Each frame is ``(is_channel_data, frame)``. For ChannelData the frame excludes the
    stream padding, so it is exactly what a UDP datagram would carry.
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | memoryview) -> None:
        self._buffer += data
        if len(self._buffer) > _MAX_BUFFER + len(data):
            raise FramingError("stream buffer overflow")

    def frames(self) -> list[tuple[bool, bytes]]:
        """Return every complete frame buffered so far, in order."""
        out: list[tuple[bool, bytes]] = []
        buffer = self._buffer
        offset = 0
        size = len(buffer)
        while size - offset >= 4:
            first = buffer[offset]
            length = (buffer[offset + 2] << 8) | buffer[offset + 3]
            if first < 0x40:
                total = 20 + length
                if length % 4:
                    raise FramingError("STUN length is not a multiple of 4")
                if size - offset < total:
                    break
                out.append((False, bytes(buffer[offset : offset + total])))
                offset += total
            elif first < 0x80:
                total = 4 + length + (-length % 4)
                if size - offset < total:
                    break
                out.append((True, bytes(buffer[offset : offset + 4 + length])))
                offset += total
            else:
                raise FramingError(f"first byte {first:#04x} is neither STUN nor ChannelData")
        if offset:
            del buffer[:offset]
        return out

    @property
    def buffered(self) -> int:
        return len(self._buffer)
