// Small helpers shared by the landing page and the room page.

const ADJECTIVES = [
  "amber", "brave", "bright", "calm", "clever", "cosy", "crisp", "eager", "gentle", "golden",
  "happy", "jolly", "keen", "kind", "lively", "lucky", "mellow", "merry", "misty", "noble",
  "plucky", "proud", "quick", "quiet", "rapid", "rosy", "shiny", "silver", "snowy", "sunny",
  "swift", "tidy", "vivid", "warm", "wild", "witty", "young", "zesty",
];
const NOUNS = [
  "badger", "bay", "brook", "cedar", "comet", "coral", "crane", "delta", "falcon", "fern",
  "finch", "fjord", "harbor", "heron", "island", "koala", "lagoon", "lantern", "maple", "meadow",
  "otter", "panda", "pebble", "pine", "puffin", "raven", "reef", "river", "robin", "sparrow",
  "summit", "tiger", "tulip", "valley", "walrus", "willow", "wren",
];

const ROOM_RE = /^[a-z0-9][a-z0-9_-]{0,47}$/;

function pick(list) {
  const values = new Uint32Array(1);
  crypto.getRandomValues(values);
  return list[values[0] % list.length];
}

const BASE32 = "abcdefghijklmnopqrstuvwxyz234567";

/** A random room name such as "quiet-otter-k3mz8q2vd7xwa": readable words for people, and
 * 65 random bits so that nobody finds an open room by trying names. */
export function randomRoomName() {
  const bytes = new Uint8Array(13);
  crypto.getRandomValues(bytes);
  const tail = Array.from(bytes, (b) => BASE32[b & 31]).join("");
  return `${pick(ADJECTIVES)}-${pick(NOUNS)}-${tail}`;
}

/** Where a tab keeps the join token of its invitation link, for reloads and reconnects. */
export function tokenKey(room) {
  return `tsunagu:token:${room}`;
}

export function randomGuestName() {
  const n = new Uint32Array(1);
  crypto.getRandomValues(n);
  return `Guest ${1000 + (n[0] % 9000)}`;
}

/** Canonical room name, or null if `text` cannot be one. Accepts a pasted room link too. */
export function parseRoom(text) {
  let value = (text || "").trim();
  const match = value.match(/\/r\/([^/?#]+)/);
  if (match) value = decodeURIComponent(match[1]);
  value = value.toLowerCase().replace(/\s+/g, "-");
  return ROOM_RE.test(value) ? value : null;
}

export function roomUrl(room) {
  return `${location.origin}/r/${encodeURIComponent(room)}`;
}

const NAME_KEY = "tsunagu:name";

export function savedName() {
  try {
    return localStorage.getItem(NAME_KEY) || "";
  } catch {
    return "";
  }
}

export function saveName(name) {
  try {
    localStorage.setItem(NAME_KEY, name);
  } catch {
    // Private browsing may refuse storage; the name is simply asked again next time.
  }
}

export function passwordKey(room) {
  return `tsunagu:pw:${room}`;
}

let toastTimer = 0;

/** Show a short message at the bottom of the screen. */
export function toast(text, ms = 2600) {
  const el = document.getElementById("toast");
  if (!el) return;
  el.textContent = text;
  el.classList.add("show");
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => el.classList.remove("show"), ms);
}

export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // Clipboard access needs a secure context and focus; fall back to a selection copy.
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.append(area);
    area.select();
    let ok = false;
    try {
      ok = document.execCommand("copy");
    } catch {
      ok = false;
    }
    area.remove();
    return ok;
  }
}

export function initials(name) {
  const parts = (name || "?").trim().split(/\s+/).filter(Boolean);
  const first = [...(parts[0] || "?")][0];
  const last = parts.length > 1 ? [...parts[parts.length - 1]][0] : "";
  return (first + last).toUpperCase();
}

/** A stable hue for a name, so each person keeps a colour. */
export function hue(text) {
  let h = 0;
  for (const ch of text || "") h = (h * 31 + ch.codePointAt(0)) % 360;
  return h;
}
