// One RTCPeerConnection to one remote peer, negotiated with the "perfect negotiation" pattern:
// either side may start a negotiation at any time; on a collision the polite side rolls back
// and accepts the other's offer while the impolite side ignores the colliding offer, so glare
// never breaks a call. Which side is polite is decided by comparing the two peer ids.
//
// A connection can also be replaced as a whole (a change of ICE transport policy is not fully
// honoured by an existing one: Chromium keeps using the ports it gathered before). The side
// that replaces it offers from a fresh connection; the other side recognises the new DTLS
// fingerprint and replaces its own connection before answering.
//
// Glare is resolved, but it is also kept rare, because a rollback in the middle of ICE
// gathering can leave Chromium's new gathering without any candidate (seen with TURN-only
// policies): the polite side stays silent until the first offer arrives and then answers with
// its tracks, and only the impolite side restarts ICE on its own.

const RESTART_AFTER_DISCONNECTED_MS = 2500;
const POLITE_WAIT_MS = 4000;
const SLOW_RELAY_MS = 6000;

export class PeerLink extends EventTarget {
  /**
   * @param {object} options
   * @param {string} options.id remote peer id
   * @param {string} options.name remote display name
   * @param {boolean} options.polite
   * @param {RTCConfiguration} options.config
   * @param {(message: object) => void} options.send signaling send
   * @param {MediaStream} options.localStream stream the local tracks belong to
   * @param {{audio: MediaStreamTrack|null, video: MediaStreamTrack|null}} options.tracks
   * @param {"auto"|"offer"|"answer"} [options.mode] who sends the first offer: "auto" is
   *   the impolite side; "offer" is this side (a connection replaced on purpose); "answer"
   *   waits for the other side's offer (a connection replaced in response to one).
   */
  constructor({ id, name, polite, config, send, localStream, tracks, mode = "auto" }) {
    super();
    this.id = id;
    this.name = name;
    this.polite = polite;
    this.send = send;
    this.localStream = localStream;
    this.senders = { audio: null, video: null };
    this.remoteStream = new MediaStream();
    this.makingOffer = false;
    this.ignoreOffer = false;
    this.settingRemoteAnswer = false;
    this.chain = Promise.resolve();
    this.pending = [];
    this.events = [];
    this.candidateErrors = [];
    this.gathered = new Set();
    this.gatheringDone = false;
    this.gatheringSince = 0;
    this.restarts = 0;
    this.remoteStatus = { mic: true, cam: true, screen: false };
    this.disconnectTimer = 0;
    this.closed = false;
    this.started = false;
    this.startTimer = 0;
    this.tracks = tracks;
    this.channel = null;

    const pc = new RTCPeerConnection(config);
    this.pc = pc;

    // Chromium also fires this when setConfiguration() changes the ICE servers (fresh TURN
    // credentials after a signaling resume), even on a connection with nothing to offer yet.
    // Such an offer has no media section, fails under max-bundle and leaves the connection
    // refusing the other side's offer: until start() there is nothing to negotiate.
    pc.addEventListener("negotiationneeded", () => {
      if (this.started) this.negotiate();
    });
    pc.addEventListener("signalingstatechange", () => this.note(`signaling ${pc.signalingState}`));
    pc.addEventListener("icecandidate", ({ candidate }) => {
      this.note(candidate ? `local candidate ${candidate.type || ""} ${candidate.usernameFragment || ""}` : "local gathering done");
      if (candidate && candidate.candidate) {
        this.gathered.add(candidate.type || candidateType(candidate.candidate));
        this.gatheringDone = false;
      }
      this.send({ type: "candidate", to: this.id, candidate: candidate ? candidate.toJSON() : null });
    });
    pc.addEventListener("icegatheringstatechange", () => {
      this.note(`gathering ${pc.iceGatheringState}`);
      if (pc.iceGatheringState === "gathering") {
        this.gatheringDone = false;
        this.gatheringSince = this.gatheringSince || performance.now();
      } else if (pc.iceGatheringState === "complete") {
        this.gatheringDone = true;
      }
      this.changed();
    });
    pc.addEventListener("icecandidateerror", (event) => {
      this.note(`candidate error ${event.errorCode} ${event.url || ""}`);
      this.candidateErrors.push({
        url: event.url || "",
        errorCode: event.errorCode,
        errorText: event.errorText || "",
        address: event.address || null,
        port: event.port || null,
      });
      if (this.candidateErrors.length > 20) this.candidateErrors.shift();
      this.changed();
    });
    pc.addEventListener("track", ({ track }) => {
      this.remoteStream.addTrack(track);
      track.addEventListener("unmute", () => this.changed());
      track.addEventListener("ended", () => this.remoteStream.removeTrack(track));
      this.dispatchEvent(new Event("track"));
    });
    pc.addEventListener("connectionstatechange", () => this.changed());
    pc.addEventListener("iceconnectionstatechange", () => this.onIceState());

    if (mode === "offer" || (mode === "auto" && !polite)) {
      this.start();
    } else {
      // Normally the other side's offer arrives within a round trip. If it does not (its
      // connection to us predates ours, or the offer was lost), offer ourselves: either it
      // answers, or its old connection fails on our offer and it starts afresh.
      this.startTimer = setTimeout(() => this.start(), POLITE_WAIT_MS);
    }
  }

