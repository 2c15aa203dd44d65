// Landing page: create a room with a random readable name, or join one by name or link.

import {
  copyText, parseRoom, passwordKey, randomRoomName, roomUrl, saveName, savedName, toast,
} from "./common.js";

const createForm = document.getElementById("create-form");
const joinForm = document.getElementById("join-form");
const nameInput = document.getElementById("create-name");
const passwordInput = document.getElementById("create-password");
const shareLink = document.getElementById("share-link");
const joinInput = document.getElementById("join-room");
const joinHint = document.getElementById("join-hint");

let room = randomRoomName();

function showRoom() {
  const url = roomUrl(room);
  const cut = url.length - room.length;
  const host = document.createElement("span");
  host.className = "host";
  host.textContent = url.slice(0, cut);
  const path = document.createElement("span");
  path.className = "path";
  path.textContent = url.slice(cut);
  shareLink.replaceChildren(host, path);
  shareLink.title = url;
}

function go(target) {
  const name = nameInput.value.trim();
  const query = name ? `?name=${encodeURIComponent(name)}` : "";
  location.assign(`/r/${encodeURIComponent(target)}${query}`);
}

nameInput.value = savedName();
showRoom();

document.getElementById("shuffle").addEventListener("click", () => {
  room = randomRoomName();
  showRoom();
});

document.getElementById("copy-link").addEventListener("click", async () => {
  toast((await copyText(roomUrl(room))) ? "Link copied" : "Copy failed — select the link");
});

createForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const name = nameInput.value.trim();
  if (!name) {
    nameInput.focus();
    return;
  }
  saveName(name);
  const password = passwordInput.value;
  try {
    if (password) sessionStorage.setItem(passwordKey(room), password);
  } catch {
    // Without session storage the room page asks for the password itself.
  }
  go(room);
});

joinInput.addEventListener("input", () => {
  const ok = !joinInput.value.trim() || parseRoom(joinInput.value) !== null;
  joinHint.classList.toggle("error", !ok);
  joinHint.textContent = ok
    ? "Letters, digits, dashes and underscores."
    : "That is not a room name: use letters, digits, dashes and underscores.";
});

joinForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const target = parseRoom(joinInput.value);
  if (!target) {
    joinInput.focus();
    return;
  }
  const name = nameInput.value.trim();
  if (name) saveName(name);
  go(target);
});

// Rooms of a server with invitation links cannot be made up here: say so instead.
fetch("/api/info")
  .then((response) => (response.ok ? response.json() : null))
  .then((info) => {
    if (info && info.roomAccess === "token") {
      document.getElementById("cards").hidden = true;
      document.getElementById("invitation-only").hidden = false;
    }
  })
  .catch(() => {});

window.tsunagu = { landing: true, room: () => room };
