"""``tsunagu policy chrome`` in a real Chromium behind a firewall that opens a narrow UDP range.

The lab (tests/support/natlab.py) is an internet namespace with ``tsunagu serve`` on
198.18.0.1 and two sites, each a cone NAT router with one host. Site 0, the office, has a
router that lets UDP out only from the policy's source ports (an nftables ``forward`` filter,
which sees a packet before the NAT rewrites its source port, with a counter on what it drops)
and TCP only to the server's web and TURN ports. Chromium there runs with the file ``tsunagu
policy chrome`` printed as its managed policy, in /etc/chromium/policies/managed through a
mount namespace of its own (the machine's /etc is never touched); chrome://policy shows it
read. It calls Chromium on site 1 in a room, once with the server's ``--ice-transport-policy
relay`` (TURN/UDP, no local address gathered) and once with ``all`` (straight between the two
NATs): video flows over UDP, every UDP socket WebRTC holds in the office is bound inside the
range, and the router dropped nothing. Then the control: Chromium without the policy on the
same host calls the same person, and the router drops its UDP.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page

from support.browser import CHROMIUM, ROOT, Server, chromium, run_server, wait_connected
from support.natlab import SERVER, Site, internet_lab

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

LOW, HIGH = 41000, 41063
PORTS = f"{LOW}-{HIGH}"
SITE0_LAN = "10.80.0.0/24"
ROOM = "narrow-udp"

# Site 0's firewall: UDP out from the policy's range only, TCP out to the server's web and
# TURN ports only (filled into the set once the server has its ports). The forward hook runs
# before source NAT, so ``udp sport`` is the browser's own port.
FIREWALL = f"""
table inet narrowudp {{
  counter udp_dropped {{ }}
  set server_tcp {{ type inet_service; }}
  chain forward {{ type filter hook forward priority filter - 10; policy accept;
    ip saddr {SITE0_LAN} udp sport {LOW}-{HIGH} accept
    ip saddr {SITE0_LAN} meta l4proto udp counter name udp_dropped drop
    ip saddr {SITE0_LAN} ip daddr {SERVER} tcp dport @server_tcp accept
    ip saddr {SITE0_LAN} meta l4proto tcp drop
  }}
}}
"""


def nft(site: Site, *command: str) -> str:
    done = subprocess.run(
        ["ip", "netns", "exec", site.router, "nft", *command],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def dropped(site: Site) -> int:
    out = nft(site, "list", "counter", "inet", "narrowudp", "udp_dropped")
    for line in out.splitlines():
        if line.strip().startswith("packets "):
            return int(line.split()[1])
    raise AssertionError(out)


def policy_chrome(*flags: str) -> str:
    """What ``tsunagu policy chrome`` prints to standard output: the file, as written with
    ``tsunagu policy chrome > /etc/chromium/policies/managed/tsunagu.json``."""
    done = subprocess.run(
        [sys.executable, "-m", "tsunagu", "policy", "chrome", *flags],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "/etc/chromium/policies/managed/tsunagu.json" in done.stderr
    return done.stdout


def chromium_with_policy(tmp: Path, site: Site, policy: str) -> Path:
    """An executable that runs Chromium on the site's first host with ``policy`` as its
    managed policy: /etc/chromium (its own files, plus policies/managed/tsunagu.json) is a
    copy bind-mounted in a mount namespace of the browser's own."""
    etc = tmp / "etc-chromium"
    shutil.copytree("/etc/chromium", etc)
    managed = etc / "policies" / "managed"
    managed.mkdir(parents=True)
    (managed / "tsunagu.json").write_text(policy)
    inner = (
        f"mount --bind {shlex.quote(str(etc))} /etc/chromium && "
        f'exec ip netns exec {shlex.quote(site.host)} {CHROMIUM} "$@"'
    )
    wrapper = tmp / "chromium-with-policy"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'exec unshare --mount --propagation private sh -c {shlex.quote(inner)} sh "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def webrtc_ports(site: Site) -> list[int]:
    """Local ports of the UDP sockets WebRTC holds in Chromium on the site's first host.

    Chromium's other UDP sockets are left out: its DNS client's (connected to port 53) and
    its mDNS responder's (224.0.0.251:5353), neither of which WebRTC's port range governs.
    """
    out = subprocess.run(
        site.run("ss", "-H", "-uanp"), capture_output=True, text=True, timeout=20
    ).stdout
    ports = []
    for line in out.splitlines():
        fields = line.split()
        if "chromium" not in line or len(fields) < 5:
            continue
        local, peer = fields[3], fields[4]
        if peer.endswith(":53") or local.startswith("224.0.0.251:"):
            continue
        ports.append(int(local.rpartition(":")[2]))
    return ports


