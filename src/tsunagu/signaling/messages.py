"""Signaling message schema, version 1, and validation of everything a client sends.

Pure: no I/O, no clock. :func:`parse` turns one WebSocket text frame into a typed message or
raises :class:`MessageError` naming the problem. Outbound messages are built by the helper
functions at the bottom from validated fields only, so nothing a client adds to a message ever
reaches another client. The wire format is documented in ``docs/SIGNALING.md``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Final

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_MESSAGE_BYTES",
    "CLIENT_TYPES",
    "SERVER_TYPES",
    "ErrorCode",
    "MessageError",
    "Resume",
    "Join",
    "Offer",
    "Answer",
    "IceCandidate",
    "Candidate",
    "Chat",
    "Leave",
    "Ping",
    "ClientMessage",
    "parse",
    "normalize_room",
    "is_valid_room",
    "is_peer_id",
    "encode",
]

PROTOCOL_VERSION: Final = 1
SUPPORTED_VERSIONS: Final = frozenset({1})

MAX_MESSAGE_BYTES: Final = 24 * 1024
"""Largest frame a client may send. An offer for a full room of 8 with simulcast video is
rarely above 16 KiB of SDP; JSON escapes each line's CR LF (a few hundred bytes more) and
the envelope is small, so 24 KiB leaves half again as much room and no more."""
MAX_NAME_CHARS: Final = 40
MAX_PASSWORD_CHARS: Final = 128
MAX_CHAT_CHARS: Final = 2000
MAX_CANDIDATE_CHARS: Final = 1024
MAX_MID_CHARS: Final = 64
MAX_TOKEN_CHARS: Final = 64
MAX_JOIN_TOKEN_CHARS: Final = 2048

_ROOM_RE: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,47}")
_PEER_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,32}")
# Control characters (C0, DEL, C1) and the Unicode line/paragraph separators are refused in
# names so that a name always renders as one line of plain text.
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_CHAT_CONTROL_RE: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

CLIENT_TYPES: Final = ("join", "offer", "answer", "candidate", "chat", "leave", "ping")
SERVER_TYPES: Final = (
    "joined",
    "peer-joined",
    "peer-left",
    "offer",
    "answer",
    "candidate",
    "chat",
    "pong",
    "ice",
    "checked",
    "error",
)


class ErrorCode(StrEnum):
    """The ``code`` of an ``error`` message."""

    BAD_JSON = "bad-json"
    BAD_MESSAGE = "bad-message"
    UNKNOWN_TYPE = "unknown-type"
    MISSING_FIELD = "missing-field"
    BAD_FIELD = "bad-field"
    TOO_LARGE = "too-large"
    RATE_LIMITED = "rate-limited"
    UNSUPPORTED_VERSION = "unsupported-version"
    NOT_JOINED = "not-joined"
    ALREADY_JOINED = "already-joined"
    WRONG_ROOM = "wrong-room"
    UNKNOWN_PEER = "unknown-peer"
    ROOM_FULL = "room-full"
    PASSWORD_REQUIRED = "password-required"
    BAD_PASSWORD = "bad-password"
    TOKEN_REQUIRED = "token-required"
    BAD_TOKEN = "bad-token"
    OUTSIDE_NETWORK = "outside-network"
    REVOKED = "revoked"


class MessageError(Exception):
    """An inbound message was refused; ``code`` is sent back to the client."""

    def __init__(
        self, code: ErrorCode, message: str, *, ref: str | None = None, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref
        self.field = field


@dataclass(frozen=True, slots=True)
class Resume:
    """Credentials to take over a peer whose connection dropped, and the ``seq`` of the last
    message the client received (None: it does not say, and gets only what was kept while
    it was away)."""

    id: str
    token: str
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class Join:
    room: str
    name: str
    version: int = PROTOCOL_VERSION
    password: str | None = None
    resume: Resume | None = None
    token: str | None = None
    """A join token (``room-access token``), see :mod:`tsunagu.signaling.tokens`."""
    check: bool = False
    """Only ask for the ICE servers a member of the room would get, without entering it
    (the connectivity test page)."""


@dataclass(frozen=True, slots=True)
class Offer:
    to: str
    sdp: str
    room: str | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    to: str
    sdp: str
    room: str | None = None


@dataclass(frozen=True, slots=True)
class IceCandidate:
    """An ``RTCIceCandidateInit``; an empty ``candidate`` marks the end of a generation."""

    candidate: str
    sdp_mid: str | None
    sdp_mline_index: int | None
    username_fragment: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate,
            "sdpMid": self.sdp_mid,
            "sdpMLineIndex": self.sdp_mline_index,
            "usernameFragment": self.username_fragment,
        }


@dataclass(frozen=True, slots=True)
class Candidate:
    """Trickle ICE; ``candidate`` None is end-of-candidates."""

    to: str
    candidate: IceCandidate | None
    room: str | None = None


@dataclass(frozen=True, slots=True)
class Chat:
    text: str
    to: str | None = None
    room: str | None = None


@dataclass(frozen=True, slots=True)
class Leave:
    room: str | None = None


@dataclass(frozen=True, slots=True)
class Ping:
    room: str | None = None


ClientMessage = Join | Offer | Answer | Candidate | Chat | Leave | Ping


def normalize_room(room: str) -> str:
    """Room names are case-insensitive; the canonical form is lower case."""
    return room.strip().lower()


def is_valid_room(room: str) -> bool:
    """True if ``room`` (already normalized) is a valid room name."""
    return _ROOM_RE.fullmatch(room) is not None


def is_peer_id(value: str) -> bool:
    return _PEER_ID_RE.fullmatch(value) is not None


def encode(message: dict[str, Any]) -> str:
    """Serialize an outbound message compactly."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


