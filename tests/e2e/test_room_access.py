"""Invitation links in Chromium, and a call that outlives its TURN credentials.

The server admits people with join tokens only and forces relay. TURN credentials last 20 s
and allocations 30 s (Chromium refreshes at half of that), so within one minute of call:

- every allocation is refreshed after the credential it was made with has expired, and the
  call goes on (a credential gates new allocations, not existing ones);
- the page gets renewed credentials over the WebSocket, and a third person joining after
  the first credentials expired connects to both others: their new allocations could only be
  made with the renewed credentials;
- the audit lines name each person (the token's ``sub``) and show the relayed traffic.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page

from support.audit import audit_records
from support.browser import Server, chromium, run_server, wait_connected
from tsunagu.auth.rest import rest_expiry
from tsunagu.signaling.tokens import mint_join_token

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

JOIN_SECRET = "e2e-join-secret-" + "x" * 24
TTL = 20
ALLOCATION_LIFETIME = 30
CALL_SECONDS = 50


def invitation(server: Server, room: str, identity: str, name: str) -> str:
    token = mint_join_token(
        JOIN_SECRET, room=room, identity=identity, name=name, ttl=600, now=time.time()
    )
    return f"{server.base}/r/{room}?token={token}"


async def open_page(browser: Browser, url: str) -> Page:
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(url)
    await page.wait_for_function(
        "() => window.tsunagu?.state?.().joined || window.tsunagu?.state?.().ended",
        timeout=15_000,
    )
    return page


async def frames_from(page: Page) -> dict[str, int]:
    stats: list[dict[str, Any]] = await page.evaluate("window.tsunagu.stats()")
    for s in stats:
        assert s["path"]["kind"] == "relay", s
    return {s["id"]: s["framesDecoded"] for s in stats}


@pytest.fixture
def token_server(tmp_path: Path) -> Any:
    with run_server(
        tmp_path,
        "--ice-transport-policy",
        "relay",
        "--room-access",
        "token",
        "--join-secret",
        JOIN_SECRET,
        "--credential-ttl",
        str(TTL),
        "--max-allocate-lifetime",
        str(ALLOCATION_LIFETIME),
    ) as server:
        yield server


async def test_invitations_and_a_call_longer_than_its_credentials(token_server: Server) -> None:
    server = token_server
    room = "board"
    async with chromium() as browser:
        # The landing page does not offer to make up rooms nobody could enter.
        landing = await (await browser.new_context()).new_page()
        await landing.goto(f"{server.base}/")
        await landing.wait_for_selector("#invitation-only", state="visible", timeout=10_000)
        assert not await landing.is_visible("#create-form")

        # Without a token, or with one for another room, the page says why it cannot enter.
        stranger = await open_page(browser, f"{server.base}/r/{room}?name=Eve")
        assert await stranger.text_content("#ended-title") == "Invitation needed"
        other = mint_join_token(JOIN_SECRET, room="other", identity="eve", ttl=60, now=time.time())
        wrong = await open_page(browser, f"{server.base}/r/{room}?name=Eve&token={other}")
        assert await wrong.text_content("#ended-title") == "This invitation does not work"
        assert "another room" in (await wrong.text_content("#ended-text") or "")

        ada = await open_page(browser, invitation(server, room, "ada", "Ada"))
        started = time.monotonic()
        grace = await open_page(browser, invitation(server, room, "grace", "Grace"))
        assert "token=" not in ada.url, "the page leaves the token in the address bar"
        state = await ada.evaluate("window.tsunagu.state()")
        assert state["name"] == "Ada" and state["turnUsername"].endswith(":ada"), state
        first_expiry = rest_expiry(state["turnUsername"])
        assert first_expiry is not None
        await asyncio.gather(wait_connected(ada, 1), wait_connected(grace, 1))

        # The call goes on well past the credentials it started with.
        seen: dict[str, int] = {}
        while time.monotonic() - started < CALL_SECONDS:
            await asyncio.sleep(5)
            for page in (ada, grace):
                peers = await page.evaluate("window.tsunagu.peers()")
                assert [p["connectionState"] for p in peers] == ["connected"], peers
            frames = await frames_from(ada)
            for peer, count in frames.items():
                assert count > seen.get(peer, -1), f"video stalled: {frames} after {seen}"
            seen = frames
        assert time.time() > first_expiry + 20, "the call did not outlive its first credential"
        renewed = await ada.evaluate("window.tsunagu.state()")
        assert renewed["iceRenewals"] >= 3, renewed
        assert rest_expiry(renewed["turnUsername"]) > first_expiry + 20  # type: ignore[operator]

        # Someone joining now needs new allocations from Ada and Grace: renewed credentials.
        linus = await open_page(browser, invitation(server, room, "linus", "Linus"))
        await asyncio.gather(*(wait_connected(p, 2) for p in (ada, grace, linus)))
        for page in (ada, grace, linus):
            for _ in range(40):
                frames = await frames_from(page)
                if len(frames) == 2 and all(count > 0 for count in frames.values()):
                    break
                await asyncio.sleep(0.5)
            else:
                raise AssertionError(f"no video on {page.url}: {frames}")

    # The server ends every allocation when it stops; each audit line names its person.
    server.process.terminate()
    server.process.wait(timeout=20)
    records = [r for r in audit_records(server.log_text()) if r["event"] == "allocation-ended"]
    users = {r["user"].partition(":")[2] for r in records}
    assert {"ada", "grace", "linus"} <= users, users
    ada_records = [r for r in records if r["user"].endswith(":ada")]
    outlived = [
        r
        for r in ada_records
        if r["to_peers"]["bytes"] > 0
        and r["duration"] > CALL_SECONDS - 5
        and rest_expiry(r["user"]) == first_expiry
    ]
    assert outlived, (
        f"no allocation of Ada's first credential carried the whole call: {ada_records}"
    )
    later = [r for r in ada_records if (rest_expiry(r["user"]) or 0) > first_expiry + 20]
    assert any(r["to_peers"]["bytes"] > 0 for r in later), (
        f"no allocation made with a renewed credential relayed anything: {ada_records}"
    )
