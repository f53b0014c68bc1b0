// The bundled web page: start page, join screen and call screen. The protocol and media code
// live in ./rallypoint.js; this module is only the user interface. For tests and debugging,
// the live objects are on `window.rallypoint` (client, room, local tracks).

import { RallypointClient, Room } from "./rallypoint.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const ROOM_PATTERN = /^[A-Za-z0-9_.~-]{1,64}$/;
// With `autojoin`, the camera opens once the others' video shows, or after this long.
const FIRST_VIDEO_WAIT_MS = 1500;
// At most this many of the others' video tiles show video (`?maxVideos=N`, default 9): screen
// shares first, then cameras by how recently their person spoke. The rest show the name only,
// and their video is not sent to this page (their sound is).
const MAX_VIDEOS = parseCount(params.get("maxVideos"), 9);
// Tile sizes are reported to the server this long after the last change.
const RENDER_REPORT_MS = 150;
const VIDEO_CONSTRAINTS = {
  width: { ideal: 640 },
  height: { ideal: 480 },
  frameRate: { ideal: 24, max: 30 },
};

const app = {
  client: null,
  room: null,
  roomName: null,
  local: { camera: null, microphone: null, screen: null },
  devices: { camera: "", microphone: "" },
  mediaProblem: null,
  tiles: new Map(), // key -> tile elements
  chatItems: new Map(), // cid -> <li>
  unread: 0,
  chatOpen: true,
  typingNames: new Map(), // identity -> name
  speakers: [],
  speakerOrder: [], // participant ids, the most recent speaker first
  maxVideos: MAX_VIDEOS,
  renderTimer: null,
  ending: false,
};
window.rallypoint = app;

function parseCount(text, fallback) {
  const n = Number(text ?? "");
  return text !== null && text !== "" && Number.isInteger(n) && n >= 0 ? n : fallback;
}

// -- plain-words messages ---------------------------------------------------------------------

const ERRORS = {
  room_full: ["This room is full", "Nobody else can join right now. Try again later or pick another room."],
  room_locked: ["This room is locked", "Someone in the call has locked the room. Ask them to unlock it."],
  kicked: ["You were removed from the call", "A moderator removed you from this room."],
  token_expired: ["Your link has expired", "Ask for a new invitation link to join this room."],
  token_invalid: ["This link does not work", "The invitation link is not valid. Ask for a new one."],
  token_required: ["You need an invitation link", "This server only lets people in with an invitation link."],
  token_wrong_room: ["This link is for another room", "Your invitation does not allow joining this room."],
  forbidden: ["You may not join this room", "Your invitation does not allow joining this room."],
  replaced: ["You joined from another tab", "This call continues in another tab or window."],
  unsupported_version: ["Please reload the page", "The server was updated; reload to continue."],
};

function mediaProblemText(problem) {
  switch (problem) {
    case "denied":
      return "Camera and microphone are blocked, so others cannot see or hear you. Allow them in your browser's site settings and reload to use them.";
    case "missing":
      return "No camera or microphone was found, so others cannot see or hear you.";
    case "no-camera":
      return "No camera was found: others can hear you but not see you.";
    case "no-microphone":
      return "No microphone was found: others can see you but not hear you.";
    case "busy":
      return "The camera or microphone is used by another app.";
    case "insecure":
      return "The camera and microphone need a secure (https) page.";
    default:
      return "";
  }
}

// -- routing ----------------------------------------------------------------------------------

function show(screenId) {
  for (const el of document.querySelectorAll(".screen")) el.hidden = el.id !== screenId;
}

function start() {
  const match = location.pathname.match(/^\/room\/([^/]+)\/?$/);
  if (!match) {
    showHome();
    return;
  }
  let room;
  try {
    room = decodeURIComponent(match[1]);
  } catch {
    room = "";
  }
  if (!ROOM_PATTERN.test(room)) {
    showHome(`"${room}" is not a valid room name.`);
    return;
  }
  app.roomName = room;
  document.title = `${room} - Rallypoint`;
  if (params.get("autojoin") === "1") {
    // Join first and open the camera once the others' video shows: the camera's start-up
    // and publishing would slow down receiving them (and a permission prompt would hold
    // everything up).
    joinCall(params.get("name") || storedName() || guestName(), acquireMedia);
  } else {
    showLobby();
  }
}

function storedName() {
  try {
    return localStorage.getItem("rallypoint.name") || "";
  } catch {
    return "";
  }
}

function remember(key, value, storage = "localStorage") {
  try {
    globalThis[storage].setItem(key, value);
  } catch {
    // Private mode: nothing is remembered.
  }
}

function stored(key, storage, make) {
  try {
    let value = globalThis[storage].getItem(key);
    if (!value) {
      value = make();
      globalThis[storage].setItem(key, value);
    }
    return value;
  } catch {
    return make();
  }
}

