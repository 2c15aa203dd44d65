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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DROP_UDP",
    "Internet",
    "ROUTER_KINDS",
    "Site",
    "LINK_CLIENT",
    "LINK_SERVER",
    "PORT",
    "SERVER",
    "SERVER2",
    "WAN",
    "dropped_packets",
    "internet_lab",
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


# --- an internet of sites: each a router of some kind and the hosts behind it ----------------

ROUTER_KINDS = ("cone", "symmetric", "full-cone", "tcp443", "proxy")
"""What a site's router does with its hosts' traffic:

- ``cone``: ``masquerade`` (endpoint-independent mapping), unsolicited input dropped;
- ``symmetric``: ``masquerade fully-random`` (a new port per destination);
- ``full-cone``: ``cone``, and any inbound UDP sent on to the first host (a DMZ);
- ``tcp443``: ``cone``, but only TCP to port 443 is forwarded out (UDP blocked);
- ``proxy``: nothing forwarded; the site's only way out is a proxy on the router's LAN
  address (``run_squid(..., netns=site.router)`` in tests/support/proxy.py starts one).
"""


@dataclass(frozen=True)
class Site:
    """One site of an :func:`internet_lab`."""

    kind: str
    router: str
    hosts: tuple[str, ...]
    wan: str
    """The router's address on the internet."""
    addresses: tuple[str, ...]
    """Each host's address on the site's LAN (the gateway is ``gateway``)."""
    gateway: str
    network: str
    """The LAN, as CIDR."""
    chromium: tuple[Path, ...]
    """An executable per host that runs Chromium in that host's namespace."""

    @property
    def host(self) -> str:
        return self.hosts[0]

    @property
    def address(self) -> str:
        return self.addresses[0]

    def run(self, *argv: str, host: int = 0) -> list[str]:
        """A command line that runs ``argv`` on one of the site's hosts."""
        return ["ip", "netns", "exec", self.hosts[host], *argv]


@dataclass(frozen=True)
class Internet:
    """The internet namespace and its sites."""

    inet: str
    sites: tuple[Site, ...]

    def crossed(self) -> int:
        """IPv4 packets the internet has forwarded between sites or received from them so far
        (the ``crossed`` counter of its bridge)."""
        out = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                self.inet,
                "nft",
                "list",
                "counter",
                "bridge",
                "lab",
                "crossed",
            ],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
        for line in out.splitlines():
            if line.strip().startswith("packets "):
                return int(line.split()[1])
        raise AssertionError(out)


def _router_rules(kind: str, wan: str, lan: str, first_host: str, extra: str) -> str:
    nat = {
        "cone": "masquerade",
        "tcp443": "masquerade",
        "full-cone": "masquerade",
        "symmetric": "masquerade fully-random",
    }.get(kind)
    rules = ""
    if nat is not None:
        rules += (
            "table ip nat {\n"
            "  chain postrouting { type nat hook postrouting priority srcnat; policy accept;\n"
            f'    oifname "{wan}" {nat}\n'
            "  }\n"
        )
        if kind == "full-cone":
            rules += (
                "  chain prerouting { type nat hook prerouting priority dstnat; policy accept;\n"
                f'    iifname "{wan}" meta l4proto udp dnat to {first_host}\n'
                "  }\n"
            )
        rules += "}\n"
    forward = ""
    if kind == "tcp443":
        forward = (
            "  chain forward { type filter hook forward priority filter; policy drop;\n"
            "    ct state established,related accept\n"
            f'    iifname "{lan}" oifname "{wan}" tcp dport 443 accept\n'
            f'    iifname "{lan}" oifname "{wan}" counter\n'
            "  }\n"
        )
    rules += (
        "table inet home {\n"
        "  chain input { type filter hook input priority filter; policy drop;\n"
        "    ct state established,related accept\n"
        '    iifname "lo" accept\n'
        f'    iifname "{lan}" accept\n'
        "    icmp type echo-request accept\n"
        "  }\n" + forward + "}\n"
    )
    return rules + extra


