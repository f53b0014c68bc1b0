"""``ChatStore`` on SQLite in WAL mode, without blocking the event loop.

- Writes go to the writer process (``signaling.chat.writer``), which owns the write connection
  and commits whatever has queued up in one transaction (group commit). Requests leave as one
  JSON line each, gathered per event-loop turn (or per ``FLUSH_LINES``) into one socket write;
  each transaction comes back as one line of results, in request order, which settle the
  callers' futures or call their ``append_nowait`` callbacks. A writer process that dies fails
  the writes in flight with ``internal_error`` (a client's retry with the same ``cid`` is
  stored once) and is restarted.
  Why a process and not a thread: the writer's Python and its bindings would otherwise share
  the event loop's GIL, and its SQLite time the loop's core (see docs/BENCHMARKS.md).
- One reader thread serves history and sync queries from its own connection (WAL readers do not
  block the writer).
- A full disk: the writer reports each ENOSPC it hits and, later, that space is back (see
  ``signaling.chat.writer``). In between every write is refused at once with ``store_full``
  (retryable, ``retry_after_ms``) instead of being sent to fail; reads go on. ``disk_full``
  shows the state (``/healthz``, ``/metrics``).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import os
import socket
import sqlite3
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..core.directory import DeviceInfo
from ..core.metrics import Metric
from ..core.privacy import Pair, Relation, contacts_list
from ..core.writes import WriteBatch
from ..wire.errors import ProtocolError
from . import codec
from .codec import (
    COLUMNS,
    ChangeRelation,
    MarkRead,
    RegisterIdentity,
    SetMute,
    TouchDevice,
    WriterRequest,
)
from .groups import ChangeGroup, GroupState
from .schema import connect
from .store import (
    AppendDone,
    ConversationRow,
    GroupResult,
    NewMessage,
    Page,
    StoredMessage,
    fill_page,
)

log = logging.getLogger(__name__)

# Who hears about a write: a future (``_submit``) or an ``append_nowait`` callback; and
# whether its value is a stored row to turn into ``(StoredMessage, duplicate)``.
Waiter = tuple[asyncio.Future[Any] | Callable[[Any], None], bool]

WAL_RESTART_FRAMES = 4096  # WAL pages (16 MiB) after which the writer finishes a checkpoint
CHECKPOINT_INTERVAL_S = 1.0  # between background checkpoints while there are writes
RESTART_DELAY_S = 1.0  # before a writer process that died is started again
# While the disk is full the writer checks for space at least this often (backing off up to
# it); a refused write's retry_after_ms.
FULL_RETRY_S = 5.0
# Requests are written to the writer at the end of the loop turn, or as soon as this many are
# waiting: under load a turn takes milliseconds, and requests from its start would otherwise
# wait for its end while the writer idles. At 7,800 msgs/s (alternating steps, four each):
# ack p50 6-8 ms instead of 5-14, 4 of 4 steps with p99 under 50 ms instead of 1 of 4. Every
# request on its own write cost the loop a syscall each and did worse at that rate.
FLUSH_LINES = 8


def _row(r: tuple[Any, ...]) -> StoredMessage:
    return StoredMessage(*r)


class _Link(asyncio.Protocol):
    """The server's end of the socket pair to the writer process."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[str] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()  # every answer read

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        *lines, self.buf = (self.buf + data).split(b"\n")
        with self.store.writes:  # every frame of this read's results: a write per connection
            for line in lines:
                results = codec.decode_results(line)
                head = results[0]
                if type(head) is not str:  # a transaction's results
                    self.store._resolve(results)
                elif head == "full":
                    self.store._disk(bool(results[1]))
                elif head == "ready":
                    self.ready.set_result(str(results[1]))
                else:
                    self.ready.set_exception(RuntimeError(results[1]))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(RuntimeError("the store writer exited at start-up"))
        self.closed.set_result(None)
        self.store._lost(self)


