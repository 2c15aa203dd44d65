"""The diagnostic checks' side of the network: resolve, connect, proxy, TLS, and a link.

Everything here blocks with a bound: every connect, handshake and read has a timeout, so a
check that meets a silent network ends with "no answer in N s" rather than hanging. Each
failure whose cause is known here (a refused connection, an SSL verification error, a
proxy's 407) is raised as :class:`~.verdicts.Failure` with its verdict; a :class:`Link`
raises plain exceptions (:class:`Closed`, ``ConnectionRefusedError``, ``TimeoutError``,
:class:`~.wire.WireError`) that only the caller can put into words, since it knows which
step was running.

TLS is verified by default, as a browser would: against the system's CAs and the name in
the URL. ``--ca FILE`` replaces the system's CAs; a pin (the certificate's or its key's
SHA-256, as ``tsunagu serve`` prints them) accepts exactly one certificate whatever signed
it; ``--insecure`` accepts any and says so.
"""

from __future__ import annotations

import base64
import binascii
import errno
import select
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from ..tls import certificate_fingerprints
from . import verdicts, wire
from .verdicts import Failure

__all__ = [
    "Closed",
    "Link",
    "Proxy",
    "TlsInfo",
    "TlsOptions",
    "connect_tcp",
    "open_udp",
    "parse_pin",
    "proxy_connect",
    "resolve",
    "start_tls",
]

_READ = 64 * 1024
_PROXY_HEADER_LIMIT = 16 * 1024

# OpenSSL's X509_V_ERR_* codes that name a cause a person can act on.
_SELF_SIGNED = {18, 19}  # DEPTH_ZERO_SELF_SIGNED_CERT, SELF_SIGNED_CERT_IN_CHAIN
_EXPIRED = 10  # CERT_HAS_EXPIRED
_NOT_YET_VALID = 9  # CERT_NOT_YET_VALID
_NAME_MISMATCH = {62, 64}  # HOSTNAME_MISMATCH, IP_ADDRESS_MISMATCH


class Closed(Exception):
    """The server closed the stream."""


def _not_stun(data: bytes) -> str:
    """What a server sent before closing, when it was no whole STUN message."""
    if data[:1] in (b"\x15", b"\x16") and data[1:2] == b"\x03":
        return "it speaks TLS on this port: use a turns: or stuns: URL"
    if data[:5] == b"HTTP/":
        line = data.split(b"\r\n", 1)[0].decode("latin-1")
        return f"it speaks HTTP on this port ({line})"
    return f"{len(data)} bytes that are not STUN, then it closed the connection"


# --- names and plain connections -----------------------------------------------------------


def resolve(host: str, port: int, stream: bool) -> tuple[str, int]:
    """The first address ``host`` resolves to, as the system's resolver orders them."""
    kind = socket.SOCK_STREAM if stream else socket.SOCK_DGRAM
    try:
        infos = socket.getaddrinfo(host, port, type=kind)
    except socket.gaierror as exc:
        raise Failure(verdicts.dns_failed(host, exc.strerror or str(exc))) from None
    except UnicodeError:
        raise Failure(verdicts.dns_failed(host, "not a valid host name")) from None
    family, _, _, _, sockaddr = infos[0]
    return str(sockaddr[0]), int(sockaddr[1])


def _where(address: tuple[str, int]) -> str:
    ip, port = address
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def connect_tcp(address: tuple[str, int], timeout: float) -> socket.socket:
    """A TCP connection to ``address``; a refusal or silence is a :class:`Failure`."""
    where = _where(address)
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except ConnectionRefusedError:
        raise Failure(verdicts.connection_refused(where, "TCP")) from None
    except TimeoutError:
        raise Failure(verdicts.no_answer_connect(where, timeout)) from None
    except OSError as exc:
        if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL):
            raise Failure(verdicts.unreachable(where, exc.strerror or str(exc))) from None
        raise
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def open_udp(address: tuple[str, int]) -> socket.socket:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.connect(address)
    except OSError as exc:
        sock.close()
        raise Failure(verdicts.unreachable(_where(address), exc.strerror or str(exc))) from None
    return sock


