"""The call state machine on its own (``signaling.calls``): table tests, time passed in."""

from __future__ import annotations

from typing import Any

import pytest

from signaling.calls.book import Call, CallBook, Effect, Log, Push, Send
from signaling.wire.errors import ProtocolError

T0 = 1_000_000


def sent(fx: list[Effect]) -> list[tuple[str, tuple[str, ...], str]]:
    """(message type, sessions, outcome or identity) of each Send, for compact assertions."""
    out = []
    for f in fx:
        if isinstance(f, Send) and f.sessions:
            m = f.msg
            out.append((m["type"], f.sessions, m.get("outcome") or m.get("identity", "")))
    return out


def pushes(fx: list[Effect]) -> list[tuple[str, str, str]]:
    return [(f.kind, f.identity, f.reason) for f in fx if isinstance(f, Push)]


def logs(fx: list[Effect]) -> list[tuple[str, str, int]]:
    return [(f.conversation, f.outcome, f.duration_ms) for f in fx if isinstance(f, Log)]


def start(
    book: CallBook,
    to: tuple[str, ...] = ("bob",),
    *,
    reachable: set[str] | None = None,
    room: str | None = None,
) -> tuple[Call, list[Effect]]:
    devices = {"bob": ["b1", "b2"], "carol": ["c1"], "dave": []}
    return book.invite(
        "k1",
        caller="alice",
        caller_name="Alice",
        session="a1",
        to=to,
        video=False,
        room=room,
        devices=devices,
        reachable=set(to) if reachable is None else reachable,
        now=T0,
    )


def test_invite_rings_every_device_and_pushes_the_unreachable() -> None:
    book = CallBook(45_000)
    call, fx = start(book, ("bob", "dave"), reachable={"bob"})
    assert call.state == "ringing" and call.group and call.media == "sfu"
    assert sent(fx) == [("call_incoming", ("b1", "b2"), "")]
    assert pushes(fx) == [("call_incoming", "dave", "")]
    assert fx[0].with_ice if isinstance(fx[0], Send) else False
    assert book.next_deadline() == T0 + 45_000


STEPS: list[tuple[str, list[tuple[str, str, str]], list[Any], list[Any], list[Any]]] = [
    # (what happens, step, expected sends, pushes, logs)
    (
        "decline",
        [("decline", "bob", "b2")],
        [
            ("call_declined", ("a1",), "bob"),
            ("call_ended", ("b1", "b2"), "declined"),
            ("call_ended", ("a1",), "declined"),
        ],
        [],
        [("dm:alice|bob", "declined", 0)],
    ),
    (
        "cancel",
        [("cancel", "alice", "a1")],
        [("call_ended", ("a1",), "cancelled"), ("call_ended", ("b1", "b2"), "cancelled")],
        [],
        [("dm:alice|bob", "cancelled", 0)],
    ),
    (
        "caller hangs up while ringing = cancel",
        [("hangup", "alice", "a1")],
        [("call_ended", ("a1",), "cancelled"), ("call_ended", ("b1", "b2"), "cancelled")],
        [],
        [("dm:alice|bob", "cancelled", 0)],
    ),
    (
        "callee hangs up while ringing = decline",
        [("hangup", "bob", "b1")],
        [
            ("call_declined", ("a1",), "bob"),
            ("call_ended", ("b1", "b2"), "declined"),
            ("call_ended", ("a1",), "declined"),
        ],
        [],
        [("dm:alice|bob", "declined", 0)],
    ),
    (
        "accept then hang up",
        [("accept", "bob", "b2"), ("hangup", "bob", "b2")],
        [
            ("call_answered_elsewhere", ("b1",), ""),
            ("call_accepted", ("a1",), "bob"),
            ("call_left", ("a1",), "bob"),
            ("call_ended", ("b2",), "completed"),
            ("call_ended", ("a1",), "completed"),
        ],
        [],
        [("dm:alice|bob", "completed", 5000)],
    ),
    (
        "timeout",
        [("expire", "", "")],
        [
            ("call_missed", ("a1",), "bob"),
            ("call_ended", ("b1", "b2"), "missed"),
            ("call_ended", ("a1",), "missed"),
        ],
        [],
        [("dm:alice|bob", "missed", 0)],
    ),
    (
        "ringing is reported once per callee",
        [("ringing", "bob", "b1"), ("ringing", "bob", "b2"), ("cancel", "alice", "a1")],
        [
            ("call_ringing", ("a1",), "bob"),
            ("call_ended", ("a1",), "cancelled"),
            ("call_ended", ("b1", "b2"), "cancelled"),
        ],
        [],
        [("dm:alice|bob", "cancelled", 0)],
    ),
    (
        "the caller's device goes away while ringing",
        [("gone", "alice", "a1")],
        [("call_ended", ("b1", "b2"), "cancelled")],  # a1 is gone: nothing for it
        [],
        [("dm:alice|bob", "cancelled", 0)],
    ),
]


@pytest.mark.parametrize(
    ("what", "steps", "sends", "push", "log"), STEPS, ids=[s[0] for s in STEPS]
)
def test_one_to_one_steps(
    what: str, steps: list[tuple[str, str, str]], sends: list[Any], push: list[Any], log: list[Any]
) -> None:
    book = CallBook(45_000)
    start(book)
    fx: list[Effect] = []
    now = T0
    for step, who, dev in steps:
        now += 5000 if step == "hangup" else 0
        if step == "expire":
            assert book.expire(T0 + 44_999) == []
            fx += book.expire(T0 + 45_000)
        elif step == "gone":
            fx += book.session_ended(who, dev, now)
        else:
            fx += (
                getattr(book, step)("k1", who, dev, now)
                if step != "ringing"
                else book.ringing("k1", who, dev)
            )
    got = sent(fx)
    if what == "the caller's device goes away while ringing":
        got = [g for g in got if g[1] != ("a1",)]
    assert got == sends
    assert pushes(fx) == push and logs(fx) == log
    assert book.calls == {} and book.by_identity == {} and "k1" in book.ended


