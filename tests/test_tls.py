"""TLS material: self-signed generation and reuse, operator files, fingerprints, handshakes."""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import ipaddress
import ssl
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tsunagu.config import ConfigError
from tsunagu.tls import TlsError, TlsMaterial, ensure_certificate, server_ssl_context

NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)


def der_tlv(data: bytes, offset: int) -> tuple[int, int, int]:
    """Return (tag, content start, content end) of the DER element at ``offset``."""
    tag, length = data[offset], data[offset + 1]
    start = offset + 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[start : start + count], "big")
        start += count
    return tag, start, start + length


def spki_from_certificate_der(der: bytes) -> bytes:
    """Cut the SubjectPublicKeyInfo out of a DER certificate by walking the ASN.1 by hand."""
    _, cert_start, _ = der_tlv(der, 0)
    _, tbs_start, _ = der_tlv(der, cert_start)
    offset = tbs_start
    if der[offset] == 0xA0:  # explicit [0] version
        offset = der_tlv(der, offset)[2]
    # serialNumber, signature, issuer, validity, subject, then subjectPublicKeyInfo
    for _ in range(5):
        offset = der_tlv(der, offset)[2]
    tag, _, end = der_tlv(der, offset)
    assert tag == 0x30
    return der[offset:end]


def generated(
    tmp_path: Path, hosts: list[str] | None = None, **kw: datetime.datetime
) -> TlsMaterial:
    return ensure_certificate(None, None, hosts or [], tmp_path / "state", **kw)


def load(material: TlsMaterial) -> x509.Certificate:
    return x509.load_pem_x509_certificate(material.cert_path.read_bytes())


async def handshake(
    material: TlsMaterial, client: ssl.SSLContext, server_hostname: str, host: str = "127.0.0.1"
) -> bytes:
    """Serve ``material`` on loopback, connect with ``client``; return the peer's DER cert."""

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(greet, host, 0, ssl=server_ssl_context(material))
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=client, server_hostname=server_hostname), 10
        )
        try:
            assert await asyncio.wait_for(reader.read(), 10) == b"hello"
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            assert isinstance(der, bytes)
            return der
        finally:
            writer.close()
            await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()


def pinned_client(cert_path: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert_path))


# --- generated certificates -----------------------------------------------------------------


def test_generated_certificate_files_and_shape(tmp_path: Path) -> None:
    material = generated(tmp_path, ["turn.example.org", "203.0.113.9", "[2001:db8::9]", "0.0.0.0"])
    assert material.generated is True
    assert material.cert_path.parent == material.key_path.parent == tmp_path / "state"
    for path in (material.cert_path, material.key_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    cert = load(material)
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "turn.example.org"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(a) for a in ["127.0.0.1", "::1", "203.0.113.9", "2001:db8::9"]
    }
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=30) <= lifetime <= datetime.timedelta(days=30, hours=1)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_generated_certificate_loads_into_an_ssl_context(tmp_path: Path) -> None:
    context = server_ssl_context(generated(tmp_path))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.protocol == ssl.PROTOCOL_TLS_SERVER


def test_fingerprints_match_ssl_and_an_independent_der_walk(tmp_path: Path) -> None:
    material = generated(tmp_path)
    der = ssl.PEM_cert_to_DER_cert(material.cert_path.read_text())
    digest = hashlib.sha256(der).hexdigest().upper()
    assert material.sha256_fingerprint == ":".join(digest[i : i + 2] for i in range(0, 64, 2))
    assert (
        material.sha256_fingerprint == load(material).fingerprint(hashes.SHA256()).hex(":").upper()
    )
    spki = spki_from_certificate_der(der)
    assert material.spki_sha256_b64 == base64.b64encode(hashlib.sha256(spki).digest()).decode()
    key = serialization.load_pem_private_key(material.key_path.read_bytes(), password=None)
    from_key = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert from_key == spki


