"""Three people in one room through a real ``tsunagu serve``, relayed over TURN UDP, TCP, TLS.

Each browser context is one person with Chromium's fake camera and microphone. The ICE policy
is "relay", so every byte of media must cross the server's TURN relay; the page's
``?transport=`` parameter keeps only the TURN URIs of one transport, so each run proves that
transport end to end. They also take the README's screenshots (into ``docs/`` with
``TSUNAGU_UPDATE_SCREENSHOTS=1``).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page

from support.audit import required_workers, workers_seen
from support.browser import ROOT, Server, chromium, run_server, wait_connected

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

# The README's pictures are taken by these tests; they are written to docs/ only when asked
# (TSUNAGU_UPDATE_SCREENSHOTS=1), so that a test run leaves the checkout as it was.
UPDATE_SCREENSHOTS = os.environ.get("TSUNAGU_UPDATE_SCREENSHOTS") == "1"


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    return ROOT / "docs" if UPDATE_SCREENSHOTS else tmp_path


STEP_MS = 15_000
NAMES = ("Ada", "Grace", "Linus")


async def open_person(browser: Browser, url: str) -> Page:
    context = await browser.new_context(viewport={"width": 1280, "height": 760})
    page = await context.new_page()
    await page.goto(url)
    await page.wait_for_function("() => window.tsunagu?.state?.().joined", timeout=STEP_MS)
    return page


async def wait_frames(page: Page, count: int) -> list[dict[str, Any]]:
    """Poll getStats (bounded) until video frames were decoded from ``count`` peers."""
    stats: list[dict[str, Any]] = []
    for _ in range(60):
        stats = await page.evaluate("window.tsunagu.stats()")
        if len(stats) == count and all(s["framesDecoded"] > 0 for s in stats):
            return stats
        await asyncio.sleep(0.5)
    raise AssertionError(f"no decoded frames: {stats}")


async def expect_more_frames(page: Page, peer_id: str, more: int = 10) -> None:
    """Video frames from ``peer_id`` keep being decoded on ``page`` (bounded wait)."""
    count = None
    for _ in range(60):
        stats = {s["id"]: s for s in await page.evaluate("window.tsunagu.stats()")}
        frames = stats[peer_id]["framesDecoded"]
        if count is None:
            count = frames
        elif frames > count + more:
            return
        await asyncio.sleep(0.25)
    raise AssertionError(f"frames from {peer_id} stalled at {count}")


async def diagnose(pages: list[Page], server: Server) -> str:
    parts = ["".join(server.output)]
    for page in pages:
        try:
            parts.append(repr(await page.evaluate("window.tsunagu.peers()")))
            parts.append(repr(await page.evaluate("window.tsunagu.diagnostics()")))
        except Exception as exc:  # the page may be gone; report what we can
            parts.append(f"page unavailable: {exc}")
    return "\n".join(parts)


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
async def test_three_people_relayed(relay_server: Server, transport: str, shots: Path) -> None:
    server = relay_server
    extra = []
    if transport == "tls":
        assert server.spki, "tsunagu serve did not print the SPKI of its TLS certificate"
        extra.append(f"--ignore-certificate-errors-spki-list={server.spki}")
    room = f"e2e-{transport}"
    async with chromium(*extra) as browser:
        pages: list[Page] = []
        for name in NAMES:
            pages.append(
                await open_person(
                    browser, f"{server.base}/r/{room}?name={name}&transport={transport}"
                )
            )
        try:
            await asyncio.gather(*(wait_connected(page, 2) for page in pages))
        except Exception as exc:
            raise AssertionError(await diagnose(pages, server)) from exc

        # The page filtered the ICE servers down to the one transport under test.
        state = await pages[0].evaluate("window.tsunagu.state()")
        assert state["policy"] == "relay"
        urls = [u for s in state["iceServers"] for u in s["urls"] if u.startswith("turn")]
        scheme = "turns:" if transport == "tls" else "turn:"
        assert urls and all(u.startswith(scheme) for u in urls), urls

        # Every person decodes video from the two others, relayed over the chosen transport.
        for page in pages:
            stats = await wait_frames(page, 2)
            for s in stats:
                assert s["path"]["kind"] == "relay", s
                assert s["local"]["type"] == "relay", s
                assert s["local"]["relayProtocol"] == transport, s
                assert s["path"]["label"] == f"Relayed · TURN/{transport.upper()}"
        # The badge on each remote tile says so too (rendered by the page's own stats loop).
        await pages[0].wait_for_function(
            """(label) => {
                const badges = [...document.querySelectorAll(".tile:not(.self) .badge")];
                return badges.length === 2 && badges.every((b) => b.textContent.startsWith(label));
            }""",
            arg=f"Relayed · TURN/{transport.upper()}",
            timeout=STEP_MS,
        )

        # Chat typed into the page reaches the other two.
        ada = pages[0]
        await ada.click("#btn-chat")
        text = f"hello over {transport}"
        await ada.fill("#chat-input", text)
        await ada.press("#chat-input", "Enter")
        for page in pages:
            await page.wait_for_function(
                "(t) => window.tsunagu.chat().some((c) => c.text === t && c.name === 'Ada')",
                arg=text,
                timeout=STEP_MS,
            )
        await pages[1].evaluate("window.tsunagu.sendChat('Grace here, relayed and clear')")
        await ada.wait_for_function("() => window.tsunagu.chat().length >= 2", timeout=STEP_MS)

        # Grace's signaling connection drops without a close handshake. She reconnects with her
        # resume token and keeps her seat: same id, nobody saw her leave, calls carry on. Then
        # Ada restarts ICE towards her, which is what a changed network calls for.
        grace = pages[1]
        grace_id = (await grace.evaluate("window.tsunagu.state()"))["id"]
        await grace.evaluate("window.tsunagu.breakSignaling()")
        await grace.wait_for_function(
            """(id) => {
                const s = window.tsunagu.state();
                return s.signaling === "open" && s.id === id;
            }""",
            arg=grace_id,
            timeout=STEP_MS,
        )
        before = {s["id"]: s["framesDecoded"] for s in await ada.evaluate("window.tsunagu.stats()")}
        assert await ada.evaluate("(id) => window.tsunagu.restartIce(id)", grace_id)
        await ada.wait_for_function(
            """(id) => window.tsunagu.peers().some((p) => p.id === id && p.restarts === 1
                && p.connectionState === "connected")""",
            arg=grace_id,
            timeout=STEP_MS,
        )
        for _ in range(40):
            after = {s["id"]: s for s in await ada.evaluate("window.tsunagu.stats()")}
            if after[grace_id]["framesDecoded"] > before[grace_id] + 10:
                break
            await asyncio.sleep(0.25)
        assert after[grace_id]["framesDecoded"] > before[grace_id] + 10
        assert after[grace_id]["path"]["kind"] == "relay"
        assert len(await ada.evaluate("window.tsunagu.peers()")) == 2

        # Ada shares her screen: the same video sender switches to the screen track, the
        # others keep decoding, and stopping brings the camera back.
        ada_id = (await ada.evaluate("window.tsunagu.state()"))["id"]
        await ada.click("#btn-screen")
        await ada.wait_for_function("() => window.tsunagu.state().sharing", timeout=STEP_MS)
        sending = await ada.evaluate("(id) => window.tsunagu.sending(id)", grace_id)
        assert sending["video"].startswith("screen"), sending
        await expect_more_frames(grace, ada_id)
        await ada.click("#btn-screen")
        await ada.wait_for_function("() => !window.tsunagu.state().sharing", timeout=STEP_MS)
        sending = await ada.evaluate("(id) => window.tsunagu.sending(id)", grace_id)
        assert not sending["video"].startswith("screen"), sending
        await expect_more_frames(grace, ada_id)

        # Linus mutes and turns the camera off: the others see the avatar and the muted mark,
        # carried by the data channel between the browsers.
        linus = pages[2]
        await linus.click("#btn-cam")
        await linus.click("#btn-mic")
        for page in pages[:2]:
            await page.wait_for_function(
                """() => [...document.querySelectorAll(".tile:not(.self)")].some((t) =>
                    t.querySelector(".tile-name").textContent === "Linus"
                    && t.classList.contains("no-video") && !t.querySelector(".mic-off").hidden)""",
                timeout=STEP_MS,
            )

        if transport == "udp":
            # Let the stats loop show RTT and bitrate on the badges, then take the picture.
            await asyncio.sleep(2.5)
            await ada.screenshot(path=str(shots / "room.png"))

        # One leaves; the other two see it and keep their call.
        linus_id = (await linus.evaluate("window.tsunagu.state()"))["id"]
        await linus.click("#btn-leave")
        for page in pages[:2]:
            await page.wait_for_function(
                """(id) => {
                    const peers = window.tsunagu.peers();
                    return peers.length === 1 && !peers.some((p) => p.id === id)
                        && document.querySelectorAll(".tile:not(.self):not(.invite)").length === 1;
                }""",
                arg=linus_id,
                timeout=STEP_MS,
            )
        assert await linus.evaluate("window.tsunagu.state().ended") is True
        remaining = await pages[0].evaluate("window.tsunagu.peers()")
        assert remaining[0]["connectionState"] == "connected"

    # Stopping the server ends what the browser left open (a UDP allocation outlives a closed
    # browser); every allocation, one per person and peer and more after the ICE restart,
    # has its audit record then.
    server.process.send_signal(signal.SIGTERM)
    await asyncio.to_thread(server.process.wait, 15)
    records = server.audit_records()
    assert all(r["client"].startswith(transport + ":") for r in records), records
    assert sum(r["to_peers"]["packets"] > 0 and r["to_client"]["packets"] > 0 for r in records) >= 6
    check_workers(server, transport, records)


# Workers that served each transport's run of test_three_people_relayed, kept by the module.
_workers_seen: dict[str, Counter[int]] = {}


def check_workers(server: Server, transport: str, records: list[dict[str, Any]]) -> None:
    """Once all three transports ran, their allocations must have landed on every worker.

    The server runs the default worker count (one per core); the kernel spreads browsers'
    connections and UDP sockets over the workers by their ports. Each run makes at least six
    allocations, so all of the 18 on one of two workers has odds of 1 in 2**17 by chance
    (more workers: as many as 18 allocations can tell, see ``required_workers``).
    """
    assert server.workers == len(os.sched_getaffinity(0)), server.output
    _workers_seen[transport] = workers_seen(records, server.workers)
    if set(_workers_seen) == {"udp", "tcp", "tls"}:
        total = sum(_workers_seen.values(), Counter())
        assert set(total) <= set(range(server.workers)), _workers_seen
        assert len(total) >= required_workers(server.workers, 18), _workers_seen


async def test_landing_page_creates_a_room(relay_server: Server, shots: Path) -> None:
    async with chromium() as browser:
        context = await browser.new_context(viewport={"width": 1280, "height": 800})
        page = await context.new_page()
        await page.goto(relay_server.base + "/")
        await page.fill("#create-name", "Ada")
        link = await page.text_content("#share-link")
        assert link and link.startswith(relay_server.base + "/r/")
        room = link.rsplit("/", 1)[1]
        await page.screenshot(path=str(shots / "landing.png"))
        await page.click("#create-room")
        await page.wait_for_url(f"**/r/{room}?name=Ada", timeout=STEP_MS)
        await page.wait_for_function("() => window.tsunagu?.state?.().joined", timeout=STEP_MS)
        state = await page.evaluate("window.tsunagu.state()")
        assert state["room"] == room and state["name"] == "Ada"
        # Alone in the room: the invitation with the link to share is shown.
        assert await page.text_content(".tile.invite code") == link
        await context.close()


async def test_a_link_is_all_it_takes_even_with_a_password(relay_server: Server) -> None:
    """No ?name: the name is asked once, prefilled. A password room asks for it, says when
    it is wrong, and lets the person in with the right one."""
    async with chromium() as browser:
        host = await browser.new_context()
        owner = await host.new_page()
        await owner.goto(relay_server.base + "/")
        await owner.fill("#create-name", "Owner")
        await owner.click("summary")
        await owner.fill("#create-password", "open sesame")
        room = (await owner.text_content("#share-link") or "").rsplit("/", 1)[1]
        await owner.click("#create-room")
        await owner.wait_for_function("() => window.tsunagu?.state?.().joined", timeout=STEP_MS)

        guest_context = await browser.new_context()
        guest = await guest_context.new_page()
        await guest.goto(f"{relay_server.base}/r/{room.upper()}")
        await guest.wait_for_selector("#name-dialog[open]", timeout=STEP_MS)
        assert guest.url.endswith(f"/r/{room}")
        prefilled = await guest.input_value("#name-input")
        assert prefilled.startswith("Guest ")
        await guest.fill("#name-input", "Visitor")
        await guest.press("#name-input", "Enter")
        # The room has a password: the dialog comes back asking for it.
        await guest.wait_for_selector("#password-field:not([hidden])", timeout=STEP_MS)
        await guest.fill("#password-input", "wrong")
        await guest.press("#password-input", "Enter")
        await guest.wait_for_function(
            """() => document.querySelector("#name-dialog").open
                && document.querySelector("#dialog-error").textContent.includes("Wrong")""",
            timeout=STEP_MS,
        )
        await guest.fill("#password-input", "open sesame")
        await guest.press("#password-input", "Enter")
        await guest.wait_for_function(
            "() => window.tsunagu.state().joined && window.tsunagu.peers().length === 1",
            timeout=STEP_MS,
        )
        peers = await owner.evaluate("window.tsunagu.peers()")
        assert [p["name"] for p in peers] == ["Visitor"]
        await host.close()
        await guest_context.close()


async def test_page_logic_in_the_browser(relay_server: Server) -> None:
    """The page's pure helpers, run by the browser itself from the served modules."""
    async with chromium() as browser:
        context = await browser.new_context()
        page = await context.new_page()
        await page.goto(relay_server.base + "/")
        result = await page.evaluate(
            """async () => {
                const { classify } = await import("/static/js/stats.js");
                const { filterServers } = await import("/static/js/ice.js");
                const { parseRoom, initials } = await import("/static/js/common.js");
                const c = (lt, rt, proto) => classify(
                    { candidateType: lt, relayProtocol: proto }, { candidateType: rt });
                const servers = [
                    { urls: ["stun:h:3478"] },
                    { urls: ["turn:h:3478?transport=udp", "turn:h:3478?transport=tcp",
                             "turns:h:5349?transport=tcp", "turn:h:3478"],
                      username: "u", credential: "p" },
                ];
                const urls = (t) => filterServers(servers, t).flatMap((s) => s.urls);
                return {
                    direct: c("host", "host").label,
                    nat: [c("srflx", "host").kind, c("host", "prflx").kind],
                    relays: ["udp", "tcp", "tls"].map((p) => c("relay", "relay", p).label),
                    remoteRelay: c("host", "relay").label,
                    udp: urls("udp"), tcp: urls("tcp"), tls: urls("tls"), all: urls(null),
                    creds: filterServers(servers, "tls")[1].credential,
                    rooms: [parseRoom("Quiet Otter"), parseRoom("http://x/r/abc-1?name=z"),
                            parseRoom("no/slash"), parseRoom("")],
                    initials: [initials("Ada Lovelace"), initials("linus"), initials("  ")],
                };
            }"""
        )
        await context.close()
    assert result["direct"] == "Direct"
    assert result["nat"] == ["nat", "nat"]
    assert result["relays"] == [
        "Relayed · TURN/UDP",
        "Relayed · TURN/TCP",
        "Relayed · TURN/TLS",
    ]
    assert result["remoteRelay"] == "Relayed by peer"
    assert result["udp"] == ["stun:h:3478", "turn:h:3478?transport=udp", "turn:h:3478"]
    assert result["tcp"] == ["stun:h:3478", "turn:h:3478?transport=tcp"]
    assert result["tls"] == ["stun:h:3478", "turns:h:5349?transport=tcp"]
    assert len(result["all"]) == 5
    assert result["creds"] == "p"
    assert result["rooms"] == ["quiet-otter", "abc-1", None, None]
    assert result["initials"] == ["AL", "L", "?"]


