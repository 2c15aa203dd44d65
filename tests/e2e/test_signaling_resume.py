"""A call whose signaling connection drops while it is being set up still connects.

Under load a signaling WebSocket may miss its heartbeat and come back (the page resumes its
seat with its token). On resuming, the page hands each connection the fresh TURN credentials
of the new "joined" with ``setConfiguration()``; Chromium takes changed ICE servers as a
reason to renegotiate and fires ``negotiationneeded``, also on a connection that has nothing
to negotiate yet: the polite side of a call, still waiting for the first offer. An offer made
then has no media section, fails under max-bundle, and leaves the connection refusing the
other side's real offer: the call never connects, and the server sees the other side's
allocation end without any permission.

The first test makes that order certain: the impolite page's first offer is held back for a
moment, and the polite page's signaling drops and resumes meanwhile.

The second drops the polite page's signaling as the first offer arrives: it answers and
trickles its candidates while reconnecting. The answer waits for the new connection; its
candidates must too, or the other side never learns where to reach it and the two
allocations wait with no permission (nothing on the other side restarts ICE: only the page
that resumed looks at its connections, and only an impolite page restarts).
"""

from __future__ import annotations

import asyncio

import pytest
from playwright.async_api import Page

from support.audit import warning_lines
from support.browser import Server, chromium

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

# Long enough for the other page to drop and resume its signaling, shorter than the 4 s after
# which a polite page stops waiting and offers itself.
HOLD_OFFER_MS = 3000
STEP_MS = 15_000

# Holds back this page's first offer to a peer it is impolite to.
HOLD_FIRST_OFFER = """
(() => {
  const send = WebSocket.prototype.send;
  let held = false;
  WebSocket.prototype.send = function (data) {
    try {
      const message = JSON.parse(data);
      const peer = message.type === "offer" && !held && window.tsunagu
        && window.tsunagu.peers().find((p) => p.id === message.to);
      if (peer && !peer.polite) {
        held = true;
        setTimeout(() => send.call(this, data), %HOLD%);
        return undefined;
      }
    } catch (error) {
      // Not JSON: not ours to hold.
    }
    return send.call(this, data);
  };
})();
""".replace("%HOLD%", str(HOLD_OFFER_MS))

CONNECTED = """() => {
    const peers = window.tsunagu.peers();
    return peers.length === 1 && peers[0].connectionState === "connected";
}"""


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_call_connects_when_signaling_resumes_before_the_first_offer(
    relay_server: Server, transport: str
) -> None:
    server = relay_server
    console: list[str] = []
    async with chromium() as browser:
        pages: list[Page] = []
        for name in ("Ada", "Bo"):
            context = await browser.new_context()
            await context.add_init_script(HOLD_FIRST_OFFER)
            page = await context.new_page()
            page.on("console", lambda m, name=name: console.append(f"{name} {m.type}: {m.text}"))
            await page.goto(f"{server.base}/r/resume-{transport}?name={name}&transport={transport}")
            await page.wait_for_function(
                "() => window.tsunagu?.state?.().joined && window.tsunagu.peers().length === 1"
                if name == "Bo"
                else "() => window.tsunagu?.state?.().joined",
                timeout=STEP_MS,
            )
            pages.append(page)
        await pages[0].wait_for_function(
            "() => window.tsunagu.peers().length === 1", timeout=STEP_MS
        )
        polite = [p for p in pages if (await p.evaluate("window.tsunagu.peers()"))[0]["polite"]]
        assert len(polite) == 1
        (waiting,) = polite
        # Its link has not started: the first offer is still held back by the other page.
        (peer,) = await waiting.evaluate("window.tsunagu.peers()")
        assert peer["signalingState"] == "stable" and peer["gathered"] == [], peer
        seat = (await waiting.evaluate("window.tsunagu.state()"))["id"]
        await waiting.evaluate("window.tsunagu.breakSignaling()")
        await waiting.wait_for_function(
            "(id) => ((s) => s.signaling === 'open' && s.id === id)(window.tsunagu.state())",
            arg=seat,
            timeout=STEP_MS,
        )
        try:
            await asyncio.gather(*(p.wait_for_function(CONNECTED, timeout=STEP_MS) for p in pages))
        except Exception as exc:
            report = [repr(await p.evaluate("window.tsunagu.peers()")) for p in pages]
            raise AssertionError(
                "\n".join([*console, *report, *warning_lines(server.log_text())])
            ) from exc
        stats = [s for p in pages for s in await p.evaluate("window.tsunagu.stats()")]
        assert all(s["local"] and s["local"]["relayProtocol"] == transport for s in stats), stats
    assert not [line for line in console if "negotiation failed" in line], console


# Drops this page's signaling connection as soon as the first offer reaches it, if this page
# is the polite side (the one that answers).
DROP_ON_FIRST_OFFER = """
(() => {
  const Native = window.WebSocket;
  let dropped = false;
  window.WebSocket = function (...args) {
    const ws = new Native(...args);
    ws.addEventListener("message", (event) => {
      if (dropped || !event.data.includes('"offer"')) return;
      const peers = window.tsunagu.peers();
      if (peers.length !== 1 || !peers[0].polite) return;
      dropped = true;
      setTimeout(() => window.tsunagu.breakSignaling(), 0);
    });
    return ws;
  };
  window.WebSocket.prototype = Native.prototype;
  Object.assign(window.WebSocket, { CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3 });
})();
"""


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_candidates_trickled_while_signaling_resumes_reach_the_other_side(
    relay_server: Server, transport: str
) -> None:
    server = relay_server
    console: list[str] = []
    sockets = {"Ada": 0, "Bo": 0}
    async with chromium() as browser:
        pages: list[Page] = []
        for name in ("Ada", "Bo"):
            context = await browser.new_context()
            await context.add_init_script(DROP_ON_FIRST_OFFER)
            page = await context.new_page()
            page.on("console", lambda m, name=name: console.append(f"{name} {m.type}: {m.text}"))
            page.on("websocket", lambda _, name=name: sockets.update({name: sockets[name] + 1}))
            room = f"trickle-{transport}"
            await page.goto(f"{server.base}/r/{room}?name={name}&transport={transport}")
            await page.wait_for_function("() => window.tsunagu?.state?.().joined", timeout=STEP_MS)
            pages.append(page)
        try:
            await asyncio.gather(*(p.wait_for_function(CONNECTED, timeout=STEP_MS) for p in pages))
        except Exception as exc:
            report = [repr(await p.evaluate("window.tsunagu.peers()")) for p in pages]
            raise AssertionError(
                "\n".join([*console, *report, *warning_lines(server.log_text())])
            ) from exc
        # The polite page did drop its connection and resume its seat on a second one.
        assert sorted(sockets.values()) == [1, 2], sockets
        states = [await p.evaluate("window.tsunagu.state()") for p in pages]
        assert all(s["signaling"] == "open" for s in states), states
