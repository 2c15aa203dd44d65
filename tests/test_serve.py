"""The wiring of ``tsunagu serve`` that runs before anything listens, in-process."""

from __future__ import annotations

import logging

import pytest

from tsunagu import serve
from tsunagu.auth.rest import mint_credentials
from tsunagu.config import parse_config
from tsunagu.serve import main as serve_main
from tsunagu.serve import settings as serve_settings
from tsunagu.stun import PASSWORD_ALGORITHM_MD5
from tsunagu.turn import PeerPolicy

NOW = 1_700_000_000.0


def keys(store: object, username: str) -> tuple[bytes, ...]:
    get_keys = store.get_keys  # type: ignore[attr-defined]
    return tuple(get_keys(username, "tsunagu", PASSWORD_ALGORITHM_MD5, NOW, existing=False))


def test_static_users_and_rest_credentials_are_both_accepted_by_default() -> None:
    config = parse_config({"users": ["alice:pw"], "static_auth_secrets": ["s"]})
    store = serve.credential_store(config, config.static_auth_secrets)
    rest_user, _ = mint_credentials("s", "bob", 600, NOW)
    assert keys(store, "alice") and keys(store, rest_user)


def test_use_auth_secret_accepts_rest_credentials_only_and_says_so(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logging.getLogger("tsunagu"), "propagate", True)
    config = parse_config(
        {"users": ["alice:pw", "carol:pw"], "static_auth_secrets": ["s"], "use_auth_secret": True}
    )
    with caplog.at_level(logging.WARNING, logger="tsunagu"):
        store = serve.credential_store(config, config.static_auth_secrets)
    rest_user, _ = mint_credentials("s", "alice", 600, NOW)
    assert keys(store, "alice") == () and keys(store, "carol") == ()
    assert keys(store, rest_user)
    [record] = caplog.records
    assert "2 static user(s) not accepted" in record.getMessage()


def test_settings_take_the_typed_values() -> None:
    config = parse_config(
        {
            "relay_ips": ["192.0.2.7"],
            "external_ips": ["203.0.113.5/192.0.2.7", "2001:db8::1"],
            "alternate_servers": ["[2001:db8::9]:3479", "192.0.2.9:3478"],
        }
    )
    settings = serve.settings_from_config(config, ("127.0.0.1",))
    assert settings.relay_ips == ("192.0.2.7",)
    assert settings.fallback_relay_ips == ("127.0.0.1",)
    assert settings.external_ips == (("203.0.113.5", "192.0.2.7"), ("2001:db8::1", None))
    # Every alternate server, in order: the core names them in turn.
    assert settings.alternate_servers == (("2001:db8::9", 3479), ("192.0.2.9", 3478))


@pytest.mark.parametrize(
    ("listening", "expected"),
    [
        ([], ["127.0.0.1", "192.0.2.1", "::1", "2001:db8::1"]),
        (["0.0.0.0"], ["127.0.0.1", "192.0.2.1"]),
        (["::"], ["2001:db8::1", "::1"]),
        (["0.0.0.0", "::1"], ["127.0.0.1", "192.0.2.1", "::1"]),
        (["::1", "127.0.0.1"], ["::1", "127.0.0.1"]),
    ],
)
def test_listening_addresses_expand_wildcards_by_family(
    monkeypatch: pytest.MonkeyPatch, listening: list[str], expected: list[str]
) -> None:
    machine = ["127.0.0.1", "192.0.2.1", "::1", "2001:db8::1"]
    monkeypatch.setattr(serve_settings, "local_addresses", lambda: list(machine))
    assert serve.listening_addresses(parse_config({"listening_ips": listening})) == expected


def test_peer_policy_is_the_cores_own_for_the_same_ranges() -> None:
    allowed = ["10.1.2.3", "192.168.0.0/16"]
    denied = ["8.8.8.0-8.8.8.9", "2001:4860::/32"]
    config = parse_config({"allowed_peer_ips": allowed, "denied_peer_ips": denied})
    assert serve.peer_policy(config) == PeerPolicy.create(allowed, denied)
    assert serve.peer_policy(parse_config({})) == PeerPolicy.create()


