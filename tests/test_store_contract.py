"""The chat store contract, run against every back end (``tests/stores.py``: SQLite and
PostgreSQL): gap-free sequences, duplicates, the amend rules, paging, read marks, unread counts
and the conversation list, groups and their members' windows, mutes, devices, relations and
withheld messages. What only one back end has (SQLite's WAL and writer process, a full disk,
PostgreSQL going away) is tested beside it (``test_store.py``, ``test_disk_full.py``,
``test_postgres.py``)."""

from __future__ import annotations

import asyncio

import pytest
from stores import Backend, Store, msg

from signaling.chat.groups import ChangeGroup
from signaling.chat.store import AppendResult, NewMessage, StoredMessage, wire_size
from signaling.core.privacy import Pair, Relation
from signaling.wire.errors import ProtocolError

NOW = 1_700_000_000_000


def dm(sender: str, other: str, cid: str, **kw: object) -> NewMessage:
    a, b = sorted((sender, other))
    m = NewMessage(f"dm:{a}|{b}", cid, sender, sender.title(), "text", f"{cid}!", None, (a, b))
    m.edit_window_ms = 60_000
    for k, v in kw.items():
        setattr(m, k, v)
    return m


async def test_concurrent_appends_get_gap_free_sequences(store: Store) -> None:
    results = await asyncio.gather(
        *(store.append(msg(f"room:r{i % 3}", f"c{i}")) for i in range(300))
    )
    for r in range(3):
        seqs = sorted(m.seq for m, dup in results if m.conversation == f"room:r{r}")
        assert seqs == list(range(1, 101))
    assert len({m.mid for m, _ in results}) == 300
    assert not any(dup for _, dup in results)
    assert await store.last_seq("room:r0") == 100


async def test_duplicate_cid_returns_the_original(store: Store) -> None:
    first, dup1 = await store.append(msg("room:r", "same"))
    again, dup2 = await store.append(msg("room:r", "same", text="changed"))
    assert (dup1, dup2) == (False, True)
    assert again == first
    other, _ = await store.append(msg("room:r", "same", sender="bob"))  # cids are per sender
    assert other.seq == 2
    page = await store.page("room:r", before=None, after=None, limit=10)
    assert [m.text for m in page.messages] == ["hi", "hi"]


async def test_duplicates_within_one_batch(store: Store) -> None:
    a, b = await asyncio.gather(store.append(msg("room:r", "x")), store.append(msg("room:r", "x")))
    assert a[0] == b[0] and sorted([a[1], b[1]]) == [False, True]
    assert await store.last_seq("room:r") == 1