def test_push_cancel_follows_every_incoming_push() -> None:
    for finish, reason in (
        ("accept", "answered"),
        ("decline", "declined"),
        ("cancel", "cancelled"),
    ):
        book = CallBook(45_000)
        _, fx = start(book, reachable=set())
        assert pushes(fx) == [("call_incoming", "bob", "")]
        who, dev = ("alice", "a1") if finish == "cancel" else ("bob", "b1")
        fx = getattr(book, finish)("k1", who, dev, T0)
        assert pushes(fx) == [("call_cancelled", "bob", reason)]
    book = CallBook(45_000)
    start(book, reachable=set())
    assert pushes(book.expire(T0 + 45_000)) == [("call_cancelled", "bob", "missed")]


def test_busy_and_in_call() -> None:
    book = CallBook(45_000)
    start(book)
    book.accept("k1", "bob", "b1", T0)
    assert book.in_call("alice") and book.in_call("bob") and not book.in_call("carol")
    call, fx = book.invite(
        "k2",
        caller="carol",
        caller_name="Carol",
        session="c1",
        to=["bob"],
        video=False,
        room=None,
        devices={"bob": ["b1"]},
        reachable={"bob"},
        now=T0,
    )
    assert call.outcome == "busy" and sent(fx) == [
        ("call_busy", ("c1",), "bob"),
        ("call_ended", ("c1",), "busy"),
    ]
    assert logs(fx) == [("dm:bob|carol", "busy", 0)]
    with pytest.raises(ProtocolError) as e:
        book.invite(
            "k3",
            caller="bob",
            caller_name="Bob",
            session="b1",
            to=["carol"],
            video=False,
            room=None,
            devices={},
            reachable=set(),
            now=T0,
        )
    assert e.value.code == "in_call"


def test_group_call_goes_on_until_fewer_than_two_can_talk() -> None:
    book = CallBook(45_000)
    call, _ = start(book, ("bob", "carol"), room="family")
    book.accept("k1", "bob", "b1", T0 + 1000)
    fx = book.hangup("k1", "alice", "a1", T0 + 2000)  # bob stays: carol still rings
    assert ("call_left", ("b1",), "alice") in sent(fx) and call.state == "active"
    fx = book.accept("k1", "carol", "c1", T0 + 3000)
    assert ("call_accepted", ("b1",), "carol") in sent(fx)
    assert book.signal_target("k1", "carol", "c1", "b1") == "b1"
    with pytest.raises(ProtocolError) as e:
        book.signal_target("k1", "carol", "c1", None)
    assert e.value.code == "bad_field"
    fx = book.hangup("k1", "bob", "b1", T0 + 11_000)
    assert ("call_ended", ("c1",), "completed") in sent(fx)
    assert logs(fx) == [("room:family", "completed", 10_000)]


def test_group_outcomes_without_an_answer() -> None:
    for statuses, outcome in (
        (("decline", "decline"), "declined"),
        (("decline", "expire"), "missed"),
    ):
        book = CallBook(45_000)
        start(book, ("bob", "carol"))
        fx: list[Effect] = []
        for who, step in zip(("bob", "carol"), statuses, strict=True):
            if step == "expire":
                fx += book.expire(T0 + 45_000)
            else:
                fx += book.decline("k1", who, f"{who[0]}1", T0)
        assert ("call_ended", ("a1",), outcome) in sent(fx)
        per_callee = {c: o for c, o, _ in logs(fx)}
        assert per_callee["dm:alice|bob"] == "declined"


@pytest.mark.parametrize(
    ("action", "who", "dev", "code"),
    [
        ("accept", "mallory", "m1", "no_such_call"),
        ("accept", "alice", "a1", "forbidden"),
        ("cancel", "bob", "b1", "forbidden"),
        ("cancel", "alice", "a2", "not_in_call"),
        ("hangup", "alice", "a2", "not_in_call"),
    ],
)
def test_refusals_change_nothing(action: str, who: str, dev: str, code: str) -> None:
    book = CallBook(45_000)
    call, _ = start(book)
    before = (call.state, {p.identity: p.status for p in call.parties()})
    with pytest.raises(ProtocolError) as e:
        getattr(book, action)("k1", who, dev, T0)
    assert e.value.code == code
    assert (call.state, {p.identity: p.status for p in call.parties()}) == before


def test_ended_calls_give_call_ended_to_parties_only() -> None:
    book = CallBook(45_000)
    start(book)
    book.cancel("k1", "alice", "a1", T0)
    for who, code in (("bob", "call_ended"), ("alice", "call_ended"), ("mallory", "no_such_call")):
        with pytest.raises(ProtocolError) as e:
            book.accept("k1", who, "x", T0)
        assert e.value.code == code


def test_new_device_rings_while_pending_only() -> None:
    book = CallBook(45_000)
    start(book)
    assert sent(book.session_started("bob", "b3")) == [("call_incoming", ("b3",), "")]
    assert book.session_started("bob", "b3") == []  # once
    book.accept("k1", "bob", "b3", T0)
    assert book.session_started("bob", "b4") == []