def test_the_servers_listening_addresses_are_denied_as_peers_unless_allowed() -> None:
    config = parse_config(
        {
            "listening_ips": ["0.0.0.0"],
            "relay_ips": ["9.9.9.9"],
            "external_ips": ["1.0.0.1/10.0.0.5"],
        }
    )
    own = serve.own_addresses(config, ("8.8.4.4", "127.0.0.1"))
    assert own == ("8.8.4.4", "127.0.0.1", "9.9.9.9", "1.0.0.1", "10.0.0.5")
    policy = serve.settings_from_config(config, ("8.8.4.4", "127.0.0.1")).policy
    # The listening ports of a listening address, the relay address, the advertised one...
    for ip in ("8.8.4.4", "9.9.9.9", "1.0.0.1"):
        for port in (3478, 5349):
            assert not policy.permits_address(ip, port), (ip, port)
        # ...but not their other ports: two clients of this server relay to each other.
        assert policy.permits_address(ip, 50000)
    assert policy.permits_address("8.8.8.8", 3478)
    # Requests from the relay port range of those addresses are the server's own.
    assert policy.is_own_relay("9.9.9.9", 50000)
    assert not policy.is_own_relay("9.9.9.9", 3478)
    assert not policy.is_own_relay("8.8.8.8", 50000)
    # The operator's allowed range wins, as it does for loopback in the tests.
    allowed = parse_config({"allowed_peer_ips": ["127.0.0.1", "8.8.4.4"]})
    policy = serve.settings_from_config(allowed, ("8.8.4.4", "127.0.0.1")).policy
    assert policy.permits_address("127.0.0.1", 3478) and policy.permits_address("8.8.4.4", 3478)
    # Loopback (denied as a peer) and allowed addresses are never taken for a relay socket:
    # clients on the server's own host, and the tests on loopback, are served.
    assert not policy.is_own_relay("127.0.0.1", 50000)
    assert not policy.is_own_relay("8.8.4.4", 50000)
    default = serve.settings_from_config(parse_config({}), ("127.0.0.1", "10.0.0.5")).policy
    assert not default.is_own_relay("127.0.0.1", 50000)
    assert not default.is_own_relay("10.0.0.5", 50000)


def test_settings_carry_the_quotas() -> None:
    settings = serve.settings_from_config(parse_config({}))
    assert (settings.user_quota, settings.address_quota, settings.total_quota) == (None,) * 3
    given = parse_config({"user_quota": 3, "address_quota": 0, "total_quota": 9})
    settings = serve.settings_from_config(given)
    assert (settings.user_quota, settings.address_quota, settings.total_quota) == (3, 0, 9)


def test_start_up_output_says_who_may_enter_rooms() -> None:
    from tsunagu.config import parse_config
    from tsunagu.serve.banner import room_access_line

    line = room_access_line(parse_config({}))
    assert line.startswith("tsunagu: room access open (default for this address): anyone"), line
    assert "valid 600 s and renewed" in line and "/api/turn-credentials off" in line
    public = parse_config({"web_ip": "0.0.0.0", "join_secrets": ["s" * 32], "api_key": "k" * 32})
    line = room_access_line(public)
    assert "room access token (default for this address): rooms admit invitation links" in line
    assert "/api/turn-credentials on" in line
    chosen = room_access_line(parse_config({"web_ip": "0.0.0.0", "room_access": "open"}))
    assert "room access open: anyone" in chosen


def test_aux_servers_expand_wildcards_by_family(monkeypatch: pytest.MonkeyPatch) -> None:
    machine = ["127.0.0.1", "192.0.2.1", "::1", "2001:db8::1"]
    monkeypatch.setattr(serve_settings, "local_addresses", lambda: list(machine))
    config = parse_config(
        {"listening_ips": ["::1"], "aux_servers": ["0.0.0.0:443", "[2001:db8::1]:443"]}
    )
    assert serve.aux_addresses(config) == (
        ("127.0.0.1", 443),
        ("192.0.2.1", 443),
        ("2001:db8::1", 443),
    )