# --- inbound -------------------------------------------------------------------------------


def _reject_constant(value: str) -> Any:
    raise ValueError(f"{value} is not JSON")


def parse(data: str | bytes) -> ClientMessage:
    """Validate one frame and return the message it carries.

    ``bytes`` stands for a binary frame, which the protocol does not use.
    """
    if isinstance(data, bytes):
        if len(data) > MAX_MESSAGE_BYTES:
            raise MessageError(ErrorCode.TOO_LARGE, _too_large(len(data)))
        raise MessageError(ErrorCode.BAD_MESSAGE, "binary frames are not accepted; send JSON text")
    # A str has at most as many characters as its UTF-8 encoding has bytes, so the cheap test
    # first; the exact byte count only for frames that may be near the limit.
    if len(data) > MAX_MESSAGE_BYTES or len(data) * 4 > MAX_MESSAGE_BYTES:
        size = len(data.encode("utf-8", "replace"))
        if size > MAX_MESSAGE_BYTES:
            raise MessageError(ErrorCode.TOO_LARGE, _too_large(size))
    try:
        obj = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise MessageError(ErrorCode.BAD_JSON, f"not valid JSON: {_short(str(exc))}") from None
    if not isinstance(obj, dict):
        raise MessageError(ErrorCode.BAD_MESSAGE, "a message must be a JSON object")
    kind = obj.get("type")
    if kind is None:
        raise MessageError(ErrorCode.MISSING_FIELD, "missing field 'type'", field="type")
    if not isinstance(kind, str):
        raise MessageError(ErrorCode.BAD_FIELD, "field 'type' must be a string", field="type")
    parser = _PARSERS.get(kind)
    if parser is None:
        raise MessageError(
            ErrorCode.UNKNOWN_TYPE,
            f"unknown message type {_short(kind)!r}; expected one of {', '.join(CLIENT_TYPES)}",
            ref=kind if len(kind) <= 32 else None,
        )
    return parser(_Fields(obj, kind))


def _too_large(size: int) -> str:
    return f"message of {size} bytes exceeds the limit of {MAX_MESSAGE_BYTES} bytes"


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Fields:
    """Typed access to the fields of one message, raising MessageError with the field name."""

    __slots__ = ("obj", "kind")

    def __init__(self, obj: dict[str, Any], kind: str) -> None:
        self.obj = obj
        self.kind = kind

    def _missing(self, key: str) -> MessageError:
        return MessageError(
            ErrorCode.MISSING_FIELD, f"{self.kind}: missing field {key!r}", ref=self.kind, field=key
        )

    def bad(self, key: str, what: str) -> MessageError:
        return MessageError(
            ErrorCode.BAD_FIELD, f"{self.kind}: field {key!r} {what}", ref=self.kind, field=key
        )

    def string(self, key: str, *, limit: int, required: bool = True) -> str | None:
        value = self.obj.get(key)
        if value is None:
            if required:
                raise self._missing(key)
            return None
        if not isinstance(value, str):
            raise self.bad(key, "must be a string")
        if len(value) > limit:
            raise self.bad(key, f"is longer than {limit} characters")
        return value

    def required_string(self, key: str, *, limit: int) -> str:
        value = self.string(key, limit=limit)
        assert value is not None
        return value

    def peer_id(self, key: str, *, required: bool = True) -> str | None:
        value = self.string(key, limit=32, required=required)
        if value is not None and _PEER_ID_RE.fullmatch(value) is None:
            raise self.bad(key, "is not a peer id")
        return value

    def room(self, *, required: bool) -> str | None:
        value = self.string("room", limit=64, required=required)
        if value is None:
            return None
        room = normalize_room(value)
        if not is_valid_room(room):
            raise self.bad("room", "must be 1-48 letters, digits, '-' or '_'")
        return room


