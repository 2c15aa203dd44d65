// Signaling client: one WebSocket to /ws speaking protocol version 1 (docs/SIGNALING.md).
//
// The connection is kept alive with an application ping; when it drops the client reconnects
// with its peer id and resume token, so the server keeps its seat in the room and queues what
// others sent meanwhile. What the server wrote to the old connection just before it dropped
// may never have been read (a candidate, say): the resume names the seq of the last message
// this client saw, and the server sends what came after it again.
// Events: "message" (detail: the message), "state" (detail: one of "connecting", "open",
// "reconnecting", "closed"), "fatal" (detail: {code, reason}).

const PING_EVERY_MS = 8000;
const PONG_WITHIN_MS = 5000;
const BACKOFF_MS = [250, 500, 1000, 2000, 3000];

export class Signaling extends EventTarget {
  constructor({ room, name, password, token }) {
    super();
    this.room = room;
    this.name = name;
    this.password = password || null;
    this.token = token || null;
    this.resume = null;
    this.ws = null;
    this.state = "idle";
    this.attempt = 0;
    this.closing = false;
    this.pingTimer = 0;
    this.pongTimer = 0;
    this.retryTimer = 0;
    this.queue = [];
    this.seq = 0; // of the last message read from the server, for a resume
  }

  url() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    return `${scheme}://${location.host}/ws`;
  }

  setState(state) {
    if (state === this.state) return;
    this.state = state;
    this.dispatchEvent(new CustomEvent("state", { detail: state }));
  }

  connect() {
    this.closing = false;
    clearTimeout(this.retryTimer);
    this.setState(this.resume ? "reconnecting" : "connecting");
    const ws = new WebSocket(this.url());
    this.ws = ws;
    ws.addEventListener("open", () => {
      if (ws !== this.ws) return;
      const join = { type: "join", v: 1, room: this.room, name: this.name };
      if (this.password) join.password = this.password;
      if (this.token) join.token = this.token;
      if (this.resume) join.resume = { ...this.resume, seq: this.seq };
      ws.send(JSON.stringify(join));
      this.keepAlive();
    });
    ws.addEventListener("message", (event) => {
      if (ws !== this.ws) return;
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      this.sawTraffic();
      if (message.type === "pong") return;
      if (typeof message.seq === "number") this.seq = message.seq;
      if (message.type === "joined") {
        this.resume = { id: message.id, token: message.token };
        if (!message.resumed) this.seq = 0; // a new seat counts from the start
        this.attempt = 0;
        this.setState("open");
        const pending = this.queue;
        this.queue = [];
        // Only a resumed seat still has the peers these messages were meant for.
        if (message.resumed) for (const item of pending) this.send(item);
      }
      this.dispatchEvent(new CustomEvent("message", { detail: message }));
    });
    ws.addEventListener("close", (event) => {
      if (ws !== this.ws) return;
      this.stopKeepAlive();
      this.ws = null;
      if (this.closing) {
        this.setState("closed");
        return;
      }
      if (event.code === 1008) {
        this.setState("closed");
        this.dispatchEvent(new CustomEvent("fatal", { detail: { code: event.code, reason: event.reason } }));
        return;
      }
      this.scheduleReconnect();
    });
  }

  scheduleReconnect() {
    this.setState("reconnecting");
    const delay = BACKOFF_MS[Math.min(this.attempt, BACKOFF_MS.length - 1)];
    this.attempt += 1;
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => this.connect(), delay);
  }

  keepAlive() {
    this.stopKeepAlive();
    this.pingTimer = setInterval(() => {
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return;
      this.ws.send(JSON.stringify({ type: "ping" }));
      clearTimeout(this.pongTimer);
      // No answer: the path to the server is dead even if the socket looks open.
      this.pongTimer = setTimeout(() => this.ws && this.ws.close(4000, "no pong"), PONG_WITHIN_MS);
    }, PING_EVERY_MS);
  }

  sawTraffic() {
    clearTimeout(this.pongTimer);
  }

  stopKeepAlive() {
    clearInterval(this.pingTimer);
    clearTimeout(this.pongTimer);
  }

  /**
   * Send a message; while reconnecting it waits (bounded) for the new connection. Candidates
   * wait too: trickled while the connection was down, they are the only ones the other side
   * would get of this ICE generation, and nothing restarts ICE for a call that is setting up.
   */
  send(message) {
    const ws = this.ws;
    if (ws && ws.readyState === WebSocket.OPEN && this.state === "open") {
      ws.send(JSON.stringify(message));
      return true;
    }
    if (this.queue.length < 200) this.queue.push(message);
    return false;
  }

  /** Abandon the seat: after a password error or a capacity error, before a new join. */
  retry({ password }) {
    this.password = password || this.password;
    this.resume = null;
    if (this.ws) {
      this.closing = true;
      this.ws.close(1000);
      this.ws = null;
    }
    this.connect();
  }

  leave() {
    this.closing = true;
    clearTimeout(this.retryTimer);
    this.stopKeepAlive();
    const ws = this.ws;
    if (ws && ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify({ type: "leave" }));
      ws.close(1000, "leaving");
    }
    this.ws = null;
    this.resume = null;
    this.setState("closed");
  }

  /** Drop the connection without a close handshake; used to test resuming. */
  breakConnection() {
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      this.stopKeepAlive();
      ws.close(4001, "simulated network loss");
      this.scheduleReconnect();
    }
  }
}
