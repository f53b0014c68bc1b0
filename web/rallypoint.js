// Rallypoint client library: the WebSocket protocol (docs/PROTOCOL.md) and the SFU media
// connections, for browsers. No DOM and no user interface: web/app.js is one user of it,
// and any web app can import it (`import {RallypointClient} from "/static/rallypoint.js"`).
// Guide: docs/WEB.md.

export const PROTOCOL_VERSION = 1;

/** A refused request or a failed connection; `code` is the protocol's error code. */
export class RallypointError extends Error {
  constructor(code, message, details = {}) {
    super(message || code);
    this.name = "RallypointError";
    this.code = code;
    Object.assign(this, details);
  }
}

/** A minimal event emitter (no DOM EventTarget, so it also runs in workers and Node). */
export class Emitter {
  #handlers = new Map();

  /** Call `fn(detail)` on every `type` event; returns a function that removes it. */
  on(type, fn) {
    if (!this.#handlers.has(type)) this.#handlers.set(type, new Set());
    this.#handlers.get(type).add(fn);
    return () => this.off(type, fn);
  }

  off(type, fn) {
    this.#handlers.get(type)?.delete(fn);
  }

  /** Resolves with the next `type` event (rejects after `timeoutMs`, if given). */
  once(type, timeoutMs = 0) {
    return new Promise((resolve, reject) => {
      let timer = null;
      const off = this.on(type, (detail) => {
        off();
        if (timer) clearTimeout(timer);
        resolve(detail);
      });
      if (timeoutMs > 0) {
        timer = setTimeout(() => {
          off();
          reject(new RallypointError("timeout", `no ${type} within ${timeoutMs} ms`));
        }, timeoutMs);
      }
    });
  }

  emit(type, detail) {
    for (const fn of [...(this.#handlers.get(type) ?? [])]) {
      try {
        fn(detail);
      } catch (err) {
        // A failing listener must not break the protocol state machine.
        setTimeout(() => {
          throw err;
        });
      }
    }
  }
}

// Close codes (docs/PROTOCOL.md, "Close codes").
const CLOSE_NORMAL = 1000;
const CLOSE_TOO_BIG = 1009;
const CLOSE_AUTH_FAILED = 4001;
const CLOSE_REPLACED = 4004;
// Our own code for "we noticed a dead link and gave up on this socket".
const CLOSE_DEAD_LINK = 4000;
// The protocol's default frame limit (docs/PROTOCOL.md, "Limits"), until `welcome` says.
const MAX_FRAME_BYTES = 65536;

const HELLO_ERRORS = new Set([
  "unsupported_version",
  "token_required",
  "token_invalid",
  "token_expired",
]);

function randomId(prefix = "") {
  const bytes = new Uint8Array(9);
  crypto.getRandomValues(bytes);
  return prefix + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** How long a chat send is retried while the server's store refuses writes. */
const STORE_RETRY_MS = 30000;

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** The WebSocket URL of the server that served this page (`ws(s)://host/ws`). */
export function defaultUrl() {
  const loc = globalThis.location;
  if (!loc) throw new RallypointError("bad_url", "give the server's WebSocket URL");
  return `${loc.protocol === "https:" ? "wss:" : "ws:"}//${loc.host}/ws`;
}

/**
 * One signaling connection: hello/welcome, heartbeat, requests by `id`/`re`, events, and
 * automatic reconnection with full-jitter backoff and session resume.
 *
 * States (`state` event): "idle", "connecting", "open", "reconnecting", "closed".
 * Events: every server event by its `type` (e.g. "participant_joined"), plus "welcome"
 * (after each accepted hello, `{resumed, ...}`), "state" (`{state, reason, attempt, delayMs}`)
 * and "closed" (`{code, error}`: the client stopped for good).
 */
export class RallypointClient extends Emitter {
  constructor(options = {}) {
    super();
    this.url = options.url ?? defaultUrl();
    this.token = options.token ?? null;
    this.identity = options.identity ?? null;
    this.name = options.name ?? null;
    this.device = options.device ?? null;
    this.backoffBaseMs = options.backoffBaseMs ?? 500;
    this.backoffMaxMs = options.backoffMaxMs ?? 20000;
    this.requestTimeoutMs = options.requestTimeoutMs ?? 15000;
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.state = "idle";
    this.welcome = null;
    this.session = null;
    this.attempt = 0;
    this.#watchNetwork();
  }

  #ws = null;
  #nextId = 1;
  #pending = new Map(); // id -> {resolve, reject, timer}
  #heartbeat = null;
  #lastHeard = 0;
  #resume = null;
  #stopped = false;
  #firstWelcome = null; // {resolve, reject} of connect()
  #retryTimer = null;
  #retryWake = null;

  /** Connect (retrying until the server answers); resolves with the first `welcome`. */
  connect() {
    if (this.#firstWelcome) return this.#firstWelcome.promise;
    let resolve, reject;
    const promise = new Promise((res, rej) => {
      resolve = res;
      reject = rej;
    });
    this.#firstWelcome = { promise, resolve, reject };
    this.#stopped = false;
    this.#open();
    return promise;
  }

  /**
   * Send `msg` with an `id` and resolve with its reply; rejects with a RallypointError. A
   * message larger than the server's frame limit (`welcome.limits.max_frame_bytes`) is not
   * sent: it rejects at once with `frame_too_large` (the server would not read it).
   */
  request(msg, { timeoutMs = this.requestTimeoutMs } = {}) {
    if (this.state !== "open") {
      return Promise.reject(new RallypointError("disconnected", "not connected"));
    }
    const id = `r${this.#nextId++}`;
    let text;
    try {
      text = this.#encode({ ...msg, id });
    } catch (err) {
      return Promise.reject(err);
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        reject(new RallypointError("timeout", `no answer to ${msg.type} within ${timeoutMs} ms`));
      }, timeoutMs);
      this.#pending.set(id, { resolve, reject, timer });
      this.#writeText(text);
    });
  }

  /**
   * Send without waiting for an answer (errors still arrive as `error` events). Throws a
   * RallypointError `frame_too_large`, and sends nothing, if `msg` is over the frame limit.
   */
  send(msg) {
    if (this.state === "open") this.#writeText(this.#encode(msg));
  }

  /** The largest frame the server reads, in bytes (`welcome.limits.max_frame_bytes`). */
  get maxFrameBytes() {
    return this.welcome?.limits?.max_frame_bytes ?? MAX_FRAME_BYTES;
  }

  /** End the session (`bye`): the others see us leave at once; no reconnection. */
  async close() {
    if (this.#stopped) return;
    const wasOpen = this.state === "open";
    this.#stopped = true;
    if (wasOpen) {
      try {
        await this.request({ type: "bye" }, { timeoutMs: 2000 });
      } catch {
        // The server ends the session after the grace period anyway.
      }
    }
    this.#finish(CLOSE_NORMAL, null);
  }

  /** Drop the socket as if the network failed (tests, and "reconnect now" buttons). */
  reconnectNow(reason = "manual") {
    if (this.#retryWake) {
      this.#retryWake();
      return;
    }
    if (this.#ws) this.#lost(this.#ws, CLOSE_DEAD_LINK, reason);
  }

  // -- internals ---------------------------------------------------------------------------

  #setState(state, extra = {}) {
    this.state = state;
    this.emit("state", { state, ...extra });
  }

  #watchNetwork() {
    // Browsers say when the network goes away and comes back: a socket that went silent
    // would otherwise only be noticed after two heartbeats.
    if (typeof globalThis.addEventListener !== "function") return;
    globalThis.addEventListener("offline", () => {
      if (this.#ws && this.state === "open") this.#lost(this.#ws, CLOSE_DEAD_LINK, "offline");
    });
    globalThis.addEventListener("online", () => {
      if (this.#retryWake) this.#retryWake();
    });
  }

  #online() {
    return globalThis.navigator?.onLine !== false;
  }

  #open() {
    if (this.#stopped) return;
    this.#setState(this.welcome ? "reconnecting" : "connecting", { attempt: this.attempt });
    let ws;
    try {
      ws = new this.WebSocket(this.url);
    } catch (err) {
      this.#fail(new RallypointError("bad_url", String(err)));
      return;
    }
    this.#ws = ws;
    let welcomed = false;
    ws.onopen = () => {
      const hello = { type: "hello", v: PROTOCOL_VERSION, id: "hello" };
      if (this.token) hello.token = this.token;
      if (this.identity && !this.token) hello.identity = this.identity;
      if (this.name && !this.token) hello.name = this.name;
      if (this.device) hello.device = this.device;
      if (this.#resume) hello.resume = this.#resume;
      ws.send(JSON.stringify(hello));
    };
    ws.onmessage = (ev) => {
      if (ws !== this.#ws) return;
      this.#lastHeard = Date.now();
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (!welcomed) {
        if (msg.type === "welcome") {
          welcomed = true;
          this.#welcomed(msg);
        } else if (msg.type === "error") {
          // Any error before welcome answers the hello (docs/PROTOCOL.md).
          const err = new RallypointError(msg.code, msg.message);
          if (HELLO_ERRORS.has(msg.code)) this.#fail(err);
        }
        return;
      }
      this.#dispatch(msg);
    };
    ws.onclose = (ev) => this.#lost(ws, ev.code, ev.reason || "closed");
    ws.onerror = () => {}; // onclose follows and decides
  }

  #welcomed(msg) {
    const resumed = Boolean(msg.resumed);
    this.welcome = msg;
    this.session = msg.session;
    this.identity = msg.identity;
    this.#resume = msg.resume;
    this.attempt = 0;
    this.#lastHeard = Date.now();
    this.#startHeartbeat(msg.heartbeat_ms);
    this.#setState("open", { resumed });
    this.emit("welcome", msg);
    if (this.#firstWelcome) {
      this.#firstWelcome.resolve(msg);
      this.#firstWelcome.done = true;
    }
  }

  #dispatch(msg) {
    if (msg.re !== undefined) {
      const waiter = this.#pending.get(msg.re);
      if (waiter) {
        this.#pending.delete(msg.re);
        clearTimeout(waiter.timer);
        if (msg.type === "error") {
          const { code, message, ...rest } = msg;
          waiter.reject(new RallypointError(code, message, rest));
        } else {
          waiter.resolve(msg);
        }
      }
      return;
    }
    this.emit(msg.type, msg);
    this.emit("message", msg);
  }

  #encode(msg) {
    const text = JSON.stringify(msg);
    const limit = this.maxFrameBytes;
    // UTF-8 takes at most 3 bytes per UTF-16 unit: count the bytes of long texts only.
    if (text.length * 3 > limit) {
      const bytes = new TextEncoder().encode(text).length;
      if (bytes > limit) {
        throw new RallypointError(
          "frame_too_large",
          `the ${msg.type} frame would be ${bytes} bytes; the server reads frames of up to ` +
            `${limit} bytes (welcome.limits.max_frame_bytes): not sent`,
          { bytes, limit },
        );
      }
    }
    return text;
  }

  #write(msg) {
    this.#writeText(JSON.stringify(msg));
  }

  #writeText(text) {
    try {
      this.#ws.send(text);
    } catch {
      // The socket is closing; onclose handles it.
    }
  }

