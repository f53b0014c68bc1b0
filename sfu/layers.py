"""Choosing simulcast layers: each subscriber's bitrate budget, the layer it gets, and what the
publisher is asked for. Pure and deterministic: the time is passed in; no I/O.

- ``RateController`` estimates what one subscriber can take from the loss in its receiver
  reports (RFC 3550 section 6.4.2, fraction lost in 1/256), in the manner of Galène's
  ``rtpconn.updateRate``: below 2 % loss it grows by 269/256 per update, but only while the
  rate actually sent is at least 3/4 of the estimate; above 10 % loss it shrinks by
  (512 - loss)/512; in between it holds. It never goes below ``floor_bps`` nor above
  ``max_bps``. The budget is the smaller of this estimate and the subscriber's REMB.
  With simulcast the rate sent jumps between layers, so the 3/4 rule alone would keep a
  subscriber on a low layer for ever: the estimate may also grow, with no loss, towards
  ``want_bps`` (what the next layer up needs). Such a climb that ends in loss is not tried
  again for a back-off time that doubles at each failure (2 s up to 64 s), so a link that
  cannot carry the next layer sees a rare, short probe rather than a steady flapping.
- ``choose_layer`` picks the layer for a subscriber: never one larger than the smallest layer
  that fills the box the client renders the track in (0 = not shown: none); the highest layer
  whose measured rate fits in 7/8 of the budget; the current layer (or a lower one) is kept
  while its rate stays below 3/2 of the budget (Galène's thresholds: the gap between them is
  the hysteresis that stops a subscriber near a boundary from flapping). When not even the
  lowest layer fits, the subscriber is ``starved`` (the channel's ``track_starved``).
- ``highest_needed`` is what the publisher is asked to send: the highest layer any subscriber
  needs, not the minimum over them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

LOW_LOSS = 5  # of 256: about 2 %
HIGH_LOSS = 25  # of 256: about 10 %


class RateController:
    """Loss-based bitrate estimate for one subscriber's video, bounded by its REMB."""

    __slots__ = (
        "backoff_s",
        "estimate",
        "floor_bps",
        "hold_until",
        "interval_s",
        "last_update",
        "max_backoff_s",
        "max_bps",
        "remb",
        "remb_at",
        "remb_ttl_s",
    )

    def __init__(
        self,
        *,
        start_bps: int = 512_000,
        floor_bps: int = 9_600,
        max_bps: int = 20_000_000,
        interval_s: float = 0.2,
        backoff_s: float = 2.0,
        max_backoff_s: float = 64.0,
        remb_ttl_s: float = 5.0,
    ) -> None:
        self.estimate = start_bps
        self.floor_bps = floor_bps
        self.max_bps = max_bps
        self.backoff_s = backoff_s  # how long a failed climb is not retried
        self.max_backoff_s = max_backoff_s
        self.hold_until = float("-inf")
        self.interval_s = interval_s  # receiver reports closer together than this are ignored
        self.remb_ttl_s = remb_ttl_s  # a REMB older than this no longer bounds the budget
        self.last_update = float("-inf")
        self.remb: int | None = None
        self.remb_at = float("-inf")

    def report_loss(
        self, now: float, fraction_lost: int, actual_bps: int, want_bps: int = 0
    ) -> int:
        """Take a receiver report's fraction lost (0-255), the rate actually sent to the
        subscriber and the rate the next layer up would need (0: none); returns the new
        estimate."""
        if now - self.last_update < self.interval_s:
            return self.estimate
        self.last_update = now
        rate = self.estimate
        if fraction_lost < LOW_LOSS:
            if 4 * actual_bps >= 3 * rate or (rate < want_bps and now >= self.hold_until):
                rate = rate * 269 // 256
        elif fraction_lost > HIGH_LOSS:
            rate = rate * (512 - fraction_lost) // 512
            if now >= self.hold_until:  # a new episode of loss: back off longer
                if self.hold_until > float("-inf"):
                    self.backoff_s = min(2 * self.backoff_s, self.max_backoff_s)
                self.hold_until = now + self.backoff_s
        self.estimate = max(self.floor_bps, min(self.max_bps, rate))
        return self.estimate

    def congested(self, now: float, bps: int) -> int:
        """The subscriber reports congestion (a REMB well below what it is sent): the estimate
        falls to ``bps`` and climbing backs off as after loss. Returns the new estimate.

        A receive-side REMB never exceeds about 1.5 times what arrives (libwebrtc's AIMD
        ceiling, which aiortc copies), so as a bound it would keep a simulcast subscriber on
        its layer for ever; what it does say reliably is that the receiver cannot keep up."""
        self.estimate = max(self.floor_bps, min(self.estimate, bps))
        if now >= self.hold_until:
            if self.hold_until > float("-inf"):
                self.backoff_s = min(2 * self.backoff_s, self.max_backoff_s)
            self.hold_until = now + self.backoff_s
        return self.estimate

    def report_remb(self, now: float, bps: int) -> None:
        """Take the subscriber's REMB (its receive-side estimate)."""
        self.remb = bps
        self.remb_at = now

    def budget(self, now: float) -> int:
        """What the subscriber can take now: the loss estimate, bounded by a recent REMB."""
        if self.remb is not None and now - self.remb_at <= self.remb_ttl_s:
            return min(self.estimate, self.remb)
        return self.estimate