async def join(browser: Browser, server: Server, name: str) -> Page:
    page = await (await browser.new_context()).new_page()
    await page.goto(f"{server.base}/r/{ROOM}?name={name}")
    await page.wait_for_function("() => window.tsunagu?.state?.().joined", timeout=20_000)
    return page


async def frames(page: Page) -> dict[str, Any]:
    """The one connection's stats once video frames are being decoded (bounded wait)."""
    stats: list[dict[str, Any]] = []
    for _ in range(60):
        stats = await page.evaluate("window.tsunagu.stats()")
        if len(stats) == 1 and stats[0]["framesDecoded"] > 10:
            return stats[0]
        await asyncio.sleep(0.5)
    raise AssertionError(f"no decoded frames: {stats}")


async def on_udp(page: Page, stats: dict[str, Any]) -> dict[str, Any]:
    """The connection's stats once its selected pair leaves over UDP (bounded wait: 15 s).

    ICE may first select a pair whose checks finished first, a relayed TURN/TCP one, and
    switch to the higher-priority UDP pair once that one answers: which comes first depends
    on timing alone. A UDP path the firewall broke never answers, and the wait fails.
    """
    for _ in range(60):
        local = stats.get("local") or {}
        if local.get("protocol") == "udp" and stats["path"]["relayProtocol"] in ("udp", None):
            return stats
        await asyncio.sleep(0.25)
        now = await page.evaluate("window.tsunagu.stats()")
        stats = now[0] if len(now) == 1 else stats
    return stats


LOCAL_CANDIDATES = """async () => {
  const out = [];
  for (const p of window.tsunagu.peers()) {
    const report = await window.tsunagu.peerConnection(p.id).getStats();
    report.forEach((s) => {
      if (s.type === "local-candidate") {
        out.push({ type: s.candidateType, protocol: s.protocol, port: s.port,
                   relayProtocol: s.relayProtocol || null });
      }
    });
  }
  return out;
}"""


# chrome://policy draws its table inside shadow roots: read the text of the whole tree.
DEEP_TEXT = """() => {
  const walk = (n) => (n.shadowRoot ? walk(n.shadowRoot) : "") + [...n.childNodes]
    .map((c) => (c.nodeType === Node.TEXT_NODE ? c.textContent : walk(c))).join(" ");
  return walk(document.body).split(/\\s+/).join(" ");
}"""


async def policy_page(browser: Browser) -> str:
    """The text of chrome://policy once it lists the port range policy."""
    page = await (await browser.new_context()).new_page()
    await page.goto("chrome://policy")
    await page.wait_for_function(
        f"() => ({DEEP_TEXT})().includes('WebRtcUdpPortRange {LOW}')", timeout=15_000
    )
    text: str = await page.evaluate(DEEP_TEXT)
    await page.close()
    return text


HANDLING = {
    "relay": "default_public_interface_only",
    "all": "default_public_and_private_interfaces",
}