@pytest.mark.parametrize(
    "name", ["localhost", "127.0.0.1", "::1", "turn.example.org", "192.0.2.44"]
)
async def test_handshake_with_a_client_pinning_the_generated_certificate(
    tmp_path: Path, name: str
) -> None:
    material = generated(tmp_path, ["turn.example.org", "192.0.2.44"])
    der = await handshake(material, pinned_client(material.cert_path), name)
    assert hashlib.sha256(der).hexdigest().upper() == material.sha256_fingerprint.replace(":", "")
    spki_digest = base64.b64encode(hashlib.sha256(spki_from_certificate_der(der)).digest())
    assert spki_digest.decode() == material.spki_sha256_b64


async def test_handshake_over_ipv6_loopback(tmp_path: Path) -> None:
    material = generated(tmp_path)
    der = await handshake(material, pinned_client(material.cert_path), "::1", host="::1")
    assert hashlib.sha256(der).hexdigest().upper() == material.sha256_fingerprint.replace(":", "")


async def test_handshake_fails_for_a_name_not_in_the_certificate(tmp_path: Path) -> None:
    material = generated(tmp_path)
    with pytest.raises(ssl.SSLCertVerificationError):
        await handshake(material, pinned_client(material.cert_path), "other.example.org")


async def test_handshake_fails_when_the_client_pins_another_certificate(tmp_path: Path) -> None:
    material = generated(tmp_path / "a")
    other = generated(tmp_path / "b")
    assert other.sha256_fingerprint != material.sha256_fingerprint
    with pytest.raises(ssl.SSLCertVerificationError):
        await handshake(material, pinned_client(other.cert_path), "localhost")


def test_generated_certificate_is_reused_while_valid(tmp_path: Path) -> None:
    first = generated(tmp_path, ["turn.example.org"], now=NOW)
    again = generated(
        tmp_path, ["TURN.example.org", "127.0.0.1"], now=NOW + datetime.timedelta(days=20)
    )
    assert again == first


def test_generated_certificate_is_replaced_near_expiry(tmp_path: Path) -> None:
    first = generated(tmp_path, now=NOW)
    later = generated(tmp_path, now=NOW + datetime.timedelta(days=29))
    assert later.sha256_fingerprint != first.sha256_fingerprint
    assert load(later).not_valid_after_utc > NOW + datetime.timedelta(days=58)


def test_generated_certificate_is_replaced_for_new_hosts(tmp_path: Path) -> None:
    first = generated(tmp_path, ["a.example.org"], now=NOW)
    second = generated(tmp_path, ["b.example.org"], now=NOW)
    assert second.sha256_fingerprint != first.sha256_fingerprint
    san = load(second).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "b.example.org" in san.get_values_for_type(x509.DNSName)


def test_damaged_generated_files_are_replaced(tmp_path: Path) -> None:
    first = generated(tmp_path, now=NOW)
    first.key_path.write_bytes(b"garbage")
    second = generated(tmp_path, now=NOW)
    assert second.sha256_fingerprint != first.sha256_fingerprint
    server_ssl_context(second)


def test_concurrent_starts_agree_on_one_pair(tmp_path: Path) -> None:
    barrier = threading.Barrier(4)

    def start() -> TlsMaterial:
        barrier.wait(timeout=10)
        return generated(tmp_path, ["turn.example.org"], now=NOW)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = [f.result(timeout=30) for f in [pool.submit(start) for _ in range(4)]]
    assert len({r.sha256_fingerprint for r in results}) == 1
    assert ensure_certificate(str(results[0].cert_path), str(results[0].key_path), [], tmp_path)
    assert generated(tmp_path, now=NOW) == results[0]


def test_unwritable_state_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(TlsError) as info:
        ensure_certificate(None, None, [], blocker / "state")
    assert str(blocker) in str(info.value) and "\n" not in str(info.value)


def test_bad_host_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TlsError):
        generated(tmp_path, ["a" * 70 + ".example"])


# --- operator-provided files ----------------------------------------------------------------