@dataclass(frozen=True, slots=True)
class Layer:
    """One simulcast layer as the publisher sends it now."""

    width: int
    height: int
    bps: int  # measured rate; 0 when the layer is not being received


@dataclass(frozen=True, slots=True)
class Choice:
    layer: int | None  # None: send nothing
    starved: bool  # wants video but even the lowest layer does not fit


#: The render box of a subscriber that has not said how large it shows a track: any layer fits.
ANY_SIZE: Final = (1 << 16, 1 << 16)
UP = (7, 8)  # a higher layer is taken when its rate is at most 7/8 of the budget
DOWN = (3, 2)  # the current layer is kept while its rate is at most 3/2 of the budget


def choose_layer(
    layers: Sequence[Layer], current: int | None, budget_bps: int, render: tuple[int, int]
) -> Choice:
    """The layer to forward to a subscriber (layers ordered from smallest to largest).

    ``current`` is the layer it gets now (None if none); ``render`` is the (width, height) the
    client shows the track at, (0, 0) when not shown."""
    rw, rh = render
    if rw <= 0 or rh <= 0:
        return Choice(None, False)
    available = [i for i, layer in enumerate(layers) if layer.bps > 0]
    if not available:
        return Choice(None, False)  # nothing comes from the publisher: nothing to starve of
    cap = _cap(layers, available, rw, rh)
    up: int | None = None
    hold: int | None = None
    for i in available:
        if i > cap:
            break
        bps = layers[i].bps
        if bps * UP[1] <= budget_bps * UP[0]:
            up = i
        if current is not None and i <= current and bps * DOWN[1] <= budget_bps * DOWN[0]:
            hold = i
    if up is None and hold is None:
        return Choice(None, True)
    return Choice(max(i for i in (up, hold) if i is not None), False)


def _cap(layers: Sequence[Layer], available: list[int], rw: int, rh: int) -> int:
    """The smallest available layer that fills a ``rw`` x ``rh`` box (else the largest)."""
    for i in available:
        if layers[i].width >= rw and layers[i].height >= rh:
            return i
    return available[-1]


def climb_bps(layers: Sequence[Layer], current: int | None, render: tuple[int, int]) -> int:
    """The budget the next layer up would need (``UP`` of its rate), to pass to
    ``RateController.report_loss`` as ``want_bps``; 0 when there is nothing to climb to."""
    rw, rh = render
    available = [i for i, layer in enumerate(layers) if layer.bps > 0]
    if rw <= 0 or rh <= 0 or not available:
        return 0
    cap = _cap(layers, available, rw, rh)
    for i in available:
        if i > cap:
            break
        if current is None or i > current:
            return -(-layers[i].bps * UP[1] // UP[0])
    return 0


#: A layer never received is taken to need this many times the rate of the one below it (the
#: publisher's own tables step by about 3: 150 kbps, 500 kbps, 1.7 Mbps).
UNSEEN_STEP: Final = 3


def unseen_wanted(layers: Sequence[Layer], current: int | None, render: tuple[int, int]) -> int:
    """The rate to ask the publisher for, beyond the layers it sends, so that it starts the
    next layer up (0: none): when the subscriber is on the highest layer ever received, a
    higher one has never been received (rate 0), and the ``render`` box is larger than the
    layer it gets. Without it nobody would ever need a layer the publisher has not started
    (its rate is unknown), and the publisher's estimate stays near what it sends."""
    rw, rh = render
    seen = [i for i, layer in enumerate(layers) if layer.bps > 0]
    if rw <= 0 or rh <= 0 or not seen or current != seen[-1] or current + 1 >= len(layers):
        return 0
    top = layers[current]
    if top.width >= rw and top.height >= rh:
        return 0  # it fills the box already
    return top.bps * UNSEEN_STEP


def highest_needed(targets: Iterable[int | None]) -> int | None:
    """The highest layer any subscriber needs (None: no one needs video), which the publisher
    must keep sending: the others are served by the lower layers it sends anyway."""
    best: int | None = None
    for t in targets:
        if t is not None and (best is None or t > best):
            best = t
    return best
