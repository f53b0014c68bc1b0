"""Per-packet CPU of a publisher receiver in the SFU: the previous receive path vs ours.

Before, ``PublisherHooks._feedback`` kept aiortc's per-packet state as aiortc's handler would:
its remote bitrate estimator (abs-send-time, per packet), a datetime per packet for the active
SSRCs, its statistics, and its NACK generator (RTX unwrapped into a new packet first). Now the
estimate and the NACKs are ``sfu/estimator.py``'s (a few integer operations per packet, the
rest per 250 ms window or per loss) and the active SSRC is noted at most once a second. This
benchmark times both on the same real receiver:

1. A real negotiated aiortc pair on this machine: a publisher sending the pre-encoded VP8 + Opus
   test clip, and an "SFU" peer whose receivers are hooked with ``sfu.rtc.PublisherHooks``
   forwarding into a real ``sfu.forward.UpTrack`` (no subscribers), as ``sfu.room`` does.
2. The decrypted RTP packets reaching the hooked receivers are recorded with their arrival
   times (``--seconds`` of the clip); then the publisher stops sending.
3. Rounds alternate old, new, new, old, ... (``--rounds`` of each; this machine's speed drifts
   within minutes, so both see the same drift). A round feeds fresh copies of the recorded
   packets, ``--passes`` times, straight into the hooked receiver: "new" is
   ``PublisherHooks._handle_rtp`` as it is; "old" is the previous code, kept below: the same
   forwarding, then aiortc's estimator, statistics and NACK generator. Sequence numbers,
   timestamps, abs-send-time and arrival times move on from round to round, so the receiver's
   state (statistics, NACK trackers, bandwidth estimators) sees one continuous stream.

What it does not time: decryption, parsing and the way to the handler (``sfu.rtc.fast_receive``
changed that too), and the forwarding to subscribers (there are none).

    python bench/sfu_receive.py [--seconds 4] [--rounds 6] [--passes 5]

Prints each round, the medians in microseconds per packet, and a final JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiortc import RTCConfiguration, RTCPeerConnection, clock
from aiortc.rtcrtpreceiver import StreamStatistics
from aiortc.rtp import RTCP_PSFB_APP, RtcpPsfbPacket, RtpPacket, pack_remb_fci, unwrap_rtx

from media.clip import ClipSpec, load_clip
from media.tracks import add_clip_tracks
from sfu.forward import Counters, UpTrack
from sfu.rtc import PublisherHooks, negotiated_codec
from sfu.rtp import abs_send_time_now


async def old_handle_rtp(hooks: PublisherHooks, packet: RtpPacket, arrival_time_ms: int) -> None:
    """``PublisherHooks._handle_rtp`` before this change: forward, then aiortc's bandwidth
    estimator, a datetime per packet for the active SSRCs, aiortc's statistics, RTX unwrapped
    into a new packet for aiortc's NACK generator (whose ``add`` walks its missing set)."""
    pt = packet.payload_type
    payload = packet.payload
    seq = packet.sequence_number
    if pt in hooks._rtx:
        if len(payload) < 2:
            hooks.on_malformed()
            return
        seq = (payload[0] << 8) | payload[1]
        payload = payload[2:]
    else:
        hooks.media_ssrc = packet.ssrc
    level = packet.extensions.audio_level
    try:
        hooks.on_rtp(
            seq,
            packet.timestamp,
            bool(packet.marker),
            payload,
            abs_send_time_now(),
            level[1] if level is not None else None,
        )
    except Exception:
        hooks.on_malformed()
    receiver: Any = hooks.receiver
    if not receiver._enabled:
        return
    estimator = receiver._RTCRtpReceiver__remote_bitrate_estimator
    if estimator is not None and packet.extensions.abs_send_time is not None:
        remb = estimator.add(
            abs_send_time=packet.extensions.abs_send_time,
            arrival_time_ms=arrival_time_ms,
            payload_size=len(packet.payload) + packet.padding_size,
            ssrc=packet.ssrc,
        )
        rtcp_ssrc = receiver._RTCRtpReceiver__rtcp_ssrc
        if rtcp_ssrc is not None and remb is not None:
            await hooks._send_rtcp(
                RtcpPsfbPacket(
                    fmt=RTCP_PSFB_APP, ssrc=rtcp_ssrc, media_ssrc=0, fci=pack_remb_fci(*remb)
                )
            )
    ssrc = packet.ssrc
    receiver._RTCRtpReceiver__active_ssrc[ssrc] = clock.current_datetime()
    codecs = receiver._RTCRtpReceiver__codecs
    codec = codecs.get(pt)
    if codec is None:
        return
    streams = receiver._RTCRtpReceiver__remote_streams
    stats = streams.get(ssrc)
    if stats is None:
        stats = streams[ssrc] = StreamStatistics(codec.clockRate)
    stats.add(packet)
    nacks = receiver._RTCRtpReceiver__nack_generator
    if nacks is None:
        return
    if pt in hooks._rtx_pts:
        original_ssrc = receiver._RTCRtpReceiver__rtx_ssrc.get(ssrc)
        apt = hooks._rtx.get(pt)
        if original_ssrc is None or apt not in codecs or len(packet.payload) < 2:
            return
        packet = unwrap_rtx(packet, payload_type=apt, ssrc=original_ssrc)
    if nacks.add(packet):
        await receiver._send_rtcp_nack(packet.ssrc, sorted(nacks.missing))


