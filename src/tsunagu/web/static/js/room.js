// The room page: local media, one PeerLink per remote peer (full mesh), chat, devices,
// screen sharing and, for every remote peer, a badge telling how the media flows.
//
// URL parameters: ?name=<display name> joins without asking; ?transport=udp|tcp|tls keeps only
// the TURN URIs of that transport (for debugging a network); ?relay=1 starts in relay-only mode;
// ?token=<join token> is an invitation link's pass into the room.

import {
  copyText, hue, initials, parseRoom, passwordKey, randomGuestName, roomUrl, saveName, savedName,
  toast, tokenKey,
} from "./common.js";
import { filterServers } from "./ice.js";
import { PeerLink } from "./peer.js";
import { Signaling } from "./signaling.js";
import { formatRate, snapshot } from "./stats.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const room = parseRoom(decodeURIComponent(location.pathname.replace(/^\/r\//, "").replace(/\/$/, "")));
const transportFilter = ["udp", "tcp", "tls"].includes(params.get("transport")) ? params.get("transport") : null;

const state = {
  name: "",
  password: "",
  id: null,
  joined: false,
  ended: false,
  iceServers: [],
  serverPolicy: "all",
  relayOnlyAllowed: false,
  relayOnly: params.get("relay") === "1",
  turn: null,
  capacity: null,
  mic: true,
  cam: true,
  screen: null,
  localStream: new MediaStream(),
  tracks: { audio: null, video: null },
  devices: { audio: "", video: "" },
  mediaError: null,
  links: new Map(),
  chat: [],
  unread: 0,
  errors: [],
};

let signaling = null;
let selfTile = null;
let inviteTile = null;

// --- ICE configuration -------------------------------------------------------------------

function effectivePolicy() {
  if (state.serverPolicy === "relay") return "relay";
  return state.relayOnly && state.relayOnlyAllowed ? "relay" : "all";
}

function rtcConfig() {
  return {
    iceServers: filterServers(state.iceServers, transportFilter),
    iceTransportPolicy: effectivePolicy(),
    bundlePolicy: "max-bundle",
  };
}

function hasTurn() {
  return rtcConfig().iceServers.some((s) => s.urls.some((u) => u.startsWith("turn")));
}

// --- local media ---------------------------------------------------------------------------

async function startMedia() {
  const constraints = {
    audio: { echoCancellation: true, noiseSuppression: true },
    video: { width: { ideal: 1280 }, height: { ideal: 720 }, frameRate: { ideal: 30 } },
  };
  try {
    const stream = await navigator.mediaDevices.getUserMedia(constraints);
    for (const track of stream.getTracks()) setLocalTrack(track.kind, track);
  } catch (err) {
    // Try each kind alone: a person without a camera can still talk, and the reverse.
    state.mediaError = err.name || String(err);
    for (const kind of ["audio", "video"]) {
      try {
        const stream = await navigator.mediaDevices.getUserMedia({ [kind]: constraints[kind] });
        setLocalTrack(kind, stream.getTracks()[0]);
      } catch {
        if (kind === "video") state.cam = false;
        else state.mic = false;
      }
    }
    if (!state.tracks.audio && !state.tracks.video) {
      toast("No camera or microphone: you can watch and chat", 4000);
    }
  }
  await refreshDevices();
}

function setLocalTrack(kind, track) {
  const old = state.tracks[kind];
  if (old && old !== track) {
    state.localStream.removeTrack(old);
    old.stop();
  }
  state.tracks[kind] = track;
  if (track) {
    state.localStream.addTrack(track);
    const settings = track.getSettings();
    if (settings.deviceId) state.devices[kind] = settings.deviceId;
    if (kind === "audio") track.enabled = state.mic;
  }
  pushTracks();
}

function outgoingTracks() {
  return { audio: state.tracks.audio, video: state.screen || state.tracks.video };
}

function pushTracks() {
  const tracks = outgoingTracks();
  for (const { link } of state.links.values()) link.setTracks(tracks);
  updateSelfTile();
}

