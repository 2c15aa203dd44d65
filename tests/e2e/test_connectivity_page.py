"""The connectivity test page (``/test``) in Chromium: its verdict with every path open, with
a certificate the browser does not trust, and from a network that blocks UDP.

The UDP-blocked network is two network namespaces this test creates: the server on one side
of a veth pair, Chromium (started inside the other namespace through a small wrapper) on the
other, where nftables drops every outgoing UDP packet. Nothing is connected to the host's own
network.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser

from support.browser import CHROMIUM, ROOT, Server, chromium, run_server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

DONE_MS = 45_000
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


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


@contextlib.contextmanager
def udp_blocked_lab(tmp: Path) -> Iterator[tuple[str, str, Path]]:
    """Namespaces ``server`` and ``client`` on a veth pair (198.18.0.1 and .2); the client's
    outgoing UDP is dropped. Yields both names and a Chromium wrapper running in the client."""
    prefix = f"tsg{secrets.token_hex(3)}"
    server, client = f"{prefix}-srv", f"{prefix}-cli"
    made: list[str] = []
    try:
        for ns in (server, client):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh(
            "ip",
            "link",
            "add",
            f"{prefix}a",
            "netns",
            server,
            "type",
            "veth",
            "peer",
            "name",
            f"{prefix}b",
            "netns",
            client,
        )
        sh("ip", "-n", server, "addr", "add", "198.18.0.1/24", "dev", f"{prefix}a")
        sh("ip", "-n", client, "addr", "add", "198.18.0.2/24", "dev", f"{prefix}b")
        sh("ip", "-n", server, "link", "set", f"{prefix}a", "up")
        sh("ip", "-n", client, "link", "set", f"{prefix}b", "up")
        rules = tmp / "client.nft"
        rules.write_text(
            "table inet udpblock {\n"
            "  chain out { type filter hook output priority 0; policy accept;\n"
            '    oifname "lo" accept\n'
            "    meta l4proto udp counter drop\n"
            "  }\n"
            "}\n"
        )
        sh("ip", "netns", "exec", client, "nft", "-f", str(rules))
        wrapper = tmp / "chromium-in-client"
        wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {client} {CHROMIUM} "$@"\n')
        wrapper.chmod(0o755)
        yield server, client, wrapper
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def dropped_udp(client: str) -> int:
    out = subprocess.run(
        ["ip", "netns", "exec", client, "nft", "list", "table", "inet", "udpblock"],
        capture_output=True,
        text=True,
        timeout=20,
    ).stdout
    for line in out.splitlines():
        if "counter packets" in line:
            return int(line.split("counter packets", 1)[1].split()[0])
    raise AssertionError(out)


async def test_a_network_that_blocks_udp(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "the lab needs root for network namespaces"
    with udp_blocked_lab(tmp_path) as (server_ns, client_ns, wrapper):
        (tmp_path / "serve").mkdir()
        with run_server(
            tmp_path / "serve", host="198.18.0.1", wrap=("ip", "netns", "exec", server_ns)
        ) as server:
            assert server.spki
            async with chromium(
                f"--ignore-certificate-errors-spki-list={server.spki}", executable=str(wrapper)
            ) as browser:
                shots = ROOT / "docs" if UPDATE_SCREENSHOTS else tmp_path
                result = await run_test_page(browser, server, shots / "test-page.png")
            dropped = dropped_udp(client_ns)
    found = states(result)
    assert found["turn/udp"] == "fail" and found["stun/udp"] == "fail", result
    assert found["turn/tcp"] == "ok" and found["turn/tls"] == "ok", result
    assert dropped > 0, "the lab's UDP block never dropped anything"
    verdict = result["verdict"]
    assert verdict["code"] == "udp-blocked", verdict
    assert f"UDP {server.turn_port}" in verdict["advice"], verdict
    assert "198.18.0.1" in verdict["advice"], verdict
    assert result["roundTrip"]["ok"], result["roundTrip"]