function randomHex(bytes) {
  const b = new Uint8Array(bytes);
  crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

function guestName() {
  return `Guest ${randomHex(2).toUpperCase()}`;
}

function showHome(error = "") {
  show("home");
  document.title = "Rallypoint";
  const form = $("home-form");
  $("home-room").value = `room-${randomHex(3)}`;
  $("home-name").value = storedName();
  if (error) {
    const p = document.createElement("p");
    p.className = "notice";
    p.setAttribute("role", "alert");
    p.textContent = error;
    form.insertBefore(p, form.querySelector("label"));
  }
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const room = $("home-room").value.trim();
    const name = $("home-name").value.trim();
    if (name) remember("rallypoint.name", name);
    location.assign(`/room/${encodeURIComponent(room)}`);
  });
}

// -- join screen ------------------------------------------------------------------------------

async function showLobby() {
  show("lobby");
  $("lobby-title").textContent = `Join ${app.roomName}`;
  const nameInput = $("lobby-name");
  if (params.get("token")) {
    // The invitation decides the display name.
    $("lobby-name-field").hidden = true;
    nameInput.required = false;
  } else {
    nameInput.value = params.get("name") || storedName();
  }
  await acquireMedia();
  showPreview();
  await fillDevicePickers();
  for (const kind of ["camera", "microphone"]) {
    $(`lobby-${kind}`).addEventListener("change", async (ev) => {
      app.devices[kind] = ev.target.value;
      app.local[kind]?.stop();
      app.local[kind] = await getTrack(kind, ev.target.value);
      showPreview();
    });
  }
  $("lobby-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const name = nameInput.value.trim();
    if (name) remember("rallypoint.name", name);
    joinCall(name || guestName());
  });
}

function showPreview() {
  const video = $("lobby-preview");
  const cam = app.local.camera;
  video.srcObject = cam ? new MediaStream([cam]) : null;
  $("lobby-preview-off").hidden = Boolean(cam);
  const notice = $("lobby-notice");
  notice.textContent = mediaProblemText(app.mediaProblem);
  notice.hidden = !app.mediaProblem;
}

async function fillDevicePickers() {
  if (!navigator.mediaDevices?.enumerateDevices) return;
  const devices = await navigator.mediaDevices.enumerateDevices();
  for (const [kind, deviceKind] of [
    ["camera", "videoinput"],
    ["microphone", "audioinput"],
  ]) {
    const select = $(`lobby-${kind}`);
    select.replaceChildren();
    const current = app.local[kind]?.getSettings().deviceId;
    let n = 0;
    for (const d of devices.filter((x) => x.kind === deviceKind)) {
      const option = new Option(d.label || `${kind} ${++n}`, d.deviceId);
      option.selected = d.deviceId === current;
      select.append(option);
    }
    if (!select.options.length) select.append(new Option(`No ${kind}`, ""));
    select.disabled = select.options.length < 2 && !select.options[0].value;
  }
}

function problemOf(err) {
  if (!err) return null;
  if (err.name === "NotAllowedError" || err.name === "SecurityError") return "denied";
  if (err.name === "NotFoundError" || err.name === "OverconstrainedError") return "missing";
  if (err.name === "NotReadableError" || err.name === "AbortError") return "busy";
  return "missing";
}

async function getTrack(kind, deviceId = "") {
  const constraints =
    kind === "camera"
      ? { video: { ...VIDEO_CONSTRAINTS, ...(deviceId ? { deviceId: { exact: deviceId } } : {}) } }
      : { audio: deviceId ? { deviceId: { exact: deviceId } } : true };
  const stream = await navigator.mediaDevices.getUserMedia(constraints);
  return stream.getTracks()[0];
}

/** Camera and microphone if we may; the call works without either. */
async function acquireMedia() {
  if (!navigator.mediaDevices?.getUserMedia) {
    app.mediaProblem = "insecure";
    return;
  }
  try {
    const stream = await navigator.mediaDevices.getUserMedia({
      video: VIDEO_CONSTRAINTS,
      audio: true,
    });
    app.local.camera = stream.getVideoTracks()[0] ?? null;
    app.local.microphone = stream.getAudioTracks()[0] ?? null;
    app.mediaProblem = null;
    return;
  } catch (err) {
    app.mediaProblem = problemOf(err);
    if (app.mediaProblem === "denied") return;
  }
  // One of the two may be missing or busy: try each alone.
  let camErr = null;
  let micErr = null;
  app.local.camera = await getTrack("camera").catch((e) => ((camErr = e), null));
  app.local.microphone = await getTrack("microphone").catch((e) => ((micErr = e), null));
  if (app.local.camera && app.local.microphone) app.mediaProblem = null;
  else if (app.local.camera) app.mediaProblem = "no-microphone";
  else if (app.local.microphone) app.mediaProblem = "no-camera";
  else app.mediaProblem = problemOf(camErr || micErr);
}

// -- the call ---------------------------------------------------------------------------------

/**
 * Join the call. `openMedia` opens the camera and microphone (when not open yet, as with
 * `autojoin`); it is called once the call is joined and the others' video shows.
 */