function broadcastStatus() {
  const status = { mic: state.mic && !!state.tracks.audio, cam: !!(state.screen || state.tracks.video), screen: !!state.screen };
  for (const { link } of state.links.values()) link.sendStatus(status);
}

async function toggleMic() {
  if (!state.tracks.audio) {
    await switchDevice("audio", state.devices.audio);
    if (!state.tracks.audio) return toast("No microphone available");
    state.mic = true;
  } else {
    state.mic = !state.mic;
    state.tracks.audio.enabled = state.mic;
  }
  updateControls();
  updateSelfTile();
  broadcastStatus();
}

async function toggleCam() {
  if (state.cam && state.tracks.video) {
    state.cam = false;
    setLocalTrack("video", null);
  } else {
    state.cam = true;
    await switchDevice("video", state.devices.video);
    if (!state.tracks.video) {
      state.cam = false;
      toast("No camera available");
    }
  }
  updateControls();
  broadcastStatus();
}

async function switchDevice(kind, deviceId) {
  const constraint = deviceId ? { deviceId: { exact: deviceId } } : true;
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ [kind]: constraint });
    const track = stream.getTracks()[0];
    if (kind === "video" && !state.cam) {
      track.stop();
      state.devices.video = deviceId;
      return;
    }
    setLocalTrack(kind, track);
  } catch (err) {
    toast(`Cannot open the ${kind === "audio" ? "microphone" : "camera"}: ${err.name || err}`);
  }
}

async function toggleScreen() {
  if (state.screen) return stopScreen();
  if (!navigator.mediaDevices || !navigator.mediaDevices.getDisplayMedia) return toast("Screen sharing is not supported here");
  try {
    const stream = await navigator.mediaDevices.getDisplayMedia({ video: { frameRate: { ideal: 15 } }, audio: false });
    const track = stream.getVideoTracks()[0];
    track.contentHint = "detail";
    track.addEventListener("ended", () => stopScreen());
    state.screen = track;
    pushTracks();
    updateControls();
    broadcastStatus();
  } catch (err) {
    if (err.name !== "NotAllowedError") toast(`Screen sharing failed: ${err.name || err}`);
  }
}

function stopScreen() {
  if (!state.screen) return;
  state.screen.stop();
  state.screen = null;
  pushTracks();
  updateControls();
  broadcastStatus();
}

async function refreshDevices() {
  // Not a secure context (plain HTTP on an address other than localhost): no devices at all,
  // and the page still joins, to watch and chat or to hear why it may not.
  if (!navigator.mediaDevices || !navigator.mediaDevices.enumerateDevices) return;
  const devices = await navigator.mediaDevices.enumerateDevices();
  for (const [kind, select] of [["audio", $("mic-select")], ["video", $("cam-select")]]) {
    const list = devices.filter((d) => d.kind === `${kind}input`);
    select.replaceChildren(
      ...list.map((d, i) => {
        const option = document.createElement("option");
        option.value = d.deviceId;
        option.textContent = d.label || `${kind === "audio" ? "Microphone" : "Camera"} ${i + 1}`;
        option.selected = d.deviceId === state.devices[kind];
        return option;
      }),
    );
    select.disabled = list.length === 0;
    if (list.length === 0) {
      const option = document.createElement("option");
      option.textContent = kind === "audio" ? "No microphone" : "No camera";
      select.append(option);
    }
  }
}

// --- tiles and layout ----------------------------------------------------------------------

function makeTile(name) {
  const tile = $("tile-template").content.firstElementChild.cloneNode(true);
  tile.querySelector(".tile-name").textContent = name;
  const avatar = tile.querySelector(".avatar");
  avatar.textContent = initials(name);
  avatar.style.setProperty("--hue", hue(name));
  $("grid").append(tile);
  layout();
  return tile;
}

