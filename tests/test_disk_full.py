"""A full disk, on a real (small) tmpfs: the chat store refuses writes with the retryable
``store_full`` (never a false acknowledgement, never a hang), its checkpoint thread lives on and
keeps checking for space, /metrics and /healthz say so, and when space is back it recovers by
itself: every acknowledged message is stored exactly once, nothing refused is stored, and the
WAL is back under its bound. Restarts while the disk is full (the store closed and opened, the
writer process killed) and a migration on a full disk are covered too.

The tests mount their own tmpfs (the sandbox runs them as root); without that they fail and
say why rather than skip.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import os
import sqlite3
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from signaling.chat import schema
from signaling.chat import sqlite as sqlite_store
from signaling.chat.schema import MIGRATIONS
from signaling.chat.sqlite import SqliteStore
from signaling.chat.store import AppendResult, NewMessage, StoredMessage
from signaling.core.tokens import create_token
from signaling.sdk.wsclient import Client, ClientError
from signaling.wire.errors import ProtocolError

KEY, SECRET = "test-key", "a-test-secret-of-at-least-32-bytes"
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


@pytest.fixture
def data_disk(tmp_path: Path) -> Iterator[Disk]:
    """A 24 MiB tmpfs: the server's store keeps its default WAL bound (16 MiB), and writes
    resume once that much fits again."""
    yield from _mount(tmp_path / "disk", "24m")


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


# -- through the server ----------------------------------------------------------------------


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    # In token mode /metrics needs the API credentials.
    async with http.get(
        url, headers={"Authorization": aiohttp.encode_basic_auth(KEY, SECRET)}
    ) as r:
        return r.status, await r.text()


def _samples(text: str) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        assert family.documentation, family.name
        for s in family.samples:
            out[s.name] = s.value
    return out


async def test_a_full_disk_through_the_server(
    data_disk: Disk,
    start_server: Callable[..., Awaitable[TestServer]],
    clients: Callable[..., Awaitable[Client]],
) -> None:
    server = await start_server(
        server__data_dir=str(data_disk.path), auth__api_key=KEY, auth__api_secret=SECRET
    )
    base = f"http://127.0.0.1:{server.port}"
    token = create_token(KEY, SECRET, "alice", rooms={"full": ["join", "chat"]})
    alice = await clients(server, token=token)
    await alice.request({"type": "join", "room": "full"})
    api_auth = {"Authorization": "Basic " + base64.b64encode(f"{KEY}:{SECRET}".encode()).decode()}

    async def send(cid: str) -> dict[str, Any]:
        return await alice.request(
            {"type": "send", "conversation": "room:full", "cid": cid, "text": TEXT}, timeout=10
        )

    # Fill the disk while sending: acknowledged, or refused with store_full, nothing else.
    data_disk.fill(leave=256 * 1024)
    acked: dict[str, int] = {}
    refused: list[str] = []
    while not refused:
        assert len(acked) < 5000, "the disk never filled"
        cid = f"c{len(acked)}"
        try:
            sent = await send(cid)
        except ClientError as e:
            assert (e.code, e.msg.get("retry_after_ms")) == ("store_full", 5000), e.msg
            refused.append(cid)
        else:
            assert not sent["duplicate"]
            acked[cid] = sent["seq"]
    assert acked
    with pytest.raises(ClientError) as e:  # read marks too
        await alice.request({"type": "read", "conversation": "room:full", "seq": 1})
    assert e.value.code == "store_full"
    # The rest goes on: a new client connects and joins, history reads what was acknowledged.
    bob = await clients(server, token=create_token(KEY, SECRET, "bob", rooms={"full": ["join"]}))
    await bob.request({"type": "join", "room": "full"})
    page = await bob.request(
        {"type": "history", "conversation": "room:full", "after": 0, "limit": 200}
    )
    assert [m["cid"] for m in page["messages"]] == list(acked)

    async with aiohttp.ClientSession() as http:
        status, text = await _get(http, f"{base}/metrics")
        assert status == 200
        samples = _samples(text)
        assert samples["rallypoint_store_disk_full"] == 1
        assert samples["rallypoint_store_disk_full_errors_total"] >= 1
        assert "# HELP rallypoint_store_disk_full " in text
        async with http.get(f"{base}/healthz") as r:
            assert (r.status, await r.json()) == (
                200,
                {"status": "degraded", "reasons": ["store_full"]},
            )
        async with http.post(
            f"{base}/api/conversations/room%3Afull/messages",
            json={"text": "from the backend", "cid": "api-1"},
            headers=api_auth,
        ) as r:
            assert (r.status, r.headers.get("Retry-After")) == (503, "5")
            assert (await r.json())["code"] == "store_full"
        async with http.post(  # a token records its identity: a write too
            f"{base}/api/tokens", json={"identity": "carol"}, headers=api_auth
        ) as r:
            assert (r.status, r.headers.get("Retry-After")) == (503, "5")
            assert (await r.json())["code"] == "store_full"

        data_disk.free()

        async def healthy() -> bool:
            async with http.get(f"{base}/healthz") as r:
                return r.status == 200 and (await r.json()) == {"status": "ok"}

        deadline = time.monotonic() + 30
        while not await healthy():
            assert time.monotonic() < deadline, "the store did not recover within 30 s"
            await asyncio.sleep(0.05)
        assert _samples((await _get(http, f"{base}/metrics"))[1])["rallypoint_store_disk_full"] == 0

        for cid in [*refused, "after"]:  # the client's retries, with the same cids
            sent = await send(cid)
            assert not sent["duplicate"], cid
            acked[cid] = sent["seq"]
        async with http.post(
            f"{base}/api/conversations/room%3Afull/messages",
            json={"text": "from the backend", "cid": "api-1"},
            headers=api_auth,
        ) as r:
            assert r.status == 201
            acked["api-1"] = (await r.json())["seq"]
    await alice.request({"type": "read", "conversation": "room:full", "seq": 1})
    page = await alice.request(
        {"type": "history", "conversation": "room:full", "after": 0, "limit": 200}
    )
    assert not page["more"]
    assert [(m["cid"], m["seq"]) for m in page["messages"]] == list(acked.items())
    assert list(acked.values()) == list(range(1, len(acked) + 1))
