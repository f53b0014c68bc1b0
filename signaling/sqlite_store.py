"""``ChatStore`` on SQLite in WAL mode, without blocking the event loop.

- One writer thread owns the write connection. Requests queue up; the thread takes everything
  queued and commits it in one transaction (group commit), then resolves the callers' futures
  with one hop back to the loop. Under light load it does not wait for more, so a lone message
  is committed at once. Under load (the previous transaction carried ``BUSY_BATCH`` writes or
  more) it first waits ``BUSY_WINDOW_S`` for more to queue up: fewer, larger transactions cost
  less per message and, above all, the writer then wakes (and preempts the event loop on its
  core) a few hundred times a second instead of thousands (bench/signaling.py at 4,000 msgs/s:
  the server's core went from 88-95 % to 72 % with a 2 ms window). The window is 0.5 ms: at
  6,000-6,600 msgs/s, where p99 and not CPU decides, steps passed 7 of 8 times with 0.5 ms
  and 4 of 8 with 2 ms (no window at all: the core at 98-100 %).
- One reader thread serves history and sync queries from its own connection (WAL readers do not
  block the writer).
- Automatic checkpoints are off on the writer; a checkpoint thread runs them in the background
  (SQLite's checkpoints in the commit path put the p99 at 13-17 ms; see signaling-facts).
  SQLite starts the WAL file over only when a transaction begins after a checkpoint copied
  all of it, which a background checkpoint never manages while writes go on: under steady load
  the WAL grew by ~36 MB/s without end (4,500 msgs/s). So once it holds ``WAL_RESTART_FRAMES``
  pages the checkpointer asks the writer to finish the job between two transactions: only the
  frames written since the background pass are left to copy, and the next transaction rewinds.
- Sequence numbers are assigned in the writer thread inside the transaction that stores the
  message, so they are gap-free and never reused, even across crashes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .protocol import ProtocolError
from .store import (
    AppendDone,
    DeviceInfo,
    NewMessage,
    Original,
    Page,
    StoredMessage,
    check_amend,
)

MIGRATIONS: list[str] = [
    # 1: conversations, messages, direct-conversation members, read marks, store metadata.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        last_seq INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE messages (
        mid INTEGER PRIMARY KEY,
        conversation TEXT NOT NULL,
        seq INTEGER NOT NULL,
        sender TEXT NOT NULL,
        name TEXT NOT NULL,
        cid TEXT NOT NULL,
        kind TEXT NOT NULL,
        text TEXT,
        ref INTEGER,
        ts INTEGER NOT NULL,
        deleted INTEGER NOT NULL DEFAULT 0
    );
    CREATE UNIQUE INDEX messages_seq ON messages (conversation, seq);
    CREATE UNIQUE INDEX messages_cid ON messages (conversation, sender, cid);
    CREATE TABLE members (
        identity TEXT NOT NULL,
        conversation TEXT NOT NULL,
        PRIMARY KEY (identity, conversation)
    ) WITHOUT ROWID;
    CREATE TABLE read_marks (
        conversation TEXT NOT NULL,
        identity TEXT NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (conversation, identity)
    ) WITHOUT ROWID;
    """,
    # 2: identities and their devices (last-seen), structured message metadata (call logs).
    """
    CREATE TABLE identities (
        identity TEXT PRIMARY KEY,
        created_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE devices (
        identity TEXT NOT NULL,
        device TEXT NOT NULL,
        name TEXT NOT NULL,
        first_seen INTEGER NOT NULL,
        last_seen INTEGER NOT NULL,
        PRIMARY KEY (identity, device)
    ) WITHOUT ROWID;
    ALTER TABLE messages ADD COLUMN meta TEXT;
    """,
]

log = logging.getLogger(__name__)

# Who hears about a write: a future (``_submit``) or an ``append_nowait`` callback.
Waiter = asyncio.Future[Any] | AppendDone

_COLUMNS = "conversation, seq, mid, cid, sender, name, kind, text, ref, ts, meta"
_STOP = object()
BUSY_BATCH = 4  # writes in the previous transaction that mean "under load"
BUSY_WINDOW_S = 0.0005  # then wait this long for more before the next transaction
WAL_RESTART_FRAMES = 4096  # WAL pages (16 MiB) after which the writer finishes a checkpoint
CHECKPOINT_INTERVAL_S = 1.0  # between background checkpoints while there are writes


