"""The long-term credential mechanism, server side (RFC 8489 §9.2.4), and REST credentials."""

from __future__ import annotations

import base64
import hashlib
import random
from collections.abc import Sequence

import pytest

from support.turn_harness import (
    CLIENT,
    NOW,
    REALM,
    Client,
    FakeBinder,
    error_code,
    make_server,
    stun,
    success,
    udp,
)
from tsunagu.auth.rest import mint_credentials
from tsunagu.stun import (
    PASSWORD_ALGORITHM_MD5,
    PASSWORD_ALGORITHM_SHA256,
    TRANSPORT_UDP,
    Attribute,
    ErrorCode,
    Lifetime,
    Message,
    MessageClass,
    Method,
    Nonce,
    PasswordAlgorithm,
    PasswordAlgorithms,
    Realm,
    RequestedTransport,
    Userhash,
    Username,
    encode_message,
    parse_message,
)
from tsunagu.turn import TurnServer, TurnSettings, long_term_key
from tsunagu.turn.nonce import NONCE_COOKIE

OFFERED = PasswordAlgorithms(((PASSWORD_ALGORITHM_MD5, b""), (PASSWORD_ALGORITHM_SHA256, b"")))
TRANSPORT = RequestedTransport(TRANSPORT_UDP)


def challenge(server: TurnServer, client: tuple[str, int] = CLIENT, now: float = NOW) -> Message:
    answer = server.receive(stun(Method.ALLOCATE, [TRANSPORT]), udp(client), now)
    assert isinstance(answer, bytes)
    return parse_message(answer)


def nonce_of(message: Message) -> str:
    nonce = message.get(Nonce)
    assert nonce is not None
    return nonce.value


def signed(attributes: Sequence[Attribute], key: bytes, method: int = Method.ALLOCATE) -> bytes:
    return encode_message(method, MessageClass.REQUEST, bytes(12), attributes, integrity_key=key)


# --- the challenge ------------------------------------------------------------------------


def test_challenge_carries_realm_nonce_and_algorithms_only(server: TurnServer) -> None:
    response = challenge(server)
    assert response.message_class is MessageClass.ERROR
    assert [type(a) for a in response.attributes] == [ErrorCode, Realm, Nonce, PasswordAlgorithms]
    assert response.get(ErrorCode) == ErrorCode(401, "Unauthorized")
    assert response.get(Realm) == Realm(REALM)
    assert response.get(PasswordAlgorithms) == OFFERED
    nonce = nonce_of(response)
    # RFC 8489 §9.2: nonce cookie, then 24 bits of features with "password algorithms" set.
    assert nonce.startswith(NONCE_COOKIE)
    features = base64.b64decode(nonce[len(NONCE_COOKIE) : len(NONCE_COOKIE) + 4])
    assert features[0] & 0x80
    assert not response.has_integrity
    assert response.fingerprint_offset is None
    assert server.responses[401] == 1


def test_challenge_without_security_features_is_rfc5389_shaped() -> None:
    server, _ = make_server(TurnSettings(security_features=False))
    response = challenge(server)
    assert [type(a) for a in response.attributes] == [ErrorCode, Realm, Nonce]
    assert not nonce_of(response).startswith(NONCE_COOKIE)
    # An RFC 8489 client echoing algorithms is then simply judged by MD5.
    client = Client(server, algorithm=PASSWORD_ALGORITHM_MD5)
    client.learn(response)
    client.offered = OFFERED
    assert success(client.allocate())


def test_nonces_differ_per_client_ip(server: TurnServer) -> None:
    first = nonce_of(challenge(server))
    assert nonce_of(challenge(server)) == first  # stateless: same IP, same second
    assert nonce_of(challenge(server, ("198.51.100.8", 50000))) != first


def test_challenge_then_success(alice: Client) -> None:
    response = alice.allocate()
    assert success(response)
    assert alice.nonce is not None
    assert alice.server.responses[401] == 1 and alice.server.responses[200] == 1


# --- failures -----------------------------------------------------------------------------


def test_wrong_password_gets_401(server: TurnServer, binder: object) -> None:
    client = Client(server, password="not-it")
    response = client.allocate()
    assert error_code(response) == 401
    assert not response.has_integrity
    assert response.get(Nonce) is not None and response.get(Realm) == Realm(REALM)
    assert not server.allocations


def test_unknown_user_gets_401(server: TurnServer) -> None:
    response = Client(server, username="mallory", password="x").allocate()
    assert error_code(response) == 401
    assert not server.allocations


