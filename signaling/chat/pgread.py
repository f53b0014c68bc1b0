"""The PostgreSQL store's reads (``signaling.chat.postgres``): each a coroutine taking a
connection in a read-only snapshot, the same queries and the same visibility rules as
``SqliteStore``'s reader (a group member's windows, messages withheld from a blocker)."""

from __future__ import annotations

from typing import Any, Final

import asyncpg

from ..core.directory import DeviceInfo
from ..core.privacy import Relation, contacts_list
from ..wire.errors import ProtocolError
from .codec import COLUMNS
from .groups import GroupState
from .store import ConversationRow, Page, StoredMessage, fill_page

SEL: Final = f"SELECT {COLUMNS} FROM messages"
IS_CONTACT: Final = "SELECT 1 FROM contacts WHERE identity=$1 AND contact=$2"


def row(r: Any) -> StoredMessage:
    return StoredMessage(*r)


async def last_seq(conn: asyncpg.Connection, conversation: str) -> int:
    r = await conn.fetchval("SELECT last_seq FROM conversations WHERE id=$1", conversation)
    return int(r) if r is not None else 0


async def member_windows(
    conn: asyncpg.Connection, conversation: str, identity: str
) -> list[tuple[int, int | None]]:
    rows = await conn.fetch(
        "SELECT joined_seq, left_seq FROM group_members "
        "WHERE conversation=$1 AND identity=$2 ORDER BY joined_seq",
        conversation,
        identity,
    )
    return [(int(a), None if b is None else int(b)) for a, b in rows]


async def visible(
    conn: asyncpg.Connection, conversation: str, viewer: str | None, last: int
) -> tuple[tuple[int | str, ...], int]:
    """``SqliteStore._visible``: the parameters of the condition (``_cond``) that keeps what
    ``viewer`` sees, and the last sequence it sees."""
    if viewer is None or conversation[0] == "r":
        return (), last
    if conversation[0] == "d":
        if last:
            r = await conn.fetchval(
                "SELECT seq FROM messages WHERE conversation=$1 AND seq<=$2 "
                "AND hidden_from IS DISTINCT FROM $3 ORDER BY seq DESC LIMIT 1",
                conversation,
                last,
                viewer,
            )
            last = int(r) if r is not None else 0
        return (viewer,), last
    spans = await member_windows(conn, conversation, viewer)
    if not spans:
        raise ProtocolError("bad_conversation", f"{conversation!r} is not a group of yours")
    params = tuple(x for lo, hi in spans for x in (lo, last if hi is None else hi))
    end = spans[-1][1]
    return params, last if end is None else min(last, end)


def condition(conversation: str, params: tuple[int | str, ...], n: int) -> str:
    """The SQL condition of ``_visible``'s ``params``, numbered from ``$n``."""
    if not params:
        return ""
    if conversation[0] == "d":
        return f" AND hidden_from IS DISTINCT FROM ${n}"
    between = (f"seq BETWEEN ${i} AND ${i + 1}" for i in range(n, n + len(params), 2))
    return " AND (" + " OR ".join(between) + ")"


async def page(
    conn: asyncpg.Connection,
    conversation: str,
    before: int | None,
    after: int | None,
    limit: int,
    max_bytes: int | None,
    viewer: str | None,
) -> Page:
    last = await last_seq(conn, conversation)
    params, last = await visible(conn, conversation, viewer, last)
    cond = condition(conversation, params, 4)
    if after is not None:
        q = f"{SEL} WHERE conversation=$1 AND seq>$2 {cond} ORDER BY seq LIMIT $3"
        rows = await conn.fetch(q, conversation, after, limit + 1, *params)
    else:
        b = last + 1 if before is None else min(before, last + 1)
        q = f"{SEL} WHERE conversation=$1 AND seq<$2 {cond} ORDER BY seq DESC LIMIT $3"
        rows = await conn.fetch(q, conversation, b, limit + 1, *params)
    msgs, more = fill_page(map(row, rows), limit, max_bytes)
    if after is None:
        msgs.reverse()
    return Page(msgs, more, last)


async def read_seq(conn: asyncpg.Connection, conversation: str, identity: str) -> int:
    r = await conn.fetchval(
        "SELECT seq FROM read_marks WHERE conversation=$1 AND identity=$2", conversation, identity
    )
    return int(r) if r is not None else 0


