"""One subscriber's view of a simulcast video track: the layer switcher. Pure; no I/O.

A simulcast publisher sends each layer as its own RTP stream (own SSRC, sequence numbers,
timestamps, VP8 picture ids). A subscriber receives one stream. ``LayerMunger`` picks the
packets of the layer being forwarded and rewrites them so that the subscriber sees a single
continuous stream, whatever switches and pauses happen:

- sequence numbers stay gap-free: the first packet after a switch or pause follows the last one
  sent (a loss upstream still shows as a gap, so the receiver NACKs it);
- timestamps stay on one clock: at a switch the new layer's offset comes from both layers'
  sender reports (RFC 3550 section 6.4.1: the NTP <-> RTP mapping of each stream), so the
  wall-clock time between the last packet sent and the first of the new layer carries over.
  A switch waits until the new layer has had a sender report (as LiveKit's forwarder does);
  if the computed timestamp would not advance, it is nudged one tick forward (as mediasoup's
  ``SimulcastConsumer`` does);
- VP8 picture ids and TL0PICIDX go on from the last ones sent, +1 at a switch (a decoder
  takes a jump back for a reordering, RFC 7741 section 4.2);
- a switch happens only at a keyframe of the target layer (RFC 7741 section 4.3, RFC 6184
  section 5 for H.264); until then the current layer goes on, and ``want_keyframe`` names the
  layer the adapter should send a PLI for (rate-limited by the adapter);
- packets of other layers are dropped, and so are late packets of the current layer from before
  the point where it was (re)started: they belong to another mapping.

H.264 needs only sequence numbers and timestamps. The per-packet path allocates the output
tuple, and for VP8 the rewritten payload when its picture id or TL0PICIDX changes (the
descriptor is parsed once per incoming packet by the up track, for all its subscribers).
"""

from __future__ import annotations

import random
from typing import Final

from .rtp import h264_keyframe, seq_newer
from .vp8 import VP8Descriptor, VP8Error, keyframe, parse, rewrite

TS_MASK: Final = 0xFFFFFFFF
NTP_ONE_SECOND: Final = 1 << 32
# Past this many packets after a (re)start, a late packet from before it is implausible, and the
# guard is dropped so that wrapping sequence numbers cannot make new packets look old.
RESTART_GUARD: Final = 0x1000


def _signed32(x: int) -> int:
    x &= TS_MASK
    return x - (1 << 32) if x & 0x80000000 else x


