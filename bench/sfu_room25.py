"""The 25-participant room of ``bench/sfu.py`` (``--room25``): light simulcast publishers and
light subscribers that are still real WebRTC peers for the server.

**Publishers** (``SimulcastPublisher``): an aiortc peer connection per participant (ICE, DTLS,
SRTP as usual) whose offer is rewritten as Chromium's simulcast offer (``a=rid:q/h/f send``,
``a=simulcast:send q;h;f``, the RID header extension, no video SSRCs), so the SFU takes its
simulcast path (``SimulcastHooks``, ``UpTrack.forward_layer``, a ``LayerMunger`` per
subscriber). aiortc cannot send simulcast, so the three layers are sent by this module: the
pre-encoded test clip at 320x240, 640x480 and 960x720 (about 150, 500 and 1,000 kbps, a
keyframe every second; each layer's VP8 payloads packetized once for all publishers), each
layer its own SSRC and sequence numbers, with the MID, RID and abs-send-time extensions, SRTP
protected and sent on the nominated ICE pair (``sfu.rtc.FastSender``). Audio is aiortc's own
sender of the clip's Opus.

**Subscribers** (``LightSubscriber``): ``media.session.SfuSession`` answers the server's
offers (aiortc does ICE, DTLS and SRTCP); RTP is counted from the plain header bytes at the
ICE socket, **without decrypting** (an SRTP packet's header is in the clear), per SSRC
(packets, bytes, highest sequence number; loss is counted from sequence-number gaps: the SFU
sends every subscriber gap-free numbers across layer switches and pauses). RTCP goes on to
aiortc (the server's sender reports). The subscriber sends RTCP feedback of its own every
second, SRTCP protected: a receiver report for every SSRC it gets (fraction and packets lost
from its counts) and, for each video it shows, a REMB of ``TILE_BPS``.

**Answers**: aiortc writes three certificate fingerprints, ``msid`` and ``ssrc`` lines in
every section; its answer for the 48 sections of this room is longer than the protocol's
60,000 characters for ``sdp``. ``SfuSession`` sends it compacted
(``signaling.sdk.sdp.compact_answer``: the SHA-256 fingerprint alone, no ``msid``/``ssrc`` in
receive-only sections), ~32,000 characters.

**Consent**: the load generator's own peers do not run ICE consent checks (``no_consent``).
The server's connections check consent on every one of them as usual (RFC 7675, aioice: one
try of 0.5 s every ~5 s, the connection closed after six in a row unanswered), and a
publisher connection closed so loses its tracks for the rest of the run
(``room25_tracks_gone``). So the participants run in several load-generator processes
(``bench/sfu_room25_procs.py``, ``--room25-procs``, 5 of 5 by default): one process with all
50 peer connections lagged more than 0.5 s for ~30 s while 25 peers renegotiated, and left
the server's checks unanswered. The set-up
also spares the server what a real room would not ask of it: each subscriber reports its
tiles at every step, as the page does when a track arrives (else the server forwards every
video to everyone until the set-up ends), and the next participant publishes only once every
child's event loop and the server's sockets have been calm for 6 s (``CALM_S``, more than a
consent interval). A server short of CPU still closes its own connections: an answer it reads
late, or drops on a full socket, counts as none (the worker logs each one at warning:
``ICE consent expired``; docs/BENCHMARKS.md).

**What each one shows**: participant ``i`` shows the videos of the next ``SHOWN`` (9)
participants in a 3x3 grid of a 1280x720 window and hides the other 15, as the bundled page
does: one ``track_render`` per subscriber, ``TILE`` (426x240) for the shown videos and 0 x 0
for the others, so the SFU forwards the smallest layer that fills a tile (640x480) and none
of the hidden ones. Everyone's audio is received.
"""

from __future__ import annotations

import asyncio
import re
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import aioice.ice
from aiortc import (
    RTCPeerConnection,
    RTCRtpHeaderExtensionParameters,
    RTCRtpParameters,
    RTCSessionDescription,
)
from aiortc.codecs.vpx import Vp8Encoder
from aiortc.rtp import (
    RTCP_PSFB_APP,
    HeaderExtensionsMap,
    RtcpPsfbPacket,
    RtcpReceiverInfo,
    RtcpRrPacket,
    RtpPacket,
    pack_remb_fci,
)
from sfu_load import RtpCount, Subscriber, peer_connection, vp8_only

from media.clip import ClipSpec, load_clip
from media.session import SfuSession
from media.tracks import EncodedAudioTrack
from sfu.rtc import FastSender
from sfu.rtp import abs_send_time_now
from sfu.simulcast import URI_RID
from signaling.sdk.wsclient import Client, ClientError

