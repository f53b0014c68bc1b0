"""The PostgreSQL store's writes (``signaling.chat.postgres``): one ``Transaction`` carries
out a batch of requests in order, with the rules of ``SqliteStore``'s writer (the pure ones
shared: ``store.check_amend``, ``groups.plan``, ``privacy.plan``).

A run of plain appends (texts and call logs) takes a few array statements whatever its
length; everything else goes one request at a time. A conversation's row is locked
(``FOR UPDATE``, in id order) before its next sequence is taken and until the commit: gap-free
sequences with any number of servers writing. Requests raise ``ProtocolError`` only before
they write anything, so a refusal needs no savepoint."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Final, TypeGuard

import asyncpg
import orjson

from ..core.privacy import Pair, Side
from ..core.privacy import plan as relation_plan
from ..wire.errors import ProtocolError
from .codec import ChangeRelation, MarkRead, RegisterIdentity, SetMute, TouchDevice, WriterRequest
from .groups import ChangeGroup, GroupState
from .groups import plan as group_plan
from .pgread import IS_CONTACT, SEL, row
from .store import GroupResult, NewMessage, Original, StoredMessage, check_amend

INSERT_MESSAGE: Final = (
    "INSERT INTO messages "
    "(conversation, seq, sender, name, cid, kind, text, ref, ts, meta, hidden_from) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING mid"
)
INSERT_MESSAGES: Final = (
    "INSERT INTO messages "
    "(conversation, seq, sender, name, cid, kind, text, ref, ts, meta, hidden_from) "
    "SELECT c, s, f, n, i, k, t, r, $8, m, h FROM unnest($1::text[], $2::bigint[], $3::text[], "
    "$4::text[], $5::text[], $6::text[], $7::text[], $9::text[], $10::text[], $11::bigint[]) "
    "AS u(c, s, f, n, i, k, t, m, h, r) RETURNING conversation, seq, mid"
)
# A batch of plain appends as one statement, so one round trip and its own transaction: each
# conversation's row is locked and moved on by its count of messages, and the messages take
# the numbers in between, in batch order. A duplicate makes it fail (the unique index on
# cids) with nothing written; a conversation that does not exist leaves its messages out.
APPEND_RUN: Final = """
WITH u AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
        $6::text[], $7::text[], $8::text[], $9::bigint[])
        WITH ORDINALITY AS u(c, f, n, i, k, t, m, h, r, o)
), counts AS (
    SELECT c, count(*) AS n FROM u GROUP BY c
), moved AS (
    UPDATE conversations x SET last_seq = x.last_seq + counts.n, updated_at = $10
    FROM counts WHERE x.id = counts.c
    RETURNING x.id, x.last_seq - counts.n AS base
)
INSERT INTO messages (conversation, seq, sender, name, cid, kind, text, ref, ts, meta, hidden_from)
SELECT u.c, moved.base + row_number() OVER (PARTITION BY u.c ORDER BY u.o), u.f, u.n, u.i, u.k,
    u.t, u.r, $10, u.m, u.h