# --- HTTP CONNECT proxy ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Proxy:
    """An HTTP proxy that tunnels with CONNECT, with optional basic credentials."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, text: str) -> Proxy:
        """``http://[user:password@]host:port``; raises ValueError with what to write."""
        parts = urllib.parse.urlsplit(text.strip())
        if parts.scheme != "http":
            raise ValueError(f"{text!r}: write the proxy as http://[user:password@]host:port")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"{text!r}: not a valid port") from None
        if not parts.hostname or port is None:
            raise ValueError(f"{text!r}: the proxy needs a host and a port")
        if parts.path not in ("", "/") or parts.query:
            raise ValueError(f"{text!r}: a proxy URL has no path")
        username = urllib.parse.unquote(parts.username) if parts.username is not None else None
        password = urllib.parse.unquote(parts.password) if parts.password is not None else None
        return cls(parts.hostname, port, username, password)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.username}@" if self.username else ""
        return f"http://{user}{host}:{self.port}"


def proxy_connect(proxy: Proxy, host: str, port: int, timeout: float) -> tuple[socket.socket, str]:
    """A TCP connection to ``host:port`` tunnelled through ``proxy``; and its status line."""
    named = str(proxy)
    try:
        sock = socket.create_connection((proxy.host, proxy.port), timeout=timeout)
    except socket.gaierror as exc:
        raise Failure(verdicts.proxy_unreachable(named, exc.strerror or str(exc))) from None
    except TimeoutError:
        raise Failure(verdicts.proxy_unreachable(named, f"no answer in {timeout:.1f} s")) from None
    except OSError as exc:
        raise Failure(verdicts.proxy_unreachable(named, exc.strerror or str(exc))) from None
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}", "User-Agent: tsunagu-probe"]
    if proxy.username is not None:
        token = f"{proxy.username}:{proxy.password or ''}".encode()
        lines.append("Proxy-Authorization: Basic " + base64.b64encode(token).decode("ascii"))
    try:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = _read_head(sock)
    except TimeoutError:
        sock.close()
        raise Failure(
            verdicts.proxy_refused(named, target, f"no answer to CONNECT in {timeout:.1f} s")
        ) from None
    except OSError as exc:
        sock.close()
        raise Failure(verdicts.proxy_refused(named, target, exc.strerror or str(exc))) from None
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1").strip()
    parts = status_line.split(" ", 2)
    code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    if 200 <= code < 300:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, status_line
    sock.close()
    status = status_line or "no status line"
    if code == 407:
        raise Failure(verdicts.proxy_auth_failed(named, status, proxy.username is not None))
    raise Failure(verdicts.proxy_refused(named, target, status))


def _read_head(sock: socket.socket) -> bytes:
    """The proxy's response head, and not one byte of the tunnel after it."""
    head = b""
    while b"\r\n\r\n" not in head:
        peeked = sock.recv(_READ, socket.MSG_PEEK)
        if not peeked:
            raise ConnectionResetError(errno.ECONNRESET, "the proxy closed the connection")
        end = (head + peeked).find(b"\r\n\r\n")
        take = len(peeked) if end < 0 else end + 4 - len(head)
        head += sock.recv(take)
        if len(head) > _PROXY_HEADER_LIMIT:
            raise ConnectionResetError(errno.EPROTO, "the proxy's answer has no end")
    return head


# --- TLS ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """How to trust the server's certificate."""

    insecure: bool = False
    ca_file: str | None = None
    #: ``("spki", base64)`` or ``("sha256", "AB:CD:…")`` pairs from :func:`parse_pin`.
    pins: tuple[tuple[str, str], ...] = ()

    @property
    def trust(self) -> str:
        """What the certificate is checked against, in words."""
        if self.pins:
            return "the pinned certificate"
        if self.insecure:
            return "nothing (--insecure)"
        if self.ca_file:
            return f"the CA file {self.ca_file}"
        return "the system's trusted CAs"