async function joinCall(name, openMedia = async () => {}) {
  show("call");
  $("call-title").textContent = app.roomName;
  setChatOpen(window.matchMedia("(min-width: 900px)").matches);
  setStatus("Connecting…");

  const token = params.get("token");
  const client = new RallypointClient({
    token,
    name,
    identity: token ? null : stored("rallypoint.identity", "sessionStorage", () => `web-${randomHex(6)}`),
    device: stored("rallypoint.device", "localStorage", () => `web-${randomHex(8)}`),
  });
  app.client = client;
  client.on("state", onConnectionState);
  client.on("closed", ({ error }) => {
    if (error && !app.ending) endCall(error.code, error.message);
  });
  window.addEventListener("pagehide", () => {
    app.ending = true;
    client.close();
  });

  try {
    await client.connect();
  } catch (err) {
    endCall(err.code, err.message);
    return;
  }
  const room = new Room(client, app.roomName);
  app.room = room;
  bindRoom(room);
  addLocalTile();
  const othersShown = firstRemoteVideo(room, FIRST_VIDEO_WAIT_MS);
  try {
    await room.join();
  } catch (err) {
    endCall(err.code, err.message);
    return;
  }
  renderPeople();
  updateControls();
  setInterval(pollQuality, 2000);
  // The others first: opening the camera and publishing (encoder start, a second
  // negotiation) compete with receiving them for the browser's time.
  const othersVideo = [...room.tracks.values()].some(
    (t) => t.participant !== room.self?.id && t.kind === "video" && !t.muted,
  );
  if (othersVideo) await othersShown;
  await waitForMedia(openMedia());
  if (app.ending) return;
  if (app.mediaProblem) notice(mediaProblemText(app.mediaProblem), 12000);
  const items = [];
  if (app.local.camera) items.push({ track: app.local.camera, source: "camera" });
  if (app.local.microphone) items.push({ track: app.local.microphone, source: "microphone" });
  if (!app.local.microphone) room.update({ audio_muted: true }).catch(() => {});
  if (!app.local.camera) room.update({ video_muted: true }).catch(() => {});
  if (items.length) room.publish(items).catch(() => {}); // reported by "media_error"
}

/** Resolves when a remote video shows its first frame, or after `ms`. */
function firstRemoteVideo(room, ms) {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    const off = room.on("track_added", ({ info }) => {
      if (info.kind !== "video") return;
      const tile = app.tiles.get(info.source === "screen" ? screenKey(info) : info.participant);
      tile?.video.addEventListener("loadeddata", done, { once: true });
    });
    function done() {
      clearTimeout(timer);
      off();
      resolve();
    }
  });
}

/** The camera and microphone buttons wait while the devices are being opened. */
async function waitForMedia(media) {
  const buttons = [$("toggle-mic"), $("toggle-camera")];
  for (const b of buttons) b.disabled = true;
  try {
    await media;
  } finally {
    for (const b of buttons) b.disabled = false;
  }
  if (app.ending) {
    // The call ended while the camera was opening: release it.
    for (const track of Object.values(app.local)) track?.stop();
  } else {
    updateControls();
  }
}

function mediaFailed(err) {
  if (err?.code === "disconnected" || err?.code === "rate_limited") return; // retried
  if (err?.code === "sfu_unavailable") {
    if (app.toldNoMedia) return;
    app.toldNoMedia = true;
    notice("Audio and video are not available on this server right now; chat still works.", 12000);
  } else {
    notice(`Audio and video could not start (${err?.message ?? err}).`, 12000);
  }
}

function endCall(code, message) {
  if (app.ending && code !== "left") return;
  app.ending = true;
  for (const track of Object.values(app.local)) track?.stop();
  app.room?._closeMedia();
  if (code !== "kicked" && code !== "left") app.client?.close();
  show("ended");
  const [title, text] =
    code === "left" ? ["You left the call", ""] : (ERRORS[code] ?? ["Something went wrong", message]);
  $("ended-title").textContent = title;
  $("ended-message").textContent = text;
  $("ended-rejoin").href = location.pathname + location.search.replace(/([?&])autojoin=1&?/, "$1");
  document.title = `${title} - Rallypoint`;
}

function onConnectionState({ state, delayMs, unreachable }) {
  const el = $("connection-status");
  el.classList.toggle("warning", state !== "open");
  if (state === "open") {
    if (el.dataset.wasDown) {
      delete el.dataset.wasDown;
      setStatus("Reconnected");
      setTimeout(() => {
        if (app.client?.state === "open") setStatus("");
      }, 3000);
    } else {
      setStatus("");
    }
    return;
  }
  if (state === "closed") return;
  el.dataset.wasDown = "1";
  if (state === "connecting" && unreachable && delayMs !== undefined) {
    setStatus(`Cannot reach the server. Trying again in ${Math.max(1, Math.round(delayMs / 1000))} s…`);
  } else if (state === "reconnecting") {
    setStatus("Connection lost. Reconnecting…");
  } else {
    setStatus("Connecting…");
  }
}

function setStatus(text) {
  $("connection-status").textContent = text;
}

function notice(text, ms = 5000) {
  const p = document.createElement("p");
  p.textContent = text;
  $("notices").append(p);
  setTimeout(() => p.remove(), ms);
}