class Recording:
    """The packets one receiver got, with arrival times, and how to replay them later on."""

    def __init__(self) -> None:
        self.packets: list[tuple[RtpPacket, int]] = []
        self.started = asyncio.Event()

    def freeze(self) -> None:
        ps = [p for p, _ in self.packets]
        self.seq_span = (ps[-1].sequence_number - ps[0].sequence_number + 1) & 0xFFFF
        last_step = (ps[-1].timestamp - ps[-2].timestamp) & 0xFFFFFFFF if len(ps) > 1 else 0
        self.ts_span = ((ps[-1].timestamp - ps[0].timestamp) + max(last_step, 1)) & 0xFFFFFFFF
        self.ms_span = self.packets[-1][1] - self.packets[0][1] + 20

    def replay(self, k: int) -> list[tuple[RtpPacket, int]]:
        """Fresh copies, moved on by ``k`` recordings' worth of numbers and time."""
        out = []
        abs_shift = (k * self.ms_span << 18) // 1000
        for p, arrival in self.packets:
            q = copy.copy(p)
            q.extensions = copy.copy(p.extensions)
            q.sequence_number = (p.sequence_number + k * self.seq_span) & 0xFFFF
            q.timestamp = (p.timestamp + k * self.ts_span) & 0xFFFFFFFF
            if q.extensions.abs_send_time is not None:
                q.extensions.abs_send_time = (q.extensions.abs_send_time + abs_shift) & 0xFFFFFF
            out.append((q, arrival + k * self.ms_span))
        return out


async def record(seconds: float) -> tuple[list[Any], dict[str, tuple[PublisherHooks, Recording]]]:
    cfg = RTCConfiguration(iceServers=[])
    publisher, sfu = RTCPeerConnection(cfg), RTCPeerConnection(cfg)
    video, audio = add_clip_tracks(publisher, load_clip(ClipSpec(publisher_id=1, seconds=4.0)))
    await publisher.setLocalDescription(await publisher.createOffer())
    await sfu.setRemoteDescription(publisher.localDescription)
    await sfu.setLocalDescription(await sfu.createAnswer())
    hooked: dict[str, tuple[PublisherHooks, Recording]] = {}
    for tr in sfu.getTransceivers():
        codec, _, _ = negotiated_codec(tr)
        up = UpTrack(f"t-{tr.kind}", "p", tr.kind, "camera", codec, lambda: None, Counters())
        hooks = PublisherHooks(tr.receiver, up.forward, lambda ntp, ts: None, lambda: None)
        rec = Recording()
        hooked[tr.kind] = (hooks, rec)

        def recording(hooks: PublisherHooks, rec: Recording) -> Any:
            """Records, then hands on to the hooks (``sfu.rtc.fast_receive`` calls it)."""

            def receive(packet: RtpPacket, arrival_time_ms: int) -> None:
                if packet.payload_type not in hooks._rtx_pts:
                    rec.packets.append((copy.copy(packet), arrival_time_ms))
                    rec.started.set()
                hooks.receive(packet, arrival_time_ms)

            return receive

        tr.receiver.rallypoint_receive = recording(hooks, rec)  # type: ignore[attr-defined]
    await publisher.setRemoteDescription(sfu.localDescription)
    await asyncio.wait_for(hooked["video"][1].started.wait(), 30)
    await asyncio.sleep(seconds)  # the length of the recording, not a barrier
    video.stop()
    audio.stop()
    for kind, (hooks, rec) in hooked.items():
        hooks.receiver.rallypoint_receive = hooks.receive  # type: ignore[attr-defined]
        rec.freeze()
        print(f"recorded {len(rec.packets)} {kind} packets", flush=True)
    return [publisher, sfu], hooked


async def run_round(
    hooks: PublisherHooks, rec: Recording, old: bool, k0: int, passes: int
) -> tuple[float, int]:
    batches = [rec.replay(k0 + i) for i in range(passes)]
    n = sum(len(b) for b in batches)
    gc.collect()
    start = time.perf_counter_ns()
    if old:
        for batch in batches:
            for packet, arrival in batch:
                await old_handle_rtp(hooks, packet, arrival)
    else:
        handle = hooks._handle_rtp
        for batch in batches:
            for packet, arrival in batch:
                await handle(packet, arrival)
    elapsed = time.perf_counter_ns() - start
    return elapsed / n / 1000, n


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=4.0, help="length of the recording")
    ap.add_argument("--rounds", type=int, default=6, help="rounds of each, old and new")
    ap.add_argument("--passes", type=int, default=5, help="replays of the recording per round")
    a = ap.parse_args()
    pcs, hooked = await record(a.seconds)
    results: dict[str, dict[str, list[float]]] = {}
    k = 1
    try:
        for kind, (hooks, rec) in hooked.items():
            res = results[kind] = {"old": [], "new": []}
            order = [(i % 4) in (0, 3) for i in range(2 * a.rounds)]  # old, new, new, old, ...
            for old in order:
                us, n = await run_round(hooks, rec, old, k, a.passes)
                k += a.passes
                res["old" if old else "new"].append(us)
                print(f"{kind:5} {'old' if old else 'new'}: {us:7.2f} us/packet ({n} packets)")
    finally:
        for pc in pcs:
            await pc.close()
    summary: dict[str, Any] = {"rounds": a.rounds, "passes": a.passes}
    for kind, res in results.items():
        old_us, new_us = statistics.median(res["old"]), statistics.median(res["new"])
        print(
            f"{kind}: old {old_us:.2f} us/packet, new {new_us:.2f} us/packet "
            f"(median of {a.rounds} rounds each), saved {old_us - new_us:.2f} us "
            f"({(old_us - new_us) / old_us:.0%})"
        )
        summary[kind] = {
            "old_us_per_packet": round(old_us, 3),
            "new_us_per_packet": round(new_us, 3),
            "old_rounds": [round(x, 3) for x in res["old"]],
            "new_rounds": [round(x, 3) for x in res["new"]],
            "packets_recorded": len(hooked[kind][1].packets),
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    asyncio.run(main())