  #startHeartbeat(intervalMs) {
    clearInterval(this.#heartbeat);
    const every = Math.max(1000, intervalMs || 25000);
    this.#heartbeat = setInterval(() => {
      if (Date.now() - this.#lastHeard > 2 * every + 1000) {
        // Nothing (not even a pong) for two intervals: the link is dead (PROTOCOL.md).
        this.#lost(this.#ws, CLOSE_DEAD_LINK, "no answer from the server");
        return;
      }
      this.#write({ type: "ping", ts: Date.now() });
    }, every);
  }

  #lost(ws, code, reason) {
    if (ws !== this.#ws) return;
    this.#ws = null;
    clearInterval(this.#heartbeat);
    ws.onclose = ws.onmessage = ws.onopen = null;
    if (ws.readyState <= 1) {
      try {
        ws.close(CLOSE_DEAD_LINK, "reconnecting");
      } catch {
        // already closing
      }
    }
    for (const [id, waiter] of this.#pending) {
      clearTimeout(waiter.timer);
      waiter.reject(new RallypointError("disconnected", "the connection was lost"));
      this.#pending.delete(id);
    }
    if (this.#stopped) return;
    if (code === CLOSE_REPLACED) {
      this.#fail(new RallypointError("replaced", "this session was taken over elsewhere"), code);
      return;
    }
    if (code === CLOSE_TOO_BIG) {
      this.#fail(new RallypointError("frame_too_large", "a message was too large"), code);
      return;
    }
    if (code === CLOSE_AUTH_FAILED) return; // #fail already ran with the hello's error
    this.#retry(reason);
  }

  async #retry(reason) {
    // Full jitter (AWS architecture blog): uniform in [0, min(max, base * 2^attempt)].
    const cap = Math.min(this.backoffMaxMs, this.backoffBaseMs * 2 ** this.attempt);
    const delayMs = Math.round(Math.random() * cap);
    this.attempt += 1;
    this.#setState(this.welcome ? "reconnecting" : "connecting", {
      reason,
      attempt: this.attempt,
      delayMs,
      unreachable: !this.welcome || reason === "unreachable",
    });
    await new Promise((resolve) => {
      const wake = () => {
        clearTimeout(this.#retryTimer);
        this.#retryWake = null;
        resolve();
      };
      this.#retryWake = wake;
      const wait = () => {
        // While the browser says it is offline, connecting only fails: wait for "online"
        // (checked again every few seconds in case the event never comes).
        this.#retryTimer = setTimeout(() => (this.#online() ? wake() : wait()), delayMs || 1);
      };
      wait();
    });
    this.#open();
  }

  #fail(error, code = CLOSE_AUTH_FAILED) {
    this.#stopped = true;
    if (this.#firstWelcome && !this.#firstWelcome.done) this.#firstWelcome.reject(error);
    this.#finish(code, error);
  }

  #finish(code, error) {
    clearInterval(this.#heartbeat);
    clearTimeout(this.#retryTimer);
    this.#retryWake = null;
    const ws = this.#ws;
    this.#ws = null;
    if (ws) {
      ws.onclose = ws.onmessage = ws.onopen = null;
      try {
        ws.close(CLOSE_NORMAL, "bye");
      } catch {
        // already closed
      }
    }
    if (this.state !== "closed") {
      this.#setState("closed", { code, error });
      this.emit("closed", { code, error });
    }
  }
}