ROOM25_SIZE = 25
SHOWN = 9
TILE = (426, 240)  # a tile of a 3x3 grid in a 1280x720 window (device pixels)
NONE = {"width": 0, "height": 0}  # not shown
TILE_BPS = 600_000  # what a tile of a 3x3 grid takes (the middle layer, with room to spare)
FPS = 30
KEYFRAME_EVERY = FPS  # frames
CLIP_SECONDS = 4.0
# the test pattern's smallest size is 320x240
LAYERS = (("q", 320, 240, 150_000), ("h", 640, 480, 500_000), ("f", 960, 720, 1_000_000))
URI_MID = "urn:ietf:params:rtp-hdrext:sdes:mid"
URI_ABS = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
FEEDBACK_S = 1.0
SETTLE_S = 20.0
TRACKS_WAIT_S = 90.0


@dataclass
class Layer:
    """One pre-packetized layer: per frame, its VP8 RTP payloads."""

    rid: str
    frames: list[list[bytes]]


def make_layers() -> list[Layer]:
    out = []
    for rid, w, h, bps in LAYERS:
        clip = load_clip(
            ClipSpec(publisher_id=7, seconds=CLIP_SECONDS, width=w, height=h, video_bitrate=bps)
        )
        frames = []
        for i, (normal, intra) in enumerate(zip(clip.video, clip.video_intra, strict=True)):
            p = intra if i % KEYFRAME_EVERY == 0 else normal
            frames.append(Vp8Encoder._packetize(p.data, i & 0x7FFF))
        out.append(Layer(rid, frames))
    return out


def _sections(sdp: str) -> list[list[str]]:
    head: list[str] = []
    out: list[list[str]] = [head]
    for line in sdp.splitlines():
        if line.startswith("m="):
            out.append([line])
        else:
            out[-1].append(line)
    return out


def simulcast_offer(sdp: str, rids: list[str], rid_ext: int) -> str:
    """aiortc's offer with its video section turned into Chromium's simulcast offer."""
    out: list[str] = []
    for sec in _sections(sdp):
        if sec and sec[0].startswith("m=video"):
            sec = [ln for ln in sec if not ln.startswith(("a=ssrc", "a=ssrc-group"))]
            sec.append(f"a=extmap:{rid_ext} {URI_RID}")
            sec += [f"a=rid:{r} send" for r in rids]
            sec.append(f"a=simulcast:send {';'.join(rids)}")
        out += sec
    return "\r\n".join(out) + "\r\n"


def section_info(sdp: str, kind: str) -> tuple[str, dict[str, int], int | None]:
    """(mid, extension ids by URI, VP8 or Opus payload type) of the first ``kind`` section."""
    for sec in _sections(sdp):
        if sec and sec[0].startswith(f"m={kind}"):
            mid = next(ln[6:] for ln in sec if ln.startswith("a=mid:"))
            exts = {}
            pt = None
            for ln in sec:
                m = re.match(r"a=extmap:(\d+)(?:/\w+)? (\S+)", ln)
                if m:
                    exts[m.group(2)] = int(m.group(1))
                m = re.match(r"a=rtpmap:(\d+) (\w+)/", ln)
                if m and pt is None and m.group(2).lower() in ("vp8", "opus"):
                    pt = int(m.group(1))
            return mid, exts, pt
    raise ValueError(f"no {kind} section")


