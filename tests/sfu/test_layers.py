"""Layer choice: the loss-based rate controller, the per-subscriber layer, the publisher's."""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

from sfu.layers import (
    Choice,
    Layer,
    RateController,
    choose_layer,
    climb_bps,
    highest_needed,
    unseen_wanted,
)

LAYERS = [Layer(320, 180, 150_000), Layer(640, 360, 500_000), Layer(1280, 720, 1_500_000)]
FULL = (1280, 720)


def test_shrinks_under_15_percent_loss_then_climbs_back() -> None:
    rc = RateController(start_bps=1_000_000)
    t = 0.0
    seen = [rc.estimate]
    for _ in range(80):
        t += 1
        seen.append(rc.report_loss(t, 38, rc.estimate))  # 15 % loss
    assert all(b < a for a, b in pairwise(seen[:40]))
    assert rc.estimate == rc.floor_bps  # all the way down, and no further
    for _ in range(200):
        t += 1
        rc.report_loss(t, 0, rc.estimate)  # no loss, using what it is given
    assert rc.estimate > 1_000_000


def test_holds_between_the_thresholds_and_without_use() -> None:
    rc = RateController()
    for t in range(1, 100):
        rc.report_loss(float(t), 13, rc.estimate)  # 5 %: neither grows nor shrinks
    assert rc.estimate == 512_000
    for t in range(100, 200):
        rc.report_loss(float(t), 0, 100_000)  # low use and nothing wanted: no growth
    assert rc.estimate == 512_000
    rc.report_loss(200.0, 0, 500_000)  # 500k >= 3/4 of 512k: grows
    assert rc.estimate == 512_000 * 269 // 256


def test_reports_closer_than_the_interval_are_ignored() -> None:
    rc = RateController(interval_s=0.2)
    rc.report_loss(1.0, 100, 0)
    after = rc.estimate
    rc.report_loss(1.1, 100, 0)
    assert rc.estimate == after
    rc.report_loss(1.3, 100, 0)
    assert rc.estimate < after


def test_remb_bounds_the_budget_while_recent() -> None:
    rc = RateController(remb_ttl_s=5.0)
    assert rc.budget(0.0) == 512_000
    rc.report_remb(10.0, 300_000)
    assert rc.budget(12.0) == 300_000
    rc.report_remb(12.0, 900_000)
    assert rc.budget(12.0) == 512_000  # the loss estimate is the smaller
    assert rc.budget(17.5) == 512_000  # stale REMB


def test_render_size_caps_the_layer() -> None:
    huge = 100_000_000
    assert choose_layer(LAYERS, None, huge, FULL) == Choice(2, False)
    assert choose_layer(LAYERS, None, huge, (640, 360)) == Choice(1, False)
    assert choose_layer(LAYERS, None, huge, (641, 300)) == Choice(2, False)  # wider than 1
    assert choose_layer(LAYERS, None, huge, (100, 100)) == Choice(0, False)
    assert choose_layer(LAYERS, None, huge, (4000, 3000)) == Choice(2, False)
    assert choose_layer(LAYERS, 2, huge, (0, 0)) == Choice(None, False)  # not shown
    assert choose_layer(LAYERS, 2, huge, (320, 180)) == Choice(0, False)  # shrunk window
    assert climb_bps(LAYERS, 1, (640, 360)) == 0  # nothing to climb to


def test_layers_of_unknown_size_fill_no_box() -> None:
    """A layer whose keyframe has not told its size yet ((0, 0)) is never taken as filling a
    box: with no size known, any layer may be needed (as before any render report)."""
    huge = 100_000_000
    unknown = [Layer(0, 0, layer.bps) for layer in LAYERS]
    assert choose_layer(unknown, None, huge, (100, 100)) == Choice(2, False)
    assert climb_bps(unknown, 0, (100, 100)) > 0
    partly = [LAYERS[0], Layer(0, 0, 500_000), LAYERS[2]]
    assert choose_layer(partly, None, huge, (300, 170)) == Choice(0, False)
    assert choose_layer(partly, None, huge, (600, 300)) == Choice(2, False)  # 1 is unknown
    assert choose_layer(partly, None, 700_000, (600, 300)) == Choice(1, False)  # the budget


def test_a_layer_never_received_is_asked_for_a_larger_box() -> None:
    """Only the low layer arrives (the publisher's estimate is near what it sends): a
    subscriber on it whose box it does not fill asks the publisher for room for the next."""
    only_low = [LAYERS[0], Layer(0, 0, 0), Layer(0, 0, 0)]
    assert unseen_wanted(only_low, 0, (640, 360)) == 3 * 150_000
    assert unseen_wanted(only_low, 0, (320, 180)) == 0  # the low layer fills it
    assert unseen_wanted(only_low, 0, (0, 0)) == 0  # not shown
    assert unseen_wanted(only_low, None, (640, 360)) == 0  # not on the top layer (yet)
    assert unseen_wanted(LAYERS, 2, FULL) == 0  # nothing above
    assert unseen_wanted([*LAYERS[:2], Layer(0, 0, 0)], 1, FULL) == 3 * 500_000
    assert unseen_wanted([*LAYERS[:2], Layer(0, 0, 0)], 0, FULL) == 0  # layer 1 is received


