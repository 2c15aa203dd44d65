"""PeerPolicy: which peers a relay may reach (the SSRF defence), and range parsing."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from tsunagu.turn import PeerPolicy
from tsunagu.turn.policy import DEFAULT_DENIED, parse_range


@pytest.mark.parametrize(
    ("text", "networks"),
    [
        ("10.0.0.1", ["10.0.0.1/32"]),
        ("10.0.0.0/8", ["10.0.0.0/8"]),
        ("10.1.2.3/8", ["10.0.0.0/8"]),  # host bits are forgiven
        (" 10.0.0.0/24 ", ["10.0.0.0/24"]),
        ("10.0.0.0-10.0.0.255", ["10.0.0.0/24"]),
        ("10.0.0.1 - 10.0.0.2", ["10.0.0.1/32", "10.0.0.2/32"]),
        ("2001:db8::-2001:db8::ffff", ["2001:db8::/112"]),
        ("::1", ["::1/128"]),
    ],
)
def test_parse_range(text: str, networks: list[str]) -> None:
    assert parse_range(text) == [ipaddress.ip_network(n) for n in networks]


@pytest.mark.parametrize(
    "text", ["10.0.0.9-10.0.0.1", "10.0.0.1-::1", "not an ip", "10.0.0.0/33", "10.0.0.1-"]
)
def test_parse_range_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_range(text)


def test_default_list_parses() -> None:
    policy = PeerPolicy.create()
    assert len(policy.denied) == len(DEFAULT_DENIED)
    assert policy.allowed == ()


@pytest.mark.parametrize(
    "ip",
    [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.216.34",
        "2001:4860:4860::8888",
        "2606:4700::1111",
        "2002:808:808::1",  # 6to4 of 8.8.8.8
        "64:ff9b::808:808",  # NAT64 of 8.8.8.8
    ],
)
def test_global_addresses_are_permitted(ip: str) -> None:
    assert PeerPolicy.create().permits(ip)


@pytest.mark.parametrize(
    "ip",
    [
        "0.0.0.0",
        "0.1.2.3",
        "10.255.255.255",
        "100.64.0.1",
        "127.0.0.1",
        "127.255.255.254",
        "169.254.169.254",
        "172.16.0.1",
        "172.31.255.255",
        "192.0.0.8",
        "192.0.2.1",
        "192.168.0.1",
        "198.18.0.1",
        "224.0.0.251",
        "240.0.0.1",
        "255.255.255.255",
        "::",
        "::1",
        "::2",  # IPv4-compatible 0.0.0.2
        "::127.0.0.1",  # IPv4-compatible loopback
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "::ffff:0.0.0.0",
        "::ffff:8.8.8.8",  # IPv4-mapped, even of a global address: not an IPv6 destination
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
        "2001::1",
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b:1::1",
        "2002:a00:1::1",  # 6to4 of 10.0.0.1
        "100::1",
        "2001:db8::1",
        "fc00::1",
        "fd12:3456::1",
        "fe80::1",
        "fec0::1",
        "ff02::1",
        "not-an-ip",
        "",
        "1.2.3.4.5",
    ],
)
def test_non_global_addresses_are_denied(ip: str) -> None:
    assert not PeerPolicy.create().permits(ip)


def test_allowed_wins_over_default_denied() -> None:
    policy = PeerPolicy.create(allowed=["127.0.0.1", "10.0.0.0/8", "fd00::/8"])
    assert policy.permits("127.0.0.1")
    assert policy.permits("10.20.30.40")
    assert policy.permits("fd00::5")
    assert not policy.permits("127.0.0.2")
    assert not policy.permits("192.168.0.1")


@pytest.mark.parametrize(
    "ip",
    [
        "::ffff:127.0.0.1",  # mapped
        "::127.0.0.1",  # IPv4-compatible
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1: routed to a 6to4 relay
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1: routed to a NAT64 gateway
        "2002:a14:1e28::1",  # 6to4 of 10.20.30.40
        "64:ff9b::a14:1e28",  # NAT64 of 10.20.30.40
    ],
)
def test_allowing_an_ipv4_range_does_not_allow_its_ipv6_embeddings(ip: str) -> None:
    policy = PeerPolicy.create(allowed=["127.0.0.1", "10.0.0.0/8"])
    assert not policy.permits(ip)


def test_an_embedding_can_be_allowed_by_name() -> None:
    policy = PeerPolicy.create(allowed=["64:ff9b::/96", "2001::/32"])
    assert policy.permits("64:ff9b::808:808")
    assert policy.permits("2001::1")
    # An allowed range opens exactly what it names, whatever an address in it carries.
    assert policy.permits("64:ff9b::7f00:1")
    assert not policy.permits("127.0.0.1")


def test_allowed_wins_over_operator_denied() -> None:
    policy = PeerPolicy.create(allowed=["8.8.8.8"], denied=["8.8.8.0/24"])
    assert policy.permits("8.8.8.8")
    assert not policy.permits("8.8.8.9")


def test_operator_denied_adds_to_defaults() -> None:
    policy = PeerPolicy.create(denied=["1.1.1.0/24", "2606:4700::/32"])
    assert not policy.permits("1.1.1.1")
    assert not policy.permits("::ffff:1.1.1.1")
    assert not policy.permits("2606:4700::1111")
    assert not policy.permits("127.0.0.1")
    assert policy.permits("8.8.8.8")


def test_without_defaults_everything_is_open() -> None:
    policy = PeerPolicy.create(defaults=False)
    assert policy.denied == ()
    for ip in ("127.0.0.1", "10.0.0.1", "::1", "fe80::1"):
        assert policy.permits(ip)
    assert not policy.permits("garbage")


def test_versions_do_not_cross_match() -> None:
    # An IPv4 network never matches an IPv6 address directly (only via the embedded form).
    policy = PeerPolicy.create(denied=["0.0.0.0/0"], defaults=False)
    assert not policy.permits("8.8.8.8")
    assert policy.permits("2001:4860:4860::8888")


@pytest.mark.parametrize(
    ("ip", "port", "rule"),
    [
        ("8.8.8.8", 1, None),
        ("10.1.2.3", 1, "private range 10.0.0.0/8, denied by default"),
        ("::1", 1, "loopback range ::1/128, denied by default"),
        ("::ffff:10.0.0.1", 1, "IPv4-mapped range ::ffff:0:0/96, denied by default"),
        (
            "64:ff9b::7f00:1",
            1,
            "it carries IPv4 127.0.0.1: loopback range 127.0.0.0/8, denied by default",
        ),
        ("1.1.1.1", 1, "range 1.1.1.0/24, denied by the operator (--denied-peer-ip)"),
        ("9.9.9.9", 3478, "this server's own listening address"),
        ("9.9.9.9", 3479, None),
        ("192.168.1.1", 1, None),  # allowed by the operator
        ("not an ip", 1, "not an IP address"),
    ],
)
def test_denial_names_the_rule(ip: str, port: int, rule: str | None) -> None:
    policy = dataclasses.replace(
        PeerPolicy.create(allowed=["192.168.1.0/24"], denied=["1.1.1.0/24"]),
        own=frozenset({("9.9.9.9", 3478)}),
    )
    assert policy.denial(ip, port) == rule
    assert (rule is None) == policy.permits_address(ip, port)


# --- internal networks: the relay reaches inside them only -----------------------------------

INTERNAL = ["10.80.0.0/16", "fd00:80::/64", "100.64.0.0/10", "203.0.113.0/24"]


@pytest.mark.parametrize(
    "ip",
    [
        "10.80.0.2",  # private, inside: no longer denied by default
        "10.80.255.254",
        "fd00:80::2",  # unique local, inside
        "100.100.1.1",  # carrier-grade NAT (an overlay network such as a mesh VPN), inside
    ],
)
def test_internal_networks_open_their_private_ranges(ip: str) -> None:
    assert PeerPolicy.create(internal=INTERNAL).permits(ip)
    assert not PeerPolicy.create().permits(ip)


@pytest.mark.parametrize(
    "ip",
    [
        "8.8.8.8",  # global, outside: denied, whatever the defaults say
        "1.1.1.1",
        "2001:4860:4860::8888",
        "10.81.0.2",  # private but outside
        "192.168.1.1",
        "172.16.0.1",
        "fd00:81::2",
        "127.0.0.1",
        "169.254.169.254",
        "::ffff:10.80.0.2",  # an internal address spelled as IPv6: not inside
        "2002:a50:2::1",  # 6to4 of 10.80.0.2: routed to a 6to4 relay
        "64:ff9b::a50:2",  # NAT64 of 10.80.0.2: routed to a NAT64 gateway
        "not an ip",
        "",
    ],
)
def test_internal_networks_deny_everything_outside(ip: str) -> None:
    assert not PeerPolicy.create(internal=INTERNAL).permits(ip)


def test_special_ranges_stay_denied_inside_internal_networks() -> None:
    # Only the private ranges are lifted: loopback, link-local (the metadata service) and
    # documentation stay denied inside a network that happens to hold them.
    policy = PeerPolicy.create(internal=["127.0.0.0/8", "169.254.0.0/16", "203.0.113.0/24"])
    for ip in ("127.0.0.1", "169.254.169.254", "203.0.113.7"):
        assert not policy.permits(ip), ip
    allowed = PeerPolicy.create(allowed=["203.0.113.7"], internal=["203.0.113.0/24"])
    assert allowed.permits("203.0.113.7") and not allowed.permits("203.0.113.8")


def test_global_addresses_inside_internal_networks_are_permitted() -> None:
    policy = PeerPolicy.create(internal=["93.184.216.0/24"])
    assert policy.permits("93.184.216.34")
    assert not policy.permits("93.184.217.1")


def test_allowed_and_denied_ranges_inside_internal_networks() -> None:
    # An allowed range outside cannot open it (the configuration refuses such an entry
    # anyway); a denied range inside closes part of the inside.
    policy = PeerPolicy.create(
        allowed=["8.8.8.8"], denied=["10.80.9.0/24"], internal=["10.80.0.0/16"]
    )
    assert not policy.permits("8.8.8.8")
    assert not policy.permits("10.80.9.1")
    assert policy.permits("10.80.8.1")


def test_the_servers_own_listening_addresses_stay_denied_inside() -> None:
    policy = dataclasses.replace(
        PeerPolicy.create(internal=["10.80.0.0/24"]), own=frozenset({("10.80.0.4", 3478)})
    )
    assert not policy.permits_address("10.80.0.4", 3478)
    assert policy.permits_address("10.80.0.4", 50000)  # another client's relayed address


@pytest.mark.parametrize(
    ("ip", "rule"),
    [
        (
            "8.8.8.8",
            "outside the internal networks 10.80.0.0/24, fd00:80::/64 (--internal-network)",
        ),
        (
            "10.81.0.1",
            "outside the internal networks 10.80.0.0/24, fd00:80::/64 (--internal-network)",
        ),
        ("10.80.0.9", None),
        ("fd00:80::9", None),
        ("10.80.0.255", "range 10.80.0.255/32, denied by the operator (--denied-peer-ip)"),
    ],
)
def test_denial_names_the_internal_networks(ip: str, rule: str | None) -> None:
    policy = PeerPolicy.create(denied=["10.80.0.255"], internal=["10.80.0.0/24", "fd00:80::/64"])
    assert policy.denial(ip, 1) == rule
    assert (rule is None) == policy.permits_address(ip, 1)
