"""``tsunagu revoke`` ends a live Chromium call within a second.

Two people joined with invitation tokens (identities ``ann`` and ``bob``) are in a
relay-only call, video flowing through tsunagu's TURN relay. ``tsunagu revoke --user ann``
writes the revocation to the user database; the server ends Ann's relay allocations and
closes her signaling session: her page says her access was revoked, and Bob's page no
longer has her. Bob can go on (alone), and a new invitation for Ann works again, since
it carries credentials issued after the revocation.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page

from support.audit import audit_records
from support.browser import Server, chromium, one_peer_video, run_server, wait_connected
from tsunagu.signaling.tokens import mint_join_token

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

JOIN_SECRET = "e2e-revocation-secret-" + "x" * 24


def invitation(server: Server, room: str, identity: str) -> str:
    token = mint_join_token(
        JOIN_SECRET, room=room, identity=identity, name=identity.title(), ttl=600, now=time.time()
    )
    return f"{server.base}/r/{room}?token={token}"


async def join(browser: Browser, url: str) -> Page:
    page = await (await browser.new_context()).new_page()
    await page.goto(url)
    await page.wait_for_function("() => window.tsunagu?.state?.().joined", timeout=15_000)
    return page


async def test_a_revoked_user_is_cut_off_within_a_second(tmp_path: Path) -> None:
    database = tmp_path / "users.db"
    with run_server(
        tmp_path,
        "--ice-transport-policy",
        "relay",
        "--room-access",
        "token",
        "--join-secret",
        JOIN_SECRET,
        "-b",
        str(database),
    ) as server:
        async with chromium() as browser:
            ann = await join(browser, invitation(server, "board", "ann"))
            bob = await join(browser, invitation(server, "board", "bob"))
            await asyncio.gather(wait_connected(ann, 1), wait_connected(bob, 1))
            for page in (ann, bob):
                assert (await one_peer_video(page))["path"]["kind"] == "relay"
            before = len(server.audit_records())

            done = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "tsunagu", "revoke", "--user", "ann", "-b", str(database)],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert done.returncode == 0, done.stderr
            started = time.monotonic()
            await ann.wait_for_function("() => window.tsunagu.state().ended", timeout=1_000)
            cut_off = time.monotonic() - started
            assert await ann.inner_text("#ended-title") == "Access revoked"
            await bob.wait_for_function("() => window.tsunagu.peers().length === 0", timeout=1_000)
            # Every relay allocation Ann had is gone within the second: ended by the
            # revocation in the worker that holds it, or deleted by her page as it hung up,
            # whichever came first.
            live: set[str] = set()
            while time.monotonic() - started < 1.0:
                records = audit_records(server.log_text(), events=())
                live = {
                    r["client"]
                    for r in records
                    if r["event"] == "allocation-created" and str(r["user"]).endswith(":ann")
                } - {r["client"] for r in records if r["event"] == "allocation-ended"}
                if not live:
                    break
                await asyncio.sleep(0.05)
            assert not live and cut_off < 1.0, (cut_off, live)
            reasons = {
                r["reason"]
                for r in server.audit_records()[before:]
                if str(r["user"]).endswith(":ann")
            }
            assert reasons and reasons <= {"revoked", "deleted"}, reasons
            # Bob's allocations were not revoked (his browser closes the ones it used for Ann).
            assert not [
                r
                for r in server.audit_records()[before:]
                if str(r["user"]).endswith(":bob") and r["reason"] == "revoked"
            ]

            # A new invitation carries credentials issued after the revocation (REST
            # usernames count whole seconds: the revocation's own second counts as before).
            await asyncio.sleep(1.0)
            again = await join(browser, invitation(server, "board", "ann"))
            await asyncio.gather(wait_connected(again, 1), wait_connected(bob, 1))
            assert (await one_peer_video(again))["path"]["kind"] == "relay"