def test_hysteresis() -> None:
    # Up only when the layer fits in 7/8 of the budget.
    assert choose_layer(LAYERS, 0, 571_000, FULL).layer == 0
    assert choose_layer(LAYERS, 0, 572_000, FULL).layer == 1
    assert climb_bps(LAYERS, 0, FULL) == 571_429
    # Down only when it exceeds 3/2 of the budget.
    assert choose_layer(LAYERS, 1, 334_000, FULL).layer == 1
    assert choose_layer(LAYERS, 1, 333_000, FULL).layer == 0
    # Starved when even the lowest does not fit, with the same band to come back.
    assert choose_layer(LAYERS, 0, 100_000, FULL) == Choice(0, False)
    assert choose_layer(LAYERS, 0, 99_000, FULL) == Choice(None, True)
    assert choose_layer(LAYERS, None, 171_000, FULL) == Choice(None, True)
    assert choose_layer(LAYERS, None, 172_000, FULL) == Choice(0, False)


def test_layers_not_received_are_skipped() -> None:
    missing_mid = [LAYERS[0], Layer(640, 360, 0), LAYERS[2]]
    assert choose_layer(missing_mid, None, 100_000_000, (640, 360)).layer == 2
    assert choose_layer(missing_mid, None, 1_000_000, (640, 360)).layer == 0
    none = [Layer(320, 180, 0)]
    assert choose_layer(none, None, 1_000_000, FULL) == Choice(None, False)


def test_highest_needed() -> None:
    assert highest_needed([]) is None
    assert highest_needed([None, None]) is None
    assert highest_needed([0, None, 2, 1]) == 2
    assert highest_needed([0, 0]) == 0


def simulate(
    capacity: Callable[[float], int], seconds: float, render: tuple[int, int] = FULL
) -> list[tuple[float, Choice]]:
    """A subscriber behind a link of the given capacity: what is sent above it is lost."""
    rc = RateController()
    current: int | None = None
    out: list[tuple[float, Choice]] = []
    t = 0.0
    while t < seconds:
        sent = LAYERS[current].bps if current is not None else 0
        cap = capacity(t)
        loss = 0 if sent <= cap else min(255, 256 * (sent - cap) // sent)
        rc.report_loss(t, loss, sent, climb_bps(LAYERS, current, render))
        choice = choose_layer(LAYERS, current, rc.budget(t), render)
        current = choice.layer
        out.append((t, choice))
        t += 0.5
    return out


def switches(history: list[tuple[float, Choice]], after: float) -> int:
    tail = [c.layer for t, c in history if t >= after]
    return sum(1 for a, b in pairwise(tail) if a != b)


def share(history: list[tuple[float, Choice]], after: float, layer: int | None) -> float:
    tail = [c.layer for t, c in history if t >= after]
    return sum(1 for x in tail if x == layer) / len(tail)


def test_ample_link_settles_on_the_top_layer() -> None:
    h = simulate(lambda t: 3_000_000, 300)
    assert h[-1][1] == Choice(2, False)
    assert switches(h, 60) == 0


def test_middle_link_stays_on_the_middle_layer() -> None:
    h = simulate(lambda t: 800_000, 600)
    assert share(h, 200, 1) > 0.95
    # A short probe of the top layer now and then (two switches), at most one a minute once
    # the back-off has grown: 64 s plus the climb.
    assert switches(h, 200) <= 2 * (400 // 64)
    probes = [t for t, c in h if t >= 200 and c.layer == 2]
    starts = [t for t in probes if t - 0.5 not in probes]
    assert all(b - a >= 64 for a, b in pairwise(starts))


def test_render_box_keeps_it_low_on_an_ample_link() -> None:
    h = simulate(lambda t: 3_000_000, 200, render=(320, 180))
    assert switches(h, 0) <= 1 and h[-1][1] == Choice(0, False)


def test_starved_on_a_thin_link() -> None:
    h = simulate(lambda t: 100_000, 600)
    assert share(h, 200, None) > 0.9
    assert all(c.starved for t, c in h if t >= 200 and c.layer is None)


def test_follows_the_link_down_and_back_up() -> None:
    def capacity(t: float) -> int:
        return 300_000 if 100 <= t < 200 else 3_000_000

    h = simulate(capacity, 400)
    at = dict(h)
    assert at[99.5].layer == 2
    assert share([(t, c) for t, c in h if t < 200], 130, 0) > 0.9  # with a rare probe
    assert all(c.layer == 2 for t, c in h if t >= 300)
