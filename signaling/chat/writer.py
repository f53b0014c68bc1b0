"""The chat store's writer process: every write to the SQLite file happens here.

``SqliteStore`` (in the server process) starts ``python -m signaling.chat.writer`` with one end
of a socket pair and sends it requests, one line each; this process answers with one line per
transaction, the results in request order (the formats: ``signaling.chat.codec``). Keeping
the writes out of the server process keeps their CPU time and, above all, their GIL time off
the event loop: the loop only encodes a request and decodes a result, and the operating
system can run the writer on another core (bench/signaling.py measures both).

- Group commit: the process takes everything that has arrived and commits it in one
  transaction. Under light load it does not wait for more, so a lone message is committed at
  once. Under load (the previous transaction carried ``BUSY_BATCH`` writes or more) it first
  waits ``BUSY_WINDOW_S`` for more to arrive: fewer, larger transactions cost less per message
  and the process wakes a few hundred times a second instead of thousands.
- Automatic checkpoints are off; a checkpoint thread runs them in the background (SQLite's
  checkpoints in the commit path put the p99 at 13-17 ms; see signaling-facts). SQLite starts
  the WAL file over only when a transaction begins after a checkpoint copied all of it, which
  a background checkpoint never manages while writes go on: under steady load the WAL grew by
  ~36 MB/s without end. So once it holds ``wal_restart_frames`` pages the checkpoint thread
  asks the writer to finish the job between two transactions, and the next transaction
  rewinds. Nothing commits while the writer does that (copy and two fsyncs of what it wrote
  since the last background pass), so the thread first catches up with a few more passes,
  each copying what arrived during the one before, until one is quick. Measured at 7,000
  msgs/s (five 10 s steps, five alternating runs each): the writer's part 5-8 ms instead of
  18-22 ms (median), ack p99 12-34 ms instead of 20-45 ms, 25 of 25 steps under 50 ms instead
  of 21 of 25.
- Sequence numbers are assigned here, inside the transaction that stores the message, so they
  are gap-free and never reused, even across crashes.
- A full disk (ENOSPC, wherever it shows: a commit, a checkpoint, the writer's WAL restart)
  fails only what it touched: a commit's writes are answered ``store_full`` (rolled back,
  nothing stored), and the process tells the server, which refuses writes at once from then on
  instead of sending ones that would fail (``["full", 1]``, a line per ENOSPC). The checkpoint
  thread survives it and checks for space, with a backoff up to ``--full-retry`` seconds: when
  ``wal_restart_frames`` pages fit beside the store again (one WAL cycle, which the checkpoint
  needs to copy the WAL into the database) and a truncating checkpoint has emptied the WAL, it
  says so (``["full", 0]``) and writes go on. Space is probed, not read from ``statvfs``: a
  write that fits is what counts (quotas, reserved blocks, odd filesystems). A writer started
  again while the disk was full starts in that state (``--full``).
- End of input (the server closed its end, or died) means: commit what has arrived, answer,
  checkpoint, exit. The process ignores SIGINT and SIGTERM (it runs in its own session, so a
  terminal's Ctrl-C reaches only the server, which then closes the store in order).

"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import sqlite3
import threading
import time
from typing import Any

import orjson

from ..core.privacy import Pair, Side
from ..core.privacy import plan as relation_plan
from ..wire.errors import ProtocolError
from . import codec
from .codec import COLUMNS, ChangeRelation, MarkRead, RegisterIdentity, SetMute, TouchDevice
from .groups import ChangeGroup, GroupState
from .groups import plan as group_plan
from .schema import connect, migrate
from .store import NewMessage, Original, StoredMessage, check_amend

log = logging.getLogger("rallypoint.store")

BUSY_BATCH = 4  # writes in the previous transaction that mean "under load"
BUSY_WINDOW_S = 0.0005  # then wait this long for more before the next transaction
MAX_BATCH = 2048  # requests per transaction
CATCH_UP_PASSES = 4  # background passes at most before the writer finishes a checkpoint
QUICK_PASS_S = 0.005  # a pass this short left little for the writer
# A delete blanks the edits of its original too (index messages_edits, migration 3).
BLANK_EDITS = "UPDATE messages SET text=NULL WHERE conversation=? AND kind='edit' AND ref=?"
# Is the sender of a message in a group a member now (the server checked its cache; this is
# the word that counts, in the transaction)?
IS_MEMBER = "SELECT 1 FROM group_members WHERE conversation=? AND identity=? AND left_seq IS NULL"
GROUP_EXISTS = "SELECT 1 FROM groups WHERE conversation=? AND deleted=0"
ROOM_CHATTERS_CACHE = 100_000  # (identity, room) pairs known to be in ``members``
FULL_RETRY_MIN_S = 0.25  # the first check for space after the disk filled; doubles from there
# What SQLite says when the disk is full: SQLITE_FULL (its ENOSPC), and a failure to grow the
# WAL index (-shm), which it extends by writing to it: ENOSPC in practice, and missing it would
# leave a full disk looking like a bug (internal_error) until a checkpoint also failed.
NO_SPACE_CODES = frozenset({sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR_SHMSIZE})
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
NO_FALLOCATE_ERRNOS = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})


def no_space(e: BaseException) -> bool:
    """Whether ``e`` says the disk (or the quota) is full."""
    if isinstance(e, sqlite3.Error):
        return e.sqlite_errorcode in NO_SPACE_CODES
    return isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS


def probe(path: str, nbytes: int) -> None:
    """Raise OSError (ENOSPC) unless ``nbytes`` more fit beside the store at ``path``."""
    name = path + "-space"
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:  # blocks reserved, no data written (glibc writes them where the FS cannot)
            os.posix_fallocate(fd, 0, nbytes)
        except (OSError, AttributeError) as e:
            if isinstance(e, OSError) and e.errno not in NO_FALLOCATE_ERRNOS:
                raise
            zeros = bytes(1 << 16)  # no posix_fallocate here (macOS, musl on some FS)
            done = 0
            while done < nbytes:
                done += os.write(fd, zeros)
    finally:
        try:
            os.unlink(name)  # first: the blocks go at the close, whatever the close says
        finally:
            os.close(fd)  # may raise ENOSPC too: NFS reports write errors here


class Space:
    """Whether the disk is full, and the socket to the server: both threads report on it, so
    a lock keeps their lines whole and the state in step with what the server heard."""

    def __init__(self, sock: socket.socket, full: bool, retry_ms: int) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.full = full
        self.hits = 0  # ENOSPC seen; a check for space that saw a new one meanwhile is stale
        self.retry_ms = retry_ms  # the longest wait between checks: when writers should retry

    def send(self, data: bytes) -> None:
        with self.lock:
            self.sock.sendall(data)

    def _report(self, full: bool) -> None:
        try:
            self.sock.sendall(codec.full_line(full))
        except OSError:  # the server went away: the main thread sees end of input and exits
            pass

    def hit(self, where: str, e: BaseException) -> None:
        """The disk is full: the server refuses writes from now on (each call is one ENOSPC)."""
        with self.lock:
            was = self.full
            self.full = True
            self.hits += 1
            self._report(True)
        if not was:
            log.error("the disk is full (%s: %s); writes are refused until space is back", where, e)

    def cleared(self, hits: int) -> bool:
        """Space is back, unless the disk filled again since ``hits`` was read."""
        with self.lock:
            if self.hits != hits:
                return False
            self.full = False
            self._report(False)
        log.warning("space is back: writes are accepted again")
        return True

    def store_full(self) -> codec.Result:
        return codec.failed(
            "store_full", "the server's disk is full: nothing was stored", self.retry_ms
        )


class Writer:
    """The writer's state: the write connection and the last sequence per conversation."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.cur = db.cursor()  # reused: Connection.execute makes a new cursor per statement
        self.last: dict[str, int] = {}
        self.pending: dict[str, int] = {}  # changed in the open transaction
        # (identity, room conversation) pairs in ``members`` (the rooms an identity chatted or
        # read in: its conversation list); an insert per message otherwise.
        self.chatters: set[tuple[str, str]] = set()

    def flush(self) -> None:
        """Write the last sequence (and the time) of every conversation changed in this
        transaction."""
        now = int(time.time() * 1000)
        self.db.executemany(
            "UPDATE conversations SET last_seq=?, updated_at=? WHERE id=?",
            [(seq, now, conv) for conv, seq in self.pending.items()],
        )

    def committed(self) -> None:
        self.last.update(self.pending)
        self.pending.clear()

    def rolled_back(self) -> None:
        self.pending.clear()
        self.chatters.clear()

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
        self.db.execute(
            "INSERT INTO conversations (id, last_seq, created_at, updated_at) VALUES (?, 0, ?, ?)",
            (conversation, now, now),
        )
        self.db.executemany(
            "INSERT OR IGNORE INTO members VALUES (?, ?)", [(m, conversation) for m in members]
        )
        self.pending[conversation] = 0
        return 0

    def _duplicate(self, msg: NewMessage) -> list[Any] | None:
        dup = self.db.execute(
            f"SELECT {COLUMNS} FROM messages WHERE conversation=? AND sender=? AND cid=?",
            (msg.conversation, msg.sender, msg.cid),
        ).fetchone()
        return None if dup is None else codec.encode_row(StoredMessage(*dup), True)

    def append(self, msg: NewMessage) -> list[Any]:
        """Store ``msg``; the stored row and whether it was a duplicate."""
        db = self.db
        now = int(time.time() * 1000)
        hidden = msg.hidden_from
        if msg.contact_required and not self._contacts(msg):
            found = self._duplicate(msg)  # a retry of one sent while they were contacts
            if found is not None:
                return found
            raise ProtocolError(
                "not_contact", "direct messages on this server are between contacts only"
            )
        conv = msg.conversation
        if conv[0] == "g" and msg.meta is None and msg.kind == "system":  # the backend's post
            if db.execute(GROUP_EXISTS, (conv,)).fetchone() is None:
                raise ProtocolError("bad_conversation", f"no group {conv!r}")
        elif conv[0] == "g" and msg.kind != "system" and msg.kind != "call":
            if db.execute(IS_MEMBER, (conv, msg.sender)).fetchone() is None:
                # Removed while the message was on its way (the server's cache said yes).
                found = self._duplicate(msg)  # unless it is a retry of one stored before
                if found is not None:
                    return found
                raise ProtocolError("bad_conversation", f"{conv!r} is not a group of yours")
        elif conv[0] == "r":
            self._chatted(msg.sender, conv)
        if msg.kind in ("edit", "delete"):
            # A retried edit or delete must get its first acknowledgement, not a refusal
            # because the first attempt already changed the original: look for it first.
            found = self._duplicate(msg)
            if found is not None:
                return found
            r = db.execute(
                "SELECT sender, kind, ts, deleted, hidden_from FROM messages "
                "WHERE conversation=? AND seq=?",
                (msg.conversation, msg.ref),
            ).fetchone()
            check_amend(msg, Original(r[0], r[1], r[2], bool(r[3])) if r else None, now)
            if r[4] is not None:  # a change to a withheld message is withheld too
                hidden = r[4]
            if msg.kind == "delete":
                # The text is gone from the store, not only hidden; the event stream keeps the
                # delete so every device removes it too.
                db.execute(
                    "UPDATE messages SET deleted=1, text=NULL WHERE conversation=? AND seq=?",
                    (msg.conversation, msg.ref),
                )
                db.execute(BLANK_EDITS, (msg.conversation, msg.ref))
        seq = self._last(msg.conversation, msg.members, now) + 1
        cur = self.cur
        try:
            cur.execute(
                "INSERT INTO messages "
                "(conversation, seq, sender, name, cid, kind, text, ref, ts, meta, hidden_from) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                    hidden,
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
        return codec.row(
            msg.conversation,
            seq,
            cur.lastrowid or 0,
            msg.cid,
            msg.sender,
            msg.name,
            msg.kind,
            msg.text,
            msg.ref,
            now,
            msg.meta,
            False,
            hidden,
        )

    def _chatted(self, identity: str, room: str) -> None:
        key = (identity, room)
        if key not in self.chatters:
            if len(self.chatters) >= ROOM_CHATTERS_CACHE:
                self.chatters.clear()
            self.db.execute("INSERT OR IGNORE INTO members VALUES (?, ?)", key)
            self.chatters.add(key)  # forgotten if the transaction rolls back

    def group_state(self, conversation: str) -> GroupState | None:
        db = self.db
        g = db.execute(
            "SELECT name, created_by, deleted FROM groups WHERE conversation=?", (conversation,)
        ).fetchone()
        if g is None:
            return None
        rows = db.execute(
            "SELECT identity, role FROM group_members WHERE conversation=? AND left_seq IS NULL",
            (conversation,),
        ).fetchall()
        return GroupState(conversation, g[0], g[1], dict(rows), bool(g[2]))

    def change_group(self, req: ChangeGroup) -> list[Any]:
        """Apply a group change (``signaling.chat.groups.plan`` decides, before anything is
        written) and append its event; ``codec.group_value``."""
        db = self.db
        conv = req.conversation
        event = NewMessage(conv, req.cid, req.actor, req.actor_name, "system", None)
        found = self._duplicate(event)
        state = self.group_state(conv)
        if found is not None:  # a retry: what the first attempt did
            assert state is not None
            return codec.group_value(found, True, state, ())
        p = group_plan(state, req.change(), req.max_members)
        now = int(time.time() * 1000)
        event.text = p.text
        event.meta = orjson.dumps(p.event).decode()
        if state is None:
            db.execute(
                "INSERT INTO groups VALUES (?, ?, ?, ?, 0)",
                (conv, p.state.name, p.state.created_by, now),
            )
        else:
            db.execute(
                "UPDATE groups SET name=?, deleted=? WHERE conversation=?",
                (p.state.name, int(p.state.deleted), conv),
            )
        row = self.append(event)
        seq = row[1]
        db.executemany(
            "INSERT INTO group_members VALUES (?, ?, ?, NULL, ?)",
            [(conv, i, seq, role) for i, role in p.joined.items()],
        )
        db.executemany(
            "UPDATE group_members SET left_seq=? "
            "WHERE conversation=? AND identity=? AND left_seq IS NULL",
            [(seq, conv, i) for i in p.gone],
        )
        db.executemany(
            "UPDATE group_members SET role=? "
            "WHERE conversation=? AND identity=? AND left_seq IS NULL",
            [(role, conv, i) for i, role in p.roles.items()],
        )
        return codec.group_value(row, False, p.state, p.gone)

    def set_mute(self, identity: str, conversation: str, muted: bool) -> None:
        self.db.execute(
            "INSERT INTO conversation_settings VALUES (?, ?, ?) "
            "ON CONFLICT (identity, conversation) DO UPDATE SET muted=excluded.muted",
            (identity, conversation, int(muted)),
        )

    def _contacts(self, msg: NewMessage) -> bool:
        """Whether the sender of a direct message and the other member are contacts."""
        a, b = msg.members
        other = b if msg.sender == a else a
        return (
            self.db.execute(
                "SELECT 1 FROM contacts WHERE identity=? AND contact=?", (msg.sender, other)
            ).fetchone()
            is not None
        )

    # -- relations (signaling.core.privacy) -----------------------------------------------------

    def _pair(self, a: str, b: str) -> Pair:
        db = self.db
        contact = (
            db.execute("SELECT 1 FROM contacts WHERE identity=? AND contact=?", (a, b)).fetchone()
            is not None
        )

        def request(x: str, y: str) -> tuple[bool, bool]:  # x asked y; y dismissed it
            r = db.execute(
                "SELECT dismissed FROM contact_requests WHERE requester=? AND target=?", (x, y)
            ).fetchone()
            return (r is not None, bool(r[0]) if r is not None else False)

        def blocks(x: str, y: str) -> bool:
            q = "SELECT 1 FROM blocks WHERE identity=? AND blocked=?"
            return db.execute(q, (x, y)).fetchone() is not None

        a_asked, b_dismissed = request(a, b)
        b_asked, a_dismissed = request(b, a)
        return Pair(
            contact,
            Side(a_asked, a_dismissed, blocks(a, b)),
            Side(b_asked, b_dismissed, blocks(b, a)),
        )

    def _write_side(self, x: str, y: str, old: Pair, new: Pair, now: int) -> None:
        """Write what changed of side ``a`` of ``new`` (``x`` toward ``y``)."""
        db = self.db
        if (old.a.requested, old.b.dismissed) != (new.a.requested, new.b.dismissed):
            if new.a.requested:
                db.execute(
                    "INSERT INTO contact_requests VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (requester, target) DO UPDATE SET dismissed=excluded.dismissed",
                    (x, y, now, int(new.b.dismissed)),
                )
            else:
                db.execute("DELETE FROM contact_requests WHERE requester=? AND target=?", (x, y))
        if old.a.blocks != new.a.blocks:
            if new.a.blocks:
                db.execute("INSERT INTO blocks VALUES (?, ?, ?)", (x, y, now))
            else:
                db.execute("DELETE FROM blocks WHERE identity=? AND blocked=?", (x, y))
        if old.contact != new.contact:
            if new.contact:
                db.execute("INSERT INTO contacts VALUES (?, ?, ?)", (x, y, now))
            else:
                db.execute("DELETE FROM contacts WHERE identity=? AND contact=?", (x, y))

    def change_relation(self, req: ChangeRelation) -> list[Any]:
        """Apply ``req`` to the pair (``plan``); the pair before and after."""
        a, b = req.actor, req.other
        if a == b:
            raise ProtocolError("bad_field", "that is yourself")
        before = self._pair(a, b)
        outgoing = 0
        if req.action == "request":
            r = self.db.execute(
                "SELECT count(*) FROM contact_requests WHERE requester=?", (a,)
            ).fetchone()
            outgoing = int(r[0])
        after = relation_plan(req.action, before, outgoing=outgoing, max_pending=req.max_pending)
        if after != before:
            self._write_side(a, b, before, after, req.now_ms)
            self._write_side(b, a, before.swapped(), after.swapped(), req.now_ms)
        return codec.relation_value(before, after)

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
        if conversation[0] == "g":  # a former member reads no further than their removal
            r = db.execute(
                "SELECT left_seq FROM group_members WHERE conversation=? AND identity=? "
                "ORDER BY joined_seq DESC LIMIT 1",
                (conversation, identity),
            ).fetchone()
            if r is None:
                raise ProtocolError("bad_conversation", f"{conversation!r} is not a group of yours")
            if r[0] is not None:
                last = min(last, r[0])
        elif conversation[0] == "r":
            self._chatted(identity, conversation)
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


def execute(w: Writer, req: codec.WriterRequest) -> Any:
    """Carry out one request in the open transaction; its result value."""
    if type(req) is NewMessage:
        return w.append(req)
    if type(req) is MarkRead:
        return w.mark_read(req.conversation, req.identity, req.seq)
    if type(req) is TouchDevice:
        return w.touch_device(req.identity, req.device, req.name, req.now_ms)
    if type(req) is RegisterIdentity:
        return w.register_identity(req.identity, req.now_ms)
    if type(req) is ChangeGroup:
        return w.change_group(req)
    if type(req) is SetMute:
        return w.set_mute(req.identity, req.conversation, req.muted)
    if type(req) is ChangeRelation:
        return w.change_relation(req)
    raise TypeError(f"unknown writer request {req!r}")


def run_batch(w: Writer, batch: list[bytes], space: Space) -> list[codec.Result]:
    """Execute requests in one transaction; a result per request, in order."""
    db = w.db
    results: list[codec.Result] = []
    try:
        db.execute("BEGIN IMMEDIATE")
        for line in batch:
            req = codec.decode_request(line)
            # Requests raise ProtocolError only before they write anything, so a refusal needs
            # no savepoint (which would cost two statements per message).
            try:
                results.append(codec.ok(execute(w, req)))
            except ProtocolError as e:
                results.append(codec.refused(e))
        w.flush()
        db.execute("COMMIT")
        w.committed()
    except Exception as e:  # sqlite3.Error, or a bug: fail this batch, keep the process
        if not isinstance(e, sqlite3.Error):
            log.exception("store writer failed")
        if db.in_transaction:
            db.execute("ROLLBACK")
        w.rolled_back()
        if no_space(e):  # before the answers, so the server refuses what comes next at once
            space.hit("commit", e)
            fail = space.store_full()
        else:
            fail = codec.failed("internal_error", f"the store failed ({e.__class__.__name__})")
        results = [fail] * len(batch)
    return results


class Checkpointer(threading.Thread):
    """Background checkpoints while there are writes, and the checks for space while the disk
    is full (see the module docstring). Nothing it meets ends it: a dead checkpoint thread
    lets the WAL grow without end."""

    def __init__(
        self,
        path: str,
        synchronous: str,
        restart_frames: int,
        interval_s: float,
        space: Space,
        retry_max_s: float,
    ) -> None:
        super().__init__(name="store-ckpt", daemon=True)
        self.path = path
        self.synchronous = synchronous
        self.restart_frames = restart_frames
        self.interval_s = interval_s
        self.space = space
        self.retry_max_s = retry_max_s
        self.dirty = threading.Event()
        # A first pass at start: the WAL a previous writer could not empty (a full disk shows
        # now, not at the first write).
        self.dirty.set()
        self.stopping = threading.Event()
        self.wal_full = threading.Event()  # the writer should finish a checkpoint

    def run(self) -> None:
        db: sqlite3.Connection | None = None
        delay = 0.0  # after a failure: until the next attempt (doubles up to retry_max_s)
        while not self.stopping.is_set():
            if delay or self.space.full:
                delay = min(max(delay * 2, FULL_RETRY_MIN_S), self.retry_max_s)
                self.stopping.wait(delay)
            else:
                self.dirty.wait()
                self.dirty.clear()
            if self.stopping.is_set():
                break
            try:
                if db is None:
                    db = connect(self.path, self.synchronous)
                if self.space.full:
                    if not self._space_is_back(db):
                        continue
                else:
                    self._pass(db)
            except Exception as e:
                if no_space(e):
                    self.space.hit("checkpoint", e)
                else:
                    log.exception("checkpoint failed")
                continue
            delay = 0.0
            self.stopping.wait(self.interval_s)
        if db is not None:
            try:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as e:  # the WAL stays; the next writer checkpoints it
                log.warning("final checkpoint failed: %s", e)
            db.close()

    def _pass(self, db: sqlite3.Connection) -> None:
        _, frames, _ = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if frames >= self.restart_frames:
            # The writer stops committing while it finishes the checkpoint, and that takes as
            # long as copying and syncing what it wrote since this pass began. Catch up first:
            # each pass copies what arrived during the last.
            for _ in range(CATCH_UP_PASSES):
                t = time.monotonic()
                db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                if time.monotonic() - t < QUICK_PASS_S:
                    break
            self.wal_full.set()

    def _space_is_back(self, db: sqlite3.Connection) -> bool:
        """Whether a WAL cycle fits again and the WAL is empty (raises on ENOSPC)."""
        hits = self.space.hits
        page: int = db.execute("PRAGMA page_size").fetchone()[0]
        probe(self.path, self.restart_frames * page)
        busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return not busy and self.space.cleared(hits)

    def stop(self) -> None:
        self.stopping.set()
        self.dirty.set()
        self.join()


def serve(space: Space, db: sqlite3.Connection, ckpt: Checkpointer) -> None:
    """Answer requests from ``space.sock`` until it reaches end of input."""
    sock = space.sock
    w = Writer(db)
    buf = b""
    lines: list[bytes] = []
    last = 1
    eof = False
    while lines or not eof:
        if not lines:
            data = sock.recv(1 << 20)
            if not data:
                eof = True
            buf += data
            if last >= BUSY_BATCH and not eof:
                time.sleep(BUSY_WINDOW_S)
            while not eof:  # whatever else has arrived, without waiting
                try:
                    data = sock.recv(1 << 20, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                if not data:
                    eof = True
                buf += data
            *lines, buf = buf.split(b"\n")
            if not lines:
                continue
        batch, lines = lines[:MAX_BATCH], lines[MAX_BATCH:]
        results = run_batch(w, batch, space)
        last = len(batch)
        ckpt.dirty.set()
        space.send(codec.encode_results(results))
        if ckpt.wal_full.is_set():  # after the server heard: this takes a few ms
            ckpt.wal_full.clear()
            try:
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as e:
                if no_space(e):
                    space.hit("WAL restart", e)
                else:
                    log.warning("checkpoint failed: %s", e)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Rallypoint's chat store writer (the server starts it)")
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--synchronous", default="normal")
    p.add_argument("--wal-restart-frames", type=int, default=4096)
    p.add_argument("--checkpoint-interval", type=float, default=1.0)
    p.add_argument("--full-retry", type=float, default=5.0, help="longest wait between checks")
    p.add_argument("--full", action="store_true", help="the disk was full: check for space first")
    a = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sock = socket.socket(fileno=a.fd)
    try:
        db = connect(a.path, a.synchronous)
        migrate(db)
        db.execute("PRAGMA wal_autocheckpoint=0")
        epoch = db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()[0]
    except (sqlite3.Error, RuntimeError, OSError) as e:
        reason = str(e)
        if no_space(e):  # a store created or migrated now needs space: say so, and where
            reason = f"the disk is full ({e}); free space in {os.path.dirname(a.path) or '.'}"
        sock.sendall(codec.fail_line(reason))
        return
    space = Space(sock, a.full, int(a.full_retry * 1000))
    sock.sendall(codec.ready_line(epoch))  # first: the checkpoint thread may report at once
    ckpt = Checkpointer(
        a.path,
        a.synchronous,
        a.wal_restart_frames,
        a.checkpoint_interval,
        space,
        a.full_retry,
    )
    ckpt.start()
    try:
        serve(space, db, ckpt)
    except OSError as e:  # the server went away while we answered: what is committed stays
        log.warning("store writer lost the server: %s", e)
    finally:
        db.close()
        ckpt.stop()


if __name__ == "__main__":
    main()
