"""``ChatStore`` (and the device directory and relation store) on PostgreSQL, with asyncpg.

Selected by ``[store] url = "postgresql://..."``. The same contract as ``SqliteStore``, proven
by the same contract suite (``tests/test_store_contract.py``); the rules themselves are the
shared pure functions (``store.check_amend``, ``groups.plan``, ``privacy.plan`` and ``view``).

- Writes: one writer task owns one connection and commits whatever has queued up in one
  transaction (group commit, as the SQLite writer does; ``bench/pg_driver.py``: one message per
  transaction holds a writer to ~2,000 msgs/s, 64 per transaction reach ~40,000). It does not
  wait for more: a lone message is committed at once. A run of plain appends (texts and call
  logs) is written with a few array statements whatever its length; other requests (edits,
  deletes, group changes, read marks, ...) one by one, in order, in the same transaction.
- Sequences: a conversation's row is locked (``FOR UPDATE``) before its next sequence is taken
  and kept until the commit, so the numbers are gap-free and never reused, even with several
  servers writing to one database. Nothing is cached across transactions but which
  conversations exist.
- Acknowledged only after COMMIT. When PostgreSQL is unreachable, or the connection dies or a
  statement times out (``timeout_s``) mid-transaction, the writes of that transaction are
  refused with ``store_unavailable`` (``retry_after_ms``: their outcome is unknown, so a retry
  with the same client id is stored once), writes are refused at once until the writer is
  connected again (it retries every ``retry_after_s``), and reads fail with the same code.
- Reads: a small pool of connections; a read that meets a dead connection is tried once more.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

import asyncpg
import orjson

from ..core.directory import DeviceInfo
from ..core.metrics import Metric
from ..core.privacy import Pair, Relation, Side, view
from ..core.privacy import plan as relation_plan
from ..wire.errors import ProtocolError
from .codec import (
    COLUMNS,
    ChangeRelation,
    MarkRead,
    RegisterIdentity,
    SetMute,
    TouchDevice,
    WriterRequest,
)
from .groups import ChangeGroup, GroupChange, GroupState
from .groups import plan as group_plan
from .pgschema import migrate
from .store import (
    AppendDone,
    ConversationRow,
    GroupResult,
    NewMessage,
    Original,
    Page,
    StoredMessage,
    check_amend,
    wire_size,
)

log = logging.getLogger(__name__)

TIMEOUT_S: Final = 5.0  # a statement (or a connection attempt) that takes longer has failed
RETRY_S: Final = 1.0  # between attempts to reconnect; a refused write's retry_after_ms
MAX_BATCH: Final = 2048  # requests per transaction
READ_POOL: Final = 4  # read connections
KNOWN_CACHE: Final = 100_000  # conversations known to exist; (identity, room) pairs in members

# Who hears about a write: a future or an ``append_nowait`` callback.
Waiter = asyncio.Future[Any] | Callable[[Any], None]

#: What a dead or unreachable server looks like (the connection is gone, or never came).
UNAVAILABLE: Final = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
)
#: What a busy cluster can do to a transaction that another would get through: another server
#: wrote the same rows meanwhile (a duplicate checked before the lock, a lock order).
CONFLICTS: Final = (
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.UniqueViolationError,
)

SEL: Final = f"SELECT {COLUMNS} FROM messages"
INSERT_MESSAGE: Final = (
    "INSERT INTO messages "
    "(conversation, seq, sender, name, cid, kind, text, ref, ts, meta, hidden_from) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING mid"
)
INSERT_MESSAGES: Final = (
    "INSERT INTO messages "
    "(conversation, seq, sender, name, cid, kind, text, ts, meta, hidden_from) "
    "SELECT c, s, f, n, i, k, t, $8, m, h FROM unnest($1::text[], $2::bigint[], $3::text[], "
    "$4::text[], $5::text[], $6::text[], $7::text[], $9::text[], $10::text[]) "
    "AS u(c, s, f, n, i, k, t, m, h) RETURNING conversation, seq, mid"
)
IS_MEMBER: Final = (
    "SELECT 1 FROM group_members WHERE conversation=$1 AND identity=$2 AND left_seq IS NULL"
)
IS_CONTACT: Final = "SELECT 1 FROM contacts WHERE identity=$1 AND contact=$2"


def unavailable(retry_s: float) -> ProtocolError:
    return ProtocolError(
        "store_unavailable",
        "the chat store cannot be reached: nothing was stored",
        retry_after_ms=int(retry_s * 1000),
    )


def _row(r: Any) -> StoredMessage:
    return StoredMessage(*r)


def _other(m: NewMessage) -> str:
    """The member of a direct conversation who is not its sender."""
    a, b = m.members
    return b if m.sender == a else a


class PostgresStore:
    """PostgreSQL ``ChatStore`` (see the module docstring)."""

    def __init__(
        self, url: str, *, timeout_s: float = TIMEOUT_S, retry_after_s: float = RETRY_S
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.epoch = ""
        self.on_group: Callable[[GroupResult], None] | None = None
        self.disk_full = False  # the SQLite store's state; PostgreSQL has its own alerts
        self._conn: asyncpg.Connection | None = None  # the writer's; None while unavailable
        self._pool: asyncpg.Pool | None = None
        self._queue: list[tuple[WriterRequest, Waiter, bool]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._reconnect: asyncio.Task[None] | None = None
        self._closing = False
        self._known: set[str] = set()  # conversations that exist
        self._chatters: set[tuple[str, str]] = set()  # (identity, room) pairs in members
        self.commits = 0
        self.batched = 0
        self.reconnects = 0
        self.failures = 0  # transactions failed because the server was unavailable

    @property
    def available(self) -> bool:
        """Whether writes are taken (the writer is connected)."""
        return self._conn is not None

    # -- lifecycle -------------------------------------------------------------------------------

    async def _connect(self) -> asyncpg.Connection:
        conn: asyncpg.Connection = await asyncpg.connect(
            self.url, timeout=self.timeout_s, command_timeout=self.timeout_s
        )
        return conn

    async def open(self) -> None:
        self._closing = False
        conn = await self._connect()
        try:
            _, self.epoch = await migrate(conn)
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=1,
                max_size=READ_POOL,
                timeout=self.timeout_s,
                command_timeout=self.timeout_s,
            )
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        self._task = asyncio.create_task(self._write_forever())

    async def close(self) -> None:
        """Commit every write accepted so far, then close the connections."""
        self._closing = True
        if self._reconnect is not None:
            self._reconnect.cancel()
            await asyncio.gather(self._reconnect, return_exceptions=True)
            self._reconnect = None
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        queue, self._queue = self._queue, []
        _settle(queue, [ProtocolError("internal_error", "the store is closed")] * len(queue))
        if self._conn is not None:
            await self._close_conn(self._conn)
            self._conn = None
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), self.timeout_s)
            except (TimeoutError, *UNAVAILABLE):
                self._pool.terminate()
            self._pool = None

    async def _close_conn(self, conn: asyncpg.Connection) -> None:
        try:
            await asyncio.wait_for(conn.close(), self.timeout_s)
        except (TimeoutError, *UNAVAILABLE):
            conn.terminate()

    def _lost(self, conn: asyncpg.Connection) -> None:
        """The writer's connection failed: refuse writes until a new one is up."""
        if self._conn is conn:
            self._conn = None
            conn.terminate()
            self._known.clear()
            self._chatters.clear()
            if not self._closing:
                log.error("the chat store's PostgreSQL connection failed; reconnecting")
                self._reconnect = asyncio.ensure_future(self._reconnect_later())

    async def _reconnect_later(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.retry_after_s)
            try:
                conn = await self._connect()
            except UNAVAILABLE as e:
                log.warning("the chat store's PostgreSQL is still unavailable: %s", e)
                continue
            self._conn = conn
            self.reconnects += 1
            log.warning("the chat store's PostgreSQL is back: chat writes are accepted")
            return

    # -- writes ----------------------------------------------------------------------------------

    def _send(self, req: WriterRequest, waiter: Waiter, row: bool) -> None:
        if self._closing or self._task is None:
            raise RuntimeError("the store is closed")
        if self._conn is None:  # it would fail: refuse it now, queue nothing
            raise unavailable(self.retry_after_s)
        if not self._queue:
            self._wake.set()
        self._queue.append((req, waiter, row))

    async def _write_forever(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                await self._wake.wait()
                self._wake.clear()
                continue
            batch = self._queue[:MAX_BATCH]
            del self._queue[:MAX_BATCH]
            conn = self._conn
            if conn is None:  # lost with these queued
                results: list[Any] = [unavailable(self.retry_after_s)] * len(batch)
            else:
                results = await self._run(conn, [req for req, _, _ in batch])
            _settle(batch, results)

    async def _run(self, conn: asyncpg.Connection, batch: list[WriterRequest]) -> list[Any]:
        """Execute requests in one transaction: a value or ``ProtocolError`` per request."""
        w = _Tx(self, conn)
        try:
            async with conn.transaction():
                run: list[NewMessage] = []
                for req in batch:
                    if type(req) is NewMessage and (req.kind == "text" or req.kind == "call"):
                        run.append(req)
                        continue
                    if run:
                        await w.appends(run)
                        run = []
                    # Requests raise ProtocolError only before they write anything.
                    try:
                        w.results.append(await w.execute(req))
                    except ProtocolError as e:
                        w.results.append(e)
                if run:
                    await w.appends(run)
        except UNAVAILABLE:
            self.failures += 1
            self._lost(conn)
            return [unavailable(self.retry_after_s)] * len(batch)
        except CONFLICTS:
            return [unavailable(self.retry_after_s)] * len(batch)
        except Exception:  # a bug, or a constraint: fail this batch, keep the connection
            log.exception("chat store transaction failed")
            if conn.is_closed():
                self._lost(conn)
            err = ProtocolError("internal_error", "the store failed")
            return [err] * len(batch)
        self.commits += 1
        self.batched += len(batch)
        if len(self._known) > KNOWN_CACHE:
            self._known.clear()
        self._known.update(w.created)
        if len(self._chatters) > KNOWN_CACHE:
            self._chatters.clear()
        self._chatters.update(w.chatted)
        return w.results

    def _future(self, req: WriterRequest, row: bool) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._send(req, fut, row)
        return fut

    def append(self, msg: NewMessage) -> asyncio.Future[tuple[StoredMessage, bool]]:
        return self._future(msg, True)

    def append_nowait(self, msg: NewMessage, done: AppendDone) -> None:
        self._send(msg, done, True)

    async def mark_read(self, conversation: str, identity: str, seq: int) -> int | None:
        result: int | None = await self._future(MarkRead(conversation, identity, seq), False)
        return result

    async def touch_device(self, identity: str, device: str, name: str, now_ms: int) -> None:
        await self._future(TouchDevice(identity, device, name, now_ms), False)

    async def register_identity(self, identity: str, now_ms: int) -> None:
        await self._future(RegisterIdentity(identity, now_ms), False)

    def change_group(self, req: ChangeGroup) -> asyncio.Future[GroupResult]:
        fut: asyncio.Future[GroupResult] = asyncio.get_running_loop().create_future()

        def done(value: GroupResult | ProtocolError) -> None:
            if isinstance(value, ProtocolError):
                if not fut.done():
                    fut.set_exception(value)
                return
            if not value.duplicate and self.on_group is not None:
                self.on_group(value)  # now, before the results after this one
            if not fut.done():
                fut.set_result(value)

        self._send(req, done, False)
        return fut

    async def set_mute(self, identity: str, conversation: str, muted: bool) -> None:
        await self._future(SetMute(identity, conversation, muted), False)

    async def change_relation(
        self, action: str, actor: str, other: str, now_ms: int, max_pending: int
    ) -> tuple[Pair, Pair]:
        value: tuple[Pair, Pair] = await self._future(
            ChangeRelation(action, actor, other, now_ms, max_pending), False
        )
        return value

    def metrics(self) -> Iterable[Metric]:
        yield Metric("store_commits", "counter", "Transactions the store committed.", self.commits)
        yield Metric("store_writes", "counter", "Writes in those transactions.", self.batched)
        yield Metric(
            "store_unavailable",
            "gauge",
            "1 while the chat store's PostgreSQL cannot be reached: chat writes are refused "
            "(store_unavailable).",
            float(self._conn is None),
        )
        yield Metric(
            "store_reconnects",
            "counter",
            "Times the store's writer connected to PostgreSQL again after losing it.",
            self.reconnects,
        )

    # -- reads -----------------------------------------------------------------------------------

    async def _read(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(conn, *args)`` on a pooled connection in a read-only snapshot; once more
        on another connection if this one was dead."""
        pool = self._pool
        if pool is None:
            raise RuntimeError("the store is not open")
        for attempt in (1, 2):
            try:
                async with pool.acquire() as conn:
                    async with conn.transaction(isolation="repeatable_read", readonly=True):
                        return await fn(conn, *args)
            except UNAVAILABLE as e:
                if attempt == 2 or not isinstance(e, asyncpg.ConnectionDoesNotExistError):
                    raise unavailable(self.retry_after_s) from e
        raise AssertionError("unreachable")

    async def last_seq(self, conversation: str) -> int:
        result: int = await self._read(_last_seq, conversation)
        return result

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
        result: Page = await self._read(
            _page, conversation, before, after, limit, max_bytes, viewer
        )
        return result

    async def unread(self, conversation: str, identity: str, upto: int | None = None) -> int:
        result: int = await self._read(_unread, conversation, identity, upto)
        return result

    async def conversation_list(
        self, identity: str, limit: int, after: tuple[int, str] | None = None
    ) -> tuple[list[ConversationRow], bool]:
        result: tuple[list[ConversationRow], bool] = await self._read(_list, identity, limit, after)
        return result

    async def load_groups(self) -> tuple[dict[str, GroupState], dict[str, set[str]]]:
        result: tuple[dict[str, GroupState], dict[str, set[str]]] = await self._read(_groups)
        return result

    async def read_marks(self, conversation: str) -> dict[str, int]:
        result: dict[str, int] = await self._read(_read_marks, conversation)
        return result

    async def read_seq(self, conversation: str, identity: str) -> int:
        result: int = await self._read(_read_seq, conversation, identity)
        return result

    async def known_identities(self, identities: list[str]) -> set[str]:
        result: set[str] = await self._read(_known, identities)
        return result

    async def all_blocks(self) -> list[tuple[str, str]]:
        result: list[tuple[str, str]] = await self._read(_blocks)
        return result

    async def contacts_among(self, identity: str, others: list[str]) -> set[str]:
        result: set[str] = await self._read(_contacts_among, identity, others)
        return result

    async def related(self, identity: str, others: list[str]) -> set[str]:
        result: set[str] = await self._read(_related, identity, others)
        return result

    async def relations_of(self, identity: str) -> list[Relation]:
        result: list[Relation] = await self._read(_relations, identity)
        return result

    async def devices_of(self, identity: str) -> list[DeviceInfo]:
        result: list[DeviceInfo] = await self._read(_devices, identity)
        return result


def _settle(batch: list[tuple[WriterRequest, Waiter, bool]], results: list[Any]) -> None:
    """Settle each write's future, or call its callback, in request order."""
    for (_, waiter, _), value in zip(batch, results, strict=True):
        if not isinstance(waiter, asyncio.Future):
            try:
                waiter(value)
            except Exception:  # a callback must not raise; if one does, the others still run
                log.exception("a store write's callback failed")
        elif waiter.done():
            continue
        elif isinstance(value, ProtocolError):
            waiter.set_exception(value)
        else:
            waiter.set_result(value)


class _Tx:
    """One write transaction: the requests of a batch, in order, on the writer's connection."""

    def __init__(self, store: PostgresStore, conn: asyncpg.Connection) -> None:
        self.store = store
        self.conn = conn
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
        new = [c for c in convs if c not in self.store._known and c not in self.created]
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
        new = {p for p in pairs if p not in self.store._chatters and p not in self.chatted}
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
        return None if r is None else (_row(r), True)

    # -- appends ---------------------------------------------------------------------------------

    async def appends(self, run: list[NewMessage]) -> None:
        """A run of texts and call logs with a few statements, whatever its length.

        The checks (duplicates, group membership, contacts) read before the conversations'
        rows are locked: a duplicate another server stores meanwhile makes the insert fail
        (a unique index), and so the transaction, with a retryable error."""
        conn = self.conn
        now = self.now
        found: dict[tuple[str, str, str], StoredMessage] = {
            (r[0], r[4], r[3]): _row(r)
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
                    conv, 0, 0, m.cid, m.sender, m.name, m.kind, m.text, None, now, m.meta,
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
        change = GroupChange(
            conv,
            req.action,
            req.actor,
            req.actor_name,
            req.cid,
            tuple(req.identities),
            req.role,
            req.name,
        )
        p = group_plan(state, change, req.max_members)
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


# -- reads (each in a read-only snapshot on a pooled connection) -----------------------------------


async def _last_seq(conn: asyncpg.Connection, conversation: str) -> int:
    r = await conn.fetchval("SELECT last_seq FROM conversations WHERE id=$1", conversation)
    return int(r) if r is not None else 0


async def _windows(
    conn: asyncpg.Connection, conversation: str, identity: str
) -> list[tuple[int, int | None]]:
    rows = await conn.fetch(
        "SELECT joined_seq, left_seq FROM group_members "
        "WHERE conversation=$1 AND identity=$2 ORDER BY joined_seq",
        conversation,
        identity,
    )
    return [(int(a), None if b is None else int(b)) for a, b in rows]


async def _visible(
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
    windows = await _windows(conn, conversation, viewer)
    if not windows:
        raise ProtocolError("bad_conversation", f"{conversation!r} is not a group of yours")
    params = tuple(x for lo, hi in windows for x in (lo, last if hi is None else hi))
    end = windows[-1][1]
    return params, last if end is None else min(last, end)


def _cond(conversation: str, params: tuple[int | str, ...], n: int) -> str:
    """The SQL condition of ``_visible``'s ``params``, numbered from ``$n``."""
    if not params:
        return ""
    if conversation[0] == "d":
        return f" AND hidden_from IS DISTINCT FROM ${n}"
    between = (f"seq BETWEEN ${i} AND ${i + 1}" for i in range(n, n + len(params), 2))
    return " AND (" + " OR ".join(between) + ")"


async def _page(
    conn: asyncpg.Connection,
    conversation: str,
    before: int | None,
    after: int | None,
    limit: int,
    max_bytes: int | None,
    viewer: str | None,
) -> Page:
    last = await _last_seq(conn, conversation)
    params, last = await _visible(conn, conversation, viewer, last)
    cond = _cond(conversation, params, 4)
    if after is not None:
        q = f"{SEL} WHERE conversation=$1 AND seq>$2 {cond} ORDER BY seq LIMIT $3"
        rows = await conn.fetch(q, conversation, after, limit + 1, *params)
    else:
        b = last + 1 if before is None else min(before, last + 1)
        q = f"{SEL} WHERE conversation=$1 AND seq<$2 {cond} ORDER BY seq DESC LIMIT $3"
        rows = await conn.fetch(q, conversation, b, limit + 1, *params)
    msgs: list[StoredMessage] = []
    size = 0
    more = False
    for r in rows:
        m = _row(r)
        if len(msgs) == limit:
            more = True
            break
        if max_bytes is not None:
            size += wire_size(m)
            if size > max_bytes and msgs:
                more = True
                break
        msgs.append(m)
    if after is None:
        msgs.reverse()
    return Page(msgs, more, last)


async def _read_seq(conn: asyncpg.Connection, conversation: str, identity: str) -> int:
    r = await conn.fetchval(
        "SELECT seq FROM read_marks WHERE conversation=$1 AND identity=$2", conversation, identity
    )
    return int(r) if r is not None else 0


async def _count_unread(
    conn: asyncpg.Connection,
    conversation: str,
    identity: str,
    read: int,
    last: int,
    params: tuple[int | str, ...],
) -> int:
    if read >= last:
        return 0
    cond = _cond(conversation, params, 5)
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


async def _unread(
    conn: asyncpg.Connection, conversation: str, identity: str, upto: int | None
) -> int:
    last = await _last_seq(conn, conversation)
    if upto is not None:
        last = min(last, upto)
    params, last = await _visible(conn, conversation, identity, last)
    read = await _read_seq(conn, conversation, identity)
    return await _count_unread(conn, conversation, identity, read, last, params)


async def _list(
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
    rows = [await _row_of(conn, identity, conv, u, role) for u, conv, _, role in found[:limit]]
    return rows, more


async def _row_of(
    conn: asyncpg.Connection, identity: str, conv: str, updated: int, role: str | None
) -> ConversationRow:
    last = await _last_seq(conn, conv)
    params, last = await _visible(conn, conv, identity, last)
    read = await _read_seq(conn, conv, identity)
    muted = await conn.fetchval(
        "SELECT muted FROM conversation_settings WHERE identity=$1 AND conversation=$2",
        identity,
        conv,
    )
    row = ConversationRow(
        conv,
        last,
        updated,
        read,
        await _count_unread(conn, conv, identity, read, last, params),
        bool(muted),
        role=role,
    )
    if conv[0] == "g":
        row.name = str(await conn.fetchval("SELECT name FROM groups WHERE conversation=$1", conv))
    r = await conn.fetchrow(
        f"{SEL} WHERE conversation=$1 AND seq<=$2 "
        f"AND kind IN ('text', 'call', 'system') AND NOT deleted{_cond(conv, params, 3)} "
        "ORDER BY seq DESC LIMIT 1",
        conv,
        last,
        *params,
    )
    if r is not None:
        msg = _row(r)
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
        row.last_message = msg
    return row


async def _groups(
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


async def _read_marks(conn: asyncpg.Connection, conversation: str) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT identity, seq FROM read_marks WHERE conversation=$1", conversation
    )
    return {str(i): int(s) for i, s in rows}


async def _known(conn: asyncpg.Connection, identities: list[str]) -> set[str]:
    rows = await conn.fetch(
        "SELECT identity FROM identities WHERE identity = ANY($1::text[])", identities
    )
    return {str(r[0]) for r in rows}


async def _blocks(conn: asyncpg.Connection) -> list[tuple[str, str]]:
    return [(str(a), str(b)) for a, b in await conn.fetch("SELECT identity, blocked FROM blocks")]


async def _contacts_among(conn: asyncpg.Connection, identity: str, others: list[str]) -> set[str]:
    rows = await conn.fetch(
        "SELECT contact FROM contacts WHERE identity=$1 AND contact = ANY($2::text[])",
        identity,
        others,
    )
    return {str(r[0]) for r in rows}


async def _related(conn: asyncpg.Connection, identity: str, others: list[str]) -> set[str]:
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
            or await _both_wrote(conn, identity, o)
        ):
            out.add(o)
    return out


async def _both_wrote(conn: asyncpg.Connection, a: str, b: str) -> bool:
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


async def _relations(conn: asyncpg.Connection, identity: str) -> list[Relation]:
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
    out = []
    for other in sorted(contacts | asked | set(incoming) | blocks):
        pair = Pair(
            other in contacts,
            Side(other in asked, incoming.get(other, False), other in blocks),
            Side(requested=other in incoming),
        )
        rel = view(pair, other)
        if rel.listed:
            out.append(rel)
    return out


async def _devices(conn: asyncpg.Connection, identity: str) -> list[DeviceInfo]:
    rows = await conn.fetch(
        "SELECT identity, device, name, first_seen, last_seen FROM devices "
        "WHERE identity=$1 ORDER BY last_seen DESC, device",
        identity,
    )
    return [DeviceInfo(str(a), str(b), str(c), int(d), int(e)) for a, b, c, d, e in rows]