function bindRoom(room) {
  room.on("joined", () => {
    renderPeople();
    renderRecording();
    for (const p of room.participants.values()) ensureTile(p.id);
    syncLocalTile();
  });
  room.on("participant_joined", (p) => {
    ensureTile(p.id);
    renderPeople();
    notice(`${p.name} joined`);
  });
  room.on("participant_left", (p) => {
    removeTilesOf(p.id);
    renderPeople();
    notice(p.reason === "kicked" ? `${p.name} was removed` : `${p.name} left`);
  });
  room.on("participant_updated", (p) => {
    if (p.id === room.self?.id) syncLocalTile();
    else updateTile(p.id);
    renderPeople();
  });
  room.on("room_updated", (m) => {
    notice(m.locked ? "The room is now locked" : "The room is now unlocked");
    renderPeople();
  });
  room.on("recording", (m) => {
    if (m.active) notice(`${recorderName(m.by)} started recording this call`);
    else notice(RECORDING_ENDED[m.reason] ?? "Recording stopped");
    renderRecording();
  });
  room.on("track_added", ({ info, track }) => attachTrack(info, track));
  room.on("track_removed", ({ info }) => detachTrack(info));
  room.on("track_updated", (info) => updateTile(info.participant));
  room.on("active_speaker", ({ speakers }) => {
    app.speakers = speakers;
    app.speakerOrder = [...speakers, ...app.speakerOrder.filter((id) => !speakers.includes(id))];
    for (const [key, tile] of app.tiles) {
      tile.el.classList.toggle("speaking", speakers.includes(tile.participant) && !key.endsWith(":screen"));
    }
    limitVideos();
  });
  room.on("kicked", () => endCall("kicked"));
  app.client.on("mute_requested", (m) => {
    if (m.room !== room.name) return;
    const by = room.participant(m.by)?.name ?? "A moderator";
    if (m.kind === "audio" && app.local.microphone?.enabled) {
      notice(`${by} muted your microphone`);
      withButton("toggle-mic", toggleMic);
    } else if (m.kind === "video" && app.local.camera) {
      notice(`${by} turned your camera off`);
      withButton("toggle-camera", toggleCamera);
    }
  });
  room.on("message", (m) => renderMessage(m, true));
  room.on("chat_reset", ({ messages }) => {
    $("messages").replaceChildren();
    app.chatItems.clear();
    for (const m of messages) renderMessage(m, false);
    scrollChat();
  });
  room.on("typing", (t) => {
    if (t.identity === app.client.identity) return;
    if (t.active) app.typingNames.set(t.identity, t.name);
    else app.typingNames.delete(t.identity);
    renderTyping();
  });
  room.on("media_error", ({ error, retrying }) => {
    if (!retrying || error?.code === "sfu_unavailable") mediaFailed(error);
  });
}

// -- tiles ------------------------------------------------------------------------------------

const ICON_MIC_OFF =
  '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M12 14a3 3 0 0 0 3-3V5a3 3 0 0 0-6 0v6a3 3 0 0 0 3 3zm5-3a5 5 0 0 1-10 0H5a7 7 0 0 0 6 6.9V21h2v-3.1A7 7 0 0 0 19 11zM3 3l18 18" stroke="currentColor" stroke-width="2" fill="currentColor"/></svg>';

function makeTile(key, label, participant, { local = false, screen = false } = {}) {
  const el = document.createElement("figure");
  el.className = "tile";
  if (local) el.classList.add("local");
  if (screen) el.classList.add("screen-share");
  el.setAttribute("aria-label", label);
  el.dataset.participant = participant;
  const video = document.createElement("video");
  video.autoplay = true;
  video.muted = true; // sound plays through the <audio> elements
  video.playsInline = true;
  const avatar = document.createElement("div");
  avatar.className = "avatar";
  avatar.setAttribute("aria-hidden", "true");
  const caption = document.createElement("figcaption");
  const name = document.createElement("span");
  name.className = "name";
  const mic = document.createElement("span");
  mic.className = "mic-off";
  mic.setAttribute("role", "img");
  mic.setAttribute("aria-label", "Microphone muted");
  mic.innerHTML = ICON_MIC_OFF;
  mic.hidden = true;
  const quality = document.createElement("span");
  quality.className = "quality";
  quality.setAttribute("role", "img");
  quality.setAttribute("aria-label", "Connection quality unknown");
  quality.dataset.level = "unknown";
  quality.innerHTML = "<i></i><i></i><i></i>";
  caption.append(name, mic);
  if (!screen) caption.append(quality);
  el.append(video, avatar, caption);
  const tile = { key, el, video, avatar, name, mic, quality, participant, audios: new Map() };
  tile.visible = true; // in the viewport (IntersectionObserver)
  tile.nameOnly = false; // beyond maxVideos: the name only, no video received
  app.tiles.set(key, tile);
  if (!local) {
    resizeObserver.observe(video);
    intersectionObserver.observe(el);
    el.rallypointTile = tile;
  }
  setTileName(tile, label);
  const grid = $("tiles");
  if (local) grid.prepend(el);
  else grid.append(el);
  layoutTiles();
  return tile;
}

function setTileName(tile, label) {
  tile.el.setAttribute("aria-label", label);
  tile.name.textContent = label;
  tile.avatar.textContent = (label.trim()[0] ?? "?").toUpperCase();
}

