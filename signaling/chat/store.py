"""The chat store interface and the values it deals in.

``ChatStore`` is what chat needs from durable storage; ``signaling.chat.sqlite`` fills it with
SQLite (and, in the same file, the core's ``DeviceDirectory``), and a PostgreSQL implementation
can fill both later. The rules that decide whether an edit or delete is allowed live here as a
pure function so every store applies them the same way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import orjson

from ..wire.errors import ProtocolError
from .groups import ChangeGroup, GroupState


# StoredMessage and NewMessage are made once per chat message: not frozen, because a frozen
# dataclass sets each field through object.__setattr__ (2.8 us instead of 0.6 us for 11 fields).
# Treat them as immutable all the same.
@dataclass(slots=True)
class StoredMessage:
    """One event in a conversation's sequence."""

    conversation: str
    seq: int
    mid: int
    cid: str
    sender: str
    name: str
    kind: str  # text | edit | delete | system | call
    text: str | None
    ref: int | None
    ts: int  # ms since the Unix epoch
    # JSON: for kind "call" the call log (wire field `call`), for a group change (kind
    # "system") what changed (wire field `group`).
    meta: str | None = None
    # The member of a direct conversation it is withheld from (its sender is blocked there):
    # never on the wire, never delivered or read back to that member.
    hidden_from: str | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": "message",
            "conversation": self.conversation,
            "seq": self.seq,
            "mid": self.mid,
            "cid": self.cid,
            "from": self.sender,
            "name": self.name,
            "kind": self.kind,
            "ts": self.ts,
        }
        if self.text is not None:
            out["text"] = self.text
        if self.ref is not None:
            out["ref"] = self.ref
        if self.meta is not None:  # a call log, or a group change (system messages)
            out["call" if self.kind == "call" else "group"] = orjson.loads(self.meta)
        return out

    def ack(self, duplicate: bool) -> dict[str, Any]:
        return {
            "type": "sent",
            "conversation": self.conversation,
            "cid": self.cid,
            "mid": self.mid,
            "seq": self.seq,
            "ts": self.ts,
            "duplicate": duplicate,
        }


@dataclass(slots=True)
class NewMessage:
    """A message to append. ``members`` lists a direct conversation's two identities;
    ``hidden_from`` names the one it is withheld from (it blocks the sender), and
    ``contact_required`` refuses a text to a member that is not the sender's contact
    (``not_contact``; ``privacy.dm_strangers`` off)."""

    conversation: str
    cid: str
    sender: str
    name: str
    kind: str
    text: str | None
    ref: int | None = None
    members: tuple[str, ...] = ()
    moderator: bool = False
    edit_window_ms: int = 0
    meta: str | None = None  # JSON stored with the message (call logs)
    hidden_from: str | None = None
    contact_required: bool = False


# What ``ChatStore.append_nowait`` hands its callback: the stored message and whether it was a
# duplicate, or the refusal.
AppendResult = tuple[StoredMessage, bool] | ProtocolError
AppendDone = Callable[[AppendResult], None]


#: Bytes a `message` takes on the wire besides its strings (field names, numbers, punctuation).
MESSAGE_OVERHEAD = 160


def wire_size(m: StoredMessage) -> int:
    """About how many bytes ``m`` takes as a `message` on the wire (its strings as UTF-8;
    JSON escaping can add to that, so a reply's final size is checked once encoded)."""
    n = MESSAGE_OVERHEAD + len(m.conversation) + len(m.cid) + len(m.sender) + len(m.name)
    if m.text is not None:
        n += len(m.text.encode())
    if m.meta is not None:
        n += len(m.meta)
    return n


def fill_page(
    rows: Iterable[StoredMessage], limit: int, max_bytes: int | None
) -> tuple[list[StoredMessage], bool]:
    """Take messages from ``rows`` (read lazily, in the page's order) until ``limit`` of them
    or ``max_bytes`` of them on the wire (``wire_size``; always at least one); and whether more
    were left. A page never holds more than its byte budget, and at most one row more is read."""
    msgs: list[StoredMessage] = []
    size = 0
    for m in rows:
        if len(msgs) == limit:
            return msgs, True
        if max_bytes is not None:
            size += wire_size(m)
            if size > max_bytes and msgs:
                return msgs, True
        msgs.append(m)
    return msgs, False


@dataclass(slots=True, frozen=True)
class GroupResult:
    """What a group change did: its event (``duplicate``: a retry, nothing changed), the group
    now, and the identities it took out (their window closed at the event)."""

    event: StoredMessage
    duplicate: bool
    state: GroupState
    gone: tuple[str, ...]


@dataclass(slots=True, frozen=True)
class Original:
    """What the edit/delete rule needs to know about the referenced message."""

    sender: str
    kind: str
    ts: int
    deleted: bool


