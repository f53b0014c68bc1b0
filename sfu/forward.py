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
from .h264 import payload_size as h264_payload_size
from .layers import ANY_SIZE, RateController
from .munger import LayerMunger
from .packetcache import PacketCache
from .recording.tap import TrackTap
from .rtp import U16, ExtensionLayout, build, h264_keyframe, seq_newer, vp8_keyframe
from .vp8 import VP8Descriptor, VP8Error
from .vp8 import keyframe_size as vp8_keyframe_size
from .vp8 import parse as parse_vp8

# Sends one RTP packet given as its parts: (marker | payload type, sequence number, timestamp,
# SSRC, extension head, body); the body is the shared extension bytes and the payload, joined
# once per incoming packet for all the subscribers of a layout (``build(..., head, body, b"")``).
SendRtp = Callable[[int, int, int, int, bytes, bytes], None]

KEYFRAME_INTERVAL_S = 0.5  # at most one keyframe request upstream per track in this time
RESEND_INTERVAL_S = 0.1  # a packet is retransmitted to a subscriber at most once in this time
MEASURE_WINDOW_S = 1.0  # simulcast layers' rates are measured over windows this long
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
    dropped_send: int = 0  # packets a subscriber's socket could not take (full send buffer)
    subscribe_offers: int = 0  # subscriber offers made (each counted once, when it goes out)
    render_reports: int = 0  # track_render messages applied