def _parse_join(f: _Fields) -> Join:
    version = f.obj.get("v")
    if version is None:
        raise f.bad("v", "is missing; the protocol version (1) is required in join")
    if not isinstance(version, int) or isinstance(version, bool):
        raise f.bad("v", "must be an integer")
    if version not in SUPPORTED_VERSIONS:
        raise MessageError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {version} is not supported; this server speaks "
            f"{', '.join(str(v) for v in sorted(SUPPORTED_VERSIONS))}",
            ref="join",
            field="v",
        )
    room = f.room(required=True)
    assert room is not None
    name = " ".join(f.required_string("name", limit=MAX_NAME_CHARS * 4).split())
    if not name:
        raise f.bad("name", "must not be empty")
    if len(name) > MAX_NAME_CHARS:
        raise f.bad("name", f"is longer than {MAX_NAME_CHARS} characters")
    if _CONTROL_RE.search(name):
        raise f.bad("name", "must not contain control characters")
    password = f.string("password", limit=MAX_PASSWORD_CHARS, required=False)
    join_token = f.string("token", limit=MAX_JOIN_TOKEN_CHARS, required=False)
    check = f.obj.get("check", False)
    if not isinstance(check, bool):
        raise f.bad("check", "must be true or false")
    resume = None
    raw_resume = f.obj.get("resume")
    if raw_resume is not None:
        if not isinstance(raw_resume, dict):
            raise f.bad("resume", "must be an object {id, token, seq}")
        sub = _Fields(raw_resume, "join")
        peer_id = sub.peer_id("id")
        token = sub.string("token", limit=MAX_TOKEN_CHARS)
        assert peer_id is not None and token is not None
        seq = raw_resume.get("seq")
        if seq is not None and (
            not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 2**53
        ):
            raise f.bad("resume", "seq must be a whole number of at least 0")
        resume = Resume(peer_id, token, seq)
    return Join(
        room=room,
        name=name,
        version=version,
        password=password or None,
        resume=resume,
        token=join_token or None,
        check=check,
    )


def _parse_sdp(f: _Fields) -> tuple[str, str, str | None]:
    to = f.peer_id("to")
    sdp = f.string("sdp", limit=MAX_MESSAGE_BYTES)
    assert to is not None and sdp is not None
    if not sdp.strip():
        raise f.bad("sdp", "must not be empty")
    return to, sdp, f.room(required=False)


def _parse_offer(f: _Fields) -> Offer:
    return Offer(*_parse_sdp(f))


def _parse_answer(f: _Fields) -> Answer:
    return Answer(*_parse_sdp(f))


def _optional_int(f: _Fields, key: str) -> int | None:
    value = f.obj.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1023:
        raise f.bad(key, "must be an integer 0-1023 or null")
    return value


def _parse_candidate(f: _Fields) -> Candidate:
    to = f.peer_id("to")
    assert to is not None
    room = f.room(required=False)
    if "candidate" not in f.obj:
        raise f._missing("candidate")
    raw = f.obj["candidate"]
    if raw is None:
        return Candidate(to=to, candidate=None, room=room)
    if not isinstance(raw, dict):
        raise f.bad("candidate", "must be an RTCIceCandidateInit object or null")
    sub = _Fields(raw, "candidate")
    text = sub.string("candidate", limit=MAX_CANDIDATE_CHARS, required=False)
    if text is None:
        raise f.bad("candidate", "needs a 'candidate' string (empty for end-of-candidates)")
    if _CONTROL_RE.search(text):
        raise f.bad("candidate", "must not contain control characters")
    mid = sub.string("sdpMid", limit=MAX_MID_CHARS, required=False)
    index = _optional_int(sub, "sdpMLineIndex")
    if text and mid is None and index is None:
        raise f.bad("candidate", "needs sdpMid or sdpMLineIndex")
    ufrag = sub.string("usernameFragment", limit=256, required=False)
    return Candidate(to=to, candidate=IceCandidate(text, mid, index, ufrag), room=room)


def _parse_chat(f: _Fields) -> Chat:
    text = f.required_string("text", limit=MAX_CHAT_CHARS).strip()
    if not text:
        raise f.bad("text", "must not be empty")
    if _CHAT_CONTROL_RE.search(text):
        raise f.bad("text", "must not contain control characters")
    return Chat(text=text, to=f.peer_id("to", required=False), room=f.room(required=False))


def _parse_leave(f: _Fields) -> Leave:
    return Leave(room=f.room(required=False))


def _parse_ping(f: _Fields) -> Ping:
    return Ping(room=f.room(required=False))


_PARSERS: Final[dict[str, Callable[[_Fields], ClientMessage]]] = {
    "join": _parse_join,
    "offer": _parse_offer,
    "answer": _parse_answer,
    "candidate": _parse_candidate,
    "chat": _parse_chat,
    "leave": _parse_leave,
    "ping": _parse_ping,
}


