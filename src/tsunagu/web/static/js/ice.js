// ICE server lists as the page receives them in "joined".

/**
 * Keep only the TURN URIs of one transport ("udp", "tcp" or "tls"), as asked for with
 * ?transport= when checking which transports a network lets through. STUN URIs stay; servers
 * left without URIs are dropped. A falsy transport keeps everything.
 */
export function filterServers(servers, transport) {
  if (!transport) return servers;
  const keep = (url) => {
    if (url.startsWith("stun:")) return true;
    if (transport === "tls") return url.startsWith("turns:");
    if (!url.startsWith("turn:")) return false;
    // A turn: URI without a transport parameter means UDP.
    return url.includes(`transport=${transport}`) || (transport === "udp" && !url.includes("transport="));
  };
  return servers
    .map((server) => {
      const urls = (Array.isArray(server.urls) ? server.urls : [server.urls]).filter(keep);
      return { ...server, urls };
    })
    .filter((server) => server.urls.length > 0);
}
