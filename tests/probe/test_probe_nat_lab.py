"""``tsunagu probe nat`` behind real NATs, in network namespaces this test creates.

Three namespaces per lab (names with a per-run prefix, deleted by exact name afterwards):

- ``inet``: the "internet", 198.18.0.1 and 198.18.0.2 on one link, where
  ``tsunagu serve --rfc5780`` listens on both (ports 3478 and 3479);
- ``rtr``: a home router, ``wan`` 198.18.0.10 and ``lan`` 10.77.0.1, forwarding, with
  nftables ``masquerade`` (endpoint-independent mapping: a "cone") or ``masquerade
  fully-random`` (a new port per destination: symmetric) and an input hook that drops what
  it did not ask for (docs: /work/shared/NATLAB.md, trap 1), as home routers do;
- ``cli``: the client, 10.77.0.2, behind the router; the probe runs there
  (``ip netns exec``).

Neither router hairpins or lets in an answer from an address or port the client has not sent
to. The cone router's UDP mappings last 3 s (``nf_conntrack_udp_timeout`` in its namespace),
which the lifetime test must find between 2 s and 4 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.interop

SERVER = "198.18.0.1"
SERVER2 = "198.18.0.2"
WAN = "198.18.0.10"
PORT = 3478
START_TIMEOUT = 20.0


def sh(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, timeout=20)
    assert done.returncode == 0, (args, done.stderr.decode(errors="replace"))


def _tools() -> None:
    assert os.geteuid() == 0, "the NAT lab needs root for network namespaces"
    for tool in ("ip", "nft"):
        assert shutil.which(tool), f"{tool} is not installed: run ./scripts/setup --test"


@contextlib.contextmanager
def nat_lab(tmp: Path, kind: str) -> Iterator[tuple[str, str, str]]:
    """The three namespaces (inet, rtr, cli) with a router of ``kind``: cone or symmetric."""
    _tools()
    prefix = f"tn{secrets.token_hex(3)}"
    inet, rtr, cli = f"{prefix}-inet", f"{prefix}-rtr", f"{prefix}-cli"
    wan, lan = f"{prefix}w", f"{prefix}l"
    made: list[str] = []
    try:
        for ns in (inet, rtr, cli):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        for (one, one_ns), (other, other_ns) in (
            ((f"{prefix}i", inet), (wan, rtr)),
            ((lan, rtr), (f"{prefix}c", cli)),
        ):
            peer = ("peer", "name", other, "netns", other_ns)
            sh("ip", "link", "add", one, "netns", one_ns, "type", "veth", *peer)
        for ns, dev, addresses in (
            (inet, f"{prefix}i", (f"{SERVER}/24", f"{SERVER2}/24")),
            (rtr, wan, (f"{WAN}/24",)),
            (rtr, lan, ("10.77.0.1/24",)),
            (cli, f"{prefix}c", ("10.77.0.2/24",)),
        ):
            for address in addresses:
                sh("ip", "-n", ns, "addr", "add", address, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", cli, "route", "add", "default", "via", "10.77.0.1")
        sh("ip", "netns", "exec", rtr, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        masquerade = "masquerade fully-random" if kind == "symmetric" else "masquerade"
        rules = tmp / f"{kind}.nft"
        rules.write_text(
            "table ip nat {\n"
            "  chain postrouting { type nat hook postrouting priority srcnat; policy accept;\n"
            f'    oifname "{wan}" {masquerade}\n'
            "  }\n"
            "}\n"
            "table inet home {\n"
            "  chain input { type filter hook input priority filter; policy drop;\n"
            "    ct state established,related accept\n"
            '    iifname "lo" accept\n'
            "    icmp type echo-request accept\n"
            "  }\n"
            "}\n"
        )
        sh("ip", "netns", "exec", rtr, "nft", "-f", str(rules))
        # A UDP mapping lives 3 s after its last packet (one exchange: "unreplied" timer).
        sh("ip", "netns", "exec", rtr, "sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=3")
        yield inet, rtr, cli
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


@contextlib.contextmanager
def serve_in(ns: str, tmp: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``tsunagu serve --rfc5780`` on both internet addresses; ready, then stopped by PID."""
    out_path = tmp / "serve.out"
    command = [
        "ip", "netns", "exec", ns, sys.executable, "-m", "tsunagu", "serve",
        "-L", SERVER, "-L", SERVER2, "--rfc5780", "-p", str(PORT),
        "--alt-listening-port", str(PORT + 1), "--no-web", "--no-tls",
        "-u", "alice:secret", "--drain-timeout", "1", "--log-file", str(tmp / "serve.log"),
    ]  # fmt: skip
    env = dict(os.environ, XDG_STATE_HOME=str(tmp / "state"), PYTHONUNBUFFERED="1")
    with open(out_path, "wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while "tsunagu: ready" not in out_path.read_text(errors="replace").splitlines():
            assert process.poll() is None, out_path.read_text(errors="replace")
            assert time.monotonic() < deadline, "tsunagu serve not ready in the lab in time"
            time.sleep(0.05)
        yield process
    finally:
        # ``ip netns exec`` execs the command: this PID is the server's.
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def probe_in(ns: str, *argv: str, timeout: float = 90.0) -> tuple[int, str, float]:
    started = time.monotonic()
    done = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "tsunagu", "probe", "nat", *argv],
        capture_output=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    elapsed = time.monotonic() - started
    return done.returncode, done.stdout.decode() + done.stderr.decode(), elapsed


