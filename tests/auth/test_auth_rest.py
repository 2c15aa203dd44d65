"""TURN REST API credentials: minting, the password formula and reading the expiry back."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tsunagu.auth.rest import mint_credentials, rest_expiry, rest_password

NOW = 1_700_000_000.0


def reference_password(secret: bytes, username: str) -> str:
    # draft-uberti-behave-turn-rest-00 §2.2: base64(HMAC-SHA1(secret, username)).
    return base64.b64encode(hmac.new(secret, username.encode(), hashlib.sha1).digest()).decode()


def test_password_formula() -> None:
    password = rest_password("s3cret", "1700003600:alice")
    assert password == reference_password(b"s3cret", "1700003600:alice")
    assert len(base64.b64decode(password)) == 20
    assert rest_password(b"s3cret", "1700003600:alice") == password  # str or bytes secret
    assert rest_password("other", "1700003600:alice") != password
    assert rest_password("s3cret", "1700003601:alice") != password


def test_mint_credentials() -> None:
    username, password = mint_credentials("s3cret", "alice", 3600, NOW + 0.9)
    assert username == "1700003600:alice"
    assert password == reference_password(b"s3cret", username)
    assert rest_expiry(username) == 1_700_003_600


def test_mint_without_user_id() -> None:
    username, password = mint_credentials(b"k", "", 60, NOW)
    assert username == "1700000060"
    assert password == reference_password(b"k", username)
    assert rest_expiry(username) == 1_700_000_060


@pytest.mark.parametrize(
    ("username", "expiry"),
    [
        ("1700003600:alice", 1_700_003_600),
        ("alice:1700003600", 1_700_003_600),  # coturn also takes the timestamp second
        ("1700003600", 1_700_003_600),
        ("12:34", 12),
        ("1700003600:user:with:colons", 1_700_003_600),
        ("0:alice", 0),
        ("alice", None),
        ("", None),
        (":", None),
        ("alice:", None),
        ("-5:alice", None),
        ("12a:alice", None),
        ("1.5:alice", None),
        (" 12:alice", None),
        ("a:b:12", None),
        ("²:alice", None),  # a digit to str.isdigit(), not to int()
        ("alice:¹²³", None),
        ("١٢٣:alice", None),  # Arabic-Indic digits are not a REST timestamp
    ],
)
def test_expiry_formats(username: str, expiry: int | None) -> None:
    assert rest_expiry(username) == expiry


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=40))
def test_expiry_never_raises(username: str) -> None:
    expiry = rest_expiry(username)
    assert expiry is None or expiry >= 0