FROM u JOIN moved ON moved.id = u.c
ORDER BY u.o
RETURNING conversation, sender, cid, seq, mid
"""
IS_MEMBER: Final = (
    "SELECT 1 FROM group_members WHERE conversation=$1 AND identity=$2 AND left_seq IS NULL"
)


def plain(req: WriterRequest) -> TypeGuard[NewMessage]:
    """Whether ``req`` is an append that goes in a run (``Transaction.appends``)."""
    return type(req) is NewMessage and (req.kind == "text" or req.kind == "call")


def one_statement(
    batch: list[WriterRequest], known: set[str], chatters: set[tuple[str, str]]
) -> bool:
    """Whether ``batch`` can go as one statement (``append_run``): plain appends with nothing
    to check (no group membership, no contact rule, no duplicate within the batch) to
    conversations that exist and rooms the sender is known to have chatted in."""
    keys = set()
    for req in batch:
        if not plain(req) or req.contact_required:
            return False
        c = req.conversation
        if c not in known or (c[0] == "g" and req.kind == "text"):
            return False
        if c[0] == "r" and (req.sender, c) not in chatters:
            return False
        key = (c, req.sender, req.cid)
        if key in keys:
            return False
        keys.add(key)
    return True


async def append_run(
    conn: asyncpg.Connection, run: list[NewMessage]
) -> list[tuple[StoredMessage, bool] | None]:
    """Append ``run`` (``one_statement``) in one statement, committed when it returns: each
    message stored, or None when its conversation was not there (nothing written for it).
    Raises ``asyncpg.UniqueViolationError``, with nothing written, when one is a duplicate."""
    now = int(time.time() * 1000)
    rows = await conn.fetch(
        APPEND_RUN,
        [m.conversation for m in run],
        [m.sender for m in run],
        [m.name for m in run],
        [m.cid for m in run],
        [m.kind for m in run],
        [m.text for m in run],
        [m.meta for m in run],
        [m.hidden_from for m in run],
        [m.ref for m in run],
        now,
    )
    got = {(r[0], r[1], r[2]): (int(r[3]), int(r[4])) for r in rows}
    out: list[tuple[StoredMessage, bool] | None] = []
    for m in run:
        x = got.get((m.conversation, m.sender, m.cid))
        if x is None:
            out.append(None)
        else:
            s = StoredMessage(
                m.conversation, x[0], x[1], m.cid, m.sender, m.name, m.kind, m.text, m.ref,
                now, m.meta, m.hidden_from,
            )  # fmt: skip
            out.append((s, False))
    return out


def _other(m: NewMessage) -> str:
    """The member of a direct conversation who is not its sender."""
    a, b = m.members
    return b if m.sender == a else a


class Transaction:
    """One write transaction: the requests of a batch, in order, on the writer's connection."""

    def __init__(
        self, conn: asyncpg.Connection, known: set[str], chatters: set[tuple[str, str]]
    ) -> None:
        self.conn = conn
        self.known = known  # conversations known to exist (committed before)
        self.chatters_known = chatters  # (identity, room) pairs known to be in members
        self.now = int(time.time() * 1000)
        self.results: list[Any] = []
        self.created: set[str] = set()  # conversations created or seen here
        self.chatted: set[tuple[str, str]] = set()
        self.locked: dict[str, int] = {}  # conversation -> last seq, rows locked here

    async def execute(self, req: WriterRequest) -> Any:
        if type(req) is NewMessage:
            return await self.append(req)
        if type(req) is MarkRead:
            return await self.mark_read(req.conversation, req.identity, req.seq)
        if type(req) is TouchDevice:
            return await self.touch_device(req.identity, req.device, req.name, req.now_ms)
        if type(req) is RegisterIdentity:
            await self.conn.execute(
                "INSERT INTO identities VALUES ($1, $2) ON CONFLICT DO NOTHING",
                req.identity,
                req.now_ms,
            )
            return None
        if type(req) is ChangeGroup:
            return await self.change_group(req)
        if type(req) is SetMute:
            await self.conn.execute(
                "INSERT INTO conversation_settings VALUES ($1, $2, $3) "
                "ON CONFLICT (identity, conversation) DO UPDATE SET muted=excluded.muted",
                req.identity,
                req.conversation,
                req.muted,
            )
            return None
        if type(req) is ChangeRelation:
            return await self.change_relation(req)
        raise TypeError(f"unknown store request {req!r}")

    # -- conversations and sequences -------------------------------------------------------------

    async def _create(self, convs: dict[str, tuple[str, ...]]) -> None:
        """Make sure these conversations exist (with their direct members)."""
        new = [c for c in convs if c not in self.known and c not in self.created]
        if not new:
            return
        conn = self.conn
        await conn.execute(
            "INSERT INTO conversations (id, last_seq, created_at, updated_at) "
            "SELECT unnest($1::text[]), 0, $2, $2 ON CONFLICT DO NOTHING",
            new,
            self.now,
        )
        pairs = [(m, c) for c in new for m in convs[c]]
        if pairs:
            await conn.execute(
                "INSERT INTO members SELECT * FROM unnest($1::text[], $2::text[]) "
                "ON CONFLICT DO NOTHING",
                [p[0] for p in pairs],
                [p[1] for p in pairs],
            )
        self.created.update(new)

    async def _chat(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Record that identities chatted (or read) in rooms: their conversation lists."""
        new = {p for p in pairs if p not in self.chatters_known and p not in self.chatted}
        if not new:
            return
        await self.conn.execute(
            "INSERT INTO members SELECT * FROM unnest($1::text[], $2::text[]) "
            "ON CONFLICT DO NOTHING",
            [p[0] for p in new],
            [p[1] for p in new],
        )
        self.chatted.update(new)

    async def _lock(self, convs: Iterable[str]) -> None:
        """Lock these conversations' rows (in id order: no deadlock between servers) and read
        their last sequence."""
        need = sorted({c for c in convs if c not in self.locked})
        if need:
            for c, last in await self.conn.fetch(
                "SELECT id, last_seq FROM conversations WHERE id = ANY($1::text[]) "
                "ORDER BY id FOR UPDATE",
                need,
            ):
                self.locked[c] = int(last)

    async def _advance(self, last: dict[str, int]) -> None:
        convs = list(last)
        await self.conn.execute(
            "UPDATE conversations c SET last_seq = u.s, updated_at = $3 "
            "FROM unnest($1::text[], $2::bigint[]) AS u(id, s) WHERE c.id = u.id",
            convs,
            [last[c] for c in convs],
            self.now,
        )
        self.locked.update(last)

    async def _duplicate(self, msg: NewMessage) -> tuple[StoredMessage, bool] | None:
        r = await self.conn.fetchrow(
            f"{SEL} WHERE conversation=$1 AND sender=$2 AND cid=$3",
            msg.conversation,
            msg.sender,
            msg.cid,
        )
        return None if r is None else (row(r), True)

    # -- appends ---------------------------------------------------------------------------------

    async def appends(self, run: list[NewMessage]) -> None:
        """A run of texts and call logs with a few statements, whatever its length.

        Duplicates and contacts are read before the conversations' rows are locked: a
        duplicate another server stores meanwhile makes the insert fail (a unique index), and
        so the transaction, with a retryable error. Group membership is read under the
        group's lock, which every group change takes: no message from a member another server
        has just removed is stored after its removal."""
        conn = self.conn
        now = self.now
        found: dict[tuple[str, str, str], StoredMessage] = {
            (r[0], r[4], r[3]): row(r)
            for r in await conn.fetch(
                f"{SEL} m JOIN unnest($1::text[], $2::text[], $3::text[]) AS u(c, s, i) "
                "ON m.conversation = u.c AND m.sender = u.s AND m.cid = u.i",
                [m.conversation for m in run],
                [m.sender for m in run],
                [m.cid for m in run],
            )
        }
        in_groups = [m for m in run if m.conversation[0] == "g" and m.kind == "text"]
        is_member: set[tuple[str, str]] = set()
        if in_groups:
            await self._lock(m.conversation for m in in_groups)
            is_member = {
                (r[0], r[1])
                for r in await conn.fetch(
                    "SELECT conversation, identity FROM group_members g "
                    "JOIN unnest($1::text[], $2::text[]) AS u(c, i) "
                    "ON g.conversation = u.c AND g.identity = u.i WHERE g.left_seq IS NULL",
                    [m.conversation for m in in_groups],
                    [m.sender for m in in_groups],
                )
            }
        strangers = [m for m in run if m.contact_required]
        contacts: set[tuple[str, str]] = set()
        if strangers:
            contacts = {
                (r[0], r[1])
                for r in await conn.fetch(
                    "SELECT identity, contact FROM contacts c "
                    "JOIN unnest($1::text[], $2::text[]) AS u(i, o) "
                    "ON c.identity = u.i AND c.contact = u.o",
                    [m.sender for m in strangers],
                    [_other(m) for m in strangers],
                )
            }
        out: list[Any] = []  # a result per message; new ones get their seq and mid below
        new: list[StoredMessage] = []
        fresh: list[NewMessage] = []
        for m in run:
            conv = m.conversation
            key = (conv, m.sender, m.cid)
            dup = found.get(key)
            if dup is not None:  # stored before, or earlier in this run (its mid comes below)
                out.append((dup, True))
            elif m.contact_required and (m.sender, _other(m)) not in contacts:
                out.append(
                    ProtocolError(
                        "not_contact", "direct messages on this server are between contacts only"
                    )
                )
            elif conv[0] == "g" and m.kind == "text" and (conv, m.sender) not in is_member:
                out.append(ProtocolError("bad_conversation", f"{conv!r} is not a group of yours"))
            else:
                s = StoredMessage(
                    conv, 0, 0, m.cid, m.sender, m.name, m.kind, m.text, m.ref, now, m.meta,
                    m.hidden_from,
                )  # fmt: skip
                found[key] = s
                new.append(s)
                fresh.append(m)
                out.append((s, False))
        if new:
            await self._create({m.conversation: m.members for m in fresh})
            await self._chat((m.sender, m.conversation) for m in fresh if m.conversation[0] == "r")
            await self._lock(s.conversation for s in new)
            last = self.locked
            advanced: dict[str, int] = {}
            for s in new:
                seq = advanced.get(s.conversation, last[s.conversation]) + 1
                s.seq = advanced[s.conversation] = seq
            mids = await conn.fetch(
                INSERT_MESSAGES,
                [s.conversation for s in new],
                [s.seq for s in new],
                [s.sender for s in new],
                [s.name for s in new],
                [s.cid for s in new],
                [s.kind for s in new],
                [s.text for s in new],
                now,
                [s.meta for s in new],
                [s.hidden_from for s in new],
                [s.ref for s in new],
            )
            mid = {(r[0], r[1]): int(r[2]) for r in mids}
            for s in new:
                s.mid = mid[s.conversation, s.seq]
            await self._advance(advanced)
        self.results.extend(out)

    async def append(self, msg: NewMessage) -> tuple[StoredMessage, bool]:
        """Everything but plain texts and call logs: the rules of ``SqliteStore``'s writer."""
        conn = self.conn
        now = self.now
        hidden = msg.hidden_from
        conv = msg.conversation
        if msg.contact_required:
            a, b = msg.members
            other = b if msg.sender == a else a
            if await conn.fetchval(IS_CONTACT, msg.sender, other) is None:
                found = await self._duplicate(msg)  # a retry of one sent while contacts
                if found is not None:
                    return found
                raise ProtocolError(
                    "not_contact", "direct messages on this server are between contacts only"
                )
        if conv[0] == "g" and msg.meta is None and msg.kind == "system":  # the backend's post
            if (
                await conn.fetchval(
                    "SELECT 1 FROM groups WHERE conversation=$1 AND NOT deleted", conv
                )
                is None
            ):
                raise ProtocolError("bad_conversation", f"no group {conv!r}")
        elif conv[0] == "g" and msg.kind != "system" and msg.kind != "call":
            await self._lock((conv,))  # membership under the lock group changes take
            if await conn.fetchval(IS_MEMBER, conv, msg.sender) is None:
                found = await self._duplicate(msg)
                if found is not None:
                    return found
                raise ProtocolError("bad_conversation", f"{conv!r} is not a group of yours")
        found = await self._duplicate(msg)
        if found is not None:
            return found
        if msg.kind in ("edit", "delete"):
            r = await conn.fetchrow(
                "SELECT sender, kind, ts, deleted, hidden_from FROM messages "
                "WHERE conversation=$1 AND seq=$2",
                conv,
                msg.ref,
            )
            check_amend(msg, Original(r[0], r[1], r[2], bool(r[3])) if r else None, now)
            assert r is not None
            if r[4] is not None:  # a change to a withheld message is withheld too
                hidden = r[4]
            if msg.kind == "delete":
                await conn.execute(
                    "UPDATE messages SET deleted=true, text=NULL WHERE conversation=$1 AND seq=$2",
                    conv,
                    msg.ref,
                )
                await conn.execute(
                    "UPDATE messages SET text=NULL WHERE conversation=$1 AND kind='edit' "
                    "AND ref=$2",
                    conv,
                    msg.ref,
                )
        # Nothing written before here but a delete's changes (its checks passed).
        await self._create({conv: msg.members})
        if conv[0] == "r":
            await self._chat(((msg.sender, conv),))
        await self._lock((conv,))
        seq = self.locked[conv] + 1
        mid = await conn.fetchval(
            INSERT_MESSAGE,
            conv,
            seq,
            msg.sender,
            msg.name,
            msg.cid,
            msg.kind,
            msg.text,
            msg.ref,
            now,
            msg.meta,
            hidden,
        )
        await self._advance({conv: seq})
        stored = StoredMessage(
            conv, seq, int(mid), msg.cid, msg.sender, msg.name, msg.kind, msg.text, msg.ref,
            now, msg.meta, hidden,
        )  # fmt: skip
        return stored, False

    # -- groups ----------------------------------------------------------------------------------

    async def group_state(self, conversation: str) -> GroupState | None:
        conn = self.conn
        g = await conn.fetchrow(
            "SELECT name, created_by, deleted FROM groups WHERE conversation=$1", conversation
        )
        if g is None:
            return None
        rows = await conn.fetch(
            "SELECT identity, role FROM group_members WHERE conversation=$1 AND left_seq IS NULL",
            conversation,
        )
        return GroupState(conversation, g[0], g[1], {r[0]: r[1] for r in rows}, bool(g[2]))

    async def change_group(self, req: ChangeGroup) -> GroupResult:
        conn = self.conn
        conv = req.conversation
        event = NewMessage(conv, req.cid, req.actor, req.actor_name, "system", None)
        await self._lock((conv,))  # group changes of one group one after the other
        found = await self._duplicate(event)
        state = await self.group_state(conv)
        if found is not None:  # a retry: what the first attempt did
            assert state is not None
            return GroupResult(found[0], True, state, ())
        p = group_plan(state, req.change(), req.max_members)
        event.text = p.text
        event.meta = orjson.dumps(p.event).decode()
        if state is None:
            await conn.execute(
                "INSERT INTO groups VALUES ($1, $2, $3, $4, false)",
                conv,
                p.state.name,
                p.state.created_by,
                self.now,
            )
        else:
            await conn.execute(
                "UPDATE groups SET name=$1, deleted=$2 WHERE conversation=$3",
                p.state.name,
                p.state.deleted,
                conv,
            )
        stored, _ = await self.append(event)
        seq = stored.seq
        if p.joined:
            await conn.executemany(
                "INSERT INTO group_members VALUES ($1, $2, $3, NULL, $4)",
                [(conv, i, seq, role) for i, role in p.joined.items()],
            )
        if p.gone:
            await conn.executemany(
                "UPDATE group_members SET left_seq=$1 "
                "WHERE conversation=$2 AND identity=$3 AND left_seq IS NULL",
                [(seq, conv, i) for i in p.gone],
            )
        if p.roles:
            await conn.executemany(
                "UPDATE group_members SET role=$1 "
                "WHERE conversation=$2 AND identity=$3 AND left_seq IS NULL",
                [(role, conv, i) for i, role in p.roles.items()],
            )
        return GroupResult(stored, False, p.state, tuple(p.gone))

    # -- read marks, devices ---------------------------------------------------------------------

    async def mark_read(self, conversation: str, identity: str, seq: int) -> int | None:
        conn = self.conn
        last = int(
            await conn.fetchval("SELECT last_seq FROM conversations WHERE id=$1", conversation) or 0
        )
        if conversation[0] == "g":  # a former member reads no further than their removal
            r = await conn.fetchrow(
                "SELECT left_seq FROM group_members WHERE conversation=$1 AND identity=$2 "
                "ORDER BY joined_seq DESC LIMIT 1",
                conversation,
                identity,
            )
            if r is None:
                raise ProtocolError("bad_conversation", f"{conversation!r} is not a group of yours")
            if r[0] is not None:
                last = min(last, int(r[0]))
        elif conversation[0] == "r":
            await self._chat(((identity, conversation),))
        seq = min(seq, last)
        if seq <= 0:
            return None
        moved = await conn.fetchval(
            "INSERT INTO read_marks VALUES ($1, $2, $3) ON CONFLICT (conversation, identity) "
            "DO UPDATE SET seq=excluded.seq WHERE read_marks.seq < excluded.seq RETURNING seq",
            conversation,
            identity,
            seq,
        )
        return None if moved is None else int(moved)

    async def touch_device(self, identity: str, device: str, name: str, now: int) -> None:
        conn = self.conn
        await conn.execute(
            "INSERT INTO identities VALUES ($1, $2) ON CONFLICT DO NOTHING", identity, now
        )
        await conn.execute(
            "INSERT INTO devices VALUES ($1, $2, $3, $4, $4) ON CONFLICT (identity, device) "
            "DO UPDATE SET name=excluded.name, last_seen=excluded.last_seen",
            identity,
            device,
            name,
            now,
        )

    # -- relations -------------------------------------------------------------------------------

    async def _pair(self, a: str, b: str) -> Pair:
        conn = self.conn
        contact = await conn.fetchval(IS_CONTACT, a, b) is not None
        reqs = {
            (r[0], r[1]): bool(r[2])
            for r in await conn.fetch(
                "SELECT requester, target, dismissed FROM contact_requests "
                "WHERE (requester=$1 AND target=$2) OR (requester=$2 AND target=$1)",
                a,
                b,
            )
        }
        blocks = {
            (r[0], r[1])
            for r in await conn.fetch(
                "SELECT identity, blocked FROM blocks "
                "WHERE (identity=$1 AND blocked=$2) OR (identity=$2 AND blocked=$1)",
                a,
                b,
            )
        }
        return Pair(
            contact,
            Side((a, b) in reqs, reqs.get((b, a), False), (a, b) in blocks),
            Side((b, a) in reqs, reqs.get((a, b), False), (b, a) in blocks),
        )

    async def _write_side(self, x: str, y: str, old: Pair, new: Pair, now: int) -> None:
        """Write what changed of side ``a`` of ``new`` (``x`` toward ``y``)."""
        conn = self.conn
        if (old.a.requested, old.b.dismissed) != (new.a.requested, new.b.dismissed):
            if new.a.requested:
                await conn.execute(
                    "INSERT INTO contact_requests VALUES ($1, $2, $3, $4) "
                    "ON CONFLICT (requester, target) DO UPDATE SET dismissed=excluded.dismissed",
                    x,
                    y,
                    now,
                    new.b.dismissed,
                )
            else:
                await conn.execute(
                    "DELETE FROM contact_requests WHERE requester=$1 AND target=$2", x, y
                )
        if old.a.blocks != new.a.blocks:
            if new.a.blocks:
                await conn.execute("INSERT INTO blocks VALUES ($1, $2, $3)", x, y, now)
            else:
                await conn.execute("DELETE FROM blocks WHERE identity=$1 AND blocked=$2", x, y)
        if old.contact != new.contact:
            if new.contact:
                await conn.execute("INSERT INTO contacts VALUES ($1, $2, $3)", x, y, now)
            else:
                await conn.execute("DELETE FROM contacts WHERE identity=$1 AND contact=$2", x, y)

    async def change_relation(self, req: ChangeRelation) -> tuple[Pair, Pair]:
        a, b = req.actor, req.other
        if a == b:
            raise ProtocolError("bad_field", "that is yourself")
        # One pair's changes one after the other, whichever side and server makes them.
        x, y = sorted((a, b))
        await self.conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"{x}\n{y}")
        before = await self._pair(a, b)
        outgoing = 0
        if req.action == "request":
            outgoing = int(
                await self.conn.fetchval(
                    "SELECT count(*) FROM contact_requests WHERE requester=$1", a
                )
            )
        after = relation_plan(req.action, before, outgoing=outgoing, max_pending=req.max_pending)
        if after != before:
            await self._write_side(a, b, before, after, req.now_ms)
            await self._write_side(b, a, before.swapped(), after.swapped(), req.now_ms)
        return before, after
