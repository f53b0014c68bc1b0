"""The publisher receiver's NACK tracker and bandwidth estimator (``sfu/estimator.py``)."""

from __future__ import annotations

from sfu.estimator import (
    FEEDBACK_MS,
    HISTORY,
    MIN_BPS,
    WINDOW_MS,
    NackTracker,
    ReceiveEstimator,
)


def test_nack_tracker_in_order_finds_nothing() -> None:
    t = NackTracker()
    assert not any(t.add(s & 0xFFFF) for s in range(65_530, 65_545))  # across the wrap
    assert t.missing == set() and t.lost == 0 and t.highest == 65_544 & 0xFFFF


def test_nack_tracker_gap_then_repair() -> None:
    t = NackTracker()
    t.add(100)
    assert t.add(104)
    assert t.missing == {101, 102, 103} and t.lost == 3
    assert not t.add(102)  # repaired (late or RTX, unwrapped)
    assert t.missing == {101, 103}
    assert not t.add(104)  # a duplicate
    assert t.add(106)  # another gap: the whole set is NACKed again
    assert sorted(t.missing) == [101, 103, 105] and t.lost == 4


def test_nack_tracker_gap_across_the_wrap() -> None:
    t = NackTracker()
    t.add(65_534)
    assert t.add(2)
    assert t.missing == {65_535, 0, 1}


def test_nack_tracker_keeps_only_recent_history() -> None:
    t = NackTracker()
    t.add(0)
    assert t.add(1000)  # a long gap: only the last HISTORY are worth a NACK
    assert len(t.missing) == HISTORY and min(t.missing) == 1000 - HISTORY  # as aiortc
    assert t.lost == 999
    t.add(1002)
    assert len(t.missing) == HISTORY - 1  # 874..1001 but 1000 (received)
    assert 1000 - HISTORY + 1 not in t.missing
    assert 1001 in t.missing


def feed(
    e: ReceiveEstimator,
    now: int,
    ms: int,
    bps: int,
    delay_ms: int = 20,
    delay_growth: float = 0.0,
    lost_total: int = 0,
) -> tuple[int, list[int]]:
    """``ms`` of packets every 10 ms at ``bps``, sent ``delay_ms`` (growing by
    ``delay_growth`` ms per ms) before they arrive. Returns the clock and the REMBs due."""
    size = bps // 8 // 100
    rembs = []
    for _ in range(ms // 10):
        now += 10
        delay_ms += delay_growth * 10
        send_ms = now - int(delay_ms)
        ast = ((send_ms % 64_000) << 18) // 1000
        e.octets += size
        e.packets += 1
        if now >= e.due_ms:
            remb = e.tick(now, ast, lost_total)
            if remb is not None:
                rembs.append(remb)
    return now, rembs


def test_estimator_starts_at_one_and_a_half_times_the_rate_and_reports_every_500_ms() -> None:
    e = ReceiveEstimator()
    _, rembs = feed(e, 1000, 2000, 800_000)
    rate = e.rate_bps()
    assert rate is not None and abs(rate - 800_000) < 40_000
    assert rembs and all(1_100_000 <= r <= 1_260_000 for r in rembs)  # at the 1.5x ceiling
    assert len(rembs) in (3, 4, 5)  # 2 s of windows, every FEEDBACK_MS
    assert FEEDBACK_MS == 2 * WINDOW_MS


def test_estimator_follows_a_falling_rate_down_and_grows_slowly() -> None:
    e = ReceiveEstimator()
    now, _ = feed(e, 0, 2000, 1_000_000)
    now, rembs = feed(e, now, 3000, 200_000)
    assert rembs[-1] <= 320_000  # the ceiling follows what arrives
    e.estimate = 100_000  # as after a decrease
    now, rembs = feed(e, now, 1000, 200_000)
    assert 100_000 < rembs[-1] <= 110_000  # +8 % per second, not a jump to the ceiling


def test_estimator_decreases_on_loss_at_once() -> None:
    e = ReceiveEstimator()
    now, _ = feed(e, 0, 2000, 1_000_000, lost_total=0)
    now, rembs = feed(e, now, WINDOW_MS, 1_000_000, lost_total=10)  # 10 of 35 lost
    assert rembs and rembs[-1] <= 900_000
    assert e.estimate is not None and e.estimate <= 900_000


def test_estimator_decreases_when_a_queue_builds_up() -> None:
    e = ReceiveEstimator()
    now, _ = feed(e, 0, 2000, 1_000_000)
    steady = e.estimate
    assert steady is not None
    now, rembs = feed(e, now, 1500, 1_000_000, delay_growth=0.1)  # +100 ms per second
    assert e.estimate is not None and e.estimate < steady * 0.9
    assert rembs and min(rembs) < steady * 0.9


def test_estimator_never_below_the_floor() -> None:
    e = ReceiveEstimator()
    _, rembs = feed(e, 0, 2000, 8_000)
    assert rembs and min(rembs) >= MIN_BPS
