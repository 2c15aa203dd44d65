"""STUN/TURN URLs as ICE servers write them (RFC 7064, RFC 7065)."""

from __future__ import annotations

import pytest

from tsunagu.probe.urls import IceUrl, UrlError, parse_ice_url


@pytest.mark.parametrize(
    ("text", "expected", "canonical"),
    [
        ("turn:example.org", IceUrl("turn", "example.org", 3478, "udp"), None),
        (
            "turn:203.0.113.7:3479?transport=tcp",
            IceUrl("turn", "203.0.113.7", 3479, "tcp"),
            None,
        ),
        ("turns:example.org", IceUrl("turns", "example.org", 5349, "tls"), None),
        (
            "turns:example.org:443?transport=tcp",
            IceUrl("turns", "example.org", 443, "tls"),
            "turns:example.org:443?transport=tcp",
        ),
        ("TURN:[2001:db8::1]:3478?transport=UDP", IceUrl("turn", "2001:db8::1", 3478, "udp"), None),
        ("stun:stun.example.org", IceUrl("stun", "stun.example.org", 3478, "udp"), None),
        ("stun:127.0.0.1:3478?transport=tls", IceUrl("stun", "127.0.0.1", 3478, "tls"), None),
        ("stuns:example.org", IceUrl("stuns", "example.org", 5349, "tls"), None),
    ],
)
def test_valid_urls(text: str, expected: IceUrl, canonical: str | None) -> None:
    url = parse_ice_url(text)
    assert url == expected
    if canonical is not None:
        assert str(url) == canonical
    assert parse_ice_url(str(url)) == url


def test_canonical_forms_name_port_and_transport() -> None:
    assert str(parse_ice_url("turn:example.org")) == "turn:example.org:3478?transport=udp"
    assert str(parse_ice_url("stuns:example.org")) == "stuns:example.org:5349"
    assert str(parse_ice_url("turn:[::1]")) == "turn:[::1]:3478?transport=udp"
    assert parse_ice_url("turn:[::1]").authority == "[::1]:3478"
    assert parse_ice_url("turn:[::1]").host_is_ip
    assert not parse_ice_url("turn:example.org").host_is_ip


@pytest.mark.parametrize(
    ("text", "turn", "says"),
    [
        ("http://example.org", None, "is not a STUN or TURN URL"),
        ("example.org:3478", None, "is not a STUN or TURN URL"),
        ("turn://example.org", None, "no '//'"),
        ("turn:alice@example.org", None, "credentials do not go in the URL"),
        ("turn:2001:db8::1:3478", None, "in brackets"),
        ("turn:[2001:db8::1", None, "closing ']'"),
        ("turn:[example]:1", None, "not an IPv6 address"),
        ("turn:example.org:", None, "empty port"),
        ("turn:example.org:70000", None, "is not a port"),
        ("turn:example.org:3478?transport=tls", None, "turns:host:port?transport=tcp"),
        ("turn:example.org:3478?transport=sctp", None, "takes ?transport=udp or ?transport=tcp"),
        ("turns:example.org:5349?transport=udp", None, "DTLS"),
        ("turn:example.org?foo=bar", None, "the only parameter"),
        ("turn:", None, "names no host"),
        ("stun:example.org", True, "'probe turn' takes turn: or turns: URLs"),
        ("turn:example.org", False, "'probe stun' takes stun: or stuns: URLs"),
    ],
)
def test_invalid_urls_say_what_to_write(text: str, turn: bool | None, says: str) -> None:
    with pytest.raises(UrlError, match=None) as caught:
        parse_ice_url(text, turn=turn)
    assert says in str(caught.value)