def _row(r: tuple[Any, ...]) -> StoredMessage:
    return StoredMessage(*r)


def _connect(path: Path, synchronous: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
    db.execute("PRAGMA busy_timeout=5000")
    return db


def migrate(db: sqlite3.Connection) -> int:
    """Apply pending migrations (``PRAGMA user_version`` counts them); returns the version."""
    version: int = db.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise RuntimeError(
            f"the store has schema version {version}, newer than this server knows "
            f"({len(MIGRATIONS)}); upgrade rallypoint"
        )
    for i in range(version, len(MIGRATIONS)):
        db.execute("BEGIN IMMEDIATE")
        for stmt in MIGRATIONS[i].split(";"):
            if stmt.strip():
                db.execute(stmt)
        if i == 0:
            db.execute("INSERT INTO meta VALUES ('epoch', ?)", (secrets.token_hex(8),))
        db.execute(f"PRAGMA user_version={i + 1}")
        db.execute("COMMIT")
    return len(MIGRATIONS)


class SqliteStore:
    """SQLite ``ChatStore`` (see the module docstring for its threads)."""

    def __init__(self, path: Path | str, synchronous: str = "normal") -> None:
        self.path = Path(path)
        self.synchronous = synchronous
        self.epoch = ""
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._checkpointer: threading.Thread | None = None
        self._stopping = threading.Event()
        self._dirty = threading.Event()
        self._wal_full = threading.Event()  # the checkpointer asks the writer to finish
        self._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store-read")
        self._rdb: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.commits = 0
        self.batched = 0

    # -- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        wdb = await asyncio.to_thread(self._open_writer)
        self._writer = threading.Thread(
            target=self._write_loop, args=(wdb,), name="store-write", daemon=True
        )
        self._writer.start()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="store-ckpt", daemon=True
        )
        self._checkpointer.start()

    def _open_writer(self) -> sqlite3.Connection:
        wdb = _connect(self.path, self.synchronous)
        migrate(wdb)
        wdb.execute("PRAGMA wal_autocheckpoint=0")
        self.epoch = wdb.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()[0]
        return wdb

    async def close(self) -> None:
        """Finish every queued write, checkpoint, and close the connections."""
        if self._writer is not None:
            self._queue.put(_STOP)
            await asyncio.to_thread(self._writer.join)
            self._writer = None
        self._stopping.set()
        self._dirty.set()
        if self._checkpointer is not None:
            await asyncio.to_thread(self._checkpointer.join)
            self._checkpointer = None
        if self._rdb is not None:
            rdb = self._rdb
            await asyncio.get_running_loop().run_in_executor(self._reader, rdb.close)
            self._rdb = None
        self._reader.shutdown(wait=True)

    # -- writes ----------------------------------------------------------------------------------

    def _submit(self, op: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        assert self._loop is not None and self._writer is not None, "store is not open"
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._queue.put((op, args, fut))
        return fut

    def append(self, msg: NewMessage) -> asyncio.Future[tuple[StoredMessage, bool]]:
        return self._submit(_Writer.append, msg)

    def append_nowait(self, msg: NewMessage, done: AppendDone) -> None:
        assert self._writer is not None, "store is not open"
        self._queue.put((_Writer.append, (msg,), done))

    async def mark_read(self, conversation: str, identity: str, seq: int) -> int | None:
        result: int | None = await self._submit(_Writer.mark_read, conversation, identity, seq)
        return result

    async def touch_device(self, identity: str, device: str, name: str, now_ms: int) -> None:
        await self._submit(_Writer.touch_device, identity, device, name, now_ms)

    async def register_identity(self, identity: str, now_ms: int) -> None:
        await self._submit(_Writer.register_identity, identity, now_ms)

    def _write_loop(self, db: sqlite3.Connection) -> None:
        w = _Writer(db)
        q = self._queue
        stop = False
        last = 1
        while not stop:
            batch = [q.get()]
            if last >= BUSY_BATCH:
                time.sleep(BUSY_WINDOW_S)
            while len(batch) < 2048:
                try:
                    batch.append(q.get_nowait())
                except queue.Empty:
                    break
            if batch[-1] is _STOP:
                stop = True
                batch.pop()
            if not batch:
                continue
            results: list[tuple[Waiter, bool, Any]] = []
            try:
                db.execute("BEGIN IMMEDIATE")
                for op, args, fut in batch:
                    # Ops raise ProtocolError only before they write anything, so a refusal
                    # needs no savepoint (which would cost two statements per message).
                    try:
                        results.append((fut, True, op(w, *args)))
                    except ProtocolError as e:
                        results.append((fut, False, e))
                w.flush()
                db.execute("COMMIT")
                w.committed()
                self.commits += 1
                self.batched += len(batch)
                last = len(batch)
            except Exception as e:  # sqlite3.Error, or a bug: fail this batch, keep the thread
                if not isinstance(e, sqlite3.Error):
                    log.exception("store writer failed")
                if db.in_transaction:
                    db.execute("ROLLBACK")
                w.rolled_back()
                err = ProtocolError("internal_error", f"the store failed ({e.__class__.__name__})")
                results = [(fut, False, err) for _, _, fut in batch]
            self._dirty.set()
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(_resolve, results)
            except RuntimeError:  # loop closed: nobody is waiting any more
                pass
            if self._wal_full.is_set():  # after the callers heard: this takes a few ms
                self._wal_full.clear()
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as e:
                    log.warning("checkpoint failed: %s", e)
        db.close()

    def _checkpoint_loop(self) -> None:
        db = _connect(self.path, self.synchronous)
        try:
            while not self._stopping.is_set():
                self._dirty.wait()
                self._dirty.clear()
                if self._stopping.is_set():
                    break
                _, frames, _ = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                if frames >= WAL_RESTART_FRAMES:
                    self._wal_full.set()
                self._stopping.wait(CHECKPOINT_INTERVAL_S)
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            db.close()

    # -- reads -----------------------------------------------------------------------------------

    async def _read(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._reader, fn, *args)

    def _rconn(self) -> sqlite3.Connection:
        if self._rdb is None:
            self._rdb = _connect(self.path, self.synchronous)
        return self._rdb

    def _last_seq_sync(self, conversation: str) -> int:
        r = (
            self._rconn()
            .execute("SELECT last_seq FROM conversations WHERE id=?", (conversation,))
            .fetchone()
        )
        return int(r[0]) if r else 0

    async def last_seq(self, conversation: str) -> int:
        result: int = await self._read(self._last_seq_sync, conversation)
        return result

    def _page_sync(
        self, conversation: str, before: int | None, after: int | None, limit: int
    ) -> Page:
        db = self._rconn()
        db.execute("BEGIN")  # one snapshot for the page and last_seq
        try:
            last = self._last_seq_sync(conversation)
            if after is not None:
                rows = db.execute(
                    f"SELECT {_COLUMNS} FROM messages WHERE conversation=? AND seq>? "
                    "ORDER BY seq LIMIT ?",
                    (conversation, after, limit + 1),
                ).fetchall()
                more = len(rows) > limit
                msgs = [_row(r) for r in rows[:limit]]
            else:
                b = last + 1 if before is None else before
                rows = db.execute(
                    f"SELECT {_COLUMNS} FROM messages WHERE conversation=? AND seq<? "
                    "ORDER BY seq DESC LIMIT ?",
                    (conversation, b, limit + 1),
                ).fetchall()
                more = len(rows) > limit
                msgs = [_row(r) for r in reversed(rows[:limit])]
        finally:
            db.execute("COMMIT")
        return Page(msgs, more, last)

    async def page(
        self, conversation: str, *, before: int | None, after: int | None, limit: int
    ) -> Page:
        result: Page = await self._read(self._page_sync, conversation, before, after, limit)
        return result

    def _conversations_sync(self, identity: str) -> list[tuple[str, int, int]]:
        rows = (
            self._rconn()
            .execute(
                "SELECT c.id, c.last_seq, COALESCE(r.seq, 0) FROM members m "
                "JOIN conversations c ON c.id = m.conversation "
                "LEFT JOIN read_marks r ON r.conversation = m.conversation AND r.identity = ? "
                "WHERE m.identity = ? ORDER BY c.id",
                (identity, identity),
            )
            .fetchall()
        )
        return [(str(a), int(b), int(c)) for a, b, c in rows]

    async def conversations_of(self, identity: str) -> list[tuple[str, int, int]]:
        result: list[tuple[str, int, int]] = await self._read(self._conversations_sync, identity)
        return result

    def _read_marks_sync(self, conversation: str) -> dict[str, int]:
        rows = (
            self._rconn()
            .execute("SELECT identity, seq FROM read_marks WHERE conversation=?", (conversation,))
            .fetchall()
        )
        return {str(i): int(s) for i, s in rows}

    async def read_marks(self, conversation: str) -> dict[str, int]:
        result: dict[str, int] = await self._read(self._read_marks_sync, conversation)
        return result

    def _read_seq_sync(self, conversation: str, identity: str) -> int:
        r = (
            self._rconn()
            .execute(
                "SELECT seq FROM read_marks WHERE conversation=? AND identity=?",
                (conversation, identity),
            )
            .fetchone()
        )
        return int(r[0]) if r else 0

    async def read_seq(self, conversation: str, identity: str) -> int:
        result: int = await self._read(self._read_seq_sync, conversation, identity)
        return result

    def _known_sync(self, identities: list[str]) -> set[str]:
        db = self._rconn()
        out: set[str] = set()
        for i in range(0, len(identities), 500):
            chunk = identities[i : i + 500]
            rows = db.execute(
                f"SELECT identity FROM identities WHERE identity IN ({','.join('?' * len(chunk))})",
                chunk,
            ).fetchall()
            out.update(str(r[0]) for r in rows)
        return out

    async def known_identities(self, identities: list[str]) -> set[str]:
        result: set[str] = await self._read(self._known_sync, identities)
        return result

    def _devices_sync(self, identity: str) -> list[DeviceInfo]:
        rows = (
            self._rconn()
            .execute(
                "SELECT identity, device, name, first_seen, last_seen FROM devices "
                "WHERE identity=? ORDER BY last_seen DESC, device",
                (identity,),
            )
            .fetchall()
        )
        return [DeviceInfo(str(a), str(b), str(c), int(d), int(e)) for a, b, c, d, e in rows]

    async def devices_of(self, identity: str) -> list[DeviceInfo]:
        result: list[DeviceInfo] = await self._read(self._devices_sync, identity)
        return result


def _resolve(results: list[tuple[Waiter, bool, Any]]) -> None:
    """On the event loop: settle each write's future, or call its ``append_nowait`` callback."""
    for waiter, ok, value in results:
        if not isinstance(waiter, asyncio.Future):
            waiter(value)
        elif waiter.done():
            continue
        elif ok:
            waiter.set_result(value)
        else:
            waiter.set_exception(value)


class _Writer:
    """The writer thread's state: cached last sequence per conversation."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.cur = db.cursor()  # reused: Connection.execute makes a new cursor per statement
        self.last: dict[str, int] = {}
        self.pending: dict[str, int] = {}  # changed in the open transaction

    def flush(self) -> None:
        """Write the last sequence of every conversation changed in this transaction."""
        self.db.executemany(
            "UPDATE conversations SET last_seq=? WHERE id=?",
            [(seq, conv) for conv, seq in self.pending.items()],
        )

    def committed(self) -> None:
        self.last.update(self.pending)
        self.pending.clear()

    def rolled_back(self) -> None:
        self.pending.clear()

    def _last(self, conversation: str, members: tuple[str, ...], now: int) -> int:
        seq = self.pending.get(conversation)
        if seq is not None:
            return seq
        seq = self.last.get(conversation)
        if seq is not None:
            return seq
        r = self.db.execute(
            "SELECT last_seq FROM conversations WHERE id=?", (conversation,)
        ).fetchone()
        if r is not None:
            self.last[conversation] = seq = int(r[0])
            return seq
        self.db.execute("INSERT INTO conversations VALUES (?, 0, ?)", (conversation, now))
        self.db.executemany(
            "INSERT OR IGNORE INTO members VALUES (?, ?)", [(m, conversation) for m in members]
        )
        self.pending[conversation] = 0
        return 0

    def _duplicate(self, msg: NewMessage) -> tuple[StoredMessage, bool] | None:
        dup = self.db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE conversation=? AND sender=? AND cid=?",
            (msg.conversation, msg.sender, msg.cid),
        ).fetchone()
        return None if dup is None else (_row(dup), True)

    def append(self, msg: NewMessage) -> tuple[StoredMessage, bool]:
        db = self.db
        now = int(time.time() * 1000)
        if msg.kind in ("edit", "delete"):
            # A retried edit or delete must get its first acknowledgement, not a refusal
            # because the first attempt already changed the original: look for it first.
            found = self._duplicate(msg)
            if found is not None:
                return found
            r = db.execute(
                "SELECT sender, kind, ts, deleted FROM messages WHERE conversation=? AND seq=?",
                (msg.conversation, msg.ref),
            ).fetchone()
            check_amend(msg, Original(r[0], r[1], r[2], bool(r[3])) if r else None, now)
            if msg.kind == "delete":
                # The text is gone from the store, not only hidden; the event stream keeps the
                # delete so every device removes it too.
                db.execute(
                    "UPDATE messages SET deleted=1, text=NULL WHERE conversation=? AND seq=?",
                    (msg.conversation, msg.ref),
                )
                db.execute(
                    "UPDATE messages SET text=NULL WHERE conversation=? AND kind='edit' AND ref=?",
                    (msg.conversation, msg.ref),
                )
        seq = self._last(msg.conversation, msg.members, now) + 1
        cur = self.cur
        try:
            cur.execute(
                "INSERT INTO messages "
                "(conversation, seq, sender, name, cid, kind, text, ref, ts, meta) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    msg.conversation,
                    seq,
                    msg.sender,
                    msg.name,
                    msg.cid,
                    msg.kind,
                    msg.text,
                    msg.ref,
                    now,
                    msg.meta,
                ),
            )
        except sqlite3.IntegrityError:
            # The unique (conversation, sender, cid) index caught a retry; SQLite undid only
            # this statement, so the transaction goes on.
            found = self._duplicate(msg)
            if found is None:
                raise
            return found
        self.pending[msg.conversation] = seq
        mid = cur.lastrowid
        assert mid is not None
        return StoredMessage(
            msg.conversation,
            seq,
            mid,
            msg.cid,
            msg.sender,
            msg.name,
            msg.kind,
            msg.text,
            msg.ref,
            now,
            msg.meta,
        ), False

    def touch_device(self, identity: str, device: str, name: str, now: int) -> None:
        self.db.execute("INSERT OR IGNORE INTO identities VALUES (?, ?)", (identity, now))
        self.db.execute(
            "INSERT INTO devices VALUES (?, ?, ?, ?, ?) ON CONFLICT (identity, device) "
            "DO UPDATE SET name=excluded.name, last_seen=excluded.last_seen",
            (identity, device, name, now, now),
        )

    def register_identity(self, identity: str, now: int) -> None:
        self.db.execute("INSERT OR IGNORE INTO identities VALUES (?, ?)", (identity, now))

    def mark_read(self, conversation: str, identity: str, seq: int) -> int | None:
        db = self.db
        last = self.pending.get(conversation, self.last.get(conversation))
        if last is None:
            r = db.execute(
                "SELECT last_seq FROM conversations WHERE id=?", (conversation,)
            ).fetchone()
            last = int(r[0]) if r else 0
        seq = min(seq, last)
        r = db.execute(
            "SELECT seq FROM read_marks WHERE conversation=? AND identity=?",
            (conversation, identity),
        ).fetchone()
        if r is not None and r[0] >= seq:
            return None
        if seq <= 0:
            return None
        db.execute(
            "INSERT INTO read_marks VALUES (?, ?, ?) ON CONFLICT (conversation, identity) "
            "DO UPDATE SET seq=excluded.seq",
            (conversation, identity, seq),
        )
        return seq
