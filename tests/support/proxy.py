"""A private squid for tests: an authenticating HTTP CONNECT proxy on loopback.

Started in the foreground with its own configuration, port, log directory and password
file; no system service is involved. Basic authentication goes through the helper squid
ships (``basic_ncsa_auth``), whose file holds an MD5-crypt hash made here (Apache's
``htpasswd`` is not installed, and squid's helper refuses its ``{SHA}`` hashes). squid drops
privileges to ``proxy``, so its directory lives in /tmp (pytest's is root-only) and is
handed to that user. Stopped with SIGINT (SIGTERM would wait for shutdown_lifetime).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from support.interop import HOST, free_port

SQUID = "/usr/sbin/squid"
NCSA_AUTH = "/usr/lib/squid/basic_ncsa_auth"
USER = "carol"
PASSWORD = "proxy-pass"
_ITOA64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def md5_crypt(password: str, salt: str) -> str:
    """The ``$1$`` MD5-crypt hash (FreeBSD's, as crypt(3) and basic_ncsa_auth read it)."""
    pw, sl = password.encode(), salt.encode()[:8]
    alternate = hashlib.md5(pw + sl + pw).digest()
    context = pw + b"$1$" + sl + (alternate * (len(pw) // 16 + 1))[: len(pw)]
    bits = len(pw)
    while bits:
        context += b"\0" if bits & 1 else pw[:1]
        bits >>= 1
    final = hashlib.md5(context).digest()
    for i in range(1000):
        round_input = pw if i & 1 else final
        if i % 3:
            round_input += sl
        if i % 7:
            round_input += pw
        round_input += final if i & 1 else pw
        final = hashlib.md5(round_input).digest()

    def to64(value: int, count: int) -> str:
        out = ""
        for _ in range(count):
            out += _ITOA64[value & 0x3F]
            value >>= 6
        return out

    f = final
    encoded = "".join(
        to64((f[a] << 16) | (f[b] << 8) | f[c], 4)
        for a, b, c in ((0, 6, 12), (1, 7, 13), (2, 8, 14), (3, 9, 15), (4, 10, 5))
    )
    return f"$1${sl.decode()}${encoded}{to64(f[11], 2)}"


@dataclass(frozen=True)
class Squid:
    process: subprocess.Popen[bytes]
    port: int
    directory: Path
    host: str = HOST

    def url(self, user: str = USER, password: str = PASSWORD) -> str:
        return f"http://{user}:{password}@{self.host}:{self.port}"

    def access_log(self) -> str:
        try:
            return (self.directory / "access.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _config(directory: Path, host: str, port: int, ports: Sequence[int]) -> str:
    d = directory
    return "\n".join(
        [
            f"http_port {host}:{port}",
            f"pid_filename {d}/squid.pid",
            f"cache_log {d}/cache.log",
            f"access_log stdio:{d}/access.log",
            "cache_store_log none",
            f"coredump_dir {d}",
            "cache deny all",
            "cache_mem 8 MB",
            "netdb_filename none",
            "logfile_rotate 0",
            "shutdown_lifetime 0 seconds",
            "pinger_enable off",
            "cache_effective_user proxy",
            f"auth_param basic program {NCSA_AUTH} {d}/passwd",
            "auth_param basic realm tsunagu-test",
            "acl authed proxy_auth REQUIRED",
            f"acl turn_ports port {' '.join(str(p) for p in ports)}",
            "acl CONNECT method CONNECT",
            "http_access deny !CONNECT",
            "http_access deny !authed",
            "http_access deny !turn_ports",
            "http_access allow authed",
            "http_access deny all",
            "",
        ]
    )


def _accepts(host: str, port: int, netns: str | None) -> bool:
    if netns is not None:
        done = subprocess.run(
            ["ip", "netns", "exec", netns, "ss", "-Hltn", f"sport = :{port}"],
            capture_output=True,
            timeout=10,
        )
        return bool(done.stdout.strip())
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def run_squid(
    allowed_ports: Sequence[int], *, netns: str | None = None, host: str = HOST
) -> Iterator[Squid]:
    """squid allowing authenticated CONNECT to ``allowed_ports`` on any host, nothing else;
    listening on ``host``, in network namespace ``netns`` if given (on port 3128 there)."""
    assert os.path.exists(SQUID), "squid is part of the test setup (scripts/setup --test)"
    directory = Path(tempfile.mkdtemp(prefix="squid-", dir="/tmp"))
    shutil.chown(directory, "proxy", "proxy")
    directory.chmod(0o755)
    passwd = directory / "passwd"
    passwd.write_text(f"{USER}:{md5_crypt(PASSWORD, os.urandom(6).hex()[:8])}\n")
    passwd.chmod(0o644)
    port = free_port(udp=False) if netns is None else 3128
    (directory / "squid.conf").write_text(_config(directory, host, port, allowed_ports))
    log = open(directory / "squid.out", "wb")
    wrap = ["ip", "netns", "exec", netns] if netns is not None else []
    process = subprocess.Popen(
        [*wrap, SQUID, "-N", "-f", str(directory / "squid.conf")],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while not _accepts(host, port, netns):
            if process.poll() is not None:
                raise RuntimeError(
                    f"squid exited with {process.returncode}:\n"
                    + (directory / "squid.out").read_text(errors="replace")
                    + _read(directory / "cache.log")
                )
            assert time.monotonic() < deadline, "squid did not listen in 15 s"
            time.sleep(0.05)
        yield Squid(process, port, directory, host)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGINT)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()
        shutil.rmtree(directory, ignore_errors=True)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