@pytest.mark.parametrize(
    ("values", "udp", "tcp"),
    [
        # Every TCP address takes TLS and plain alike; the aux server takes UDP and TCP.
        ({}, [3478, 443], [3478, 5349, 443]),
        ({"no_udp": True}, [], [3478, 5349, 443]),
        ({"no_tcp": True}, [3478, 443], [5349, 443]),
        ({"no_tls": True}, [3478, 443], [3478, 443]),
        ({"no_tcp": True, "no_tls": True}, [3478, 443], []),
        # The TLS port may be the main port: one TCP listener takes both.
        ({"tls_listening_port": 3478}, [3478, 443], [3478, 443]),
    ],
)
def test_turn_endpoints_follow_coturn(
    values: dict[str, object], udp: list[int], tcp: list[int]
) -> None:
    config = parse_config(
        {"listening_ips": ["192.0.2.1"], "aux_servers": ["192.0.2.1:443"], **values}
    )
    aux = serve.aux_addresses(config)
    endpoints = serve.turn_endpoints(config, ["192.0.2.1"], aux, tls=not config.no_tls)
    assert endpoints.udp == tuple(("192.0.2.1", port) for port in udp)
    assert endpoints.tcp == tuple(("192.0.2.1", port) for port in tcp)
    assert endpoints.aux == (("192.0.2.1", 443),)


def test_an_aux_server_that_is_a_main_address_is_the_main_one() -> None:
    # Reached through a wildcard expanded to an address the main listeners have.
    config = parse_config({"listening_ips": ["192.0.2.1"], "aux_servers": ["192.0.2.2:3478"]})
    endpoints = serve.turn_endpoints(
        config, ["192.0.2.1", "192.0.2.2"], (("192.0.2.2", 3478),), tls=True
    )
    assert endpoints.aux == ()
    assert endpoints.tcp.count(("192.0.2.2", 3478)) == 1


def test_aux_servers_reach_the_core_and_the_peer_policy() -> None:
    config = parse_config(
        {
            "listening_ips": ["192.0.2.1"],
            "aux_servers": ["198.51.100.9:443"],
            "alternate_servers": ["203.0.113.9:3478"],
        }
    )
    settings = serve.settings_from_config(config, ("192.0.2.1",), (("198.51.100.9", 443),))
    assert settings.aux_addresses == frozenset({("198.51.100.9", 443)})
    # The aux address is the server's own: its listening ports are not a peer.
    policy = settings.policy
    for ip in ("192.0.2.1", "198.51.100.9"):
        for port in (3478, 5349, 443):
            assert (ip, port) in policy.own, (ip, port)
    assert ("198.51.100.9", 50000) not in policy.own


def test_nat_discovery_takes_the_first_two_addresses_of_a_family_and_both_ports() -> None:
    assert serve.nat_discovery(parse_config({"listening_ips": ["192.0.2.1", "192.0.2.2"]})) is None
    config = parse_config(
        {
            "rfc5780": True,
            "listening_ips": ["192.0.2.1", "2001:db8::1", "192.0.2.2", "192.0.2.3"],
            "listening_port": 4000,
            "external_ips": ["203.0.113.1/192.0.2.1", "203.0.113.2/192.0.2.2"],
        }
    )
    discovery = serve.nat_discovery(config)
    assert discovery is not None
    assert discovery.pairs == (("192.0.2.1", "192.0.2.2"),)
    assert discovery.ports == (4000, 4001)
    assert discovery.public(("192.0.2.2", 4001)) == ("203.0.113.2", 4001)
    assert serve.settings_from_config(config).nat_discovery == discovery
    # Both addresses of the pair listen on both ports; the others on the listening port.
    assert serve.listening_ports(config, "192.0.2.2") == [4000, 4001]
    assert serve.listening_ports(config, "192.0.2.3") == [4000]
    assert serve.listening_ports(config, "2001:db8::1") == [4000]