// -- rooms: participants, chat and media -------------------------------------------------------

const GATHER_WAIT_MS = 1500;
// track_render: the largest side the server takes, and the most tracks in one message.
const RENDER_MAX = 16384;
const RENDER_BATCH = 64;

function waitForGathering(pc, timeoutMs = GATHER_WAIT_MS) {
  // Non-trickle first: the server applies candidates inside the SDP at once. Candidates found
  // later (slow TURN servers) are trickled with `ice`.
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(done, timeoutMs);
    function done() {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", check);
      resolve();
    }
    function check() {
      if (pc.iceGatheringState === "complete") done();
    }
    pc.addEventListener("icegatheringstatechange", check);
  });
}

/** Fold chat events (text, edit, delete) into displayable messages, ordered by `seq`. */
export class ChatLog {
  constructor(conversation) {
    this.conversation = conversation;
    this.lastSeq = 0;
    this.bySeq = new Map(); // seq -> message (originals only)
    this.pending = new Map(); // cid -> message not yet acknowledged
    this.applied = new Set(); // seqs already applied (history, sync and live events overlap)
  }

  /** Apply a stored event; returns the message it created or changed (or null). */
  apply(ev) {
    if (this.applied.has(ev.seq)) return null;
    this.applied.add(ev.seq);
    this.lastSeq = Math.max(this.lastSeq, ev.seq);
    if (ev.kind === "edit" || ev.kind === "delete") {
      const original = this.bySeq.get(ev.ref);
      if (!original) return null;
      if (ev.kind === "edit" && (original.editSeq ?? 0) < ev.seq) {
        original.text = ev.text;
        original.edited = true;
        original.editSeq = ev.seq;
      }
      if (ev.kind === "delete") {
        original.deleted = true;
        original.text = undefined;
      }
      return original;
    }
    const message = {
      seq: ev.seq,
      cid: ev.cid,
      from: ev.from,
      name: ev.name,
      kind: ev.kind,
      text: ev.text,
      ts: ev.ts,
      deleted: ev.kind !== "system" && ev.kind !== "call" && ev.text === undefined,
      edited: false,
      pending: false,
      failed: false,
    };
    const mine = this.pending.get(ev.cid);
    if (mine && mine.from === ev.from) {
      this.pending.delete(ev.cid);
      Object.assign(mine, message);
      this.bySeq.set(ev.seq, mine);
      return mine;
    }
    this.bySeq.set(ev.seq, message);
    return message;
  }

