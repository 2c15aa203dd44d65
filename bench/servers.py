"""Start, check and stop the servers under test (coturn and tsunagu) and the echo peer."""

from __future__ import annotations

import datetime
import ipaddress
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
DOCS = REPO / "docs"
HOST = "127.0.0.1"
REALM = "tsunagu"
USER = ("alice", "secret")
REST_SECRET = "bench-rest-secret"
# Relay ports below Linux's ephemeral range (32768-60999), where the load generator's own
# client sockets live, so that the two never collide. 16384 ports: room for 10,000
# allocations and for the even ports turnutils_uclient asks for.
RELAY_PORTS = (16384, 32767)
# File descriptors for 10,000 allocations (a relay socket each, and for coturn a socket per
# UDP client session as well).
SERVER_NOFILE = 65536


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Variant:
    """One server configuration under test."""

    name: str
    kind: str  # "coturn" or "tsunagu"
    label: str
    relay_threads: int | None = None  # coturn -m
    workers: int | None = None  # tsunagu --workers
    relay_engine: str | None = None  # tsunagu --relay-engine
    extra: tuple[str, ...] = ()  # more tsunagu options
    cases_of: str | None = None  # runs the loads of this variant (default: its own name)


VARIANTS = {
    "coturn-m1": Variant("coturn-m1", "coturn", "coturn -m 1", relay_threads=1),
    "coturn": Variant("coturn", "coturn", "coturn (default threads)"),
    "tsunagu": Variant("tsunagu", "tsunagu", "tsunagu", workers=1),
    "tsunagu-w2": Variant("tsunagu-w2", "tsunagu", "tsunagu --workers 2", workers=2),
    "tsunagu-py": Variant(
        "tsunagu-py",
        "tsunagu",
        "tsunagu --relay-engine python",
        workers=1,
        relay_engine="python",
    ),
}
# Every bandwidth limit on (per allocation, per user, the server), each high enough that
# nothing is dropped: what metering costs per packet.
_UNREACHED_LIMITS: tuple[str, ...] = (
    *("--max-bps", "1000000000", "--user-max-bps", "2000000000"),
    *("--bps-capacity", "4000000000"),
)
VARIANTS["tsunagu-bw"] = Variant(
    "tsunagu-bw",
    "tsunagu",
    "tsunagu, bandwidth limits on",
    workers=1,
    extra=_UNREACHED_LIMITS,
    cases_of="tsunagu",
)
VARIANTS["tsunagu-py-bw"] = Variant(
    "tsunagu-py-bw",
    "tsunagu",
    "tsunagu --relay-engine python, bandwidth limits on",
    workers=1,
    relay_engine="python",
    extra=_UNREACHED_LIMITS,
    cases_of="tsunagu-py",
)


def _port_free(port: int) -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            if kind == socket.SOCK_STREAM:
                # As servers do: connections in TIME_WAIT do not hold the port, listeners do.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((HOST, port))
            except OSError:
                return False
    return True


class PortPool:
    """Listening ports for successive server starts: a fresh pair each time.

    coturn binds with SO_REUSEPORT, so a leftover instance on a reused port would share
    the traffic; fresh ports (checked free) rule that out.
    """

    def __init__(self, first: int = 13500) -> None:
        self.next = first

    def take(self) -> tuple[int, int]:
        while self.next < 16000:
            port = self.next
            self.next += 10
            if all(_port_free(p) for p in (port, port + 1, port + 2, port + 3)):
                return port, port + 2
        raise BenchError("no free listening ports left in 13500-16000")


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed ECDSA P-256 certificate for 127.0.0.1, shared by both servers."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "cert.pem"
    key_path = directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (SERVER_NOFILE, max(hard, SERVER_NOFILE)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def pinned(command: list[str], cpu: str | None) -> list[str]:
    if cpu is None or shutil.which("taskset") is None:
        return command
    return ["taskset", "-c", cpu, *command]


def stun_binding_ok(port: int, timeout: float = 0.2) -> bool:
    request = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12)  # Binding request, no attributes
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(request, (HOST, port))
            data = sock.recv(2048)
        except OSError:
            return False
    return len(data) >= 20 and data[8:20] == request[8:20] and data[0:2] == b"\x01\x01"