def make_pair(
    directory: Path, *, key_kind: str = "ec", password: bytes | None = None, chain: bool = False
) -> tuple[Path, Path, x509.Certificate]:
    directory.mkdir(parents=True, exist_ok=True)
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if key_kind == "ec":
        key = ec.generate_private_key(ec.SECP384R1())
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "operator.example")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(NOW + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("operator.example")]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    if chain:
        # Any second certificate stands in for an intermediate; the leaf must come first.
        other = make_pair(directory / "other")[2]
        cert_pem += other.public_bytes(serialization.Encoding.PEM)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)
    return cert_path, key_path, cert


@pytest.mark.parametrize("key_kind", ["ec", "rsa"])
def test_operator_files_are_used_as_given(tmp_path: Path, key_kind: str) -> None:
    cert_path, key_path, cert = make_pair(tmp_path / "op", key_kind=key_kind)
    material = ensure_certificate(str(cert_path), str(key_path), ["ignored"], tmp_path / "state")
    assert material.generated is False
    assert (material.cert_path, material.key_path) == (cert_path, key_path)
    assert material.sha256_fingerprint == cert.fingerprint(hashes.SHA256()).hex(":").upper()
    spki = spki_from_certificate_der(cert.public_bytes(serialization.Encoding.DER))
    assert material.spki_sha256_b64 == base64.b64encode(hashlib.sha256(spki).digest()).decode()
    assert not (tmp_path / "state").exists()
    server_ssl_context(material)


def test_combined_pem_file_without_pkey(tmp_path: Path) -> None:
    cert_path, key_path, cert = make_pair(tmp_path / "op")
    combined = tmp_path / "combined.pem"
    combined.write_bytes(cert_path.read_bytes() + key_path.read_bytes())
    material = ensure_certificate(str(combined), None, [], tmp_path / "state")
    assert material.key_path == material.cert_path == combined
    assert material.sha256_fingerprint == cert.fingerprint(hashes.SHA256()).hex(":").upper()
    server_ssl_context(material)


def test_chain_file_fingerprints_the_leaf(tmp_path: Path) -> None:
    cert_path, key_path, cert = make_pair(tmp_path / "op", chain=True)
    material = ensure_certificate(str(cert_path), str(key_path), [], tmp_path / "state")
    assert material.sha256_fingerprint == cert.fingerprint(hashes.SHA256()).hex(":").upper()


def tls_error(cert: str | None, pkey: str | None, tmp_path: Path) -> str:
    with pytest.raises(TlsError) as info:
        ensure_certificate(cert, pkey, [], tmp_path / "state")
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_files_are_clear_errors(tmp_path: Path) -> None:
    cert_path, key_path, _ = make_pair(tmp_path / "op")
    missing = tmp_path / "missing.pem"
    message = tls_error(str(missing), str(key_path), tmp_path)
    assert message.startswith("config: cert:") and str(missing) in message
    message = tls_error(str(cert_path), str(missing), tmp_path)
    assert message.startswith("config: pkey:") and str(missing) in message
    assert tls_error(None, str(key_path), tmp_path).startswith("config: pkey:")


def test_garbage_files_are_clear_errors(tmp_path: Path) -> None:
    cert_path, key_path, _ = make_pair(tmp_path / "op")
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN NOTHING-----\n")
    assert "no PEM certificate" in tls_error(str(junk), str(key_path), tmp_path)
    assert "no usable PEM private key" in tls_error(str(cert_path), str(junk), tmp_path)
    message = tls_error(str(cert_path), None, tmp_path)
    assert message.startswith("config: cert:") and "pkey" in message


def test_mismatched_key_is_a_clear_error(tmp_path: Path) -> None:
    cert_path, _, _ = make_pair(tmp_path / "one")
    _, other_key, _ = make_pair(tmp_path / "two")
    message = tls_error(str(cert_path), str(other_key), tmp_path)
    assert "does not match" in message and message.startswith("config: pkey:")


def test_encrypted_key_is_a_clear_error(tmp_path: Path) -> None:
    cert_path, key_path, _ = make_pair(tmp_path / "op", password=b"pw")
    assert "encrypted" in tls_error(str(cert_path), str(key_path), tmp_path)


def test_tls_error_is_a_config_error() -> None:
    assert issubclass(TlsError, ConfigError)
