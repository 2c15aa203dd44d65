"""NAT behaviour discovery (RFC 5780) against a real ``tsunagu serve`` on loopback.

The server listens on 127.0.0.1 (primary) and 127.0.0.2 (alternate), each on the listening
port and the alternate port, in as many worker processes as it picks by default. On loopback
there is no NAT, so every client must conclude "endpoint-independent" (or "Open"):

- coturn's ``turnutils_natdiscovery`` (mapping, filtering, with PADDING, hairpinning, and the
  binding lifetime test, which uses RESPONSE-PORT);
- Debian's classic RFC 3489 client ``stun`` (package stun-client), which needs
  CHANGED-ADDRESS and an answer from the other address (``--stun-backward-compatibility``
  lets it in: it sends no magic cookie);
- raw requests from many client ports, spread over the workers by the kernel: each is
  answered from the address it asked for, whichever worker got it;
- RESPONSE-PORT answers stop at the unauthenticated budget;
- without ``--rfc5780`` (the default) CHANGE-REQUEST gets 420;
- tsunagu's own probe still measures Binding load.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.interop import HOST, ServeProcess, run_serve
from tsunagu.stun import (
    ChangeRequest,
    ErrorCode,
    MappedAddress,
    MessageClass,
    Method,
    OtherAddress,
    ResponseOrigin,
    ResponsePort,
    UnknownAttributes,
    XorMappedAddress,
    encode_message,
    parse_message,
)
from tsunagu.stun.framing import StreamFramer

pytestmark = pytest.mark.interop

HOST2 = "127.0.0.2"
NATDISCOVERY = "turnutils_natdiscovery"
STUN_CLIENT = "stun"


@dataclass
class Discovery:
    server: ServeProcess

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def alternate_port(self) -> int:
        return self.server.alt_port


def _serve(tmp: Path, *extra: str) -> Iterator[Discovery]:
    with run_serve(tmp, "--rfc5780", *extra, hosts=(HOST, HOST2)) as server:
        yield Discovery(server)


@pytest.fixture(scope="module")
def discovery(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Discovery]:
    yield from _serve(tmp_path_factory.mktemp("rfc5780"), "--stun-backward-compatibility")


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is not installed: run ./scripts/setup --test"
    return path


def _run(command: list[str], timeout: float = 60.0, *, status: int = 0) -> str:
    done = subprocess.run(command, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    output = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    assert done.returncode == status, output
    return output


def _binding(attributes: list[object], txid: bytes | None = None) -> bytes:
    return encode_message(
        Method.BINDING,
        MessageClass.REQUEST,
        txid if txid is not None else time.time_ns().to_bytes(12, "big"),
        attributes,  # type: ignore[arg-type]
    )


def _udp(timeout: float = 3.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    sock.settimeout(timeout)
    return sock


# --- third-party clients ----------------------------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["-P", "-H"]], ids=["plain", "padding-hairpinning"])
def test_natdiscovery_finds_endpoint_independent_mapping_and_filtering(
    discovery: Discovery, extra: list[str]
) -> None:
    output = _run([_tool(NATDISCOVERY), "-m", "-f", *extra, "-p", str(discovery.port), HOST])
    assert "NAT with Endpoint Independent Mapping!" in output, output
    assert "NAT with Endpoint Independent Filtering!" in output, output
    for failure in ("error", "timeout", "Cannot", "Not received", "ALG detected"):
        assert failure not in output, output
    # Test I names the other address; test II of the filtering test came from it.
    assert f"Other addr: : {HOST2}:{discovery.alternate_port}" in output, output
    assert f"Response origin: : {HOST2}:{discovery.alternate_port}" in output, output


def test_natdiscovery_binding_lifetime_uses_response_port(discovery: Discovery) -> None:
    # The second request, from a new socket, asks for the answer at the first socket's
    # port; natdiscovery reads it there (a second "RFC 5780 response").
    output = _run([_tool(NATDISCOVERY), "-t", "-T", "1", "-p", str(discovery.port), HOST])
    assert "RFC 5780 response 2" in output, output
    assert "timeout" not in output and "error" not in output, output


def test_the_classic_stun_client_sees_no_nat(discovery: Discovery) -> None:
    # Its exit status is the NAT type it found: 1, "Open".
    output = _run([_tool(STUN_CLIENT), f"{HOST}:{discovery.port}", "-v"], status=1)
    assert "Primary: Open" in output, output
    # Its test I found CHANGED-ADDRESS (our alternate address and port).
    assert f"ChangedAddress = {HOST2}:{discovery.alternate_port}" in output, output


# --- every worker answers from every address -------------------------------------------------


def test_each_change_is_answered_from_its_address_whichever_worker_has_the_client(
    discovery: Discovery,
) -> None:
    assert discovery.server.workers >= 2
    primary, alternate = discovery.port, discovery.alternate_port
    expected = {
        (False, False): (HOST, primary),
        (True, False): (HOST2, primary),
        (False, True): (HOST, alternate),
        (True, True): (HOST2, alternate),
    }
    # Many client ports: the kernel's hash spreads their 4-tuples over the workers.
    for flags, source in expected.items():
        for _ in range(12):
            with _udp() as sock:
                sock.sendto(_binding([ChangeRequest(*flags)]), (HOST, primary))
                data, came_from = sock.recvfrom(2048)
                client = sock.getsockname()
            response = parse_message(data)
            assert came_from == source, flags
            assert response.get(ResponseOrigin) == ResponseOrigin(*source)
            assert response.get(OtherAddress) == OtherAddress(HOST2, alternate)
            assert response.get(XorMappedAddress) == XorMappedAddress(*client)
            assert response.get(MappedAddress) == MappedAddress(*client)


def test_tcp_listens_on_the_alternate_port_without_rfc5780(discovery: Discovery) -> None:
    # As coturn: TCP listens there too, for symmetry; a connection cannot be answered from
    # another address, so it is a server without an alternate there.
    with socket.create_connection((HOST2, discovery.alternate_port), timeout=3.0) as sock:
        sock.sendall(_binding([]) + _binding([ChangeRequest(True, True)]))
        framer = StreamFramer()
        frames: list[bytes] = []
        while len(frames) < 2:
            framer.feed(sock.recv(4096))
            frames += [frame for _, frame in framer.frames()]
    plain, refused = (parse_message(frame) for frame in frames)
    assert plain.message_class is MessageClass.SUCCESS
    assert plain.get(OtherAddress) is None and plain.get(ResponseOrigin) is None
    error = refused.get(ErrorCode)
    assert error is not None and error.code == 420
    assert refused.get(UnknownAttributes) == UnknownAttributes((0x0003,))


# --- the budget -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def discovery_limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Discovery]:
    """Five full unauthenticated answers a second per address and worker, a burst of ten."""
    yield from _serve(tmp_path_factory.mktemp("rfc5780-limited"), "--unauth-rate", "5")


def _drain(sock: socket.socket, seconds: float) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + seconds
    sock.settimeout(0.05)
    while time.monotonic() < deadline:
        try:
            got.append(sock.recv(65536))
        except TimeoutError:
            continue
    return got


def test_response_port_stops_at_the_budget(discovery_limited: Discovery) -> None:
    with _udp() as sender, _udp() as target:
        port = target.getsockname()[1]
        # One 4-tuple: one worker, one budget of 10 at first, 5 a second after.
        started = time.monotonic()
        for _ in range(60):
            sender.sendto(_binding([ResponsePort(port)]), (HOST, discovery_limited.port))
        answers = _drain(target, 1.0)
        elapsed = time.monotonic() - started
        assert not _drain(sender, 0.1)  # none went to the sender's own port
    assert 1 <= len(answers) <= 10 + 5 * elapsed + 1, (len(answers), elapsed)
    # Retransmissions do not pay for a redirected answer: 40 copies of a 36-byte request
    # would pay for all their 68-byte answers beyond the budget (this 4-tuple may reach
    # another worker, with a budget of its own).
    with _udp() as sender, _udp() as target:
        request = _binding([ResponsePort(target.getsockname()[1])])
        started = time.monotonic()
        for _ in range(40):
            sender.sendto(request, (HOST, discovery_limited.port))
        answers = _drain(target, 0.5)
        assert len(answers) <= 10 + 5 * (time.monotonic() - started) + 1


def test_the_probe_still_measures_binding_load(discovery_limited: Discovery) -> None:
    command = [
        sys.executable,
        "-m",
        "tsunagu",
        "probe",
        f"{HOST}:{discovery_limited.port}",
        "--mode",
        "binding",
        "-d",
        "2",
        "--warmup",
        "0.2",
        "--binding-sockets",
        "2",
        "--binding-window",
        "2",
    ]
    result = json.loads(_probe_json(command))
    binding = result["binding"]
    assert binding["responses"] > 0 and binding["errors"] == 0
    # Every answer beyond the budget is withheld: the probe counts them as timed out.
    assert binding["timed_out"] > 0


def _probe_json(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout.decode()


# --- off by default ---------------------------------------------------------------------------


def test_without_rfc5780_change_request_gets_420(serve: ServeProcess) -> None:
    with _udp() as sock:
        for flags in ((True, False), (False, True), (True, True)):
            sock.sendto(_binding([ChangeRequest(*flags)]), (HOST, serve.port))
            data, came_from = sock.recvfrom(2048)
            assert came_from == (HOST, serve.port)
            response = parse_message(data)
            error = response.get(ErrorCode)
            assert error is not None and error.code == 420
            assert response.get(UnknownAttributes) == UnknownAttributes((0x0003,))
        # A plain Binding is what it always was.
        sock.sendto(_binding([]), (HOST, serve.port))
        plain = parse_message(sock.recv(2048))
        assert [type(a) for a in plain.attributes] == [XorMappedAddress]
