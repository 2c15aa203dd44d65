"""Two people in one room, one relayed over TURN/TCP and one over TURN/TLS, on the same port.

Each browser context is one person with Chromium's fake camera and microphone; the ICE
policy is "relay" and the page's ``?transport=`` keeps one transport's TURN URI per person.
Both URIs name one port, which takes TLS and plain TCP alike: once with the TLS port set
to the main port, once with an aux server on 127.0.0.1:443, where the page's TCP and TLS
URIs move (the port a locked-down firewall lets through).
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
from playwright.async_api import Page

from support.browser import (
    Server,
    chromium,
    free_ports,
    one_peer_video,
    port_free,
    run_server,
    wait_connected,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

STEP_MS = 15_000
HTTPS_PORT = 443


async def open_person(page: Page, url: str) -> None:
    await page.goto(url)
    await page.wait_for_function("() => window.tsunagu?.state?.().joined", timeout=STEP_MS)


@pytest.mark.parametrize("setup", ["tls-port-is-the-main-port", "aux-server-on-443"])
async def test_tcp_and_tls_relay_one_call_on_one_port(tmp_path: Path, setup: str) -> None:
    if setup == "aux-server-on-443":
        assert port_free(HTTPS_PORT), "port 443 on 127.0.0.1 is taken: this test needs it free"
        port = HTTPS_PORT
        extra = ["--aux-server", f"127.0.0.1:{HTTPS_PORT}"]
    else:
        (port,) = free_ports(1)
        # Given after run_server's own ports, these win.
        extra = ["--listening-port", str(port), "--tls-listening-port", str(port)]
    with run_server(tmp_path, "--ice-transport-policy", "relay", *extra) as server:
        await _call(server, port)


async def _call(server: Server, port: int) -> None:
    assert server.spki, "tsunagu serve did not print the SPKI of its TLS certificate"
    async with chromium(f"--ignore-certificate-errors-spki-list={server.spki}") as browser:
        pages: dict[str, Page] = {}
        for name, transport in (("Ada", "tcp"), ("Bo", "tls")):
            context = await browser.new_context()
            pages[transport] = await context.new_page()
            await open_person(
                pages[transport], f"{server.base}/r/one-port?name={name}&transport={transport}"
            )
        try:
            await asyncio.gather(*(wait_connected(page, 1) for page in pages.values()))
        except Exception as exc:
            raise AssertionError("".join(server.output)) from exc

        # Each page kept its one TURN URI, and both name the same port.
        expected = {
            "tcp": f"turn:127.0.0.1:{port}?transport=tcp",
            "tls": f"turns:127.0.0.1:{port}?transport=tcp",
        }
        for transport, page in pages.items():
            state = await page.evaluate("window.tsunagu.state()")
            urls = [u for s in state["iceServers"] for u in s["urls"] if u.startswith("turn")]
            assert urls == [expected[transport]], urls
            stats = await one_peer_video(page)
            assert stats["path"]["kind"] == "relay", stats
            assert stats["local"]["type"] == "relay", stats
            assert stats["local"]["relayProtocol"] == transport, stats

    server.process.send_signal(signal.SIGTERM)
    await asyncio.to_thread(server.process.wait, 15)
    # Every allocation came through the one port, over plain TCP and over TLS, and relayed.
    records = server.audit_records()
    assert {r["client"].split(":")[0] for r in records} == {"tcp", "tls"}, records
    assert all(r["client"].endswith(f"->127.0.0.1:{port}") for r in records), records
    for protocol in ("tcp", "tls"):
        assert any(
            r["client"].startswith(protocol + ":")
            and r["to_peers"]["packets"] > 0
            and r["to_client"]["packets"] > 0
            for r in records
        ), records
