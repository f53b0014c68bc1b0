"""The SQLite store's side of contacts and privacy: relation changes in the writer, each side's
view, who is related (contacts, shared groups, mutual direct conversations), and messages
withheld from a member who blocks their sender."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from signaling.chat import codec
from signaling.chat.codec import ChangeRelation
from signaling.chat.sqlite import SqliteStore
from signaling.chat.store import NewMessage, StoredMessage
from signaling.core.privacy import Pair, Relation, Side
from signaling.wire.errors import ProtocolError

NOW = 1_700_000_000_000


@pytest.fixture
async def store(tmp_path: Path) -> SqliteStore:
    s = SqliteStore(tmp_path / "chat.sqlite3")
    await s.open()
    yield s  # type: ignore[misc]
    await s.close()


def dm(sender: str, other: str, cid: str, **kw: object) -> NewMessage:
    a, b = sorted((sender, other))
    m = NewMessage(f"dm:{a}|{b}", cid, sender, sender.title(), "text", f"{cid}!", None, (a, b))
    m.edit_window_ms = 60_000
    for k, v in kw.items():
        setattr(m, k, v)
    return m


async def change(store: SqliteStore, action: str, actor: str, other: str) -> tuple[Pair, Pair]:
    return await store.change_relation(action, actor, other, NOW, 3)


def test_requests_round_trip() -> None:
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


async def test_requests_accepts_and_each_sides_view(store: SqliteStore) -> None:
    before, after = await change(store, "request", "alice", "bob")
    assert before == Pair() and after.a.requested
    assert await store.relations_of("alice") == [Relation("bob", "outgoing", False)]
    assert await store.relations_of("bob") == [Relation("alice", "incoming", False)]
    await change(store, "accept", "bob", "alice")
    assert await store.relations_of("alice") == [Relation("bob", "contact", False)]
    assert await store.contacts_among("bob", ["alice", "carol"]) == {"alice"}
    # A declined request stays outgoing for its sender; the decliner no longer lists it.
    await change(store, "request", "carol", "bob")
    await change(store, "decline", "bob", "carol")
    assert await store.relations_of("carol") == [Relation("bob", "outgoing", False)]
    assert await store.relations_of("bob") == [Relation("alice", "contact", False)]
    # A block: listed for the blocker only; the blocked sees its contact as before.
    await change(store, "block", "bob", "alice")
    assert await store.relations_of("bob") == [Relation("alice", "contact", True)]
    assert await store.relations_of("alice") == [Relation("bob", "contact", False)]
    assert await store.all_blocks() == [("bob", "alice")]
    await change(store, "unblock", "bob", "alice")
    assert await store.all_blocks() == []


async def test_refusals_write_nothing(store: SqliteStore) -> None:
    for other in ("b1", "b2", "b3"):
        await change(store, "request", "alice", other)
    for action, other, code in (
        ("request", "b4", "too_many_requests"),
        ("accept", "b4", "no_such_request"),
        ("decline", "b4", "no_such_request"),
        ("request", "alice", "bad_field"),
    ):
        with pytest.raises(ProtocolError) as e:
            await change(store, action, "alice", other)
        assert e.value.code == code
    await change(store, "block", "alice", "b5")
    with pytest.raises(ProtocolError) as e:
        await change(store, "request", "alice", "b5")
    assert e.value.code == "blocked"
    assert [r.identity for r in await store.relations_of("alice")] == ["b1", "b2", "b3", "b5"]


async def test_who_is_related(store: SqliteStore, tmp_path: Path) -> None:
    await change(store, "link", "alice", "bob")
    # A stranger's message alone unlocks nothing; an answer does.
    await store.append(dm("carol", "alice", "c1"))
    assert await store.related("alice", ["bob", "carol", "dave"]) == {"bob"}
    assert await store.related("carol", ["alice"]) == set()
    await store.append(dm("alice", "carol", "a1"))
    assert await store.related("carol", ["alice"]) == {"alice"}
    # Members of a group (migration 4's tables; the groups code writes them).
    db = sqlite3.connect(tmp_path / "chat.sqlite3")
    with db:
        db.execute("INSERT INTO groups VALUES ('group:g', 'G', 'dave', 0, 0)")
        db.executemany(
            "INSERT INTO group_members VALUES ('group:g', ?, 1, ?, 'member')",
            [("dave", None), ("erin", None), ("frank", 3)],  # frank left
        )
    db.close()
    assert await store.related("dave", ["erin", "frank", "alice"]) == {"erin"}


async def test_withheld_messages_are_there_for_their_sender_only(store: SqliteStore) -> None:
    conv = "dm:alice|bob"
    await store.append(dm("alice", "bob", "a1"))
    s2, _ = await store.append(dm("bob", "alice", "b1", hidden_from="alice"))
    assert s2.hidden_from == "alice" and s2.to_wire().keys().isdisjoint({"hidden_from"})
    # An edit of a withheld message is withheld too, whoever is blocked now.
    e3, _ = await store.append(dm("bob", "alice", "b2", kind="edit", ref=2, text="edited"))
    assert e3.hidden_from == "alice"
    for viewer, seqs, last in (("bob", [1, 2, 3], 3), ("alice", [1], 1), (None, [1, 2, 3], 3)):
        page = await store.page(conv, before=None, after=0, limit=10, viewer=viewer)
        assert ([m.seq for m in page.messages], page.last_seq) == (seqs, last), viewer
        newest = await store.page(conv, before=None, after=None, limit=10, viewer=viewer)
        assert [m.seq for m in newest.messages] == seqs
    (mine,), _ = await store.conversation_list("alice", 10)
    assert (mine.conversation, mine.last_seq, mine.read_seq) == (conv, 1, 0)
    assert mine.last_message is not None and mine.last_message.seq == 1
    (theirs,), _ = await store.conversation_list("bob", 10)
    assert (theirs.conversation, theirs.last_seq, theirs.read_seq) == (conv, 3, 0)
    # bob's withheld text (seq 2) is not unread for alice; alice's (seq 1) is for bob.
    assert (mine.unread, theirs.unread) == (0, 1)
    # A conversation of nothing but withheld messages is none of the blocker's.
    await store.append(dm("carol", "dave", "c1", hidden_from="dave"))
    assert await store.conversation_list("dave", 10) == ([], False)
    # A withheld text does not count as having written.
    assert await store.related("bob", ["alice"]) == set()


async def test_contacts_only_direct_messages(store: SqliteStore) -> None:
    with pytest.raises(ProtocolError) as e:
        await store.append(dm("alice", "bob", "x1", contact_required=True))
    assert e.value.code == "not_contact"
    await change(store, "link", "alice", "bob")
    sent, _ = await store.append(dm("alice", "bob", "x1", contact_required=True))
    await change(store, "unlink", "alice", "bob")
    # A retry of what was sent while they were contacts gets its acknowledgement.
    again, dup = await store.append(dm("alice", "bob", "x1", contact_required=True))
    assert dup and again.seq == sent.seq == 1
    page = await store.page("dm:alice|bob", before=None, after=0, limit=10)
    assert [m.cid for m in page.messages] == ["x1"]
