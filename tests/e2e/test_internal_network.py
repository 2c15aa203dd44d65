"""``--internal-network``: a call inside the office never touches the internet, and nobody
from outside gets into it.

The lab (tests/support/natlab.py) is an "internet" and two sites behind cone routers. The
office has three hosts: tsunagu on the third with ``--internal-network`` set to the office
LAN, two people in Chromium on the other two. Their call runs with video while the counter
on the internet's bridge stays where it was: no packet of it left the office. Ada's host
also holds a public address, which her browser offers as a candidate; the server keeps it
from Bo, who is told only addresses inside the office. The office
router forwards the web port from its WAN address to the server, so a person at home opens
the same room through it: the page loads (and the counter moves, which shows that it
counts), the join is refused with ``outside-network`` and the page says why, the server's
log says so once, and the call inside goes on, still without crossing the internet.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page

from support.audit import audit_records
from support.browser import Server, chromium, free_ports, run_server, wait_connected
from support.natlab import internet_lab

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

# internet_lab numbers its sites: the first one's router has WAN 198.18.0.10 and LAN
# 10.80.0.0/24 with hosts from 10.80.0.2 on. The router's rules are written before the lab
# exists, so they name these addresses directly (checked once the lab is up).
OFFICE_WAN = "198.18.0.10"
OFFICE_LAN = "10.80.0.0/24"
SERVER_ADDRESS = "10.80.0.4"
HOME_WAN = "198.18.0.11"
PUBLIC_ALIAS = "198.18.0.50"
"""A public address Ada's host holds besides its office one (on the same interface): her
browser gathers a candidate on it, which must never reach Bo."""
ROOM = "board"
STEP_MS = 20_000
log_figures = logging.getLogger(__name__)


def port_forward(port: int) -> str:
    """The office router's port forward of the web port to the server (a table of its own,
    beside the lab's ``nat``)."""
    return (
        "table ip portfwd {\n"
        "  chain prerouting { type nat hook prerouting priority dstnat; policy accept;\n"
        f"    ip daddr {OFFICE_WAN} tcp dport {port} dnat to {SERVER_ADDRESS}\n"
        "  }\n"
        "}\n"
    )


async def person(browser: Browser, url: str) -> Page:
    page = await (await browser.new_context()).new_page()
    await page.goto(url)
    try:
        await page.wait_for_function(
            "() => window.tsunagu?.state?.().joined || window.tsunagu?.state?.().ended",
            timeout=STEP_MS,
        )
    except Exception as exc:
        state = await page.evaluate("window.tsunagu?.state?.()")
        raise AssertionError(f"{url}: {state}\n{await page.inner_text('body')}") from exc
    return page


async def frames(page: Page) -> dict[str, Any]:
    (stats,) = await page.evaluate("window.tsunagu.stats()")
    return dict(stats)


async def video_keeps_flowing(pages: list[Page], seconds: float) -> list[dict[str, Any]]:
    """Every page decodes more frames from its one peer over ``seconds``, still connected."""
    before = [(await frames(page))["framesDecoded"] for page in pages]
    await asyncio.sleep(seconds)
    after = [await frames(page) for page in pages]
    for page, first, stats in zip(pages, before, after, strict=True):
        peers = await page.evaluate("window.tsunagu.peers()")
        assert [p["connectionState"] for p in peers] == ["connected"], peers
        assert stats["framesDecoded"] > first + 10, (first, stats)
    return after


async def first_frames(page: Page) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    for _ in range(60):
        found = await page.evaluate("window.tsunagu.stats()")
        if len(found) == 1 and found[0]["framesDecoded"] > 0:
            return dict(found[0])
        stats = {"stats": found}
        await asyncio.sleep(0.5)
    raise AssertionError(f"no decoded frames: {stats}")


def inside(address: str) -> bool:
    return ipaddress.ip_address(address) in ipaddress.ip_network(OFFICE_LAN)


async def candidates(page: Page, which: str) -> list[str]:
    """The addresses of the candidates in the ``localDescription`` or ``remoteDescription``
    of the page's one peer connection (trickled ones included)."""
    sdp: str = await page.evaluate(
        """(which) => {
            const [peer] = window.tsunagu.peers();
            return window.tsunagu.peerConnection(peer.id)[which].sdp;
        }""",
        which,
    )
    return [line.split()[4] for line in sdp.splitlines() if line.startswith("a=candidate:")]


async def logged(server: Server, text: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in server.log_text():
        assert time.monotonic() < deadline, f"not logged: {text!r}\n{server.log_text()}"
        await asyncio.sleep(0.5)
    return server.log_text()


def add_address(host: str, address: str) -> None:
    """``address`` on the LAN interface of ``host`` (a namespace), beside its own."""
    links = subprocess.run(
        ("ip", "-n", host, "-o", "link", "show"),
        capture_output=True,
        text=True,
        check=True,
        timeout=20,
    ).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()]
    (lan,) = [name for name in names if name != "lo"]
    command = ("ip", "-n", host, "addr", "add", f"{address}/32", "dev", lan)
    subprocess.run(command, check=True, timeout=20)