function updateSelfTile() {
  if (!selfTile) return;
  const video = selfTile.querySelector("video");
  const track = state.screen || state.tracks.video;
  const stream = track ? new MediaStream([track]) : null;
  if (!track) video.srcObject = null;
  else if (!video.srcObject || video.srcObject.getVideoTracks()[0] !== track) video.srcObject = stream;
  selfTile.classList.toggle("no-video", !track);
  selfTile.classList.toggle("mirrored", !!track && !state.screen);
  selfTile.querySelector(".mic-off").hidden = state.mic && !!state.tracks.audio;
}

function updateInvite() {
  const alone = state.links.size === 0 && state.joined;
  if (alone && !inviteTile) {
    inviteTile = document.createElement("div");
    inviteTile.className = "tile invite";
    inviteTile.innerHTML = `
      <div class="invite-body">
        <h2>Waiting for others</h2>
        <p>Share this link to invite people:</p>
        <code class="share-link"></code>
        <button class="btn primary small" type="button">Copy link</button>
      </div>`;
    inviteTile.querySelector("code").textContent = roomUrl(room);
    inviteTile.querySelector("button").addEventListener("click", inviteClick);
    $("grid").append(inviteTile);
  } else if (!alone && inviteTile) {
    inviteTile.remove();
    inviteTile = null;
  }
  $("people-count").textContent = String(state.links.size + 1);
  $("people-count").title = `${state.links.size + 1} in the room`;
  layout();
}

async function inviteClick() {
  toast((await copyText(roomUrl(room))) ? "Link copied — send it to the others" : "Copy failed");
}

/** Pick the column count that gives the largest 16:9 tiles for the stage size. */
function layout() {
  const grid = $("grid");
  const tiles = grid.children.length;
  if (!tiles) return;
  const stage = $("stage");
  const gap = 10;
  const width = stage.clientWidth - 2 * gap;
  const height = stage.clientHeight - 2 * gap;
  if (width <= 0 || height <= 0) return;
  let best = { cols: 1, w: 0 };
  for (let cols = 1; cols <= tiles; cols += 1) {
    const rows = Math.ceil(tiles / cols);
    const w = Math.min((width - gap * (cols - 1)) / cols, ((height - gap * (rows - 1)) / rows) * (16 / 9));
    if (w > best.w) best = { cols, w };
  }
  grid.style.setProperty("--cols", String(best.cols));
  grid.style.setProperty("--tile-w", `${Math.max(100, Math.floor(best.w))}px`);
}

// --- peers ---------------------------------------------------------------------------------

function addPeer(peer) {
  if (state.links.has(peer.id) || peer.id === state.id) return;
  const tile = makeTile(peer.name);
  const audio = document.createElement("audio");
  audio.autoplay = true;
  tile.append(audio);
  const entry = { id: peer.id, link: null, tile, audio, name: peer.name, snap: null, renewals: 0 };
  entry.link = makeLink(entry, "auto");
  state.links.set(peer.id, entry);
  updateInvite();
}

function makeLink(entry, mode) {
  const link = new PeerLink({
    id: entry.id,
    name: entry.name,
    polite: state.id < entry.id,
    config: rtcConfig(),
    send: (message) => signaling.send(message),
    localStream: state.localStream,
    tracks: outgoingTracks(),
    mode,
  });
  // Events of a replaced link must not touch the tile any more.
  const live = (fn) => () => entry.link === link && fn();
  link.addEventListener("track", live(() => attachRemote(entry)));
  link.addEventListener("change", live(() => renderPeer(entry)));
  link.addEventListener("channelopen", live(() => broadcastStatus()));
  link.addEventListener("renewed", (event) => {
    if (entry.link === link) renewLink(entry, "answer", event.detail);
  });
  return link;
}

/** Replace the connection to one peer by a fresh one, keeping the tile. */
function renewLink(entry, mode, replay) {
  const old = entry.link;
  entry.renewals += 1;
  entry.snap = null;
  entry.link = makeLink(entry, mode);
  old.close();
  if (replay) entry.link.handle(replay);
  renderPeer(entry);
}

