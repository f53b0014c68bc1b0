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

The transaction's work is ``signaling.chat.pgwrite``, the reads ``signaling.chat.pgread``, the
tables and their migrations ``signaling.chat.pgschema``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any, Final

import asyncpg

from ..core.directory import DeviceInfo
from ..core.metrics import Metric
from ..core.privacy import Pair, Relation
from ..core.writes import WriteBatch
from ..wire.errors import ProtocolError
from . import pgread
from .codec import ChangeRelation, MarkRead, RegisterIdentity, SetMute, TouchDevice, WriterRequest
from .groups import ChangeGroup, GroupState
from .pgschema import migrate
from .pgwrite import Transaction, append_run, one_statement, plain
from .store import AppendDone, ConversationRow, GroupResult, NewMessage, Page, StoredMessage

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


def unavailable(retry_s: float) -> ProtocolError:
    return ProtocolError(
        "store_unavailable",
        "the chat store cannot be reached: nothing was stored",
        retry_after_ms=int(retry_s * 1000),
    )


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
        # Held while a transaction's results are settled (``signaling.app``: the hub's, so
        # that each connection gets one write for all of them).
        self.writes = WriteBatch()
        self.disk_full = False  # the SQLite store's state; PostgreSQL has its own alerts
        self._conn: asyncpg.Connection | None = None  # the writer's; None while unavailable
        self._pool: asyncpg.Pool | None = None
        self._queue: list[tuple[WriterRequest, Waiter]] = []
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
        """Connect, migrate, start the writer. ``RuntimeError`` (naming neither the URL nor its
        password) when PostgreSQL cannot be reached."""
        self._closing = False
        try:
            conn = await self._connect()
        except UNAVAILABLE as e:
            raise RuntimeError(f"the chat store's PostgreSQL cannot be reached: {e!r}") from e
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

    def _send(self, req: WriterRequest, waiter: Waiter) -> None:
        if self._closing or self._task is None:
            raise RuntimeError("the store is closed")
        if self._conn is None:  # it would fail: refuse it now, queue nothing
            raise unavailable(self.retry_after_s)
        if not self._queue:
            self._wake.set()
        self._queue.append((req, waiter))

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
                try:
                    results = await self._run(conn, [req for req, _ in batch])
                except Exception:  # a bug: fail this batch, never the task (writes would hang)
                    log.exception("chat store write failed")
                    if conn.is_closed():
                        self._lost(conn)
                    results = [ProtocolError("internal_error", "the store failed")] * len(batch)
            with self.writes:
                _settle(batch, results)

    async def _run(self, conn: asyncpg.Connection, batch: list[WriterRequest]) -> list[Any]:
        """Execute requests in one transaction: a value or ``ProtocolError`` per request.
        Plain appends with nothing to check go as one statement (``pgwrite.append_run``),
        which saves the transaction's other round trips; when it meets a duplicate (nothing
        written) or a conversation it does not know, they go the general way."""
        if one_statement(batch, self._known, self._chatters):
            try:
                done = await append_run(conn, batch)  # type: ignore[arg-type]
            except asyncpg.UniqueViolationError:
                pass
            except UNAVAILABLE:
                self.failures += 1
                self._lost(conn)
                return [unavailable(self.retry_after_s)] * len(batch)
            except CONFLICTS:
                return [unavailable(self.retry_after_s)] * len(batch)
            else:
                self.commits += 1
                self.batched += len(batch)
                left = [req for req, r in zip(batch, done, strict=True) if r is None]
                if not left:
                    return done
                self._known.difference_update(r.conversation for r in left)  # type: ignore[union-attr]
                rest = iter(await self._transaction(conn, left))
                return [next(rest) if r is None else r for r in done]
        return await self._transaction(conn, batch)

    async def _transaction(self, conn: asyncpg.Connection, batch: list[WriterRequest]) -> list[Any]:
        w = Transaction(conn, self._known, self._chatters)
        try:
            async with conn.transaction():
                run: list[NewMessage] = []
                for req in batch:
                    if plain(req):
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

    def _future(self, req: WriterRequest) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._send(req, fut)
        return fut

    def append(self, msg: NewMessage) -> asyncio.Future[tuple[StoredMessage, bool]]:
        return self._future(msg)

    def append_nowait(self, msg: NewMessage, done: AppendDone) -> None:
        self._send(msg, done)

    async def mark_read(self, conversation: str, identity: str, seq: int) -> int | None:
        result: int | None = await self._future(MarkRead(conversation, identity, seq))
        return result

    async def touch_device(self, identity: str, device: str, name: str, now_ms: int) -> None:
        await self._future(TouchDevice(identity, device, name, now_ms))

    async def register_identity(self, identity: str, now_ms: int) -> None:
        await self._future(RegisterIdentity(identity, now_ms))

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

        self._send(req, done)
        return fut

    async def set_mute(self, identity: str, conversation: str, muted: bool) -> None:
        await self._future(SetMute(identity, conversation, muted))

    async def change_relation(
        self, action: str, actor: str, other: str, now_ms: int, max_pending: int
    ) -> tuple[Pair, Pair]:
        value: tuple[Pair, Pair] = await self._future(
            ChangeRelation(action, actor, other, now_ms, max_pending)
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
        """Run ``fn(conn, *args)`` on a pooled connection in a read-only snapshot. A pooled
        connection found dead (PostgreSQL restarted since it was used) is replaced and the
        read tried again, up to once per pooled connection; not after a timeout, so a read
        waits ``timeout_s`` at most."""
        pool = self._pool
        if pool is None:
            raise RuntimeError("the store is not open")
        for attempt in range(READ_POOL + 1):
            try:
                async with pool.acquire() as conn:
                    async with conn.transaction(isolation="repeatable_read", readonly=True):
                        return await fn(conn, *args)
            except UNAVAILABLE as e:
                if attempt == READ_POOL or isinstance(e, (TimeoutError, OSError)):
                    raise unavailable(self.retry_after_s) from e
        raise AssertionError("unreachable")

    async def last_seq(self, conversation: str) -> int:
        result: int = await self._read(pgread.last_seq, conversation)
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
            pgread.page, conversation, before, after, limit, max_bytes, viewer
        )
        return result

    async def unread(self, conversation: str, identity: str, upto: int | None = None) -> int:
        result: int = await self._read(pgread.unread, conversation, identity, upto)
        return result

    async def conversation_list(
        self, identity: str, limit: int, after: tuple[int, str] | None = None
    ) -> tuple[list[ConversationRow], bool]:
        result: tuple[list[ConversationRow], bool] = await self._read(
            pgread.conversation_list, identity, limit, after
        )
        return result

    async def load_groups(self) -> tuple[dict[str, GroupState], dict[str, set[str]]]:
        result: tuple[dict[str, GroupState], dict[str, set[str]]] = await self._read(
            pgread.load_groups
        )
        return result

    async def read_marks(self, conversation: str) -> dict[str, int]:
        result: dict[str, int] = await self._read(pgread.read_marks, conversation)
        return result

    async def group_name_at(self, conversation: str, seq: int) -> str:
        result: str = await self._read(pgread.group_name_at, conversation, seq)
        return result

    async def read_seq(self, conversation: str, identity: str) -> int:
        result: int = await self._read(pgread.read_seq, conversation, identity)
        return result

    async def known_identities(self, identities: list[str]) -> set[str]:
        result: set[str] = await self._read(pgread.known_identities, identities)
        return result

    async def all_blocks(self) -> list[tuple[str, str]]:
        result: list[tuple[str, str]] = await self._read(pgread.all_blocks)
        return result

    async def contacts_among(self, identity: str, others: list[str]) -> set[str]:
        result: set[str] = await self._read(pgread.contacts_among, identity, others)
        return result

    async def related(self, identity: str, others: list[str]) -> set[str]:
        result: set[str] = await self._read(pgread.related, identity, others)
        return result

    async def relations_of(self, identity: str) -> list[Relation]:
        result: list[Relation] = await self._read(pgread.relations_of, identity)
        return result

    async def devices_of(self, identity: str) -> list[DeviceInfo]:
        result: list[DeviceInfo] = await self._read(pgread.devices_of, identity)
        return result


def _settle(batch: list[tuple[WriterRequest, Waiter]], results: list[Any]) -> None:
    """Settle each write's future, or call its callback, in request order."""
    for (_, waiter), value in zip(batch, results, strict=True):
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
