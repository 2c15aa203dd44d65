"""A user whose key is in a database: the core asks for a lookup, never waits for one.

The store (:class:`~tsunagu.auth.store.StaticCredentialStore` with a
:class:`~tsunagu.auth.cache.KeyCache`) raises ``KeysNotAtHand`` for a user it has not looked
up; the core answers the request with a :class:`~tsunagu.turn.KeyLookup` and nothing else
(no response, no state). Once the answer is in the cache the same bytes, handed in again,
are answered as for any user.
"""

from __future__ import annotations

import random

from support.turn_harness import NOW, REALM, Client, FakeBinder, error_code, success, udp
from tsunagu.auth.cache import KeyCache
from tsunagu.auth.database import keys_of_password
from tsunagu.auth.rest import mint_credentials
from tsunagu.auth.store import StaticCredentialStore
from tsunagu.stun.attributes import PASSWORD_ALGORITHM_SHA256, TRANSPORT_UDP, RequestedTransport
from tsunagu.stun.message import Method, parse_message
from tsunagu.turn import KeyLookup, TurnServer, TurnSettings
from tsunagu.turn.refusals import DATABASE_UNAVAILABLE, UNKNOWN_USER


def database_server(cache: KeyCache, secrets: tuple[str, ...] = ()) -> TurnServer:
    store = StaticCredentialStore(REALM, [("static", "static-pw")], secrets, database=cache)
    return TurnServer(TurnSettings(), store, FakeBinder(), random.Random(3))


TRANSPORT = RequestedTransport(TRANSPORT_UDP)


def signed_allocate(client: Client, now: float = NOW) -> bytes:
    """An Allocate with credentials, after the 401 that brings the nonce."""
    client.learn(client.exchange(client.build(Method.ALLOCATE, [TRANSPORT]), now))
    return client.build(Method.ALLOCATE, [TRANSPORT])


def test_an_unknown_key_becomes_a_lookup_and_then_an_answer() -> None:
    cache = KeyCache()
    server = database_server(cache)
    client = Client(server, username="dana", password="dana-pw")
    request = signed_allocate(client)
    assert client.send(request) == KeyLookup("dana", REALM)
    assert server.lookups == 1 and not server.allocations
    # Handed in again before the answer came: the same lookup, still no state.
    assert client.send(request) == KeyLookup("dana", REALM)
    cache.put(REALM, "dana", keys_of_password("dana", REALM, "dana-pw"), NOW)
    answer = client.send(request)
    assert isinstance(answer, bytes) and success(parse_message(answer))
    assert len(server.allocations) == 1


def test_a_wrong_password_or_unknown_user_from_the_database_is_401() -> None:
    cache = KeyCache()
    server = database_server(cache)
    cache.put(REALM, "dana", keys_of_password("dana", REALM, "dana-pw"), NOW)
    cache.put(REALM, "nobody", None, NOW)
    assert error_code(Client(server, username="dana", password="guess").allocate()) == 401
    assert error_code(Client(server, username="nobody", password="x").allocate()) == 401
    causes = {s.cause for s in server.refusals.take()}
    assert causes == {"wrong password", UNKNOWN_USER}


def test_the_database_down_is_401_with_its_own_cause_and_asked_again_later() -> None:
    cache = KeyCache(failure_ttl=2.0)
    server = database_server(cache)
    client = Client(server, username="dana", password="dana-pw")
    request = signed_allocate(client)
    assert client.send(request) == KeyLookup("dana", REALM)
    cache.put_failure(REALM, "dana", NOW)
    answer = client.send(request)
    assert isinstance(answer, bytes) and error_code(parse_message(answer)) == 401
    [summary] = server.refusals.take()
    assert summary.cause == DATABASE_UNAVAILABLE
    # After the failure's lifetime the next try asks the database again.
    client.nonce = None
    retry = signed_allocate(client, NOW + 3)
    assert client.send(retry, now=NOW + 3) == KeyLookup("dana", REALM)


def test_static_users_and_rest_credentials_never_wait_for_the_database() -> None:
    cache = KeyCache()
    server = database_server(cache, secrets=("s3cret",))
    assert success(Client(server, username="static", password="static-pw").allocate())
    username, password = mint_credentials("s3cret", "erin", 600, NOW)
    rest = Client(server, udp(("203.0.113.9", 4000)), username=username, password=password)
    assert success(rest.allocate())
    assert server.lookups == 0 and len(cache) == 0


def test_secrets_from_the_database_serve_rest_credentials() -> None:
    cache = KeyCache()
    server = database_server(cache)
    store = server._authenticator._credentials  # the store the driver keeps fresh
    assert isinstance(store, StaticCredentialStore)
    username, password = mint_credentials("from-db", "erin", 600, NOW)
    client = Client(server, username=username, password=password)
    # No secret known yet: the name could be a database user's.
    assert client.send(signed_allocate(client)) == KeyLookup(username, REALM)
    cache.put(REALM, username, None, NOW)
    assert error_code(client.allocate()) == 401
    store.database_secrets = ("from-db",)
    assert success(client.allocate())


def test_a_sha256_client_needs_the_sha256_key() -> None:
    cache = KeyCache()
    server = database_server(cache)
    md5_only = keys_of_password("dana", REALM, "dana-pw")
    cache.put(REALM, "dana", type(md5_only)(md5=md5_only.md5), NOW)
    sha = Client(server, username="dana", password="dana-pw", algorithm=PASSWORD_ALGORITHM_SHA256)
    assert error_code(sha.allocate()) == 401
    cache.put(REALM, "dana", md5_only, NOW)
    sha = Client(
        server, udp(("203.0.113.9", 4000)), "dana", "dana-pw", algorithm=PASSWORD_ALGORITHM_SHA256
    )
    assert success(sha.allocate())