function attachRemote(entry) {
  const stream = entry.link.remoteStream;
  const video = entry.tile.querySelector("video");
  if (video.srcObject !== stream) video.srcObject = stream;
  if (entry.audio.srcObject !== stream) entry.audio.srcObject = stream;
  entry.audio.play().catch(() => askForSound());
  video.play().catch(() => {});
  renderPeer(entry);
}

let soundAsked = false;
function askForSound() {
  if (soundAsked) return;
  soundAsked = true;
  toast("Tap anywhere to turn on sound", 6000);
  document.addEventListener(
    "pointerdown",
    () => {
      for (const { audio } of state.links.values()) audio.play().catch(() => {});
    },
    { once: true },
  );
}

function removePeer(id, reason) {
  const entry = state.links.get(id);
  if (!entry) return;
  entry.link.close();
  entry.tile.remove();
  state.links.delete(id);
  updateInvite();
  if (reason) toast(`${entry.name} ${reason === "timeout" ? "lost connection" : "left"}`);
}

function renderPeer(entry) {
  const { link, tile } = entry;
  const status = link.remoteStatus;
  const hasVideo = link.remoteStream.getVideoTracks().some((t) => t.readyState === "live" && !t.muted);
  tile.classList.toggle("no-video", !hasVideo || !status.cam);
  tile.querySelector(".mic-off").hidden = status.mic;
  const problem = link.problem(effectivePolicy() === "relay", hasTurn());
  const box = tile.querySelector(".tile-problem");
  box.hidden = !problem;
  box.textContent = problem || "";
  if (problem) box.append(" ", testLink("Test this network"));
  const badge = tile.querySelector(".badge");
  const snap = entry.snap;
  const connected = link.pc.connectionState === "connected";
  if (!connected || !snap || snap.path.kind === "none") {
    badge.dataset.kind = link.pc.connectionState === "failed" ? "failed" : "connecting";
    badge.textContent = link.pc.connectionState === "failed" ? "No connection" : "Connecting…";
    return;
  }
  badge.dataset.kind = snap.path.kind;
  const parts = [snap.path.label];
  if (snap.rtt !== null) parts.push(`${Math.round(snap.rtt)} ms`);
  parts.push(formatRate(snap.kbpsIn));
  badge.textContent = parts.join(" · ");
  badge.title = describePath(snap);
}

function describePath(snap) {
  const l = snap.local;
  const r = snap.remote;
  const lines = [snap.path.label];
  if (l) lines.push(`you: ${l.type}${l.relayProtocol ? `/${l.relayProtocol}` : ""} ${l.protocol || ""}`);
  if (r) lines.push(`them: ${r.type} ${r.protocol || ""}`);
  if (snap.frameWidth) lines.push(`video ${snap.frameWidth}×${snap.frameHeight} @ ${Math.round(snap.framesPerSecond)} fps`);
  lines.push(`in ${formatRate(snap.kbpsIn)}, out ${formatRate(snap.kbpsOut)}`);
  return lines.join("\n");
}

async function pollStats() {
  for (const entry of state.links.values()) {
    try {
      entry.snap = await snapshot(entry.link.pc, entry.snap);
    } catch {
      entry.snap = null;
    }
    renderPeer(entry);
  }
  if (!$("settings-panel").hidden) renderSettings();
}

function applyPolicy() {
  // A fresh connection per peer: the policy then applies to every port it opens.
  for (const entry of state.links.values()) renewLink(entry, "offer", null);
  renderSettings();
}

// --- signaling -----------------------------------------------------------------------------

function onMessage(message) {
  switch (message.type) {
    case "joined":
      return onJoined(message);
    case "peer-joined":
      return addPeer(message);
    case "peer-left":
      return removePeer(message.id, message.reason);
    case "offer":
    case "answer":
    case "candidate": {
      const entry = state.links.get(message.from);
      if (entry) entry.link.handle(message);
      return undefined;
    }
    case "chat":
      return onChat(message);
    case "ice":
      return onIce(message);
    case "error":
      return onError(message);
    default:
      return undefined;
  }
}