def test_wrong_realm_gets_401(server: TurnServer) -> None:
    client = Client(server, realm="elsewhere")
    response = client.allocate()
    assert error_code(response) == 401
    assert response.get(Realm) == Realm(REALM)
    assert not server.allocations


@pytest.mark.parametrize("missing", [Username, Realm, Nonce])
def test_missing_username_realm_or_nonce_gets_400(
    server: TurnServer, missing: type[Attribute]
) -> None:
    nonce = nonce_of(challenge(server))
    key = long_term_key("alice", REALM, "alice-pw", PASSWORD_ALGORITHM_MD5)
    attributes = [
        a
        for a in (TRANSPORT, Username("alice"), Realm(REALM), Nonce(nonce))
        if not isinstance(a, missing)
    ]
    answer = server.receive(signed(attributes, key), udp(), NOW)
    assert isinstance(answer, bytes)
    response = parse_message(answer)
    assert error_code(response) == 400
    assert not response.has_integrity  # not authenticated: no key to sign with
    assert not server.allocations


def test_stale_nonce_gets_438_with_a_fresh_nonce(allocated: Client) -> None:
    server = allocated.server
    old = allocated.nonce
    later = NOW + server.settings.nonce_lifetime + 1
    raw = allocated.build(Method.REFRESH, [Lifetime(600)])
    response = allocated.exchange(raw, later)
    assert error_code(response) == 438
    assert not response.has_integrity
    assert response.get(Realm) == Realm(REALM)
    assert nonce_of(response) != old
    assert response.get(PasswordAlgorithms) == OFFERED
    # The client retries with the new nonce and succeeds.
    allocated.learn(response)
    assert success(allocated.exchange(allocated.build(Method.REFRESH), later))


def test_nonce_is_valid_until_its_lifetime(allocated: Client) -> None:
    lifetime = allocated.server.settings.nonce_lifetime
    refresh = allocated.build(Method.REFRESH)
    assert success(allocated.exchange(refresh, NOW + lifetime - 1))
    response = allocated.exchange(allocated.build(Method.REFRESH), NOW + lifetime)
    assert error_code(response) == 438


def test_nonce_from_another_client_ip_is_rejected(server: TurnServer) -> None:
    stolen = nonce_of(challenge(server, ("203.0.113.99", 1234)))
    client = Client(server)
    raw = client.build(Method.ALLOCATE, [TRANSPORT], nonce=stolen)
    response = client.exchange(raw)
    assert error_code(response) == 438
    assert nonce_of(response) != stolen
    assert not server.allocations


@pytest.mark.parametrize(
    "nonce", ["garbage", NONCE_COOKIE + "gAAA" + "!!!!", NONCE_COOKIE + "gAAA"]
)
def test_forged_nonce_is_rejected(server: TurnServer, nonce: str) -> None:
    client = Client(server)
    response = client.exchange(client.build(Method.ALLOCATE, [TRANSPORT], nonce=nonce))
    assert error_code(response) == 438
    assert not server.allocations


def test_sha256_integrity(server: TurnServer) -> None:
    client = Client(server, algorithm=PASSWORD_ALGORITHM_SHA256)
    response = client.allocate()
    assert success(response)
    # Answered with MESSAGE-INTEGRITY-SHA256 under the SHA-256 key (checked by the client).
    assert response.integrity_sha256_offset is not None
    assert response.integrity_offset is None
    assert len(client.key) == 32
    assert success(client.request(Method.REFRESH))


def test_integrity_key_must_follow_the_chosen_algorithm(server: TurnServer) -> None:
    client = Client(server, algorithm=PASSWORD_ALGORITHM_SHA256)
    client.learn(challenge(server))
    md5_key = long_term_key("alice", REALM, "alice-pw", PASSWORD_ALGORITHM_MD5)
    attributes: list[Attribute] = [
        TRANSPORT,
        Username("alice"),
        Realm(REALM),
        Nonce(client.nonce or ""),
        OFFERED,
        PasswordAlgorithm(PASSWORD_ALGORITHM_SHA256),
    ]
    raw = encode_message(
        Method.ALLOCATE, MessageClass.REQUEST, bytes(12), attributes, integrity_sha256_key=md5_key
    )
    assert error_code(client.exchange(raw)) == 401
    assert not server.allocations


