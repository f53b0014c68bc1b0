"""A full disk, on a real (small) tmpfs: the chat store refuses writes with the retryable
``store_full`` (never a false acknowledgement, never a hang), its checkpoint thread lives on and
keeps checking for space, its metrics say so, and when space is back it recovers by
itself: every acknowledged message is stored exactly once, nothing refused is stored, and the
WAL is back under its bound. Restarts while the disk is full (the store closed and opened, the
writer process killed) and a migration on a full disk are covered too.

The tests mount their own tmpfs (the sandbox runs them as root); without that they fail and
say why rather than skip.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from signaling.chat import schema
from signaling.chat import sqlite as sqlite_store
from signaling.chat.schema import MIGRATIONS
from signaling.chat.sqlite import SqliteStore
from signaling.chat.store import AppendResult, NewMessage, StoredMessage
from signaling.wire.errors import ProtocolError

TEXT = "x" * 1000
RESTART_FRAMES = 64  # the stores here restart their WAL after 64 pages (256 KiB)
PAGE = 4096
# The WAL at most, once it starts over after RESTART_FRAMES: its header and that many frames.
WAL_BOUND = 32 + RESTART_FRAMES * (24 + PAGE)


class Disk:
    """A tmpfs mounted for one test, and a file that takes its free space."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int = 0) -> None:
        """Take the free space but about ``leave`` bytes (to the last byte when 0)."""
        todo = self.free_bytes() - leave
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            chunk = b"\0" * 65536
            while todo > 0 or not leave:
                try:
                    todo -= os.write(fd, chunk[: max(4096, min(todo, len(chunk)))])
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink()


def _mount(path: Path, size: str) -> Iterator[Disk]:
    path.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        pytest.fail(
            f"these tests need a small tmpfs of their own (mount -t tmpfs, as root): "
            f"{r.stderr.strip() or r.returncode}"
        )
    try:
        yield Disk(path)
    finally:
        r = subprocess.run(["umount", str(path)], capture_output=True, text=True)
        if r.returncode:
            subprocess.run(["umount", "-l", str(path)], check=False)
            pytest.fail(f"the tmpfs was still in use at the end: {r.stderr.strip()}")


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    """A 4 MiB tmpfs."""
    yield from _mount(tmp_path / "disk", "4m")


async def until(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Wait for ``cond`` (checked every 20 ms), at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)


def threads(pid: int) -> int:
    """The threads of process ``pid``: the store writer has its main and checkpoint threads."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def msg(cid: str, conv: str = "room:full") -> NewMessage:
    return NewMessage(conv, cid, "alice", "Alice", "text", TEXT)


def small_store(path: Path) -> SqliteStore:
    return SqliteStore(
        path,
        wal_restart_frames=RESTART_FRAMES,
        checkpoint_interval_s=0.05,
        full_retry_s=0.5,
    )


async def send_until_full(
    store: SqliteStore, disk: Disk, acked: dict[str, StoredMessage]
) -> list[str]:
    """Take most of the disk, then send (32 writes in flight) until the store refuses one:
    every write is either acknowledged (into ``acked``) or refused with ``store_full``, each
    answered within 10 s; returns the refused, once the store says the disk is full."""
    disk.fill(leave=256 * 1024)
    refused: list[str] = []
    n = 0
    while not refused:
        assert n < 5000, "the disk never filled"
        cids = [f"c{i}" for i in range(n, n + 32)]
        n += 32
        writes = []
        for cid in cids:
            try:
                writes.append(store.append(msg(cid)))
            except ProtocolError as e:  # refused at once: the store knows the disk is full
                assert (e.code, e.retry_after_ms) == ("store_full", 500), e
                refused.append(cid)
                break
        results = await asyncio.wait_for(asyncio.gather(*writes, return_exceptions=True), 10)
        for cid, r in zip(cids, results, strict=False):
            if isinstance(r, ProtocolError):
                assert (r.code, r.retry_after_ms) == ("store_full", 500), r
                refused.append(cid)
            else:
                assert isinstance(r, tuple) and not r[1], r
                acked[cid] = r[0]
    assert acked, "the disk filled before anything was stored"
    assert store.disk_full
    return refused


async def history(store: SqliteStore, conv: str = "room:full") -> list[StoredMessage]:
    page = await store.page(conv, before=None, after=0, limit=100_000)
    return page.messages


async def check_refused_now(store: SqliteStore) -> None:
    """Every kind of write is refused at once, queued nowhere (the call itself raises)."""

    def never(result: AppendResult) -> None:
        raise AssertionError(f"a refused write was answered later: {result}")

    with pytest.raises(ProtocolError) as e:
        store.append(msg("refused-now"))
    assert (e.value.code, e.value.retry_after_ms) == ("store_full", 500)
    with pytest.raises(ProtocolError) as e:
        store.append_nowait(msg("refused-nowait"), never)
    assert e.value.code == "store_full"
    with pytest.raises(ProtocolError) as e:
        await store.mark_read("room:full", "bob", 1)
    assert e.value.code == "store_full"


async def check_alive_and_retrying(store: SqliteStore) -> None:
    """The writer's checkpoint thread is there and keeps checking (each check an ENOSPC)."""
    seen = store.disk_full_errors
    await until(lambda: store.disk_full_errors >= seen + 2, "two more checks for space")
    assert store.proc is not None and threads(store.proc.pid) == 2
    assert store.disk_full


