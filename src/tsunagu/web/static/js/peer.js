// One RTCPeerConnection to one remote peer, negotiated with the "perfect negotiation" pattern:
// both sides may start a negotiation at any time; on a collision the polite side rolls back
// and accepts the other's offer while the impolite side ignores the colliding offer, so glare
// never breaks a call. Which side is polite is decided by comparing the two peer ids.

const RESTART_AFTER_DISCONNECTED_MS = 2500;

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
   */
  constructor({ id, name, polite, config, send, localStream, tracks }) {
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
    this.candidateErrors = [];
    this.gathered = new Set();
    this.gatheringDone = false;
    this.restarts = 0;
    this.remoteStatus = { mic: true, cam: true, screen: false };
    this.disconnectTimer = 0;
    this.closed = false;

    const pc = new RTCPeerConnection(config);
    this.pc = pc;
    // A negotiated channel (same id on both sides) needs no extra offer round and carries
    // small status updates (muted, camera off) straight between the two browsers.
    this.channel = pc.createDataChannel("status", { negotiated: true, id: 0 });
    this.channel.addEventListener("open", () => this.dispatchEvent(new Event("channelopen")));
    this.channel.addEventListener("message", (event) => this.onChannelMessage(event.data));

    pc.addEventListener("negotiationneeded", () => this.negotiate());
    pc.addEventListener("icecandidate", ({ candidate }) => {
      if (candidate && candidate.candidate) {
        this.gathered.add(candidate.type || candidateType(candidate.candidate));
        this.gatheringDone = false;
      }
      this.send({ type: "candidate", to: this.id, candidate: candidate ? candidate.toJSON() : null });
    });
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "gathering") {
        this.gathered = new Set();
        this.candidateErrors = [];
        this.gatheringDone = false;
      } else if (pc.iceGatheringState === "complete") {
        this.gatheringDone = true;
      }
      this.changed();
    });
    pc.addEventListener("icecandidateerror", (event) => {
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

    this.setTracks(tracks);
  }

  changed() {
    this.dispatchEvent(new Event("change"));
  }

  /** Make the senders carry `tracks` (null stops sending that kind without renegotiating). */
  setTracks(tracks) {
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
      const readyForOffer =
        !this.makingOffer && (pc.signalingState === "stable" || this.settingRemoteAnswer);
      const collision = message.type === "offer" && !readyForOffer;
      this.ignoreOffer = !this.polite && collision;
      if (this.ignoreOffer) return;
      this.settingRemoteAnswer = message.type === "answer";
      try {
        await pc.setRemoteDescription({ type: message.type, sdp: message.sdp });
      } finally {
        this.settingRemoteAnswer = false;
      }
      if (message.type === "offer") {
        await pc.setLocalDescription();
        const desc = pc.localDescription;
        this.send({ type: desc.type, to: this.id, sdp: desc.sdp });
      }
    } else if (message.type === "candidate") {
      try {
        if (message.candidate) {
          await pc.addIceCandidate(message.candidate);
        } else {
          await pc.addIceCandidate();
        }
      } catch (err) {
        // Candidates of an offer we ignored, or of a generation already replaced, fail here.
        if (!this.ignoreOffer && message.candidate) console.debug("candidate refused", err);
      }
    }
  }

  onIceState() {
    const state = this.pc.iceConnectionState;
    clearTimeout(this.disconnectTimer);
    if (state === "failed") {
      this.restartIce();
    } else if (state === "disconnected") {
      // Often transient (a Wi-Fi hiccup); restart only if it does not come back by itself.
      this.disconnectTimer = setTimeout(() => {
        if (this.pc.iceConnectionState === "disconnected") this.restartIce();
      }, RESTART_AFTER_DISCONNECTED_MS);
    }
    this.changed();
  }

  restartIce() {
    if (this.closed) return;
    this.restarts += 1;
    this.pc.restartIce();
  }

  /** Change the ICE transport policy ("all" or "relay") and gather again under it. */
  setPolicy(policy) {
    const config = this.pc.getConfiguration();
    if (config.iceTransportPolicy === policy) return;
    config.iceTransportPolicy = policy;
    this.pc.setConfiguration(config);
    this.restartIce();
  }

  sendStatus(status) {
    if (this.channel.readyState === "open") this.channel.send(JSON.stringify(status));
  }

  onChannelMessage(data) {
    try {
      const status = JSON.parse(data);
      this.remoteStatus = {
        mic: status.mic !== false,
        cam: status.cam !== false,
        screen: status.screen === true,
      };
      this.changed();
    } catch {
      // Ignore anything that is not a status update.
    }
  }

  /** Why this link cannot connect, in words, or null while nothing points at a problem. */
  problem(relayOnly, hasTurn) {
    const state = this.pc.connectionState;
    if (state === "connected") return null;
    const errors = this.candidateErrors;
    const turnErrors = errors.filter((e) => e.url.startsWith("turn"));
    const noRelay = this.gatheringDone && hasTurn && !this.gathered.has("relay");
    let reason = null;
    if (noRelay) {
      const detail = turnErrors.length
        ? ` (${turnErrors[turnErrors.length - 1].errorCode} ${turnErrors[turnErrors.length - 1].errorText})`
        : "";
      reason = `No relay candidate: TURN unreachable${detail}`;
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
    clearTimeout(this.disconnectTimer);
    this.pc.close();
  }
}

function candidateType(text) {
  const match = / typ (\w+)/.exec(text);
  return match ? match[1] : "unknown";
}
