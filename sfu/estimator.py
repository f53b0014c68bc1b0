"""What a publisher receiver works out from its packets: loss (NACKs) and a bandwidth estimate
(REMB). Pure; no I/O. Both are built so that the per-packet part is a few integer operations;
the rest runs once per window (``ReceiveEstimator``) or only when a packet goes missing
(``NackTracker``).

``NackTracker``: one RTP stream's missing sequence numbers, as aiortc's ``NackGenerator``
keeps them (the 128 below the highest seen; a gap is NACKed as a whole, with every number still
missing), from sequence numbers alone (a repaired packet's original number, unwrapped by the
caller, fills its hole).

``ReceiveEstimator``: the estimate of the link from one publisher for REMB, from the receive
rate and the loss and delay trend, computed every ``WINDOW_MS`` (250 ms), not per packet:

- the incoming rate is measured over the last four windows (1 s);
- the queuing delay is one sample per window: the arrival time minus the publisher's
  abs-send-time of the packet that closes the window, relative to the smallest such
  difference of the last 10 s (the path's own delay);
- **decrease** (to 0.85 of the incoming rate) when over 10 % of the window's packets were lost,
  or when the queuing delay exceeds 60 ms and has grown over two windows in a row (a queue
  building up); **hold** at 2-10 % loss; otherwise **increase** by 8 % per second, never above
  1.5 times the incoming rate (libwebrtc's AIMD ceiling, which aiortc copies: a receiver can
  vouch only for about what it sees) and never below ``MIN_BPS``;
- a REMB is due every 500 ms (aiortc's feedback interval), and at once after a decrease.
"""

from __future__ import annotations

from typing import Final

HISTORY: Final = 128  # missing sequence numbers kept below the highest (aiortc's RTP_HISTORY_SIZE)

WINDOW_MS: Final = 250
RATE_WINDOWS: Final = 4  # the incoming rate is measured over this many windows
FEEDBACK_MS: Final = 500
MIN_BPS: Final = 30_000
START_FACTOR: Final = 1.5  # the first estimate, and the ceiling: this times the incoming rate
DECREASE: Final = 0.85
INCREASE_PER_S: Final = 1.08
LOSS_HOLD: Final = 0.02
LOSS_DECREASE: Final = 0.10
QUEUE_MS: Final = 60
BASE_MS: Final = 10_000  # the path's own delay: the smallest over this long

_AST_WRAP_MS: Final = 64_000  # abs-send-time is 6.18 fixed-point seconds: it wraps every 64 s


class NackTracker:
    """Missing sequence numbers of one RTP stream."""

    __slots__ = ("highest", "lost", "missing")

    def __init__(self) -> None:
        self.highest = -1  # -1 before the first packet
        self.missing: set[int] = set()
        self.lost = 0  # sequence numbers found missing so far (each once)

    def add(self, seq: int) -> bool:
        """Take a received sequence number; True if it showed new missing ones (then NACK
        ``sorted(self.missing)``)."""
        highest = self.highest
        d = (seq - highest) & 0xFFFF
        if d == 1:  # the common case: the next one
            self.highest = seq
            return False
        if highest < 0:
            self.highest = seq
            return False
        if d == 0:
            return False
        if d >= 0x8000:  # older: a late or repaired packet
            self.missing.discard(seq)
            return False
        return self._gap(seq, d)

    def _gap(self, seq: int, d: int) -> bool:
        missing = self.missing
        first = max(1, d - HISTORY)
        missing.update((self.highest + k) & 0xFFFF for k in range(first, d))
        self.lost += d - 1
        self.highest = seq
        if len(missing) > HISTORY:
            missing.intersection_update((seq - k) & 0xFFFF for k in range(1, HISTORY + 1))
        return True