async def count_unread(
    conn: asyncpg.Connection,
    conversation: str,
    identity: str,
    read: int,
    last: int,
    params: tuple[int | str, ...],
) -> int:
    if read >= last:
        return 0
    cond = condition(conversation, params, 5)
    r = await conn.fetchval(
        "SELECT COUNT(*) FROM messages WHERE conversation=$1 AND seq>$2 AND seq<=$3 "
        f"AND sender<>$4 AND kind IN ('text', 'call') AND NOT deleted{cond}",
        conversation,
        read,
        last,
        identity,
        *params,
    )
    return int(r)


async def unread(
    conn: asyncpg.Connection, conversation: str, identity: str, upto: int | None
) -> int:
    last = await last_seq(conn, conversation)
    if upto is not None:
        last = min(last, upto)
    params, last = await visible(conn, conversation, identity, last)
    read = await read_seq(conn, conversation, identity)
    return await count_unread(conn, conversation, identity, read, last, params)


async def conversation_list(
    conn: asyncpg.Connection, identity: str, limit: int, after: tuple[int, str] | None
) -> tuple[list[ConversationRow], bool]:
    found: list[tuple[int, str, int, str | None]] = []
    for c, last, u, hidden in await conn.fetch(
        "SELECT c.id, c.last_seq, c.updated_at, (SELECT hidden_from FROM messages x "
        "WHERE x.conversation = c.id AND x.seq = c.last_seq) FROM members m "
        "JOIN conversations c ON c.id = m.conversation WHERE m.identity = $1",
        identity,
    ):
        if hidden == identity:  # its last messages are withheld from it
            r = await conn.fetchrow(
                "SELECT seq, ts FROM messages WHERE conversation=$1 "
                "AND hidden_from IS DISTINCT FROM $2 ORDER BY seq DESC LIMIT 1",
                c,
                identity,
            )
            if r is None:
                continue
            last, u = r
        found.append((int(u), str(c), int(last), None))
    latest: dict[str, tuple[int | None, str]] = {}
    for conv, left, role in await conn.fetch(
        "SELECT conversation, left_seq, role FROM group_members WHERE identity=$1 "
        "ORDER BY conversation, joined_seq",
        identity,
    ):
        latest[conv] = (left, role)
    for conv, (left, role) in latest.items():
        r = await conn.fetchrow("SELECT last_seq, updated_at FROM conversations WHERE id=$1", conv)
        assert r is not None  # a group's conversation is created with it
        if left is None:
            found.append((int(r[1]), conv, int(r[0]), role))
        else:
            t = await conn.fetchval(
                "SELECT ts FROM messages WHERE conversation=$1 AND seq=$2", conv, left
            )
            found.append((int(t), conv, int(left), None))
    found.sort(key=lambda x: (-x[0], x[1]))
    if after is not None:
        au, ac = after
        found = [x for x in found if x[0] < au or (x[0] == au and x[1] > ac)]
    more = len(found) > limit
    rows = [await row_of(conn, identity, conv, u, role) for u, conv, _, role in found[:limit]]
    return rows, more


async def group_name_at(conn: asyncpg.Connection, conversation: str, seq: int) -> str:
    name = await conn.fetchval(
        "SELECT meta::jsonb->>'name' FROM messages WHERE conversation=$1 AND kind='system' "
        "AND seq<=$2 AND meta::jsonb->>'action' IN ('created', 'renamed') "
        "ORDER BY seq DESC LIMIT 1",
        conversation,
        seq,
    )
    return "" if name is None else str(name)


async def row_of(
    conn: asyncpg.Connection, identity: str, conv: str, updated: int, role: str | None
) -> ConversationRow:
    last = await last_seq(conn, conv)
    params, last = await visible(conn, conv, identity, last)
    read = await read_seq(conn, conv, identity)
    muted = await conn.fetchval(
        "SELECT muted FROM conversation_settings WHERE identity=$1 AND conversation=$2",
        identity,
        conv,
    )
    item = ConversationRow(
        conv,
        last,
        updated,
        read,
        await count_unread(conn, conv, identity, read, last, params),
        bool(muted),
        role=role,
    )
    if conv[0] == "g":
        if role is None:  # a former member: the name it knew, not a later one
            item.name = await group_name_at(conn, conv, last)
        else:
            q = "SELECT name FROM groups WHERE conversation=$1"
            item.name = str(await conn.fetchval(q, conv))
    r = await conn.fetchrow(
        f"{SEL} WHERE conversation=$1 AND seq<=$2 "
        f"AND kind IN ('text', 'call', 'system') AND NOT deleted{condition(conv, params, 3)} "
        "ORDER BY seq DESC LIMIT 1",
        conv,
        last,
        *params,
    )
    if r is not None:
        msg = row(r)
        if msg.kind == "text":  # as last edited (within what the identity sees)
            e = await conn.fetchrow(
                "SELECT text FROM messages WHERE conversation=$1 AND kind='edit' AND ref=$2 "
                "AND seq<=$3 ORDER BY seq DESC LIMIT 1",
                conv,
                msg.seq,
                last,
            )
            if e is not None:
                msg.text = e[0]
        item.last_message = msg
    return item