async def test_relay_only_switch(open_server: Server) -> None:
    """Policy "all": two people connect by whatever path works. One flips "relay only" in
    the settings; the call moves onto the TURN relay without reloading."""
    async with chromium() as browser:
        url = f"{open_server.base}/r/switch?name="
        ada = await open_person(browser, url + "Ada")
        bo = await open_person(browser, url + "Bo")
        await asyncio.gather(wait_connected(ada, 1), wait_connected(bo, 1))
        assert (await ada.evaluate("window.tsunagu.state()"))["policy"] == "all"
        (first,) = await wait_frames(ada, 1)
        assert first["path"]["kind"] in ("direct", "nat"), first["path"]
        await ada.click("#btn-settings")
        assert not await ada.is_disabled("#relay-only")
        await ada.click("#relay-only")
        assert await ada.evaluate("window.tsunagu.state().policy") == "relay"
        # A fresh connection on both sides, Ada's gathering relay candidates only.
        await ada.wait_for_function(
            """() => {
                const [p] = window.tsunagu.peers();
                return p.renewals === 1 && p.connectionState === "connected"
                    && p.gathered.length === 1 && p.gathered[0] === "relay";
            }""",
            timeout=STEP_MS,
        )
        await bo.wait_for_function(
            "() => window.tsunagu.peers()[0].renewals === 1", timeout=STEP_MS
        )
        (after,) = await wait_frames(ada, 1)
        assert after["path"]["kind"] == "relay", after
        assert after["local"]["type"] == "relay"
        (seen_by_bo,) = await wait_frames(bo, 1)
        assert seen_by_bo["path"]["kind"] in ("relay", "relay-remote"), seen_by_bo["path"]