def probe_json_in(ns: str, *argv: str) -> tuple[int, dict[str, Any], float]:
    status, out, elapsed = probe_in(ns, *argv, "--json")
    try:
        report: dict[str, Any] = json.loads(out)
    except json.JSONDecodeError:
        raise AssertionError(f"not JSON (status {status}): {out}") from None
    return status, report, elapsed


def test_cone_nat_is_endpoint_independent_mapping(tmp_path: Path) -> None:
    with nat_lab(tmp_path, "cone") as (inet, _, cli), serve_in(inet, tmp_path):
        url = f"stun:{SERVER}:{PORT}"
        status, report, elapsed = probe_json_in(cli, url, "--timeout", "1.5", "--lifetime-max", "8")
        human_status, out, _ = probe_in(cli, url, "--timeout", "1.5")
    figures = report["results"][0]["figures"]
    verdict = report["verdict"]
    assert status == 0 and human_status == 0, (status, human_status, out)
    assert verdict["code"] == "nat-cone", verdict
    assert figures["mapping"] == "endpoint-independent", figures
    assert figures["filtering"] == "address-and-port-dependent", figures
    assert figures["mapped"].startswith(f"{WAN}:") and figures["local"].startswith("10.77.0.2:")
    assert figures["hairpinning"] is False, figures
    lifetime = figures["lifetime"]
    assert lifetime["alive_s"] == 2.0 and lifetime["expired_s"] == 4.0, lifetime
    # Test I, II, III of mapping and two filtering tests costing 1.5 s each, 8 s of lifetime.
    assert elapsed < 30, f"the probe took {elapsed:.1f} s"
    assert "verdict: Endpoint-independent mapping, address-and-port-dependent filtering" in out
    assert "not with peers behind a symmetric NAT" in out, out


def test_symmetric_nat_is_address_and_port_dependent_mapping(tmp_path: Path) -> None:
    with nat_lab(tmp_path, "symmetric") as (inet, _, cli), serve_in(inet, tmp_path):
        url = f"stun:{SERVER}:{PORT}"
        status, report, elapsed = probe_json_in(cli, url, "--timeout", "1.5")
        human_status, out, _ = probe_in(cli, url, "--timeout", "1.5")
    figures = report["results"][0]["figures"]
    verdict = report["verdict"]
    assert status == 0 and human_status == 0, (status, human_status, out)
    assert verdict["code"] == "nat-symmetric", verdict
    assert figures["mapping"] == "address-and-port-dependent", figures
    assert figures["filtering"] == "address-and-port-dependent", figures
    assert figures["hairpinning"] is False, figures
    mapping = report["results"][0]["steps"][1]
    assert mapping["name"] == "mapping" and mapping["mapped_ii"] != figures["mapped"], mapping
    assert elapsed < 20, f"the probe took {elapsed:.1f} s"
    assert "verdict: Symmetric NAT (address-and-port-dependent mapping" in out, out
    assert "calls from here need TURN" in out, out
