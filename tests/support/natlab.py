"""A NAT lab of network namespaces: a server on the "internet", a home router, a client.

Three namespaces per lab (names with a per-run prefix, deleted by exact name afterwards):

- ``inet``: the "internet", 198.18.0.1 and 198.18.0.2 on one link, where
  ``tsunagu serve --rfc5780`` listens on both (ports 3478 and 3479): :func:`serve_in`;
- ``rtr``: a home router, ``wan`` 198.18.0.10 and ``lan`` 10.77.0.1, forwarding, with
  nftables ``masquerade`` (endpoint-independent mapping: a "cone") or ``masquerade
  fully-random`` (a new port per destination: symmetric) and an input hook that drops what
  it did not ask for, as home routers do (/work/shared/NATLAB.md, trap 1); its UDP mappings
  last 3 s after one exchange (``nf_conntrack_udp_timeout`` in its namespace);
- ``cli``: the client, 10.77.0.2, behind the router (run things there with
  ``ip netns exec``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "DROP_UDP",
    "LINK_CLIENT",
    "LINK_SERVER",
    "PORT",
    "SERVER",
    "SERVER2",
    "WAN",
    "dropped_packets",
    "link_lab",
    "nat_lab",
    "serve_in",
]

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
    """The three namespaces (inet, rtr, cli) with a router of ``kind``: cone, full-cone
    (masquerade, and inbound UDP on any port sent on to the client) or symmetric."""
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
            + (
                # Full cone: whatever comes in on any UDP port goes to the one host (a DMZ).
                "  chain prerouting { type nat hook prerouting priority dstnat; policy accept;\n"
                f'    iifname "{wan}" meta l4proto udp dnat to 10.77.0.2\n'
                "  }\n"
                if kind == "full-cone"
                else ""
            )
            + "}\n"
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
    tmp.mkdir(parents=True, exist_ok=True)
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


# --- two hosts on one link: a server and a browser ---------------------------------------------

LINK_SERVER = "198.18.0.1"
LINK_CLIENT = "198.18.0.2"
DROP_UDP = (
    "table inet clientrules {\n"
    "  chain out { type filter hook output priority 0; policy accept;\n"
    '    oifname "lo" accept\n'
    "    meta l4proto udp counter drop\n"
    "  }\n"
    "}\n"
)
"""The client's rules for a network that blocks UDP (the counter counts what they dropped)."""


@contextlib.contextmanager
def link_lab(tmp: Path, *, client_rules: str | None = None) -> Iterator[tuple[str, str, Path]]:
    """Namespaces ``server`` and ``client`` on one veth pair (``LINK_SERVER`` and
    ``LINK_CLIENT``), with nftables ``client_rules`` in the client (a table named
    ``clientrules``). Yields both names and a Chromium executable that runs in the client."""
    from support.browser import CHROMIUM

    _tools()
    prefix = f"tl{secrets.token_hex(3)}"
    server, client = f"{prefix}-srv", f"{prefix}-cli"
    made: list[str] = []
    try:
        for ns in (server, client):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        a, b = f"{prefix}a", f"{prefix}b"
        sh(
            "ip",
            "link",
            "add",
            a,
            "netns",
            server,
            "type",
            "veth",
            "peer",
            "name",
            b,
            "netns",
            client,
        )
        sh("ip", "-n", server, "addr", "add", f"{LINK_SERVER}/24", "dev", a)
        sh("ip", "-n", client, "addr", "add", f"{LINK_CLIENT}/24", "dev", b)
        sh("ip", "-n", server, "link", "set", a, "up")
        sh("ip", "-n", client, "link", "set", b, "up")
        if client_rules is not None:
            rules = tmp / "client.nft"
            rules.write_text(client_rules)
            sh("ip", "netns", "exec", client, "nft", "-f", str(rules))
        wrapper = tmp / "chromium-in-client"
        wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {client} {CHROMIUM} "$@"\n')
        wrapper.chmod(0o755)
        yield server, client, wrapper
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def dropped_packets(client: str) -> int:
    """What the counter in the client's ``clientrules`` table has counted."""
    out = subprocess.run(
        ["ip", "netns", "exec", client, "nft", "list", "table", "inet", "clientrules"],
        capture_output=True,
        text=True,
        timeout=20,
    ).stdout
    for line in out.splitlines():
        if "counter packets" in line:
            return int(line.split("counter packets", 1)[1].split()[0])
    raise AssertionError(out)
