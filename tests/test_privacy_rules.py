"""The pure privacy rules (``signaling.core.privacy``): the request/accept state machine, what
each side of a pair sees, who may watch or be called, and the block cache."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signaling.core.privacy import (
    USER_ACTIONS,
    Blocks,
    Pair,
    Side,
    callee_unreachable,
    may_watch,
    plan,
    view,
)
from signaling.wire.errors import ProtocolError

MAX = 3


def act(pair: Pair, actor: str, action: str, outgoing: int = 0) -> Pair:
    """``actor`` ("a" or "b") does ``action`` on ``pair`` (kept from a's side)."""
    if actor == "a":
        return plan(action, pair, outgoing=outgoing, max_pending=MAX)
    return plan(action, pair.swapped(), outgoing=outgoing, max_pending=MAX).swapped()


def seen(pair: Pair) -> tuple[str, str]:
    """Both views' statuses: (a's, b's)."""
    return view(pair, "b").status, view(pair.swapped(), "a").status


def check_invariants(p: Pair) -> None:
    for x, y in ((p.a, p.b), (p.b, p.a)):
        if p.contact:
            assert not x.requested and not x.dismissed
        if x.dismissed:
            assert y.requested, p
        if x.blocks:
            assert not x.requested, p


def test_request_and_accept() -> None:
    p = act(Pair(), "a", "request")
    assert seen(p) == ("outgoing", "incoming")
    p = act(p, "b", "accept")
    assert seen(p) == ("contact", "contact") and p == Pair(contact=True)
    # Doing it again changes nothing and is no error (a retry).
    assert act(p, "b", "accept") == p and act(p, "a", "request") == p


def test_requests_both_ways_make_contacts() -> None:
    p = act(act(Pair(), "a", "request"), "b", "request")
    assert seen(p) == ("contact", "contact")


def test_a_declined_request_stays_pending_for_its_sender() -> None:
    p = act(act(Pair(), "a", "request"), "b", "decline")
    assert seen(p) == ("outgoing", "none")
    assert act(p, "b", "decline") == p  # a retry
    assert act(p, "a", "request") == p  # asking again bothers nobody
    # The one who declined may still ask: that makes them contacts.
    assert seen(act(p, "b", "request")) == ("contact", "contact")
    with pytest.raises(ProtocolError) as e:
        act(p, "b", "accept")
    assert e.value.code == "no_such_request"


def test_remove_cancels_a_request_or_ends_a_contact() -> None:
    p = act(Pair(), "a", "request")
    assert seen(act(p, "a", "remove")) == ("none", "none")
    contacts = Pair(contact=True)
    assert seen(act(contacts, "b", "remove")) == ("none", "none")
    assert act(Pair(), "a", "remove") == Pair()


def test_block_hides_a_request_and_refuses_one() -> None:
    p = act(act(Pair(), "b", "request"), "a", "block")
    assert view(p, "b").status == "none" and view(p, "b").blocked
    assert view(p.swapped(), "a").status == "outgoing"  # b still waits
    for action in ("request", "accept", "decline"):
        with pytest.raises(ProtocolError) as e:
            act(p, "a", action)
        assert e.value.code == ("blocked" if action == "request" else "no_such_request")
    p = act(p, "a", "unblock")
    assert seen(p) == ("incoming", "outgoing")  # the request shows again


def test_blocking_keeps_a_contact_and_cancels_ones_own_request() -> None:
    p = act(Pair(contact=True), "a", "block")
    assert seen(p) == ("contact", "contact") and view(p, "b").blocked
    p = act(act(Pair(), "a", "request"), "a", "block")
    assert seen(p) == ("none", "none")


def test_the_request_limit() -> None:
    with pytest.raises(ProtocolError) as e:
        act(Pair(), "a", "request", outgoing=MAX)
    assert e.value.code == "too_many_requests"
    # Accepting a request the other made is no new request: no limit.
    assert act(act(Pair(), "b", "request"), "a", "request", outgoing=MAX).contact


def test_the_backend_links_and_unlinks_whatever_was_pending() -> None:
    p = act(act(Pair(), "a", "request"), "b", "block")
    linked = act(p, "a", "link")
    assert linked == Pair(True, Side(), Side(blocks=True))
    assert act(linked, "b", "unlink") == Pair(False, Side(), Side(blocks=True))


def withdrawn(p: Pair) -> Pair:
    """``p`` after ``a`` took back its own request (if any), nothing else."""
    return replace(p, a=replace(p.a, requested=False), b=replace(p.b, dismissed=False))


STEPS = st.lists(
    st.tuples(st.sampled_from(("a", "b")), st.sampled_from((*USER_ACTIONS, "link", "unlink"))),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(STEPS)
def test_nobody_sees_what_the_other_does_in_private(steps: list[tuple[str, str]]) -> None:
    """From any reachable pair: ``b`` sees the same whether ``a`` declines, blocks or unblocks
    it or not (a block looks like taking one's request back, nothing more); refusals are only
    ever about one's own doing; the invariants hold."""
    p = Pair()
    for actor, action in steps:
        try:
            p = act(p, actor, action)
        except ProtocolError:
            continue
        check_invariants(p)
        b_sees = view(p.swapped(), "a")
        for private in ("decline", "unblock", "block"):
            try:
                after = act(p, "a", private)
            except ProtocolError as e:
                assert e.code == "no_such_request" and private == "decline"
                continue
            expect = view(withdrawn(p).swapped(), "a") if private == "block" else b_sees
            assert view(after.swapped(), "a") == expect, (p, private)
        # Nor does what b's own actions do, or refuse: a's blocks and dismissals change none.
        variants = [p]
        if not p.a.requested:
            variants.append(replace(p, a=replace(p.a, blocks=not p.a.blocks)))
        if p.b.requested:
            variants.append(replace(p, a=replace(p.a, dismissed=not p.a.dismissed)))
        for action in USER_ACTIONS:
            results: set[object] = set()
            for q in variants:
                try:
                    results.add(view(act(q, "b", action).swapped(), "a"))
                except ProtocolError as e:
                    results.add(e.code)
            assert len(results) == 1, (p, action, results)


def test_pairs_round_trip_as_lists() -> None:
    p = Pair(False, Side(True, False, False), Side(False, True, True))
    assert Pair.from_list(p.to_list()) == p and p.swapped().swapped() == p


@pytest.mark.parametrize(
    ("rule", "own", "blocked", "related", "allowed"),
    [
        ("private", True, True, False, True),  # your own presence
        ("private", False, False, True, True),
        ("private", False, False, False, False),  # a stranger
        ("private", False, True, True, False),  # a contact that blocks you
        ("open", False, False, False, True),
        ("open", False, True, False, False),
    ],
)
def test_who_may_watch(rule: str, own: bool, blocked: bool, related: bool, allowed: bool) -> None:
    assert may_watch(rule, own=own, blocked=blocked, related=related) is allowed


def test_who_is_called_without_ringing() -> None:
    def unreachable(**kw: bool) -> bool:
        base = {"unknown": False, "blocked": False, "contact": False, "call_strangers": True}
        return callee_unreachable(**{**base, **kw})

    assert not unreachable()
    assert unreachable(unknown=True) and unreachable(blocked=True, contact=True)
    assert unreachable(call_strangers=False) and not unreachable(call_strangers=False, contact=True)


def test_blocks_cache() -> None:
    b = Blocks()
    assert not b.blocked("a", "b") and len(b) == 0
    b.set("a", "b", True)
    assert b.blocked("a", "b") and not b.blocked("b", "a")
    b.set("a", "b", False)
    assert not b.blocked("a", "b")
    b.load([("x", "y")])
    assert b.blocked("x", "y") and len(b) == 1