function layoutTiles() {
  const n = app.tiles.size;
  $("tiles").dataset.count = String(Math.min(n, 9));
  limitVideos();
}

// -- only what is on screen: at most maxVideos video tiles, and their sizes to the server -----

const resizeObserver = new ResizeObserver(() => scheduleRenderReport());
const intersectionObserver = new IntersectionObserver((entries) => {
  for (const e of entries) {
    if (e.target.rallypointTile) e.target.rallypointTile.visible = e.isIntersecting;
  }
  scheduleRenderReport();
});

function receivedVideo(tile) {
  return tile.key === "local" ? null : (tile.trackId ?? tile.videoTrackId ?? null);
}

/** Show video in the first maxVideos tiles (screen shares, then recent speakers). */
function limitVideos() {
  const tiles = [...app.tiles.values()].filter(receivedVideo);
  const order = app.speakerOrder;
  const rank = (t) => {
    const i = order.indexOf(t.participant);
    return (t.key.endsWith(":screen") ? 0 : order.length + 1) + (i < 0 ? order.length : i);
  };
  const ranked = tiles.map((t, i) => ({ t, i, r: rank(t) })).sort((a, b) => a.r - b.r || a.i - b.i);
  const shown = new Set(ranked.slice(0, app.maxVideos).map((x) => x.t));
  for (const tile of app.tiles.values()) {
    const nameOnly = Boolean(receivedVideo(tile)) && !shown.has(tile);
    if (tile.nameOnly !== nameOnly) {
      tile.nameOnly = nameOnly;
      tile.el.classList.toggle("name-only", nameOnly);
    }
  }
  scheduleRenderReport();
}

function scheduleRenderReport(delayMs = RENDER_REPORT_MS) {
  if (app.renderTimer !== null) return;
  app.renderTimer = setTimeout(reportRenderSizes, delayMs);
}

/** Each received video's box in device pixels, 0 x 0 when it is not seen (`track_render`). */
function reportRenderSizes() {
  app.renderTimer = null;
  const room = app.room;
  if (!room) return;
  const dpr = window.devicePixelRatio || 1;
  const pageHidden = document.visibilityState === "hidden";
  const sizes = new Map();
  for (const tile of app.tiles.values()) {
    const id = receivedVideo(tile);
    if (!id) continue;
    const seen = !pageHidden && tile.visible && !tile.nameOnly && !tile.el.classList.contains("no-video");
    sizes.set(
      id,
      seen ? { width: tile.video.clientWidth * dpr, height: tile.video.clientHeight * dpr } : { width: 0, height: 0 },
    );
  }
  room.setRenderSizes(sizes).catch(() => scheduleRenderReport(2000)); // not applied: again later
}

document.addEventListener("visibilitychange", () => scheduleRenderReport());

function addLocalTile() {
  const tile = makeTile("local", `${app.client.name ?? "You"} (you)`, "self", { local: true });
  tile.video.srcObject = app.local.camera ? new MediaStream([app.local.camera]) : null;
  syncLocalTile();
}

function syncLocalTile() {
  const tile = app.tiles.get("local");
  if (!tile) return;
  const self = app.room?.self;
  if (self) {
    tile.participant = self.id;
    tile.el.dataset.participant = self.id;
    setTileName(tile, `${self.name} (you)`);
  }
  const cam = app.local.camera;
  tile.el.classList.toggle("no-video", !cam);
  if (cam && tile.video.srcObject?.getVideoTracks()[0] !== cam) {
    tile.video.srcObject = new MediaStream([cam]);
  }
  tile.mic.hidden = Boolean(app.local.microphone && app.local.microphone.enabled);
}

function ensureTile(pid) {
  if (app.tiles.has(pid)) {
    updateTile(pid);
    return app.tiles.get(pid);
  }
  const p = app.room.participant(pid);
  if (!p) return null;
  const tile = makeTile(pid, p.name, pid);
  updateTile(pid);
  return tile;
}

function tracksOf(pid) {
  return [...app.room.tracks.values()].filter((t) => t.participant === pid);
}

function updateTile(pid) {
  const tile = app.tiles.get(pid);
  const p = app.room?.participant(pid);
  if (!tile || !p) return;
  setTileName(tile, p.name);
  const mine = tracksOf(pid);
  const mic = mine.find((t) => t.source === "microphone");
  const cam = mine.find((t) => t.source === "camera");
  tile.mic.hidden = !(p.audio_muted || !mic || mic.muted);
  const showVideo = cam && !cam.muted && !p.video_muted && tile.video.srcObject;
  tile.el.classList.toggle("no-video", !showVideo);
  scheduleRenderReport();
  for (const t of mine.filter((x) => x.source === "screen")) updateScreenTile(t);
}

function screenKey(info) {
  return `${info.id}:screen`;
}

function updateScreenTile(info) {
  const tile = app.tiles.get(screenKey(info));
  const p = app.room.participant(info.participant);
  if (tile && p) setTileName(tile, `${p.name} (screen)`);
}