async def test_a_call_inside_stays_inside_and_outsiders_are_refused(tmp_path: Path) -> None:
    (web_port,) = free_ports(1)
    rules = [port_forward(web_port), ""]
    with internet_lab(tmp_path, "cone", "cone", hosts=(3, 1), router_rules=rules) as net:
        office, home = net.sites
        assert (office.wan, office.network, office.addresses[2]) == (
            OFFICE_WAN,
            OFFICE_LAN,
            SERVER_ADDRESS,
        )
        assert home.wan == HOME_WAN
        add_address(office.hosts[0], PUBLIC_ALIAS)
        (tmp_path / "serve").mkdir()
        # The web port is chosen above, for the router's port forward; the later flag wins.
        with run_server(
            tmp_path / "serve",
            "--internal-network",
            OFFICE_LAN,
            "--web-port",
            str(web_port),
            host=SERVER_ADDRESS,
            wrap=("ip", "netns", "exec", office.hosts[2]),
        ) as server:
            printed = "".join(server.output)
            assert f"tsunagu: calls stay inside the internal networks {OFFICE_LAN}:" in printed
            # An internal address is no loopback: HTTPS with the generated certificate, whose
            # printed SPKI each browser accepts (the visitor's too: its page, reached through
            # the router's address the certificate does not name, must load to say why it
            # cannot join).
            assert server.scheme == "https", printed
            inside_url = f"https://{SERVER_ADDRESS}:{web_port}/r/{ROOM}"
            outside_url = f"https://{OFFICE_WAN}:{web_port}/r/{ROOM}"
            trust = f"--ignore-certificate-errors-spki-list={server.spki}"
            async with (
                chromium(trust, executable=str(office.chromium[0])) as ada_browser,
                chromium(trust, executable=str(office.chromium[1])) as bo_browser,
                chromium(trust, executable=str(home.chromium[0])) as visitor_browser,
            ):
                start = net.crossed()
                ada = await person(ada_browser, f"{inside_url}?name=Ada")
                bo = await person(bo_browser, f"{inside_url}?name=Bo")
                pages = [ada, bo]
                try:
                    await asyncio.gather(*(wait_connected(page, 1) for page in pages))
                except Exception as exc:
                    raise AssertionError("".join(server.output) + server.log_text()) from exc
                for page in pages:
                    stats = await first_frames(page)
                    assert inside(stats["remote"]["address"]), stats
                    # What the other side was told: addresses inside the office only.
                    told = await candidates(page, "remoteDescription")
                    assert told and all(inside(a) for a in told), told
                # Ada did offer her public address; the server kept it from Bo.
                assert PUBLIC_ALIAS in await candidates(ada, "localDescription")
                await video_keeps_flowing(pages, 3.0)
                during_call = net.crossed()
                assert during_call == start, (
                    f"{during_call - start} packets of the office call crossed the internet"
                )

                # Someone at home opens the room through the port forward.
                visitor = await person(visitor_browser, f"{outside_url}?name=Eve")
                state = await visitor.evaluate("window.tsunagu.state()")
                assert state["ended"] and not state["joined"], state
                title = await visitor.text_content("#ended-title")
                text = await visitor.text_content("#ended-text") or ""
                assert title == "Calls stay inside the internal network", title
                assert f"comes from {HOME_WAN}, outside it" in text, text
                assert await visitor.is_visible("#ended")
                await visitor.screenshot(path=str(tmp_path / "refused.png"))
                assert not await visitor.evaluate("window.tsunagu.peers()")
                await visitor_browser.close()
                visited = net.crossed()
                # The counter counts: the visitor's page, its scripts and its WebSocket.
                assert visited > during_call + 10, (during_call, visited)

                # The call inside was not disturbed, and still does not cross.
                await asyncio.sleep(1.0)
                settled = net.crossed()
                for page in pages:
                    peers = await page.evaluate("window.tsunagu.peers()")
                    assert len(peers) == 1, peers
                final = await video_keeps_flowing(pages, 3.0)
                assert net.crossed() == settled, (settled, net.crossed())
                log = await logged(server, f"signaling: refused 1 join from {HOME_WAN}")
                assert "outside the internal networks 10.80.0.0/24" in log
                joined = audit_records(server.log_text(), ("peer-joined",))
                assert sorted(r["name"] for r in joined) == ["Ada", "Bo"], joined
                log_figures.info(
                    "internet packets: %d before the call, %d after it, %d after the visitor,"
                    " %d at the end; paths %s; frames decoded %s",
                    start,
                    during_call,
                    visited,
                    net.crossed(),
                    [f"{s['path']['kind']} to {s['remote']['address']}" for s in final],
                    [s["framesDecoded"] for s in final],
                )
