// Connectivity test: from this browser and network, which ways to the server work?
//
// The page asks the signaling server for the ICE servers a member of the room would get (a
// `join` with `check`, so it takes no seat), then gathers candidates against each STUN and
// TURN URL on its own, runs a short round trip between two relay-only connections through
// the relay, and ends with a verdict and what to ask a network's administrators to open.

import { copyText, parseRoom, passwordKey, toast, tokenKey } from "./common.js";

const GATHER_MS = 10_000;
const ROUND_TRIP_MS = 8_000;
const PINGS = 10;

const params = new URLSearchParams(location.search);
const room = parseRoom(params.get("room") || "") || randomCheckRoom();
const state = { phase: "starting", checks: [], roundTrip: null, verdict: null, info: null, error: null };

function randomCheckRoom() {
  const bytes = new Uint8Array(8);
  crypto.getRandomValues(bytes);
  return `check-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

function $(id) {
  return document.getElementById(id);
}

function stored(key) {
  try {
    return sessionStorage.getItem(key) || "";
  } catch {
    return "";
  }
}

function askServer() {
  return new Promise((resolve, reject) => {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    let ws;
    try {
      ws = new WebSocket(`${scheme}://${location.host}/ws`);
    } catch (err) {
      reject(new Error(`cannot open the signaling WebSocket: ${err.message || err}`));
      return;
    }
    const timer = setTimeout(() => {
      ws.close();
      reject(new Error("the signaling server did not answer within 10 s"));
    }, 10_000);
    ws.addEventListener("open", () => {
      const join = { type: "join", v: 1, room, name: "Connectivity test", check: true };
      const token = stored(tokenKey(room));
      const password = stored(passwordKey(room));
      if (token) join.token = token;
      if (password) join.password = password;
      ws.send(JSON.stringify(join));
    });
    ws.addEventListener("message", (event) => {
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      if (message.type === "checked") {
        clearTimeout(timer);
        resolve(message);
      } else if (message.type === "error") {
        clearTimeout(timer);
        reject(new Error(message.message.replace(/^join: /, "")));
      }
    });
    ws.addEventListener("close", () => {
      clearTimeout(timer);
      reject(new Error("the signaling WebSocket closed before answering"));
    });
  });
}

/** One row per URL: what it is and how to test it. */
function plan(iceServers) {
  const rows = [];
  for (const server of iceServers) {
    for (const url of server.urls) {
      const turn = url.startsWith("turn");
      const transport = url.startsWith("turns:") ? "tls" : (url.match(/transport=(udp|tcp)/) || [null, "udp"])[1];
      const label = turn ? `TURN relay over ${transport.toUpperCase()}` : "STUN (your public address)";
      rows.push({
        url,
        label,
        kind: turn ? "turn" : "stun",
        transport,
        server: { urls: [url], username: server.username, credential: server.credential },
        state: "running",
        candidates: [],
        errors: [],
        ms: null,
      });
    }
  }
  return rows;
}

function hostOf(url) {
  const rest = url.replace(/^[a-z]+:/, "").split("?")[0];
  if (rest.startsWith("[")) return rest.slice(0, rest.indexOf("]") + 1);
  return rest.split(":")[0];
}

function portOf(url) {
  const rest = url.replace(/^[a-z]+:/, "").split("?")[0];
  const match = rest.match(/:(\d+)$/);
  return match ? Number(match[1]) : url.startsWith("turns:") ? 5349 : 3478;
}

async function gather(row) {
  const started = performance.now();
  const pc = new RTCPeerConnection({
    iceServers: [row.server],
    iceTransportPolicy: row.kind === "turn" ? "relay" : "all",
  });
  pc.addEventListener("icecandidate", (event) => {
    const c = event.candidate;
    if (!c || !c.candidate) return;
    row.candidates.push({
      type: c.type,
      protocol: c.protocol,
      address: c.address,
      port: c.port,
      relayProtocol: c.relayProtocol || null,
      ms: Math.round(performance.now() - started),
    });
    render();
  });
  pc.addEventListener("icecandidateerror", (event) => {
    row.errors.push({ code: event.errorCode, text: event.errorText || "" });
  });
  pc.createDataChannel("check");
  await pc.setLocalDescription(await pc.createOffer());
  const completed = await new Promise((resolve) => {
    const timer = setTimeout(() => resolve(false), GATHER_MS);
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") {
        clearTimeout(timer);
        resolve(true);
      }
    });
  });
  pc.close();
  row.ms = Math.round(performance.now() - started);
  const wanted = row.kind === "turn" ? "relay" : "srflx";
  const found = row.candidates.some((c) => c.type === wanted);
  // A server on this very network answers STUN with the address the host already has, and
  // the browser drops that duplicate: gathering that completed with no error for the URL is
  // then the answer. Gathering still running when the time is up is a server that did not
  // answer (the browser's error for it may come later still).
  const stunAnswered =
    row.kind === "stun" && completed && row.candidates.length > 0 && row.errors.length === 0;
  row.state = found || stunAnswered ? "ok" : "fail";
  render();
}