async def test_append_nowait_calls_back_in_order_with_results_and_refusals(
    store: Store,
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


async def test_results_are_settled_with_the_write_batch_held(store: Store) -> None:
    """A transaction's callbacks run inside ``store.writes`` (``signaling.core.writes``), and
    what they write goes out when it ends: one write per connection per batch."""
    got: list[int] = []
    flushed: list[int] = []
    done = asyncio.get_running_loop().create_future()

    class Conn:
        def flush(self) -> None:
            flushed.append(len(got))

    def cb(result: AppendResult) -> None:
        got.append(store.writes.depth)
        if len(got) == 1:
            store.writes.hold(Conn())  # a connection that kept a frame in this batch
        if len(got) == 3 and not done.done():
            done.set_result(None)

    for cid in ("a", "b", "c"):
        store.append_nowait(msg("room:w", cid), cb)
    await asyncio.wait_for(done, 10)
    assert all(depth >= 1 for depth in got)
    assert flushed and flushed[0] >= 1 and store.writes.depth == 0 and not store.writes.waiting


async def test_paging_both_ways(store: Store) -> None:
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


async def test_edit_and_delete_rules(store: Store) -> None:
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


async def test_read_marks_only_move_forward(store: Store) -> None:
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


async def test_a_large_batch_with_a_retry_inside_keeps_order_and_mids(store: Store) -> None:
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


async def test_pages_are_cut_by_bytes(store: Store) -> None:
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


async def change(store: Store, action: str, actor: str, other: str) -> tuple[Pair, Pair]:
    return await store.change_relation(action, actor, other, NOW, 3)


async def test_requests_accepts_and_each_sides_view(store: Store) -> None:
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


async def test_refusals_write_nothing(store: Store) -> None:
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


async def test_who_is_related(store: Store) -> None:
    await change(store, "link", "alice", "bob")
    # A stranger's message alone unlocks nothing; an answer does.
    await store.append(dm("carol", "alice", "c1"))
    assert await store.related("alice", ["bob", "carol", "dave"]) == {"bob"}
    assert await store.related("carol", ["alice"]) == set()
    await store.append(dm("alice", "carol", "a1"))
    assert await store.related("carol", ["alice"]) == {"alice"}
    # Current members of a group; not one who left it.
    await group(store, "created", "dave", "dave", "erin", "frank", name="G")
    await group(store, "left", "frank", cid="l")
    assert await store.related("dave", ["erin", "frank", "alice"]) == {"erin"}


async def test_withheld_messages_are_there_for_their_sender_only(store: Store) -> None:
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


async def test_contacts_only_direct_messages(store: Store) -> None:
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


async def group(
    store: Store,
    action: str,
    actor: str,
    *identities: str,
    cid: str | None = None,
    role: str | None = None,
    name: str | None = None,
    conv: str = "group:g",
) -> tuple[StoredMessage, bool, dict[str, str], tuple[str, ...]]:
    r = await store.change_group(
        ChangeGroup(
            conv, action, actor, actor.title(), cid or f"{action}-{actor}", list(identities),
            role, name, 10,
        )
    )  # fmt: skip
    return r.event, r.duplicate, r.state.members, r.gone


async def test_groups_windows_and_the_conversation_list(store: Store) -> None:
    seen = []
    store.on_group = seen.append
    ev, dup, members, _ = await group(store, "created", "ann", "ann", "bob", name="Team")
    assert (ev.seq, ev.kind, dup) == (1, "system", False)
    assert members == {"ann": "owner", "bob": "member"}
    assert ev.text and ev.meta and '"created"' in ev.meta
    again = await group(store, "created", "ann", "ann", "bob", name="Team")  # a retry
    assert again[0] == ev and again[1] and len(seen) == 1
    await store.append(msg("group:g", "m2", sender="bob"))
    with pytest.raises(ProtocolError) as e:  # not a member
        await store.append(msg("group:g", "m3", sender="carol"))
    assert e.value.code == "bad_conversation"
    with pytest.raises(ProtocolError) as e:  # the rules refuse: nothing written
        await group(store, "added", "bob", "carol")
    assert e.value.code == "forbidden"
    await group(store, "added", "ann", "carol")  # seq 3
    await store.append(msg("group:g", "m4", sender="carol"))  # seq 4
    _, _, members, gone = await group(store, "removed", "ann", "carol")  # seq 5
    assert gone == ("carol",) and "carol" not in members
    await store.append(msg("group:g", "m6", sender="ann"))  # seq 6
    with pytest.raises(ProtocolError) as e:
        await store.append(msg("group:g", "m7", sender="carol"))
    assert e.value.code == "bad_conversation"
    # A retry of what carol sent while a member gets its acknowledgement.
    retry, dup = await store.append(msg("group:g", "m4", sender="carol"))
    assert (retry.seq, dup) == (4, True)
    assert await store.last_seq("group:g") == 6
    page = await store.page("group:g", before=None, after=0, limit=10, viewer="carol")
    assert ([m.seq for m in page.messages], page.last_seq) == ([3, 4, 5], 5)
    page = await store.page("group:g", before=None, after=None, limit=10, viewer="bob")
    assert [m.seq for m in page.messages] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ProtocolError) as e:
        await store.page("group:g", before=None, after=0, limit=10, viewer="zed")
    assert e.value.code == "bad_conversation"
    # Read marks stop at a former member's removal; unread counts what others wrote.
    assert await store.mark_read("group:g", "carol", 99) == 5
    with pytest.raises(ProtocolError) as e:
        await store.mark_read("group:g", "zed", 1)
    assert e.value.code == "bad_conversation"
    assert await store.unread("group:g", "bob") == 2  # m4 (carol) and m6 (ann); not events
    assert await store.unread("group:g", "bob", upto=4) == 1
    await store.set_mute("bob", "group:g", True)
    (row,), more = await store.conversation_list("bob", 10)
    assert not more
    assert (row.conversation, row.name, row.role, row.last_seq, row.unread, row.muted) == (
        "group:g", "Team", "member", 6, 2, True,
    )  # fmt: skip
    assert row.last_message is not None and row.last_message.cid == "m6"
    (former,), _ = await store.conversation_list("carol", 10)
    assert (former.last_seq, former.role, former.read_seq, former.unread) == (5, None, 5, 0)
    assert former.last_message is not None and former.last_message.seq == 5  # the removal
    groups, muted = await store.load_groups()
    assert groups["group:g"].members == {"ann": "owner", "bob": "member"}
    assert groups["group:g"].name == "Team" and muted == {"group:g": {"bob"}}
    await store.set_mute("bob", "group:g", False)
    await group(store, "deleted", "ann", cid="del")
    groups, muted = await store.load_groups()
    assert groups == {} and muted == {}
    assert [r.event.seq for r in seen] == [1, 3, 5, 7]


