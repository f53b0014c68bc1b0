"""What only the SQLite chat store has: its writer process (failures, restarts, closing), the
WAL, its migrations, and the codec of the writer's socket. The contract every store keeps
(sequences, duplicates, amend rules, paging, ...) is ``test_store_contract.py``."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from stores import msg

from signaling.chat import codec, schema
from signaling.chat import sqlite as sqlite_store
from signaling.chat import writer as store_writer
from signaling.chat.codec import ChangeRelation, MarkRead, RegisterIdentity, SetMute, TouchDevice
from signaling.chat.groups import ChangeGroup, GroupState
from signaling.chat.schema import MIGRATIONS
from signaling.chat.sqlite import SqliteStore
from signaling.chat.store import AppendResult, GroupResult, NewMessage, StoredMessage
from signaling.core.privacy import Pair, Side
from signaling.wire.errors import ProtocolError

NOW = 1_700_000_000_000


@pytest.fixture
async def store(tmp_path: Path) -> SqliteStore:
    s = SqliteStore(tmp_path / "chat.sqlite3")
    await s.open()
    yield s  # type: ignore[misc]
    await s.close()


async def test_wal_starts_over_under_steady_writes(tmp_path: Path) -> None:
    """A background checkpoint never catches up with a writer that is always busy, and SQLite
    reuses the WAL only after one that did: the writer must finish the job itself."""
    store = SqliteStore(
        tmp_path / "chat.sqlite3", wal_restart_frames=64, checkpoint_interval_s=0.01
    )
    await store.open()
    wal = tmp_path / "chat.sqlite3-wal"
    loop = asyncio.get_running_loop()
    end = loop.time() + 1.5
    done = loop.create_future()
    sizes: list[int] = []
    cycles: set[int] = set()  # the WAL header's checkpoint sequence: one more at each restart
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
        await asyncio.sleep(0.02)
        with wal.open("rb") as f:
            header = f.read(16)
        cycles.add(int.from_bytes(header[12:16], "big"))
        sizes.append(wal.stat().st_size)
    await store.close()
    assert n > 2000, n
    # Between two restarts the WAL holds one cycle's writes: the checkpoint thread's interval
    # and its passes, at up to ~65 pages a millisecond here (36k writes in the 1.5 s), so
    # ~4 MiB with this interval. Without the writer's help it grows by all that is written:
    # > 100 MiB.
    assert len(cycles) >= 10, (sorted(cycles), n)
    assert max(sizes) < 16 * 1024 * 1024, (max(sizes), n)


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


def test_relation_requests_and_values_round_trip() -> None:
    for req in (
        ChangeRelation("request", "alice", "bob", NOW, 500),
        NewMessage("dm:a|b", "c", "a", "A", "text", "x", None, ("a", "b"), False, 0, None, "b"),
        NewMessage("dm:a|b", "c", "a", "A", "text", "x", None, ("a", "b"), contact_required=True),
    ):
        assert codec.decode_request(codec.encode_request(req)) == req
    before, after = Pair(), Pair(True, Side(), Side(blocks=True))
    value = codec.decode_results(
        codec.encode_results([codec.ok(codec.relation_value(before, after))])
    )
    assert codec.decode_relation_value(value[0][1]) == (before, after)
    stored = StoredMessage("dm:a|b", 1, 1, "c", "a", "A", "text", "x", None, 5, None, "b")
    assert codec.decode_row(codec.encode_row(stored, False)) == (stored, False)
