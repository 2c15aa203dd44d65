"""StaticCredentialStore: static users as keys, REST secrets with rotation and expiry."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tsunagu.auth.rest import mint_credentials, rest_password
from tsunagu.auth.store import StaticCredentialStore
from tsunagu.stun import PASSWORD_ALGORITHM_MD5, PASSWORD_ALGORITHM_SHA256
from tsunagu.turn import CredentialStore, TurnServer, TurnSettings

REALM = "example.org"
NOW = 1_700_000_000.0
MD5, SHA256 = PASSWORD_ALGORITHM_MD5, PASSWORD_ALGORITHM_SHA256


def md5_key(username: str, realm: str, password: str) -> bytes:
    # RFC 8489 §9.2.2: MD5(username ":" OpaqueString(realm) ":" OpaqueString(password)).
    return hashlib.md5(f"{username}:{realm}:{password}".encode()).digest()


def sha256_key(username: str, realm: str, password: str) -> bytes:
    return hashlib.sha256(f"{username}:{realm}:{password}".encode()).digest()


def keys(
    store: StaticCredentialStore,
    username: str,
    *,
    algorithm: int = MD5,
    now: float = NOW,
    existing: bool = False,
    realm: str = REALM,
) -> tuple[bytes, ...]:
    return store.get_keys(username, realm, algorithm, now, existing=existing)


# --- static users ----------------------------------------------------------------------------


def test_static_user_keys() -> None:
    store = StaticCredentialStore(REALM, [("alice", "pw1"), ("bob", "pw2")])
    assert keys(store, "alice") == (md5_key("alice", REALM, "pw1"),)
    assert keys(store, "alice", algorithm=SHA256) == (sha256_key("alice", REALM, "pw1"),)
    assert keys(store, "bob") == (md5_key("bob", REALM, "pw2"),)
    assert keys(store, "carol") == ()
    assert keys(store, "alice", realm="other") == ()
    assert keys(store, "Alice") == ()  # names are compared exactly


def test_unknown_algorithm_has_no_key() -> None:
    store = StaticCredentialStore(REALM, [("alice", "pw1")])
    assert keys(store, "alice", algorithm=0x0003) == ()


def test_static_users_never_expire() -> None:
    store = StaticCredentialStore(REALM, [("alice", "pw1")], ["s"])
    assert keys(store, "alice", now=NOW * 10) == (md5_key("alice", REALM, "pw1"),)


def test_add_user_later_and_replace() -> None:
    store = StaticCredentialStore(REALM)
    assert keys(store, "dave") == ()
    store.add_user("dave", "first")
    assert keys(store, "dave") == (md5_key("dave", REALM, "first"),)
    store.add_user("dave", "second")
    assert keys(store, "dave") == (md5_key("dave", REALM, "second"),)


def test_find_userhash() -> None:
    store = StaticCredentialStore(REALM, [("alice", "pw1"), ("bob", "pw2")])
    userhash = hashlib.sha256(f"alice:{REALM}".encode()).digest()
    assert store.find_userhash(userhash, REALM) == "alice"
    assert store.find_userhash(userhash, "other") is None
    assert store.find_userhash(hashlib.sha256(b"alice:other").digest(), REALM) is None
    assert store.find_userhash(bytes(32), REALM) is None


def test_static_user_that_looks_like_rest_is_static() -> None:
    store = StaticCredentialStore(REALM, [("1:alice", "pw")], ["s"])
    assert keys(store, "1:alice", now=NOW) == (md5_key("1:alice", REALM, "pw"),)


# --- REST secrets -------------------------------------------------------------------------------


def test_rest_key() -> None:
    store = StaticCredentialStore(REALM, secrets=["s3cret"])
    assert store.secrets == ("s3cret",)
    username, password = mint_credentials("s3cret", "alice", 3600, NOW)
    assert keys(store, username) == (md5_key(username, REALM, password),)
    assert keys(store, username, algorithm=SHA256) == (sha256_key(username, REALM, password),)
    assert keys(store, username, realm="other") == ()


def test_rest_rotation_offers_one_key_per_secret() -> None:
    store = StaticCredentialStore(REALM, secrets=["new", "old"])
    username, password = mint_credentials("old", "alice", 3600, NOW)
    found = keys(store, username)
    assert found == (
        md5_key(username, REALM, rest_password("new", username)),
        md5_key(username, REALM, password),
    )


def test_rest_without_secrets_is_unknown() -> None:
    store = StaticCredentialStore(REALM, [("alice", "pw")])
    username, _ = mint_credentials("s", "alice", 3600, NOW)
    assert keys(store, username) == ()


def test_rest_username_without_timestamp_is_unknown() -> None:
    store = StaticCredentialStore(REALM, secrets=["s"])
    assert keys(store, "alice") == ()
    assert keys(store, "alice:bob") == ()


@pytest.mark.parametrize(("offset", "valid"), [(-1, True), (0, False), (1, False)])
def test_rest_expiry_boundary(offset: float, valid: bool) -> None:
    store = StaticCredentialStore(REALM, secrets=["s"])
    username, _ = mint_credentials("s", "alice", 100, NOW)
    assert bool(keys(store, username, now=NOW + 100 + offset)) is valid


@pytest.mark.parametrize(
    ("check", "existing", "valid"),
    [(True, False, False), (True, True, False), (False, False, False), (False, True, True)],
)
def test_expired_rest_credential(check: bool, existing: bool, valid: bool) -> None:
    store = StaticCredentialStore(REALM, secrets=["s"], check_expiry_on_existing=check)
    username, _ = mint_credentials("s", "alice", 100, NOW)
    assert bool(keys(store, username, now=NOW + 500, existing=existing)) is valid


def test_timestamp_after_the_user_id() -> None:
    store = StaticCredentialStore(REALM, secrets=["s"])
    username = f"alice:{int(NOW) + 60}"
    password = rest_password("s", username)
    assert keys(store, username) == (md5_key(username, REALM, password),)
    assert keys(store, username, now=NOW + 60) == ()


def test_rest_users_have_no_userhash() -> None:
    store = StaticCredentialStore(REALM, secrets=["s"])
    username, _ = mint_credentials("s", "alice", 100, NOW)
    userhash = hashlib.sha256(f"{username}:{REALM}".encode()).digest()
    assert store.find_userhash(userhash, REALM) is None


class NoBinder:
    def bind(self, ip: str, port: int, *, dont_fragment: bool) -> None:
        return None

    def release(self, relay: object) -> None:
        raise AssertionError("nothing was bound")


def test_store_is_a_credential_store() -> None:
    # Typed as the core's protocol: mypy checks the store fits where the server wants it.
    store: CredentialStore = StaticCredentialStore(REALM, [("a", "b")])
    server = TurnServer(TurnSettings(realm=REALM), store, NoBinder(), random.Random(1))
    assert server.allocations == {}


@settings(max_examples=300, deadline=None)
@given(
    username=st.text(max_size=30),
    realm=st.sampled_from([REALM, "", "other"]),
    algorithm=st.integers(0, 4),
    now=st.floats(0, 2**33, allow_nan=False),
    existing=st.booleans(),
)
def test_get_keys_is_total(
    username: str, realm: str, algorithm: int, now: float, existing: bool
) -> None:
    store = StaticCredentialStore(REALM, [("alice", "pw")], ["s1", "s2"])
    found = store.get_keys(username, realm, algorithm, now, existing=existing)
    assert isinstance(found, tuple)
    assert len(found) in (0, 1, 2)
