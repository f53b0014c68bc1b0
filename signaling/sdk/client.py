"""``RallypointClient`` and ``Call``: the whole protocol for one device.

Built on the low-level ``signaling.sdk.wsclient.Client`` (one WebSocket, requests matched to
replies).
This layer adds what an app needs on top:

- **Resume and failover**: when the socket drops, it reconnects with the resume token from
  ``welcome``, first to the same server, then to each other server URL it was given, with
  full-jitter backoff between rounds; if the session was gone (another node, or the grace
  expired) it starts a new one and joins its rooms again; either way it catches up on chat with
  ``sync``.
- **Chat**: ``send`` retries under one client message id (``cid``) until acknowledged, across
  reconnects and the store's retryable refusals, so a message is stored once; received
  messages are de-duplicated by (conversation, seq) and handed out in order by
  ``next_message``.
- **Calls**: ``call`` starts one; ``next_call`` waits for an incoming one; a ``Call`` tracks its
  state from the server's events and offers ``accept``, ``decline``, ``cancel``, ``hangup`` and
  ``signal`` (WebRTC negotiation relay).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

import aiohttp

from sfu.tasks import TaskSet

from .wsclient import Client, ClientError, Encoding, next_matching

log = logging.getLogger("rallypoint.sdk")

CallError = ClientError  # the server refused a call request; ``.code`` is the error code

_TERMINAL = ("call_ended", "call_answered_elsewhere")
# Refusals that say nothing was done and when to come back (``retry_after_ms``).
_COME_BACK = ("rate_limited", "store_full", "store_unavailable")
#: How long a chat send or group change is retried while the server refuses it that way.
REFUSED_RETRY_S = 30.0


class Call:
    """One call as this device sees it. Created by ``RallypointClient.call`` (outgoing) or
    handed out by ``RallypointClient.next_call`` (incoming)."""

    def __init__(self, client: RallypointClient, info: dict[str, Any], role: str) -> None:
        self.client = client
        self.id: str = info["call"]
        self.role = role  # "caller" | "callee"
        self.caller: str = info["from"]
        self.caller_name: str = info.get("from_name", self.caller)
        self.video: bool = info.get("video", False)
        self.group: bool = info.get("group", False)
        self.media: str = info.get("media", "p2p")
        self.room: str | None = info.get("room")
        self.conversation: str | None = info.get("conversation")  # started from a group
        self.ice_servers: list[dict[str, Any]] = info.get("ice_servers", [])
        self.state = "ringing"
        self.parties: dict[str, str] = {}  # identity -> status
        self.peer_device: str | None = info.get("from_device") if role == "callee" else None
        self.outcome: str | None = None
        self.duration_ms = 0
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.signals: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.ended: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._update(info)

    def __repr__(self) -> str:
        return f"<Call {self.id} {self.role} {self.state}>"

    def _update(self, msg: dict[str, Any]) -> None:
        """Fold a server message about this call into the local state."""
        t = msg["type"]
        if t == "call_state":
            self.state = msg["state"]
            self.parties = {p["identity"]: p["status"] for p in msg["parties"]}
            self.ice_servers = msg.get("ice_servers", self.ice_servers)
            self.room = msg.get("room", self.room)
            if self.role == "caller" and self.peer_device is None and not self.group:
                for p in msg["parties"]:
                    if p["identity"] != self.caller and "device" in p:
                        self.peer_device = p["device"]
            if msg["state"] == "ended":
                self._finish({"type": "call_ended", "call": self.id, "outcome": msg.get("outcome")})
        elif t == "call_accepted":
            self.state = "active"
            self.parties[msg["identity"]] = "joined"
            if not self.group and self.peer_device is None:
                self.peer_device = msg["device"]
        elif t in ("call_ringing", "call_declined", "call_busy", "call_missed", "call_left"):
            self.parties[msg["identity"]] = {
                "call_ringing": "ringing",
                "call_declined": "declined",
                "call_busy": "busy",
                "call_missed": "missed",
                "call_left": "left",
            }[t]
        elif t in _TERMINAL:
            self._finish(msg)

    def _finish(self, msg: dict[str, Any]) -> None:
        self.state = "ended"
        if msg["type"] == "call_answered_elsewhere":
            self.outcome = "answered_elsewhere"
        else:
            self.outcome = msg.get("outcome")
            self.duration_ms = msg.get("duration_ms", 0)
        if not self.ended.done():
            self.ended.set_result(msg)

    async def next_event(
        self, type_: str | None = None, *, timeout: float = 10.0
    ) -> dict[str, Any]:
        """The next event about this call (of ``type_``), skipping others."""
        return await next_matching(self.events, type_, timeout=timeout)

    async def wait_ended(self, timeout: float = 10.0) -> str | None:
        """Wait for the call to end here; returns the outcome."""
        await asyncio.wait_for(asyncio.shield(self.ended), timeout)
        return self.outcome

    async def _req(self, type_: str, **fields: Any) -> dict[str, Any]:
        return await self.client.request({"type": type_, "call": self.id, **fields})

    async def ringing(self) -> None:
        """Tell the caller this device rings."""
        await self._req("call_ringing")

    async def accept(self) -> dict[str, Any]:
        """Answer on this device; returns `call_state` (``room`` to join for SFU calls)."""
        state = await self._req("call_accept")
        self._update(state)
        return state

    async def decline(self) -> None:
        await self._req("call_decline")

    async def cancel(self) -> None:
        await self._req("call_cancel")

    async def hangup(self) -> None:
        await self._req("call_hangup")

    async def signal(self, kind: str, *, to: str | None = None, **fields: Any) -> None:
        """Relay WebRTC negotiation (``sdp``, ``candidate``/``mid``/``mline``, ``restart``)."""
        extra = {k: v for k, v in fields.items() if v is not None}
        if to is not None:
            extra["to"] = to
        await self._req("call_signal", kind=kind, **extra)

    async def join_media_room(self) -> dict[str, Any]:
        """SFU calls: join the call's media room (media itself goes through the SFU)."""
        if self.room is None:
            raise ValueError("this call has no media room (a P2P call)")
        return await self.client.join(self.room)


