"""The connectivity test page (``/test``) in Chromium: its verdict with every path open, with
a certificate the browser does not trust, and from a network that blocks UDP.

The UDP-blocked network is two network namespaces this test creates: the server on one side
of a veth pair, Chromium (started inside the other namespace through a small wrapper) on the
other, where nftables drops every outgoing UDP packet. Nothing is connected to the host's own
network.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser

from support.browser import ROOT, Server, chromium, run_server
from support.natlab import DROP_UDP, LINK_SERVER, dropped_packets, link_lab

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

# Above the page's own bounds added up (10 s for the signaling answer, 10 s of gathering,
# 8 s to connect through the relay, 10 pings of at most 2 s): a loaded machine reaches them.
DONE_MS = 60_000
# The README's picture of the page is taken here, into docs/ only when asked.
UPDATE_SCREENSHOTS = os.environ.get("TSUNAGU_UPDATE_SCREENSHOTS") == "1"


async def run_test_page(browser: Browser, server: Server, shot: Path | None = None) -> Any:
    page = await (await browser.new_context(viewport={"width": 1100, "height": 1100})).new_page()
    await page.goto(f"{server.base}/test")
    await page.wait_for_function("() => window.tsunagu?.test?.().phase === 'done'", timeout=DONE_MS)
    result = await page.evaluate("window.tsunagu.test()")
    shown = await page.text_content("#verdict-title")
    assert result["verdict"] and shown == result["verdict"]["title"], (shown, result)
    report = await page.text_content("#report")
    assert report and f"verdict ({result['verdict']['code']})" in report, report
    if shot is not None:
        await page.screenshot(path=str(shot), full_page=True)
    return result


def states(result: dict[str, Any]) -> dict[str, str]:
    return {f"{c['kind']}/{c['transport']}": c["state"] for c in result["checks"]}


async def test_every_path_open(tmp_path: Path) -> None:
    with run_server(tmp_path) as server:
        assert server.spki
        async with chromium(f"--ignore-certificate-errors-spki-list={server.spki}") as browser:
            result = await run_test_page(browser, server, tmp_path / "test-page.png")
        # Without the certificate pinned, the same browser cannot open TLS: said in words.
        async with chromium() as browser:
            untrusted = await run_test_page(browser, server)
    assert states(result) == {
        "stun/udp": "ok",
        "turn/udp": "ok",
        "turn/tcp": "ok",
        "turn/tls": "ok",
    }, result
    assert result["verdict"]["code"] == "ok", result["verdict"]
    assert result["roundTrip"]["ok"] and result["roundTrip"]["via"].startswith("relay"), result
    assert states(untrusted)["turn/tls"] == "fail", untrusted
    assert untrusted["verdict"]["code"] == "tls-failed", untrusted["verdict"]
    assert "certificate" in untrusted["verdict"]["text"], untrusted["verdict"]


# --- a network that blocks UDP ---------------------------------------------------------------


async def test_a_network_that_blocks_udp(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "the lab needs root for network namespaces"
    with link_lab(tmp_path, client_rules=DROP_UDP) as (server_ns, client_ns, wrapper):
        (tmp_path / "serve").mkdir()
        with run_server(
            tmp_path / "serve", host=LINK_SERVER, wrap=("ip", "netns", "exec", server_ns)
        ) as server:
            assert server.spki
            async with chromium(
                f"--ignore-certificate-errors-spki-list={server.spki}", executable=str(wrapper)
            ) as browser:
                shots = ROOT / "docs" if UPDATE_SCREENSHOTS else tmp_path
                result = await run_test_page(browser, server, shots / "test-page.png")
            dropped = dropped_packets(client_ns)
    found = states(result)
    assert found["turn/udp"] == "fail" and found["stun/udp"] == "fail", result
    assert found["turn/tcp"] == "ok" and found["turn/tls"] == "ok", result
    assert dropped > 0, "the lab's UDP block never dropped anything"
    verdict = result["verdict"]
    assert verdict["code"] == "udp-blocked", verdict
    assert f"UDP {server.turn_port}" in verdict["advice"], verdict
    assert "198.18.0.1" in verdict["advice"], verdict
    assert result["roundTrip"]["ok"], result["roundTrip"]
