"""Chat: the handlers of `send`, `edit`, `delete`, `read`, `typing`, `history`, `sync`,
`conversations`, `conversation_mute` and the group requests, and posting on behalf of the app's
backend (the HTTP API).

Between a store write completing and the fan-out there is no ``await``, so every recipient sees
a conversation's messages in sequence order. That holds for group changes too: the store calls
``group_changed`` as it settles the change, before the results after it, so a message stored
after a removal never reaches the removed member.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any

import orjson

from ..core.feature import Feature
from ..core.hub import Hub
from ..core.session import Session
from ..wire.errors import ProtocolError
from ..wire.framing import encode, encode_fresh
from .groups import ChangeGroup, GroupState, group_id
from .messages import MESSAGES
from .store import (
    AppendResult,
    ChatStore,
    ConversationRow,
    GroupResult,
    NewMessage,
    StoredMessage,
)

#: Cluster mode: the bus topic on which a node tells the others that a group or a mute changed,
#: published before the change's events (one node's frames reach the others in order), so a
#: node knows of a group before its members there hear of it.
CACHE_TOPIC = "chat:cache"
CACHE_KEY = "chat"  # the sink's key on every node (and the publisher's exclude)

#: Bytes of a history or sync reply besides its pages (type, ids, epoch, punctuation).
REPLY_ENVELOPE = 512
#: A sync reply stops adding conversations when less than this is left of its budget.
SYNC_PAGE_MIN = 1024
#: Read marks per conversation in a sync page (the furthest readers).
MAX_READS_IN_SYNC = 200

#: Called after a message was stored and delivered (not for duplicates), with the identities
#: that receive it: a direct conversation's two members (its sender alone when the other blocks
#: it), a group's members, nobody for room chat.
MessageHook = Callable[[StoredMessage, tuple[str, ...]], None]
#: Page size of `conversations` without `limit`.
CONVERSATIONS_PAGE = 50
KINDS = {"d": "dm", "g": "group", "r": "room"}
ELEVATED = frozenset({"owner", "admin"})


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
        self.blocks = hub.blocks
        self.dm_strangers = hub.cfg.privacy.dm_strangers
        self.on_message: list[MessageHook] = []
        self.max_group_members = hub.cfg.chat.max_group_members
        # Every group that exists, with its current members (loaded at start, then kept by
        # ``group_changed``), and who muted which conversation: read on every group message.
        self.groups: dict[str, GroupState] = {}
        self.muted: dict[str, set[str]] = {}
        self._shared = False  # cluster mode: other nodes keep copies of both

    def share_cache(self) -> None:
        """Cluster mode (``signaling.app``): tell the other nodes of every group and mute
        change made here, and apply theirs to ``groups`` and ``muted``."""
        self._shared = True
        self.hub.bus.subscribe(CACHE_TOPIC, CACHE_KEY, _CacheSink(self))

    def _cache_changed(self, change: dict[str, Any]) -> None:
        if self._shared:
            self.hub.bus.publish(CACHE_TOPIC, orjson.dumps(change), CACHE_KEY)

    def apply_cache_change(self, frame: bytes) -> None:
        """Another node changed a group or a mute (``_cache_changed``)."""
        change = orjson.loads(frame)
        if "group" in change:
            g = change["group"]
            conv = g["conversation"]
            old = self.groups.get(conv)
            before = old.members.keys() if old is not None else set()
            members: dict[str, str] = g["members"]
            if g["deleted"]:
                self.groups.pop(conv, None)
            else:
                self.groups[conv] = GroupState(conv, g["name"], g["created_by"], members)
            joined = [i for i in members if i not in before]
            gone = [i for i in before if i not in members]
            if joined or gone:
                self.hub.recheck_groups(joined, gone, members)
        elif "mute" in change:
            conv, identity = change["mute"], change["identity"]
            if change["muted"]:
                self.muted.setdefault(conv, set()).add(identity)
            else:
                who = self.muted.get(conv)
                if who is not None:
                    who.discard(identity)
                    if not who:
                        del self.muted[conv]

    async def start(self) -> None:
        """Load the groups and mutes (after the store opened)."""
        groups, muted = await self.store.load_groups()
        self.groups.update(groups)
        self.muted.update(muted)
        self.store.on_group = self.group_changed

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
                "conversation_mute": self.on_mute,
                "group_create": self.on_group_create,
                "group_rename": self.on_group_rename,
                "group_add": self.on_group_add,
                "group_remove": self.on_group_remove,
                "group_leave": self.on_group_leave,
                "group_role": self.on_group_role,
                "group_delete": self.on_group_delete,
                "group_info": self.on_group_info,
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
        needs the identity to be one of its two members. A group needs it to be a member (its
        owner and admins moderate); for reads (not ``joined``) a former member passes with no
        members, and the store lets it read up to its removal (``viewer``).
        """
        kind, _, rest = conv.partition(":")
        if kind == "group":
            g = self.groups.get(conv)
            role = None if g is None else g.members.get(session.identity)
            if role is None:
                if joined:
                    raise ProtocolError("bad_conversation", f"{conv!r} is not a group of yours")
                # A former member still reads what it saw: the store checks its windows.
                return (), False
            assert g is not None
            return tuple(g.members), role in ELEVATED
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

    def _withheld(self, s: Session, members: tuple[str, ...], writes: bool) -> str | None:
        """For a direct conversation: the other member if it blocks the sender (what the
        sender writes is then stored for the sender alone, so it cannot tell from someone
        who never reads); ``blocked`` if the sender blocks the other and ``writes``."""
        blocks = self.blocks
        if not blocks:  # no block on the server: the common case, two lookups saved
            return None
        a, b = members
        other = b if a == s.identity else a
        if writes and blocks.blocked(s.identity, other):
            raise ProtocolError("blocked", f"you block {other!r}: unblock it to write to it")
        return other if blocks.blocked(other, s.identity) else None

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
        direct = conv[0] == "d"
        hidden = self._withheld(s, members, kind == "text") if direct else None
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
                        # A group's members as the message finds them (the changes before it
                        # are applied by now), not as they were when it was sent.
                        to = members if conv[0] != "g" else self.group_members(conv) or ()
                        if stored.hidden_from is not None:  # the sender's devices alone
                            to = (stored.sender,)
                        frame = encode_fresh(stored.to_wire())
                        hub.publish_conversation(conv, to, frame, s.id, stored.seq)
                        for hook in self.on_message:
                            hook(stored, to)
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
                members if conv[0] == "d" else (),
                moderator,
                self.edit_window_ms,
                None,
                hidden,
                direct and kind == "text" and not self.dm_strangers,
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

    def group_members(self, conv: str) -> tuple[str, ...] | None:
        """A group's current members, or None if there is no such group."""
        g = self.groups.get(conv)
        return None if g is None else tuple(g.members)

    async def post(
        self, conv: str, members: tuple[str, ...], msg: NewMessage
    ) -> tuple[StoredMessage, bool]:
        """Store ``msg`` (from the app's backend) and deliver it like any chat message (to a
        group's members as they are when it is stored)."""
        stored, dup = await self.store.append(msg)
        if not dup:
            self.counters.messages_stored += 1
            if conv[0] == "g":
                members = self.group_members(conv) or ()
            frame = encode_fresh(stored.to_wire())
            self.hub.publish_conversation(conv, members, frame, "", stored.seq)
        return stored, dup

    # -- the rest --------------------------------------------------------------------------------

    async def on_read(self, s: Session, m: dict[str, Any]) -> None:
        """Others get `receipt`; the identity's other devices get it with the unread count
        left, so every device shows the same count."""
        conv: str = m["conversation"]
        me = s.identity
        members, _ = self._conversation(s, conv, joined=False)
        seq = await self.store.mark_read(conv, me, m["seq"])
        if seq is not None:
            hub = self.hub
            receipt = {"type": "receipt", "conversation": conv, "identity": me, "seq": seq}
            frame = encode(receipt)
            if members:
                for identity in members:
                    if identity != me:
                        hub.bus.publish(f"user:{identity}", frame)
            elif conv[0] == "r":
                hub.bus.publish(conv, frame, s.id)
            mine = [x for x in hub.sessions_of(me) if x is not s]
            nodes = await hub.shared.nodes_of(me) if hub.shared is not None else ()
            if mine or nodes:
                receipt["unread"] = await self.store.unread(conv, me)
                own = encode(receipt)
                # Every other device, those in the room too: they had the plain receipt from
                # the room, and this one, after it, brings the count (PROTOCOL.md "Read
                # receipts": every device shows the same badge).
                for other in mine:
                    other.deliver(own)
                if nodes:  # one's devices on other nodes: the same, through their nodes
                    req = orjson.dumps({"op": "devices", "identity": me, "message": receipt})
                    for node in nodes:
                        hub.bus.publish(f"node:{node}", req)
        s.ok(m)

    async def on_typing(self, s: Session, m: dict[str, Any]) -> None:
        conv: str = m["conversation"]
        members, _ = self._conversation(s, conv, joined=True)
        if conv[0] == "d":  # as a text would go: refused, withheld, or to both
            hidden = self._withheld(s, members, True)
            if not self.dm_strangers:
                other = members[0] if members[1] == s.identity else members[1]
                if not await self.hub.relations.contacts_among(s.identity, [other]):
                    raise ProtocolError(
                        "not_contact", "direct messages on this server are between contacts only"
                    )
            if hidden is not None:
                members = (s.identity,)
        self.hub.publish_conversation(
            conv,
            members,
            encode_fresh(
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
            viewer=s.identity,
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
                conv,
                before=None,
                after=seq,
                limit=limit,
                max_bytes=max(room - reads_size, 1),
                viewer=s.identity,
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
        after = _cursor_position(m["cursor"]) if "cursor" in m else None
        rows, more = await self.store.conversation_list(
            s.identity, m.get("limit", CONVERSATIONS_PAGE), after
        )
        reply: dict[str, Any] = {
            "type": "conversations",
            "items": [_conversation_item(r) for r in rows],
            "more": more,
        }
        if more and rows:
            reply["cursor"] = _cursor(rows[-1])
        s.reply(reply, m)

    async def on_mute(self, s: Session, m: dict[str, Any]) -> None:
        conv: str = m["conversation"]
        muted: bool = m["muted"]
        self._conversation(s, conv, joined=conv[0] == "g")  # a group: members only
        await self.store.set_mute(s.identity, conv, muted)
        who = self.muted.setdefault(conv, set())
        if muted:
            who.add(s.identity)
        else:
            who.discard(s.identity)
            if not who:
                del self.muted[conv]
        self._cache_changed({"mute": conv, "identity": s.identity, "muted": muted})
        self.hub.bus.publish(
            f"user:{s.identity}",
            encode({"type": "conversation_muted", "conversation": conv, "muted": muted}),
            s.id,
        )
        s.ok(m)

    # -- groups ----------------------------------------------------------------------------------

    def group_changed(self, result: GroupResult) -> None:
        """A group change was stored (called as the store settles it, in order): keep the
        cache, and deliver the event to every device of the members and of those it took
        out."""
        state = result.state
        conv = state.conversation
        self._cache_changed(
            {
                "group": {
                    "conversation": conv,
                    "name": state.name,
                    "created_by": state.created_by,
                    "members": state.members,
                    "deleted": state.deleted,
                }
            }
        )
        old = self.groups.get(conv)
        if state.deleted:
            self.groups.pop(conv, None)
        else:
            self.groups[conv] = state
        before = old.members.keys() if old is not None else set()
        joined = [i for i in state.members if i not in before]
        if joined or result.gone:  # a shared group lets members watch each other's presence
            self.hub.recheck_groups(joined, result.gone, state.members)
        frame = encode(result.event.to_wire())
        publish = self.hub.bus.publish
        order = (conv, result.event.seq)
        for identity in (*state.members, *result.gone):
            publish(f"user:{identity}", frame, None, order)
        self.counters.messages_stored += 1

    async def change_group(
        self,
        conv: str,
        action: str,
        actor: str,
        actor_name: str,
        cid: str,
        identities: list[str] | tuple[str, ...] = (),
        *,
        role: str | None = None,
        name: str | None = None,
    ) -> GroupResult:
        """Ask the store to make a group change (by an identity, or ``API_ACTOR``)."""
        return await self.store.change_group(
            ChangeGroup(
                conv,
                action,
                actor,
                actor_name,
                cid,
                list(identities),
                role,
                name,
                self.max_group_members,
            )
        )

    async def _group_request(
        self,
        s: Session,
        m: dict[str, Any],
        action: str,
        identities: list[str] | tuple[str, ...] = (),
        **kw: str | None,
    ) -> None:
        conv = m["conversation"] if action != "created" else group_id(s.identity, m["cid"])
        result = await self.change_group(
            conv, action, s.identity, s.name, m["cid"], identities, **kw
        )
        reply = _group_wire(result.state)
        if result.duplicate and s.identity not in result.state.members:
            # A former member retrying: the group as it knew it, not what came after it left.
            reply["name"] = await self.store.group_name_at(conv, result.event.seq)
            reply["members"] = []
        reply["message"] = result.event.to_wire()
        reply["duplicate"] = result.duplicate
        s.reply(reply, m)

    def _addable(self, s: Session, identities: list[str]) -> list[str]:
        """Those of ``identities`` that ``s`` may add to a group: not those who block it."""
        blocks = self.hub.blocks
        if not blocks:
            return identities
        return [i for i in identities if not blocks.blocked(i, s.identity)]

    async def on_group_create(self, s: Session, m: dict[str, Any]) -> None:
        if not s.claims.groups:
            raise ProtocolError("forbidden", "the token does not allow creating groups")
        members = self._addable(s, m["identities"])
        await self._group_request(s, m, "created", members, name=m["name"])

    async def on_group_rename(self, s: Session, m: dict[str, Any]) -> None:
        await self._group_request(s, m, "renamed", name=m["name"])

    async def on_group_add(self, s: Session, m: dict[str, Any]) -> None:
        await self._group_request(s, m, "added", self._addable(s, m["identities"]))

    async def on_group_remove(self, s: Session, m: dict[str, Any]) -> None:
        await self._group_request(s, m, "removed", m["identities"])

    async def on_group_leave(self, s: Session, m: dict[str, Any]) -> None:
        await self._group_request(s, m, "left")

    async def on_group_role(self, s: Session, m: dict[str, Any]) -> None:
        await self._group_request(s, m, "role", (m["identity"],), role=m["role"])

    async def on_group_delete(self, s: Session, m: dict[str, Any]) -> None:
        await self._group_request(s, m, "deleted")

    async def on_group_info(self, s: Session, m: dict[str, Any]) -> None:
        conv: str = m["conversation"]
        g = self.groups.get(conv)
        if g is None or s.identity not in g.members:
            raise ProtocolError("bad_conversation", f"{conv!r} is not a group of yours")
        s.reply(_group_wire(g), m)


def _group_wire(g: GroupState) -> dict[str, Any]:
    out = g.to_wire()
    out["type"] = "group"
    return out


def _conversation_item(r: ConversationRow) -> dict[str, Any]:
    item: dict[str, Any] = {
        "conversation": r.conversation,
        "kind": KINDS[r.conversation[0]],
        "last_seq": r.last_seq,
        "read_seq": r.read_seq,
        "unread": r.unread,
        "muted": r.muted,
        "updated_at": r.updated_at,
    }
    if r.name is not None:
        item["name"] = r.name
    if r.role is not None:
        item["role"] = r.role
    if r.last_message is not None:
        item["last_message"] = r.last_message.to_wire()
    return item


def _cursor(r: ConversationRow) -> str:
    raw = orjson.dumps([r.updated_at, r.conversation])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _cursor_position(cursor: str) -> tuple[int, str]:
    """The position a `cursor` names; ``bad_field`` for anything this server did not make."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        updated, conv = orjson.loads(raw)
    except (binascii.Error, ValueError, TypeError):
        raise ProtocolError("bad_field", "`cursor` is not one this server gave") from None
    if type(updated) is not int or type(conv) is not str:
        raise ProtocolError("bad_field", "`cursor` is not one this server gave")
    return updated, conv


class _CacheSink:
    """The bus sink of ``CACHE_TOPIC``: another node's group and mute changes."""

    __slots__ = ("chat",)

    def __init__(self, chat: Chat) -> None:
        self.chat = chat

    def deliver(self, frame: bytes) -> None:
        self.chat.apply_cache_change(frame)