  /** Messages in display order: stored ones by `seq`, then those still being sent. */
  messages() {
    const stored = [...this.bySeq.values()].sort((a, b) => a.seq - b.seq);
    return [...stored, ...this.pending.values()];
  }

  reset() {
    this.lastSeq = 0;
    this.bySeq.clear();
    this.applied.clear();
  }
}

/**
 * A room you are in: participants, the room's chat, and media through the SFU.
 *
 * Events: "joined" (the room state after each join or rejoin), "participant_joined",
 * "participant_left", "participant_updated", "room_updated" (lock), "recording" (the
 * `recording` event: started or ended; `room.recording` is the running one or null), "track_added"
 * (`{info, track}`: a remote MediaStreamTrack), "track_removed" (`{info}`), "track_updated",
 * "active_speaker" (`{speakers}`), "message" (a chat message, new or changed), "chat_reset",
 * "typing" (`{identity, name, active}`), "receipt", "kicked", "media_error" (`{error}`),
 * "left".
 */

/**
 * The simulcast encodings for a camera track, lowest layer first (the SFU takes the layers in
 * the order of `a=simulcast`), or null for one encoding. As libwebrtc's own table
 * (`simulcast.cc`): three layers from 960x540 up (1280x720 gives 1280x720, 640x360 and
 * 320x180), two from 480x270 (640x360 gives 640x360 and 320x180), one below. The screen share
 * is sent as one layer: text scaled down is unreadable, so a small layer would serve nobody,
 * and a second encoding would cost the sharer CPU that slides do not need.
 */
export function simulcastEncodings(track, source) {
  if (source !== "camera" || track.kind !== "video") return null;
  const settings = track.getSettings ? track.getSettings() : {};
  const size = Math.min(settings.width || 0, settings.height || 0);
  if (size >= 540) {
    return [
      { rid: "q", scaleResolutionDownBy: 4, maxBitrate: 150_000 },
      { rid: "h", scaleResolutionDownBy: 2, maxBitrate: 500_000 },
      { rid: "f", maxBitrate: 1_700_000 },
    ];
  }
  if (size >= 270) {
    return [
      { rid: "h", scaleResolutionDownBy: 2, maxBitrate: 200_000 },
      { rid: "f", maxBitrate: 700_000 },
    ];
  }
  return null;
}

export class Room extends Emitter {
  constructor(client, name, options = {}) {
    super();
    this.client = client;
    this.name = name;
    this.conversation = `room:${name}`;
    this.RTCPeerConnection = options.RTCPeerConnection ?? globalThis.RTCPeerConnection;
    // Publish the camera with simulcast (see simulcastEncodings); false: one encoding.
    this.simulcast = options.simulcast ?? true;
    this.self = null;
    this.participants = new Map(); // id -> participant (others only)
    this.tracks = new Map(); // track id -> Track info (everyone's, from the server)
    this.remote = new Map(); // track id -> {info, track, transceiver}
    this.locked = false;
    this.recording = null; // the `recording` event that started the running recording
    this.chat = new ChatLog(this.conversation);
    this.epoch = null;
    this.state = "idle"; // "joining", "joined", "left", "kicked"
    this.publisher = null; // RTCPeerConnection we offer on
    this.subscriber = null; // RTCPeerConnection the server offers on
    this.local = new Map(); // source -> {transceiver, track, muted}
    this._pubChain = Promise.resolve();
    this._subChain = Promise.resolve();
    this._subMids = new Map(); // mid -> Track info, per the latest subscribe_offer
    // Track ids unpublished (`track_unpublished`) until published again with the same id: an
    // offer made before a track left still names it, and must not bring it back.
    this._gone = new Set();
    this._rendered = new Map(); // track id -> {track, width, height} last sent in track_render
    this._unsubscribe = [];
    this._typingTimers = new Map();
    this._bind();
  }

  // -- membership --------------------------------------------------------------------------

  /** Join (or re-join after a lost session); resolves with `joined`. */
  async join() {
    this.state = "joining";
    const joined = await this.client.request({ type: "join", room: this.name });
    this._applyJoined(joined);
    this.state = "joined";
    this.emit("joined", joined);
    await this._catchUpChat();
    return joined;
  }

  /** Leave the room and close the media connections. */
  async leave() {
    if (this.state === "left") return;
    this.state = "left";
    this._closeMedia();
    try {
      await this.client.request({ type: "leave", room: this.name }, { timeoutMs: 3000 });
    } catch {
      // Not in the room any more, or disconnected: either way we are out.
    }
    this._dispose();
    this.emit("left", {});
  }