  /** Add the data channel and the tracks; the first negotiation follows from it. */
  start() {
    clearTimeout(this.startTimer);
    if (this.started || this.closed) return;
    this.started = true;
    // A negotiated channel (same id on both sides) needs no extra offer round and carries
    // small status updates (muted, camera off) straight between the two browsers.
    this.channel = this.pc.createDataChannel("status", { negotiated: true, id: 0 });
    this.channel.addEventListener("open", () => this.dispatchEvent(new Event("channelopen")));
    this.channel.addEventListener("message", (event) => this.onChannelMessage(event.data));
    this.setTracks(this.tracks);
  }

  changed() {
    this.dispatchEvent(new Event("change"));
  }

  /** A short, bounded history of what happened on this link, for diagnostics. */
  note(what) {
    this.events.push(`${Math.round(performance.now())} ${what}`);
    if (this.events.length > 60) this.events.shift();
  }

  /** Make the senders carry `tracks` (null stops sending that kind without renegotiating). */
  setTracks(tracks) {
    this.tracks = tracks;
    if (!this.started) return;
    for (const kind of ["audio", "video"]) {
      const track = tracks[kind] || null;
      const sender = this.senders[kind];
      if (sender) {
        if (sender.track !== track) sender.replaceTrack(track).catch(() => {});
      } else if (track) {
        this.senders[kind] = this.pc.addTrack(track, this.localStream);
      }
    }
  }

  async negotiate() {
    try {
      this.makingOffer = true;
      await this.pc.setLocalDescription();
      const desc = this.pc.localDescription;
      this.send({ type: desc.type, to: this.id, sdp: desc.sdp });
    } catch (err) {
      console.warn("negotiation failed", err);
    } finally {
      this.makingOffer = false;
    }
  }

  /** Handle an offer, answer or candidate from the remote peer, in arrival order. */
  handle(message) {
    this.chain = this.chain.then(() => this.process(message)).catch((err) => {
      console.warn(`signaling from ${this.id} failed`, err);
    });
    return this.chain;
  }

  async process(message) {
    if (this.closed) return;
    const pc = this.pc;
    if (message.type === "offer" || message.type === "answer") {
      const current = pc.remoteDescription;
      if (message.type === "offer" && current && fingerprints(current.sdp) !== fingerprints(message.sdp)) {
        // New DTLS keys: the other side replaced its connection to us. An existing
        // connection would accept the offer but never connect, so make a fresh one too.
        this.note("remote connection renewed");
        this.dispatchEvent(new CustomEvent("renewed", { detail: message }));
        return;
      }
      const readyForOffer =
        !this.makingOffer && (pc.signalingState === "stable" || this.settingRemoteAnswer);
      const collision = message.type === "offer" && !readyForOffer;
      this.ignoreOffer = !this.polite && collision;
      this.note(`remote ${message.type}${collision ? " (collision)" : ""}${this.ignoreOffer ? " ignored" : ""}`);
      if (this.ignoreOffer) return;
      this.settingRemoteAnswer = message.type === "answer";
      try {
        await pc.setRemoteDescription({ type: message.type, sdp: message.sdp });
      } finally {
        this.settingRemoteAnswer = false;
      }
      await this.flushPending();
      if (message.type === "offer") {
        // Tracks added now ride on the transceivers this offer created: one round trip.
        this.start();
        await pc.setLocalDescription();
        const desc = pc.localDescription;
        this.send({ type: desc.type, to: this.id, sdp: desc.sdp });
      }
    } else if (message.type === "candidate") {
      const candidate = message.candidate;
      if (!candidate) {
        // End of candidates; meaningless for a description we ignored, harmless otherwise.
        await pc.addIceCandidate().catch(() => {});
        return;
      }
      if (!pc.remoteDescription || this.ignoreOffer) {
        this.stash(candidate);
        return;
      }
      try {
        await pc.addIceCandidate(candidate);
      } catch {
        this.stash(candidate);
      }
    }
  }