def test_the_alternate_port_is_denied_as_a_peer_too() -> None:
    config = parse_config(
        {"rfc5780": True, "listening_ips": ["192.0.2.1", "192.0.2.2"], "alt_listening_port": 4999}
    )
    policy = serve.peer_policy(config, serve.own_addresses(config))
    assert ("192.0.2.2", 4999) in policy.own and ("192.0.2.1", 3478) in policy.own
    without = parse_config({"listening_ips": ["192.0.2.1", "192.0.2.2"]})
    assert ("192.0.2.2", 3479) not in serve.peer_policy(without, ("192.0.2.2",)).own


# --- internal networks ------------------------------------------------------------------------

INTERNAL = {"internal_networks": ["10.80.0.0/24", "fd00:80::/64"], "web_ip": "10.80.0.4"}


def test_the_peer_policy_keeps_to_the_internal_networks() -> None:
    config = parse_config({**INTERNAL, "listening_ips": ["10.80.0.4"]})
    assert serve.peer_policy(config) == PeerPolicy.create(internal=["10.80.0.0/24", "fd00:80::/64"])
    policy = serve.settings_from_config(config, ("10.80.0.4",)).policy
    assert policy.permits_address("10.80.0.2", 50000) and policy.permits_address("fd00:80::2", 1)
    for ip in ("8.8.8.8", "10.81.0.2", "192.168.1.2", "127.0.0.1"):
        assert not policy.permits_address(ip, 50000), ip
    # The server's own listening ports stay denied; its relay ports are its own, so requests
    # from there are ignored (relaying to itself would be a loop).
    assert not policy.permits_address("10.80.0.4", 3478)
    assert policy.is_own_relay("10.80.0.4", 50000)


def test_wildcards_expand_to_the_machines_internal_addresses_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    machine = ["127.0.0.1", "10.80.0.4", "192.0.2.1", "::1", "fd00:80::4", "2001:db8::1"]
    monkeypatch.setattr(serve_settings, "local_addresses", lambda: list(machine))
    assert serve.listening_addresses(parse_config(INTERNAL)) == ["10.80.0.4", "fd00:80::4"]
    wildcard = parse_config({**INTERNAL, "listening_ips": ["0.0.0.0"]})
    assert serve.listening_addresses(wildcard) == ["10.80.0.4"]
    aux = parse_config({**INTERNAL, "aux_servers": ["[::]:443"]})
    assert serve.aux_addresses(aux) == (("fd00:80::4", 443),)
    # Without internal networks, every address as before.
    assert serve.listening_addresses(parse_config({})) == machine


async def test_serve_refuses_to_start_without_an_address_inside(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for module in (serve_settings, serve_main):
        monkeypatch.setattr(module, "local_addresses", lambda: ["127.0.0.1", "192.0.2.1"])
    monkeypatch.setattr(serve_main, "_setup_logging", lambda config: None)
    config = parse_config({**INTERNAL, "workers": 1, "no_web": True})
    with caplog.at_level(logging.ERROR, logger="tsunagu"):
        assert await serve.serve(config) == 1
    assert (
        "none of this machine's addresses (127.0.0.1, 192.0.2.1) lies inside"
        " 10.80.0.0/24, fd00:80::/64"
    ) in caplog.text


def test_start_up_output_names_the_internal_networks() -> None:
    assert serve.internal_network_line(parse_config({})) is None
    line = serve.internal_network_line(parse_config(INTERNAL))
    assert line is not None
    assert line.startswith(
        "tsunagu: calls stay inside the internal networks 10.80.0.0/24, fd00:80::/64: the relay"
        " reaches peers inside them only"
    ), line
    assert "a page connecting from outside cannot join" in line
    no_web = serve.internal_network_line(parse_config({**INTERNAL, "no_web": True}))
    assert no_web is not None and "page" not in no_web