async def test_the_conversation_list_pages_newest_first(store: Store) -> None:
    for i in range(5):
        await store.append(msg(f"room:r{i}", f"c{i}", text=f"t{i}"))
        await asyncio.sleep(0.002)  # distinct times
    await store.append(msg("room:r1", "e", kind="edit", ref=1, text="edited"))
    rows, more = await store.conversation_list("alice", 3)
    assert [r.conversation for r in rows] == ["room:r1", "room:r4", "room:r3"] and more
    assert rows[0].last_message is not None and rows[0].last_message.text == "edited"
    last = rows[-1]
    rows, more = await store.conversation_list("alice", 3, (last.updated_at, last.conversation))
    assert [r.conversation for r in rows] == ["room:r2", "room:r0"] and not more
    # Reading a room lists it too.
    assert await store.mark_read("room:r0", "bob", 1) == 1
    assert [r.conversation for r in (await store.conversation_list("bob", 10))[0]] == ["room:r0"]
    assert await store.read_marks("room:r0") == {"bob": 1}


async def test_devices_and_identities(store: Store) -> None:
    await store.touch_device("alice", "phone", "Alice's phone", NOW)
    await store.touch_device("alice", "laptop", "Laptop", NOW + 5)
    await store.touch_device("alice", "phone", "Phone", NOW + 10)
    await store.register_identity("bob", NOW)
    devices = await store.devices_of("alice")
    assert [(d.device, d.name, d.first_seen, d.last_seen) for d in devices] == [
        ("phone", "Phone", NOW, NOW + 10),
        ("laptop", "Laptop", NOW + 5, NOW + 5),
    ]
    assert await store.devices_of("bob") == []
    assert await store.known_identities(["alice", "bob", "carol"]) == {"alice", "bob"}


async def test_a_reopened_store_keeps_sequences_mids_and_epoch(backend: Backend) -> None:
    s = backend.new()
    await s.open()
    a, _ = await s.append(msg("room:r", "a"))
    epoch = s.epoch
    await s.close()
    s = backend.new()
    await s.open()
    try:
        b, _ = await s.append(msg("room:r", "b"))
        again, dup = await s.append(msg("room:r", "a"))
    finally:
        await s.close()
    assert (b.seq, b.mid, s.epoch, len(epoch)) == (2, a.mid + 1, epoch, 16)
    assert again == a and dup


async def test_close_answers_every_write_accepted_before_it(backend: Backend) -> None:
    s = backend.new()
    await s.open()
    pending = [s.append(msg("room:c", f"c{i}")) for i in range(500)]
    await s.close()
    results = await asyncio.gather(*pending)
    assert [m.seq for m, _ in results] == list(range(1, 501))


async def test_batches_to_known_conversations_keep_order_and_find_retries(store: Store) -> None:
    firsts = [(await store.append(msg(f"room:k{r}", f"first{r}")))[0] for r in range(3)]
    plan = [msg(f"room:k{i % 3}", f"c{i}") for i in range(300)]
    results = await asyncio.gather(*(store.append(m) for m in plan))  # one batch
    for r in range(3):
        seqs = [m.seq for m, _ in results if m.conversation == f"room:k{r}"]
        assert seqs == list(range(2, 102))
    mids = [m.mid for m, _ in results]
    assert mids == sorted(mids) and len(set(mids)) == 300 and mids[0] > firsts[-1].mid
    assert not any(dup for _, dup in results)
    # The same with retries of stored messages among new ones, and a retry of a first.
    plan = [msg(f"room:k{i % 3}", f"d{i}") for i in range(30)]
    plan[10:10] = [msg("room:k1", "c7"), msg("room:k0", "first0")]
    results = await asyncio.gather(*(store.append(m) for m in plan))
    assert [dup for _, dup in results].count(True) == 2
    assert results[11] == (firsts[0], True)
    fresh = [m for m, dup in results if not dup]
    for r in range(3):
        assert [m.seq for m in fresh if m.conversation == f"room:k{r}"] == list(range(102, 112))
        assert await store.last_seq(f"room:k{r}") == 111