/** Two relay-only connections in this page, through the relay, and a few messages back and forth. */
async function roundTrip(servers) {
  const config = { iceServers: servers, iceTransportPolicy: "relay" };
  const a = new RTCPeerConnection(config);
  const b = new RTCPeerConnection(config);
  a.addEventListener("icecandidate", (e) => e.candidate && b.addIceCandidate(e.candidate).catch(() => {}));
  b.addEventListener("icecandidate", (e) => e.candidate && a.addIceCandidate(e.candidate).catch(() => {}));
  const channel = a.createDataChannel("rtt", { ordered: true });
  b.addEventListener("datachannel", (event) => {
    event.channel.addEventListener("message", (m) => event.channel.send(m.data));
  });
  try {
    await a.setLocalDescription(await a.createOffer());
    await b.setRemoteDescription(a.localDescription);
    await b.setLocalDescription(await b.createAnswer());
    await a.setRemoteDescription(b.localDescription);
    await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error("no connection through the relay")), ROUND_TRIP_MS);
      channel.addEventListener("open", () => {
        clearTimeout(timer);
        resolve();
      });
    });
    const times = [];
    for (let i = 0; i < PINGS; i += 1) {
      const sent = performance.now();
      const echoed = new Promise((resolve) => channel.addEventListener("message", resolve, { once: true }));
      channel.send(String(i));
      await Promise.race([echoed, new Promise((resolve) => setTimeout(resolve, 2000))]);
      times.push(performance.now() - sent);
    }
    times.sort((x, y) => x - y);
    const pair = await selectedPair(a);
    return { ok: true, rttMs: Math.round(times[Math.floor(times.length / 2)] * 10) / 10, via: pair };
  } catch (err) {
    return { ok: false, error: err.message || String(err) };
  } finally {
    a.close();
    b.close();
  }
}

async function selectedPair(pc) {
  const stats = await pc.getStats();
  for (const report of stats.values()) {
    if (report.type === "transport" && report.selectedCandidatePairId) {
      const pair = stats.get(report.selectedCandidatePairId);
      const local = pair && stats.get(pair.localCandidateId);
      if (local) return `${local.candidateType}/${local.relayProtocol || local.protocol}`;
    }
  }
  return null;
}

function verdict(checks, trip, info) {
  const turn = checks.filter((c) => c.kind === "turn");
  const ok = (transport) => turn.some((c) => c.transport === transport && c.state === "ok");
  const host = turn.length ? hostOf(turn[0].url) : location.hostname;
  const ports = info && info.relayPorts ? `${info.relayPorts[0]}–${info.relayPorts[1]}` : "49152–65535";
  const udpUrl = turn.find((c) => c.transport === "udp");
  const tlsUrl = turn.find((c) => c.transport === "tls");
  const udpPort = udpUrl ? portOf(udpUrl.url) : 3478;
  const tlsPort = tlsUrl ? portOf(tlsUrl.url) : 5349;
  const refused = turn.some((c) => c.errors.some((e) => e.code === 401));
  const openUdp = `UDP ${udpPort} and UDP ${ports} to ${host}`;
  if (!turn.length) {
    return {
      code: "no-relay",
      state: "warn",
      title: "This server offers no relay",
      text: "Calls can only connect directly; people behind strict NATs or firewalls will not reach each other.",
      advice: "",
    };
  }
  if (refused && !turn.some((c) => c.state === "ok")) {
    return {
      code: "credentials-refused",
      state: "fail",
      title: "The relay refused its credentials",
      text: "The TURN server answered but did not accept the credentials the page was given.",
      advice: "Tell whoever runs the server: the TURN REST secret of the web app and of the relay differ, or their clocks do.",
    };
  }
  const rtt = trip && trip.ok ? ` A round trip through the relay took ${trip.rttMs} ms.` : "";
  if (ok("udp") && (!trip || trip.ok) && tlsUrl && !ok("tls") && (ok("tcp") || !turn.some((c) => c.transport === "tcp"))) {
    return {
      code: "tls-failed",
      state: "warn",
      title: "Calls work from this network, but not the relay over TLS",
      text:
        `The relay answers over UDP${ok("tcp") ? " and TCP" : ""}, but this browser could not open TLS to ` +
        `${host}:${tlsPort}, most likely because it does not trust the server's certificate.${rtt}`,
      advice:
        "People behind firewalls that pass only TLS will not get through. Tell whoever runs the " +
        "server to give it a certificate browsers trust for this name (--cert and --pkey).",
    };
  }
  if (ok("udp") && (!trip || trip.ok)) {
    return {
      code: "ok",
      state: "ok",
      title: "All good: calls work from this network",
      text: `Calls connect directly where they can and through the relay over UDP where they cannot.${rtt}`,
      advice: "",
    };
  }
  if (ok("tcp") || ok("tls")) {
    const which = ok("tcp") && ok("tls") ? "TCP and TLS" : ok("tcp") ? "TCP" : "TLS";
    return {
      code: "udp-blocked",
      state: "warn",
      title: "UDP is blocked here: calls go through the relay over " + which,
      text: `Calls still work, with a little more delay than over UDP.`,
      advice: `For the best calls, ask your network administrators to allow outgoing ${openUdp}.`,
    };
  }
  return {
    code: "relay-unreachable",
    state: "fail",
    title: "Nothing reaches the relay from this network",
    text: "Calls to people outside this network will fail unless both sides can connect directly.",
    advice: `Ask your network administrators to allow outgoing TCP ${tlsPort} (TLS) to ${host}, or ${openUdp}.`,
  };
}

