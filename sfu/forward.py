"""Forwarding state of one published track (``UpTrack``) and each subscriber's copy of it
(``DownTrack``). Pure: no aiortc, no asyncio; sending is a callable handed in by the adapter.

Per packet the up track rewrites the header once per subscriber (payload bytes are shared) and
hands the result to the subscriber's transport. A video down track starts (and restarts after a
pause) only at a keyframe, and its sequence numbers stay gap-free across such gaps: the offset is
chosen so that the first packet after a restart follows the last one sent.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .channel import TrackInfo
from .packetcache import PacketCache
from .recording.tap import TrackTap
from .rtp import U16, ExtensionLayout, build, h264_keyframe, seq_newer, vp8_keyframe

KEYFRAME_INTERVAL_S = 0.5  # at most one keyframe request upstream per track in this time
RESEND_INTERVAL_S = 0.1  # a packet is retransmitted to a subscriber at most once in this time
MAX_NACKED = 64  # sequence numbers handled per NACK (a receiver that lost more needs a keyframe)
# A new subscriber starts from the newest cached keyframe only when it is this recent (RTP
# ticks at 90 kHz: 100 ms before the newest packet) and this few packets back: an older one
# would arrive as a burst of stale frames.
REPLAY_MAX_AGE_TS = 9000
REPLAY_MAX_PACKETS = 256


@dataclass(slots=True)
class Counters:
    """Per-worker counters (exported to the signaling process's /metrics)."""

    packets_in: int = 0
    packets_out: int = 0
    retransmitted: int = 0
    nacks_upstream: int = 0
    keyframe_requests: int = 0
    keyframes_replayed: int = 0  # subscribers started from a cached keyframe (no request)
    dropped_malformed: int = 0
    dropped_no_route: int = 0
    subscribe_offers: int = 0  # subscriber offers made (each counted once, when it goes out)


class DownTrack:
    """One subscriber's copy of one published track."""

    __slots__ = (
        "kind",
        "layout",
        "next_seq",
        "octets",
        "packets",
        "paused",
        "pt",
        "resent",
        "restart_seq",
        "rtx_pt",
        "rtx_seq",
        "rtx_ssrc",
        "send",
        "seq_offset",
        "set_sender_report",
        "ssrc",
        "starved",
        "subscriber",
        "ts_offset",
        "waiting",
    )

    def __init__(
        self,
        subscriber: str,
        kind: str,
        ssrc: int,
        pt: int,
        layout: ExtensionLayout,
        send: Callable[[bytes], None],
        *,
        rtx_ssrc: int | None = None,
        rtx_pt: int | None = None,
        set_sender_report: Callable[[int, int, int, int], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        r = rng or random
        self.subscriber = subscriber
        self.kind = kind
        self.ssrc = ssrc
        self.pt = pt
        self.rtx_ssrc = rtx_ssrc
        self.rtx_pt = rtx_pt
        self.layout = layout
        self.send = send
        self.set_sender_report = set_sender_report
        self.next_seq = r.randrange(1 << 16)
        self.rtx_seq = r.randrange(1 << 16)
        self.ts_offset = r.randrange(1 << 32)
        self.seq_offset = 0
        self.restart_seq: int | None = None
        self.waiting = True  # until the first packet (audio) or keyframe (video)
        self.paused = False  # the subscriber asked not to receive it
        self.starved = False  # its bandwidth is too low for this video
        self.packets = 0
        self.octets = 0
        # When each outgoing sequence number was last retransmitted (by seq & 1023).
        self.resent: list[float] = [-1.0] * 1024

    @property
    def active(self) -> bool:
        return not (self.paused or self.starved)

    def restart(self, in_seq: int) -> None:
        """Resume at ``in_seq``: map it to the next outgoing sequence number."""
        self.seq_offset = (self.next_seq - in_seq) & 0xFFFF
        self.restart_seq = in_seq
        self.waiting = False


@dataclass(slots=True)
class UpTrack:
    """A published track and the subscribers it is forwarded to."""

    id: str
    publisher: str
    kind: str  # audio | video
    source: str  # camera | microphone | screen
    codec: str  # vp8 | h264 | opus
    request_keyframe: Callable[[], None]
    counters: Counters
    muted: bool = False
    downtracks: dict[str, DownTrack] = field(default_factory=dict)
    cache: PacketCache | None = None
    last_keyframe_request: float = -1e9
    on_level: Callable[[str, int], None] | None = None
    tap: TrackTap | None = None  # set while the track is recorded (sfu/recording)

    def __post_init__(self) -> None:
        if self.kind == "video":
            self.cache = PacketCache(1024)

    def info(self) -> TrackInfo:
        return {
            "id": self.id,
            "participant": self.publisher,
            "kind": self.kind,
            "source": self.source,
            "muted": self.muted,
            "codec": self.codec,
        }

    def is_keyframe(self, payload: bytes) -> bool:
        return vp8_keyframe(payload) if self.codec == "vp8" else h264_keyframe(payload)

    def want_keyframe(self, now: float) -> bool:
        """Ask the publisher for a keyframe, at most once per ``KEYFRAME_INTERVAL_S``."""
        if now - self.last_keyframe_request < KEYFRAME_INTERVAL_S:
            return False
        self.last_keyframe_request = now
        self.counters.keyframe_requests += 1
        self.request_keyframe()
        return True

    def forward(
        self, seq: int, ts: int, marker: bool, payload: bytes, abs_time: int, level: int | None
    ) -> None:
        """Send one incoming packet to every active subscriber (the hot path)."""
        cache = self.cache
        if cache is not None:
            cache.add(seq, ts, marker, payload)
        tap = self.tap
        if tap is not None:
            tap.packets.append((seq, ts, marker, payload, time.time()))
        if level is not None and self.on_level is not None:
            self.on_level(self.publisher, level)
        key: bool | None = None
        mbit = 0x80 if marker else 0
        sent = 0
        shared_key: object = None  # subscribers of a track share a layout: build its bytes once
        shared = b""
        for dt in self.downtracks.values():
            if dt.paused or dt.starved:
                continue
            if dt.waiting:
                if cache is None:
                    dt.restart(seq)
                else:
                    if key is None:
                        key = self.is_keyframe(payload)
                    if not key:
                        continue
                    dt.restart(seq)
            out_seq = (seq + dt.seq_offset) & 0xFFFF
            if dt.next_seq == out_seq or seq_newer(out_seq, dt.next_seq):
                dt.next_seq = (out_seq + 1) & 0xFFFF
            layout = dt.layout
            if layout.key != shared_key:
                shared_key = layout.key
                shared = layout.shared(abs_time, level)
            dt.send(
                build(
                    dt.pt | mbit,
                    out_seq,
                    (ts + dt.ts_offset) & 0xFFFFFFFF,
                    dt.ssrc,
                    layout.head,
                    shared,
                    payload,
                )
            )
            dt.packets += 1
            dt.octets += len(payload)
            sent += 1
        counters = self.counters
        counters.packets_in += 1
        counters.packets_out += sent

    def replay_keyframe(self, dt: DownTrack, abs_time: int) -> bool:
        """Start a waiting video subscriber at once from the newest cached keyframe: its
        packets and those after it are sent now, instead of asking the publisher for a
        keyframe and waiting a round trip and a frame interval for it. Only a recent keyframe
        with no gap after it in the cache qualifies; returns whether the subscriber started."""
        cache = self.cache
        if cache is None or cache.newest < 0 or not dt.waiting or not dt.active:
            return False
        newest = cache.get(cache.newest)
        if newest is None:
            return False
        seq = newest.seq
        for _ in range(REPLAY_MAX_PACKETS):
            c = cache.get(seq)
            if c is None or (newest.ts - c.ts) & 0xFFFFFFFF > REPLAY_MAX_AGE_TS:
                return False  # a gap (the rest could not be decoded), or too old
            if self.is_keyframe(c.payload):
                break
            seq = (seq - 1) & 0xFFFF
        else:
            return False
        dt.restart(seq)
        layout = dt.layout
        shared = layout.shared(abs_time, None)
        sent = 0
        while True:
            c = cache.get(seq)
            assert c is not None  # checked above
            dt.send(
                build(
                    dt.pt | (0x80 if c.marker else 0),
                    (seq + dt.seq_offset) & 0xFFFF,
                    (c.ts + dt.ts_offset) & 0xFFFFFFFF,
                    dt.ssrc,
                    layout.head,
                    shared,
                    c.payload,
                )
            )
            dt.packets += 1
            dt.octets += len(c.payload)
            sent += 1
            if seq == newest.seq:
                break
            seq = (seq + 1) & 0xFFFF
        dt.next_seq = (newest.seq + dt.seq_offset + 1) & 0xFFFF
        self.counters.packets_out += sent
        self.counters.keyframes_replayed += 1
        return True

    def retransmit(self, dt: DownTrack, lost: list[int], abs_time: int, now: float) -> list[int]:
        """Answer a subscriber's NACK from the cache (as RTX where negotiated); returns the
        incoming sequence numbers the cache lacks, to be NACKed upstream.

        A receiver repeats its NACKs until the packet arrives (aiortc NACKs every missing
        packet again at each new gap): each packet is resent at most once per
        ``RESEND_INTERVAL_S``, and at most ``MAX_NACKED`` per NACK, so a NACK storm cannot
        multiply the traffic."""
        cache = self.cache
        if cache is None or dt.restart_seq is None or not dt.active:
            return []
        missing: list[int] = []
        layout = dt.layout
        resent = dt.resent
        for out_seq in lost[-MAX_NACKED:]:
            slot = out_seq & 1023
            if now - resent[slot] < RESEND_INTERVAL_S:
                continue
            resent[slot] = now
            in_seq = (out_seq - dt.seq_offset) & 0xFFFF
            if in_seq != dt.restart_seq and not seq_newer(in_seq, dt.restart_seq):
                continue  # from before the last restart: another mapping
            c = cache.get(in_seq)
            if c is None:
                missing.append(in_seq)
                continue
            ts = (c.ts + dt.ts_offset) & 0xFFFFFFFF
            mbit = 0x80 if c.marker else 0
            if dt.rtx_pt is not None and dt.rtx_ssrc is not None:
                # RFC 4588 section 4: the original sequence number leads the payload.
                data = build(
                    dt.rtx_pt | mbit,
                    dt.rtx_seq,
                    ts,
                    dt.rtx_ssrc,
                    layout.head,
                    layout.shared(abs_time, None),
                    U16.pack(out_seq) + c.payload,
                )
                dt.rtx_seq = (dt.rtx_seq + 1) & 0xFFFF
            else:
                data = build(
                    dt.pt | mbit,
                    out_seq,
                    ts,
                    dt.ssrc,
                    layout.head,
                    layout.shared(abs_time, None),
                    c.payload,
                )
            dt.send(data)
            self.counters.retransmitted += 1
        self.counters.nacks_upstream += len(missing)
        return missing

    def sender_report(self, ntp: int, rtp_ts: int) -> None:
        """Translate the publisher's sender report (RFC 3550 section 6.4.1) to every subscriber's
        timestamps, so receivers keep audio and video in sync (and to a recording's tap)."""
        tap = self.tap
        if tap is not None:
            tap.reports.append((ntp, rtp_ts, time.time()))
        for dt in self.downtracks.values():
            if dt.set_sender_report is not None:
                dt.set_sender_report(
                    ntp, (rtp_ts + dt.ts_offset) & 0xFFFFFFFF, dt.packets, dt.octets
                )