class SimulcastPublisher:
    """One participant's three video layers and audio (see the module's docstring)."""

    def __init__(self, index: int, layers: list[Layer]) -> None:
        self.index = index
        self.layers = layers
        self.clip = load_clip(ClipSpec(publisher_id=7, seconds=CLIP_SECONDS))
        self.audio = EncodedAudioTrack(self.clip)
        self.pc: RTCPeerConnection = peer_connection()
        self.video_sent = 0
        self.ssrcs = [0x10000000 + index * 16 + k for k in range(len(layers))]
        self._task: asyncio.Task[None] | None = None
        self._audio_sender: Any = None
        self.connected = asyncio.Event()

        @self.pc.on("connectionstatechange")
        def _state() -> None:
            if self.pc.connectionState == "connected":
                self.connected.set()

    async def publish(self, client: Client, room: str) -> None:
        pc = self.pc
        video = pc.addTransceiver("video", direction="sendonly")
        video.setCodecPreferences(vp8_only("video"))
        audio = pc.addTransceiver(self.audio, direction="sendonly")
        audio.setCodecPreferences(vp8_only("audio"))
        self._audio_sender = audio.sender
        await pc.setLocalDescription(await pc.createOffer())
        assert pc.localDescription is not None
        sdp = pc.localDescription.sdp
        mid, exts, pt = section_info(sdp, "video")
        rid_ext = next(i for i in range(1, 15) if i not in exts.values())
        offer = simulcast_offer(sdp, [la.rid for la in self.layers], rid_ext)
        answer = await client.request(
            {
                "type": "publish",
                "room": room,
                "sdp": offer,
                "tracks": [
                    {"mid": mid, "source": "camera"},
                    {"mid": audio.mid, "source": "microphone"},
                ],
            },
            timeout=60,
        )
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        assert pt is not None
        ext_map = HeaderExtensionsMap()
        ext_map.configure(
            RTCRtpParameters(
                headerExtensions=[
                    RTCRtpHeaderExtensionParameters(id=exts[URI_MID], uri=URI_MID),
                    RTCRtpHeaderExtensionParameters(id=exts[URI_ABS], uri=URI_ABS),
                    RTCRtpHeaderExtensionParameters(id=rid_ext, uri=URI_RID),
                ]
            )
        )
        self._task = asyncio.create_task(self._send(video.sender.transport, mid, pt, ext_map))

    async def _send(self, dtls: Any, mid: str, pt: int, ext_map: HeaderExtensionsMap) -> None:
        await asyncio.wait_for(self.connected.wait(), 120)
        sender = FastSender(dtls)
        seqs = [0] * len(self.layers)
        start = time.monotonic()
        frame = 0
        while True:
            i = frame % len(self.layers[0].frames)
            ts = (frame * 90_000 // FPS) & 0xFFFFFFFF
            ast = abs_send_time_now()
            for k, layer in enumerate(self.layers):
                payloads = layer.frames[i]
                last = len(payloads) - 1
                for j, payload in enumerate(payloads):
                    p = RtpPacket(
                        payload_type=pt,
                        marker=int(j == last),
                        sequence_number=seqs[k],
                        timestamp=ts,
                        ssrc=self.ssrcs[k],
                        payload=payload,
                    )
                    p.extensions.mid = mid
                    p.extensions.rtp_stream_id = layer.rid
                    p.extensions.abs_send_time = ast
                    sender.send(p.serialize(ext_map))
                    seqs[k] = (seqs[k] + 1) & 0xFFFF
                    self.video_sent += 1
            frame += 1
            delay = start + frame / FPS - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    async def sent(self) -> int:
        total = self.video_sent
        for stats in (await self._audio_sender.getStats()).values():
            if getattr(stats, "type", "") == "outbound-rtp":
                total += stats.packetsSent
        return int(total)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.pc.close()


_RTP = struct.Struct("!BBHII")


@dataclass
class LightSubscriber:
    """One participant's receive side (see the module's docstring)."""

    index: int
    pid: str  # its participant id
    session: SfuSession
    sub: Subscriber
    shown: set[str] = field(default_factory=set)  # participant ids whose video it shows
    _wrapped: set[int] = field(default_factory=set)
    _pts: dict[int, str] = field(default_factory=dict)  # payload type -> kind
    _prior: dict[int, tuple[int, int]] = field(default_factory=dict)  # at the last report
    _first: dict[int, int] = field(default_factory=dict)

    def install(self) -> None:
        """Count RTP at the subscriber connection's ICE sockets (again after renegotiation)."""
        pc = self.session.sub
        if pc is None:
            return
        for tr in pc.getTransceivers():
            conn = tr.receiver.transport.transport._connection
            for proto in conn._protocols:
                if id(proto) not in self._wrapped:
                    self._wrapped.add(id(proto))
                    self._wrap(proto)
        if pc.remoteDescription is not None:
            for sec in _sections(pc.remoteDescription.sdp)[1:]:
                kind = sec[0][2:7]
                for ln in sec:
                    m = re.match(r"a=rtpmap:(\d+) (\w+)/", ln)
                    if m and m.group(2).lower() in ("vp8", "opus"):
                        self._pts[int(m.group(1))] = kind

    def _wrap(self, proto: Any) -> None:
        orig = proto.datagram_received
        counts = self.sub.counts
        pts = self._pts
        first = self._first
        unpack = _RTP.unpack_from

        def datagram_received(data: bytes, addr: Any) -> None:
            if len(data) >= 12 and 128 <= data[0] < 192 and not 192 <= data[1] <= 223:
                _, b1, seq, _, ssrc = unpack(data)
                c = counts.get(ssrc)
                if c is None:
                    kind = pts.get(b1 & 0x7F)
                    if kind is None:
                        return  # RTX or unknown
                    c = counts[ssrc] = RtpCount(kind)
                    first[ssrc] = seq
                c.add(seq, len(data) - 10, b1 >> 7)  # minus the SRTP tag, plus the header
                return
            orig(data, addr)

        proto.datagram_received = datagram_received

    def video_ssrcs(self) -> list[int]:
        """The SFU's SSRCs of the videos this subscriber shows (from its last offer)."""
        pc = self.session.sub
        if pc is None or pc.remoteDescription is None:
            return []
        by_mid: dict[str, int] = {}
        for sec in _sections(pc.remoteDescription.sdp)[1:]:
            mid = next((ln[6:] for ln in sec if ln.startswith("a=mid:")), None)
            ssrc = next((int(ln[7:].split()[0]) for ln in sec if ln.startswith("a=ssrc:")), None)
            if mid is not None and ssrc is not None:
                by_mid[mid] = ssrc
        out = []
        for t in self.session.tracks.values():
            if t["kind"] == "video" and t["participant"] in self.shown and t["mid"] in by_mid:
                out.append(by_mid[t["mid"]])
        return out

    async def feedback(self) -> None:
        """Receiver reports and the tiles' REMB, every ``FEEDBACK_S``."""
        own = 0x30000000 + self.index
        while True:
            await asyncio.sleep(FEEDBACK_S)
            pc = self.session.sub
            if pc is None or not pc.getTransceivers():
                continue
            dtls = pc.getTransceivers()[0].receiver.transport
            reports = []
            for ssrc, c in list(self.sub.counts.items())[:31]:
                expected = c.highest - self._first[ssrc] + 1
                e0, r0 = self._prior.get(ssrc, (0, 0))
                self._prior[ssrc] = (expected, c.packets)
                de, dr = expected - e0, c.packets - r0
                fraction = ((de - dr) << 8) // de if de > 0 and de > dr else 0
                reports.append(
                    RtcpReceiverInfo(
                        ssrc=ssrc,
                        fraction_lost=min(fraction, 255),
                        packets_lost=max(0, expected - c.packets),
                        highest_sequence=c.highest & 0xFFFFFFFF,
                        jitter=0,
                        lsr=0,
                        dlsr=0,
                    )
                )
            # one compound packet: the receiver report, then a REMB per video shown (the SFU
            # takes a REMB's bitrate for each SSRC it names)
            compound = bytes(RtcpRrPacket(ssrc=own, reports=reports))
            for ssrc in self.video_ssrcs():
                compound += bytes(
                    RtcpPsfbPacket(
                        fmt=RTCP_PSFB_APP,
                        ssrc=own,
                        media_ssrc=0,
                        fci=pack_remb_fci(TILE_BPS, [ssrc]),
                    )
                )
            try:
                await dtls._send_rtp(compound)
            except ConnectionError:
                continue


def no_consent() -> None:
    """Turn off aioice's consent checks in this (load generator) process."""

    async def query_consent(self: aioice.ice.Connection) -> None:
        return None

    connection: Any = aioice.ice.Connection
    connection.query_consent = query_consent


async def join(url: str, room: str, index: int) -> tuple[Client, LightSubscriber]:
    name = f"participant-{index}"
    c = Client(url)
    await c.connect(name=name, identity=name, heartbeat=True)  # set-up takes minutes
    joined = await c.request({"type": "join", "room": room}, timeout=60)
    session = SfuSession(c, room, decode=False)
    return c, LightSubscriber(index, joined["self"]["id"], session, Subscriber(name))


async def report_tiles(s: LightSubscriber, room: str, boxes: list[dict[str, Any]]) -> None:
    """One ``track_render`` with every tile; a track gone meanwhile (its publisher left) is
    refused by name and the rest sent again (a refused message changes nothing)."""
    for _ in range(4):
        try:
            await s.session.client.request(
                {"type": "track_render", "room": room, "tracks": boxes}, timeout=60
            )
            return
        except ClientError as e:
            gone = re.findall(r"'([^']+)'", e.msg.get("message", ""))
            if e.code != "no_such_track" or not gone:
                print(f"room25: subscriber {s.index} could not report its tiles: {e!r}", flush=True)
                return
            print(f"room25: subscriber {s.index}: track {gone[0]} is gone", flush=True)
            boxes = [b for b in boxes if b["track"] != gone[0]]