  /** Ask the server to change our participant state (`audio_muted`, `video_muted`, `name`). */
  update(fields) {
    return this.client.request({ type: "update", room: this.name, ...fields });
  }

  /** Moderators: lock or unlock the room. */
  lock(locked) {
    return this.client.request({ type: "lock", room: this.name, locked });
  }

  /** Moderators: start recording the room (`audioOnly`; `identities`: only these). */
  startRecording({ audioOnly = false, identities } = {}) {
    const msg = { type: "recording_start", room: this.name, audio_only: audioOnly };
    if (identities) msg.identities = identities;
    return this.client.request(msg);
  }

  /** Moderators: stop the room's recording. */
  stopRecording() {
    return this.client.request({ type: "recording_stop", room: this.name });
  }

  /** Moderators: remove a participant. */
  kick(participantId) {
    return this.client.request({ type: "kick", room: this.name, participant: participantId });
  }

  /** Participant by id (others or self). */
  participant(id) {
    if (this.self && id === this.self.id) return this.self;
    return this.participants.get(id) ?? null;
  }

  _applyJoined(joined) {
    this.self = joined.self;
    this.locked = joined.locked;
    this.recording = joined.recording ?? null;
    this.participants = new Map(joined.participants.map((p) => [p.id, p]));
    this._setTracks(joined.tracks);
  }

  /** The room's tracks as `join` reported them (they are published now). */
  _setTracks(tracks) {
    this.tracks = new Map((tracks ?? []).map((t) => [t.id, t]));
    for (const id of this.tracks.keys()) this._gone.delete(id);
  }

  _bind() {
    const c = this.client;
    const mine = (fn) => (msg) => {
      if (msg.room === this.name && this.state !== "left") fn(msg);
    };
    const on = (type, fn) => this._unsubscribe.push(c.on(type, fn));
    on(
      "participant_joined",
      mine((m) => {
        const p = m.participant;
        if (this.self && p.id === this.self.id) return;
        this.participants.set(p.id, p);
        this.emit("participant_joined", p);
      }),
    );
    on(
      "participant_left",
      mine((m) => {
        const p = this.participants.get(m.participant);
        if (!p) return;
        this.participants.delete(m.participant);
        this.emit("participant_left", { ...p, reason: m.reason });
      }),
    );
    on(
      "participant_updated",
      mine((m) => {
        const p = m.participant;
        if (this.self && p.id === this.self.id) this.self = p;
        else this.participants.set(p.id, p);
        this.emit("participant_updated", p);
      }),
    );
    on(
      "room_updated",
      mine((m) => {
        this.locked = m.locked;
        this.emit("room_updated", m);
      }),
    );
    on(
      "recording",
      mine((m) => {
        this.recording = m.active ? m : null;
        this.emit("recording", m);
      }),
    );
    on(
      "room_state",
      mine((m) => {
        // After a resume: the room as it is now replaces what we remembered.
        const before = new Map(this.participants);
        this.locked = m.locked;
        const wasRecording = this.recording;
        this.recording = m.recording ?? null;
        if (wasRecording?.recording !== this.recording?.recording) {
          // Missed while disconnected: say what changed.
          if (this.recording) this.emit("recording", this.recording);
          else this.emit("recording", { ...wasRecording, active: false, reason: "stopped" });
        }
        this.participants = new Map();
        for (const p of m.participants) {
          if (this.self && p.id === this.self.id) this.self = p;
          else this.participants.set(p.id, p);
        }
        for (const [id, p] of before) {
          if (!this.participants.has(id)) this.emit("participant_left", { ...p, reason: "left" });
        }
        for (const [id, p] of this.participants) {
          if (!before.has(id)) this.emit("participant_joined", p);
          else this.emit("participant_updated", p);
        }
      }),
    );
    on(
      "kicked",
      mine((m) => {
        this.state = "kicked";
        this._closeMedia();
        this._dispose();
        this.emit("kicked", m);
      }),
    );
    on(
      "track_published",
      mine((m) => {
        this._gone.delete(m.track.id); // published again (same id): it counts again
        this.tracks.set(m.track.id, m.track);
      }),
    );
    on(
      "track_unpublished",
      mine((m) => {
        this._gone.add(m.track);
        this.tracks.delete(m.track);
      }),
    );
    on(
      "track_updated",
      mine((m) => {
        this.tracks.set(m.track.id, m.track);
        const remote = this.remote.get(m.track.id);
        if (remote) remote.info = { ...remote.info, ...m.track };
        this.emit("track_updated", m.track);
      }),
    );
    on(
      "active_speaker",
      mine((m) => this.emit("active_speaker", m)),
    );
    on(
      "subscribe_offer",
      mine((m) => {
        this._subChain = this._subChain.then(() => this._answer(m)).catch((error) =>
          this.emit("media_error", { which: "subscriber", error }),
        );
      }),
    );
    on(
      "media_failed",
      mine((m) => this._mediaFailed(m.which)),
    );
    on("message", (m) => {
      if (m.type === "message" && m.conversation === this.conversation) this._chatEvent(m);
      if (m.type === "typing" && m.conversation === this.conversation) this._typing(m);
      if (m.type === "receipt" && m.conversation === this.conversation) this.emit("receipt", m);
    });
    on("welcome", (w) => this._reconnected(w));
  }