function attachTrack(info, track) {
  const p = app.room.participant(info.participant);
  if (!p) return;
  if (info.kind === "audio") {
    const tile = ensureTile(info.participant);
    const audio = document.createElement("audio");
    audio.autoplay = true;
    audio.srcObject = new MediaStream([track]);
    tile.el.append(audio);
    tile.audios.set(info.id, audio);
    playAudio(audio);
    updateTile(info.participant);
    return;
  }
  if (info.source === "screen") {
    const tile = makeTile(screenKey(info), `${p.name} (screen)`, info.participant, { screen: true });
    tile.video.srcObject = new MediaStream([track]);
    tile.trackId = info.id;
    limitVideos();
    return;
  }
  const tile = ensureTile(info.participant);
  tile.video.srcObject = new MediaStream([track]);
  tile.videoTrackId = info.id;
  updateTile(info.participant);
  limitVideos();
}

function playAudio(audio) {
  audio.play().catch((err) => {
    if (err.name !== "NotAllowedError") return;
    // Autoplay policy: sound needs one click on this page.
    const button = $("sound-on");
    button.hidden = false;
    button.onclick = () => {
      button.hidden = true;
      for (const tile of app.tiles.values()) for (const a of tile.audios.values()) a.play().catch(() => {});
    };
  });
}

function detachTrack(info) {
  if (info.source === "screen") {
    const tile = app.tiles.get(screenKey(info));
    if (tile) removeTile(tile.key);
    return;
  }
  const tile = app.tiles.get(info.participant);
  if (!tile) return;
  if (info.kind === "audio") {
    tile.audios.get(info.id)?.remove();
    tile.audios.delete(info.id);
  } else if (tile.videoTrackId === info.id) {
    tile.video.srcObject = null;
    tile.videoTrackId = null;
  }
  updateTile(info.participant);
  limitVideos();
}

function removeTile(key) {
  const tile = app.tiles.get(key);
  if (!tile) return;
  tile.video.srcObject = null;
  for (const a of tile.audios.values()) a.srcObject = null;
  resizeObserver.unobserve(tile.video);
  intersectionObserver.unobserve(tile.el);
  tile.el.remove();
  app.tiles.delete(key);
  layoutTiles();
}

function removeTilesOf(pid) {
  for (const [key, tile] of [...app.tiles]) {
    if (tile.participant === pid && key !== "local") removeTile(key);
  }
}

// -- connection quality -----------------------------------------------------------------------

const lastStats = new Map(); // stats id -> {packetsReceived, packetsLost}

function level(loss, rtt) {
  if (loss < 0.02 && rtt < 0.3) return "good";
  if (loss < 0.08 && rtt < 0.8) return "fair";
  return "poor";
}

function setQuality(tile, value) {
  if (!tile || tile.quality.dataset.level === value) return;
  tile.quality.dataset.level = value;
  tile.quality.setAttribute("aria-label", `Connection ${value}`);
}

async function pollQuality() {
  const room = app.room;
  if (!room || app.ending) return;
  const perParticipant = new Map(); // pid -> {received, lost, silent}
  if (room.subscriber) {
    // Chromium and Safari report each inbound stream's `mid`; Firefox its `trackIdentifier`.
    const byMid = new Map([...room.remote.values()].map((r) => [r.transceiver.mid, r.info]));
    const byTrack = new Map([...room.remote.values()].map((r) => [r.track.id, r.info]));
    const stats = await room.subscriber.getStats();
    let rtt = 0;
    for (const r of stats.values()) {
      if (r.type === "candidate-pair" && r.nominated && r.currentRoundTripTime) rtt = r.currentRoundTripTime;
    }
    for (const r of stats.values()) {
      if (r.type !== "inbound-rtp") continue;
      const info = byMid.get(r.mid) ?? byTrack.get(r.trackIdentifier);
      if (!info) continue;
      const prev = lastStats.get(r.id) ?? { packetsReceived: 0, packetsLost: 0 };
      lastStats.set(r.id, { packetsReceived: r.packetsReceived ?? 0, packetsLost: r.packetsLost ?? 0 });
      const received = (r.packetsReceived ?? 0) - prev.packetsReceived;
      const lost = Math.max(0, (r.packetsLost ?? 0) - prev.packetsLost);
      const acc = perParticipant.get(info.participant) ?? { received: 0, lost: 0, rtt };
      acc.received += received;
      acc.lost += lost;
      perParticipant.set(info.participant, acc);
    }
  }
  for (const [pid, acc] of perParticipant) {
    const total = acc.received + acc.lost;
    setQuality(app.tiles.get(pid), total === 0 ? "poor" : level(acc.lost / total, acc.rtt));
  }
  if (room.publisher) {
    const stats = await room.publisher.getStats();
    let loss = 0;
    let rtt = 0;
    let seen = false;
    for (const r of stats.values()) {
      if (r.type === "remote-inbound-rtp") {
        seen = true;
        loss = Math.max(loss, r.fractionLost ?? 0);
        rtt = Math.max(rtt, r.roundTripTime ?? 0);
      }
      if (r.type === "candidate-pair" && r.nominated && r.currentRoundTripTime) {
        seen = true;
        rtt = Math.max(rtt, r.currentRoundTripTime);
      }
    }
    if (seen) setQuality(app.tiles.get("local"), level(loss, rtt));
  }
}

