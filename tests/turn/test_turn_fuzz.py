"""Property tests: nothing a client sends makes the TURN core raise or hurt another client.

One server lives through all the examples of a test, with alice's allocation, a permission
and channel 0x4000 to PEER in place. Random bytes, mutated valid messages and well-signed
requests with arbitrary attributes (from another user, bob, who also forges alice's source
address) go into ``TurnServer.receive``. After every example alice's allocation is intact;
at the end her Refresh still succeeds, her ChannelData still relays, and shutdown gives
every relay socket back exactly once (the fake binder fails on a double release).
Example counts are bounded to keep this file at a few seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.turn_harness import (
    NOW,
    PEER,
    PEER2,
    PEER6,
    REALM,
    Client,
    FakeBinder,
    channel_data,
    make_server,
    stun,
    success,
    udp,
)
from tsunagu.auth.rest import mint_credentials
from tsunagu.stun import (
    ATTRIBUTE_CLASSES,
    PASSWORD_ALGORITHM_MD5,
    PASSWORD_ALGORITHM_SHA256,
    TRANSPORT_UDP,
    AdditionalAddressFamily,
    Attribute,
    ChannelNumber,
    Data,
    DontFragment,
    EvenPort,
    Lifetime,
    MessageClass,
    Method,
    Nonce,
    PasswordAlgorithm,
    PasswordAlgorithms,
    Realm,
    RequestedAddressFamily,
    RequestedTransport,
    ReservationToken,
    UnknownAttribute,
    Userhash,
    Username,
    XorPeerAddress,
    encode_message,
)
from tsunagu.turn import Forward, TurnServer, TurnSettings, long_term_key

WHEN = NOW + 1
FIVE_TUPLES = [
    udp(),  # alice's own
    udp(("198.51.100.8", 40000)),  # bob's
    udp(("198.51.100.8", 40001)),
    udp(("203.0.113.200", 9), protocol="tcp"),
]
PEERS = [PEER, PEER2, PEER6, ("127.0.0.1", 1), ("::ffff:10.0.0.1", 2), ("fe80::1", 3)]


def bounded(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        database=None,
    )


@dataclass
class World:
    server: TurnServer
    binder: FakeBinder
    alice: Client
    bobs: dict[tuple[int, bool, int], Client]
    seeds: list[bytes]
    now: float = WHEN

    def tick(self) -> float:
        """Move the clock a little (far from alice's deadlines) and run the due timers."""
        self.now = min(self.now + 0.1, NOW + 250)
        self.server.handle_timer(self.now)
        return self.now

    def check(self) -> None:
        """alice's allocation is untouched by whatever came before."""
        allocation = self.server.allocations.get(self.alice.five_tuple)
        assert allocation is not None and not allocation.ended
        assert allocation.username == "alice"
        assert allocation.channels[0x4000][1] == PEER
        assert PEER[0] in allocation.permissions
        live = {r.address for a in self.server.allocations.values() for r in a.relays.values()}
        assert live <= set(self.binder.bound)

    def finish(self) -> None:
        """alice still gets service; shutdown frees every socket once."""
        self.check()
        assert success(self.alice.request(Method.REFRESH, [Lifetime(600)], self.now))
        allocation = self.server.allocations[self.alice.five_tuple]
        forward = self.alice.send(channel_data(0x4000, b"still here"), self.now)
        assert forward == Forward(allocation.relays[4], b"still here", PEER)
        self.server.shutdown(self.now)
        assert not self.server.allocations and not self.binder.bound


def make_world() -> World:
    # A generous limiter, so that unauthenticated answers keep being produced and checked.
    settings = TurnSettings(fallback_relay_ips=("2001:db8::5",), unauth_rate=1e9)
    server, binder = make_server(settings, secrets=("s3cret",))
    alice = Client(server)
    assert success(alice.allocate([], NOW))
    assert success(
        alice.request(Method.CHANNEL_BIND, [ChannelNumber(0x4000), XorPeerAddress(*PEER)], NOW)
    )
    bobs: dict[tuple[int, bool, int], Client] = {}
    for index, five_tuple in enumerate(FIVE_TUPLES):
        for userhash in (False, True):
            for algorithm in (0, PASSWORD_ALGORITHM_MD5, PASSWORD_ALGORITHM_SHA256):
                bob = Client(
                    server,
                    five_tuple,
                    "bob",
                    "bob-pw",
                    algorithm=algorithm or None,
                    userhash=userhash,
                )
                # Learn a nonce for this source IP (the challenge is an answer, not a state).
                bob.request(Method.REFRESH, [], NOW)
                bobs[(index, userhash, algorithm)] = bob
    seeds = [
        alice.build(Method.REFRESH, [Lifetime(600)]),
        alice.build(Method.CREATE_PERMISSION, [XorPeerAddress(*PEER2)]),
        alice.build(Method.CHANNEL_BIND, [ChannelNumber(0x4001), XorPeerAddress(*PEER2)]),
        alice.build(Method.BINDING, fingerprint=True),
        stun(Method.ALLOCATE, [RequestedTransport(TRANSPORT_UDP)], fingerprint=True),
        stun(
            Method.SEND,
            [XorPeerAddress(*PEER), Data(b"payload")],
            klass=MessageClass.INDICATION,
        ),
        bobs[(1, False, 0)].build(
            Method.ALLOCATE,
            [RequestedTransport(TRANSPORT_UDP), EvenPort(reserve=True), Lifetime(1)],
        ),
        bobs[(1, True, PASSWORD_ALGORITHM_SHA256)].build(
            Method.ALLOCATE,
            [RequestedTransport(TRANSPORT_UDP), AdditionalAddressFamily(2)],
        ),
        bobs[(1, False, PASSWORD_ALGORITHM_MD5)].build(Method.REFRESH, [Lifetime(0)]),
    ]
    while server.next_event() is not None:
        pass
    return World(server, binder, alice, bobs, seeds)


# --- strategies ------------------------------------------------------------------------------

ports = st.integers(0, 0xFFFF)
attributes: st.SearchStrategy[Attribute] = st.one_of(
    st.builds(RequestedTransport, st.sampled_from([TRANSPORT_UDP, 6, 0, 255])),
    st.builds(Lifetime, st.sampled_from([0, 1, 600, 3600, 2**32 - 1])),
    st.builds(EvenPort, st.booleans()),
    st.builds(ReservationToken, st.binary(min_size=8, max_size=8)),
    st.builds(RequestedAddressFamily, st.integers(0, 3)),
    st.builds(AdditionalAddressFamily, st.integers(0, 3)),
    st.just(DontFragment()),
    st.builds(lambda peer, port: XorPeerAddress(peer[0], port), st.sampled_from(PEERS), ports),
    st.builds(ChannelNumber, st.sampled_from([0x3FFF, 0x4000, 0x4001, 0x4FFF, 0x7FFF, 0xFFFF])),
    st.builds(Data, st.binary(max_size=40)),
    # Known types with arbitrary values (mostly malformed) and unknown types.
    st.builds(
        UnknownAttribute,
        st.sampled_from(sorted(ATTRIBUTE_CLASSES) + [0x0031, 0x7FFF, 0xC001]),
        st.binary(max_size=24),
    ),
)
# Allocate weighs more: most other requests need an allocation to get past 437.
methods = st.sampled_from(
    [Method.ALLOCATE] * 3
    + [Method.REFRESH, Method.CREATE_PERMISSION, Method.CHANNEL_BIND] * 2
    + [0x00A, 0x0FF]
)


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 4))
        position = draw(st.integers(0, max(0, len(data) - 1)))
        if op == 0 and data:
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif op == 1:
            del data[position:]
        elif op == 2:
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif op == 3 and data:
            data[position] = draw(st.integers(0, 255))
        else:
            data += draw(st.binary(max_size=12))
    if len(data) >= 4 and draw(st.booleans()):  # repair the length so parsing goes deeper
        data[2:4] = max(0, len(data) - 20).to_bytes(2, "big")
    return bytes(data)