async def check_recovered(
    store: SqliteStore, disk: Disk, acked: dict[str, StoredMessage], refused: list[str]
) -> None:
    """Free the space: writes go on by themselves, the WAL is back under its bound, every
    acknowledged message is stored once and nothing refused is."""
    disk.free()
    await until(lambda: not store.disk_full, "writes accepted again")
    assert os.stat(f"{store.path}-wal").st_size <= WAL_BOUND
    stored = await history(store)
    assert [m.cid for m in stored] == list(acked)  # once each, in order, nothing refused
    assert stored == list(acked.values())
    for cid in [*refused, "refused-now", "refused-nowait", "after"]:
        acked[cid], dup = await asyncio.wait_for(store.append(msg(cid)), 10)
        assert not dup, cid
    stored = await history(store)
    assert [m.cid for m in stored] == list(acked)
    assert [m.seq for m in stored] == list(range(1, len(acked) + 1))
    assert await store.mark_read("room:full", "bob", 1) == 1


async def test_a_full_disk_refuses_writes_and_the_store_recovers_by_itself(disk: Disk) -> None:
    store = small_store(disk.path / "chat.sqlite3")
    await store.open()
    try:
        acked: dict[str, StoredMessage] = {}
        refused = await send_until_full(store, disk, acked)
        await check_refused_now(store)
        await check_alive_and_retrying(store)
        metrics = {m.name: m for m in store.metrics()}
        assert metrics["store_disk_full"].value == 1 and metrics["store_disk_full"].kind == "gauge"
        errors = metrics["store_disk_full_errors"]
        assert errors.kind == "counter" and errors.value >= 3 and errors.help
        assert metrics["store_wal_bytes"].value == os.stat(f"{store.path}-wal").st_size
        await check_recovered(store, disk, acked, refused)
        assert {m.name: m.value for m in store.metrics()}["store_disk_full"] == 0
    finally:
        await store.close()


async def _close_and_open(store: SqliteStore) -> SqliteStore:
    await store.close()  # its last checkpoint fails: the WAL stays for the next writer
    assert os.stat(f"{store.path}-wal").st_size > 0
    again = small_store(store.path)
    await again.open()
    try:
        # The new writer's first checkpoint finds the disk full (no write needed to learn it).
        await until(lambda: again.disk_full, "the reopened store to find the disk full")
    except BaseException:
        await again.close()
        raise
    return again


async def _kill_the_writer(store: SqliteStore) -> SqliteStore:
    assert store.proc is not None
    old = store.proc.pid
    store.proc.kill()
    await until(lambda: store.restarts == 1, "the writer to be started again")
    assert store.proc is not None and store.proc.pid != old
    assert store.disk_full  # still refusing: the new writer goes on checking for space
    return store


@pytest.mark.parametrize("restart", [_close_and_open, _kill_the_writer])
async def test_a_restart_while_the_disk_is_full_keeps_checking_for_space(
    disk: Disk,
    restart: Callable[[SqliteStore], Awaitable[SqliteStore]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sqlite_store, "RESTART_DELAY_S", 0.05)
    store = small_store(disk.path / "chat.sqlite3")
    await store.open()
    try:
        acked: dict[str, StoredMessage] = {}
        refused = await send_until_full(store, disk, acked)
        store = await restart(store)
        await check_refused_now(store)
        await check_alive_and_retrying(store)
        await check_recovered(store, disk, acked, refused)
    finally:
        await store.close()


async def test_a_migration_on_a_full_disk_stops_start_up_and_runs_once_there_is_space(
    disk: Disk,
) -> None:
    # A store of the previous schema (version 2) with a message in it, on a full disk.
    path = disk.path / "chat.sqlite3"
    db = schema.connect(path, "normal")
    for script in MIGRATIONS[:2]:
        db.executescript(script)
    db.execute("PRAGMA user_version=2")
    db.execute("INSERT INTO meta VALUES ('epoch', '0123456789abcdef')")
    db.execute("INSERT INTO conversations VALUES ('room:full', 1, 0)")
    db.execute(
        "INSERT INTO messages (conversation, seq, sender, name, cid, kind, text, ts) "
        "VALUES ('room:full', 1, 'alice', 'Alice', 'old', 'text', 'hi', 0)"
    )
    db.close()
    disk.fill()
    store = small_store(path)
    with pytest.raises(RuntimeError, match=f"the disk is full .*; free space in {disk.path}$"):
        await store.open()
    await store.close()
    disk.free()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2  # not half migrated
        assert db.execute("SELECT cid FROM messages").fetchall() == [("old",)]
    finally:
        db.close()
    store = small_store(path)
    await store.open()
    try:
        new, _ = await store.append(msg("new"))
        assert new.seq == 2 and store.epoch == "0123456789abcdef"
    finally:
        await store.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    db.close()
