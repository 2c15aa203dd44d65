"""``--ice-transport-policy relay`` is the server's policy, not a suggestion to the page.

Two Chromium pages on one host (a network namespace with a real interface, so that each
gathers host candidates) speak the signaling protocol with their own small client that
ignores the policy: ``iceTransportPolicy: "all"``, every candidate sent. The server forwards
only relayed candidates, so each page learns no address of the other but a relayed one, and
the connection they make runs through the relay.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Page

from support.browser import chromium, run_server
from support.natlab import LINK_SERVER, link_lab

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

# A client of the signaling protocol that asks for every path: it joins, offers to the peer
# that joins after it, trickles every candidate, and reports what it sent, what it was sent
# and the pair its connection selected.
CLIENT = """async ([room, name]) => {
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  const inbox = [];
  let wake = null;
  ws.onmessage = (e) => { inbox.push(JSON.parse(e.data)); if (wake) wake(); };
  const next = async (type, ms = 20000) => {
    const end = Date.now() + ms;
    for (;;) {
      const i = inbox.findIndex((m) => m.type === type);
      if (i >= 0) return inbox.splice(i, 1)[0];
      if (Date.now() > end) throw new Error(`no ${type}`);
      await new Promise((r) => { wake = r; setTimeout(r, 200); });
    }
  };
  await new Promise((r) => ws.addEventListener("open", r, { once: true }));
  ws.send(JSON.stringify({ type: "join", v: 1, room, name }));
  const joined = await next("joined");
  const pc = new RTCPeerConnection({ iceServers: joined.iceServers, iceTransportPolicy: "all" });
  const sent = [], received = [];
  let other = joined.peers.length ? joined.peers[0].id : null;
  pc.onicecandidate = (e) => {
    if (!e.candidate || !other) return;
    sent.push(e.candidate.candidate);
    ws.send(JSON.stringify({ type: "candidate", to: other, candidate: e.candidate.toJSON() }));
  };
  const channel = pc.createDataChannel("x", { negotiated: true, id: 0 });
  let remoteSdp;
  if (!other) {
    other = (await next("peer-joined")).id;
    await pc.setLocalDescription(await pc.createOffer());
    ws.send(JSON.stringify({ type: "offer", to: other, sdp: pc.localDescription.sdp }));
    remoteSdp = (await next("answer")).sdp;
    await pc.setRemoteDescription({ type: "answer", sdp: remoteSdp });
  } else {
    remoteSdp = (await next("offer")).sdp;
    await pc.setRemoteDescription({ type: "offer", sdp: remoteSdp });
    await pc.setLocalDescription(await pc.createAnswer());
    ws.send(JSON.stringify({ type: "answer", to: other, sdp: pc.localDescription.sdp }));
  }
  const deadline = Date.now() + 30000;
  while (pc.connectionState !== "connected" && Date.now() < deadline) {
    for (let m; (m = inbox.findIndex((x) => x.type === "candidate")) >= 0; ) {
      const c = inbox.splice(m, 1)[0].candidate;
      if (c && c.candidate) {
        received.push(c.candidate);
        await pc.addIceCandidate(c).catch(() => {});
      }
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  if (channel.readyState !== "open") {
    await new Promise((r) => channel.addEventListener("open", r, { once: true }));
  }
  const stats = await pc.getStats();
  let local = null, remote = null;
  for (const s of stats.values()) {
    if (s.type === "transport" && s.selectedCandidatePairId) {
      const pair = stats.get(s.selectedCandidatePairId);
      local = stats.get(pair.localCandidateId).candidateType;
      remote = stats.get(pair.remoteCandidateId).candidateType;
    }
  }
  return { state: pc.connectionState, sent, received, remoteSdp, local, remote,
           policy: joined.iceTransportPolicy };
}"""


def typ(candidate: str) -> str:
    tokens = candidate.split()
    return tokens[tokens.index("typ") + 1]


async def test_a_client_that_ignores_the_relay_policy_still_relays(tmp_path: Path) -> None:
    (tmp_path / "serve").mkdir()
    with link_lab(tmp_path) as (server_ns, _, chromium_in_client):
        with run_server(
            tmp_path / "serve",
            "--ice-transport-policy",
            "relay",
            host=LINK_SERVER,
            wrap=("ip", "netns", "exec", server_ns),
        ) as server:
            # The page on the link's address is HTTPS, with the certificate serve printed.
            trust = f"--ignore-certificate-errors-spki-list={server.spki}"
            async with chromium(trust, executable=str(chromium_in_client)) as browser:
                pages: list[Page] = []
                for _ in range(2):
                    page = await (await browser.new_context()).new_page()
                    await page.goto(f"{server.base}/")
                    pages.append(page)
                task = asyncio.ensure_future(pages[0].evaluate(CLIENT, ["enforced", "A"]))
                await asyncio.sleep(1.0)
                second = await pages[1].evaluate(CLIENT, ["enforced", "B"])
                results: list[dict[str, Any]] = [await task, second]
    for result in results:
        assert result["policy"] == "relay" and result["state"] == "connected", result
        sent_types = {typ(c) for c in result["sent"]}
        # The page asked for every path and sent its own address too (Chromium hides the
        # host candidate behind the server-reflexive one, here the same address)...
        assert sent_types - {"relay"}, result["sent"]
        # ...but learned only relayed ones, in the SDP and trickled.
        assert {typ(c) for c in result["received"]} == {"relay"}, result["received"]
        assert "typ host" not in result["remoteSdp"] and "typ srflx" not in result["remoteSdp"]
        # So the path it found runs through the relay.
        assert "relay" in (result["local"], result["remote"]), (result["local"], result["remote"])