async def test_unreachable_turn_is_explained(tmp_path: Path) -> None:
    """The TURN URIs point where nothing listens: nobody can connect, and the page says why
    within seconds instead of spinning, with the error the browser reports."""
    with run_server(
        tmp_path, "--ice-transport-policy", "relay", "--public-host", "127.0.0.2"
    ) as server:
        async with chromium() as browser:
            url = f"{server.base}/r/nowhere?transport=tcp&name="
            ada = await open_person(browser, url + "Ada")
            await open_person(browser, url + "Bo")
            problem = """(prefix) => {
                const box = document.querySelector(".tile:not(.self) .tile-problem");
                return box && !box.hidden && box.textContent.startsWith(prefix)
                    ? box.textContent : null;
            }"""
            await ada.wait_for_function(
                problem, arg="No relay candidate yet: TURN not answering", timeout=STEP_MS
            )
            (peer,) = await ada.evaluate("window.tsunagu.peers()")
            assert peer["connectionState"] != "connected" and peer["gathered"] == []
            # Chromium reports a dead TURN server only when it gives up, about 40 s in; the
            # page's handling of that report is checked with the same event, sent now.
            await ada.evaluate(
                """(id) => window.tsunagu.peerConnection(id).dispatchEvent(
                    new RTCPeerConnectionIceErrorEvent("icecandidateerror", {
                        url: "turn:127.0.0.2:9?transport=tcp", errorCode: 701,
                        errorText: "Failed to establish connection", address: null, port: null,
                    }))""",
                peer["id"],
            )
            await ada.wait_for_function(
                """() => document.querySelector(".tile:not(.self) .tile-problem").textContent
                    .includes("(701 Failed to establish connection)")""",
                timeout=STEP_MS,
            )
            # ...and offers the connectivity test, with this room's access.
            link = await ada.get_attribute(".tile:not(.self) .tile-problem a", "href")
            assert link == "/test?room=nowhere", link
            diagnostics = await ada.evaluate("window.tsunagu.diagnostics()")
            assert any("TURN not answering" in d for d in diagnostics), diagnostics
            assert any("turn:127.0.0.2:9?transport=tcp error 701" in d for d in diagnostics)
