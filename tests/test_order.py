"""The cluster's per-conversation ordering (``signaling.core.order``), pure: a fake clock's
timers at the seam."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from signaling.core.order import Sequencer, decode_order, encode_order


class Timers:
    """``call_later`` whose callbacks run when the test says."""

    def __init__(self) -> None:
        self.pending: list[Timer] = []

    def call_later(self, delay: float, cb: Callable[..., None], *args: Any) -> Timer:
        t = Timer(delay, cb, args)
        self.pending.append(t)
        return t

    def fire(self) -> None:
        due, self.pending = self.pending, []
        for t in due:
            if not t.cancelled:
                t.cb(*t.args)


class Timer:
    def __init__(self, delay: float, cb: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.delay, self.cb, self.args = delay, cb, args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@pytest.fixture
def seq() -> tuple[Sequencer, list[tuple[str, bytes, str | None]], Timers]:
    got: list[tuple[str, bytes, str | None]] = []
    timers = Timers()
    s = Sequencer(lambda t, f, x: got.append((t, f, x)), timers.call_later, hold_s=0.1)
    return s, got, timers


def frames(got: list[tuple[str, bytes, str | None]]) -> list[bytes]:
    return [f for _, f, _ in got]


def test_in_order_goes_at_once_and_early_ones_wait_for_the_gap(
    seq: tuple[Sequencer, list[tuple[str, bytes, str | None]], Timers],
) -> None:
    s, got, timers = seq
    s.offer("room:r", "room:r", 5, b"5", "me")
    s.offer("room:r", "room:r", 6, b"6", None)
    assert got == [("room:r", b"5", "me"), ("room:r", b"6", None)]
    s.offer("room:r", "room:r", 8, b"8", None)
    s.offer("room:r", "room:r", 9, b"9", "x")
    assert frames(got) == [b"5", b"6"]  # 7 missing: held
    assert [t.delay for t in timers.pending] == [0.1]
    s.offer("room:r", "room:r", 7, b"7", None)
    assert got[2:] == [("room:r", b"7", None), ("room:r", b"8", None), ("room:r", b"9", "x")]
    assert timers.pending[0].cancelled  # nothing held any more
    s.offer("room:r", "room:r", 10, b"10", None)
    assert frames(got)[-1] == b"10"
    assert (s.held, s.flushed) == (2, 0)


def test_a_gap_that_never_fills_is_given_up_after_the_hold(
    seq: tuple[Sequencer, list[tuple[str, bytes, str | None]], Timers],
) -> None:
    s, got, timers = seq
    s.offer("user:bob", "dm:alice|bob", 1, b"1", None)
    s.offer("user:bob", "dm:alice|bob", 4, b"4", None)
    s.offer("user:bob", "dm:alice|bob", 3, b"3", None)
    assert frames(got) == [b"1"]
    timers.fire()  # 2 never came (lost on the bus, or withheld from bob)
    assert frames(got) == [b"1", b"3", b"4"]
    assert s.flushed == 2
    s.offer("user:bob", "dm:alice|bob", 2, b"2", None)  # late: at once, the client ignores it
    s.offer("user:bob", "dm:alice|bob", 5, b"5", None)
    assert frames(got) == [b"1", b"3", b"4", b"2", b"5"]


def test_conversations_and_topics_are_ordered_apart(
    seq: tuple[Sequencer, list[tuple[str, bytes, str | None]], Timers],
) -> None:
    s, got, timers = seq
    s.offer("user:bob", "g:1", 10, b"g10", None)
    s.offer("user:bob", "dm:a|bob", 3, b"d3", None)
    s.offer("user:bob", "g:1", 12, b"g12", None)  # held: g:1 waits for 11
    s.offer("user:bob", "dm:a|bob", 4, b"d4", None)  # another conversation: not held
    s.offer("user:carol", "g:1", 12, b"c12", None)  # another topic: its first
    assert frames(got) == [b"g10", b"d3", b"d4", b"c12"]
    s.drop("user:bob")  # bob's last session here left: forgotten, timers cancelled
    assert all(t.cancelled for t in timers.pending)
    assert s.streams() == 1
    s.offer("user:bob", "g:1", 13, b"g13", None)  # starts afresh
    assert frames(got)[-1] == b"g13"


def test_the_order_prefix_round_trips_and_other_frames_have_none() -> None:
    conv = "dm:" + "a" * 200 + "|" + "b" * 200  # longer than 255 bytes
    prefix = encode_order(conv, 2**40 + 7)
    assert decode_order(prefix + b"\x81\x02{}") == (conv, 2**40 + 7, b"\x81\x02{}")
    assert decode_order(b"\x81\x02{}") is None
    assert decode_order(b'{"op":"kick"}') is None