function onJoined(message) {
  const fresh = !message.resumed;
  state.id = message.id;
  state.joined = true;
  state.iceServers = message.iceServers || [];
  state.serverPolicy = message.iceTransportPolicy === "relay" ? "relay" : "all";
  state.relayOnlyAllowed = !!message.relayOnlyAllowed;
  state.turn = message.turn || null;
  state.capacity = message.capacity;
  $("name-dialog").open && $("name-dialog").close();
  const present = new Set(message.peers.map((p) => p.id));
  for (const id of [...state.links.keys()]) {
    if (fresh || !present.has(id)) removePeer(id, null);
  }
  for (const peer of message.peers) addPeer(peer);
  if (!fresh) {
    // Same seat, maybe a new network: refresh credentials and let ICE find a path again.
    for (const { link } of state.links.values()) {
      link.pc.setConfiguration({ ...link.pc.getConfiguration(), iceServers: rtcConfig().iceServers });
      if (!["connected", "completed"].includes(link.pc.iceConnectionState)) link.recover();
    }
  }
  updateInvite();
  renderSettings();
}

function onIce(message) {
  // Fresh TURN credentials: what is already relayed keeps its allocation; anything gathered
  // from now on (a new peer, an ICE restart) uses these.
  state.iceServers = message.iceServers || [];
  state.turn = message.turn || null;
  for (const { link } of state.links.values()) {
    link.pc.setConfiguration({ ...link.pc.getConfiguration(), iceServers: rtcConfig().iceServers });
  }
  state.iceRenewals = (state.iceRenewals || 0) + 1;
  renderSettings();
}

function onError(message) {
  state.errors.push(message);
  if (state.errors.length > 50) state.errors.shift();
  if (message.code === "password-required" || message.code === "bad-password") {
    askName(message.code === "bad-password" ? "Wrong password, try again." : "This room needs a password.", true);
  } else if (message.code === "token-required" || message.code === "bad-token") {
    end(
      message.code === "bad-token" ? "This invitation does not work" : "Invitation needed",
      message.code === "bad-token"
        ? `${message.message.replace(/^join: /, "")}.`
        : "This server admits people with an invitation link only. Ask whoever invited you for one.",
    );
    signaling.leave();
  } else if (message.code === "rate-limited" && message.ref === "join") {
    end("Too many wrong attempts", `${message.message.replace(/^join: /, "")}.`);
    signaling.leave();
  } else if (message.code === "outside-network") {
    end(
      "Calls stay inside the internal network",
      `${message.message.replace(/^join: t/, "T")}. Join from inside that network (at the office, or through its VPN).`,
    );
    signaling.leave();
  } else if (message.code === "revoked") {
    // The server closes the connection next: hang up rather than reconnect into a call it ended.
    leave();
    end("Access revoked", `${message.message} Ask whoever invited you if this is a mistake.`);
  } else if (message.code === "room-full") {
    end("This room is full", `It already has ${state.capacity || "the most"} people. Try again later.`);
    signaling.leave();
  } else {
    console.warn("signaling error", message);
  }
  renderSettings();
}

function setNetStatus(value) {
  const el = $("net-status");
  el.dataset.state = value;
  el.textContent = { connecting: "Connecting…", open: "Connected", reconnecting: "Reconnecting…", closed: "Offline" }[value] || value;
}

// --- chat ----------------------------------------------------------------------------------

function onChat(message) {
  const entry = { from: message.from, name: message.name, text: message.text, ts: message.ts, self: message.from === state.id };
  state.chat.push(entry);
  const li = document.createElement("li");
  li.className = entry.self ? "mine" : "";
  const head = document.createElement("div");
  head.className = "chat-head";
  const who = document.createElement("strong");
  who.textContent = entry.self ? "You" : entry.name;
  who.style.setProperty("--hue", hue(entry.name));
  const when = document.createElement("time");
  when.textContent = new Date(entry.ts).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  head.append(who, when);
  const body = document.createElement("p");
  body.textContent = entry.text;
  li.append(head, body);
  const log = $("chat-log");
  log.append(li);
  log.scrollTop = log.scrollHeight;
  if ($("chat-panel").hidden && !entry.self) {
    state.unread += 1;
    $("unread").hidden = false;
    $("unread").textContent = String(state.unread);
    toast(`${entry.name}: ${entry.text.slice(0, 80)}`);
  }
}