@pytest.mark.parametrize("ice", ["relay", "all"])
async def test_chromium_with_the_policy_calls_through_a_narrow_udp_range(
    tmp_path: Path, ice: str
) -> None:
    server_flags = ("--ice-transport-policy", ice)
    text = policy_chrome(*server_flags, "--browser-udp-ports", PORTS, "--public-host", SERVER)
    policy = json.loads(text)
    assert policy == {"WebRtcIPHandling": HANDLING[ice], "WebRtcUdpPortRange": PORTS}
    with internet_lab(tmp_path, "cone", "cone", router_rules=[FIREWALL, ""]) as net:
        office, home = net.sites
        (tmp_path / "serve").mkdir()
        with run_server(
            tmp_path / "serve",
            *server_flags,
            "--allowed-peer-ip",
            "198.18.0.0-198.19.255.255",
            host=SERVER,
            wrap=("ip", "netns", "exec", net.inet),
        ) as server:
            ports = f"{server.web_port}, {server.turn_port}, {server.tls_port}"
            nft(office, "add", "element", "inet", "narrowudp", "server_tcp", f"{{ {ports} }}")
            # A lab address is no loopback: the page is HTTPS with the generated certificate.
            assert server.scheme == "https", server.output
            trust = f"--ignore-certificate-errors-spki-list={server.spki}"
            wrapper = chromium_with_policy(tmp_path, office, text)
            async with chromium(trust, executable=str(home.chromium[0])) as outside:
                async with chromium(trust, executable=str(wrapper)) as inside:
                    shown = await policy_page(inside)
                    # Chromium read the file: both policies, from the platform, mandatory, OK.
                    for name, value in policy.items():
                        found = re.search(rf"{name} {value} Platform Machine Mandatory OK", shown)
                        assert found, shown
                    a = await join(inside, server, "Office")
                    b = await join(outside, server, "Home")
                    await asyncio.gather(wait_connected(a, 1), wait_connected(b, 1))
                    stats_a, stats_b = await asyncio.gather(frames(a), frames(b))
                    stats_a = await on_udp(a, stats_a)
                    candidates = await a.evaluate(LOCAL_CANDIDATES)
                    sockets = webrtc_ports(office)
                    during_call = dropped(office)
                # The control: the same host and router, Chromium without the policy, calls
                # the same person.
                async with chromium(trust, executable=str(office.chromium[0])) as plain:
                    await join(plain, server, "Unmanaged")
                    for _ in range(60):
                        if dropped(office) > during_call:
                            break
                        await asyncio.sleep(0.25)
                    unmanaged = webrtc_ports(office)
                    after = dropped(office)

    # Video flowed both ways; the office sent and received it over UDP: through the relay with
    # the relay policy, else on whichever path ICE found (relayed, or straight between the two
    # NATs). (At home, where nothing is filtered, Chromium may settle on TURN/TCP.)
    for stats in (stats_a, stats_b):
        assert stats["bytesReceived"] > 10_000, stats
    assert stats_a["local"]["protocol"] == "udp", stats_a
    assert stats_a["path"]["relayProtocol"] in ("udp", None), stats_a
    if ice == "relay":
        assert stats_a["path"]["label"] == "Relayed · TURN/UDP", stats_a
        # No local address exposed: the office gathered relayed candidates only.
        assert candidates and {c["type"] for c in candidates} == {"relay"}, candidates
    else:
        # getStats says so too: the host candidates over UDP carry ports of the range.
        host = [c["port"] for c in candidates if c["type"] == "host" and c["protocol"] == "udp"]
        assert host and all(LOW <= port <= HIGH for port in host), candidates
    # WebRTC in the office bound every UDP socket inside the range (one per address family for
    # the one connection)...
    assert sockets and all(LOW <= port <= HIGH for port in sockets), sockets
    # ...and the office's firewall dropped nothing of the call.
    assert during_call == 0, during_call
    # Without the policy, Chromium's UDP leaves from ports outside the range and is dropped.
    assert unmanaged and not any(LOW <= port <= HIGH for port in unmanaged), unmanaged
    assert after > during_call, (during_call, after)