# --- the properties -------------------------------------------------------------------------


def test_random_bytes() -> None:
    world = make_world()

    @bounded(1000)
    @given(data=st.binary(max_size=300), target=st.sampled_from(FIVE_TUPLES))
    def run(data: bytes, target: object) -> None:
        world.server.receive(data, target, world.tick())  # type: ignore[arg-type]
        world.check()

    run()
    world.finish()


def test_mutated_valid_messages() -> None:
    world = make_world()

    @bounded(1200)
    @given(data=st.data(), target=st.sampled_from(FIVE_TUPLES))
    def run(data: st.DataObject, target: object) -> None:
        message = data.draw(mutated(world.seeds))
        world.server.receive(message, target, world.tick())  # type: ignore[arg-type]
        world.check()

    run()
    world.finish()


def test_channel_data() -> None:
    world = make_world()

    @bounded(1000)
    @given(
        number=st.integers(0x4000, 0x7FFF),
        length=st.integers(0, 0xFFFF),
        payload=st.binary(max_size=64),
        target=st.sampled_from(FIVE_TUPLES),
    )
    def run(number: int, length: int, payload: bytes, target: object) -> None:
        data = number.to_bytes(2, "big") + length.to_bytes(2, "big") + payload
        answer = world.server.receive(data, target, world.tick())  # type: ignore[arg-type]
        if answer is not None:  # only a bound channel on its own 5-tuple relays
            assert isinstance(answer, Forward)
            assert target == world.alice.five_tuple and number == 0x4000
            assert answer.data == payload[:length] and answer.peer == PEER
        world.check()

    run()
    world.finish()