class LayerMunger:
    """Forwarding state of one subscriber for one simulcast video track."""

    __slots__ = (
        "clock_rate",
        "codec",
        "current",
        "guard_seq",
        "last_in_ts",
        "last_layer",
        "last_out_ts",
        "next_seq",
        "out_pid",
        "out_tl0",
        "pid_offset",
        "reports",
        "seq_offset",
        "target",
        "tl0_offset",
        "ts_offset",
    )

    def __init__(
        self, codec: str, layers: int, *, clock_rate: int = 90000, rng: random.Random | None = None
    ) -> None:
        if codec not in ("vp8", "h264"):
            raise ValueError(f"no layer switching for codec {codec!r}")
        r = rng or random
        self.codec = codec
        self.clock_rate = clock_rate
        # Each layer's last sender report: (NTP time in 1/2^32 s, RTP timestamp).
        self.reports: list[tuple[int, int] | None] = [None] * layers
        self.target: int | None = None  # the layer the subscriber should get; None: nothing
        self.current: int | None = None  # the layer being forwarded now
        self.last_layer: int | None = None  # the layer last forwarded (kept across pauses)
        self.next_seq = r.randrange(1 << 16)
        self.seq_offset = 0
        self.guard_seq: int | None = None  # incoming seq of the (re)start, while it matters
        self.ts_offset = r.randrange(1 << 32)
        self.last_in_ts = 0  # newest incoming timestamp forwarded (of ``last_layer``)
        self.last_out_ts = 0  # and what it became
        self.pid_offset = 0
        self.tl0_offset = 0
        self.out_pid: int | None = None  # newest picture id sent (15-bit space)
        self.out_tl0: int | None = None  # newest TL0PICIDX sent

    # -- control (not per packet) --

    def set_target(self, layer: int | None) -> None:
        """Choose the layer to forward (``None``: none, a pause). Going to ``None`` stops at
        once; going to a layer waits for its keyframe (see ``want_keyframe``)."""
        if layer is not None and not 0 <= layer < len(self.reports):
            raise ValueError(f"no layer {layer}")
        self.target = layer
        if layer is None:
            self.current = None

    @property
    def want_keyframe(self) -> int | None:
        """The layer whose keyframe the switcher waits for (send the publisher a PLI for it)."""
        target = self.target
        return None if target is None or target == self.current else target

    def sender_report(self, layer: int, ntp: int, rtp_ts: int) -> int | None:
        """Record a layer's sender report (``ntp`` is the 64-bit NTP timestamp); returns the
        RTP timestamp to put in the subscriber's own report if ``layer`` is the one forwarded,
        else ``None``."""
        self.reports[layer] = (ntp, rtp_ts)
        if layer != self.current:
            return None
        return (rtp_ts + self.ts_offset) & TS_MASK

    # -- per packet --

    def packet(
        self, layer: int, seq: int, ts: int, payload: bytes, desc: VP8Descriptor | None = None
    ) -> tuple[int, int, bytes] | None:
        """The (sequence number, timestamp, payload) to send for an incoming packet of
        ``layer``, or ``None`` to drop it. ``desc``: the VP8 payload's descriptor if the
        caller has parsed it (an up track parses a packet once for all its subscribers)."""
        vp8 = self.codec == "vp8"
        if layer != self.current:
            if layer != self.target:
                return None
            if vp8:
                if desc is None:
                    desc = keyframe(payload)
                    if desc is None:
                        return None
                elif not desc.keyframe:
                    return None
            elif not h264_keyframe(payload):
                return None
            if not self._switch(layer, seq, ts, desc):
                return None
        else:
            guard = self.guard_seq
            if guard is not None:
                if seq != guard and not seq_newer(seq, guard):
                    return None  # from before the (re)start
                if ((seq - guard) & 0xFFFF) > RESTART_GUARD:
                    self.guard_seq = None
            if vp8 and desc is None:
                try:
                    desc = parse(payload)
                except VP8Error:
                    return None
        out_seq = (seq + self.seq_offset) & 0xFFFF
        # Comparisons inlined (RFC 3550 wrapping arithmetic): this runs once per packet.
        if ((out_seq - self.next_seq) & 0xFFFF) < 0x8000:  # the next one or newer
            self.next_seq = (out_seq + 1) & 0xFFFF
        out_ts = (ts + self.ts_offset) & TS_MASK
        if 0 < ((out_ts - self.last_out_ts) & TS_MASK) < 0x80000000:
            self.last_out_ts = out_ts
            self.last_in_ts = ts
        if desc is None:
            return out_seq, out_ts, payload
        pid = desc.picture_id
        out_pid: int | None = None
        if pid is not None:
            out_pid = (pid + self.pid_offset) & 0x7FFF
            last = self.out_pid
            mask = 0x7FFF if desc.long_picture_id else 0x7F
            if last is None or 0 < ((out_pid - last) & mask) <= mask >> 1:
                self.out_pid = out_pid
        tl0 = desc.tl0picidx
        out_tl0: int | None = None
        if tl0 is not None:
            out_tl0 = (tl0 + self.tl0_offset) & 0xFF
            last = self.out_tl0
            if last is None or 0 < ((out_tl0 - last) & 0xFF) < 0x80:
                self.out_tl0 = out_tl0
        if out_pid == pid and out_tl0 == tl0:
            return out_seq, out_ts, payload
        return out_seq, out_ts, rewrite(payload, desc, out_pid, out_tl0)

    def _switch(self, layer: int, seq: int, ts: int, desc: VP8Descriptor | None) -> bool:
        """Start forwarding ``layer`` at its keyframe packet ``seq``; False to keep waiting."""
        last = self.last_layer
        if last is not None and last != layer:
            old, new = self.reports[last], self.reports[layer]
            if old is None or new is None:
                return False  # no common clock yet: wait for the sender reports
            # Wall-clock time of this packet minus that of the last one sent, in NTP units.
            rate = self.clock_rate
            t_new = new[0] * rate + _signed32(ts - new[1]) * NTP_ONE_SECOND
            t_old = old[0] * rate + _signed32(self.last_in_ts - old[1]) * NTP_ONE_SECOND
            delta = (t_new - t_old + NTP_ONE_SECOND // 2) // NTP_ONE_SECOND  # in clock ticks
            if delta <= 0:
                delta = 1
            self.ts_offset = (self.last_out_ts + delta - ts) & TS_MASK
        # Same layer after a pause: its own timestamps already carry the elapsed time.
        self.seq_offset = (self.next_seq - seq) & 0xFFFF
        self.guard_seq = seq
        self.current = layer
        self.last_layer = layer
        self.last_in_ts = ts
        self.last_out_ts = (ts + self.ts_offset) & TS_MASK
        if desc is not None:
            # The keyframe's picture id and TL0PICIDX follow the newest ones sent.
            pid = desc.picture_id
            if pid is not None and self.out_pid is not None:
                self.pid_offset = (self.out_pid + 1 - pid) & 0x7FFF
            tl0 = desc.tl0picidx
            if tl0 is not None and self.out_tl0 is not None:
                self.tl0_offset = (self.out_tl0 + 1 - tl0) & 0xFF
        return True