  // Candidates that belong to a description we do not have (yet). This matters after a
  // collision: the polite side rolls back its offer and answers, and its answer reuses the
  // ICE credentials of that offer, whose candidates it already sent while we were ignoring
  // the offer. It will not send them again, and with a relay-only policy nothing else would
  // open the TURN permissions, so they are kept and tried after the next remote description.
  stash(candidate) {
    this.pending.push(candidate);
    if (this.pending.length > 100) this.pending.shift();
  }

  async flushPending() {
    const pending = this.pending;
    this.pending = [];
    for (const candidate of pending) {
      await this.pc.addIceCandidate(candidate).catch(() => {});
    }
  }

  onIceState() {
    const state = this.pc.iceConnectionState;
    clearTimeout(this.disconnectTimer);
    if (state === "failed") {
      this.recover();
    } else if (state === "disconnected") {
      // Often transient (a Wi-Fi hiccup); restart only if it does not come back by itself.
      this.disconnectTimer = setTimeout(() => {
        if (this.pc.iceConnectionState === "disconnected") this.recover();
      }, RESTART_AFTER_DISCONNECTED_MS);
    }
    this.changed();
  }

  /** Restart ICE if this side leads restarts (the impolite one); the other side follows. */
  recover() {
    if (!this.polite) this.restartIce();
  }

  restartIce() {
    if (this.closed) return;
    this.restarts += 1;
    // A new ICE generation: what was gathered or failed before says nothing about it.
    this.gathered = new Set();
    this.candidateErrors = [];
    this.gatheringDone = false;
    this.gatheringSince = 0;
    this.pc.restartIce();
  }

  sendStatus(status) {
    if (this.channel && this.channel.readyState === "open") {
      this.channel.send(JSON.stringify({ kind: "status", ...status }));
    }
  }

  onChannelMessage(data) {
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      return;
    }
    if (message.kind === "status") {
      this.remoteStatus = {
        mic: message.mic !== false,
        cam: message.cam !== false,
        screen: message.screen === true,
      };
      this.changed();
    }
  }

  /** Why this link cannot connect, in words, or null while nothing points at a problem. */
  problem(relayOnly, hasTurn) {
    const state = this.pc.connectionState;
    if (state === "connected") return null;
    const turnErrors = this.candidateErrors.filter((e) => e.url.startsWith("turn"));
    const last = turnErrors[turnErrors.length - 1];
    const detail = last ? ` (${last.errorCode} ${last.errorText})`.replace(/ \)$/, ")") : "";
    const waited = this.gatheringSince ? performance.now() - this.gatheringSince : 0;
    let reason = null;
    if (hasTurn && !this.gathered.has("relay")) {
      if (this.gatheringDone) {
        reason = `No relay candidate: TURN unreachable${detail}`;
      } else if (waited > SLOW_RELAY_MS) {
        // Browsers give up on a silent TURN server only after about 40 seconds; say early.
        reason = `No relay candidate yet: TURN not answering for ${Math.round(waited / 1000)} s${detail}`;
      }
    } else if (this.gatheringDone && relayOnly && !hasTurn) {
      reason = "Relay only, but this server offers no TURN relay";
    } else if (this.gatheringDone && this.gathered.size === 0) {
      reason = "No ICE candidates gathered: no usable network";
    }
    if (state === "failed") return reason || "Connection failed: no path between you";
    if (state === "disconnected") return "Connection interrupted, reconnecting…";
    return reason;
  }

  close() {
    this.closed = true;
    clearTimeout(this.startTimer);
    clearTimeout(this.disconnectTimer);
    this.pc.close();
  }
}

/** The DTLS fingerprints of a description, as one comparable string. */
function fingerprints(sdp) {
  return (sdp.match(/^a=fingerprint:.*$/gm) || []).map((line) => line.trim().toLowerCase()).sort().join("|");
}

function candidateType(text) {
  const match = / typ (\w+)/.exec(text);
  return match ? match[1] : "unknown";
}