function mark(stateName) {
  return stateName === "ok" ? "✓" : stateName === "fail" ? "✕" : "…";
}

function describe(row) {
  const parts = [row.url];
  const types = [...new Set(row.candidates.map((c) => c.type))];
  if (types.length) parts.push(`candidates: ${types.join(", ")}`);
  const wanted = row.candidates.find((c) => c.type === (row.kind === "turn" ? "relay" : "srflx"));
  if (wanted) parts.push(`${wanted.type} ${wanted.address}:${wanted.port} after ${wanted.ms} ms`);
  if (row.errors.length) parts.push(`errors: ${row.errors.map((e) => `${e.code} ${e.text}`.trim()).join("; ")}`);
  if (row.ms !== null && row.state === "fail" && !row.errors.length) parts.push(`no answer in ${row.ms} ms`);
  return parts.join(" · ");
}

function render() {
  const list = $("checks");
  list.replaceChildren(
    ...state.checks.map((row) => {
      const li = document.createElement("li");
      li.dataset.state = row.state;
      li.dataset.url = row.url;
      const markEl = document.createElement("span");
      markEl.className = "mark";
      markEl.textContent = mark(row.state);
      const label = document.createElement("strong");
      label.textContent = row.label;
      const detail = document.createElement("span");
      detail.className = "detail";
      detail.textContent = describe(row);
      li.append(markEl, label, detail);
      return li;
    }),
  );
  const trip = state.roundTrip;
  $("round-trip").textContent = !trip
    ? ""
    : trip.ok
      ? `Round trip through the relay: ${trip.rttMs} ms (${trip.via || "relay"}).`
      : `Round trip through the relay failed: ${trip.error}.`;
  const v = state.verdict;
  if (v) {
    $("verdict").dataset.state = v.state;
    $("verdict-title").textContent = v.title;
    $("verdict-text").textContent = v.text;
    $("verdict-advice").textContent = v.advice;
    $("verdict-advice").hidden = !v.advice;
  } else if (state.error) {
    $("verdict").dataset.state = "fail";
    $("verdict-title").textContent = "The test could not start";
    $("verdict-text").textContent = state.error;
    $("verdict-advice").hidden = true;
  }
  $("report").textContent = report();
}

function report() {
  const lines = [
    `tsunagu connectivity test, ${new Date().toISOString()}`,
    `page: ${location.origin}/test (room ${params.get("room") ? room : "none"})`,
    `browser: ${navigator.userAgent}`,
  ];
  if (state.error) lines.push(`error: ${state.error}`);
  for (const row of state.checks) lines.push(`${mark(row.state)} ${row.label}: ${describe(row)}`);
  const trip = state.roundTrip;
  if (trip) lines.push(trip.ok ? `round trip: ${trip.rttMs} ms via ${trip.via}` : `round trip failed: ${trip.error}`);
  if (state.verdict) lines.push(`verdict (${state.verdict.code}): ${state.verdict.title}. ${state.verdict.text} ${state.verdict.advice}`.trim());
  return lines.join("\n");
}

async function run() {
  render();
  try {
    const [checked, info] = await Promise.all([
      askServer(),
      fetch("/api/info").then((r) => (r.ok ? r.json() : null)).catch(() => null),
    ]);
    state.info = info;
    state.checks = plan(checked.iceServers || []);
    state.phase = "gathering";
    render();
    await Promise.all(state.checks.map((row) => gather(row)));
    const working = state.checks.filter((row) => row.kind === "turn" && row.state === "ok").map((row) => row.server);
    if (working.length) {
      state.phase = "round-trip";
      state.roundTrip = await roundTrip(working);
    }
    state.verdict = verdict(state.checks, state.roundTrip, info);
  } catch (err) {
    state.error = err.message || String(err);
  }
  state.phase = "done";
  render();
}

$("copy-report").addEventListener("click", async () => {
  toast((await copyText(report())) ? "Report copied" : "Copy failed — select the text");
});

window.tsunagu = { test: () => JSON.parse(JSON.stringify(state)) };

run();