def test_signed_requests_with_arbitrary_attributes() -> None:
    world = make_world()
    # Mostly from bob's own addresses, sometimes forging alice's or a TCP client's.
    # Hypothesis favours the front of a list: alice's address goes last.
    keys = sorted(world.bobs, key=lambda key: (key[0] == 0, key))
    weighted = [key for key in keys for _ in range(3 if key[0] in (1, 2) else 1)]

    @bounded(1200)
    @given(
        method=methods,
        attrs=st.lists(attributes, max_size=6),
        bob=st.sampled_from(weighted),
        fingerprint=st.booleans(),
    )
    def run(
        method: int, attrs: list[Attribute], bob: tuple[int, bool, int], fingerprint: bool
    ) -> None:
        client = world.bobs[bob]
        request = client.build(method, attrs, fingerprint=fingerprint)
        answer = world.server.receive(request, client.five_tuple, world.tick())
        assert answer is None or isinstance(answer, bytes)
        world.check()
        while world.server.next_event() is not None:
            pass

    run()
    world.finish()


text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=30)


def test_arbitrary_credentials() -> None:
    """Whatever USERNAME, USERHASH, REALM, NONCE and algorithm attributes say, and whatever
    key signed them, the answer is a response or nothing, never an exception."""
    world = make_world()
    nonce = world.bobs[(1, False, 0)].nonce
    assert nonce is not None
    valid, _ = mint_credentials("s3cret", "carol", 3600, NOW)
    expired, _ = mint_credentials("s3cret", "carol", 10, NOW - 100)
    usernames = st.one_of(st.sampled_from(["bob", valid, expired, "²:x", "1:"]), text)
    algorithms = st.lists(st.tuples(st.integers(0, 4), st.binary(max_size=5)), max_size=3)
    keys = st.one_of(
        st.sampled_from([long_term_key("bob", REALM, "bob-pw", algorithm) for algorithm in (1, 2)]),
        st.binary(min_size=1, max_size=32),
    )

    @bounded(800)
    @given(
        method=st.sampled_from([Method.ALLOCATE, Method.REFRESH, Method.CREATE_PERMISSION]),
        username=st.one_of(st.none(), usernames),
        userhash=st.one_of(st.none(), st.binary(min_size=32, max_size=32)),
        realm=st.one_of(st.none(), st.just(REALM), text),
        nonce_text=st.one_of(st.none(), st.just(nonce), text),
        offered=st.one_of(st.none(), st.builds(lambda a: PasswordAlgorithms(tuple(a)), algorithms)),
        chosen=st.one_of(st.none(), st.builds(PasswordAlgorithm, st.integers(0, 4))),
        key=keys,
        sha256=st.booleans(),
        index=st.integers(1, 3),
    )
    def run(
        method: int,
        username: str | None,
        userhash: bytes | None,
        realm: str | None,
        nonce_text: str | None,
        offered: PasswordAlgorithms | None,
        chosen: PasswordAlgorithm | None,
        key: bytes,
        sha256: bool,
        index: int,
    ) -> None:
        attrs: list[Attribute] = [RequestedTransport(TRANSPORT_UDP), XorPeerAddress(*PEER2)]
        if username is not None:
            attrs.append(Username(username))
        if userhash is not None:
            attrs.append(Userhash(userhash))
        if realm is not None:
            attrs.append(Realm(realm))
        if nonce_text is not None:
            attrs.append(Nonce(nonce_text))
        attrs += [a for a in (offered, chosen) if a is not None]
        request = encode_message(
            method,
            MessageClass.REQUEST,
            bytes(12),
            attrs,
            integrity_key=None if sha256 else key,
            integrity_sha256_key=key if sha256 else None,
        )
        answer = world.server.receive(request, FIVE_TUPLES[index], world.tick())
        assert answer is None or isinstance(answer, bytes)
        world.check()
        while world.server.next_event() is not None:
            pass

    run()
    world.finish()
