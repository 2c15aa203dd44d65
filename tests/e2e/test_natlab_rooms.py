"""The video room in Chromium across real NATs (network namespaces, tests/support/natlab.py).

``tsunagu serve`` runs in the lab's "internet" with its web app, TURN on UDP and TLS on 443,
and peers in the lab's public range allowed. Each person is a Chromium on a host behind a
router of some kind, with a fake camera:

- a cone host and a symmetric host: the call runs through the relay (no hole punching
  between a port-restricted cone and a symmetric NAT);
- two cone hosts: the call runs directly between the routers' addresses; with the server's
  relay-only policy, the same two go through the relay;
- a host whose only way out is squid with basic authentication: Chromium, given the proxy
  and its credentials at launch, loads the page over HTTPS through the proxy and reaches
  TURN over TLS on 443 through it; its call with a cone host is relayed over TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from playwright.async_api import Browser, Page

from support.browser import Server, chromium, one_peer_video, run_server, wait_connected
from support.certs import make_certificate
from support.natlab import SERVER, SERVER2, Site, internet_lab
from support.proxy import PASSWORD, USER, run_squid

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

LAB_PUBLIC = "198.18.0.0-198.19.255.255"
TLS_PORT = 443


async def person(browser: Browser, base: str, room: str, name: str, query: str = "") -> Page:
    page = await (await browser.new_context(ignore_https_errors=True)).new_page()
    await page.goto(f"{base}/r/{room}?name={name}{query}")
    try:
        await page.wait_for_function("() => window.tsunagu?.state?.().joined", timeout=20_000)
    except Exception as exc:
        raise AssertionError(f"{name} did not join: {await page.inner_text('body')}") from exc
    return page


async def call(
    server: Server, sites: list[Site], room: str, base: str = "", settle: str | None = None
) -> list[dict[str, Any]]:
    """A Chromium in each site's first host joins ``room``; each one's stats of the other,
    once video flows (and, with ``settle``, once the path is of that kind: Chromium may
    start on the first pair that works, under load a relayed one, and move to a better one
    as its checks complete)."""
    # The web app on a lab address serves HTTPS with the generated certificate, as on a
    # public server without --cert; its printed SPKI is what a tester accepts.
    assert server.scheme == "https", server.output
    spki = f"--ignore-certificate-errors-spki-list={server.spki}"
    pages: list[Page] = []
    async with contextlib.AsyncExitStack() as stack:
        for number, site in enumerate(sites):
            browser = await stack.enter_async_context(
                chromium(spki, executable=str(site.chromium[0]))
            )
            pages.append(await person(browser, base or server.base, room, f"P{number}"))
        try:
            await asyncio.gather(*(wait_connected(page, 1) for page in pages))
        except Exception as exc:
            raise AssertionError("".join(server.output)) from exc
        stats = [await one_peer_video(page) for page in pages]
        deadline = time.monotonic() + 20
        while settle and any(one["path"]["kind"] != settle for one in stats):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
            stats = [await one_peer_video(page) for page in pages]
        return stats


def serve(tmp: Path, inet: str, *extra: str) -> Any:
    (tmp).mkdir(parents=True, exist_ok=True)
    return run_server(
        tmp,
        "--allowed-peer-ip",
        LAB_PUBLIC,
        "--tls-listening-port",
        str(TLS_PORT),
        *extra,
        host=SERVER,
        wrap=("ip", "netns", "exec", inet),
    )


async def test_cone_with_symmetric_is_relayed(tmp_path: Path) -> None:
    with (
        internet_lab(tmp_path, "cone", "symmetric") as net,
        serve(tmp_path / "s", net.inet) as server,
    ):
        stats = await call(server, list(net.sites), "cone-symmetric")
        # The media went through the relay both ways: the allocations' audit records, written
        # as the pages hang up, say so (each page's own view of the pair may name the relay
        # as its own candidate or as the other side's).
        relayed: list[dict[str, Any]] = []
        deadline = time.monotonic() + 10
        while not relayed and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            relayed = [
                r
                for r in server.audit_records()
                if r["to_peers"]["packets"] > 0 and r["to_client"]["packets"] > 0
            ]
    for one in stats:
        assert one["path"]["kind"] in ("relay", "relay-remote"), one
    assert relayed, stats


async def test_cone_with_cone_is_direct_unless_relay_only(tmp_path: Path) -> None:
    with internet_lab(tmp_path, "cone", "cone") as net:
        a, b = net.sites
        with serve(tmp_path / "all", net.inet) as server:
            stats = await call(server, [a, b], "cone-cone", settle="nat")
        for one in stats:
            # Between the two routers' public addresses: hole punching, no relay.
            assert one["path"]["kind"] == "nat", one
            assert one["remote"]["address"] in (a.wan, b.wan), one
        with serve(tmp_path / "relay", net.inet, "--ice-transport-policy", "relay") as server:
            stats = await call(server, [a, b], "cone-cone-relay")
        for one in stats:
            assert one["path"]["kind"] in ("relay", "relay-remote"), one


def certificate(tmp: Path) -> tuple[Path, Path]:
    """A certificate for both lab server addresses (web on one, TURN on the other)."""
    addresses = [x509.IPAddress(ipaddress.ip_address(a)) for a in (SERVER, SERVER2)]
    return make_certificate(tmp, "lab", addresses)


async def test_chromium_behind_the_authenticated_proxy_relays_over_tls(tmp_path: Path) -> None:
    with internet_lab(tmp_path, "proxy", "cone") as net:
        behind, cone = net.sites
        cert, key = certificate(tmp_path)
        # The web app on SERVER2:443, TURN over TLS on SERVER:443: the proxy lets only 443 out.
        extra = ["--cert", str(cert), "--pkey", str(key), "--web-ip", SERVER2, "--web-port", "443"]
        with (
            run_squid([TLS_PORT], netns=behind.router, host=behind.gateway) as squid,
            serve(tmp_path / "s", net.inet, *extra) as server,
        ):
            base = f"https://{SERVER2}"
            spki = f"--ignore-certificate-errors-spki-list={server.spki}"
            proxy = {
                "server": f"http://{behind.gateway}:3128",
                "username": USER,
                "password": PASSWORD,
            }
            async with (
                chromium(spki, executable=str(behind.chromium[0]), proxy=proxy) as proxied,
                chromium(spki, executable=str(cone.chromium[0])) as direct,
            ):
                pages = [
                    # Only the turns: URI, as where the proxy insists on TLS.
                    await person(proxied, base, "through-proxy", "Behind", "&transport=tls"),
                    await person(direct, base, "through-proxy", "Open"),
                ]
                try:
                    await asyncio.gather(*(wait_connected(page, 1) for page in pages))
                except Exception as exc:
                    raise AssertionError(squid.access_log() + "".join(server.output)) from exc
                stats = [await one_peer_video(page) for page in pages]
            log = squid.access_log()
    assert stats[0]["path"]["kind"] == "relay", stats[0]
    assert stats[0]["local"]["relayProtocol"] == "tls", stats[0]
    # The proxy carried the page and the TURN connection, each with the proxy's password.
    for target in (SERVER2, SERVER):
        lines = [line for line in log.splitlines() if f"CONNECT {target}:443 " in line]
        assert any(f" {USER} " in line and "/200 " in line for line in lines), log
