"""Validation of every inbound signaling message, with plain function calls."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tsunagu.signaling import messages as m
from tsunagu.signaling.messages import ErrorCode, MessageError


def dump(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def refused(data: str | bytes) -> MessageError:
    with pytest.raises(MessageError) as info:
        m.parse(data)
    return info.value


def test_join_minimal() -> None:
    msg = m.parse(dump({"type": "join", "v": 1, "room": "Team-Sync", "name": "  Ada   L. "}))
    assert msg == m.Join(room="team-sync", name="Ada L.", version=1)


def test_join_with_password_and_resume() -> None:
    msg = m.parse(
        dump(
            {
                "type": "join",
                "v": 1,
                "room": "r1",
                "name": "Bo",
                "password": "pw",
                "resume": {"id": "abc_DEF-1", "token": "t" * 32},
            }
        )
    )
    assert msg == m.Join("r1", "Bo", 1, "pw", m.Resume("abc_DEF-1", "t" * 32))


def test_empty_password_means_none() -> None:
    msg = m.parse(dump({"type": "join", "v": 1, "room": "r1", "name": "Bo", "password": ""}))
    assert isinstance(msg, m.Join) and msg.password is None


@pytest.mark.parametrize(
    ("obj", "code", "field"),
    [
        ({"type": "join", "room": "r", "name": "a"}, ErrorCode.BAD_FIELD, "v"),
        ({"type": "join", "v": "1", "room": "r", "name": "a"}, ErrorCode.BAD_FIELD, "v"),
        ({"type": "join", "v": True, "room": "r", "name": "a"}, ErrorCode.BAD_FIELD, "v"),
        ({"type": "join", "v": 2, "room": "r", "name": "a"}, ErrorCode.UNSUPPORTED_VERSION, "v"),
        ({"type": "join", "v": 1, "name": "a"}, ErrorCode.MISSING_FIELD, "room"),
        ({"type": "join", "v": 1, "room": "r"}, ErrorCode.MISSING_FIELD, "name"),
        ({"type": "join", "v": 1, "room": "a b", "name": "a"}, ErrorCode.BAD_FIELD, "room"),
        ({"type": "join", "v": 1, "room": "-x", "name": "a"}, ErrorCode.BAD_FIELD, "room"),
        ({"type": "join", "v": 1, "room": "x" * 49, "name": "a"}, ErrorCode.BAD_FIELD, "room"),
        ({"type": "join", "v": 1, "room": "../etc", "name": "a"}, ErrorCode.BAD_FIELD, "room"),
        ({"type": "join", "v": 1, "room": 5, "name": "a"}, ErrorCode.BAD_FIELD, "room"),
        ({"type": "join", "v": 1, "room": "r", "name": "   "}, ErrorCode.BAD_FIELD, "name"),
        ({"type": "join", "v": 1, "room": "r", "name": "x" * 41}, ErrorCode.BAD_FIELD, "name"),
        ({"type": "join", "v": 1, "room": "r", "name": "a\x7fb"}, ErrorCode.BAD_FIELD, "name"),
        ({"type": "join", "v": 1, "room": "r", "name": "a\x00"}, ErrorCode.BAD_FIELD, "name"),
        (
            {"type": "join", "v": 1, "room": "r", "name": "a", "resume": "x"},
            ErrorCode.BAD_FIELD,
            "resume",
        ),
        (
            {"type": "join", "v": 1, "room": "r", "name": "a", "resume": {"id": "x"}},
            ErrorCode.MISSING_FIELD,
            "token",
        ),
        (
            {
                "type": "join",
                "v": 1,
                "room": "r",
                "name": "a",
                "resume": {"id": "a/b", "token": "t"},
            },
            ErrorCode.BAD_FIELD,
            "id",
        ),
        (
            {"type": "join", "v": 1, "room": "r", "name": "a", "password": 1},
            ErrorCode.BAD_FIELD,
            "password",
        ),
        ({"type": "offer", "sdp": "v=0"}, ErrorCode.MISSING_FIELD, "to"),
        ({"type": "offer", "to": "p1"}, ErrorCode.MISSING_FIELD, "sdp"),
        ({"type": "answer", "to": "p1", "sdp": "  "}, ErrorCode.BAD_FIELD, "sdp"),
        ({"type": "answer", "to": "p1", "sdp": ["v=0"]}, ErrorCode.BAD_FIELD, "sdp"),
        ({"type": "offer", "to": "x" * 33, "sdp": "v=0"}, ErrorCode.BAD_FIELD, "to"),
        ({"type": "offer", "to": "p 1", "sdp": "v=0"}, ErrorCode.BAD_FIELD, "to"),
        ({"type": "candidate", "to": "p1"}, ErrorCode.MISSING_FIELD, "candidate"),
        ({"type": "candidate", "to": "p1", "candidate": "x"}, ErrorCode.BAD_FIELD, "candidate"),
        ({"type": "candidate", "to": "p1", "candidate": {}}, ErrorCode.BAD_FIELD, "candidate"),
        (
            {"type": "candidate", "to": "p1", "candidate": {"candidate": "candidate:1"}},
            ErrorCode.BAD_FIELD,
            "candidate",
        ),
        (
            {"type": "candidate", "to": "p1", "candidate": {"candidate": "c", "sdpMLineIndex": -1}},
            ErrorCode.BAD_FIELD,
            "sdpMLineIndex",
        ),
        (
            {
                "type": "candidate",
                "to": "p1",
                "candidate": {"candidate": "c", "sdpMLineIndex": True},
            },
            ErrorCode.BAD_FIELD,
            "sdpMLineIndex",
        ),
        (
            {
                "type": "candidate",
                "to": "p1",
                "candidate": {"candidate": "x" * 1025, "sdpMid": "0"},
            },
            ErrorCode.BAD_FIELD,
            "candidate",
        ),
        ({"type": "chat"}, ErrorCode.MISSING_FIELD, "text"),
        ({"type": "chat", "text": " \n "}, ErrorCode.BAD_FIELD, "text"),
        ({"type": "chat", "text": "x" * 2001}, ErrorCode.BAD_FIELD, "text"),
        ({"type": "chat", "text": "bell\x07"}, ErrorCode.BAD_FIELD, "text"),
        ({"type": "chat", "text": "hi", "to": 3}, ErrorCode.BAD_FIELD, "to"),
        ({"type": "leave", "room": "UPPER ok?"}, ErrorCode.BAD_FIELD, "room"),
    ],
)
def test_field_errors(obj: dict[str, Any], code: ErrorCode, field: str) -> None:
    err = refused(dump(obj))
    assert err.code == code, err.message
    assert err.field == field
    assert field in err.message
    assert "\n" not in err.message


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ("", ErrorCode.BAD_JSON),
        ("{", ErrorCode.BAD_JSON),
        ('{"type": NaN}', ErrorCode.BAD_JSON),
        ('{"type": "ping", "x": Infinity}', ErrorCode.BAD_JSON),
        ("[1, 2]", ErrorCode.BAD_MESSAGE),
        ('"join"', ErrorCode.BAD_MESSAGE),
        ("null", ErrorCode.BAD_MESSAGE),
        ("{}", ErrorCode.MISSING_FIELD),
        ('{"type": 7}', ErrorCode.BAD_FIELD),
        ('{"type": "explode"}', ErrorCode.UNKNOWN_TYPE),
        ('{"type": "Join"}', ErrorCode.UNKNOWN_TYPE),
        ('{"type": "joined"}', ErrorCode.UNKNOWN_TYPE),
        (b'{"type": "ping"}', ErrorCode.BAD_MESSAGE),
    ],
)
def test_envelope_errors(data: str | bytes, code: ErrorCode) -> None:
    assert refused(data).code == code


def test_unknown_type_names_the_type_and_the_allowed_ones() -> None:
    err = refused(dump({"type": "explode"}))
    assert "'explode'" in err.message and "join" in err.message
    assert err.ref == "explode"
    long = refused(dump({"type": "x" * 500}))
    assert long.ref is None and len(long.message) < 200


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    err = refused('{"type": "ping", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert err.code in (ErrorCode.TOO_LARGE, ErrorCode.BAD_JSON)
    err = refused("[" * 10_000 + "]" * 10_000)
    assert err.code in (ErrorCode.BAD_JSON, ErrorCode.BAD_MESSAGE)


def test_size_limit_counts_utf8_bytes() -> None:
    limit = m.MAX_MESSAGE_BYTES
    base = dump({"type": "offer", "to": "p1", "sdp": ""})
    room = limit - len(base)
    exactly = dump({"type": "offer", "to": "p1", "sdp": "v" * room})
    assert len(exactly.encode()) == limit
    assert isinstance(m.parse(exactly), m.Offer)
    # Same number of characters, but one of them takes three bytes in UTF-8.
    over = dump({"type": "offer", "to": "p1", "sdp": "v" * (room - 1) + "\u3042"})
    assert len(over) == limit
    err = refused(over)
    assert err.code == ErrorCode.TOO_LARGE and str(limit) in err.message
    assert refused(b"x" * (limit + 1)).code == ErrorCode.TOO_LARGE


def test_candidate_forms() -> None:
    init = {
        "candidate": "candidate:1 1 udp 2122260223 192.0.2.1 5000 typ host",
        "sdpMid": "0",
        "sdpMLineIndex": 0,
        "usernameFragment": "abcd",
    }
    msg = m.parse(dump({"type": "candidate", "to": "p1", "candidate": init}))
    assert isinstance(msg, m.Candidate) and msg.candidate is not None
    assert msg.candidate.to_json() == init
    end = m.parse(dump({"type": "candidate", "to": "p1", "candidate": None}))
    assert end == m.Candidate("p1", None)
    generation_end = m.parse(
        dump({"type": "candidate", "to": "p1", "candidate": {"candidate": "", "sdpMid": None}})
    )
    assert isinstance(generation_end, m.Candidate)
    assert generation_end.candidate == m.IceCandidate("", None, None, None)


def test_unknown_extra_fields_are_ignored_and_never_forwarded() -> None:
    msg = m.parse(dump({"type": "offer", "to": "p1", "sdp": "v=0", "from": "spoof", "x": 1}))
    assert isinstance(msg, m.Offer)
    out = m.relay(msg, "real")
    assert out == {"type": "offer", "from": "real", "sdp": "v=0"}


def test_optional_room_is_normalized() -> None:
    assert m.parse(dump({"type": "ping", "room": "ABC"})) == m.Ping(room="abc")
    assert m.parse(dump({"type": "chat", "text": " hi ", "to": "p2"})) == m.Chat("hi", "p2")


def test_every_type_is_documented() -> None:
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "SIGNALING.md").read_text()
    for kind in (*m.CLIENT_TYPES, *m.SERVER_TYPES):
        assert f"`{kind}`" in doc, kind
    for code in ErrorCode:
        assert f"`{code}`" in doc, code


# --- ICE candidate lines: one parser for the relay-only and the internal-network filters -------


@pytest.mark.parametrize(
    ("line", "address", "kind"),
    [
        ("candidate:1 1 udp 2122260223 10.80.0.2 53001 typ host generation 0", "10.80.0.2", "host"),
        ("a=candidate:1 1 udp 2122260223 10.80.0.2 53001 typ host\r\n", "10.80.0.2", "host"),
        (
            "candidate:2 1 udp 1686052607 203.0.113.9 53001 typ srflx raddr 10.80.0.2 rport 1",
            "203.0.113.9",
            "srflx",
        ),
        ("candidate:3 1 tcp 1518280447 fd00:80::2 9 typ host tcptype active", "fd00:80::2", "host"),
        ("candidate:4 1 udp 2122260223 3f1c-4b7e.local 53001 typ host", "3f1c-4b7e.local", "host"),
        ("candidate:5 1 udp 41885439 10.80.0.4 50000 typ relay", "10.80.0.4", "relay"),
        ("candidate:6 1 udp 1 10.80.0.2", None, None),  # cut short: no port
        ("", None, None),
        ("typ", None, None),
        ("not a candidate at all 10.80.0.2 1 typ host", None, "host"),
    ],
)
def test_candidate_fields(line: str, address: str | None, kind: str | None) -> None:
    assert m.candidate_address(line) == address
    assert m.candidate_type(line) == kind


def test_keep_candidates_filters_sdp_and_trickled_alike() -> None:
    keep = "a=candidate:1 1 udp 2122260223 10.80.0.2 53001 typ host\r\n"
    drop = "a=candidate:2 1 udp 1686052607 203.0.113.9 53001 typ srflx\r\n"
    sdp = f"v=0\r\na=mid:0\r\n{keep}{drop}a=end-of-candidates\r\n"
    offer = m.Offer(to="x", sdp=sdp)
    kept = m.keep_candidates(offer, lambda line: "10.80.0.2" in line)
    assert isinstance(kept, m.Offer)
    assert kept.sdp == f"v=0\r\na=mid:0\r\n{keep}a=end-of-candidates\r\n"

    def trickled(text: str) -> m.Candidate:
        return m.Candidate(to="x", candidate=m.IceCandidate(text, "0", None, None))

    assert m.keep_candidates(trickled(keep[2:].strip()), lambda line: False) is None
    assert m.keep_candidates(trickled(""), lambda line: False) is not None  # end of generation
    assert m.keep_candidates(m.Candidate(to="x", candidate=None), lambda line: False) is not None