def parse_pin(text: str) -> tuple[str, str]:
    """``sha256/BASE64`` or bare BASE64 (the key's SHA-256, the ``spki`` that serve prints),
    or 64 hex digits with or without colons (the certificate's SHA-256, ``sha256``)."""
    value = text.strip()
    if value.lower().startswith("sha256/"):
        value = value[7:]
    hexdigits = value.replace(":", "")
    if len(hexdigits) == 64 and all(c in "0123456789abcdefABCDEF" for c in hexdigits):
        upper = hexdigits.upper()
        return "sha256", ":".join(upper[i : i + 2] for i in range(0, 64, 2))
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValueError(
            f"{text!r}: a pin is sha256/BASE64 (the key, as 'spki' in tsunagu serve's output) "
            "or the certificate's SHA-256 in hex"
        )
    return "spki", base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """What the handshake showed: protocol, certificate, and how it was trusted."""

    version: str
    subject: str
    issuer: str
    names: list[str]
    not_after: str
    self_signed: bool
    sha256: str
    spki: str
    trust: str
    verified: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "subject": self.subject,
            "issuer": self.issuer,
            "names": self.names,
            "not_after": self.not_after,
            "self_signed": self.self_signed,
            "sha256": self.sha256,
            "spki": f"sha256/{self.spki}",
            "trusted_by": self.trust,
            "verified": self.verified,
        }


def _context(options: TlsOptions) -> ssl.SSLContext:
    if options.pins or options.insecure:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if options.ca_file:
        try:
            return ssl.create_default_context(cafile=options.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"--ca {options.ca_file}: cannot use it ({exc})") from None
    return ssl.create_default_context()


def _common_name(name: x509.Name) -> str:
    found = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(found[0].value) if found else name.rfc4514_string()


def _describe(der: bytes, version: str, options: TlsOptions) -> TlsInfo:
    cert = x509.load_der_x509_certificate(der)
    names: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        pass
    else:
        names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
        names += [str(a) for a in san.get_values_for_type(x509.IPAddress)]
    sha256, spki = certificate_fingerprints(cert)
    return TlsInfo(
        version=version,
        subject=_common_name(cert.subject),
        issuer=_common_name(cert.issuer),
        names=names,
        not_after=cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC"),
        self_signed=cert.issuer == cert.subject,
        sha256=sha256,
        spki=spki,
        trust=options.trust,
        verified=not options.insecure or bool(options.pins),
    )


def start_tls(
    sock: socket.socket, host: str, where: str, options: TlsOptions, timeout: float
) -> tuple[ssl.SSLSocket, TlsInfo]:
    """The TLS handshake on ``sock``, verified as ``options`` say; a failure names why."""
    context = _context(options)
    server_name = host.strip("[]")
    sock.settimeout(timeout)
    try:
        tls = context.wrap_socket(sock, server_hostname=server_name)
    except ssl.SSLCertVerificationError as exc:
        sock.close()
        raise Failure(_verification_failure(exc, server_name, options)) from None
    except ssl.SSLError as exc:
        sock.close()
        reason = exc.reason or str(exc)
        if exc.reason == "WRONG_VERSION_NUMBER":
            reason = "the server does not speak TLS on this port (wrong version number)"
        elif isinstance(exc, ssl.SSLEOFError) or exc.reason == "UNEXPECTED_EOF_WHILE_READING":
            reason = "the server closed the connection during the handshake"
        raise Failure(verdicts.tls_failed(where, reason.replace("_", " ").lower())) from None
    except TimeoutError:
        sock.close()
        raise Failure(
            verdicts.tls_failed(where, f"no answer to the handshake in {timeout:.1f} s")
        ) from None
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        if isinstance(exc, ConnectionResetError):
            reason = "the server reset the connection during the handshake"
        raise Failure(verdicts.tls_failed(where, reason)) from None
    der = tls.getpeercert(binary_form=True)
    if der is None:
        tls.close()
        raise Failure(verdicts.tls_failed(where, "the server sent no certificate"))
    info = _describe(der, tls.version() or "TLS", options)
    if options.pins and not any(
        (kind == "spki" and value == info.spki) or (kind == "sha256" and value == info.sha256)
        for kind, value in options.pins
    ):
        tls.close()
        shown = [f"sha256/{v}" if k == "spki" else v for k, v in options.pins]
        raise Failure(verdicts.tls_pin_mismatch(shown, info.spki, info.sha256))
    return tls, info