class DownTrack:
    """One subscriber's copy of one published track."""

    __slots__ = (
        "asked_pause",
        "kind",
        "layout",
        "loss",
        "munger",
        "next_seq",
        "octets",
        "packets",
        "paused",
        "pt",
        "rate",
        "remb_low_since",
        "render",
        "resent",
        "restart_seq",
        "rtx_pt",
        "rtx_seq",
        "rtx_ssrc",
        "send",
        "send_rtp",
        "sent",
        "sent_bps",
        "sent_octets",
        "seq_offset",
        "set_sender_report",
        "ssrc",
        "starved",
        "subscriber",
        "switched_up_at",
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
        send_rtp: SendRtp | None = None,
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
        # The forwarding path's send: the packet as its parts (``SendRtp``), so a sender can
        # write them straight into its SRTP buffer (``sfu.rtc.FastSender``).
        self.send_rtp: SendRtp = send_rtp or (
            lambda pt_byte, seq, ts, ssrc, head, body: send(
                build(pt_byte, seq, ts, ssrc, head, body, b"")
            )
        )
        self.set_sender_report = set_sender_report
        self.next_seq = r.randrange(1 << 16)
        self.rtx_seq = r.randrange(1 << 16)
        self.ts_offset = r.randrange(1 << 32)
        self.seq_offset = 0
        self.restart_seq: int | None = None
        self.waiting = True  # until the first packet (audio) or keyframe (video)
        self.paused = False  # not forwarded: asked (track_pause) or not shown (render 0 x 0)
        self.asked_pause = False  # track_pause
        self.render: tuple[int, int] = ANY_SIZE  # the box it is shown in (track_render)
        self.starved = False  # its bandwidth is too low for this video
        self.packets = 0
        self.octets = 0
        # When each outgoing sequence number was last retransmitted (by seq & 1023).
        self.resent: list[float] = [-1.0] * 1024
        # Simulcast (set by UpTrack.add_downtrack for a track with layers): the layer switcher,
        # the subscriber's rate controller, and what was sent, by outgoing seq & 1023, for
        # NACKs: (out seq, out timestamp, marker, payload as sent).
        self.munger: LayerMunger | None = None
        self.rate: RateController | None = None
        self.sent: list[tuple[int, int, bool, bytes] | None] = []
        self.sent_octets = 0  # at the last rate measurement
        self.sent_bps = 0
        self.loss = 0  # fraction lost (0-255) in the subscriber's last receiver report
        self.switched_up_at = -1e9  # when it was last given a higher layer
        self.remb_low_since: float | None = None  # REMBs below what it is sent, since

    @property
    def active(self) -> bool:
        return not (self.paused or self.starved)

    @property
    def hidden(self) -> bool:
        """The subscriber shows this video nowhere (it reported a 0 x 0 box)."""
        return self.kind == "video" and (self.render[0] <= 0 or self.render[1] <= 0)

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
    # Simulcast: the number of layers (1: none; then forward() is the path), the request for a
    # keyframe of one layer, each layer's octets received, measured rate and last rate seen
    # while it was being sent, its picture size (from its last keyframe: (0, 0) until one is
    # seen) and the switcher that feeds a recording's tap the highest layer.
    layers: int = 1
    request_layer_keyframe: Callable[[int], None] | None = None
    layer_octets: list[int] = field(default_factory=list)
    layer_bps: list[int] = field(default_factory=list)
    layer_known_bps: list[int] = field(default_factory=list)
    layer_keyframe_at: list[float] = field(default_factory=list)
    layer_sizes: list[tuple[int, int]] = field(default_factory=list)
    # Which packets may carry a picture size (the first byte under ``size_mask`` is one of
    # ``size_first``: a VP8 frame's first packet, an H.264 SPS or STAP-A), and its reader.
    size_mask: int = 0
    size_first: tuple[int, ...] = ()
    size_of: Callable[[bytes], tuple[int, int] | None] = vp8_keyframe_size
    tap_munger: LayerMunger | None = None
    measured_for: float = 0.0  # seconds since the layers' rates were last computed

    def __post_init__(self) -> None:
        if self.kind == "video" and self.layers == 1:
            self.cache = PacketCache(1024)
        n = self.layers
        self.layer_octets = [0] * n
        self.layer_bps = [0] * n
        self.layer_known_bps = [0] * n
        self.layer_keyframe_at = [-1e9] * n
        self.layer_sizes = [(0, 0)] * n
        if self.codec == "vp8":
            self.size_mask, self.size_first, self.size_of = 0x17, (0x10,), vp8_keyframe_size
        else:
            self.size_mask, self.size_first, self.size_of = 0x1F, (7, 24), h264_payload_size

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

    @property
    def simulcast(self) -> bool:
        return self.layers > 1

    def make_simulcast(self, dt: DownTrack) -> None:
        """Give a subscriber's copy of a simulcast track its switcher and rate controller."""
        dt.munger = LayerMunger(self.codec, self.layers)
        # Start high: the subscriber's REMB bounds the budget until loss says otherwise.
        dt.rate = RateController(start_bps=2_000_000)
        dt.sent = [None] * 1024
        dt.waiting = False

    def want_layer_keyframe(self, layer: int, now: float) -> bool:
        """Ask the publisher for a keyframe of one layer, at most once per
        ``KEYFRAME_INTERVAL_S`` per layer."""
        if now - self.layer_keyframe_at[layer] < KEYFRAME_INTERVAL_S:
            return False
        self.layer_keyframe_at[layer] = now
        self.counters.keyframe_requests += 1
        if self.request_layer_keyframe is not None:
            self.request_layer_keyframe(layer)
        return True

    def measure(self, elapsed: float) -> None:
        """Each layer's rate, over windows of at least ``MEASURE_WINDOW_S`` (called from the
        room's tick with the time since the last call). A layer with no packet in a window is
        not being sent (rate 0); a layer's rate swings with its keyframes, so it is smoothed."""
        self.measured_for += elapsed
        window = self.measured_for
        if window < MEASURE_WINDOW_S:
            return
        self.measured_for = 0.0
        for i, octets in enumerate(self.layer_octets):
            bps = int(octets * 8 / window)
            self.layer_octets[i] = 0
            old = self.layer_bps[i]
            bps = bps if old == 0 or bps == 0 else (old + bps) // 2
            self.layer_bps[i] = bps
            if bps > 0:
                self.layer_known_bps[i] = bps
        for dt in self.downtracks.values():
            dt.sent_bps = int((dt.octets - dt.sent_octets) * 8 / window)
            dt.sent_octets = dt.octets

    def forward_layer(
        self, layer: int, seq: int, ts: int, marker: bool, payload: bytes, abs_time: int
    ) -> None:
        """Send one incoming packet of a simulcast layer to the subscribers on that layer."""
        self.layer_octets[layer] += len(payload)
        if payload and (payload[0] & self.size_mask) in self.size_first:
            size = self.size_of(payload)  # a keyframe's picture size: the layer's size
            if size is not None:
                self.layer_sizes[layer] = size
        tap = self.tap
        if tap is not None:
            m = self.tap_munger
            if m is not None:
                r = m.packet(layer, seq, ts, payload)
                if r is not None:
                    tap.packets.append((r[0], r[1], marker, r[2], time.time()))
        mbit = 0x80 if marker else 0
        sent = 0
        # Per layout: the shared extension bytes, and those joined to the payload unchanged
        # (the subscribers whose picture ids need no rewriting share that body).
        shared_key = -1
        shared = b""
        body_key = -1
        body = b""
        vp8 = self.codec == "vp8"
        desc: VP8Descriptor | None = None  # parsed once, when a subscriber first needs it
        for dt in self.downtracks.values():
            m = dt.munger
            if m is None or m.target is None or dt.paused:
                continue
            if layer != m.current and layer != m.target:
                continue  # (what m.packet would say first)
            if vp8 and desc is None:
                try:
                    desc = parse_vp8(payload)
                except VP8Error:
                    break  # a cut descriptor: every switcher would drop it
            r = m.packet(layer, seq, ts, payload, desc)
            if r is None:
                continue
            out_seq, out_ts, out_payload = r
            layout = dt.layout
            key = layout.key
            if key != shared_key:
                shared_key = key
                shared = layout.shared(abs_time, None)
            if out_payload is payload:
                if key != body_key:  # (a body is joined with its own key's shared bytes)
                    body_key = key
                    body = shared + payload
                out = body
            else:
                out = shared + out_payload
            dt.send_rtp(dt.pt | mbit, out_seq, out_ts, dt.ssrc, layout.head, out)
            dt.sent[out_seq & 1023] = (out_seq, out_ts, marker, out_payload)
            dt.packets += 1
            dt.octets += len(out_payload)
            sent += 1
        counters = self.counters
        counters.packets_in += 1
        counters.packets_out += sent

    def layer_sender_report(self, layer: int, ntp: int, rtp_ts: int) -> None:
        """A layer's sender report: each subscriber on that layer gets it in its timestamps,
        and every switcher keeps it for its next switch."""
        tap = self.tap
        m = self.tap_munger
        if tap is not None and m is not None:
            out = m.sender_report(layer, ntp, rtp_ts)
            if out is not None:
                tap.reports.append((ntp, out, time.time()))
        for dt in self.downtracks.values():
            m = dt.munger
            if m is None:
                continue
            out = m.sender_report(layer, ntp, rtp_ts)
            if out is not None and dt.set_sender_report is not None:
                dt.set_sender_report(ntp, out, dt.packets, dt.octets)

    def _resend(
        self, dt: DownTrack, out_seq: int, ts: int, marker: bool, payload: bytes, abs_time: int
    ) -> None:
        """Send ``dt`` its packet ``out_seq`` again (``ts`` in its timestamps): as RTX where
        negotiated (RFC 4588 section 4: the original sequence number leads the payload)."""
        layout = dt.layout
        mbit = 0x80 if marker else 0
        if dt.rtx_pt is not None and dt.rtx_ssrc is not None:
            data = build(
                dt.rtx_pt | mbit,
                dt.rtx_seq,
                ts,
                dt.rtx_ssrc,
                layout.head,
                layout.shared(abs_time, None),
                U16.pack(out_seq) + payload,
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
                payload,
            )
        dt.send(data)
        self.counters.retransmitted += 1

    def retransmit_sent(self, dt: DownTrack, lost: list[int], abs_time: int, now: float) -> None:
        """Answer a simulcast subscriber's NACK from what was sent to it (the layers'
        sequence numbers map to its own differently at each switch)."""
        sent = dt.sent
        resent = dt.resent
        for out_seq in lost[-MAX_NACKED:]:
            slot = out_seq & 1023
            c = sent[slot] if sent else None
            if c is None or c[0] != out_seq or now - resent[slot] < RESEND_INTERVAL_S:
                continue
            resent[slot] = now
            _, ts, marker, payload = c
            self._resend(dt, out_seq, ts, marker, payload, abs_time)

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
        octets = len(payload)
        # Subscribers of a track share a layout: its bytes and the body are built once.
        shared_key = -1
        body = b""
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
            if (out_seq - dt.next_seq) & 0xFFFF < 0x8000:  # the same or newer (seq_newer)
                dt.next_seq = (out_seq + 1) & 0xFFFF
            layout = dt.layout
            if layout.key != shared_key:
                shared_key = layout.key
                body = layout.shared(abs_time, level) + payload
            dt.send_rtp(
                dt.pt | mbit,
                out_seq,
                (ts + dt.ts_offset) & 0xFFFFFFFF,
                dt.ssrc,
                layout.head,
                body,
            )
            dt.packets += 1
            dt.octets += octets
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
            self._resend(dt, out_seq, ts, c.marker, c.payload, abs_time)
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