async def load_groups(
    conn: asyncpg.Connection,
) -> tuple[dict[str, GroupState], dict[str, set[str]]]:
    groups = {
        str(c): GroupState(str(c), str(n), str(b))
        for c, n, b in await conn.fetch(
            "SELECT conversation, name, created_by FROM groups WHERE NOT deleted"
        )
    }
    for c, i, r in await conn.fetch(
        "SELECT conversation, identity, role FROM group_members WHERE left_seq IS NULL"
    ):
        g = groups.get(c)
        if g is not None:
            g.members[str(i)] = str(r)
    muted: dict[str, set[str]] = {}
    for i, c in await conn.fetch(
        "SELECT identity, conversation FROM conversation_settings WHERE muted"
    ):
        muted.setdefault(str(c), set()).add(str(i))
    return groups, muted


async def read_marks(conn: asyncpg.Connection, conversation: str) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT identity, seq FROM read_marks WHERE conversation=$1", conversation
    )
    return {str(i): int(s) for i, s in rows}


async def known_identities(conn: asyncpg.Connection, identities: list[str]) -> set[str]:
    rows = await conn.fetch(
        "SELECT identity FROM identities WHERE identity = ANY($1::text[])", identities
    )
    return {str(r[0]) for r in rows}


async def all_blocks(conn: asyncpg.Connection) -> list[tuple[str, str]]:
    return [(str(a), str(b)) for a, b in await conn.fetch("SELECT identity, blocked FROM blocks")]


async def contacts_among(conn: asyncpg.Connection, identity: str, others: list[str]) -> set[str]:
    rows = await conn.fetch(
        "SELECT contact FROM contacts WHERE identity=$1 AND contact = ANY($2::text[])",
        identity,
        others,
    )
    return {str(r[0]) for r in rows}


async def related(conn: asyncpg.Connection, identity: str, others: list[str]) -> set[str]:
    out = set()
    for o in others:
        if (
            await conn.fetchval(IS_CONTACT, identity, o) is not None
            or await conn.fetchval(
                "SELECT 1 FROM group_members m1 "
                "JOIN group_members m2 ON m2.conversation = m1.conversation "
                "JOIN groups g ON g.conversation = m1.conversation "
                "WHERE m1.identity=$1 AND m1.left_seq IS NULL AND m2.identity=$2 "
                "AND m2.left_seq IS NULL AND NOT g.deleted LIMIT 1",
                identity,
                o,
            )
            is not None
            or await both_wrote(conn, identity, o)
        ):
            out.add(o)
    return out


async def both_wrote(conn: asyncpg.Connection, a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` each have a text of their own in their direct conversation."""
    x, y = sorted((a, b))
    conv = f"dm:{x}|{y}"
    q = (
        "SELECT 1 FROM messages WHERE conversation=$1 AND sender=$2 AND kind='text' "
        "AND hidden_from IS NULL LIMIT 1"
    )
    for who in (a, b):
        if await conn.fetchval(q, conv, who) is None:
            return False
    return True


async def relations_of(conn: asyncpg.Connection, identity: str) -> list[Relation]:
    contacts = {
        str(r[0])
        for r in await conn.fetch("SELECT contact FROM contacts WHERE identity=$1", identity)
    }
    asked = {
        str(r[0])
        for r in await conn.fetch(
            "SELECT target FROM contact_requests WHERE requester=$1", identity
        )
    }
    incoming = {
        str(r[0]): bool(r[1])
        for r in await conn.fetch(
            "SELECT requester, dismissed FROM contact_requests WHERE target=$1", identity
        )
    }
    blocks = {
        str(r[0])
        for r in await conn.fetch("SELECT blocked FROM blocks WHERE identity=$1", identity)
    }
    return contacts_list(contacts, asked, incoming, blocks)


async def devices_of(conn: asyncpg.Connection, identity: str) -> list[DeviceInfo]:
    rows = await conn.fetch(
        "SELECT identity, device, name, first_seen, last_seen FROM devices "
        "WHERE identity=$1 ORDER BY last_seen DESC, device",
        identity,
    )
    return [DeviceInfo(str(a), str(b), str(c), int(d), int(e)) for a, b, c, d, e in rows]