def _tcp_ok(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class Server:
    """A running server process."""

    variant: Variant
    auth: str  # "static" or "rest"
    port: int
    tls_port: int
    command: list[str]
    process: subprocess.Popen[bytes]
    log_path: Path
    started: float = field(default_factory=time.time)

    @property
    def pid(self) -> int:
        return self.process.pid

    def open_files_limit(self) -> str | None:
        """The server's "Max open files" (soft, hard), as the kernel reports it."""
        try:
            with open(f"/proc/{self.pid}/limits") as fh:
                for line in fh:
                    if line.startswith("Max open files"):
                        soft, hard = line.split()[3:5]
                        return f"{soft}/{hard}"
        except OSError:
            pass
        return None

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Stop the process (and only it) and wait until its ports are free."""
        process = self.process
        if process.poll() is None:
            # tsunagu drains on the first signal and exits at once on the second.
            for signum, wait in ((signal.SIGTERM, 1.0), (signal.SIGTERM, 2.0)):
                try:
                    process.send_signal(signum)
                except ProcessLookupError:
                    break
                try:
                    process.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            if process.poll() is None:
                process.kill()
                process.wait(5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if _port_free(self.port) and _port_free(self.tls_port):
                return
            time.sleep(0.05)
        raise BenchError(f"{self.variant.name}: ports {self.port}/{self.tls_port} still busy")


def coturn_command(
    variant: Variant,
    port: int,
    tls_port: int,
    auth: str,
    cert: Path,
    key: Path,
    workdir: Path,
    userdb: list[str] | None = None,
) -> list[str]:
    command = [
        "turnserver",
        "-n",
        "--no-cli",
        "--log-file",
        "stdout",
        "--pidfile",
        str(workdir / f"turnserver-{port}.pid"),
        *(userdb or ["--userdb", str(workdir / f"turndb-{port}")]),
        "--listening-ip",
        HOST,
        "-p",
        str(port),
        "--tls-listening-port",
        str(tls_port),
        "--relay-ip",
        HOST,
        "--min-port",
        str(RELAY_PORTS[0]),
        "--max-port",
        str(RELAY_PORTS[1]),
        "--realm",
        REALM,
        "--allow-loopback-peers",
        "--no-dtls",
        "--cert",
        str(cert),
        "--pkey",
        str(key),
    ]
    if auth == "rest":
        command += ["--use-auth-secret", "--static-auth-secret", REST_SECRET]
    elif userdb:
        command += ["--lt-cred-mech"]
    else:
        command += ["--lt-cred-mech", "--user", f"{USER[0]}:{USER[1]}"]
    if variant.relay_threads is not None:
        command += ["-m", str(variant.relay_threads)]
    return command


def tsunagu_command(
    variant: Variant,
    port: int,
    tls_port: int,
    auth: str,
    cert: Path,
    key: Path,
    userdb: list[str] | None = None,
) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "tsunagu",
        "serve",
        "-L",
        HOST,
        "-p",
        str(port),
        "--tls-listening-port",
        str(tls_port),
        "-E",
        HOST,
        "--no-web",
        "--allowed-peer-ip",
        HOST,
        "--min-port",
        str(RELAY_PORTS[0]),
        "--max-port",
        str(RELAY_PORTS[1]),
        "--realm",
        REALM,
        "--cert",
        str(cert),
        "--pkey",
        str(key),
        # One load generator, one source IP: without this the per-IP limit on 401 answers
        # (an amplification guard) would cap the allocation rate, and coturn has no such cap.
        "--unauth-rate",
        "1000000",
        # The same for the allocation quotas: the 2,000 and 10,000 allocations of one user
        # from one address are what the benchmark measures, and coturn's defaults have none.
        "--user-quota",
        "0",
        "--address-quota",
        "0",
    ]
    if auth == "rest":
        command += ["--use-auth-secret", "--static-auth-secret", REST_SECRET]
    elif userdb:
        command += userdb
    else:
        command += ["-u", f"{USER[0]}:{USER[1]}"]
    if variant.workers is not None:
        command += ["--workers", str(variant.workers)]
    if variant.relay_engine is not None:
        command += ["--relay-engine", variant.relay_engine]
    return command + list(variant.extra)


def start_server(
    variant: Variant,
    ports: PortPool,
    *,
    auth: str,
    cert: Path,
    key: Path,
    workdir: Path,
    cpu: str | None,
    timeout: float = 20.0,
    userdb: tuple[list[str], list[str]] | None = None,
) -> Server:
    """Start ``variant``; ``userdb`` is (coturn's options, tsunagu's options) for a user
    database that holds the users instead of the static one."""
    port, tls_port = ports.take()
    if variant.kind == "coturn":
        command = coturn_command(
            variant, port, tls_port, auth, cert, key, workdir, userdb[0] if userdb else None
        )
    else:
        command = tsunagu_command(
            variant, port, tls_port, auth, cert, key, userdb[1] if userdb else None
        )
    log_path = workdir / f"{variant.name}-{auth}-{port}.log"
    env = dict(os.environ)
    # tsunagu keeps its state (a generated certificate, unused here) in this directory.
    env["XDG_STATE_HOME"] = str(workdir / "state")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            pinned(command, cpu),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_raise_nofile,
            env=env,
        )
    server = Server(variant, auth, port, tls_port, command, process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            break
        if stun_binding_ok(port) and _tcp_ok(port) and _tcp_ok(tls_port):
            return server
        time.sleep(0.05)
    server.stop()
    tail = log_path.read_text(errors="replace")[-2000:]
    raise BenchError(f"{variant.name} did not start ({' '.join(command)}):\n{tail}")


@dataclass
class EchoPeer:
    """turnutils_peer, the UDP echo peer of coturn's test tools."""

    port: int
    process: subprocess.Popen[bytes]
    command: list[str]

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(3)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(3)


def start_echo_peer(cpu: str | None, first_port: int = 13400) -> EchoPeer | None:
    if shutil.which("turnutils_peer") is None:
        return None
    port = first_port
    while port < 13500 and not (_port_free(port) and _port_free(port + 1)):
        port += 2
    command = ["turnutils_peer", "-L", HOST, "-p", str(port)]
    process = subprocess.Popen(
        pinned(command, cpu),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    peer = EchoPeer(port, process, command)
    # Ready when it echoes.
    deadline = time.monotonic() + 5
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.1)
        while time.monotonic() < deadline:
            try:
                sock.sendto(b"ping", (HOST, port))
                if sock.recv(64) == b"ping":
                    return peer
            except OSError:
                pass
    peer.stop()
    raise BenchError("turnutils_peer did not echo")


def process_cpu(pid: int | None) -> float:
    """CPU seconds (user and system) process ``pid`` used so far; 0 when it is gone."""
    if pid is None:
        return 0.0
    from tsunagu.probe import procstat

    try:
        return procstat.sample(pid).cpu_seconds
    except OSError:
        return 0.0