@contextlib.contextmanager
def internet_lab(
    tmp: Path,
    *kinds: str,
    hosts: int | Sequence[int] = 1,
    router_rules: Sequence[str] | None = None,
) -> Iterator[Internet]:
    """An "internet" namespace (a bridge holding ``SERVER`` and ``SERVER2``; its default
    route leads nowhere, as /work/shared/NATLAB.md trap 2 asks) and one site per kind in
    ``kinds`` (:data:`ROUTER_KINDS`). Site ``i`` has router WAN 198.18.0.(10+i) and LAN
    10.(80+i).0.0/24 with the router at .1 and ``hosts`` hosts from .2 on; each host has a
    default route through its router. ``router_rules`` adds nftables text per site.

    UDP mappings of the routers last 30 s after their last packet; everything is deleted
    by exact name afterwards."""
    _tools()
    for kind in kinds:
        assert kind in ROUTER_KINDS, kind
    counts = [hosts] * len(kinds) if isinstance(hosts, int) else list(hosts)
    extras = list(router_rules) if router_rules is not None else [""] * len(kinds)
    prefix = f"ti{secrets.token_hex(3)}"
    inet = f"{prefix}-inet"
    made: list[str] = []

    def netns(name: str) -> str:
        sh("ip", "netns", "add", name)
        made.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    try:
        netns(inet)
        sh("ip", "-n", inet, "link", "add", "name", "wire", "type", "bridge")
        for address in (SERVER, SERVER2):
            sh("ip", "-n", inet, "addr", "add", f"{address}/24", "dev", "wire")
        sh("ip", "-n", inet, "link", "set", "wire", "up")
        # Everything not in the lab goes into a link whose far end drops it.
        sh(
            "ip",
            "-n",
            inet,
            "link",
            "add",
            "name",
            "void",
            "type",
            "veth",
            "peer",
            "name",
            "void-end",
        )
        sh("ip", "-n", inet, "addr", "add", "198.19.255.1/30", "dev", "void")
        for dev in ("void", "void-end"):
            sh("ip", "-n", inet, "link", "set", dev, "up")
        sh("ip", "-n", inet, "route", "add", "default", "via", "198.19.255.2")
        counter = tmp / "internet.nft"
        counter.write_text(
            "table bridge lab {\n"
            "  chain forward { type filter hook forward priority filter; policy accept;\n"
            "    ether type ip counter name crossed\n"
            "  }\n"
            "  chain input { type filter hook input priority filter; policy accept;\n"
            "    ether type ip counter name crossed\n"
            "  }\n"
            "  counter crossed { }\n"
            "}\n"
        )
        sh("ip", "netns", "exec", inet, "nft", "-f", str(counter))
        sites: list[Site] = []
        for i, (kind, count, extra) in enumerate(zip(kinds, counts, extras, strict=True)):
            router = netns(f"{prefix}-r{i}")
            wan_dev, lan_dev, port = f"{prefix}w{i}", f"{prefix}l{i}", f"{prefix}p{i}"
            sh("ip", "link", "add", port, "netns", inet, "type", "veth", "peer", "name", wan_dev,
               "netns", router)  # fmt: skip
            sh("ip", "-n", inet, "link", "set", port, "master", "wire")
            sh("ip", "-n", inet, "link", "set", port, "up")
            wan = f"198.18.0.{10 + i}"
            gateway = f"10.{80 + i}.0.1"
            sh("ip", "-n", router, "addr", "add", f"{wan}/24", "dev", wan_dev)
            sh("ip", "-n", router, "link", "set", wan_dev, "up")
            sh("ip", "-n", router, "link", "add", "name", lan_dev, "type", "bridge")
            sh("ip", "-n", router, "addr", "add", f"{gateway}/24", "dev", lan_dev)
            sh("ip", "-n", router, "link", "set", lan_dev, "up")
            forwarding = "0" if kind == "proxy" else "1"
            sh("ip", "netns", "exec", router, "sysctl", "-qw", f"net.ipv4.ip_forward={forwarding}")
            names: list[str] = []
            addresses: list[str] = []
            wrappers: list[Path] = []
            for j in range(count):
                host = netns(f"{prefix}-h{i}{j}")
                address = f"10.{80 + i}.0.{2 + j}"
                inside, outside = f"{prefix}e{i}{j}", f"{prefix}x{i}{j}"
                sh("ip", "link", "add", outside, "netns", router, "type", "veth", "peer", "name",
                   inside, "netns", host)  # fmt: skip
                sh("ip", "-n", router, "link", "set", outside, "master", lan_dev)
                sh("ip", "-n", router, "link", "set", outside, "up")
                sh("ip", "-n", host, "addr", "add", f"{address}/24", "dev", inside)
                sh("ip", "-n", host, "link", "set", inside, "up")
                sh("ip", "-n", host, "route", "add", "default", "via", gateway)
                wrapper = tmp / f"chromium-{i}{j}"
                wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {host} {_chromium()} "$@"\n')
                wrapper.chmod(0o755)
                names.append(host)
                addresses.append(address)
                wrappers.append(wrapper)
            rules = tmp / f"router-{i}.nft"
            rules.write_text(_router_rules(kind, wan_dev, lan_dev, addresses[0], extra))
            if rules.read_text():
                sh("ip", "netns", "exec", router, "nft", "-f", str(rules))
            sh("ip", "netns", "exec", router, "sysctl", "-qw",
               "net.netfilter.nf_conntrack_udp_timeout=30")  # fmt: skip
            sites.append(
                Site(
                    kind,
                    router,
                    tuple(names),
                    wan,
                    tuple(addresses),
                    gateway,
                    f"10.{80 + i}.0.0/24",
                    tuple(wrappers),
                )  # fmt: skip
            )
        yield Internet(inet, tuple(sites))
    finally:
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def _chromium() -> str:
    from support.browser import CHROMIUM

    return CHROMIUM
