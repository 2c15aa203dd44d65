"""Room logic, routing and abuse handling of the Hub, driven with plain function calls."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from typing import Any

import pytest

from tsunagu.signaling.access import Access, TokenBucket
from tsunagu.signaling.rooms import Action, Close, Hub, Limits, Send


def make_hub(**limits: Any) -> Hub:
    counter = itertools.count(1)
    return Hub(Limits(**limits), new_token=lambda n: f"t{next(counter)}")


def sends(
    actions: list[Action], conn: int | None = None, *, seq: bool = False
) -> list[dict[str, Any]]:
    """The messages sent (to ``conn``), without their ``seq`` unless asked for."""
    found = [a.message for a in actions if isinstance(a, Send) and (conn is None or a.conn == conn)]
    return found if seq else [{k: v for k, v in x.items() if k != "seq"} for x in found]


def closes(actions: list[Action]) -> list[Close]:
    return [a for a in actions if isinstance(a, Close)]


def join(
    hub: Hub, conn: int, room: str = "alpha", name: str = "", now: float = 0.0, **extra: Any
) -> list[Action]:
    hub.connect(conn, now, {"iceServers": [], "extra": conn})
    msg = {"type": "join", "v": 1, "room": room, "name": name or f"user{conn}", **extra}
    return hub.receive(conn, json.dumps(msg), now)


def send(hub: Hub, conn: int, now: float = 0.0, **msg: Any) -> list[Action]:
    return hub.receive(conn, json.dumps(msg), now)


def joined_id(actions: list[Action], conn: int) -> str:
    (msg,) = [x for x in sends(actions, conn) if x["type"] == "joined"]
    return str(msg["id"])


def test_first_join_creates_room_and_second_sees_first() -> None:
    hub = make_hub()
    a = join(hub, 1, name="Ada")
    (joined,) = sends(a, 1)
    assert joined["type"] == "joined" and joined["v"] == 1
    assert joined["room"] == "alpha" and joined["peers"] == [] and joined["resumed"] is False
    assert joined["extra"] == 1 and joined["iceServers"] == [] and joined["capacity"] == 8
    ada = joined["id"]
    b = join(hub, 2, name="Bo")
    bo = joined_id(b, 2)
    assert sends(b, 2)[0]["peers"] == [{"id": ada, "name": "Ada"}]
    assert sends(b, 1) == [{"type": "peer-joined", "id": bo, "name": "Bo"}]
    assert hub.room_peers("alpha") == [(ada, "Ada"), (bo, "Bo")]


def test_offer_answer_candidate_go_only_to_the_named_peer() -> None:
    hub = make_hub()
    ids = [joined_id(join(hub, c), c) for c in (1, 2, 3)]
    out = send(hub, 1, type="offer", to=ids[1], sdp="v=0 offer")
    # Every message delivered to a peer carries its own count: 2 had peer-joined (3) first.
    assert out == [Send(2, {"type": "offer", "from": ids[0], "sdp": "v=0 offer", "seq": 2})]
    out = send(hub, 2, type="answer", to=ids[0], sdp="v=0 answer")
    assert out == [Send(1, {"type": "answer", "from": ids[1], "sdp": "v=0 answer", "seq": 3})]
    cand = {"candidate": "candidate:1 1 udp 1 192.0.2.1 9 typ host", "sdpMid": "0"}
    out = send(hub, 3, type="candidate", to=ids[0], candidate=cand)
    assert [a.conn for a in out if isinstance(a, Send)] == [1]
    assert sends(out)[0]["candidate"]["sdpMid"] == "0"
    assert sends(out)[0]["candidate"]["sdpMLineIndex"] is None
    out = send(hub, 3, type="candidate", to=ids[0], candidate=None)
    assert out == [Send(1, {"type": "candidate", "from": ids[2], "candidate": None, "seq": 5})]


def test_cross_room_target_is_refused_and_reveals_nothing() -> None:
    hub = make_hub()
    a = joined_id(join(hub, 1, room="alpha"), 1)
    join(hub, 2, room="beta")
    # conn 2 (room beta) names a peer of room alpha.
    out = send(hub, 2, type="offer", to=a, sdp="v=0")
    assert [x.conn for x in out] == [2]
    (err,) = sends(out)
    assert err["type"] == "error" and err["code"] == "unknown-peer" and err["field"] == "to"
    nowhere = sends(send(hub, 2, type="offer", to="nosuchpeer", sdp="v=0"))[0]
    assert nowhere["message"].replace("nosuchpeer", a) == err["message"]
    # A room field naming another room is refused too.
    out = send(hub, 2, type="chat", text="hi", room="alpha")
    assert [x.conn for x in out] == [2] and sends(out)[0]["code"] == "wrong-room"


def test_sending_to_self_is_refused() -> None:
    hub = make_hub()
    me = joined_id(join(hub, 1), 1)
    assert sends(send(hub, 1, type="offer", to=me, sdp="v=0"))[0]["code"] == "unknown-peer"


def test_messages_before_join_are_refused() -> None:
    hub = make_hub()
    hub.connect(1, 0.0)
    (err,) = sends(send(hub, 1, type="offer", to="abc", sdp="v=0"))
    assert err["code"] == "not-joined" and err["ref"] == "offer"
    assert sends(send(hub, 1, type="ping")) == [{"type": "pong"}]


def test_join_twice_is_refused() -> None:
    hub = make_hub()
    join(hub, 1)
    err = sends(send(hub, 1, type="join", v=1, room="beta", name="x"))[0]
    assert err["code"] == "already-joined"
    assert hub.room_names() == ["alpha"]


def test_capacity() -> None:
    hub = make_hub(capacity=2)
    join(hub, 1)
    join(hub, 2)
    out = join(hub, 3)
    assert sends(out, 3)[0]["code"] == "room-full"
    assert [x.conn for x in out] == [3]
    assert len(hub.room_peers("alpha")) == 2
    # Another room is not affected by this one being full.
    assert sends(join(hub, 4, room="beta"), 4)[0]["type"] == "joined"


def test_password() -> None:
    hub = make_hub()
    join(hub, 1, password="s3cret")
    assert sends(join(hub, 2), 2)[0]["code"] == "password-required"
    assert sends(join(hub, 3, password="nope"), 3)[0]["code"] == "bad-password"
    assert sends(join(hub, 4, password="s3cret"), 4)[0]["type"] == "joined"
    # The password belongs to the room's life: once empty and gone, the name is free again.
    for conn in (1, 4):
        hub.disconnect(conn, 1.0, graceful=True)
    assert hub.room_names() == []
    assert sends(join(hub, 5), 5)[0]["type"] == "joined"


def test_room_disappears_when_empty_and_leave_is_announced() -> None:
    hub = make_hub()
    a = joined_id(join(hub, 1), 1)
    join(hub, 2)
    out = send(hub, 1, type="leave")
    assert Send(2, {"type": "peer-left", "id": a, "reason": "left", "seq": 1}) in out
    assert Close(1, 1000, "left") in out
    assert [p for p, _ in hub.room_peers("alpha")] != [a]
    assert hub.disconnect(1, 0.0, graceful=False) == []
    assert hub.disconnect(2, 0.0, graceful=True) == []
    assert hub.room_names() == []


def test_chat_reaches_the_room_only() -> None:
    hub = make_hub()
    a = joined_id(join(hub, 1, name="Ada"), 1)
    b = joined_id(join(hub, 2), 2)
    join(hub, 3, room="beta")
    out = send(hub, 1, now=12.5, type="chat", text="hello")
    assert sorted(x.conn for x in out) == [1, 2]
    assert sends(out, 2)[0] == {
        "type": "chat",
        "from": a,
        "name": "Ada",
        "text": "hello",
        "ts": 12500,
    }
    private = send(hub, 1, type="chat", text="psst", to=b)
    assert sorted(x.conn for x in private) == [1, 2]
    assert sends(private, 2)[0]["private"] is True


def test_flood_is_rate_limited_then_closed_with_1008() -> None:
    hub = make_hub(rate=10.0, burst=20.0)
    join(hub, 1)
    b = joined_id(join(hub, 2), 2)
    delivered = 0
    errors: list[dict[str, Any]] = []
    closed: list[Close] = []
    for _ in range(100):
        out = send(hub, 1, now=0.5, type="candidate", to=b, candidate=None)
        delivered += len([x for x in sends(out, 2) if x["type"] == "candidate"])
        errors += [x for x in sends(out, 1) if x["type"] == "error"]
        closed += closes(out)
        if closed:
            break
    # The bucket started full (20), the join took one, and by t=0.5 it had refilled to the
    # brim (capped at the burst size): exactly 20 candidates get through.
    assert delivered == 20
    assert errors and {e["code"] for e in errors} == {"rate-limited"}
    assert closed == [Close(1, 1008, "policy violation: rate-limited")]
    assert len(errors) == 10
    # The flooder is gone from the room and the other peer was told.
    assert [name for _, name in hub.room_peers("alpha")] == ["user2"]
    assert send(hub, 1, now=9.0, type="ping") == []


def test_chat_has_its_own_tighter_limit() -> None:
    hub = make_hub(chat_rate=1.0, chat_burst=3.0)
    join(hub, 1)
    join(hub, 2)
    codes = []
    for _ in range(5):
        out = send(hub, 1, now=1.0, type="chat", text="spam")
        codes.append("error" if sends(out, 1)[0]["type"] == "error" else "ok")
    assert codes == ["ok", "ok", "ok", "error", "error"]


def test_garbage_gets_errors_then_1008_and_other_rooms_are_untouched() -> None:
    hub = make_hub()
    join(hub, 1, room="alpha")
    join(hub, 2, room="alpha")
    join(hub, 9, room="beta")
    seen_by_others: list[Action] = []
    frames: list[str | bytes] = [
        "not json",
        '{"type": "explode"}',
        "{}",
        '{"type": "offer", "to": "x"}',
        b"\x00\x01",
        "x" * (70 * 1024),
        '{"type": "offer", "to": "nobody", "sdp": "v=0"}',
    ]
    for i, frame in enumerate(frames * 3):
        out = hub.receive(1, frame, float(i) * 0.01)
        seen_by_others += [x for x in out if x.conn != 1]
        if closes(out):
            break
    assert closes(out) == [Close(1, 1008, closes(out)[0].reason)]
    assert closes(out)[0].reason.startswith("policy violation")
    # The only thing anybody else ever heard: that the misbehaving peer left its room.
    assert [x.conn for x in seen_by_others] == [2]
    assert sends(seen_by_others)[0]["type"] == "peer-left"
    assert hub.room_peers("beta") == [(hub.peer_of(9), "user9")]


def test_misbehaviour_is_forgiven_over_time() -> None:
    hub = make_hub(strike_limit=3.0, strike_decay=1.0)
    join(hub, 1)
    for i in range(10):
        out = hub.receive(1, "junk", float(i) * 2)
        assert not closes(out)
    assert closes(hub.receive(1, "junk", 20.0)) == []
    # Score 1 now; two more at once reach the limit of 3; the connection is then gone.
    closes_at_once = [closes(hub.receive(1, "junk", 20.0)) for _ in range(3)]
    assert closes_at_once == [[], [Close(1, 1008, "policy violation: bad-json")], []]


def test_unknown_peer_races_are_tolerated() -> None:
    hub = make_hub()
    join(hub, 1)
    b = joined_id(join(hub, 2), 2)
    hub.disconnect(2, 0.0, graceful=True)
    # Trickled candidates still in flight to a peer that just left are not abuse.
    for _ in range(20):
        out = send(hub, 1, type="candidate", to=b, candidate=None)
        assert not closes(out)
        assert sends(out)[0]["code"] == "unknown-peer"


def test_vanished_peer_is_announced_after_grace() -> None:
    hub = make_hub(resume_grace=4.0)
    join(hub, 1)
    b = joined_id(join(hub, 2), 2)
    assert hub.disconnect(2, 10.0, graceful=False) == []
    assert hub.is_away(b)
    assert hub.tick(13.9) == []
    assert hub.tick(14.0) == [
        Send(1, {"type": "peer-left", "id": b, "reason": "timeout", "seq": 2})
    ]
    assert hub.room_peers("alpha") == [(hub.peer_of(1), "user1")]


def test_resume_keeps_identity_and_delivers_what_was_missed() -> None:
    hub = make_hub(resume_grace=5.0)
    a = joined_id(join(hub, 1), 1)
    first = join(hub, 2, name="Bo")
    bo = sends(first, 2)[0]
    hub.disconnect(2, 1.0, graceful=False)
    # While Bo is away, Ada's ICE restart offer and a newcomer are queued for Bo.
    assert send(hub, 1, now=2.0, type="offer", to=bo["id"], sdp="v=0 restart") == []
    c = joined_id(join(hub, 3, now=2.5), 3)
    hub.connect(4, 3.0, {"iceServers": ["fresh"]})
    out = send(
        hub,
        4,
        now=3.0,
        type="join",
        v=1,
        room="alpha",
        name="Bo",
        resume={"id": bo["id"], "token": bo["token"]},
    )
    msgs = sends(out, 4)
    assert msgs[0]["type"] == "joined" and msgs[0]["resumed"] is True
    assert msgs[0]["id"] == bo["id"] and msgs[0]["iceServers"] == ["fresh"]
    assert {p["id"] for p in msgs[0]["peers"]} == {a, c}
    assert msgs[1] == {"type": "offer", "from": a, "sdp": "v=0 restart"}
    assert msgs[2] == {"type": "peer-joined", "id": c, "name": "user3"}
    assert [x.conn for x in out] == [4, 4, 4]  # the others notice nothing
    assert hub.tick(100.0) == []
    assert not hub.is_away(bo["id"])
    out = send(hub, 1, now=100.0, type="offer", to=bo["id"], sdp="v=0")
    assert [x.conn for x in out] == [4]


def _resume(hub: Hub, conn: int, bo: dict[str, Any], now: float, **seq: Any) -> list[Action]:
    hub.connect(conn, now, {"iceServers": []})
    resume = {"id": bo["id"], "token": bo["token"], **seq}
    return send(hub, conn, now=now, type="join", v=1, room="alpha", name="Bo", resume=resume)


def test_resume_replays_what_the_dropped_connection_may_not_have_read() -> None:
    """Written to a connection just before it dropped is not the same as read: a resume that
    says the last ``seq`` it saw gets everything after it again, then what was kept."""
    hub = make_hub(resume_grace=5.0)
    a = joined_id(join(hub, 1), 1)
    bo = sends(join(hub, 2, name="Bo"), 2)[0]
    cand = {"candidate": "candidate:1 1 udp 1 192.0.2.1 9 typ host", "sdpMid": "0"}
    offer = send(hub, 1, now=1.0, type="offer", to=bo["id"], sdp="v=0 offer")
    trickled = send(hub, 1, now=1.0, type="candidate", to=bo["id"], candidate=cand)
    assert [m["seq"] for m in sends(offer + trickled, 2, seq=True)] == [1, 2]
    # Bo read the offer (seq 1); the candidate was in flight when its connection dropped.
    hub.disconnect(2, 1.1, graceful=False)
    queued = send(hub, 1, now=1.2, type="candidate", to=bo["id"], candidate=None)
    assert queued == []
    msgs = sends(_resume(hub, 3, bo, 2.0, seq=1), 3, seq=True)
    assert [m["type"] for m in msgs] == ["joined", "candidate", "candidate"]
    assert [m.get("seq") for m in msgs] == [None, 2, 3]
    assert msgs[1]["candidate"]["candidate"] == cand["candidate"] and msgs[1]["from"] == a
    assert msgs[2]["candidate"] is None
    # What the new connection was given can be replayed to the next one too.
    hub.disconnect(3, 3.0, graceful=False)
    msgs = sends(_resume(hub, 4, bo, 3.5, seq=2), 4, seq=True)
    assert [m.get("seq") for m in msgs] == [None, 3]


def test_resume_without_seq_gets_only_what_was_kept_while_away() -> None:
    hub = make_hub(resume_grace=5.0)
    joined_id(join(hub, 1), 1)
    bo = sends(join(hub, 2, name="Bo"), 2)[0]
    send(hub, 1, now=1.0, type="offer", to=bo["id"], sdp="v=0 offer")
    hub.disconnect(2, 1.1, graceful=False)
    send(hub, 1, now=1.2, type="offer", to=bo["id"], sdp="v=0 again")
    msgs = sends(_resume(hub, 3, bo, 2.0), 3)
    assert [m.get("sdp") for m in msgs] == [None, "v=0 again"]


def test_replay_is_bounded() -> None:
    hub = make_hub(resume_grace=5.0, replay_messages=3, rate=1e6, burst=1e6)
    joined_id(join(hub, 1), 1)
    bo = sends(join(hub, 2, name="Bo"), 2)[0]
    for n in range(10):
        send(hub, 1, now=1.0, type="offer", to=bo["id"], sdp=f"v=0 {n}")
    hub.disconnect(2, 1.1, graceful=False)
    msgs = sends(_resume(hub, 3, bo, 2.0, seq=0), 3, seq=True)
    assert [m.get("seq") for m in msgs] == [None, 8, 9, 10]
    hub = make_hub(resume_grace=5.0, replay_bytes=300, rate=1e6, burst=1e6)
    joined_id(join(hub, 1), 1)
    bo = sends(join(hub, 2, name="Bo"), 2)[0]
    for _ in range(10):
        send(hub, 1, now=1.0, type="offer", to=bo["id"], sdp="v=0 " + "x" * 100)
    hub.disconnect(2, 1.1, graceful=False)
    replayed = sends(_resume(hub, 3, bo, 2.0, seq=0), 3)[1:]
    assert 1 <= len(replayed) <= 2


@pytest.mark.parametrize("seq", [-1, 1.5, "3", True, 2**53])
def test_resume_seq_must_be_a_count(seq: Any) -> None:
    hub = make_hub()
    joined_id(join(hub, 1), 1)
    bo = sends(join(hub, 2, name="Bo"), 2)[0]
    hub.disconnect(2, 1.0, graceful=False)
    (refused,) = sends(_resume(hub, 3, bo, 2.0, seq=seq), 3)
    assert refused["type"] == "error" and refused["field"] == "resume"


def test_resume_replaces_a_connection_the_server_thinks_alive() -> None:
    hub = make_hub()
    join(hub, 1)
    bo = sends(join(hub, 2), 2)[0]
    hub.connect(3, 1.0)
    out = send(
        hub,
        3,
        now=1.0,
        type="join",
        v=1,
        room="alpha",
        name="x",
        resume={"id": bo["id"], "token": bo["token"]},
    )
    assert Close(2, 1000, "replaced by a new connection") in out
    assert sends(out, 3)[0]["resumed"] is True
    # The old connection ending later does not take the peer with it.
    assert hub.disconnect(2, 2.0, graceful=False) == []
    assert hub.peer_of(3) == bo["id"]


def test_resume_with_wrong_token_or_room_is_a_fresh_join() -> None:
    hub = make_hub()
    join(hub, 1, room="alpha")
    bo = sends(join(hub, 2, room="alpha"), 2)[0]
    hub.connect(3, 1.0)
    out = send(
        hub,
        3,
        now=1.0,
        type="join",
        v=1,
        room="alpha",
        name="x",
        resume={"id": bo["id"], "token": "forged"},
    )
    assert sends(out, 3)[0]["resumed"] is False and sends(out, 3)[0]["id"] != bo["id"]
    hub.connect(4, 1.0)
    out = send(
        hub,
        4,
        now=1.0,
        type="join",
        v=1,
        room="beta",
        name="x",
        resume={"id": bo["id"], "token": bo["token"]},
    )
    assert sends(out, 4)[0]["room"] == "beta" and sends(out, 4)[0]["id"] != bo["id"]
    assert hub.peer_of(2) == bo["id"]


def test_away_peer_outbox_is_bounded() -> None:
    hub = make_hub(outbox_bytes=10_000, rate=1e6, burst=1e6)
    join(hub, 1)
    b = joined_id(join(hub, 2), 2)
    hub.disconnect(2, 0.0, graceful=False)
    out: list[Action] = []
    for _ in range(5):
        out = send(hub, 1, type="offer", to=b, sdp="v" * 3000)
        if out:
            break
    assert sends(out) and sends(out)[0]["type"] in ("peer-left", "error")
    assert not hub.is_away(b)
    assert [p for p, _ in hub.room_peers("alpha")] == [hub.peer_of(1)]


def test_connection_that_never_joins_is_closed() -> None:
    hub = make_hub(join_timeout=10.0)
    hub.connect(1, 0.0)
    join(hub, 2)
    assert hub.tick(9.0) == []
    assert hub.tick(10.0) == [Close(1, 1008, "join timeout")]
    assert hub.tick(11.0) == []


def test_default_join_timeout_is_ten_seconds() -> None:
    hub = make_hub()
    hub.connect(1, 100.0)
    assert hub.tick(109.5) == [], "closed before 10 s"
    assert hub.tick(110.0) == [Close(1, 1008, "join timeout")], "not closed at 10 s"


def test_silent_joined_connection_is_dropped_and_its_seat_may_resume() -> None:
    hub = make_hub(idle_timeout=60.0)
    (first,) = sends(join(hub, 1, name="Ada"), 1)
    ada, token = first["id"], first["token"]
    bo = joined_id(join(hub, 2, name="Bo"), 2)
    # Bo pings now and then; Ada sends nothing at all after joining.
    for now in (20.0, 40.0, 59.0):
        send(hub, 2, now, type="ping")
        assert hub.tick(now) == [], f"something closed at {now} s"
    assert hub.tick(60.0) == [Close(1, 1000, "idle timeout")], "the silent one stays at 60 s"
    assert hub.is_away(ada) and not hub.is_away(bo)
    # Like a lost link: the seat is kept for a resume, and a new connection takes it back.
    hub.connect(3, 61.0)
    resume = {"id": ada, "token": token}
    msg = {"type": "join", "v": 1, "room": "alpha", "name": "Ada", "resume": resume}
    (back,) = sends(hub.receive(3, json.dumps(msg), 61.0), 3)
    assert back["resumed"] is True and back["id"] == ada
    assert hub.disconnect(1, 62.0, graceful=True) == [], "the old connection's end is not a leave"
    assert hub.tick(100.0) == [], "the resumed seat or Bo was closed as idle before 60 s"
    assert hub.room_peers("alpha") == [(ada, "Ada"), (bo, "Bo")]


def test_any_frame_counts_as_a_sign_of_life() -> None:
    hub = make_hub(idle_timeout=60.0)
    join(hub, 1)
    # Refused frames (a bad one here) show the client is there too.
    hub.receive(1, "not json", 50.0)
    assert hub.tick(109.0) == [], "closed less than 60 s after the last frame"
    assert closes(hub.tick(110.0)) == [Close(1, 1000, "idle timeout")]


def test_token_bucket_survives_clock_going_backwards() -> None:
    bucket = TokenBucket(rate=1.0, burst=2.0, now=100.0)
    assert bucket.take(100.0) and bucket.take(100.0)
    assert not bucket.take(50.0)
    assert not bucket.take(100.5)
    assert bucket.take(101.0)


def test_relay_only_forwards_relayed_candidates_only() -> None:
    import secrets

    from tsunagu.signaling.messages import encode

    hub = Hub(Limits(), new_token=secrets.token_urlsafe, relay_only=True)
    ids = []
    for conn, name in ((1, "A"), (2, "B")):
        hub.connect(conn, 0.0)
        out = hub.receive(conn, encode({"type": "join", "v": 1, "room": "r", "name": name}), 0.0)
        ids.append(next(a.message["id"] for a in out if isinstance(a, Send) and a.conn == conn))
    host = "candidate:1 1 udp 2122260223 192.168.1.20 53001 typ host generation 0"
    srflx = "candidate:2 1 udp 1686052607 203.0.113.9 53001 typ srflx raddr 0.0.0.0 rport 0"
    relay = "candidate:3 1 udp 41885439 198.51.100.1 50000 typ relay raddr 203.0.113.9 rport 1"
    sdp = (
        "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=application 9 UDP/DTLS/SCTP x\r\n"
        f"a=mid:0\r\na={host}\r\na={srflx}\r\na={relay}\r\na=end-of-candidates\r\n"
    )

    def delivered(message: dict[str, Any]) -> list[dict[str, Any]]:
        out = hub.receive(1, encode({**message, "to": ids[1]}), 1.0)
        return [a.message for a in out if isinstance(a, Send) and a.conn == 2]

    (offer,) = delivered({"type": "offer", "sdp": sdp})
    assert "typ host" not in offer["sdp"] and "typ srflx" not in offer["sdp"], offer["sdp"]
    assert f"a={relay}\r\n" in offer["sdp"] and "a=end-of-candidates\r\n" in offer["sdp"]
    assert offer["sdp"].startswith("v=0\r\n") and "a=mid:0\r\n" in offer["sdp"]
    for text, forwarded in ((host, False), (srflx, False), (relay, True), ("", True)):
        trickled = delivered({"type": "candidate", "candidate": {"candidate": text, "sdpMid": "0"}})
        assert bool(trickled) is forwarded, (text, trickled)
    assert delivered({"type": "candidate", "candidate": None})  # end of candidates


# --- internal networks -----------------------------------------------------------------------


def internal_hub(**kwargs: Any) -> Hub:
    import ipaddress

    counter = itertools.count(1)
    networks = (ipaddress.ip_network("10.80.0.0/24"), ipaddress.ip_network("fd00:80::/64"))
    return Hub(Limits(), new_token=lambda n: f"t{next(counter)}", internal=networks, **kwargs)


def enter(hub: Hub, conn: int, remote: str, now: float = 0.0, **extra: Any) -> list[Action]:
    hub.connect(conn, now, address=remote, remote=remote)
    msg = {"type": "join", "v": 1, "room": "office", "name": f"user{conn}", **extra}
    return hub.receive(conn, json.dumps(msg), now)


INSIDE_HOST = "candidate:1 1 udp 2122260223 10.80.0.2 53001 typ host generation 0"
INSIDE_V6 = "candidate:2 1 udp 2122262783 fd00:80::2 53002 typ host generation 0"
INSIDE_RELAY = "candidate:3 1 udp 41885439 10.80.0.4 50000 typ relay raddr 10.80.0.2 rport 1"
OUTSIDE_SRFLX = "candidate:4 1 udp 1686052607 203.0.113.9 53001 typ srflx raddr 0.0.0.0 rport 0"
OUTSIDE_RELAY = "candidate:5 1 udp 41885439 198.51.100.1 50000 typ relay raddr 0.0.0.0 rport 0"
OUTSIDE_V6 = "candidate:6 1 udp 2122262783 2001:db8::2 53003 typ host generation 0"
OTHER_LAN = "candidate:7 1 udp 2122260223 192.168.1.20 53001 typ host generation 0"
MDNS = "candidate:8 1 udp 2122260223 0f3c2a1e-4b7e-4d0a-9c1b-5e6f7a8b9c0d.local 53001 typ host"
SHORT = "candidate:9 1 udp 2122260223 10.80.0.2"
INSIDE = (INSIDE_HOST, INSIDE_V6, INSIDE_RELAY)
OUTSIDE = (OUTSIDE_SRFLX, OUTSIDE_RELAY, OUTSIDE_V6, OTHER_LAN, MDNS, SHORT)


def two_inside(hub: Hub) -> tuple[str, str]:
    ids = []
    for conn, remote in ((1, "10.80.0.2"), (2, "fd00:80::3")):
        ids.append(joined_id(enter(hub, conn, remote), conn))
    return ids[0], ids[1]


def test_internal_networks_forward_only_candidates_inside() -> None:
    hub = internal_hub()
    _, bo = two_inside(hub)
    lines = "".join(f"a={line}\r\n" for line in (*INSIDE, *OUTSIDE))
    sdp = f"v=0\r\nm=application 9 UDP/DTLS/SCTP x\r\na=mid:0\r\n{lines}a=end-of-candidates\r\n"

    def delivered(message: dict[str, Any]) -> list[dict[str, Any]]:
        return sends(hub.receive(1, json.dumps({**message, "to": bo}), 1.0), 2)

    for kind in ("offer", "answer"):
        (out,) = delivered({"type": kind, "sdp": sdp})
        expected = "".join(f"a={line}\r\n" for line in INSIDE)
        assert out["sdp"] == (
            f"v=0\r\nm=application 9 UDP/DTLS/SCTP x\r\na=mid:0\r\n{expected}"
            "a=end-of-candidates\r\n"
        ), out["sdp"]
    for text, forwarded in [*((c, True) for c in INSIDE), *((c, False) for c in OUTSIDE)]:
        trickled = delivered({"type": "candidate", "candidate": {"candidate": text, "sdpMid": "0"}})
        assert bool(trickled) is forwarded, (text, trickled)
    assert delivered({"type": "candidate", "candidate": {"candidate": "", "sdpMid": "0"}})
    assert delivered({"type": "candidate", "candidate": None})


def test_internal_networks_and_relay_only_together() -> None:
    hub = internal_hub(relay_only=True)
    _, bo = two_inside(hub)
    for text, forwarded in ((INSIDE_RELAY, True), (INSIDE_HOST, False), (OUTSIDE_RELAY, False)):
        message = {"type": "candidate", "to": bo, "candidate": {"candidate": text, "sdpMid": "0"}}
        assert bool(sends(hub.receive(1, json.dumps(message), 1.0), 2)) is forwarded, text


@pytest.mark.parametrize(
    "remote", ["198.51.100.7", "10.81.0.2", "127.0.0.1", "2001:db8::7", "fd00:81::2", "?", ""]
)
def test_a_connection_from_outside_cannot_join(remote: str) -> None:
    hub = internal_hub()
    two_inside(hub)
    out = enter(hub, 3, remote)
    (error,) = sends(out, 3)
    assert error["code"] == "outside-network" and error["ref"] == "join", error
    assert error["message"] == (
        "join: this server keeps calls inside its internal network, and this connection"
        f" comes from {remote}, outside it"
    )
    # Nobody inside hears of it, and the room still holds its two people.
    assert sends(out, 1) == [] and sends(out, 2) == []
    assert len(hub.room_peers("office")) == 2
    # Nor may it ask for the ICE servers (the test page), or resume someone's seat.
    (check,) = sends(enter(hub, 4, remote, check=True), 4)
    assert check["code"] == "outside-network"
    (resume,) = sends(enter(hub, 5, remote, resume={"id": "t1", "token": "t2"}), 5)
    assert resume["code"] == "outside-network"
    (summary,) = hub.refusals.take()
    assert (summary.cause, summary.client, summary.count) == ("outside network", remote, 3)
    assert hub.refusals.take() == []


def test_inside_addresses_join_as_before() -> None:
    hub = internal_hub()
    for conn, remote in ((1, "10.80.0.9"), (2, "::ffff:10.80.0.10"), (3, "fd00:80::5%eth0")):
        assert sends(enter(hub, conn, remote), conn)[0]["type"] == "joined", remote
    assert hub.refusals.take() == []
    # Without internal networks, any address joins.
    hub = make_hub()
    hub.connect(1, 0.0, address="198.51.100.7", remote="198.51.100.7")
    out = hub.receive(1, json.dumps({"type": "join", "v": 1, "room": "r", "name": "x"}), 0.0)
    assert sends(out, 1)[0]["type"] == "joined"


def test_refused_joins_are_bounded_and_do_not_get_a_connection_kicked_at_once() -> None:
    hub = internal_hub()
    hub.connect(1, 0.0, address="198.51.100.7", remote="198.51.100.7")
    join_msg = json.dumps({"type": "join", "v": 1, "room": "office", "name": "x"})
    out: list[Action] = []
    for _ in range(3):
        out += hub.receive(1, join_msg, 0.0)
    assert [m["code"] for m in sends(out, 1)] == ["outside-network"] * 3
    assert closes(out) == []
    # A flood from many addresses: one line per address up to the bound, then one for the rest.
    for conn in range(2, 400):
        address = f"198.51.{conn // 250}.{conn % 250}"
        hub.connect(conn, 0.0, address=address, remote=address)
        hub.receive(conn, join_msg, 0.0)
    summaries = hub.refusals.take()
    assert len(summaries) <= 101 and sum(s.count for s in summaries) == 3 + 398


def test_a_revoked_user_is_taken_out_and_told_why() -> None:
    hub = make_hub()
    ada = joined_id(join(hub, 1, name="Ada"), 1)
    bo = joined_id(join(hub, 2, name="Bo"), 2)
    hub.take_audit()
    # Without a join token a peer's user id is its peer id (what its TURN username carries).
    actions = hub.revoke_user(ada, 5.0)
    assert [c.conn for c in closes(actions)] == [1]
    assert sends(actions, 1) == [
        {"type": "error", "code": "revoked", "message": "Your access to this call was revoked."}
    ]
    assert sends(actions, 2) == [{"type": "peer-left", "id": ada, "reason": "revoked"}]
    assert hub.room_peers("alpha") == [(bo, "Bo")]
    [left] = hub.take_audit()
    assert left["event"] == "peer-left" and left["reason"] == "revoked"
    assert hub.revoke_user("nobody", 6.0) == []


def test_new_rules_admit_the_next_joins_and_leave_people_in_rooms() -> None:
    """A reload's room access and capacity (``Hub.set_rules``): the next joins follow them,
    the people already in rooms stay, and a seat left by a dropped connection is resumed
    with its own token whatever the new rule."""
    hub = make_hub(capacity=2, resume_grace=5.0)
    ada = joined_id(join(hub, 1, name="Ada"), 1)
    bo = sends(join(hub, 2, name="Bo"), 2)[0]
    assert sends(join(hub, 3), 3)[0]["code"] == "room-full"

    hub.set_rules(Access("password", password_digest=hashlib.sha256(b"new").digest()), 3)
    assert sends(join(hub, 4), 4)[0]["code"] == "password-required"
    assert sends(join(hub, 5, password="old"), 5)[0]["code"] == "bad-password"
    joined = sends(join(hub, 6, password="new"), 6)[0]
    assert joined["type"] == "joined" and joined["capacity"] == 3
    assert sends(join(hub, 7, password="new"), 7)[0]["code"] == "room-full"
    # Ada, admitted under the old rule, still reaches Bo.
    out = send(hub, 1, now=1.0, type="offer", to=bo["id"], sdp="v=0")
    assert [x.conn for x in out] == [2]

    # Bo's connection drops; the seat is resumed under the new rule, without its password.
    hub.disconnect(2, 2.0, graceful=False)
    resumed = sends(_resume(hub, 8, bo, now=3.0), 8)[0]
    assert resumed["type"] == "joined" and resumed["resumed"] is True, resumed

    # Capacity lowered below the room's people: all stay, nobody new comes in.
    hub.set_rules(Access(), 2)
    assert len(hub.room_peers("alpha")) == 3
    assert sends(join(hub, 9), 9)[0]["code"] == "room-full"
    assert [x.conn for x in send(hub, 8, now=4.0, type="offer", to=ada, sdp="v=0")] == [1]


def _held(hub: Hub) -> int:
    """What the hub keeps, counted from its peers (to check its running total)."""
    from tsunagu.signaling.rooms import _size

    return sum(
        sum(_size(message) for _, message in peer.sent) + peer.outbox_size
        for peer in hub._peers.values()
    )


def _present(hub: Hub, room: str) -> set[str]:
    return {peer for peer, _ in hub.room_peers(room)}


def test_what_the_hub_keeps_for_all_peers_is_bounded() -> None:
    """Replays and away peers' messages together stay under ``Limits.held_bytes``: past it
    the largest holdings go, an away peer's waiting messages with the peer (its room is
    told), a replay alone; the running count matches what is kept, and is 0 once everyone
    has left."""
    hub = make_hub(held_bytes=30_000, replay_bytes=8_000, resume_grace=60.0, burst=1000.0)
    ids = {conn: joined_id(join(hub, conn, room="big"), conn) for conn in range(1, 7)}
    hub.disconnect(6, 1.0, graceful=False)  # away: what comes for it waits
    sdp = "v=0 " + "x" * 3000
    now = 1.0
    left: list[dict[str, Any]] = []
    emptied = False
    for n in range(60):
        now += 0.05
        sender = 1 + n % 5
        for conn, peer in ids.items():
            if conn != sender and peer in _present(hub, "big"):
                out = send(hub, sender, now=now, type="offer", to=peer, sdp=sdp)
                left += [x for x in sends(out) if x["type"] == "peer-left"]
                assert hub.held <= 30_000, (n, hub.held)
                assert hub.held == _held(hub)
                # From the second round on, every connected peer has been sent something.
                if n >= 5:
                    emptied |= any(not p.sent for p in hub._peers.values() if p.conn is not None)
    # Five replays of up to 8,000 bytes would be more than the bound: some were given up.
    assert emptied
    # The away peer, whose waiting messages outgrew every replay, was dropped and its room
    # told once each.
    assert ids[6] not in _present(hub, "big") and len(_present(hub, "big")) == 5
    assert {x["id"] for x in left} == {ids[6]} and len(left) == 5, left
    # The others still talk.
    out = send(hub, 1, now=now + 1, type="offer", to=ids[2], sdp="v=0")
    assert [x.conn for x in out] == [2]
    for conn in range(1, 6):
        hub.disconnect(conn, now + 2, graceful=True)
    assert hub.held == 0 and hub.room_names() == []


def test_a_resume_moves_what_waited_into_the_replay_without_counting_it_twice() -> None:
    hub = make_hub(resume_grace=5.0)
    joined_id(join(hub, 1), 1)
    bo = sends(join(hub, 2, name="Bo"), 2)[0]
    hub.disconnect(2, 1.0, graceful=False)
    send(hub, 1, now=2.0, type="offer", to=bo["id"], sdp="v=0 " + "y" * 500)
    before = hub.held
    assert before == _held(hub) > 500
    _resume(hub, 3, bo, now=3.0)
    assert hub.held == _held(hub) == before


def test_past_the_bound_the_largest_holdings_go_first() -> None:
    """Many away peers each waiting for one short message cost little: a large replay is
    given up before any of them is dropped."""
    hub = make_hub(replay_bytes=4_000, resume_grace=60.0, burst=1000.0)
    talkers = {conn: joined_id(join(hub, conn, room="a"), conn) for conn in range(1, 7)}
    away = {conn: joined_id(join(hub, conn, room="b"), conn) for conn in range(10, 16)}
    for conn in away:
        hub.disconnect(conn, 1.0, graceful=False)
    join(hub, 20, room="b")  # tells each away peer: one short wait
    for conn, peer in talkers.items():  # every talker's replay well above an away wait
        sender = 1 if conn != 1 else 2
        send(hub, sender, now=2.0, type="offer", to=peer, sdp="v=0 " + "z" * 500)
    for _ in range(6):  # talker 2's replay up to its own bound
        send(hub, 1, now=2.0, type="offer", to=talkers[2], sdp="v=0 " + "z" * 900)
    hub.limits = dataclasses.replace(hub.limits, held_bytes=hub.held + 200)
    send(hub, 1, now=3.0, type="offer", to=talkers[3], sdp="v=0 " + "z" * 1000)
    assert hub.held == _held(hub) <= hub.limits.held_bytes - hub.limits.replay_bytes
    assert {peer for _, peer in away.items()} <= _present(hub, "b")  # nobody away dropped
    assert not hub._peers[talkers[2]].sent  # the largest replay went first