def test_sha256_integrity_with_the_default_md5_key(server: TurnServer) -> None:
    # Without PASSWORD-ALGORITHM the key is MD5 (RFC 8489 §9.2.4); the HMAC may still be
    # SHA-256, and the answer uses the same kind of integrity with the same key.
    client = Client(server)
    client.learn(challenge(server))
    raw = encode_message(
        Method.ALLOCATE,
        MessageClass.REQUEST,
        bytes(12),
        [TRANSPORT, Username("alice"), Realm(REALM), Nonce(client.nonce or "")],
        integrity_sha256_key=client.key,
    )
    response = client.exchange(raw)
    assert success(response)
    assert response.integrity_offset is None
    assert response.check_integrity_sha256(client.key)


def test_explicit_md5_algorithm(server: TurnServer) -> None:
    client = Client(server, algorithm=PASSWORD_ALGORITHM_MD5)
    response = client.allocate()
    assert success(response)
    assert response.integrity_offset is not None


@pytest.mark.parametrize("algorithm", [None, PASSWORD_ALGORITHM_SHA256])
def test_userhash(server: TurnServer, algorithm: int | None) -> None:
    client = Client(server, userhash=True, algorithm=algorithm)
    response = client.allocate()
    assert success(response)
    (allocation,) = server.allocations.values()
    assert allocation.username == "alice"


def test_unknown_userhash_gets_401(server: TurnServer) -> None:
    client = Client(server, username="nobody", password="x", userhash=True)
    assert error_code(client.allocate()) == 401


def test_userhash_of_another_realm_gets_401(server: TurnServer) -> None:
    client = Client(server)
    client.learn(challenge(server))
    digest = hashlib.sha256(b"alice:elsewhere").digest()
    raw = signed([TRANSPORT, Userhash(digest), Realm(REALM), Nonce(client.nonce or "")], client.key)
    assert error_code(client.exchange(raw)) == 401


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        (PasswordAlgorithms(((PASSWORD_ALGORITHM_SHA256, b""),)), PASSWORD_ALGORITHM_SHA256),
        (
            PasswordAlgorithms(((PASSWORD_ALGORITHM_SHA256, b""), (PASSWORD_ALGORITHM_MD5, b""))),
            PASSWORD_ALGORITHM_MD5,
        ),
        (None, PASSWORD_ALGORITHM_MD5),  # PASSWORD-ALGORITHM alone
        (OFFERED, None),  # PASSWORD-ALGORITHMS alone
        (OFFERED, 0x0003),  # a choice that was not offered
    ],
)
def test_mismatched_password_algorithms_get_400(
    server: TurnServer, offered: PasswordAlgorithms | None, chosen: int | None
) -> None:
    client = Client(server)
    client.learn(challenge(server))
    attributes: list[Attribute] = [
        TRANSPORT,
        Username("alice"),
        Realm(REALM),
        Nonce(client.nonce or ""),
    ]
    if offered is not None:
        attributes.append(offered)
    if chosen is not None:
        attributes.append(PasswordAlgorithm(chosen))
    response = client.exchange(signed(attributes, client.key))
    assert error_code(response) == 400
    assert not server.allocations


def test_errors_after_authentication_are_signed_and_detailed(allocated: Client) -> None:
    # A second Allocate on the same 5-tuple: 437, signed, with the cause in the reason.
    response = allocated.allocate()
    assert error_code(response) == 437
    reason = response.get(ErrorCode)
    assert reason is not None and reason.reason.startswith("Allocation Mismatch: ")
    assert response.has_integrity


def test_unauthenticated_errors_carry_only_the_short_phrase(server: TurnServer) -> None:
    answer = server.receive(stun(0x0123), udp(), NOW)
    assert isinstance(answer, bytes)
    assert parse_message(answer).get(ErrorCode) == ErrorCode(400, "Bad Request")


# --- TURN REST API credentials ----------------------------------------------------------------


def rest_server(
    secrets: tuple[str, ...] = ("s3cret",), *, check_expiry_on_existing: bool = True
) -> TurnServer:
    server, _ = make_server(
        secrets=secrets, users=(), check_expiry_on_existing=check_expiry_on_existing
    )
    return server


def test_rest_credentials_valid() -> None:
    server = rest_server()
    username, password = mint_credentials("s3cret", "carol", 3600, NOW)
    response = Client(server, username=username, password=password).allocate()
    assert success(response)
    (allocation,) = server.allocations.values()
    assert allocation.username == username