class SqliteStore:
    """SQLite ``ChatStore`` (see the module docstring for its processes and threads)."""

    def __init__(
        self,
        path: Path | str,
        synchronous: str = "normal",
        *,
        wal_restart_frames: int = WAL_RESTART_FRAMES,
        checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S,
        full_retry_s: float = FULL_RETRY_S,
    ) -> None:
        self.path = Path(path)
        self.synchronous = synchronous
        self.wal_restart_frames = wal_restart_frames
        self.checkpoint_interval_s = checkpoint_interval_s
        self.full_retry_s = full_retry_s
        self.epoch = ""
        self.on_group: Callable[[GroupResult], None] | None = None
        # Held while results are settled (``signaling.app``: the hub's, so that each
        # connection gets one write for all of them).
        self.writes = WriteBatch()
        self.proc: asyncio.subprocess.Process | None = None
        self._link: _Link | None = None
        self._out: list[bytes] = []  # request lines not yet written to the writer
        self._waiting: collections.deque[Waiter] = collections.deque()  # sent, not answered
        self._closing = False
        self._restart: asyncio.Task[None] | None = None
        self._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store-read")
        self._rdb: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.commits = 0
        self.batched = 0
        self.restarts = 0
        self.disk_full = False  # writes are refused (``store_full``) until the writer says
        self.disk_full_errors = 0  # ENOSPC the writer hit

    # -- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._closing = False
        await self._start()

    async def _start(self) -> None:
        assert self._loop is not None
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",  # no working directory on the path: only the installed package runs
                "-m",
                "signaling.chat.writer",
                "--fd",
                str(child.fileno()),
                "--path",
                str(self.path),
                "--synchronous",
                self.synchronous,
                "--wal-restart-frames",
                str(self.wal_restart_frames),
                "--checkpoint-interval",
                str(self.checkpoint_interval_s),
                "--full-retry",
                str(self.full_retry_s),
                # A writer started again while the disk is full goes on checking for space.
                *(["--full"] if self.disk_full else []),
                pass_fds=[child.fileno()],
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,  # a terminal's Ctrl-C is the server's to handle
            )
        finally:
            child.close()
        _, link = await self._loop.create_unix_connection(lambda: _Link(self), sock=parent)
        try:
            self.epoch = await asyncio.wait_for(link.ready, 30)
        except (RuntimeError, TimeoutError):
            assert link.transport is not None
            link.transport.close()
            await self._reap()
            raise
        self._link = link
        if self._out:  # written while the writer restarted
            self._flush()

    async def _reap(self) -> None:
        if self.proc is not None:
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
            self.proc = None

    async def close(self) -> None:
        """Finish every write sent so far, checkpoint, and close the connections."""
        self._closing = True
        if self._restart is not None:
            self._restart.cancel()
            await asyncio.gather(self._restart, return_exceptions=True)
            self._restart = None
        link = self._link
        if link is not None and link.transport is not None:
            self._flush()
            link.transport.write_eof()  # the writer answers the rest, then exits
            try:  # read the last answers before the socket goes
                await asyncio.wait_for(asyncio.shield(link.closed), 60)
            except TimeoutError:
                log.error("the store writer did not finish in 60 s")
            link.transport.close()
        self._link = None
        self._fail(ProtocolError("internal_error", "the store is closed"), unsent_too=True)
        await self._reap()
        if self._rdb is not None:
            rdb = self._rdb
            await asyncio.get_running_loop().run_in_executor(self._reader, rdb.close)
            self._rdb = None
        self._reader.shutdown(wait=True)

    def _lost(self, link: _Link) -> None:
        """The writer's end closed: at shutdown after its last answers, or it died."""
        if link is not self._link:
            return
        self._link = None
        self._fail(ProtocolError("internal_error", "the store writer stopped"), unsent_too=False)
        if not self._closing:
            log.error("the store writer process exited; restarting it")
            self._restart = asyncio.ensure_future(self._restart_later())

    async def _restart_later(self) -> None:
        await self._reap()
        while not self._closing:
            await asyncio.sleep(RESTART_DELAY_S)
            try:
                await self._start()
            except (RuntimeError, TimeoutError, OSError) as e:
                log.error("the store writer did not start again: %s", e)
                continue
            self.restarts += 1
            return

    def _fail(self, err: ProtocolError, unsent_too: bool) -> None:
        """Answer the writes sent and not answered with ``err`` (their outcome is unknown);
        those not sent yet wait for the next writer, unless ``unsent_too``."""
        waiting = self._waiting
        n = len(waiting) if unsent_too else len(waiting) - len(self._out)
        if unsent_too:
            self._out = []
        failed = [waiting.popleft() for _ in range(n)]
        _settle(failed, [codec.refused(err)] * n)

    def _disk(self, full: bool) -> None:
        """The writer's report: it hit a full disk (once per ENOSPC), or space is back."""
        if full:
            self.disk_full_errors += 1
            if not self.disk_full:
                log.error("the chat store's disk is full: chat writes are refused")
        elif self.disk_full:
            log.warning("the chat store has space again: chat writes are accepted")
        self.disk_full = full

    # -- writes ----------------------------------------------------------------------------------

    def _send(self, line: bytes, waiter: Waiter) -> None:
        if self._closing or self._loop is None:
            raise RuntimeError("the store is closed")
        if self.disk_full:  # it would fail in the writer: refuse it now, queue nothing
            raise ProtocolError(
                "store_full",
                "the server's disk is full: nothing was stored",
                retry_after_ms=int(self.full_retry_s * 1000),
            )
        out = self._out
        if not out:
            self._loop.call_soon(self._flush)
        out.append(line)
        self._waiting.append(waiter)
        if len(out) >= FLUSH_LINES:  # a long loop turn: let the writer start on these
            self._flush()

    def _flush(self) -> None:
        link = self._link
        if link is None or link.transport is None or not self._out:
            return  # sent once the writer is back (``_start``)
        out, self._out = self._out, []
        link.transport.write(b"".join(out))

    def _resolve(self, results: list[list[Any]]) -> None:
        """One transaction's results, for the oldest writes in flight."""
        self.commits += 1
        self.batched += len(results)
        waiting = self._waiting
        _settle([waiting.popleft() for _ in results], results)

    def _future(self, line: bytes, row: bool) -> asyncio.Future[Any]:
        assert self._loop is not None, "store is not open"
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._send(line, (fut, row))
        return fut

    def _submit(self, request: WriterRequest) -> asyncio.Future[Any]:
        return self._future(codec.encode_request(request), False)

    def append(self, msg: NewMessage) -> asyncio.Future[tuple[StoredMessage, bool]]:
        return self._future(codec.append_request(msg), True)

    def append_nowait(self, msg: NewMessage, done: AppendDone) -> None:
        self._send(codec.append_request(msg), (done, True))

    async def mark_read(self, conversation: str, identity: str, seq: int) -> int | None:
        result: int | None = await self._submit(MarkRead(conversation, identity, seq))
        return result

    async def touch_device(self, identity: str, device: str, name: str, now_ms: int) -> None:
        await self._submit(TouchDevice(identity, device, name, now_ms))

    async def register_identity(self, identity: str, now_ms: int) -> None:
        await self._submit(RegisterIdentity(identity, now_ms))

    def change_group(self, req: ChangeGroup) -> asyncio.Future[GroupResult]:
        assert self._loop is not None, "store is not open"
        fut: asyncio.Future[GroupResult] = self._loop.create_future()

        def done(value: list[Any] | ProtocolError) -> None:
            if isinstance(value, ProtocolError):
                if not fut.done():
                    fut.set_exception(value)
                return
            result = codec.decode_group_value(value)
            if not result.duplicate and self.on_group is not None:
                self.on_group(result)  # now, before the results after this one
            if not fut.done():
                fut.set_result(result)

        self._send(codec.encode_request(req), (done, False))
        return fut

    async def set_mute(self, identity: str, conversation: str, muted: bool) -> None:
        await self._submit(SetMute(identity, conversation, muted))

    async def change_relation(
        self, action: str, actor: str, other: str, now_ms: int, max_pending: int
    ) -> tuple[Pair, Pair]:
        value = await self._submit(ChangeRelation(action, actor, other, now_ms, max_pending))
        return codec.decode_relation_value(value)

    def metrics(self) -> Iterable[Metric]:
        yield Metric(
            "store_commits", "counter", "Transactions the store writer committed.", self.commits
        )
        yield Metric("store_writes", "counter", "Writes in those transactions.", self.batched)
        yield Metric(
            "store_writer_restarts",
            "counter",
            "Times the store writer process died and was started again.",
            self.restarts,
        )
        yield Metric(
            "store_disk_full",
            "gauge",
            "1 while the chat store's disk is full: chat writes are refused (store_full) until "
            "the writer finds space again.",
            float(self.disk_full),
        )
        yield Metric(
            "store_disk_full_errors",
            "counter",
            "Times the chat store hit a full disk (ENOSPC): in a commit, a checkpoint, the WAL "
            "restart, or a check for space while full.",
            self.disk_full_errors,
        )
        try:
            wal = os.stat(f"{self.path}-wal").st_size
        except FileNotFoundError:
            wal = 0
        yield Metric(
            "store_wal_bytes",
            "gauge",
            "Size of the chat store's WAL file; it stays below wal_restart_frames pages plus "
            "about one checkpoint interval's writes unless checkpoints fail.",
            wal,
        )

    # -- reads -----------------------------------------------------------------------------------

    async def _read(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._reader, fn, *args)

    def _rconn(self) -> sqlite3.Connection:
        if self._rdb is None:
            self._rdb = connect(self.path, self.synchronous)
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

    def _windows_sync(self, conversation: str, identity: str) -> list[tuple[int, int | None]]:
        rows = (
            self._rconn()
            .execute(
                "SELECT joined_seq, left_seq FROM group_members "
                "WHERE conversation=? AND identity=? ORDER BY joined_seq",
                (conversation, identity),
            )
            .fetchall()
        )
        return [(int(a), None if b is None else int(b)) for a, b in rows]

    def _visible(
        self, conversation: str, viewer: str | None, last: int
    ) -> tuple[str, tuple[int | str, ...], int]:
        """What ``viewer`` sees of a conversation: the SQL condition that keeps it, its
        parameters, and the last sequence it sees. Of a group: its membership windows
        (``bad_conversation`` for a group it never belonged to); of a direct conversation:
        everything but the messages withheld from it (it blocks their sender)."""
        if viewer is None or conversation[0] == "r":
            return "", (), last
        if conversation[0] == "d":
            if last:
                r = (
                    self._rconn()
                    .execute(
                        "SELECT seq FROM messages WHERE conversation=? AND seq<=? "
                        "AND hidden_from IS NOT ? ORDER BY seq DESC LIMIT 1",
                        (conversation, last, viewer),
                    )
                    .fetchone()
                )
                last = int(r[0]) if r else 0
            return " AND hidden_from IS NOT ?", (viewer,), last
        windows = self._windows_sync(conversation, viewer)
        if not windows:
            raise ProtocolError("bad_conversation", f"{conversation!r} is not a group of yours")
        cond = " AND (" + " OR ".join("seq BETWEEN ? AND ?" for _ in windows) + ")"
        params = tuple(x for lo, hi in windows for x in (lo, last if hi is None else hi))
        end = windows[-1][1]
        return cond, params, last if end is None else min(last, end)

    def _page_sync(
        self,
        conversation: str,
        before: int | None,
        after: int | None,
        limit: int,
        max_bytes: int | None,
        viewer: str | None,
    ) -> Page:
        db = self._rconn()
        db.execute("BEGIN")  # one snapshot for the page and last_seq
        try:
            last = self._last_seq_sync(conversation)
            cond, params, last = self._visible(conversation, viewer, last)
            if after is not None:
                cursor = db.execute(
                    f"SELECT {COLUMNS} FROM messages WHERE conversation=? AND seq>?{cond} "
                    "ORDER BY seq LIMIT ?",
                    (conversation, after, *params, limit + 1),
                )
            else:
                b = last + 1 if before is None else min(before, last + 1)
                cursor = db.execute(
                    f"SELECT {COLUMNS} FROM messages WHERE conversation=? AND seq<?{cond} "
                    "ORDER BY seq DESC LIMIT ?",
                    (conversation, b, *params, limit + 1),
                )
            # Row by row: a page never holds more than its byte budget (and one row more).
            msgs, more = fill_page(map(_row, cursor), limit, max_bytes)
            cursor.close()
            if after is None:
                msgs.reverse()
        finally:
            db.execute("COMMIT")
        return Page(msgs, more, last)

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
            self._page_sync, conversation, before, after, limit, max_bytes, viewer
        )
        return result

    def _unread_sync(
        self, conversation: str, identity: str, upto: int | None
    ) -> tuple[int, int, int]:
        """(read watermark, unread count, last visible sequence) of ``identity``."""
        last = self._last_seq_sync(conversation)
        if upto is not None:
            last = min(last, upto)
        cond, params, last = self._visible(conversation, identity, last)
        read = self._read_seq_sync(conversation, identity)
        return read, self._count_unread(conversation, identity, read, last, cond, params), last

    def _count_unread(
        self,
        conversation: str,
        identity: str,
        read: int,
        last: int,
        cond: str,
        params: tuple[int | str, ...],
    ) -> int:
        if read >= last:
            return 0
        r = (
            self._rconn()
            .execute(
                "SELECT COUNT(*) FROM messages WHERE conversation=? AND seq>? AND seq<=? "
                f"AND sender<>? AND kind IN ('text', 'call') AND deleted=0{cond}",
                (conversation, read, last, identity, *params),
            )
            .fetchone()
        )
        return int(r[0])

    async def unread(self, conversation: str, identity: str, upto: int | None = None) -> int:
        """Messages of others (texts and call logs, not deleted) after ``identity``'s read
        watermark, within what it sees (up to ``upto``)."""
        _, n, _ = await self._read(self._unread_sync, conversation, identity, upto)
        return int(n)

    def _list_sync(
        self, identity: str, limit: int, after: tuple[int, str] | None
    ) -> tuple[list[ConversationRow], bool]:
        db = self._rconn()
        db.execute("BEGIN")  # one snapshot
        try:
            # Direct conversations and rooms (listed in ``members``), then groups: a current
            # member sees up to the end, a former member up to its removal.
            found: list[tuple[int, str, int, str | None]] = []
            for c, last, u, hidden in db.execute(
                "SELECT c.id, c.last_seq, c.updated_at, (SELECT hidden_from FROM messages x "
                "WHERE x.conversation = c.id AND x.seq = c.last_seq) FROM members m "
                "JOIN conversations c ON c.id = m.conversation WHERE m.identity = ?",
                (identity,),
            ):
                if hidden == identity:  # its last messages are withheld from it
                    r = db.execute(
                        "SELECT seq, ts FROM messages WHERE conversation=? "
                        "AND hidden_from IS NOT ? ORDER BY seq DESC LIMIT 1",
                        (c, identity),
                    ).fetchone()
                    if r is None:  # nothing but withheld messages: not a conversation of its
                        continue
                    last, u = r
                found.append((int(u), str(c), int(last), None))
            latest: dict[str, tuple[int | None, str]] = {}
            for conv, left, role in db.execute(
                "SELECT conversation, left_seq, role FROM group_members WHERE identity=? "
                "ORDER BY conversation, joined_seq",
                (identity,),
            ):
                latest[conv] = (left, role)
            for conv, (left, role) in latest.items():
                r = db.execute(
                    "SELECT last_seq, updated_at FROM conversations WHERE id=?", (conv,)
                ).fetchone()
                if left is None:
                    found.append((int(r[1]), conv, int(r[0]), role))
                else:
                    t = db.execute(
                        "SELECT ts FROM messages WHERE conversation=? AND seq=?", (conv, left)
                    ).fetchone()
                    found.append((int(t[0]), conv, int(left), None))
            found.sort(key=lambda x: (-x[0], x[1]))
            if after is not None:
                au, ac = after
                found = [x for x in found if x[0] < au or (x[0] == au and x[1] > ac)]
            more = len(found) > limit
            rows: list[ConversationRow] = []
            for updated, conv, _, role in found[:limit]:
                rows.append(self._row_of(identity, conv, updated, role))
        finally:
            db.execute("COMMIT")
        return rows, more

    def _row_of(self, identity: str, conv: str, updated: int, role: str | None) -> ConversationRow:
        db = self._rconn()
        last = self._last_seq_sync(conv)
        cond, params, last = self._visible(conv, identity, last)
        read = self._read_seq_sync(conv, identity)
        m = db.execute(
            "SELECT muted FROM conversation_settings WHERE identity=? AND conversation=?",
            (identity, conv),
        ).fetchone()
        row = ConversationRow(
            conv,
            last,
            updated,
            read,
            self._count_unread(conv, identity, read, last, cond, params),
            bool(m and m[0]),
            role=role,
        )
        if conv[0] == "g":
            if role is None:  # a former member: the name it knew, not a later one
                row.name = self._group_name_at_sync(conv, last)
            else:
                g = db.execute("SELECT name FROM groups WHERE conversation=?", (conv,)).fetchone()
                row.name = str(g[0])
        r = db.execute(
            f"SELECT {COLUMNS} FROM messages WHERE conversation=? AND seq<=? "
            f"AND kind IN ('text', 'call', 'system') AND deleted=0{cond} "
            "ORDER BY seq DESC LIMIT 1",
            (conv, last, *params),
        ).fetchone()
        if r is not None:
            msg = _row(r)
            if msg.kind == "text":  # as last edited (within what the identity sees)
                e = db.execute(
                    "SELECT text FROM messages WHERE conversation=? AND kind='edit' AND ref=? "
                    "AND seq<=? ORDER BY seq DESC LIMIT 1",
                    (conv, msg.seq, last),
                ).fetchone()
                if e is not None:
                    msg.text = e[0]
            row.last_message = msg
        return row

    def _group_name_at_sync(self, conversation: str, seq: int) -> str:
        r = (
            self._rconn()
            .execute(
                "SELECT json_extract(meta, '$.name') FROM messages WHERE conversation=? "
                "AND kind='system' AND seq<=? "
                "AND json_extract(meta, '$.action') IN ('created', 'renamed') "
                "ORDER BY seq DESC LIMIT 1",
                (conversation, seq),
            )
            .fetchone()
        )
        return str(r[0]) if r and r[0] is not None else ""

    async def group_name_at(self, conversation: str, seq: int) -> str:
        name: str = await self._read(self._group_name_at_sync, conversation, seq)
        return name

    async def conversation_list(
        self, identity: str, limit: int, after: tuple[int, str] | None = None
    ) -> tuple[list[ConversationRow], bool]:
        """``identity``'s conversations, newest first (by the time of the last message it
        sees), at most ``limit`` after the position ``after`` ((updated_at, conversation) of
        the last one of the previous page); and whether there are more."""
        result: tuple[list[ConversationRow], bool] = await self._read(
            self._list_sync, identity, limit, after
        )
        return result

    def _groups_sync(self) -> tuple[dict[str, GroupState], dict[str, set[str]]]:
        db = self._rconn()
        groups = {
            str(c): GroupState(str(c), str(n), str(b))
            for c, n, b in db.execute(
                "SELECT conversation, name, created_by FROM groups WHERE deleted=0"
            )
        }
        for c, i, r in db.execute(
            "SELECT conversation, identity, role FROM group_members WHERE left_seq IS NULL"
        ):
            g = groups.get(c)
            if g is not None:
                g.members[str(i)] = str(r)
        muted: dict[str, set[str]] = {}
        for i, c in db.execute(
            "SELECT identity, conversation FROM conversation_settings WHERE muted=1"
        ):
            muted.setdefault(str(c), set()).add(str(i))
        return groups, muted

    async def load_groups(self) -> tuple[dict[str, GroupState], dict[str, set[str]]]:
        """Every group that exists, with its current members, and who muted what
        (conversation -> identities): the server keeps both in memory."""
        result: tuple[dict[str, GroupState], dict[str, set[str]]] = await self._read(
            self._groups_sync
        )
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

    # -- relations (signaling.core.privacy) ------------------------------------------------------

    def _blocks_sync(self) -> list[tuple[str, str]]:
        rows = self._rconn().execute("SELECT identity, blocked FROM blocks").fetchall()
        return [(str(a), str(b)) for a, b in rows]

    async def all_blocks(self) -> list[tuple[str, str]]:
        result: list[tuple[str, str]] = await self._read(self._blocks_sync)
        return result

    def _contacts_among_sync(self, identity: str, others: list[str]) -> set[str]:
        db = self._rconn()
        q = "SELECT 1 FROM contacts WHERE identity=? AND contact=?"
        return {o for o in others if db.execute(q, (identity, o)).fetchone() is not None}

    async def contacts_among(self, identity: str, others: list[str]) -> set[str]:
        result: set[str] = await self._read(self._contacts_among_sync, identity, others)
        return result

    def _related_sync(self, identity: str, others: list[str]) -> set[str]:
        db = self._rconn()
        out = set()
        for o in others:
            if (
                db.execute(
                    "SELECT 1 FROM contacts WHERE identity=? AND contact=?", (identity, o)
                ).fetchone()
                or db.execute(
                    "SELECT 1 FROM group_members m1 "
                    "JOIN group_members m2 ON m2.conversation = m1.conversation "
                    "JOIN groups g ON g.conversation = m1.conversation "
                    "WHERE m1.identity=? AND m1.left_seq IS NULL AND m2.identity=? "
                    "AND m2.left_seq IS NULL AND g.deleted = 0 LIMIT 1",
                    (identity, o),
                ).fetchone()
                or self._both_wrote(db, identity, o)
            ):
                out.add(o)
        return out

    @staticmethod
    def _both_wrote(db: sqlite3.Connection, a: str, b: str) -> bool:
        """Whether ``a`` and ``b`` each have a text of their own in their direct conversation
        (a message from a stranger alone unlocks nothing)."""
        x, y = sorted((a, b))
        conv = f"dm:{x}|{y}"
        q = (
            "SELECT 1 FROM messages WHERE conversation=? AND sender=? AND kind='text' "
            "AND hidden_from IS NULL LIMIT 1"
        )
        return all(db.execute(q, (conv, who)).fetchone() is not None for who in (a, b))

    async def related(self, identity: str, others: list[str]) -> set[str]:
        result: set[str] = await self._read(self._related_sync, identity, others)
        return result

    def _relations_sync(self, identity: str) -> list[Relation]:
        db = self._rconn()
        contacts = {
            str(r[0])
            for r in db.execute("SELECT contact FROM contacts WHERE identity=?", (identity,))
        }
        asked = {
            str(r[0])
            for r in db.execute(
                "SELECT target FROM contact_requests WHERE requester=?", (identity,)
            )
        }
        incoming = {
            str(r[0]): bool(r[1])
            for r in db.execute(
                "SELECT requester, dismissed FROM contact_requests WHERE target=?", (identity,)
            )
        }
        blocks = {
            str(r[0])
            for r in db.execute("SELECT blocked FROM blocks WHERE identity=?", (identity,))
        }
        return contacts_list(contacts, asked, incoming, blocks)

    async def relations_of(self, identity: str) -> list[Relation]:
        """How ``identity`` sees everyone it has a relation with (its `contacts` list)."""
        result: list[Relation] = await self._read(self._relations_sync, identity)
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


def _settle(waiters: list[Waiter], results: list[codec.Result]) -> None:
    """Settle each write's future, or call its ``append_nowait`` callback."""
    decode = codec.decode_result
    for (waiter, row), r in zip(waiters, results, strict=True):
        value = decode(r, row)
        if not isinstance(waiter, asyncio.Future):
            try:
                waiter(value)
            except Exception:  # a callback must not raise; if one does, the others still run
                log.exception("a store write's callback failed")
        elif waiter.done():
            continue
        elif r[0]:
            waiter.set_result(value)
        else:
            waiter.set_exception(value)
