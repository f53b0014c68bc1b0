"""Chat: the handlers of `send`, `edit`, `delete`, `read`, `typing`, `history`, `sync` and
`conversations`, and posting on behalf of the app's backend (the HTTP API).

Between a store write completing and the fan-out there is no ``await``, so every recipient sees
a conversation's messages in sequence order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from ..core.feature import Feature
from ..core.hub import Hub
from ..core.session import Session
from ..wire.errors import ProtocolError
from ..wire.framing import encode
from .messages import MESSAGES
from .store import AppendResult, ChatStore, NewMessage, StoredMessage

#: Bytes of a history or sync reply besides its pages (type, ids, epoch, punctuation).
REPLY_ENVELOPE = 512
#: A sync reply stops adding conversations when less than this is left of its budget.
SYNC_PAGE_MIN = 1024
#: Read marks per conversation in a sync page (the furthest readers).
MAX_READS_IN_SYNC = 200

#: Called after a message was stored and delivered (not for duplicates), with a direct
#: conversation's two members (empty for room chat).
MessageHook = Callable[[StoredMessage, tuple[str, ...]], None]


class Chat:
    """Room chat and direct messages of one hub, stored in ``store``."""

    def __init__(self, hub: Hub, store: ChatStore) -> None:
        self.hub = hub
        self.store = store
        # Read on every chat message.
        self.max_text_chars = hub.cfg.limits.max_text_chars
        self.edit_window_ms = hub.cfg.chat.edit_window_s * 1000
        # No reply is larger than this (history, sync): under half the outbox, so a client is
        # never cut off as a slow consumer for the size of an answer it asked for.
        self.max_reply_bytes = hub.cfg.limits.max_reply_bytes
        self.counters = hub.counters
        self.on_message: list[MessageHook] = []

    def feature(self) -> Feature:
        return Feature(
            "chat",
            MESSAGES,
            {
                "send": self.on_send,
                "edit": self.on_edit,
                "delete": self.on_delete,
                "read": self.on_read,
                "typing": self.on_typing,
                "history": self.on_history,
                "sync": self.on_sync,
                "conversations": self.on_conversations,
            },
            inline=frozenset({"send", "edit", "delete"}),
        )

    # -- access ----------------------------------------------------------------------------------

    def _conversation(
        self, session: Session, conv: str, *, joined: bool
    ) -> tuple[tuple[str, ...], bool]:
        """Check access to ``conv``; returns (direct conversation members, is moderator).

        Room chat needs the room in the token (``join`` grant), and ``joined`` actions (send,
        typing) need the session to be in the room with the ``chat`` grant. A direct conversation
        needs the identity to be one of its two members.
        """
        kind, _, rest = conv.partition(":")
        if kind == "room":
            grants = self.hub.grants_for(session, rest)
            if grants is None:
                raise ProtocolError("token_wrong_room", f"the token grants nothing in {rest!r}")
            p = session.rooms.get(rest)
            if joined:
                if p is None:
                    raise ProtocolError("not_in_room", f"join room {rest!r} to chat there")
                if "chat" not in grants:
                    raise ProtocolError("forbidden", f"the token has no chat grant in {rest!r}")
            elif "join" not in grants:
                raise ProtocolError("forbidden", f"the token has no join grant in {rest!r}")
            return (), "moderate" in grants or (p is not None and p.moderator)
        a, _, b = rest.partition("|")
        if a >= b or session.identity not in (a, b):
            raise ProtocolError(
                "bad_conversation",
                f"{conv!r} is not a direct conversation of yours (ids are dm:<a>|<b> with a < b)",
            )
        if not session.claims.dm:
            raise ProtocolError("forbidden", "the token does not allow direct messages")
        return (a, b), False

    # -- writes ----------------------------------------------------------------------------------

    def _append(self, s: Session, m: dict[str, Any], kind: str) -> None:
        """Check a send, edit or delete and hand it to the store; the acknowledgement and the
        fan-out happen in ``done`` when the write is committed. Later chat writes of the same
        connection go on meanwhile (the store answers in order, and replies to them that
        cannot wait for the store, such as errors, wait in ``after``); other requests wait
        until no write of the connection is pending (the endpoint drains ``Link.tail``)."""
        conv: str = m["conversation"]
        members, moderator = self._conversation(s, conv, joined=True)
        text: str | None = m.get("text")
        if text is not None and not 0 < len(text) <= self.max_text_chars:
            raise ProtocolError("bad_field", f"`text` must have 1-{self.max_text_chars} characters")
        conn = s.conn
        assert conn is not None, "handlers run on a live connection"
        after: list[bytes] = []  # replies to this connection's later requests (``Link.send``)
        hub = self.hub

        def done(result: AppendResult) -> None:
            try:
                if isinstance(result, ProtocolError):
                    hub.refuse(s, result, m.get("id"))
                else:
                    stored, dup = result
                    s.reply(stored.ack(dup), m)
                    if not dup:
                        self.counters.messages_stored += 1
                        hub.publish_conversation(conv, members, encode(stored.to_wire()), s.id)
                        for hook in self.on_message:
                            hook(stored, members)
            except Exception:
                hub.failed(s, m.get("id"), "chat completion failed")
            conn.settle(after)

        self.store.append_nowait(
            NewMessage(
                conv,
                m["cid"],
                s.identity,
                s.name,
                kind,
                text,
                m.get("ref"),
                members,
                moderator,
                self.edit_window_ms,
            ),
            done,
        )
        conn.tail = after  # after the hand-off (which may refuse): ``done`` runs on a later turn

    def on_send(self, s: Session, m: dict[str, Any]) -> None:
        self._append(s, m, "text")

    def on_edit(self, s: Session, m: dict[str, Any]) -> None:
        self._append(s, m, "edit")

    def on_delete(self, s: Session, m: dict[str, Any]) -> None:
        self._append(s, m, "delete")

    async def post(
        self, conv: str, members: tuple[str, ...], msg: NewMessage
    ) -> tuple[StoredMessage, bool]:
        """Store ``msg`` (from the app's backend) and deliver it like any chat message."""
        stored, dup = await self.store.append(msg)
        if not dup:
            self.counters.messages_stored += 1
            self.hub.publish_conversation(conv, members, encode(stored.to_wire()), "")
        return stored, dup

    # -- the rest --------------------------------------------------------------------------------

    async def on_read(self, s: Session, m: dict[str, Any]) -> None:
        conv: str = m["conversation"]
        members, _ = self._conversation(s, conv, joined=False)
        seq = await self.store.mark_read(conv, s.identity, m["seq"])
        if seq is not None:
            hub = self.hub
            frame = encode(
                {"type": "receipt", "conversation": conv, "identity": s.identity, "seq": seq}
            )
            if members:
                hub.publish_conversation(conv, members, frame, s.id)
            else:
                hub.bus.publish(conv, frame, s.id)
                for other in hub.sessions_of(s.identity):  # own devices not in the room
                    if other is not s and conv[5:] not in other.rooms:
                        other.deliver(frame)
        s.ok(m)

    async def on_typing(self, s: Session, m: dict[str, Any]) -> None:
        conv: str = m["conversation"]
        members, _ = self._conversation(s, conv, joined=True)
        self.hub.publish_conversation(
            conv,
            members,
            encode(
                {
                    "type": "typing",
                    "conversation": conv,
                    "identity": s.identity,
                    "name": s.name,
                    "active": m["active"],
                }
            ),
            s.id,
        )
        s.ok(m)

    async def on_history(self, s: Session, m: dict[str, Any]) -> None:
        conv: str = m["conversation"]
        self._conversation(s, conv, joined=False)
        if "before" in m and "after" in m:
            raise ProtocolError("bad_field", "give `before` or `after`, not both")
        budget = self.max_reply_bytes
        page = await self.store.page(
            conv,
            before=m.get("before"),
            after=m.get("after"),
            limit=m.get("limit", self.hub.cfg.chat.history_page_default),
            max_bytes=budget - REPLY_ENVELOPE,
        )
        msg: dict[str, Any] = {
            "type": "history",
            "conversation": conv,
            "messages": [x.to_wire() for x in page.messages],
            "more": page.more,
            "last_seq": page.last_seq,
        }
        if "id" in m:
            msg["re"] = m["id"]
        frame = encode(msg)
        messages = msg["messages"]
        while len(frame) > budget and len(messages) > 1:  # JSON escaping made it longer
            # Keep the page contiguous from where it starts: scrolling back (no `after`) it
            # starts at its newest message, so the oldest go; going forward, the newest.
            del messages[0 if "after" not in m else -1]
            msg["more"] = True
            frame = encode(msg)
        s.send_frame(frame)

    async def on_sync(self, s: Session, m: dict[str, Any]) -> None:
        """Pages of every conversation asked for, in the order asked, within the reply's byte
        budget: a conversation whose page was cut says `more`; conversations the budget did not
        reach are left out, and `synced.more` says so (sync them again)."""
        since: dict[str, int] = m["since"]
        for conv in since:
            self._conversation(s, conv, joined=False)
        limit = m.get("limit", 100)
        budget = self.max_reply_bytes - REPLY_ENVELOPE
        used = 0
        pages: list[dict[str, Any]] = []
        complete = True
        for conv, seq in since.items():
            room = budget - used
            if pages and room < SYNC_PAGE_MIN:
                complete = False
                break
            reads = await self.store.read_marks(conv)
            if len(reads) > MAX_READS_IN_SYNC:  # the furthest readers
                top = sorted(reads.items(), key=lambda kv: -kv[1])[:MAX_READS_IN_SYNC]
                reads = dict(top)
            reads_size = len(orjson.dumps(reads))
            page = await self.store.page(
                conv, before=None, after=seq, limit=limit, max_bytes=max(room - reads_size, 1)
            )
            entry: dict[str, Any] = {
                "conversation": conv,
                "messages": [x.to_wire() for x in page.messages],
                "more": page.more,
                "last_seq": page.last_seq,
                "reads": reads,
            }
            size = len(orjson.dumps(entry)) + 1
            while size > room and len(entry["messages"]) > 1:  # JSON escaping made it longer
                entry["messages"].pop()
                entry["more"] = True
                size = len(orjson.dumps(entry)) + 1
            if size > room and pages:
                complete = False
                break
            pages.append(entry)
            used += size
        reply: dict[str, Any] = {
            "type": "synced",
            "conversations": pages,
            "epoch": self.store.epoch,
        }
        if not complete:
            reply["more"] = True
        s.reply(reply, m)

    async def on_conversations(self, s: Session, m: dict[str, Any]) -> None:
        items = [
            {"conversation": c, "last_seq": last, "read_seq": read}
            for c, last, read in await self.store.conversations_of(s.identity)
        ]
        for name in sorted(s.rooms):
            conv = f"room:{name}"
            items.append(
                {
                    "conversation": conv,
                    "last_seq": await self.store.last_seq(conv),
                    "read_seq": await self.store.read_seq(conv, s.identity),
                }
            )
        s.reply({"type": "conversations", "items": items}, m)