class ReceiveEstimator:
    """The REMB estimate for one publisher receiver (see the module's docstring)."""

    __slots__ = (
        "_base",
        "_last_queue",
        "_last_sent",
        "_lost",
        "_rising",
        "_windows",
        "due_ms",
        "estimate",
        "octets",
        "packets",
        "started_ms",
    )

    def __init__(self) -> None:
        self.octets = 0  # bytes in the current window (the caller adds each packet's)
        self.packets = 0  # packets in the current window (likewise)
        self._lost = 0  # the streams' lost count at the last window's close
        self.due_ms = -1  # when the current window closes (-1: before the first packet)
        self.started_ms = 0
        self.estimate: int | None = None
        self._windows: list[tuple[int, int]] = []  # (octets, ms) of the last windows
        self._base: list[tuple[int, int]] = []  # (arrival ms, delay sample), smallest kept
        self._last_queue: int | None = None
        self._rising = 0
        self._last_sent = -FEEDBACK_MS

    def start(self, now_ms: int) -> None:
        self.started_ms = now_ms
        self.due_ms = now_ms + WINDOW_MS

    def rate_bps(self) -> int | None:
        """The incoming rate over the last windows (None before one has closed)."""
        ws = self._windows
        ms = sum(w[1] for w in ws)
        return sum(w[0] for w in ws) * 8000 // ms if ms > 0 else None

    def queue_ms(self, now_ms: int, abs_send_time: int) -> int:
        """This sample's delay above the smallest of the last ``BASE_MS``."""
        delay = (now_ms - ((abs_send_time * 1000) >> 18)) % _AST_WRAP_MS
        base = self._base
        while base and base[-1][1] >= delay:  # keep an increasing run: the front is the min
            base.pop()
        base.append((now_ms, delay))
        while base[0][0] < now_ms - BASE_MS:
            base.pop(0)
        queue = delay - base[0][1]
        # A sample just after the 64 s wrap of the delay itself reads as a huge delay; the
        # delay through a queue is below half of the wrap anyway.
        return queue if queue < _AST_WRAP_MS // 2 else 0

    def tick(self, now_ms: int, abs_send_time: int | None, lost_total: int) -> int | None:
        """Close the window (call when ``now_ms >= due_ms``; ``abs_send_time`` of the packet
        that closes it, ``lost_total``: sequence numbers found missing so far in the streams).
        Returns the bitrate to send in a REMB, if one is due."""
        if self.due_ms < 0:  # the first packet: the first window starts
            self.start(now_ms)
            self.octets = self.packets = 0
            self._lost = lost_total
            return None
        ms = now_ms - self.started_ms
        self._windows.append((self.octets, ms))
        if len(self._windows) > RATE_WINDOWS:
            del self._windows[0]
        lost = lost_total - self._lost
        self._lost = lost_total
        packets = self.packets
        self.octets = self.packets = 0
        self.started_ms = now_ms
        self.due_ms = now_ms + WINDOW_MS
        rate = self.rate_bps()
        if rate is None:
            return None
        expected = packets + lost
        loss = lost / expected if expected else 0.0
        queue = None if abs_send_time is None else self.queue_ms(now_ms, abs_send_time)
        if queue is not None and self._last_queue is not None and queue > self._last_queue:
            self._rising += 1
        else:
            self._rising = 0
        self._last_queue = queue
        old = self.estimate
        ceiling = max(int(rate * START_FACTOR), MIN_BPS)
        congested = loss > LOSS_DECREASE or (
            queue is not None and queue > QUEUE_MS and self._rising >= 2
        )
        if old is None:
            new = ceiling
        elif congested:
            new = max(int(rate * DECREASE), MIN_BPS)
        elif loss >= LOSS_HOLD:
            new = min(old, ceiling)
        else:
            new = min(int(old * INCREASE_PER_S ** (ms / 1000)), ceiling)
        self.estimate = new
        if (congested and old is not None and new < old) or (
            now_ms - self._last_sent >= FEEDBACK_MS
        ):
            self._last_sent = now_ms
            return new
        return None
