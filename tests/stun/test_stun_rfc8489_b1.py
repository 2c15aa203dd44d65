"""RFC 8489 Appendix B.1: long-term credentials with USERHASH and MESSAGE-INTEGRITY-SHA256.

The vector as published is not a valid message. Verified erratum 6268 corrects it:

* the header length is 0x9c, which counts the 20-byte header as well; the attributes
  take 0x88 bytes (this parser must reject the published bytes for that alone);
* the key is the SHA-256 one, which a client may use only when it says so with
  PASSWORD-ALGORITHM, and the published message has none;
* so the corrected message carries PASSWORD-ALGORITHM = SHA-256 (0x0002, no parameters)
  before MESSAGE-INTEGRITY-SHA256, its length becomes 0x90, and the HMAC is recomputed.

The corrected form is what is tested as a valid request. The published HMAC turns out to
be HMAC-SHA256 over the published bytes as they stand (length 0x9c), which is checked too,
so the explanation above is itself under test.

Both forms use the password "TheMatrIX", which the RFC gives as the OpaqueString
processing of "The<U+00AD>M<U+00AA>tr<U+2168>"; that mapping is in fact SASLprep's
(NFKC, soft hyphen removed), carried over from RFC 5769. The key is derived from the
processed form given by the RFC.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import struct
from pathlib import Path

import pytest

from tsunagu.stun import (
    PASSWORD_ALGORITHM_SHA256,
    MessageClass,
    MessageIntegritySha256,
    Method,
    Nonce,
    PasswordAlgorithm,
    Realm,
    StunError,
    Userhash,
    encode_message,
    parse_message,
)

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
_VECTOR_LINE = re.compile(r"\s*([0-9a-f]{2}) ([0-9a-f]{2}) ([0-9a-f]{2}) ([0-9a-f]{2})(?:\s|$)")


def load_vectors(name: str) -> dict[str, bytes]:
    """Read a vector file: "[name]" starts a vector, each data line starts with four bytes."""
    vectors: dict[str, bytearray] = {}
    current: bytearray | None = None
    for line in (VECTORS / name).read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text.startswith("[") and text.endswith("]"):
            current = vectors.setdefault(text[1:-1], bytearray())
            continue
        match = _VECTOR_LINE.match(line)
        assert match is not None and current is not None, f"unreadable vector line {line!r}"
        current += bytes.fromhex("".join(match.groups()))
    return {name: bytes(data) for name, data in vectors.items()}


B1 = load_vectors("stun_rfc8489_b1.txt")
PUBLISHED = B1["published"]
CORRECTED = B1["corrected"]

TRANSACTION_ID = bytes.fromhex("78ad3433c6ad72c029da412e")
USERNAME = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"
PASSWORD = "TheMatrIX"  # as the RFC gives it after processing
REALM = "example.org"
NONCE = "obMatJos2AAACf//499k954d6OL34oL9FSTvy64sA"
SHA256_KEY = hashlib.sha256(f"{USERNAME}:{REALM}:{PASSWORD}".encode()).digest()
MD5_KEY = hashlib.md5(f"{USERNAME}:{REALM}:{PASSWORD}".encode()).digest()
USERHASH = hashlib.sha256(f"{USERNAME}:{REALM}".encode()).digest()


def test_userhash_is_sha256_of_username_and_realm() -> None:
    assert USERHASH == bytes.fromhex(
        "4a3cf38fef6992bda952c6780417da0f24819415569e60b205c46e41407f1704"
    )


def test_vector_sizes() -> None:
    assert len(PUBLISHED) == 20 + 0x88
    assert struct.unpack_from("!H", PUBLISHED, 2)[0] == 0x9C == len(PUBLISHED)
    assert len(CORRECTED) == 20 + 0x90
    assert struct.unpack_from("!H", CORRECTED, 2)[0] == 0x90


# --- the corrected request ---------------------------------------------------------------


def test_corrected_request_parses() -> None:
    message = parse_message(CORRECTED)
    assert message.method == Method.BINDING
    assert message.message_class == MessageClass.REQUEST
    assert message.transaction_id == TRANSACTION_ID
    assert message.attributes == [
        Userhash(USERHASH),
        Nonce(NONCE),
        Realm(REALM),
        PasswordAlgorithm(PASSWORD_ALGORITHM_SHA256),
        MessageIntegritySha256(CORRECTED[-32:]),
    ]
    nonce = message.get(Nonce)
    assert nonce is not None and nonce.value.startswith("obMatJos2")
    assert message.has_integrity
    assert message.unknown_required == ()


def test_corrected_request_verifies_with_the_sha256_key() -> None:
    message = parse_message(CORRECTED)
    assert message.check_integrity_sha256(SHA256_KEY)
    assert not message.check_integrity(SHA256_KEY)  # there is no SHA-1 integrity
    assert message.check_fingerprint() is None


@pytest.mark.parametrize(
    "key",
    [
        MD5_KEY,
        SHA256_KEY[:-1] + bytes([SHA256_KEY[-1] ^ 0x01]),
        hashlib.sha256(f"{USERNAME}:{REALM}:The\u00adM\u00aatr\u2168".encode()).digest(),
        hashlib.sha256(f"{USERNAME}:{REALM}:themAtrix".encode()).digest(),
        b"",
    ],
    ids=["md5-key", "one-bit-off", "unprocessed-password", "other-password", "empty"],
)
def test_corrected_request_fails_with_a_wrong_key(key: bytes) -> None:
    assert not parse_message(CORRECTED).check_integrity_sha256(key)


def test_corrected_request_reencodes_byte_for_byte() -> None:
    encoded = encode_message(
        Method.BINDING,
        MessageClass.REQUEST,
        TRANSACTION_ID,
        [Userhash(USERHASH), Nonce(NONCE), Realm(REALM), PasswordAlgorithm(0x0002)],
        integrity_sha256_key=SHA256_KEY,
    )
    assert encoded == CORRECTED


def test_every_single_bit_flip_of_the_corrected_request_is_detected() -> None:
    checked = 0
    for position in range(len(CORRECTED)):
        for bit in range(8):
            tampered = bytearray(CORRECTED)
            tampered[position] ^= 1 << bit
            try:
                message = parse_message(bytes(tampered))
            except StunError:
                checked += 1
                continue
            assert not message.check_integrity_sha256(SHA256_KEY), (position, bit)
            checked += 1
    assert checked == 8 * len(CORRECTED)


def test_truncating_the_hmac_is_detected() -> None:
    # Keep the 16-byte prefix of the HMAC but claim 16 bytes: a valid truncation must be
    # computed over a header whose length counts only 16 bytes, so this one fails.
    truncated = bytearray(CORRECTED[:-16])
    truncated[2:4] = struct.pack("!H", len(truncated) - 20)
    truncated[-20:-16] = struct.pack("!HH", MessageIntegritySha256.TYPE, 16)
    message = parse_message(bytes(truncated))
    assert message.integrity_sha256_offset is not None
    assert not message.check_integrity_sha256(SHA256_KEY)


# --- the request as published -----------------------------------------------------------


def test_published_request_is_rejected() -> None:
    with pytest.raises(StunError):
        parse_message(PUBLISHED)


def test_published_hmac_covers_the_header_length_as_printed() -> None:
    # The published HMAC is over the published bytes with their length of 0x9c: so the
    # only error in the MAC computation is the length field itself.
    mac_at = len(PUBLISHED) - 36
    assert PUBLISHED[mac_at : mac_at + 4] == bytes.fromhex("001c0020")
    expected = hmac.new(SHA256_KEY, PUBLISHED[:mac_at], hashlib.sha256).digest()
    assert expected == PUBLISHED[mac_at + 4 :]

    # With the length repaired the message parses, and, as the erratum says, its HMAC no
    # longer verifies.
    repaired = PUBLISHED[:2] + struct.pack("!H", len(PUBLISHED) - 20) + PUBLISHED[4:]
    message = parse_message(repaired)
    assert message.get(Userhash) == Userhash(USERHASH)
    assert message.get(PasswordAlgorithm) is None
    assert not message.check_integrity_sha256(SHA256_KEY)