def test_rest_credentials_expired() -> None:
    server = rest_server()
    username, password = mint_credentials("s3cret", "carol", 60, NOW - 61)
    assert error_code(Client(server, username=username, password=password).allocate()) == 401
    assert not server.allocations


def test_rest_credentials_wrong_secret() -> None:
    server = rest_server()
    username, password = mint_credentials("other", "carol", 3600, NOW)
    assert error_code(Client(server, username=username, password=password).allocate()) == 401


def test_rest_rotation_accepts_both_secrets() -> None:
    server = rest_server(("new-secret", "old-secret"))
    for number, secret in enumerate(("old-secret", "new-secret")):
        username, password = mint_credentials(secret, f"user{number}", 3600, NOW)
        client = Client(server, udp(("198.51.100.7", 50000 + number)), username, password)
        assert success(client.allocate())
        assert success(client.request(Method.REFRESH))
    assert len(server.allocations) == 2


def test_rest_rotation_with_sha256() -> None:
    server = rest_server(("new-secret", "old-secret"))
    username, password = mint_credentials("old-secret", "dave", 3600, NOW)
    client = Client(server, username=username, password=password, algorithm=2)
    assert success(client.allocate())


@pytest.mark.parametrize(("check", "accepted"), [(True, False), (False, True)])
def test_expired_rest_username_on_refresh(check: bool, accepted: bool) -> None:
    server = rest_server(check_expiry_on_existing=check)
    username, password = mint_credentials("s3cret", "erin", 100, NOW)
    client = Client(server, username=username, password=password)
    assert success(client.allocate())
    later = NOW + 200  # credential expired, nonce and allocation still alive
    response = client.request(Method.REFRESH, [Lifetime(600)], later)
    assert success(response) is accepted
    if not accepted:
        assert error_code(response) == 401
    # A new Allocate with the expired credential is refused either way.
    other = Client(server, udp(("198.51.100.9", 1)), username, password)
    assert error_code(other.allocate(now=later)) == 401


def test_static_users_and_rest_secrets_side_by_side() -> None:
    server, _ = make_server(secrets=("s3cret",))
    username, password = mint_credentials("s3cret", "frank", 3600, NOW)
    assert success(Client(server, udp(("198.51.100.20", 1)), username, password).allocate())
    assert success(Client(server, udp(("198.51.100.21", 1))).allocate())


@pytest.mark.parametrize("username", ["²:carol", "carol:³", "99999999999999999999999:carol", ":"])
def test_odd_rest_usernames_get_401(username: str) -> None:
    server = rest_server()
    response = Client(server, username=username, password="guess").allocate()
    assert error_code(response) == 401
    assert not server.allocations


class AnyRealmStore:
    """A store that answers for every realm: the server must still enforce its own."""

    def get_keys(
        self, username: str, realm: str, algorithm: int, now: float, *, existing: bool
    ) -> tuple[bytes, ...]:
        return (long_term_key(username, realm, "pw", algorithm),)

    def find_userhash(self, userhash: bytes, realm: str) -> str | None:
        return None


def test_server_enforces_its_realm_whatever_the_store_says() -> None:
    server = TurnServer(TurnSettings(), AnyRealmStore(), FakeBinder(), random.Random(1))
    assert error_code(Client(server, password="pw", realm="elsewhere").allocate()) == 401
    assert success(Client(server, udp(("198.51.100.1", 1)), password="pw").allocate())


def test_expired_rest_credential_cannot_allocate_on_a_live_five_tuple() -> None:
    # Leniency for existing allocations covers Refresh, CreatePermission and ChannelBind,
    # not a new Allocate on the same 5-tuple.
    server = rest_server(check_expiry_on_existing=False)
    username, password = mint_credentials("s3cret", "erin", 100, NOW)
    client = Client(server, username=username, password=password)
    assert success(client.allocate())
    assert error_code(client.allocate(now=NOW + 200)) == 401
    assert success(client.request(Method.REFRESH, [], NOW + 200))


def test_fingerprint_is_mirrored_on_turn_answers(server: TurnServer) -> None:
    client = Client(server)
    challenge = client.exchange(stun(Method.ALLOCATE, [TRANSPORT], fingerprint=True))
    assert challenge.check_fingerprint() is True
    client.learn(challenge)
    response = client.request(Method.ALLOCATE, [TRANSPORT], fingerprint=True)
    assert success(response) and response.check_fingerprint() is True
    assert client.request(Method.REFRESH).check_fingerprint() is None