# --- outbound ------------------------------------------------------------------------------


def peer_info(peer_id: str, name: str) -> dict[str, Any]:
    return {"id": peer_id, "name": name}


def joined(
    *,
    room: str,
    peer_id: str,
    token: str,
    name: str,
    peers: list[dict[str, Any]],
    capacity: int,
    resumed: bool,
    extras: dict[str, Any],
) -> dict[str, Any]:
    """The answer to a successful ``join``; ``extras`` carries the ICE configuration."""
    message: dict[str, Any] = {
        "type": "joined",
        "v": PROTOCOL_VERSION,
        "room": room,
        "id": peer_id,
        "token": token,
        "name": name,
        "peers": peers,
        "capacity": capacity,
        "resumed": resumed,
    }
    for key, value in extras.items():
        message.setdefault(key, value)
    return message


def peer_joined(peer_id: str, name: str) -> dict[str, Any]:
    return {"type": "peer-joined", "id": peer_id, "name": name}


def peer_left(peer_id: str, reason: str) -> dict[str, Any]:
    return {"type": "peer-left", "id": peer_id, "reason": reason}


def relay(message: Offer | Answer | Candidate, sender: str) -> dict[str, Any]:
    """The copy of an offer, answer or candidate that goes to the peer it names."""
    if isinstance(message, Candidate):
        candidate = None if message.candidate is None else message.candidate.to_json()
        return {"type": "candidate", "from": sender, "candidate": candidate}
    kind = "offer" if isinstance(message, Offer) else "answer"
    return {"type": kind, "from": sender, "sdp": message.sdp}


def chat(sender: str, name: str, text: str, ts: float, *, private: bool) -> dict[str, Any]:
    message: dict[str, Any] = {
        "type": "chat",
        "from": sender,
        "name": name,
        "text": text,
        "ts": int(ts * 1000),
    }
    if private:
        message["private"] = True
    return message


def _candidate_fields(text: str) -> tuple[str | None, str | None]:
    """The connection address and the ``typ`` of an ICE candidate line, as in SDP
    (``a=candidate:...``) or trickled (``candidate:...``): ``foundation component transport
    priority address port typ type ...`` (RFC 8839 §5.1); None for what is not there."""
    tokens = text.split()
    address = (
        tokens[4]
        if len(tokens) > 5 and tokens[0].startswith(("candidate:", "a=candidate:"))
        else None
    )
    kind = None
    for index, token in enumerate(tokens[:-1]):
        if token == "typ":
            kind = tokens[index + 1]
            break
    return address, kind


def candidate_type(text: str) -> str | None:
    """The ``typ`` of an ICE candidate line (``host``, ``srflx``, ``prflx``, ``relay``)."""
    return _candidate_fields(text)[1]


def candidate_address(text: str) -> str | None:
    """The connection address of an ICE candidate line: an IP address, or a name (an mDNS
    ``.local`` name, a host name) that only the browser can resolve."""
    return _candidate_fields(text)[0]


def keep_candidates(
    message: Offer | Answer | Candidate, keep: Callable[[str], bool]
) -> Offer | Answer | Candidate | None:
    """``message`` with every ICE candidate ``keep`` refuses taken out, from SDP
    (``a=candidate:`` lines) or trickled (None: nothing left to forward). ``keep`` gets the
    candidate line; end-of-candidates markers always pass."""
    if isinstance(message, Candidate):
        ice = message.candidate
        if ice is None or not ice.candidate or keep(ice.candidate):
            return message
        return None
    lines = message.sdp.splitlines(keepends=True)
    kept = [line for line in lines if not line.startswith("a=candidate:") or keep(line)]
    return replace(message, sdp="".join(kept))


def relay_only(message: Offer | Answer | Candidate) -> Offer | Answer | Candidate | None:
    """``message`` with every ICE candidate but relayed ones taken out (None: nothing left
    to forward). A peer then has no address of the other to try but the relay's."""
    return keep_candidates(message, lambda line: candidate_type(line) == "relay")


def checked(room: str, extras: dict[str, Any]) -> dict[str, Any]:
    """The answer to a ``join`` with ``check``: what a member would get, without a seat."""
    return {"type": "checked", "v": PROTOCOL_VERSION, "room": room, **extras}


def ice(extras: dict[str, Any]) -> dict[str, Any]:
    """Fresh ICE servers (TURN credentials) for a peer whose previous ones will soon expire."""
    return {"type": "ice", **extras}


def pong() -> dict[str, Any]:
    return {"type": "pong"}


def error(
    code: ErrorCode, message: str, *, ref: str | None = None, field: str | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "error", "code": str(code), "message": message}
    if ref is not None:
        out["ref"] = ref
    if field is not None:
        out["field"] = field
    return out
