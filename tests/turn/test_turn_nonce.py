"""Stateless nonces (RFC 8489 §9.2): expiry and client IP under an HMAC, nonce cookie."""

from __future__ import annotations

import base64

import pytest

from tsunagu.turn.nonce import NONCE_COOKIE, NonceManager, NonceStatus

SECRET = bytes(range(32))
NOW = 1_700_000_000.0
IP = "198.51.100.7"


@pytest.fixture(params=[True, False], ids=["rfc8489", "rfc5389"])
def manager(request: pytest.FixtureRequest) -> NonceManager:
    return NonceManager(SECRET, 600, security_features=request.param)


def test_valid_until_the_lifetime(manager: NonceManager) -> None:
    nonce = manager.make(IP, NOW)
    assert manager.check(nonce, IP, NOW) is NonceStatus.VALID
    assert manager.check(nonce, IP, NOW + 599.9) is NonceStatus.VALID
    assert manager.check(nonce, IP, NOW + 600) is NonceStatus.STALE
    assert manager.check(nonce, IP, NOW + 10**6) is NonceStatus.STALE


def test_bound_to_the_client_ip(manager: NonceManager) -> None:
    nonce = manager.make(IP, NOW)
    assert manager.check(nonce, "198.51.100.8", NOW) is NonceStatus.INVALID
    assert manager.check(nonce, "2001:db8::7", NOW) is NonceStatus.INVALID


def test_bound_to_the_secret(manager: NonceManager) -> None:
    other = NonceManager(bytes(32), 600, security_features=manager.security_features)
    assert other.check(manager.make(IP, NOW), IP, NOW) is NonceStatus.INVALID


def test_security_features_prefix() -> None:
    with_features = NonceManager(SECRET, 600, security_features=True)
    without = NonceManager(SECRET, 600, security_features=False)
    assert with_features.security_features and not without.security_features
    nonce = with_features.make(IP, NOW)
    assert nonce.startswith(NONCE_COOKIE)
    bits = base64.b64decode(nonce[len(NONCE_COOKIE) : len(NONCE_COOKIE) + 4])
    assert bits == bytes((0x80, 0, 0))  # bit 0: password algorithms
    plain = without.make(IP, NOW)
    assert not plain.startswith(NONCE_COOKIE)
    # A nonce of one kind is not accepted by the other.
    assert with_features.check(plain, IP, NOW) is NonceStatus.INVALID
    assert without.check(nonce, IP, NOW) is NonceStatus.INVALID


def test_nonce_fits_the_attribute(manager: NonceManager) -> None:
    nonce = manager.make(IP, NOW)
    assert nonce.isascii() and len(nonce) < 128  # RFC 8489 §14.10: < 128 characters
    assert '"' not in nonce and "\\" not in nonce  # quoted-string safe


def test_tampering_is_detected(manager: NonceManager) -> None:
    nonce = manager.make(IP, NOW)
    prefix = NONCE_COOKIE + "gAAA" if manager.security_features else ""
    raw = bytearray(base64.urlsafe_b64decode(nonce[len(prefix) :]))
    for index in range(len(raw)):
        forged = bytearray(raw)
        forged[index] ^= 0x01
        text = prefix + base64.urlsafe_b64encode(bytes(forged)).decode()
        assert manager.check(text, IP, NOW) is NonceStatus.INVALID, index
    # Pushing the expiry forward is tampering too.
    later = (int.from_bytes(raw[:4], "big") + 3600).to_bytes(4, "big")
    text = prefix + base64.urlsafe_b64encode(later + raw[4:]).decode()
    assert manager.check(text, IP, NOW + 700) is NonceStatus.INVALID


@pytest.mark.parametrize("body", ["", "!!!!", "abc", "AAAA", "A" * 24, "A" * 32, "====", "é"])
def test_garbage_is_invalid(manager: NonceManager, body: str) -> None:
    prefix = NONCE_COOKIE + "gAAA" if manager.security_features else ""
    assert manager.check(prefix + body, IP, NOW) is NonceStatus.INVALID
