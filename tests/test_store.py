"""The SQLite chat store: gap-free sequences, duplicates, amend rules, paging, read marks."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from signaling.chat import codec, schema
from signaling.chat import sqlite as sqlite_store
from signaling.chat import writer as store_writer
from signaling.chat.codec import MarkRead, RegisterIdentity, SetMute, TouchDevice
from signaling.chat.groups import ChangeGroup, GroupState
from signaling.chat.schema import MIGRATIONS
from signaling.chat.sqlite import SqliteStore
from signaling.chat.store import AppendResult, GroupResult, NewMessage, StoredMessage, wire_size
from signaling.wire.errors import ProtocolError


def msg(
    conv: str,
    cid: str,
    sender: str = "alice",
    text: str | None = "hi",
    kind: str = "text",
    ref: int | None = None,
    moderator: bool = False,
    window_ms: int = 60_000,
    members: tuple[str, ...] = (),
) -> NewMessage:
    return NewMessage(
        conv, cid, sender, sender.title(), kind, text, ref, members, moderator, window_ms
    )


@pytest.fixture
async def store(tmp_path: Path) -> SqliteStore:
    s = SqliteStore(tmp_path / "chat.sqlite3")
    await s.open()
    yield s  # type: ignore[misc]
    await s.close()


async def test_concurrent_appends_get_gap_free_sequences(store: SqliteStore) -> None:
    results = await asyncio.gather(
        *(store.append(msg(f"room:r{i % 3}", f"c{i}")) for i in range(300))
    )
    for r in range(3):
        seqs = sorted(m.seq for m, dup in results if m.conversation == f"room:r{r}")
        assert seqs == list(range(1, 101))
    assert len({m.mid for m, _ in results}) == 300
    assert not any(dup for _, dup in results)
    assert await store.last_seq("room:r0") == 100


async def test_duplicate_cid_returns_the_original(store: SqliteStore) -> None:
    first, dup1 = await store.append(msg("room:r", "same"))
    again, dup2 = await store.append(msg("room:r", "same", text="changed"))
    assert (dup1, dup2) == (False, True)
    assert again == first
    other, _ = await store.append(msg("room:r", "same", sender="bob"))  # cids are per sender
    assert other.seq == 2
    page = await store.page("room:r", before=None, after=None, limit=10)
    assert [m.text for m in page.messages] == ["hi", "hi"]


async def test_duplicates_within_one_batch(store: SqliteStore) -> None:
    a, b = await asyncio.gather(store.append(msg("room:r", "x")), store.append(msg("room:r", "x")))
    assert a[0] == b[0] and sorted([a[1], b[1]]) == [False, True]
    assert await store.last_seq("room:r") == 1


async def test_append_nowait_calls_back_in_order_with_results_and_refusals(
    store: SqliteStore,
) -> None:
    got: list[AppendResult] = []
    done = asyncio.get_running_loop().create_future()

    def cb(result: AppendResult) -> None:
        got.append(result)
        if len(got) == 4 and not done.done():
            done.set_result(None)

    store.append_nowait(msg("room:n", "a"), cb)
    store.append_nowait(msg("room:n", "b"), cb)
    store.append_nowait(msg("room:n", "e", kind="edit", ref=99, text="x"), cb)  # refused
    store.append_nowait(msg("room:n", "a"), cb)  # a retry
    await asyncio.wait_for(done, 10)
    first, second, refused, retry = got
    assert isinstance(first, tuple) and isinstance(second, tuple) and isinstance(retry, tuple)
    assert (first[0].seq, first[1], second[0].seq, second[1]) == (1, False, 2, False)
    assert isinstance(refused, ProtocolError) and refused.code == "no_such_message"
    assert retry == (first[0], True)
    assert await store.last_seq("room:n") == 2


async def test_wal_starts_over_under_steady_writes(tmp_path: Path) -> None:
    """A background checkpoint never catches up with a writer that is always busy, and SQLite
    reuses the WAL only after one that did: the writer must finish the job itself."""
    store = SqliteStore(
        tmp_path / "chat.sqlite3", wal_restart_frames=64, checkpoint_interval_s=0.05
    )
    await store.open()
    wal = tmp_path / "chat.sqlite3-wal"
    loop = asyncio.get_running_loop()
    end = loop.time() + 1.5
    done = loop.create_future()
    sizes: list[int] = []
    n = 0

    def again(result: AppendResult) -> None:  # keeps 32 writes queued at all times
        nonlocal n
        assert isinstance(result, tuple)
        if loop.time() < end:
            n += 1
            store.append_nowait(msg(f"room:w{n % 50}", f"c{n}", text="x" * 150), again)
        elif not done.done():
            done.set_result(None)

    for _ in range(32):
        n += 1
        store.append_nowait(msg(f"room:w{n % 50}", f"c{n}"), again)
    while not done.done():
        await asyncio.sleep(0.05)
        sizes.append(wal.stat().st_size)
    await store.close()
    assert n > 2000, n
    # Seen here: ~5 MiB with the writer's help, > 100 MiB and growing without it (15k writes).
    assert max(sizes) < 16 * 1024 * 1024, (max(sizes), n)


async def test_paging_both_ways(store: SqliteStore) -> None:
    for i in range(25):
        await store.append(msg("room:p", f"c{i}", text=f"m{i + 1}"))
    newest = await store.page("room:p", before=None, after=None, limit=10)
    assert [m.seq for m in newest.messages] == list(range(16, 26)) and newest.more
    older = await store.page("room:p", before=16, after=None, limit=10)
    assert [m.seq for m in older.messages] == list(range(6, 16)) and older.more
    oldest = await store.page("room:p", before=6, after=None, limit=10)
    assert [m.seq for m in oldest.messages] == list(range(1, 6)) and not oldest.more
    fwd = await store.page("room:p", before=None, after=20, limit=3)
    assert [m.seq for m in fwd.messages] == [21, 22, 23] and fwd.more and fwd.last_seq == 25
    end = await store.page("room:p", before=None, after=23, limit=3)
    assert [m.seq for m in end.messages] == [24, 25] and not end.more
    empty = await store.page("room:none", before=None, after=0, limit=3)
    assert empty.messages == [] and empty.last_seq == 0


async def test_edit_and_delete_rules(store: SqliteStore) -> None:
    orig, _ = await store.append(msg("room:e", "o1"))
    edit, _ = await store.append(msg("room:e", "e1", kind="edit", ref=orig.seq, text="fixed"))
    assert edit.seq == 2 and edit.ref == 1 and edit.kind == "edit"

    async def refused(m: NewMessage) -> str:
        with pytest.raises(ProtocolError) as e:
            await store.append(m)
        return e.value.code

    assert await refused(msg("room:e", "e2", sender="bob", kind="edit", ref=1)) == "not_author"
    assert await refused(msg("room:e", "e3", kind="edit", ref=99)) == "no_such_message"
    assert await refused(msg("room:e", "e4", kind="edit", ref=2)) == "no_such_message"  # an edit
    assert (
        await refused(msg("room:e", "e5", kind="edit", ref=1, window_ms=-1)) == "edit_window_passed"
    )
    # A moderator may delete someone else's message, even after the window.
    d, _ = await store.append(
        msg(
            "room:e",
            "d1",
            sender="mod",
            kind="delete",
            text=None,
            ref=1,
            moderator=True,
            window_ms=-1,
        )
    )
    assert d.seq == 3
    assert await refused(msg("room:e", "e6", kind="edit", ref=1)) == "already_deleted"
    page = await store.page("room:e", before=None, after=0, limit=10)
    assert page.messages[0].text is None  # the deleted text is gone from the store
    assert [m.kind for m in page.messages] == ["text", "edit", "delete"]
    assert page.last_seq == 3  # refusals took no sequence numbers


async def test_upgraded_store_finds_edits_by_index(tmp_path: Path) -> None:
    # A store made by the previous schema (version 2), with an edit in it.
    path = tmp_path / "old.db"
    db = schema.connect(path, "normal")
    for script in MIGRATIONS[:2]:
        db.executescript(script)
    db.execute("PRAGMA user_version=2")
    db.execute("INSERT INTO meta VALUES ('epoch', '0123456789abcdef')")
    db.execute("INSERT INTO conversations VALUES ('room:u', 2, 0)")
    db.executemany(
        "INSERT INTO messages (conversation, seq, sender, name, cid, kind, text, ref, ts) "
        "VALUES ('room:u', ?, 'alice', 'Alice', ?, ?, ?, ?, ?)",
        [(1, "o", "text", "hi", None, 10**13), (2, "e", "edit", "hi!", 1, 10**13)],
    )
    db.close()
    s = SqliteStore(path)
    await s.open()
    d, _ = await s.append(msg("room:u", "d", kind="delete", text=None, ref=1))
    page = await s.page("room:u", before=None, after=0, limit=10)
    await s.close()
    assert d.seq == 3 and [m.text for m in page.messages] == [None, None, None]
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 5
    plan = db.execute("EXPLAIN QUERY PLAN " + store_writer.BLANK_EDITS, ("room:u", 1)).fetchall()
    db.close()
    # Not a walk over the whole conversation (messages_seq), which took ~130 ms at 500k.
    assert "USING INDEX messages_edits (conversation=? AND ref=?)" in plan[0][3], plan


async def test_read_marks_only_move_forward(store: SqliteStore) -> None:
    for i in range(5):
        await store.append(msg("dm:alice|bob", f"c{i}", members=("alice", "bob")))
    assert await store.mark_read("dm:alice|bob", "bob", 3) == 3
    assert await store.mark_read("dm:alice|bob", "bob", 2) is None
    assert await store.mark_read("dm:alice|bob", "bob", 50) == 5  # clamped to the last seq
    assert await store.read_seq("dm:alice|bob", "bob") == 5
    (bob,), _ = await store.conversation_list("bob", 10)
    (alice,), _ = await store.conversation_list("alice", 10)
    # msg() sends as alice: all five are unread for bob until he read them, none for her.
    assert (bob.last_seq, bob.read_seq, bob.unread) == (5, 5, 0)
    assert (alice.last_seq, alice.read_seq, alice.unread) == (5, 0, 0)
    assert await store.conversation_list("carol", 10) == ([], False)


async def test_reopen_keeps_sequence_and_epoch(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "c.db")
    await s.open()
    await s.append(msg("room:r", "a"))
    epoch = s.epoch
    await s.close()
    s2 = SqliteStore(tmp_path / "c.db")
    await s2.open()
    m, _ = await s2.append(msg("room:r", "b"))
    assert m.seq == 2 and s2.epoch == epoch and len(epoch) == 16
    await s2.close()
    db = sqlite3.connect(tmp_path / "c.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "c.db")
    db.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    db.close()
    s = SqliteStore(tmp_path / "c.db")
    with pytest.raises(RuntimeError, match="newer"):
        await s.open()
    await s.close()


async def test_store_failure_is_reported_and_sequence_not_burnt(store: SqliteStore) -> None:
    await store.append(msg("room:f", "a"))
    # Make the next insert fail inside SQLite: a trigger that aborts once.
    db = sqlite3.connect(store.path)
    db.execute("CREATE TABLE fail_once (n INTEGER)")
    db.execute("INSERT INTO fail_once VALUES (1)")
    db.execute(
        "CREATE TRIGGER boom BEFORE INSERT ON messages WHEN (SELECT n FROM fail_once) = 1 "
        "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"
    )
    db.commit()
    with pytest.raises(ProtocolError) as e:
        await store.append(msg("room:f", "b"))
    assert e.value.code == "internal_error"
    db.execute("UPDATE fail_once SET n = 0")
    db.commit()
    db.close()
    m, _ = await store.append(msg("room:f", "b"))
    assert m.seq == 2


async def test_a_large_batch_with_a_retry_inside_keeps_order_and_mids(store: SqliteStore) -> None:
    # One transaction with hundreds of sends, a retried cid in the middle (answered with the
    # original) and an edit between them.
    first, _ = await store.append(msg("room:big", "c0"))
    plan = [msg("room:big", f"c{i}") for i in range(1, 600)]
    plan.insert(300, msg("room:big", "c5"))  # a retry of an earlier send
    plan.insert(400, msg("room:big", "e1", kind="edit", text="new", ref=1))
    results = await asyncio.gather(*(store.append(m) for m in plan))  # queued in plan order
    fresh = [m for m, dup in results if not dup]
    assert [m.seq for m in fresh] == list(range(2, 2 + len(fresh)))  # in queue order, no gaps
    assert [m.mid for m in fresh] == list(range(first.mid + 1, first.mid + 1 + len(fresh)))
    (retry,) = [m for m, dup in results if dup]
    assert retry.cid == "c5" and retry == results[4][0]  # plan[4] is c5
    assert await store.last_seq("room:big") == 601


async def test_mids_keep_increasing_after_reopen(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "chat.sqlite3")
    await s.open()
    a, _ = await s.append(msg("room:a", "1"))
    await s.close()
    s = SqliteStore(tmp_path / "chat.sqlite3")
    await s.open()
    b, _ = await s.append(msg("room:b", "1"))
    await s.close()
    assert b.mid == a.mid + 1


async def test_writer_survives_a_failing_operation(store: SqliteStore) -> None:
    with pytest.raises(ProtocolError) as e:  # a request the writer has no operation for
        await store._future(b'["no such operation", 1]\n', False)
    assert e.value.code == "internal_error"
    m, _ = await store.append(msg("room:after", "a"))  # the writer process is still there
    assert m.seq == 1


async def test_a_writer_that_dies_fails_what_is_in_flight_and_comes_back(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "RESTART_DELAY_S", 0.05)
    first, _ = await store.append(msg("room:k", "a"))
    assert store.proc is not None
    lost = store.append(msg("room:k", "x"))  # written to the writer on the next loop turn
    store.proc.kill()
    with pytest.raises(ProtocolError) as e:  # sent, never answered: outcome unknown
        await lost
    assert e.value.code == "internal_error"
    later = store.append(msg("room:k", "b"))  # while the writer is down: waits for the next
    again, dup = await asyncio.wait_for(later, 20)
    assert store.restarts == 1
    assert (again.seq, again.mid, dup) == (2, first.mid + 1, False)
    retried, dup = await store.append(msg("room:k", "x"))  # the client's retry of the lost one
    assert (retried.seq, dup) == (3, False)
    retry, dup = await store.append(msg("room:k", "a"))
    assert retry == first and dup


async def test_close_answers_every_write_sent_before_it(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "chat.sqlite3")
    await s.open()
    pending = [s.append(msg("room:c", f"c{i}")) for i in range(500)]
    await s.close()  # the writer commits and answers all of them before it exits
    results = await asyncio.gather(*pending)
    assert [m.seq for m, _ in results] == list(range(1, 501))
    db = sqlite3.connect(tmp_path / "chat.sqlite3")
    assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 500
    db.close()


@pytest.mark.parametrize(
    "request_",
    [
        NewMessage("room:a", "c1", "alice", "Alice", "text", "hi"),
        NewMessage("dm:a|b", "c2", "a", "A", "edit", "x", 3, ("a", "b"), True, 900_000, None),
        NewMessage("room:a", "c3", "bob", "Bob", "call", "Call", None, (), False, 0, '{"id":1}'),
        MarkRead("dm:a|b", "a", 7),
        TouchDevice("alice", "phone", "Alice", 1_700_000_000_000),
        RegisterIdentity("carol", 1_700_000_000_000),
        ChangeGroup("group:g", "added", "ann", "Ann", "c4", ["bob", "cy"], None, None, 1000),
        ChangeGroup("group:g", "created", "system:api", "System", "c5", ["ann"], None, "G", 9),
        ChangeGroup("group:g", "role", "ann", "Ann", "c6", ["bob"], "admin", None, 1000),
        SetMute("ann", "group:g", True),
    ],
)
def test_writer_requests_round_trip(request_: codec.WriterRequest) -> None:
    line = codec.encode_request(request_)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert codec.decode_request(line) == request_


def test_writer_results_round_trip() -> None:
    stored = StoredMessage("room:a", 4, 17, "c1", "alice", "Alice", "text", "hi", None, 123, None)
    results = [
        codec.ok(codec.encode_row(stored, False)),
        codec.ok(codec.encode_row(stored, True)),
        codec.ok(7),
        codec.ok(None),
        codec.refused(ProtocolError("not_author", "only the author")),
    ]
    back = codec.decode_results(codec.encode_results(results))
    assert codec.decode_result(back[0], True) == (stored, False)
    assert codec.decode_result(back[1], True) == (stored, True)
    assert codec.decode_result(back[2], False) == 7
    assert codec.decode_result(back[3], False) is None
    err = codec.decode_result(back[4], False)
    assert isinstance(err, ProtocolError) and (err.code, err.message) == (
        "not_author",
        "only the author",
    )


def test_group_results_round_trip() -> None:
    event = StoredMessage(
        "group:g", 3, 9, "c", "ann", "Ann", "system", "Ann removed cy", None, 5, '{"a":1}'
    )
    state = GroupState("group:g", "G", "ann", {"ann": "owner", "bob": "admin"})
    value = codec.group_value(codec.encode_row(event, False), True, state, ("cy",))
    (back,) = codec.decode_results(codec.encode_results([codec.ok(value)]))
    result = codec.decode_group_value(codec.decode_result(back, False))
    assert result == GroupResult(event, True, state, ("cy",))


def test_a_row_built_from_fields_is_the_stored_message() -> None:
    fields = ("dm:a|b", 9, 3, "c", "a", "A", "edit", "t", 2, 456, '{"x":1}')
    assert codec.decode_row(codec.row(*fields, True)) == (StoredMessage(*fields), True)


def test_row_order_is_the_select_order() -> None:
    """The writer and the reader SELECT ``codec.COLUMNS``; a row read back is a StoredMessage
    with every field in its place."""
    assert codec.COLUMNS.split(", ") == list(codec.ROW_FIELDS)
    assert codec.ROW_FIELDS == tuple(StoredMessage.__dataclass_fields__)


async def test_pages_are_cut_by_bytes(store: SqliteStore) -> None:
    for i in range(50):
        await store.append(NewMessage("room:b", f"c{i}", "alice", "Alice", "text", "é" * 1000))
    one = wire_size((await store.page("room:b", before=None, after=0, limit=1)).messages[0])
    assert one > 2000  # "é" is two bytes of UTF-8
    page = await store.page("room:b", before=None, after=0, limit=500, max_bytes=5 * one)
    assert [m.seq for m in page.messages] == [1, 2, 3, 4, 5] and page.more
    newest = await store.page("room:b", before=None, after=None, limit=500, max_bytes=3 * one + 9)
    assert [m.seq for m in newest.messages] == [48, 49, 50] and newest.more
    at_least_one = await store.page("room:b", before=None, after=10, limit=500, max_bytes=10)
    assert [m.seq for m in at_least_one.messages] == [11] and at_least_one.more
    everything = await store.page("room:b", before=None, after=0, limit=500, max_bytes=10**9)
    assert len(everything.messages) == 50 and not everything.more