class RallypointClient:
    """One device's connection to a Rallypoint server, with resume, chat and calls.

    ``url`` is one server's WebSocket URL, or a list of the URLs of a cluster's nodes, tried in
    that order (``shuffle``: in a random order, once, so that clients sharing one list spread
    over the nodes); a lost connection is retried on the same node first (where the session
    can resume), then on the next; ``connect_timeout_s`` bounds each attempt.

    ``token`` (token mode) or ``identity``/``name`` (open mode) authenticate; ``device`` should
    be stable per installation; ``resume`` resumes a session from an earlier ``welcome.resume``.
    ``encoding="msgpack"`` speaks MessagePack instead of JSON (the same messages, fewer bytes;
    docs/PROTOCOL.md, "Encodings").
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        token: str | None = None,
        identity: str | None = None,
        name: str | None = None,
        device: str | None = None,
        resume: str | None = None,
        reconnect: bool = True,
        max_backoff_s: float = 20.0,
        encoding: Encoding = "json",
        shuffle: bool = False,
        connect_timeout_s: float = 10.0,
    ) -> None:
        if encoding not in ("json", "msgpack"):
            raise ValueError(f"encoding must be 'json' or 'msgpack', not {encoding!r}")
        urls = [url] if isinstance(url, str) else list(url)
        if not urls or not all(isinstance(u, str) and u for u in urls):
            raise ValueError("url must be a WebSocket URL or a non-empty list of them")
        if shuffle:
            random.shuffle(urls)
        #: The server URLs, in the order they are tried.
        self.urls: tuple[str, ...] = tuple(urls)
        self._node = 0  # index in ``urls`` of the node connected (or last tried)
        self.connect_timeout_s = connect_timeout_s
        self.encoding: Encoding = encoding
        self.hello: dict[str, Any] = {
            k: v
            for k, v in (("token", token), ("identity", identity), ("name", name))
            if v is not None
        }
        self.hello["device"] = device or uuid.uuid4().hex[:16]
        self.reconnect = reconnect
        self._resume = resume  # a resume token kept from an earlier run, for the first hello
        self.max_backoff_s = max_backoff_s
        self.welcome: dict[str, Any] = {}
        self.rooms: set[str] = set()
        self.calls: dict[str, Call] = {}
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        # Called with every event before it is queued (e.g. media.session.SfuSession).
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.incoming: asyncio.Queue[Call] = asyncio.Queue()
        self.reconnects = 0
        self._messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._seen: dict[str, set[int]] = {}
        self._last_seq: dict[str, int] = {}
        self._early: dict[str, list[dict[str, Any]]] = {}
        self._conn: Client | None = None
        self._last_error: Exception | None = None
        self._http: aiohttp.ClientSession | None = None
        self._connected = asyncio.Event()
        self._closing = False
        self._tasks = TaskSet()

    # -- connection ------------------------------------------------------------------------------

    @property
    def identity(self) -> str:
        return str(self.welcome.get("identity", ""))

    @property
    def url(self) -> str:
        """The URL of the server this client is connected to (or last tried)."""
        return self.urls[self._node]

    @property
    def session(self) -> str:
        """This device's session id (also its participant id and call device id)."""
        return str(self.welcome.get("session", ""))

    async def connect(self) -> dict[str, Any]:
        """Connect to the first server that answers (each URL once, in order) and send
        `hello`; returns `welcome`. Raises the last server's error if none answers."""
        if self._http is None:
            self._http = aiohttp.ClientSession()
        if not await self._open_any(self._resume, self._node):
            assert self._last_error is not None
            raise self._last_error
        return self.welcome

    async def _open_any(self, resume: str | None, first: int) -> bool:
        """Try each server once, from ``urls[first]`` on; whether one answered."""
        for k in range(len(self.urls)):
            node = (first + k) % len(self.urls)
            try:
                await self._open(resume, node)
            except (aiohttp.ClientError, OSError, ConnectionError, TimeoutError, ClientError) as e:
                log.debug("cannot connect to %s: %r", self.urls[node], e)
                self._last_error = e
                continue
            return True
        return False

    async def _open(self, resume: str | None, node: int) -> None:
        assert self._http is not None
        self._node = node
        conn = Client(self.url, session=self._http, encoding=self.encoding)
        hello = dict(self.hello)
        if resume:
            hello["resume"] = resume
        try:
            # Bounded: a node that accepts TCP but never answers must not stall the failover.
            async with asyncio.timeout(self.connect_timeout_s):
                self.welcome = await conn.connect(heartbeat=True, **hello)
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        self._connected.set()
        self._spawn(self._pump(conn))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.spawn(coro)

    async def _pump(self, conn: Client) -> None:
        """Route the events of one connection; on an unexpected close, reconnect."""
        while True:
            ev = await conn.events.get()
            if ev["type"] == "_closed":
                break
            self._dispatch(ev)
        await conn.close()  # its reader and heartbeat tasks end here
        if self._conn is conn:
            self._connected.clear()
            self._conn = None
            if not self._closing and self.reconnect and ev.get("code") not in (1000, 4004):
                self._spawn(self._reconnect())
            else:
                self.events.put_nowait(ev)

    async def _reconnect(self) -> None:
        """Reconnect: each round tries the node just lost first (only it knows the resume
        token), then the others in order; full-jitter backoff (0.05 s doubling up to
        ``max_backoff_s``) before each round."""
        resume = self.welcome.get("resume")
        lost = self._node
        delay = 0.05
        while not self._closing:
            await asyncio.sleep(random.uniform(0, delay))
            if not await self._open_any(resume, lost):
                delay = min(self.max_backoff_s, delay * 2)
                continue
            self.reconnects += 1
            if not self.welcome.get("resumed"):
                for room in sorted(self.rooms):
                    with contextlib.suppress(ClientError):
                        await self.request({"type": "join", "room": room})
            if self._seen:  # it has chatted (sent or received): catch up
                with contextlib.suppress(ClientError, ConnectionError, TimeoutError):
                    await self.sync()
            self.events.put_nowait(
                {"type": "_reconnected", "resumed": self.welcome["resumed"], "url": self.url}
            )
            return

    async def close(self, *, bye: bool = True) -> None:
        """End the session (``bye``: no resume) and close the connection."""
        self._closing = True
        conn = self._conn
        if conn is not None:
            if bye:
                with contextlib.suppress(ClientError, ConnectionError, TimeoutError):
                    await conn.request({"type": "bye"}, timeout=2.0)
            await conn.close()
        await self._tasks.cancel()
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def drop(self) -> None:
        """Simulate a network failure: abort the socket; the client then resumes by itself."""
        conn = self._conn
        assert conn is not None, "not connected"
        await conn.drop()

    async def wait_connected(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def request(self, msg: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """Send a request and return its reply (``ClientError`` for an `error` reply)."""
        await self.wait_connected(timeout)
        conn = self._conn
        if conn is None:  # lost again meanwhile (``wait_for`` returns a loop turn later)
            raise ConnectionError("the connection was lost")
        return await conn.request(msg, timeout)

    async def next_event(
        self,
        type_: str | None = None,
        *,
        timeout: float = 10.0,
        where: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any]:
        """The next server event (of ``type_``, matching ``where``), skipping others."""
        return await next_matching(self.events, type_, timeout=timeout, where=where)

    def _dispatch(self, ev: dict[str, Any]) -> None:
        for listener in self.listeners:
            listener(ev)
        t = ev["type"]
        if t == "message":
            self._message(ev)
            return
        if t.startswith("call_"):
            self._call_event(ev)
        self.events.put_nowait(ev)

    # -- rooms -----------------------------------------------------------------------------------

    async def join(self, room: str) -> dict[str, Any]:
        reply = await self.request({"type": "join", "room": room})
        self.rooms.add(room)
        return reply

    async def leave(self, room: str) -> None:
        await self.request({"type": "leave", "room": room})
        self.rooms.discard(room)

    async def render_sizes(self, room: str, sizes: Mapping[str, tuple[int, int]]) -> None:
        """Tell the SFU the size (device pixels, width x height) at which this client shows
        each video track it receives in ``room``, by track id; ``(0, 0)``: not shown, and then
        nothing of it is forwarded. A simulcast track gets the smallest layer that fills its
        box. Tracks not named keep their last size (before any: any size)."""
        await self.request(
            {
                "type": "track_render",
                "room": room,
                "tracks": [{"track": t, "width": w, "height": h} for t, (w, h) in sizes.items()],
            }
        )

    async def start_recording(
        self, room: str, *, audio_only: bool = False, identities: list[str] | None = None
    ) -> None:
        """Moderators: record the room's media (``identities``: only theirs). Everyone in the
        room, this client too, then gets the ``recording`` event."""
        msg: dict[str, Any] = {"type": "recording_start", "room": room, "audio_only": audio_only}
        if identities is not None:
            msg["identities"] = identities
        await self.request(msg)

    async def stop_recording(self, room: str) -> None:
        """Moderators: stop the room's recording (its files are complete when this returns)."""
        await self.request({"type": "recording_stop", "room": room})

    # -- chat ------------------------------------------------------------------------------------

    def _message(self, msg: dict[str, Any]) -> bool:
        """Keep a received message unless it is a repeat; returns whether it was new."""
        conv, seq = msg["conversation"], msg["seq"]
        seen = self._seen.setdefault(conv, set())
        if seq in seen:
            return False
        seen.add(seq)
        if seq > self._last_seq.get(conv, 0):
            self._last_seq[conv] = seq
        self._messages.put_nowait(msg)
        return True

    async def send(
        self, conversation: str, text: str, *, cid: str | None = None, attempts: int = 6
    ) -> dict[str, Any]:
        """Send a chat message; retried under the same ``cid`` (also across reconnects, and
        while the store refuses writes: ``_retried``) until the server acknowledges it.
        Returns `sent` (``duplicate`` true if a retry hit)."""
        cid = cid or uuid.uuid4().hex
        msg = {"type": "send", "conversation": conversation, "cid": cid, "text": text}
        sent = await self._retried(msg, attempts)
        self._seen.setdefault(conversation, set()).add(sent["seq"])
        return sent

    async def _retried(self, msg: dict[str, Any], attempts: int) -> dict[str, Any]:
        """A request that carries a ``cid`` (stored or applied once however often it is sent),
        retried as docs/PROTOCOL.md's "Retry recipe for sending" says: after a timeout or a
        lost connection (``attempts`` in all, full-jitter backoff, across reconnects), and
        after a refusal that says when to come back (`rate_limited`, `store_full`,
        `store_unavailable`: its ``retry_after_ms``, for up to ``REFUSED_RETRY_S``)."""
        delay = 0.1
        refused_until: float | None = None
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            try:
                return await self.request(msg, timeout=5.0)
            except (TimeoutError, ConnectionError):
                attempt += 1
                if attempt == attempts:
                    raise
                await asyncio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 5.0)
            except ClientError as e:
                wait_ms = e.msg.get("retry_after_ms")
                if e.code not in _COME_BACK or not isinstance(wait_ms, int):
                    raise
                if refused_until is None:
                    refused_until = loop.time() + REFUSED_RETRY_S
                if loop.time() + wait_ms / 1000 > refused_until:
                    raise
                await asyncio.sleep(wait_ms / 1000)

    async def next_message(
        self,
        conversation: str | None = None,
        *,
        timeout: float = 10.0,
        where: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any]:
        """The next new (de-duplicated) message received, optionally of one conversation."""

        async def wait() -> dict[str, Any]:
            while True:
                m = await self._messages.get()
                if (conversation is None or m["conversation"] == conversation) and (
                    where is None or where(m)
                ):
                    return m

        return await asyncio.wait_for(wait(), timeout)

    async def history(self, conversation: str, **paging: int) -> list[dict[str, Any]]:
        reply = await self.request({"type": "history", "conversation": conversation, **paging})
        return list(reply["messages"])

    async def conversations(self, *, page: int = 50) -> list[dict[str, Any]]:
        """Every conversation of this identity, newest first (all pages of `conversations`)."""
        items: list[dict[str, Any]] = []
        msg: dict[str, Any] = {"type": "conversations", "limit": page}
        while True:
            reply = await self.request(msg)
            items.extend(reply["items"])
            if not reply["more"]:
                return items
            msg["cursor"] = reply["cursor"]

    async def mute(self, conversation: str, muted: bool = True) -> None:
        await self.request(
            {"type": "conversation_mute", "conversation": conversation, "muted": muted}
        )

    async def read(self, conversation: str, seq: int) -> None:
        await self.request({"type": "read", "conversation": conversation, "seq": seq})

    # -- groups ----------------------------------------------------------------------------------

    async def _change(self, type_: str, cid: str | None, **fields: Any) -> dict[str, Any]:
        """A group request, retried under the same ``cid`` across timeouts and reconnects
        (a retry changes nothing twice); returns `group`."""
        msg = {"type": type_, "cid": cid or uuid.uuid4().hex, **fields}
        reply = await self._retried(msg, 6)
        if "message" in reply:
            self._message(reply["message"])
        return reply

    async def create_group(
        self, name: str, members: list[str] | tuple[str, ...] = (), *, cid: str | None = None
    ) -> dict[str, Any]:
        """Create a group (the token needs the `groups` claim); returns `group`, whose
        `conversation` is the group's id."""
        return await self._change("group_create", cid, name=name, identities=list(members))

    async def group_add(
        self, group: str, *identities: str, cid: str | None = None
    ) -> dict[str, Any]:
        return await self._change("group_add", cid, conversation=group, identities=list(identities))

    async def group_remove(
        self, group: str, *identities: str, cid: str | None = None
    ) -> dict[str, Any]:
        return await self._change(
            "group_remove", cid, conversation=group, identities=list(identities)
        )

    async def group_rename(
        self, group: str, name: str, *, cid: str | None = None
    ) -> dict[str, Any]:
        return await self._change("group_rename", cid, conversation=group, name=name)

    async def group_role(
        self, group: str, identity: str, role: str, *, cid: str | None = None
    ) -> dict[str, Any]:
        return await self._change(
            "group_role", cid, conversation=group, identity=identity, role=role
        )

    async def group_leave(self, group: str, *, cid: str | None = None) -> dict[str, Any]:
        return await self._change("group_leave", cid, conversation=group)

    async def group_delete(self, group: str, *, cid: str | None = None) -> dict[str, Any]:
        return await self._change("group_delete", cid, conversation=group)

    async def group_info(self, group: str) -> dict[str, Any]:
        return await self.request({"type": "group_info", "conversation": group})

    # -- contacts, blocks and presence ---------------------------------------------------------

    async def contact_request(self, identity: str) -> None:
        """Ask ``identity`` to be a contact (the token needs the `contacts` claim); accepts
        its request if it asked first. The answer is the same whether it exists or not."""
        await self.request({"type": "contact_request", "identity": identity})

    async def contact_accept(self, identity: str) -> None:
        await self.request({"type": "contact_accept", "identity": identity})

    async def contact_decline(self, identity: str) -> None:
        await self.request({"type": "contact_decline", "identity": identity})

    async def contact_remove(self, identity: str) -> None:
        """End a contact (both ways), or take back your own request."""
        await self.request({"type": "contact_remove", "identity": identity})

    async def block(self, identity: str) -> None:
        await self.request({"type": "block", "identity": identity})

    async def unblock(self, identity: str) -> None:
        await self.request({"type": "unblock", "identity": identity})

    async def contacts(self, *, page: int = 500) -> list[dict[str, Any]]:
        """Every relation of this identity (contacts, requests both ways, blocks), sorted by
        identity (all pages of `contacts`)."""
        items: list[dict[str, Any]] = []
        msg: dict[str, Any] = {"type": "contacts", "limit": page}
        while True:
            reply = await self.request(msg)
            items.extend(reply["relations"])
            if not reply["more"] or not items:
                return items
            msg["after"] = items[-1]["identity"]

    async def watch(self, *identities: str) -> dict[str, str]:
        """Follow these identities' presence (replaces the previous list); returns each one's
        status now. Anyone the server does not let you see is `offline`, exactly as if it
        were; later changes arrive as `presence` events (``next_event("presence")``)."""
        reply = await self.request({"type": "watch", "identities": list(identities)})
        return {p["identity"]: p["status"] for p in reply["presence"]}

    async def set_presence(self, status: str) -> None:
        await self.request({"type": "presence", "status": status})

    async def sync(self, *, discover: bool = True) -> int:
        """Fetch every message newer than what this client has seen; returns how many were new.
        With ``discover``, direct conversations and groups it has not seen yet (a group it was
        added to while away) are fetched from the start (`conversations`)."""
        new = 0
        if discover:
            for item in await self.conversations():
                if item["kind"] != "room":  # rooms need the token's grant: joined ones only
                    self._last_seq.setdefault(item["conversation"], 0)
        pending = dict(self._last_seq)
        while pending:
            reply = await self.request({"type": "sync", "since": pending})
            asked, pending = pending, {}
            for page in reply["conversations"]:
                for m in page["messages"]:
                    new += self._message(m)
                if page["more"] and page["messages"]:
                    pending[page["conversation"]] = page["messages"][-1]["seq"]
            if reply.get("more"):  # conversations the reply had no room for: ask again
                answered = {page["conversation"] for page in reply["conversations"]}
                pending.update({c: s for c, s in asked.items() if c not in answered})
        return new

    # -- calls -----------------------------------------------------------------------------------

    def _call_event(self, ev: dict[str, Any]) -> None:
        t = ev["type"]
        call = self.calls.get(ev["call"])
        if t == "call_incoming":
            if call is None:
                call = self.calls[ev["call"]] = Call(self, ev, "callee")
                self.incoming.put_nowait(call)
            return
        if t == "call_state" and call is None:
            # After a resume: a call that rang (or was made) while this socket was down.
            role = "caller" if ev["role"] == "caller" else "callee"
            call = self.calls[ev["call"]] = Call(self, ev, role)
            if role == "callee" and ev["state"] != "ended":
                self.incoming.put_nowait(call)
        if call is None:
            # An event can overtake the reply that tells us the call id (`call_invite`):
            # keep it until ``call`` has made the Call.
            self._early.setdefault(ev["call"], []).append(ev)
            while len(self._early) > 64:
                self._early.pop(next(iter(self._early)))
            return
        self._fold(call, ev)

    def _fold(self, call: Call, ev: dict[str, Any]) -> None:
        t = ev["type"]
        if t == "call_signal":
            call.signals.put_nowait(ev)
        else:
            call._update(ev)
        call.events.put_nowait(ev)

    async def call(
        self,
        *identities: str,
        video: bool = False,
        room: str | None = None,
        group: str | None = None,
    ) -> Call:
        """Call one identity (1:1), several (a group call), or the members of ``group`` (a
        `group:<id>` conversation; no identities then)."""
        msg: dict[str, Any] = {"type": "call_invite", "video": video}
        if group is not None:
            msg["group"] = group
        else:
            msg["to"] = list(identities)
        if room is not None:
            msg["room"] = room
        state = await self.request(msg)
        call = self.calls.get(state["call"])
        if call is None:
            call = self.calls[state["call"]] = Call(self, state, "caller")
        else:
            call._update(state)
        for ev in self._early.pop(call.id, []):
            self._fold(call, ev)
        return call

    async def next_call(self, timeout: float = 10.0) -> Call:
        """The next incoming call."""
        return await asyncio.wait_for(self.incoming.get(), timeout)
