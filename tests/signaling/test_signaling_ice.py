"""The ICE server list and TURN REST credentials handed to browsers."""

from __future__ import annotations

from typing import Any

import pytest

from tsunagu.auth.rest import rest_password
from tsunagu.config import Config, parse_config
from tsunagu.signaling.ice import (
    choose_host,
    format_host,
    host_from_header,
    ice_config,
    turn_uris,
)

SECRET = "s3cret-shared"


def cfg(**values: Any) -> Config:
    return parse_config(values)


def test_default_uris_use_the_request_host() -> None:
    ice = ice_config(
        cfg(), turn_secret=SECRET, request_host="rooms.example:8080", user_id="web-1", now=1000
    )
    stun, turn = ice["iceServers"]
    assert stun == {"urls": ["stun:rooms.example:3478"]}
    assert turn["urls"] == [
        "turn:rooms.example:3478?transport=udp",
        "turn:rooms.example:3478?transport=tcp",
        "turns:rooms.example:5349?transport=tcp",
    ]
    assert turn["username"] == f"{1000 + 600}:web-1"
    assert turn["credential"] == rest_password(SECRET, turn["username"])
    assert ice["turn"] == {
        "username": turn["username"],
        "password": turn["credential"],
        "ttl": 600,
        "uris": turn["urls"],
    }
    assert ice["iceTransportPolicy"] == "all" and ice["relayOnlyAllowed"] is True


def test_no_third_party_servers_ever() -> None:
    for values in ({}, {"no_turn": True}, {"stun_only": True}, {"no_udp": True}):
        ice = ice_config(cfg(**values), turn_secret=SECRET, request_host="h", user_id="", now=0)
        for server in ice["iceServers"]:
            for url in server["urls"]:
                assert url.split(":")[1] == "h", url


@pytest.mark.parametrize(
    ("values", "urls"),
    [
        ({"no_udp": True}, ["turn:h:3478?transport=tcp", "turns:h:5349?transport=tcp"]),
        (
            {"no_tcp": True},
            ["stun:h:3478", "turn:h:3478?transport=udp", "turns:h:5349?transport=tcp"],
        ),
        (
            {"no_tls": True},
            ["stun:h:3478", "turn:h:3478?transport=udp", "turn:h:3478?transport=tcp"],
        ),
        ({"no_stun": True, "no_tls": True, "no_tcp": True}, ["turn:h:3478?transport=udp"]),
        ({"stun_only": True}, ["stun:h:3478"]),
        ({"no_turn": True}, []),
        (
            {"listening_port": 10000, "tls_listening_port": 10001},
            [
                "stun:h:10000",
                "turn:h:10000?transport=udp",
                "turn:h:10000?transport=tcp",
                "turns:h:10001?transport=tcp",
            ],
        ),
    ],
)
def test_uris_honour_the_configuration(values: dict[str, Any], urls: list[str]) -> None:
    ice = ice_config(cfg(**values), turn_secret=SECRET, request_host="h", user_id="", now=0)
    assert [u for s in ice["iceServers"] for u in s["urls"]] == urls


def test_without_secret_there_is_no_turn() -> None:
    ice = ice_config(cfg(), turn_secret=None, request_host="h", user_id="", now=0)
    assert ice["iceServers"] == [{"urls": ["stun:h:3478"]}]
    assert ice["turn"] is None and ice["relayOnlyAllowed"] is False


def test_relay_policy_is_passed_on() -> None:
    ice = ice_config(
        cfg(ice_transport_policy="relay"), turn_secret=SECRET, request_host="h", user_id="", now=0
    )
    assert ice["iceTransportPolicy"] == "relay" and ice["relayOnlyAllowed"] is False