// -- people -----------------------------------------------------------------------------------

function renderPeople() {
  const room = app.room;
  if (!room?.self) return;
  const list = $("people");
  list.replaceChildren();
  const everyone = [room.self, ...[...room.participants.values()].sort((a, b) => a.joined_at - b.joined_at)];
  $("people-title").textContent = `People (${everyone.length})`;
  for (const p of everyone) {
    const li = document.createElement("li");
    const name = document.createElement("span");
    name.className = "person";
    name.textContent = p.id === room.self.id ? `${p.name} (you)` : p.name;
    li.append(name);
    const states = [];
    if (p.moderator) states.push("moderator");
    if (p.audio_muted) states.push("microphone muted");
    if (p.video_muted) states.push("camera off");
    if (states.length) {
      const s = document.createElement("span");
      s.className = "person-state";
      s.textContent = states.join(", ");
      li.append(s);
    }
    if (room.self.moderator && p.id !== room.self.id) {
      const kick = document.createElement("button");
      kick.type = "button";
      kick.className = "small";
      kick.textContent = `Remove ${p.name}`;
      kick.onclick = () => room.kick(p.id).catch((err) => notice(`Could not remove ${p.name}: ${err.message}`));
      li.append(kick);
    }
    list.append(li);
  }
  const lock = $("lock-room");
  lock.hidden = !room.self.moderator;
  lock.textContent = room.locked ? "Unlock room" : "Lock room";
  lock.onclick = () => room.lock(!room.locked).catch((err) => notice(`Could not change the lock: ${err.message}`));
}

// -- recording --------------------------------------------------------------------------------

const RECORDING_ENDED = {
  stopped: "Recording stopped",
  room_closed: "Recording stopped",
  disk_full: "Recording stopped: the server's disk is full",
  size_limit: "Recording stopped: it reached its size limit",
  error: "Recording stopped after a server error",
};

function recorderName(by) {
  return by?.api ? "The organiser" : by?.name || by?.identity || "A moderator";
}

/** The indicator everyone sees while the room is recorded, and the moderators' button. */
function renderRecording() {
  const room = app.room;
  if (!room) return;
  const r = room.recording;
  const indicator = $("recording-indicator");
  indicator.hidden = !r;
  if (r) {
    const what = r.audio_only ? "Recording audio" : "Recording";
    indicator.textContent = `${what} (started by ${recorderName(r.by)})`;
  }
  const button = $("toggle-recording");
  button.hidden = !room.self?.moderator;
  button.textContent = r ? "Stop recording" : "Record";
  button.onclick = () => {
    const act = room.recording ? room.stopRecording() : room.startRecording();
    act.catch((err) => notice(`Could not change the recording: ${err.message}`));
  };
}

// -- controls ---------------------------------------------------------------------------------

function updateControls() {
  const mic = app.local.microphone;
  $("toggle-mic").textContent = mic && mic.enabled ? "Mute microphone" : "Unmute microphone";
  $("toggle-camera").textContent = app.local.camera ? "Stop camera" : "Start camera";
  const screen = $("toggle-screen");
  screen.hidden = !navigator.mediaDevices?.getDisplayMedia;
  screen.textContent = app.local.screen ? "Stop sharing" : "Share screen";
  syncLocalTile();
}

async function withButton(id, fn) {
  const button = $(id);
  button.disabled = true;
  try {
    await fn();
  } catch (err) {
    if (err?.name === "NotAllowedError" && id === "toggle-screen") {
      // The person cancelled the screen picker.
    } else if (err?.name) {
      notice(mediaProblemText(problemOf(err)) || err.message, 8000);
    } else {
      notice(err?.message ?? String(err), 8000);
    }
  } finally {
    button.disabled = false;
    updateControls();
  }
}

async function toggleMic() {
  const room = app.room;
  let mic = app.local.microphone;
  if (!mic) {
    mic = app.local.microphone = await getTrack("microphone", app.devices.microphone);
    await room.replaceTrack("microphone", mic);
    await room.update({ audio_muted: false });
    return;
  }
  const mute = mic.enabled;
  updateControls();
  await room.setMuted("microphone", mute);
  updateControls();
  await room.update({ audio_muted: mute });
}

async function toggleCamera() {
  const room = app.room;
  if (app.local.camera) {
    const cam = app.local.camera;
    app.local.camera = null;
    updateControls();
    await room.setMuted("camera", true);
    await room.replaceTrack("camera", null);
    cam.stop();
    await room.update({ video_muted: true });
  } else {
    const cam = await getTrack("camera", app.devices.camera);
    app.local.camera = cam;
    updateControls();
    await room.replaceTrack("camera", cam);
    await room.setMuted("camera", false);
    await room.update({ video_muted: false });
  }
}

