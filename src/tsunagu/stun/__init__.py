"""STUN codec (RFC 8489, RFC 5389, RFC 3489 compatibility) and its TURN extensions.

Pure: bytes in, objects out, and back. No sockets, no clock, no global randomness.
"""

from .attributes import *  # noqa: F403
from .attributes import __all__ as _attribute_names
from .framing import StreamFramer
from .indication import data_indication
from .message import (
    HEADER_LENGTH,
    MAGIC_COOKIE,
    Message,
    MessageClass,
    Method,
    StunError,
    encode_message,
    is_channel_data,
    is_stun,
    parse_message,
)

__all__ = [
    *_attribute_names,
    "HEADER_LENGTH",
    "MAGIC_COOKIE",
    "Message",
    "MessageClass",
    "Method",
    "StreamFramer",
    "StunError",
    "data_indication",
    "encode_message",
    "is_channel_data",
    "is_stun",
    "parse_message",
]