function sendChat(text) {
  const value = text.trim();
  if (!value) return false;
  return signaling.send({ type: "chat", text: value });
}

// --- panels and controls -------------------------------------------------------------------

function showPanel(which) {
  for (const [name, panel, button] of [["chat", $("chat-panel"), $("btn-chat")], ["settings", $("settings-panel"), $("btn-settings")]]) {
    const open = name === which && panel.hidden;
    panel.hidden = !open;
    button.setAttribute("aria-pressed", String(open));
  }
  if (which === "chat" && !$("chat-panel").hidden) {
    state.unread = 0;
    $("unread").hidden = true;
    $("chat-input").focus();
  }
  if (which === "settings") {
    refreshDevices();
    renderSettings();
  }
  requestAnimationFrame(layout);
}

function updateControls() {
  const mic = $("btn-mic");
  mic.setAttribute("aria-pressed", String(!state.mic || !state.tracks.audio));
  mic.title = state.mic ? "Mute microphone" : "Unmute microphone";
  const cam = $("btn-cam");
  cam.setAttribute("aria-pressed", String(!state.cam || !state.tracks.video));
  cam.title = state.cam ? "Turn camera off" : "Turn camera on";
  $("btn-screen").setAttribute("aria-pressed", String(!!state.screen));
  $("btn-screen").title = state.screen ? "Stop sharing" : "Share your screen";
}

function renderSettings() {
  const relay = $("relay-only");
  const forced = state.serverPolicy === "relay";
  relay.checked = effectivePolicy() === "relay";
  relay.disabled = forced || !state.relayOnlyAllowed;
  $("relay-hint").textContent = forced
    ? "This server sends all media through its TURN relay."
    : state.relayOnlyAllowed
      ? "Send all media through this server's TURN relay. Hides your IP addresses from the others."
      : "Not available: this server offers no TURN relay.";
  const info = $("netinfo");
  const rows = [
    ["Signaling", $("net-status").textContent],
    ["ICE policy", effectivePolicy() === "relay" ? "relay only" : "all paths"],
    ["Transport filter", transportFilter || "none"],
    ["ICE servers", rtcConfig().iceServers.flatMap((s) => s.urls).join("\n") || "none"],
  ];
  info.replaceChildren(
    ...rows.flatMap(([k, v]) => {
      const dt = document.createElement("dt");
      dt.textContent = k;
      const dd = document.createElement("dd");
      dd.textContent = v;
      return [dt, dd];
    }),
  );
  const items = diagnostics().map((d) => {
    const li = document.createElement("li");
    li.textContent = d;
    return li;
  });
  if (!items.length) {
    const li = document.createElement("li");
    li.className = "muted";
    li.textContent = "Nothing to report.";
    items.push(li);
  }
  const test = document.createElement("li");
  test.append(testLink("Test this network's paths to the server"));
  items.push(test);
  $("diag").replaceChildren(...items);
}

function testLink(text) {
  // The test page checks each way to the server with this room's access (token, password).
  const a = document.createElement("a");
  a.href = `/test?room=${encodeURIComponent(room)}`;
  a.target = "_blank";
  a.rel = "noopener";
  a.className = "test-link";
  a.textContent = text;
  return a;
}

function diagnostics() {
  const out = [];
  if (state.mediaError) out.push(`Camera/microphone: ${state.mediaError}`);
  for (const { link, name } of state.links.values()) {
    const problem = link.problem(effectivePolicy() === "relay", hasTurn());
    if (problem) out.push(`${name}: ${problem}`);
    for (const e of link.candidateErrors.slice(-3)) {
      out.push(`${name}: ${e.url || "ICE"} error ${e.errorCode} ${e.errorText}`.trim());
    }
  }
  for (const e of state.errors.slice(-3)) out.push(`Server: ${e.code}: ${e.message}`);
  return out;
}

