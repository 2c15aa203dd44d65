"""The connectivity ladder, climbed by aioice agents across real NATs in network namespaces.

One lab for the module (tests/support/natlab.py ``internet_lab``): ``tsunagu serve`` in the
"internet" (TURN on UDP 3478, TLS and TCP on 443, peers in the lab's public range allowed),
and seven sites behind their routers: two endpoint-independent ("cone") NATs, two symmetric
NATs, a full cone, a network that lets out only TCP to port 443, and one whose only way out
is squid with basic authentication on its router. Two agents on two sites find each other
through files (tests/support/ice_agent.py) and must exchange datagrams:

- cone with cone: directly, with STUN alone (hole punching);
- cone with symmetric, and symmetric with symmetric: not with STUN alone, but through the
  relay;
- full cone with symmetric: directly, with STUN alone (the full cone takes the symmetric
  side's packets from any port);
- UDP blocked: through the relay over TURN TCP, and over TURN TLS, on 443;
- proxy only: through the relay over TURN TLS on 443, the TCP connection opened through the
  proxy's CONNECT with its password.

``tsunagu probe turn`` from the blocked networks names them: UDP blocked; nothing gets out
without the proxy; only the proxy gets out.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support.browser import run_server
from support.natlab import SERVER, Internet, Site, internet_lab
from support.proxy import PASSWORD, USER, Squid, run_squid

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

AGENT = Path(__file__).resolve().parents[1] / "support" / "ice_agent.py"
TURN_PORT = 3478
TLS_PORT = 443
LAB_PUBLIC = "198.18.0.0-198.19.255.255"
KINDS = ("cone", "cone", "symmetric", "symmetric", "full-cone", "tcp443", "proxy")


@dataclass(frozen=True)
class Lab:
    net: Internet
    squid: Squid
    cafile: Path
    tmp: Path

    def site(self, kind: str, number: int = 0) -> Site:
        return [s for s in self.net.sites if s.kind == kind][number]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("natlab")
    (tmp / "serve").mkdir()
    with internet_lab(tmp, *KINDS) as net:
        proxy_site = next(s for s in net.sites if s.kind == "proxy")
        with (
            run_squid([TLS_PORT], netns=proxy_site.router, host=proxy_site.gateway) as squid,
            run_server(
                tmp / "serve",
                "--listening-port",
                str(TURN_PORT),
                "--tls-listening-port",
                str(TLS_PORT),
                "--allowed-peer-ip",
                LAB_PUBLIC,
                "-u",
                "alice:secret",
                host=SERVER,
                wrap=("ip", "netns", "exec", net.inet),
            ) as server,
        ):
            match = re.search(r"TLS certificate (\S+)", "".join(server.output))
            assert match is not None, server.output
            yield Lab(net, squid, Path(match.group(1)), tmp)


def pair(
    lab: Lab, name: str, one: tuple[Site, list[str]], other: tuple[Site, list[str]]
) -> list[dict[str, Any]]:
    """Run an agent on each site with its options; both reports."""
    exchange = lab.tmp / name
    exchange.mkdir()
    commands = []
    for (site, options), me, peer, controlling in (
        (one, "a", "b", True),
        (other, "b", "a", False),
    ):
        argv = [sys.executable, str(AGENT), "--name", me, "--peer", peer]
        argv += ["--exchange", str(exchange), *options]
        commands.append(site.run(*argv, *(["--controlling"] if controlling else [])))

    def run(command: list[str]) -> dict[str, Any]:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        lines = done.stdout.strip().splitlines()
        assert done.returncode == 0 and lines, (command, done.stdout, done.stderr[-2000:])
        report: dict[str, Any] = json.loads(lines[-1])
        return report

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return list(pool.map(run, commands))


def stun() -> list[str]:
    return ["--stun", f"{SERVER}:{TURN_PORT}"]


def turn_udp() -> list[str]:
    return ["--turn", f"{SERVER}:{TURN_PORT}"]


def kinds(report: dict[str, Any]) -> set[str]:
    return {line.split()[7] for line in report["candidates"]}


def test_cone_to_cone_connects_directly_with_stun_alone(lab: Lab) -> None:
    a, b = lab.site("cone", 0), lab.site("cone", 1)
    reports = pair(lab, "cone-cone", (a, stun()), (b, stun()))
    for report in reports:
        assert report["connected"] and report["received"] == 5, report
        assert kinds(report) == {"host", "srflx"}, report
        # Hole punching: the path runs between the two routers' public addresses.
        assert report["remote"] == "srflx", report
    assert reports[0]["remote_address"] == b.wan and reports[1]["remote_address"] == a.wan


def test_cone_to_symmetric_needs_the_relay(lab: Lab) -> None:
    cone, symmetric = lab.site("cone", 0), lab.site("symmetric")
    short = ["--connect-timeout", "8"]
    without = pair(lab, "cone-sym-stun", (cone, stun() + short), (symmetric, stun() + short))
    assert not any(r["connected"] for r in without), without
    reports = pair(lab, "cone-sym-turn", (cone, turn_udp()), (symmetric, turn_udp()))
    for report in reports:
        assert report["connected"] and report["received"] == 5, report
        assert "relay" in kinds(report), report
        assert "relay" in (report["local"], report["remote"]), report


def test_symmetric_with_symmetric_needs_the_relay(lab: Lab) -> None:
    one, other = lab.site("symmetric", 0), lab.site("symmetric", 1)
    short = ["--connect-timeout", "8"]
    without = pair(lab, "sym-sym-stun", (one, stun() + short), (other, stun() + short))
    assert not any(r["connected"] for r in without), without
    reports = pair(lab, "sym-sym-turn", (one, turn_udp()), (other, turn_udp()))
    for report in reports:
        assert report["connected"] and report["received"] == 5, report
        assert "relay" in (report["local"], report["remote"]), report


def test_full_cone_with_symmetric_connects_directly(lab: Lab) -> None:
    full, symmetric = lab.site("full-cone"), lab.site("symmetric", 0)
    reports = pair(lab, "full-sym", (full, stun()), (symmetric, stun()))
    for report in reports:
        assert report["connected"] and report["received"] == 5, report
        assert "relay" not in (report["local"], report["remote"]), report
    assert reports[1]["remote_address"] == full.wan, reports[1]


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_udp_blocked_relays_over_turn_tcp_on_443(lab: Lab, tls: bool) -> None:
    blocked, cone = lab.site("tcp443"), lab.site("cone", 0)
    over = ["--turn", f"{SERVER}:{TLS_PORT}", "--transport", "tcp"]
    if tls:
        over += ["--tls", "--cafile", str(lab.cafile)]
    name = "blocked-tls" if tls else "blocked-tcp"
    reports = pair(lab, name, (blocked, over), (cone, turn_udp()))
    for report in reports:
        assert report["connected"] and report["received"] == 5, report
    assert reports[0]["local"] == "relay", reports[0]
    # Nothing but the relay got out of the blocked network.
    assert kinds(reports[0]) == {"host", "relay"}, reports[0]


def test_proxy_only_relays_over_turn_tls_through_the_proxy(lab: Lab) -> None:
    behind, cone = lab.site("proxy"), lab.site("cone", 1)
    over = ["--turn", f"{SERVER}:{TLS_PORT}", "--transport", "tcp", "--tls"]
    over += ["--cafile", str(lab.cafile), "--proxy", lab.squid.url()]
    before = lab.squid.access_log().count(f"CONNECT {SERVER}:{TLS_PORT}")
    reports = pair(lab, "proxy-tls", (behind, over), (cone, turn_udp()))
    for report in reports:
        assert report["connected"] and report["received"] == 5, report
    assert reports[0]["local"] == "relay" and kinds(reports[0]) == {"host", "relay"}
    log = lab.squid.access_log()
    assert log.count(f"CONNECT {SERVER}:{TLS_PORT}") > before, log
    assert USER in log, log


def probe(site: Site, *argv: str) -> tuple[int, dict[str, Any]]:
    command = site.run(sys.executable, "-m", "tsunagu", "probe", "turn", *argv)
    command += ["-u", "alice:secret", "--timeout", "2", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    try:
        return done.returncode, json.loads(done.stdout)
    except json.JSONDecodeError:
        raise AssertionError((done.stdout, done.stderr)) from None


def test_probe_turn_names_the_blocked_networks(lab: Lab) -> None:
    udp = f"turn:{SERVER}:{TURN_PORT}"
    tls = f"turns:{SERVER}:{TLS_PORT}"
    pin = ["--ca", str(lab.cafile)]
    status, report = probe(lab.site("tcp443"), udp, tls, *pin)
    assert status == 1 and report["verdict"]["code"] == "udp-blocked", report
    assert [r["verdict"]["code"] for r in report["results"]] == ["no-answer", "ok"], report

    behind = lab.site("proxy")
    status, report = probe(behind, udp, tls, *pin)
    assert status == 1 and report["verdict"]["code"] == "blocked", report
    assert "--proxy" in report["verdict"]["advice"]

    status, report = probe(behind, udp, tls, *pin, "--proxy", lab.squid.url())
    assert status == 1 and report["verdict"]["code"] == "proxy-only", report
    assert report["results"][1]["verdict"]["code"] == "ok", report
    wrong = lab.squid.url(password=PASSWORD + "x")
    status, report = probe(behind, tls, *pin, "--proxy", wrong)
    assert status == 1 and report["verdict"]["code"] == "proxy-auth-failed", report

    # From a network with a way out, the same URLs are simply fine.
    status, report = probe(lab.site("cone", 0), udp, tls, *pin)
    assert status == 0 and report["verdict"]["code"] == "ok", report