  async _reconnected(welcome) {
    if (this.state !== "joined" && this.state !== "joining") return;
    try {
      if (welcome.resumed && welcome.rooms.includes(this.name)) {
        // Still in the room (room_state has arrived). `join` again is harmless and returns
        // the room's tracks, which changed while events were dropped.
        const joined = await this.client.request({ type: "join", room: this.name });
        this._setTracks(joined.tracks);
        this.self = joined.self;
        await this._catchUpChat();
        return;
      }
      // The session is gone (server restart or too long away): join again from scratch and
      // publish on new connections.
      for (const p of this.participants.values()) {
        this.emit("participant_left", { ...p, reason: "disconnected" });
      }
      const sources = [...this.local.entries()].map(([source, l]) => ({
        source,
        track: l.track,
        muted: l.muted,
      }));
      this._closeMedia();
      await this.join();
      for (const p of this.participants.values()) this.emit("participant_joined", p);
      const live = sources.filter((s) => s.track && s.track.readyState === "live");
      if (live.length) await this.publish(live);
    } catch (error) {
      this.emit("media_error", { which: "rejoin", error });
    }
  }

  _dispose() {
    for (const off of this._unsubscribe) off();
    this._unsubscribe = [];
    for (const timer of this._typingTimers.values()) clearTimeout(timer);
    this._typingTimers.clear();
  }

  // -- chat --------------------------------------------------------------------------------

  /** Send a chat message; resolves with the message once stored (retried across reconnects). */
  async sendMessage(text) {
    const cid = randomId("c-");
    const message = {
      seq: null,
      cid,
      from: this.client.identity,
      name: this.self?.name ?? this.client.name,
      kind: "text",
      text,
      ts: Date.now(),
      pending: true,
      failed: false,
      edited: false,
      deleted: false,
      mine: true,
    };
    this.chat.pending.set(cid, message);
    this.emit("message", message);
    let storeDeadline = null; // when to stop retrying a store that refuses writes
    for (let attempt = 0; attempt < 6; attempt++) {
      if (this.client.state !== "open") await this.client.once("welcome", 30000).catch(() => null);
      try {
        const sent = await this.client.request({
          type: "send",
          conversation: this.conversation,
          cid,
          text,
        });
        this.chat.pending.delete(cid);
        Object.assign(message, { seq: sent.seq, ts: sent.ts, pending: false });
        if (!this.chat.bySeq.has(sent.seq)) this.chat.bySeq.set(sent.seq, message);
        this.chat.applied.add(sent.seq);
        if (sent.seq === this.chat.lastSeq + 1) this.chat.lastSeq = sent.seq;
        else if (sent.seq > this.chat.lastSeq) this._catchUpChat();
        this.emit("message", message);
        return message;
      } catch (err) {
        if (err.code === "store_full" || err.code === "store_unavailable") {
          // The store refused it (disk full, PostgreSQL away): nothing was stored, and the
          // server says when to come back. Retry under the same cid for up to
          // STORE_RETRY_MS (PROTOCOL.md, "Retry recipe for sending"), not counting attempts.
          const wait = err.retry_after_ms ?? 1000;
          storeDeadline ??= Date.now() + STORE_RETRY_MS;
          if (Date.now() + wait <= storeDeadline) {
            attempt--;
            await sleep(wait);
            continue;
          }
        }
        const retry = ["disconnected", "timeout", "internal_error", "rate_limited", "not_in_room"];
        if (!retry.includes(err.code)) {
          message.failed = true;
          message.pending = false;
          message.error = err;
          this.emit("message", message);
          throw err;
        }
        await sleep(err.retry_after_ms ?? Math.min(8000, 500 * 2 ** attempt));
      }
    }
    message.failed = true;
    message.pending = false;
    this.emit("message", message);
    throw new RallypointError("timeout", "the message could not be sent");
  }

  /** Tell the others we are typing (`true`, refresh every ~3 s) or stopped (`false`). */
  typing(active) {
    this.client.send({ type: "typing", conversation: this.conversation, active });
  }

  /** Move our read watermark to `seq` (default: the newest message). */
  markRead(seq = this.chat.lastSeq) {
    if (seq > 0) this.client.send({ type: "read", conversation: this.conversation, seq });
  }

  _chatEvent(ev) {
    if (ev.seq > this.chat.lastSeq + 1) {
      // A gap (events dropped while away): fetch it, in order, before applying.
      this._catchUpChat();
      return;
    }
    const message = this.chat.apply(ev);
    if (message) this.emit("message", message);
  }

  _typing(ev) {
    const key = ev.identity;
    clearTimeout(this._typingTimers.get(key));
    this._typingTimers.delete(key);
    if (ev.active) {
      // The server keeps no timer: expire an indicator that is not refreshed (~6 s).
      this._typingTimers.set(
        key,
        setTimeout(() => {
          this._typingTimers.delete(key);
          this.emit("typing", { ...ev, active: false });
        }, 6000),
      );
    }
    this.emit("typing", ev);
  }