// --- joining and leaving -------------------------------------------------------------------

function askName(error, needPassword) {
  const dialog = $("name-dialog");
  $("dialog-room").textContent = room;
  const input = $("name-input");
  input.value = state.name || savedName() || randomGuestName();
  $("password-field").hidden = !needPassword;
  $("join-btn").textContent = "Join room";
  const err = $("dialog-error");
  err.hidden = !error;
  err.textContent = error || "";
  if (!dialog.open) dialog.showModal();
  (needPassword ? $("password-input") : input).focus();
  if (!needPassword) input.select();
}

function onNameSubmit(event) {
  event.preventDefault();
  const name = $("name-input").value.trim();
  if (!name) return;
  state.name = name;
  saveName(name);
  const password = $("password-field").hidden ? "" : $("password-input").value;
  $("name-dialog").close();
  if (signaling) {
    state.password = password;
    try {
      sessionStorage.setItem(passwordKey(room), password);
    } catch {
      // Not remembered across reloads, that is all.
    }
    signaling.retry({ password });
  } else {
    start();
  }
}

function end(title, text) {
  state.ended = true;
  $("ended-title").textContent = title;
  $("ended-text").textContent = text || "";
  $("ended").hidden = false;
}

function leave() {
  if (signaling) signaling.leave();
  for (const id of [...state.links.keys()]) removePeer(id, null);
  for (const track of [state.tracks.audio, state.tracks.video, state.screen]) if (track) track.stop();
  state.joined = false;
  end("You left the room", "The others can keep talking. You can come back with the same link.");
}

function joinToken() {
  // An invitation link carries the token once; the tab keeps it for reloads, and the address
  // bar (and history, and anything copied from it) does not show it.
  const params = new URLSearchParams(location.search);
  let token = params.get("token") || "";
  try {
    if (token) sessionStorage.setItem(tokenKey(room), token);
    else token = sessionStorage.getItem(tokenKey(room)) || "";
  } catch {
    // Without session storage a reload needs the link again.
  }
  if (params.has("token")) {
    params.delete("token");
    const query = params.toString();
    history.replaceState(null, "", `${location.pathname}${query ? `?${query}` : ""}${location.hash}`);
  }
  return token || null;
}

function tokenName(token) {
  // The name a join token fixes (its payload is readable; only the server checks the signature).
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(new TextDecoder().decode(Uint8Array.from(atob(part), (c) => c.charCodeAt(0))));
    return typeof claims.name === "string" ? claims.name.trim().slice(0, 40) : "";
  } catch {
    return "";
  }
}

async function start() {
  $("room-name").textContent = room;
  document.title = `${room} · tsunagu`;
  selfTile = makeTile(`${state.name} (you)`);
  selfTile.classList.add("self");
  await startMedia();
  updateSelfTile();
  updateControls();
  try {
    state.password = state.password || sessionStorage.getItem(passwordKey(room)) || "";
  } catch {
    state.password = "";
  }
  signaling = new Signaling({ room, name: state.name, password: state.password, token: state.token });
  signaling.addEventListener("message", (event) => onMessage(event.detail));
  signaling.addEventListener("state", (event) => {
    setNetStatus(event.detail);
    if (!$("settings-panel").hidden) renderSettings();
  });
  signaling.addEventListener("fatal", (event) => {
    for (const id of [...state.links.keys()]) removePeer(id, null);
    end("Disconnected by the server", event.detail.reason || "The connection was closed.");
  });
  signaling.connect();
  setInterval(pollStats, 1000);
}