def test_host_choice_order() -> None:
    assert choose_host(cfg(public_host="turn.example"), "web:1") == "turn.example"
    assert choose_host(cfg(public_host="2001:db8::1"), "web:1") == "[2001:db8::1]"
    assert choose_host(cfg(external_ips=["203.0.113.7/10.0.0.2"]), "web:1") == "203.0.113.7"
    assert choose_host(cfg(external_ips=["2001:db8::7"]), "web:1") == "[2001:db8::7]"
    assert choose_host(cfg(listening_ips=["0.0.0.0", "::1"]), "web:1") == "[::1]"
    assert choose_host(cfg(listening_ips=["192.0.2.5"]), "web:1") == "192.0.2.5"
    assert choose_host(cfg(listening_ips=["0.0.0.0", "::"]), "web:1") == "web"
    assert choose_host(cfg(), "[::1]:8080") == "[::1]"
    assert choose_host(cfg(), "127.0.0.1") == "127.0.0.1"
    assert choose_host(cfg(), None) is None


def test_host_helpers() -> None:
    assert host_from_header("[fe80::1]:443") == "fe80::1"
    assert host_from_header("example.org:8443") == "example.org"
    assert host_from_header("::1") == "::1"
    assert host_from_header("") is None
    assert host_from_header("[") is None
    assert format_host("[::1]") == "[::1]"
    assert format_host("::1") == "[::1]"
    assert format_host("example.org") == "example.org"


def test_ipv6_request_host_gives_bracketed_uris() -> None:
    ice = ice_config(cfg(), turn_secret=SECRET, request_host="[::1]:8080", user_id="", now=0)
    assert ice["iceServers"][0]["urls"] == ["stun:[::1]:3478"]
    assert ice["iceServers"][1]["urls"][2] == "turns:[::1]:5349?transport=tcp"


def turn_urls(**values: Any) -> list[str]:
    return turn_uris(cfg(**values), "h")


@pytest.mark.parametrize(
    "values",
    [
        {"aux_servers": ["0.0.0.0:443"]},
        {"aux_servers": ["192.0.2.9:443"]},  # every address listens by default
        {"aux_servers": ["[::]:443"], "listening_ips": ["::"]},
        {"aux_servers": ["192.0.2.9:443"], "listening_ips": ["192.0.2.9", "::1"]},
        {"tls_listening_port": 443},
        {"listening_port": 443},
    ],
)
def test_tcp_and_tls_move_to_443_where_the_host_takes_it(values: dict[str, Any]) -> None:
    udp = "turn:h:443?transport=udp" if values.get("listening_port") == 443 else None
    assert turn_urls(**values) == [
        udp or "turn:h:3478?transport=udp",
        "turn:h:443?transport=tcp",
        "turns:h:443?transport=tcp",
    ]


@pytest.mark.parametrize(
    "values",
    [
        # An aux server on an address the main listeners do not have: the host may not
        # lead there.
        {"aux_servers": ["192.0.2.9:443"], "listening_ips": ["192.0.2.1"]},
        {"aux_servers": ["[2001:db8::9]:443"], "listening_ips": ["0.0.0.0"]},
        # Not 443.
        {"aux_servers": ["192.0.2.9:8443"]},
    ],
)
def test_other_aux_servers_leave_the_uris_alone(values: dict[str, Any]) -> None:
    assert turn_urls(**values) == [
        "turn:h:3478?transport=udp",
        "turn:h:3478?transport=tcp",
        "turns:h:5349?transport=tcp",
    ]


def test_443_uris_follow_the_transport_switches() -> None:
    aux = ["0.0.0.0:443"]
    assert turn_urls(aux_servers=aux, no_tls=True) == [
        "turn:h:3478?transport=udp",
        "turn:h:443?transport=tcp",
    ]
    assert turn_urls(aux_servers=aux, no_tcp=True) == [
        "turn:h:3478?transport=udp",
        "turns:h:443?transport=tcp",
    ]
    assert turn_urls(aux_servers=aux, no_tcp=True, no_tls=True) == ["turn:h:3478?transport=udp"]
    # The TLS port is 443 but TLS is off: nothing listens for TCP there.
    assert turn_urls(tls_listening_port=443, no_tls=True) == [
        "turn:h:3478?transport=udp",
        "turn:h:3478?transport=tcp",
    ]
    # Never more than one URI per transport: a browser allocates for each.
    assert turn_urls(aux_servers=aux, listening_port=80, tls_listening_port=8443) == [
        "turn:h:80?transport=udp",
        "turn:h:443?transport=tcp",
        "turns:h:443?transport=tcp",
    ]