  /** Fetch what we miss: the newest page after joining, then `sync` pages until caught up. */
  async _catchUpChat() {
    if (this._syncing) return this._syncing;
    this._syncing = (async () => {
      try {
        if (this.chat.lastSeq === 0 && this.chat.bySeq.size === 0) {
          // First load: the newest page of history, not the whole log.
          const page = await this.client.request({
            type: "history",
            conversation: this.conversation,
            limit: 100,
          });
          for (const ev of page.messages) this._applyQuiet(ev);
          this.chat.lastSeq = Math.max(this.chat.lastSeq, page.last_seq);
          if (this.epoch === null) this.epoch = this.client.welcome?.epoch ?? null;
          this.emit("chat_reset", { messages: this.chat.messages(), more: page.more });
          return;
        }
        for (let round = 0; round < 50; round++) {
          const synced = await this.client.request({
            type: "sync",
            since: { [this.conversation]: this.chat.lastSeq },
            limit: 200,
          });
          if (this.epoch !== null && synced.epoch !== this.epoch) {
            // The message store was replaced: every seq we hold is meaningless.
            this.epoch = synced.epoch;
            this.chat.reset();
            this._syncing = null;
            return this._catchUpChat();
          }
          this.epoch = synced.epoch;
          const page = synced.conversations[0];
          for (const ev of page.messages) {
            const message = this.chat.apply(ev);
            if (message) this.emit("message", message);
          }
          if (!page.more) break;
        }
      } catch (error) {
        if (error.code !== "disconnected") this.emit("media_error", { which: "chat", error });
      } finally {
        this._syncing = null;
      }
    })();
    return this._syncing;
  }

  _applyQuiet(ev) {
    this.chat.apply(ev);
  }

  // -- media: publishing -------------------------------------------------------------------

  _pcConfig() {
    const w = this.client.welcome ?? {};
    return {
      iceServers: w.ice_servers ?? [],
      iceTransportPolicy: w.ice_transport_policy === "relay" ? "relay" : "all",
      bundlePolicy: "max-bundle",
    };
  }

  _publisherPc() {
    if (this.publisher) return this.publisher;
    const pc = new this.RTCPeerConnection(this._pcConfig());
    this._trickle(pc, "publisher");
    this.publisher = pc;
    return pc;
  }

  _trickle(pc, target) {
    pc.addEventListener("icecandidate", (ev) => {
      if (!pc._rallypointSent) return; // still inside the SDP we are about to send
      const msg = { type: "ice", room: this.name, target };
      if (ev.candidate && ev.candidate.candidate) msg.candidate = ev.candidate.toJSON();
      this.client.send(msg);
    });
  }

  /**
   * Publish local tracks: `[{track, source}]`, source "camera", "microphone" or "screen".
   * One renegotiation for all of them; resolves when the server has answered.
   */
  publish(items) {
    const pc = this._publisherPc();
    for (const { track, source, muted } of items) {
      const existing = this.local.get(source);
      if (existing) {
        existing.transceiver.direction = "sendonly";
        existing.transceiver.sender.replaceTrack(track);
        existing.track = track;
        existing.muted = Boolean(muted);
      } else {
        const init = { direction: "sendonly" };
        const encodings = this.simulcast === false ? null : simulcastEncodings(track, source);
        if (encodings) init.sendEncodings = encodings;
        const transceiver = pc.addTransceiver(track, init);
        this.local.set(source, { transceiver, track, muted: Boolean(muted) });
      }
    }
    return this._negotiate();
  }

  /** Our published track id for `source` (`<participant>:<mid>`), or null. */
  trackId(source) {
    const l = this.local.get(source);
    if (!l || !l.transceiver.mid || !this.self) return null;
    return `${this.self.id}:${l.transceiver.mid}`;
  }

  /** Mark a published track muted for the others (`track_mute`); audio stops sending too. */
  async setMuted(source, muted) {
    const l = this.local.get(source);
    if (!l) return;
    l.muted = muted;
    if (l.track) l.track.enabled = !muted;
    const id = this.trackId(source);
    if (!id || !this.publisher?._rallypointSent) return; // sent once published (_sendMutes)
    try {
      await this.client.request({ type: "track_mute", room: this.name, track: id, muted });
    } catch (err) {
      if (err.code !== "no_such_track" && err.code !== "disconnected") throw err;
    }
  }

  /**
   * Swap the track of `source` without renegotiating (null: send nothing, e.g. the camera
   * is off). A source that was never published is published now.
   */
  async replaceTrack(source, track) {
    const l = this.local.get(source);
    if (!l) {
      if (track) await this.publish([{ track, source }]);
      return;
    }
    await l.transceiver.sender.replaceTrack(track);
    l.track = track;
  }

  /** Stop publishing `source`: its media section goes inactive (renegotiated). */
  async unpublish(source) {
    const l = this.local.get(source);
    if (!l) return;
    await l.transceiver.sender.replaceTrack(null);
    l.transceiver.direction = "inactive";
    l.track = null;
    await this._negotiate();
  }

  _negotiate() {
    const run = async () => {
      for (let attempt = 0; attempt < 5; attempt++) {
        const pc = this.publisher;
        if (!pc || this.state === "left" || this.state === "kicked") return;
        await pc.setLocalDescription(await pc.createOffer());
        await waitForGathering(pc);
        const tracks = [];
        for (const [source, l] of this.local) {
          if (l.transceiver.mid !== null) tracks.push({ mid: l.transceiver.mid, source });
        }
        try {
          if (this.client.state !== "open") await this.client.once("welcome", 30000);
          const reply = await this.client.request({
            type: "publish",
            room: this.name,
            sdp: pc.localDescription.sdp,
            tracks,
          });
          await pc.setRemoteDescription({ type: "answer", sdp: reply.sdp });
          pc._rallypointSent = true;
          await this._sendMutes();
          return;
        } catch (err) {
          if (pc.signalingState === "have-local-offer") {
            await pc.setLocalDescription({ type: "rollback" });
          }
          const retry = [
            "disconnected", "timeout", "sfu_unavailable", "media_unavailable", "rate_limited",
          ];
          if (!retry.includes(err.code) || attempt === 4) throw err;
          this.emit("media_error", { which: "publisher", error: err, retrying: true });
          await sleep(err.retry_after_ms ?? 500 * 2 ** attempt);
        }
      }
    };
    const next = this._pubChain.then(run);
    this._pubChain = next.catch((error) => this.emit("media_error", { which: "publisher", error }));
    return next;
  }

