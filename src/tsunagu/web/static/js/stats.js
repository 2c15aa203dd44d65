// Reading an RTCPeerConnection's statistics: which path the media takes, RTT and bitrate.

const RELAY_LABEL = { udp: "TURN/UDP", tcp: "TURN/TCP", tls: "TURN/TLS" };

/** The candidate pair in use, from the transport's selection or the nominated pair. */
function selectedPair(report) {
  let pair = null;
  report.forEach((s) => {
    if (s.type === "transport" && s.selectedCandidatePairId) {
      pair = report.get(s.selectedCandidatePairId) || pair;
    }
  });
  if (!pair) {
    report.forEach((s) => {
      if (s.type === "candidate-pair" && s.state === "succeeded" && (s.nominated || s.selected)) {
        pair = s;
      }
    });
  }
  return pair;
}

/**
 * Classify a path. kind is one of "direct", "nat", "relay", "relay-remote"; relayProtocol is
 * the protocol between this browser and its TURN server ("udp", "tcp" or "tls").
 */
export function classify(local, remote) {
  const lt = local ? local.candidateType : null;
  const rt = remote ? remote.candidateType : null;
  if (lt === "relay") {
    const proto = (local.relayProtocol || "").toLowerCase();
    return { kind: "relay", relayProtocol: proto || null, label: `Relayed · ${RELAY_LABEL[proto] || "TURN"}` };
  }
  if (rt === "relay") return { kind: "relay-remote", relayProtocol: null, label: "Relayed by peer" };
  if (lt === "srflx" || lt === "prflx" || rt === "srflx" || rt === "prflx") {
    return { kind: "nat", relayProtocol: null, label: "Via NAT" };
  }
  if (lt === "host" && rt === "host") return { kind: "direct", relayProtocol: null, label: "Direct" };
  return { kind: "unknown", relayProtocol: null, label: "—" };
}

/**
 * A snapshot of one connection. `prev` is the previous snapshot (for rates).
 * Returns {path, rtt (ms), framesDecoded, framesPerSecond, bytesReceived, bytesSent,
 * kbpsIn, kbpsOut, frameWidth, frameHeight, local, remote}.
 */
export async function snapshot(pc, prev) {
  const report = await pc.getStats();
  const now = performance.now();
  const pair = selectedPair(report);
  const local = pair ? report.get(pair.localCandidateId) : null;
  const remote = pair ? report.get(pair.remoteCandidateId) : null;
  let framesDecoded = 0;
  let framesPerSecond = 0;
  let bytesReceived = 0;
  let bytesSent = 0;
  let frameWidth = 0;
  let frameHeight = 0;
  report.forEach((s) => {
    if (s.type === "inbound-rtp") {
      bytesReceived += s.bytesReceived || 0;
      if (s.kind === "video") {
        framesDecoded += s.framesDecoded || 0;
        framesPerSecond = Math.max(framesPerSecond, s.framesPerSecond || 0);
        frameWidth = Math.max(frameWidth, s.frameWidth || 0);
        frameHeight = Math.max(frameHeight, s.frameHeight || 0);
      }
    } else if (s.type === "outbound-rtp") {
      bytesSent += s.bytesSent || 0;
    }
  });
  let kbpsIn = 0;
  let kbpsOut = 0;
  if (prev && now > prev.at) {
    const seconds = (now - prev.at) / 1000;
    kbpsIn = Math.max(0, ((bytesReceived - prev.bytesReceived) * 8) / 1000 / seconds);
    kbpsOut = Math.max(0, ((bytesSent - prev.bytesSent) * 8) / 1000 / seconds);
  }
  const path = pair ? classify(local, remote) : { kind: "none", relayProtocol: null, label: "Connecting…" };
  return {
    at: now,
    path,
    rtt: pair && typeof pair.currentRoundTripTime === "number" ? pair.currentRoundTripTime * 1000 : null,
    framesDecoded,
    framesPerSecond,
    frameWidth,
    frameHeight,
    bytesReceived,
    bytesSent,
    kbpsIn,
    kbpsOut,
    local: local
      ? { type: local.candidateType, protocol: local.protocol, relayProtocol: local.relayProtocol || null, address: local.address || local.ip || null, port: local.port, url: local.url || null }
      : null,
    remote: remote
      ? { type: remote.candidateType, protocol: remote.protocol, address: remote.address || remote.ip || null, port: remote.port }
      : null,
  };
}

export function formatRate(kbps) {
  if (kbps >= 1000) return `${(kbps / 1000).toFixed(1)} Mb/s`;
  return `${Math.round(kbps)} kb/s`;
}