async function toggleScreen() {
  const room = app.room;
  if (app.local.screen) {
    await stopScreen();
    return;
  }
  const stream = await navigator.mediaDevices.getDisplayMedia({ video: { frameRate: { ideal: 15 } }, audio: false });
  const track = stream.getVideoTracks()[0];
  app.local.screen = track;
  track.addEventListener("ended", () => withButton("toggle-screen", stopScreen));
  const tile = makeTile("local:screen", "Your screen", "self", { screen: true, local: true });
  tile.video.srcObject = new MediaStream([track]);
  updateControls();
  await room.publish([{ track, source: "screen" }]);
}

async function stopScreen() {
  const track = app.local.screen;
  if (!track) return;
  app.local.screen = null;
  removeTile("local:screen");
  updateControls();
  track.stop();
  await app.room.unpublish("screen");
}

async function leave() {
  app.ending = true;
  const room = app.room;
  endCall("left");
  try {
    await room?.leave();
  } finally {
    await app.client?.close();
  }
}

$("toggle-mic").addEventListener("click", () => withButton("toggle-mic", toggleMic));
$("toggle-camera").addEventListener("click", () => withButton("toggle-camera", toggleCamera));
$("toggle-screen").addEventListener("click", () => withButton("toggle-screen", toggleScreen));
$("leave").addEventListener("click", leave);
$("toggle-chat").addEventListener("click", () => setChatOpen(!app.chatOpen));

// -- chat -------------------------------------------------------------------------------------

function setChatOpen(open) {
  app.chatOpen = open;
  $("side").classList.toggle("open", open);
  $("call").classList.toggle("side-open", open);
  $("toggle-chat").setAttribute("aria-expanded", String(open));
  if (open) markRead();
  renderChatButton();
}

function chatVisible() {
  return app.chatOpen && document.visibilityState === "visible";
}

function markRead() {
  app.unread = 0;
  renderChatButton();
  app.room?.markRead();
}

function renderChatButton() {
  const button = $("toggle-chat");
  if (app.chatOpen) button.textContent = "Close chat";
  else button.textContent = app.unread ? `Open chat (${app.unread} unread)` : "Open chat";
}

document.addEventListener("visibilitychange", () => {
  if (chatVisible()) markRead();
});

function formatTime(ts) {
  return new Date(ts).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function renderMessage(m, live) {
  const list = $("messages");
  let li = app.chatItems.get(m.cid);
  const isNew = !li;
  if (!li) {
    li = document.createElement("li");
    li.innerHTML = '<span class="author"></span> <time></time><p class="text"></p><span class="state"></span>';
    app.chatItems.set(m.cid, li);
  }
  const mine = m.mine || m.from === app.client.identity;
  li.classList.toggle("mine", mine);
  li.dataset.seq = m.seq ?? "";
  li.querySelector(".author").textContent = mine ? "You" : m.name;
  const time = li.querySelector("time");
  time.dateTime = new Date(m.ts).toISOString();
  time.textContent = formatTime(m.ts);
  li.querySelector(".text").textContent = m.deleted ? "Message deleted" : (m.text ?? "");
  li.classList.toggle("deleted", Boolean(m.deleted));
  li.querySelector(".state").textContent = m.failed
    ? "Not sent"
    : m.pending
      ? "Sending…"
      : m.edited
        ? "(edited)"
        : "";
  // Stored messages in seq order; messages being sent stay at the end.
  if (m.seq !== null && m.seq !== undefined) {
    let before = null;
    for (const other of list.children) {
      const seq = other.dataset.seq === "" ? Infinity : Number(other.dataset.seq);
      if (other !== li && seq > m.seq) {
        before = other;
        break;
      }
    }
    if (before) list.insertBefore(li, before);
    else if (isNew || li.nextElementSibling) list.append(li);
  } else if (isNew) {
    list.append(li);
  }
  if (live && isNew && !mine) {
    if (chatVisible()) app.room.markRead();
    else {
      app.unread += 1;
      renderChatButton();
    }
  }
  if (live) scrollChat();
}

function scrollChat() {
  const list = $("messages");
  list.scrollTop = list.scrollHeight;
}

function renderTyping() {
  const names = [...app.typingNames.values()];
  const el = $("typing");
  if (names.length === 0) el.textContent = "";
  else if (names.length === 1) el.textContent = `${names[0]} is typing…`;
  else if (names.length === 2) el.textContent = `${names[0]} and ${names[1]} are typing…`;
  else el.textContent = `${names.length} people are typing…`;
}

let typingSentAt = 0;
let typingStop = null;
$("chat-input").addEventListener("input", () => {
  if (!app.room) return;
  const now = Date.now();
  if (now - typingSentAt > 3000) {
    typingSentAt = now;
    app.room.typing(true);
  }
  clearTimeout(typingStop);
  typingStop = setTimeout(() => {
    typingSentAt = 0;
    app.room?.typing(false);
  }, 4000);
});

$("chat-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const input = $("chat-input");
  const text = input.value.trim();
  if (!text || !app.room) return;
  input.value = "";
  clearTimeout(typingStop);
  if (typingSentAt) app.room.typing(false);
  typingSentAt = 0;
  app.room.sendMessage(text).catch(() => {
    // Shown as "Not sent" on the message itself.
  });
});

start();