  async _sendMutes() {
    // Tracks muted before they were published (or re-published after a failure).
    for (const [source, l] of this.local) {
      const id = this.trackId(source);
      if (l.muted && l.track && id) {
        this.client.send({ type: "track_mute", room: this.name, track: id, muted: true });
      }
    }
  }

  // -- media: subscribing ------------------------------------------------------------------

  async _answer(offer) {
    if (this.state === "left" || this.state === "kicked") return;
    if (!this.subscriber) {
      const pc = new this.RTCPeerConnection(this._pcConfig());
      this._trickle(pc, "subscriber");
      this.subscriber = pc;
    }
    const pc = this.subscriber;
    this._subMids = new Map(offer.tracks.map((t) => [t.mid, t]));
    await pc.setRemoteDescription({ type: "offer", sdp: offer.sdp });
    await pc.setLocalDescription(await pc.createAnswer());
    await waitForGathering(pc);
    await this.client.request({ type: "subscribe_answer", room: this.name, sdp: pc.localDescription.sdp });
    pc._rallypointSent = true;
    this._reconcileRemote(pc);
  }

  _reconcileRemote(pc) {
    // The tracks received: those of the offer just answered, less those unpublished since
    // (the offer was made before; their sections go inactive in the next one).
    const seen = new Set();
    for (const transceiver of pc.getTransceivers()) {
      const info = this._subMids.get(transceiver.mid);
      if (!info || this._gone.has(info.id)) continue;
      seen.add(info.id);
      const known = this.remote.get(info.id);
      if (known && known.transceiver === transceiver) continue;
      if (known) this.emit("track_removed", { info: known.info });
      this._rendered.delete(info.id); // a new copy on the server: any size until told
      const entry = { info, track: transceiver.receiver.track, transceiver };
      this.remote.set(info.id, entry);
      this.tracks.set(info.id, this.tracks.get(info.id) ?? info);
      this.emit("track_added", entry);
    }
    for (const [id, entry] of [...this.remote]) {
      if (!seen.has(id)) {
        this.remote.delete(id);
        this.emit("track_removed", { info: entry.info });
      }
    }
  }

  /** Stop receiving a track (`true`) or receive it again, e.g. for a hidden tile. */
  pause(trackId, paused) {
    return this.client.request({ type: "track_pause", room: this.name, track: trackId, paused });
  }

  /**
   * Tell the SFU how large each received video track is shown (`track_render`): `sizes` maps
   * track ids to `{width, height}` in device pixels (CSS pixels times devicePixelRatio);
   * `{width: 0, height: 0}`: not shown, and nothing of it is forwarded. A simulcast track gets
   * the smallest layer that fills its box. Only video tracks being received whose size changed
   * since the last report are sent, all in one message (64 a message); resolves once the
   * server applied them.
   */
  async setRenderSizes(sizes) {
    const tracks = [];
    for (const [id, size] of sizes instanceof Map ? sizes : Object.entries(sizes)) {
      if (this.remote.get(id)?.info.kind !== "video") continue;
      const width = Math.max(0, Math.min(RENDER_MAX, Math.round(size.width) || 0));
      const height = Math.max(0, Math.min(RENDER_MAX, Math.round(size.height) || 0));
      const last = this._rendered.get(id);
      if (last && last.width === width && last.height === height) continue;
      tracks.push({ track: id, width, height });
    }
    for (const t of tracks) this._rendered.set(t.track, t);
    for (let i = 0; i < tracks.length; i += RENDER_BATCH) {
      const batch = tracks.slice(i, i + RENDER_BATCH);
      try {
        await this.client.request({ type: "track_render", room: this.name, tracks: batch });
      } catch (err) {
        // Not applied (e.g. a track went away meanwhile): send these again next time.
        for (const t of tracks.slice(i)) if (this._rendered.get(t.track) === t) this._rendered.delete(t.track);
        throw err;
      }
    }
  }

  _mediaFailed(which) {
    if (which === "subscriber" || which === "all") {
      // The server offers a new subscriber connection by itself.
      this._dropSubscriber();
    }
    if (which === "publisher" || which === "all") {
      const items = [...this.local.entries()]
        .filter(([, l]) => l.track && l.track.readyState === "live")
        .map(([source, l]) => ({ source, track: l.track, muted: l.muted }));
      this.publisher?.close();
      this.publisher = null;
      this.local.clear();
      if (items.length) this.publish(items).catch(() => {});
    }
  }

  _dropSubscriber() {
    this.subscriber?.close();
    this.subscriber = null;
    this._subMids = new Map();
    this._rendered.clear();
    for (const [id, entry] of [...this.remote]) {
      this.remote.delete(id);
      this.emit("track_removed", { info: entry.info });
    }
  }

  _closeMedia() {
    this._dropSubscriber();
    this.publisher?.close();
    this.publisher = null;
    this.local.clear();
  }
}