function init() {
  if (!room) {
    end("No such room", "Room names are letters, digits, dashes and underscores.");
    $("rejoin").hidden = true;
    return;
  }
  $("name-form").addEventListener("submit", onNameSubmit);
  $("btn-mic").addEventListener("click", toggleMic);
  $("btn-cam").addEventListener("click", toggleCam);
  $("btn-screen").addEventListener("click", toggleScreen);
  $("btn-chat").addEventListener("click", () => showPanel("chat"));
  $("btn-settings").addEventListener("click", () => showPanel("settings"));
  $("chat-close").addEventListener("click", () => showPanel("chat"));
  $("settings-close").addEventListener("click", () => showPanel("settings"));
  $("btn-leave").addEventListener("click", leave);
  $("rejoin").addEventListener("click", () => location.reload());
  $("invite").addEventListener("click", inviteClick);
  $("chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (sendChat($("chat-input").value)) $("chat-input").value = "";
  });
  $("relay-only").addEventListener("change", (event) => {
    state.relayOnly = event.target.checked;
    applyPolicy();
    toast(state.relayOnly ? "Relay only: media goes through the TURN server" : "All paths allowed");
  });
  $("mic-select").addEventListener("change", (event) => switchDevice("audio", event.target.value));
  $("cam-select").addEventListener("change", (event) => {
    state.devices.video = event.target.value;
    if (state.cam) switchDevice("video", event.target.value);
  });
  if (!navigator.mediaDevices || !navigator.mediaDevices.getDisplayMedia) $("btn-screen").hidden = true;
  if (navigator.mediaDevices) navigator.mediaDevices.addEventListener("devicechange", refreshDevices);
  new ResizeObserver(() => layout()).observe($("stage"));
  window.addEventListener("pagehide", () => signaling && signaling.leave());
  $("room-name").textContent = room;

  state.token = joinToken();
  const granted = state.token ? tokenName(state.token) : "";
  const given = (params.get("name") || "").trim().slice(0, 40);
  if (granted) {
    state.name = granted;
    start();
  } else if (given) {
    state.name = given;
    saveName(given);
    start();
  } else if (savedName()) {
    state.name = savedName();
    start();
  } else {
    askName(null, false);
  }
}

// Test and debugging hooks, reading the real RTCPeerConnections.
window.tsunagu = {
  state: () => ({
    room,
    id: state.id,
    name: state.name,
    joined: state.joined,
    ended: state.ended,
    signaling: signaling ? signaling.state : "idle",
    policy: effectivePolicy(),
    sharing: !!state.screen,
    transport: transportFilter,
    iceServers: rtcConfig().iceServers,
    turnUsername: state.turn ? state.turn.username : null,
    iceRenewals: state.iceRenewals || 0,
    localTracks: Object.fromEntries(Object.entries(outgoingTracks()).map(([k, t]) => [k, t ? t.readyState : null])),
  }),
  peers: () =>
    [...state.links.entries()].map(([id, { link, name }]) => ({
      id,
      name,
      polite: link.polite,
      connectionState: link.pc.connectionState,
      iceConnectionState: link.pc.iceConnectionState,
      signalingState: link.pc.signalingState,
      restarts: link.restarts,
      renewals: state.links.get(id).renewals,
      gathered: [...link.gathered],
      candidateErrors: link.candidateErrors,
      events: link.events.slice(),
    })),
  stats: async () => {
    const out = [];
    for (const [id, entry] of state.links.entries()) {
      const snap = await snapshot(entry.link.pc, entry.snap);
      out.push({ id, name: entry.name, badge: entry.tile.querySelector(".badge").textContent, ...snap });
    }
    return out;
  },
  chat: () => state.chat.map((c) => ({ ...c })),
  diagnostics,
  sendChat,
  peerConnection: (id) => (state.links.get(id) ? state.links.get(id).link.pc : null),
  /** Labels of the tracks this page sends to peer `id`, by kind. */
  sending: (id) => {
    const entry = state.links.get(id);
    if (!entry) return null;
    return Object.fromEntries(
      entry.link.pc.getSenders().filter((s) => s.track).map((s) => [s.track.kind, s.track.label]),
    );
  },
  breakSignaling: () => signaling && signaling.breakConnection(),
  restartIce: (id) => {
    const entry = state.links.get(id);
    if (entry) entry.link.restartIce();
    return !!entry;
  },
  leave,
};

init();