def _verification_failure(
    exc: ssl.SSLCertVerificationError, host: str, options: TlsOptions
) -> verdicts.Verdict:
    code = exc.verify_code
    reason = exc.verify_message or exc.reason or str(exc)
    if code in _SELF_SIGNED:
        kind = "self-signed"
    elif code == _EXPIRED:
        kind = "expired"
    elif code == _NOT_YET_VALID:
        kind = "not-yet-valid"
    elif code in _NAME_MISMATCH:
        kind = "name-mismatch"
    else:
        kind = "untrusted"
    return verdicts.tls_untrusted(kind, host, reason, options.trust)


# --- a link to the server -------------------------------------------------------------------


@dataclass(eq=False)
class Link:
    """One connection to the server: whole datagrams, or whole frames cut from a stream.

    The socket is non-blocking; :meth:`receive` waits (bounded) with ``select``.
    """

    sock: socket.socket
    stream: bool
    dropped: int = 0
    _buffer: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def local(self) -> tuple[str, int]:
        name = self.sock.getsockname()
        return (str(name[0]), int(name[1]))

    def send(self, data: bytes, timeout: float = 10.0) -> None:
        """Send a whole message; a full UDP buffer drops it (counted), a stream waits."""
        if not self.stream:
            try:
                self.sock.send(data)
            except BlockingIOError:
                self.dropped += 1
            return
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        while view:
            try:
                view = view[self.sock.send(view) :]
                continue
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the server does not take what is sent")
            select.select([], [self.sock], [], left)

    def pending(self) -> bool:
        """Decrypted TLS bytes wait in the SSL object, where ``select`` does not see them.

        (Whole frames never wait in the link's own buffer: :meth:`receive` returns them all.)
        """
        return isinstance(self.sock, ssl.SSLSocket) and self.sock.pending() > 0

    def receive(self, timeout: float) -> list[bytes]:
        """What has come, waiting up to ``timeout`` for the first of it; [] if nothing."""
        frames = self._frames()
        if frames:
            return frames
        if not self.pending() and not select.select([self.sock], [], [], max(0.0, timeout))[0]:
            return []
        if not self.stream:
            out: list[bytes] = []
            while True:
                try:
                    out.append(self.sock.recv(_READ))
                except BlockingIOError:
                    return out
        closed = False
        while True:
            try:
                chunk = self.sock.recv(_READ)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                closed = True
                break
            self._buffer += chunk
        frames = self._frames()
        if closed and not frames:
            if self._buffer:
                raise wire.WireError(_not_stun(bytes(self._buffer)))
            raise Closed("the server closed the connection")
        return frames

    def _frames(self) -> list[bytes]:
        if not self.stream:
            return []
        frames: list[bytes] = []
        buffer = self._buffer
        offset = 0
        while True:
            length = wire.stream_frame_length(buffer, offset)
            if length is None or offset + length > len(buffer):
                break
            frames.append(bytes(buffer[offset : offset + length]))
            offset += length
        del buffer[:offset]
        return frames

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