def check_amend(msg: NewMessage, original: Original | None, now_ms: int) -> None:
    """Whether ``msg`` (an edit or delete) may amend ``original``; raises ``ProtocolError``."""
    if original is None or original.kind not in ("text", "system"):
        raise ProtocolError("no_such_message", f"no message {msg.ref} in {msg.conversation}")
    if original.deleted:
        raise ProtocolError("already_deleted", f"message {msg.ref} was deleted")
    if original.sender != msg.sender and not msg.moderator:
        raise ProtocolError("not_author", "only the author or a moderator may change a message")
    moderator_delete = msg.moderator and msg.kind == "delete"
    if not moderator_delete and now_ms - original.ts > msg.edit_window_ms:
        raise ProtocolError(
            "edit_window_passed",
            f"messages can be changed for {msg.edit_window_ms // 1000} s after sending",
        )


@dataclass(slots=True, frozen=True)
class Page:
    messages: list[StoredMessage]
    more: bool
    last_seq: int


@dataclass(slots=True)
class ConversationRow:
    """A conversation in an identity's list (``ChatStore.conversation_list``)."""

    conversation: str
    last_seq: int  # the last sequence the identity sees (a former member: its removal)
    updated_at: int  # ms: the time of that message (the list's order)
    read_seq: int
    unread: int
    muted: bool
    name: str | None = None  # a group's name
    role: str | None = None  # the identity's role in a group it is a member of
    last_message: StoredMessage | None = None


#: The kinds of message that count as unread and show as a conversation's last message
#: (edits and deletes change earlier ones; group changes are system messages).
UNREAD_KINDS: Final = ("text", "call")


class ChatStore(Protocol):
    """Durable conversations: append with gap-free sequence numbers, read, and read marks.
    (It is also the core's ``ConversationIndex``: ``epoch`` and ``last_seq``.)"""

    epoch: str
    #: Called with every group change stored (not retries), as the store settles it: before
    #: the results of the writes that came after it.
    on_group: Callable[[GroupResult], None] | None

    async def open(self) -> None: ...

    async def close(self) -> None:
        """Flush everything accepted so far and release the store."""

    def append(self, msg: NewMessage) -> Awaitable[tuple[StoredMessage, bool]]:
        """Store ``msg`` durably; resolves to it with its sequence and whether it was a
        duplicate (same conversation, sender and cid as an earlier message, which is returned
        instead). Raises ``ProtocolError`` for a refused edit or delete; nothing is stored then.
        Raises ``ProtocolError`` ``store_full`` at once (not from the awaitable) while the store
        cannot take writes. A plain function returning an awaitable: it runs once per chat
        message."""
        ...

    def append_nowait(self, msg: NewMessage, done: AppendDone) -> None:
        """``append`` for the chat hot path: ``done`` is called on the event loop with the
        result or the ``ProtocolError``, in the order the appends were made, with no future
        and no task switch per message. ``done`` must not raise. A write the store cannot take
        now (``store_full``) raises ``ProtocolError`` here instead, and ``done`` is not called."""
        ...

    async def mark_read(self, conversation: str, identity: str, seq: int) -> int | None:
        """Raise ``identity``'s read watermark to ``seq`` (clamped to the last sequence);
        returns the new watermark, or None if it did not move."""
        ...

    async def page(
        self,
        conversation: str,
        *,
        before: int | None,
        after: int | None,
        limit: int,
        max_bytes: int | None = None,
        viewer: str | None = None,
    ) -> Page:
        """Messages with seq < before (the newest such), or seq > after (the oldest such);
        with ``max_bytes``, no more than fit in that many bytes on the wire (``wire_size``; at
        least one), read no further than that, and ``more`` set if any were left out. With
        ``viewer``, as that identity sees the conversation: only what it may see of a group
        (its membership windows), without the messages withheld from it, ``last_seq`` the last
        it sees; and ``bad_conversation`` for a group it never belonged to."""
        ...

    async def last_seq(self, conversation: str) -> int: ...

    async def conversation_list(
        self, identity: str, limit: int, after: tuple[int, str] | None = None
    ) -> tuple[list[ConversationRow], bool]:
        """``identity``'s direct conversations, groups (current and former) and the rooms it
        chatted or read in, newest first, at most ``limit`` after ``after`` (the
        ``(updated_at, conversation)`` of the previous page's last); and whether more follow."""
        ...

    async def unread(self, conversation: str, identity: str, upto: int | None = None) -> int:
        """How many messages of others (``UNREAD_KINDS``, not deleted) ``identity`` has not
        read in ``conversation`` (up to sequence ``upto``)."""
        ...

    def change_group(self, req: ChangeGroup) -> Awaitable[GroupResult]:
        """Apply a group change and append its event in one transaction; ``ProtocolError``
        (nothing written) when the rules refuse it."""
        ...

    async def set_mute(self, identity: str, conversation: str, muted: bool) -> None: ...

    async def load_groups(self) -> tuple[dict[str, GroupState], dict[str, set[str]]]:
        """Every group not deleted with its current members, and the muted conversations
        (conversation -> identities)."""
        ...

    async def read_seq(self, conversation: str, identity: str) -> int: ...

    async def group_name_at(self, conversation: str, seq: int) -> str:
        """A group's name as of its event ``seq`` (its latest `created` or `renamed` event up
        to there): what a former member may know of it."""
        ...

    async def read_marks(self, conversation: str) -> dict[str, int]:
        """Every identity's read watermark in ``conversation``."""
        ...
