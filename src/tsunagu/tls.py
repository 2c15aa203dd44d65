"""TLS material for the TURN-over-TLS listener and the web server.

An operator either brings a certificate and key (``--cert``/``--pkey``), or tsunagu makes a
self-signed ECDSA P-256 certificate and keeps it in its state directory, reusing it across
restarts while it is valid and covers the requested hosts. Either way the caller gets both
fingerprints a human or a browser needs to trust the certificate without a CA: the SHA-256
of the certificate (what browsers display) and the SHA-256 of its SubjectPublicKeyInfo (what
Chromium's ``--ignore-certificate-errors-spki-list`` and HPKP-style pins take).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import fcntl
import hashlib
import ipaddress
import os
import secrets
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tsunagu.config import ConfigError, IPAddress

__all__ = [
    "GENERATED_CERT_NAME",
    "GENERATED_KEY_NAME",
    "ServingCertificate",
    "TlsError",
    "TlsMaterial",
    "certificate_fingerprints",
    "ensure_certificate",
    "server_ssl_context",
]

GENERATED_CERT_NAME = "tls-cert.pem"
GENERATED_KEY_NAME = "tls-key.pem"
_LOCK_NAME = ".tls.lock"

_VALIDITY = datetime.timedelta(days=30)
# A certificate this close to expiry is replaced at startup rather than reused, so that a
# server started now does not stop handshaking halfway through a working day.
_RENEW_BEFORE = datetime.timedelta(days=2)
# Tolerate peers whose clocks run a little behind ours.
_BACKDATE = datetime.timedelta(minutes=5)
_ALWAYS_HOSTS = ("localhost", "127.0.0.1", "::1")


class TlsError(ConfigError):
    """The certificate or key cannot be used. ``str()`` is one line naming the file."""


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """A certificate/key pair on disk plus its fingerprints."""

    cert_path: Path
    key_path: Path
    #: True when the certificate is tsunagu's own self-signed one (made now or reused).
    generated: bool
    #: SHA-256 of the DER certificate as colon-separated upper-case hex, as browsers show it.
    sha256_fingerprint: str
    #: base64 of the SHA-256 of the DER SubjectPublicKeyInfo.
    spki_sha256_b64: str


def certificate_fingerprints(cert: x509.Certificate) -> tuple[str, str]:
    """``(sha256, spki)`` of ``cert``, as :class:`TlsMaterial` holds them and serve prints them.

    ``tsunagu probe`` compares a server's certificate with a pin given in either form.
    """
    der = cert.public_bytes(serialization.Encoding.DER)
    colon_hex = hashlib.sha256(der).hexdigest().upper()
    fingerprint = ":".join(colon_hex[i : i + 2] for i in range(0, len(colon_hex), 2))
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return fingerprint, base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


def _spki(key: PrivateKeyTypes | x509.Certificate) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsError(f"config: {what}: cannot read {path}: {exc.strerror or exc}") from None


def _load_pair(cert_path: Path, key_path: Path) -> x509.Certificate:
    """Load and cross-check a PEM certificate (chain) and key; return the leaf certificate."""
    cert_what = "cert"
    key_what = "pkey" if key_path != cert_path else "cert"
    try:
        chain = x509.load_pem_x509_certificates(_read(cert_path, cert_what))
    except ValueError:
        raise TlsError(f"config: cert: {cert_path} holds no PEM certificate") from None
    key_pem = _read(key_path, key_what)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise TlsError(
            f"config: {key_what}: {key_path} is encrypted; give an unencrypted key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        hint = "" if key_what == "pkey" else " (give the key file with pkey)"
        raise TlsError(
            f"config: {key_what}: {key_path} holds no usable PEM private key{hint}"
        ) from None
    leaf = chain[0]
    if _spki(key) != _spki(leaf):
        raise TlsError(
            f"config: {key_what}: the key in {key_path} does not match the certificate "
            f"in {cert_path}"
        )
    return leaf


def _normalise_hosts(hosts: Sequence[str]) -> tuple[list[IPAddress], list[str]]:
    addresses: list[IPAddress] = []
    names: list[str] = []
    for raw in (*_ALWAYS_HOSTS, *hosts):
        host = raw.strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host:
            continue
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            try:
                name = host.encode("idna").decode("ascii").lower().rstrip(".")
            except UnicodeError:
                raise TlsError(f"tls: {raw!r} is neither an IP address nor a DNS name") from None
            if name and name not in names:
                names.append(name)
            continue
        # A wildcard bind address is no name anyone connects to.
        if not address.is_unspecified and address not in addresses:
            addresses.append(address)
    return addresses, names


def _covers(cert: x509.Certificate, addresses: list[IPAddress], names: list[str]) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have_ips = set(san.get_values_for_type(x509.IPAddress))
    have_names = {n.lower() for n in san.get_values_for_type(x509.DNSName)}
    return set(addresses) <= have_ips and set(names) <= have_names


def _make_certificate(
    addresses: list[IPAddress],
    names: list[str],
    now: datetime.datetime,
) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(a) for a in addresses]
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        # An end-entity certificate: Firefox refuses a CA certificate used as a server's.
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, readable by the owner only."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _reusable(
    cert_path: Path,
    key_path: Path,
    addresses: list[IPAddress],
    names: list[str],
    now: datetime.datetime,
) -> x509.Certificate | None:
    if not (cert_path.is_file() and key_path.is_file()):
        return None
    try:
        cert = _load_pair(cert_path, key_path)
    except TlsError:
        return None
    if cert.not_valid_before_utc > now or cert.not_valid_after_utc - _RENEW_BEFORE < now:
        return None
    return cert if _covers(cert, addresses, names) else None


def ensure_certificate(
    cert: str | None,
    pkey: str | None,
    hosts: Sequence[str],
    state_dir: Path,
    *,
    now: datetime.datetime | None = None,
) -> TlsMaterial:
    """Return usable TLS material, generating a self-signed certificate if none is given.

    With ``cert`` (and ``pkey``, which defaults to ``cert`` for a combined PEM file) the files
    are loaded and checked against each other; ``hosts`` and ``state_dir`` are then unused.
    Without ``cert``, a self-signed certificate for ``hosts`` plus localhost, 127.0.0.1 and
    ::1 is kept in ``state_dir`` (files mode 0600): reused when still valid and covering the
    hosts, otherwise made anew with a 30-day validity. ``now`` is for tests.

    Raises TlsError (a ConfigError) with a one-line message on any problem.
    """
    if cert is None:
        if pkey is not None:
            raise TlsError("config: pkey: needs cert as well")
        return _ensure_generated(hosts, Path(state_dir), now or datetime.datetime.now(datetime.UTC))
    cert_path = Path(cert)
    key_path = Path(pkey) if pkey is not None else cert_path
    leaf = _load_pair(cert_path, key_path)
    fingerprint, spki = certificate_fingerprints(leaf)
    return TlsMaterial(cert_path, key_path, False, fingerprint, spki)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) for the duration."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _ensure_generated(hosts: Sequence[str], state_dir: Path, now: datetime.datetime) -> TlsMaterial:
    addresses, names = _normalise_hosts(hosts)
    cert_path = state_dir / GENERATED_CERT_NAME
    key_path = state_dir / GENERATED_KEY_NAME
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Several processes starting together (workers, a second instance) must agree on one
        # pair rather than each writing its own key next to another's certificate.
        with _locked(state_dir / _LOCK_NAME):
            leaf = _reusable(cert_path, key_path, addresses, names, now)
            if leaf is None:
                cert_pem, key_pem = _make_certificate(addresses, names, now)
                # Key first: a crash in between leaves an unmatched pair, which is replaced.
                _write_private(key_path, key_pem)
                _write_private(cert_path, cert_pem)
                leaf = x509.load_pem_x509_certificate(cert_pem)
    except OSError as exc:
        raise TlsError(
            f"tls: cannot keep a self-signed certificate in {state_dir}: {exc.strerror or exc}"
        ) from None
    fingerprint, spki = certificate_fingerprints(leaf)
    return TlsMaterial(cert_path, key_path, True, fingerprint, spki)


class ServingCertificate:
    """The server-side TLS context the listeners hold, whose certificate can be replaced
    while they run (a reload, a renewal).

    A context handed to a listening socket cannot be swapped out, and loading a new chain
    into it in place would mix old and new when the key type changes. Instead each handshake
    is moved, from its ClientHello on, to the newest context: OpenSSL calls the server-name
    callback on every handshake, with or without SNI. Open connections keep the certificate
    they were made with.
    """

    def __init__(self, material: TlsMaterial) -> None:
        self.material = material
        self.context = server_ssl_context(material)
        self._newest = self.context
        self.context.sni_callback = self._choose

    def _choose(self, connection: Any, server_name: str | None, context: ssl.SSLContext) -> None:
        if self._newest is not self.context:
            connection.context = self._newest

    def replace(self, material: TlsMaterial) -> None:
        """Serve ``material`` from the next handshake on; raises TlsError, keeping the
        current certificate, when it cannot be loaded."""
        self._newest = server_ssl_context(material)
        self.material = material


def server_ssl_context(material: TlsMaterial) -> ssl.SSLContext:
    """A server-side context serving ``material``, TLS 1.2 or newer only."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(material.cert_path, material.key_path)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"tls: cannot load {material.cert_path}: {exc}") from None
    return context
