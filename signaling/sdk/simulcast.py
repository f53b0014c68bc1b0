"""Simulcast publishing with aiortc: one video track sent as several layers (client side).

aiortc sends one encoding per ``RTCRtpSender`` (one encoder, one SSRC) and never writes the
RID header extensions, so it cannot send simulcast by itself. This module adds the least it
takes, as Chromium does it on the wire (docs/SDK.md, "Simulcast"):

- **one m-line, one sender per layer**: the transceiver's own sender sends the top layer; each
  lower layer gets an ``RTCRtpSender`` of its own (public constructor, ``send()`` with the
  section's negotiated parameters) on the same DTLS transport, started once the connection is
  up. Each has its own SSRC, RTX SSRC and packetizer; RTCP (NACK, PLI, receiver reports) reaches
  it by SSRC through aiortc's own router;
- **the offer's text** (``offer_simulcast``) gets ``a=rid:<r> send`` per layer,
  ``a=simulcast:send <rids>`` (lowest first, as the SFU reads it) and the RID / repaired-RID
  ``a=extmap`` lines, and loses its ``a=ssrc`` lines (as Chromium's simulcast offers do: the
  layers are told apart by RID);
- **every packet of a layer carries its RID** (RTX: the repaired RID) next to aiortc's MID and
  abs-send-time: the DTLS transport's ``_send_rtp`` is wrapped once per transport
  (``_RidStamper``) and rewrites the header extensions of the layers' SSRCs;
- **keyframe requests** (PLI/FIR) for a layer reach its track's ``request_keyframe()`` when it
  has one (pre-encoded and :class:`EncodedLayerTrack` tracks).

A server that answers without ``a=simulcast:recv`` for the section gets the top layer alone: the
lower layers' senders are never started.

The layers are tracks: pre-encoded ones (``media.tracks.EncodedVideoTrack``, cheap, for tests
and benchmarks) or :func:`encoded_layers` of one raw source, scaled and each encoded by a VP8
encoder of its own at its own bitrate (libwebrtc's layer table, as ``web/rallypoint.js``).

This is the SDK's only module that touches aiortc internals: ``check_internals`` verifies them
(``PRIVATE_INTERNALS``) when a simulcast publisher is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import importlib.metadata
import inspect
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import av
from aiortc import (
    RTCPeerConnection,
    RTCRtpCodecParameters,
    RTCRtpHeaderExtensionParameters,
    RTCRtpSender,
    RTCRtpTransceiver,
)
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.rtcrtpparameters import RTCRtpSendParameters
from aiortc.rtp import HeaderExtensionsMap, RtpPacket, is_rtcp
from aiortc.sdp import SessionDescription

# Every aiortc private this module reads, writes or replaces.
PRIVATE_INTERNALS: Final[tuple[tuple[type, str], ...]] = (
    (RTCDtlsTransport, "_send_rtp"),  # wrapped per transport instance: RIDs written
    (RTCRtpSender, "_ssrc"),  # read: which packets are a layer's
    (RTCRtpSender, "_rtx_ssrc"),
    (RTCRtpSender, "_send_keyframe"),  # wrapped per sender instance: PLI to the track
)

VIDEO_CLOCK: Final = 90000
URI_RID: Final = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id"  # RFC 8852
URI_REPAIRED_RID: Final = "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id"


def check_internals() -> None:
    """Fail with a clear message if this aiortc lacks an internal simulcast publishing uses."""
    init = inspect.getsource(RTCRtpSender.__init__)
    missing = [
        f"{cls.__name__}.{name}"
        for cls, name in PRIVATE_INTERNALS
        if not (callable(getattr(cls, name, None)) or f"self.{name} =" in init)
    ]
    if missing:
        raise RuntimeError(
            f"simulcast publishing needs aiortc internals that aiortc "
            f"{importlib.metadata.version('aiortc')} lacks: {', '.join(missing)}; "
            "install aiortc==1.16.0"
        )


# -- the layers ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LayerSpec:
    """One layer: its RID, picture size and bitrate."""

    rid: str
    width: int
    height: int
    bitrate: int


def layer_specs(width: int, height: int) -> list[LayerSpec]:
    """The layers of a ``width`` x ``height`` camera, lowest first, as libwebrtc's table
    (``simulcast.cc``) and ``web/rallypoint.js`` choose them: three from 960x540 up, two from
    480x270, one below (no simulcast)."""
    size = min(width, height)

    def scaled(rid: str, by: int, bitrate: int) -> LayerSpec:
        return LayerSpec(rid, width // by // 2 * 2, height // by // 2 * 2, bitrate)

    if size >= 540:
        return [scaled("q", 4, 150_000), scaled("h", 2, 500_000), scaled("f", 1, 1_700_000)]
    if size >= 270:
        return [scaled("h", 2, 200_000), scaled("f", 1, 700_000)]
    return [scaled("f", 1, 700_000)]


def vp8_context(
    width: int, height: int, fps: int, bitrate: int, *, gop: int = 100_000, threads: int = 2
) -> av.VideoCodecContext:
    """A PyAV libvpx (VP8) encoder set up as aiortc's own (CBR, realtime, no lag), plus error
    resilience so that a decoder recovers from a lost partition as WebRTC's encoders allow."""
    cc = av.CodecContext.create("libvpx", "w")
    cc.width, cc.height, cc.pix_fmt = width, height, "yuv420p"
    cc.time_base = fractions.Fraction(1, fps)
    cc.framerate = fractions.Fraction(fps)
    cc.bit_rate = bitrate
    cc.gop_size = gop
    cc.qmin, cc.qmax = 2, 56
    cc.thread_count = threads
    cc.options = {
        "deadline": "realtime",
        "cpu-used": "16",
        "lag-in-frames": "0",
        "bufsize": str(bitrate),
        "minrate": str(bitrate),
        "maxrate": str(bitrate),
        "overshoot-pct": "15",
        "undershoot-pct": "100",
        "static-thresh": "1",
        "partitions": "0",
        "error-resilient": "1",
    }
    return cc


class _Fanout:
    """Reads a raw video track in a task of its own and hands each layer the newest frame."""

    def __init__(self, source: MediaStreamTrack) -> None:
        self.source = source
        self.frame: av.VideoFrame | None = None
        self.count = 0
        self.ended = False
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self.users = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            while True:
                frame = await self.source.recv()
                if not isinstance(frame, av.VideoFrame):
                    raise MediaStreamError("a simulcast source gives raw video frames")
                async with self._changed:
                    self.frame = frame
                    self.count += 1
                    self._changed.notify_all()
        except MediaStreamError:
            pass
        async with self._changed:
            self.ended = True
            self._changed.notify_all()

    async def after(self, seen: int) -> tuple[int, av.VideoFrame]:
        """The newest frame once there is one newer than frame number ``seen``."""
        self.start()
        async with self._changed:
            await self._changed.wait_for(lambda: self.count > seen or self.ended)
            if self.frame is None or self.count <= seen:
                raise MediaStreamError
            return self.count, self.frame

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0 and self._task is not None:
            self._task.cancel()
            self.source.stop()


class EncodedLayerTrack(MediaStreamTrack):
    """One layer of a raw video source: each frame scaled to the layer's size and encoded by a
    VP8 encoder of its own at the layer's bitrate (in a worker thread); yields ``av.Packet``,
    which aiortc's sender packetizes without encoding again."""

    kind = "video"

    def __init__(self, fanout: _Fanout, spec: LayerSpec, fps: int = 30) -> None:
        super().__init__()
        fanout.users += 1
        self.spec = spec
        self._fanout = fanout
        self._seen = 0
        self._fps = fps
        self._cc = vp8_context(spec.width, spec.height, fps, spec.bitrate, threads=1)
        self._keyframe = True
        self._pts0: int | None = None
        self.keyframe_requests = 0
        self.frames_sent = 0

    def request_keyframe(self) -> None:
        """Make the next frame a keyframe (a PLI/FIR for this layer)."""
        self.keyframe_requests += 1
        self._keyframe = True

    def _encode(self, frame: av.VideoFrame, keyframe: bool) -> list[av.Packet]:
        scaled = frame.reformat(width=self.spec.width, height=self.spec.height, format="yuv420p")
        scaled.pts = self.frames_sent
        scaled.time_base = self._cc.time_base
        if keyframe:
            scaled.pict_type = av.video.frame.PictureType.I
        return list(self._cc.encode(scaled))

    async def recv(self) -> av.Packet:
        loop = asyncio.get_running_loop()
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            self._seen, frame = await self._fanout.after(self._seen)
            keyframe, self._keyframe = self._keyframe, False
            packets = await loop.run_in_executor(None, self._encode, frame, keyframe)
            if not packets:
                self._keyframe = self._keyframe or keyframe
                continue
            # The source's own clock (pts in its time base) gives the RTP timestamp.
            base = frame.time_base
            pts = 0 if frame.pts is None or base is None else int(frame.pts * base * VIDEO_CLOCK)
            if self._pts0 is None:
                self._pts0 = pts
            packet = packets[0]
            packet.pts = packet.dts = pts - self._pts0
            packet.time_base = fractions.Fraction(1, VIDEO_CLOCK)
            self.frames_sent += 1
            return packet

    def stop(self) -> None:
        if self.readyState == "live":
            self._fanout.release()
        super().stop()


def encoded_layers(source: MediaStreamTrack, width: int, height: int) -> Simulcast:
    """The layers of a raw ``width`` x ``height`` video source (:func:`layer_specs`), each
    encoded on its own; one layer (no simulcast) below 480x270."""
    fanout = _Fanout(source)
    specs = layer_specs(width, height)
    return Simulcast([EncodedLayerTrack(fanout, s) for s in specs], [s.rid for s in specs])


class Simulcast:
    """What to publish as one simulcast video track: its layers' tracks, lowest first, and
    their RIDs (``q``/``h``/``f`` for three, ``h``/``f`` for two, as the web page names them)."""

    kind = "video"

    def __init__(self, layers: Sequence[MediaStreamTrack], rids: Sequence[str] | None = None):
        if rids is None:
            rids = ("q", "h", "f")[-len(layers) :] if len(layers) <= 3 else None
        if rids is None or len(rids) != len(layers) or len(set(rids)) != len(rids):
            raise ValueError("give one distinct rid per layer")
        if not layers or any(t.kind != "video" for t in layers):
            raise ValueError("simulcast layers are video tracks")
        self.layers = list(layers)
        self.rids = list(rids)


# -- SDP -------------------------------------------------------------------------------------


def _free_ext_ids(sdp: str, count: int) -> list[int]:
    used = set()
    for line in sdp.splitlines():
        if line.startswith("a=extmap:"):
            with contextlib.suppress(ValueError):
                used.add(int(line[9:].split()[0].split("/")[0]))
    free = [i for i in range(1, 15) if i not in used]
    if len(free) < count:
        raise ValueError("no free header extension id for the RID extensions")
    return free[:count]


def offer_simulcast(sdp: str, sections: dict[str, list[str]]) -> str:
    """``sdp`` (an offer from aiortc) with the video sections whose mid is in ``sections``
    offering simulcast of those rids (lowest first): RID extensions, ``a=rid``,
    ``a=simulcast``, and no ``a=ssrc``/``a=ssrc-group`` lines."""
    if not sections:
        return sdp
    rid_id, repaired_id = _free_ext_ids(sdp, 2)
    eol = "\r\n" if "\r\n" in sdp else "\n"
    out: list[str] = []
    rids: list[str] | None = None
    for line in sdp.splitlines():
        if line.startswith("m="):
            rids = None
        elif line.startswith("a=mid:"):
            rids = sections.get(line[6:].strip())
            out.append(line)
            if rids is not None:
                out.append(f"a=extmap:{rid_id} {URI_RID}")
                out.append(f"a=extmap:{repaired_id} {URI_REPAIRED_RID}")
                out.extend(f"a=rid:{r} send" for r in rids)
                out.append(f"a=simulcast:send {';'.join(rids)}")
            continue
        if rids is not None and line.startswith(("a=ssrc:", "a=ssrc-group:")):
            continue
        out.append(line)
    return eol.join(out) + eol


@dataclass(slots=True)
class AnsweredSection:
    """What the answer says of one section: whether simulcast was accepted, and the send
    parameters every layer's sender uses (codecs and header extensions as negotiated)."""

    simulcast: bool
    codecs: list[RTCRtpCodecParameters]
    extensions: list[RTCRtpHeaderExtensionParameters]


def read_answer(sdp: str, mid: str) -> AnsweredSection:
    """The answer's section ``mid``: is ``a=simulcast:recv`` there, and its codecs/extensions."""
    accepted = False
    current: str | None = None
    for line in sdp.splitlines():
        if line.startswith("m="):
            current = None
        elif line.startswith("a=mid:"):
            current = line[6:].strip()
        elif current == mid and line.startswith("a=simulcast:recv"):
            accepted = True
    for media in SessionDescription.parse(sdp).media:
        if media.rtp.muxId == mid:
            return AnsweredSection(
                accepted, list(media.rtp.codecs), list(media.rtp.headerExtensions)
            )
    raise ValueError(f"the answer has no section {mid!r}")


# -- sending ---------------------------------------------------------------------------------


class _RidStamper:
    """Writes a layer's RID (RTX: repaired RID) into each of its packets, on one DTLS
    transport: its ``_send_rtp`` is wrapped once, and packets of other SSRCs (audio, other
    tracks) and RTCP pass untouched."""

    def __init__(self, transport: RTCDtlsTransport) -> None:
        self.by_ssrc: dict[int, tuple[str, bool]] = {}  # ssrc -> (rid, is RTX)
        self.map = HeaderExtensionsMap()
        self.stamped = 0
        original = transport._send_rtp

        async def send_rtp(data: bytes) -> None:
            if len(data) >= 12 and not is_rtcp(data):
                entry = self.by_ssrc.get(int.from_bytes(data[8:12], "big"))
                if entry is not None:
                    data = self._stamp(data, entry)
            await original(data)

        transport._send_rtp = send_rtp  # type: ignore[method-assign]

    def configure(self, extensions: list[RTCRtpHeaderExtensionParameters]) -> None:
        self.map.configure(RTCRtpSendParameters(headerExtensions=extensions))

    def _stamp(self, data: bytes, entry: tuple[str, bool]) -> bytes:
        packet = RtpPacket.parse(data, self.map)
        rid, rtx = entry
        if rtx:
            packet.extensions.rtp_stream_id = None
            packet.extensions.repaired_rtp_stream_id = rid
        else:
            packet.extensions.rtp_stream_id = rid
        self.stamped += 1
        return packet.serialize(self.map)


_stampers: weakref.WeakKeyDictionary[RTCDtlsTransport, _RidStamper] = weakref.WeakKeyDictionary()


def forward_keyframe_requests(sender: RTCRtpSender, track: MediaStreamTrack) -> None:
    """PLI/FIR received by ``sender`` also call ``track.request_keyframe()`` (if it has one):
    a pre-encoded track has no encoder for aiortc to force a keyframe from."""
    request: Callable[[], None] | None = getattr(track, "request_keyframe", None)
    if request is None:
        return
    original = sender._send_keyframe

    def send_keyframe() -> None:
        request()
        original()

    sender._send_keyframe = send_keyframe  # type: ignore[method-assign]


class SimulcastSender:
    """The senders of one simulcast track: the transceiver's own (top layer) and one more per
    lower layer. Make it with the transceiver (after ``addTransceiver(layers[-1])``), call
    :meth:`start` with the server's answer after ``setRemoteDescription``, :meth:`stop` at
    the end."""

    def __init__(self, transceiver: RTCRtpTransceiver, simulcast: Simulcast) -> None:
        check_internals()
        self.transceiver = transceiver
        self.simulcast = simulcast
        self.senders: list[RTCRtpSender] = []  # lowest first; the last is the transceiver's
        self.accepted = False
        self._task: asyncio.Task[None] | None = None
        forward_keyframe_requests(transceiver.sender, simulcast.layers[-1])

    @property
    def mid(self) -> str:
        mid = self.transceiver.mid
        assert mid is not None, "negotiate first"
        return mid

    def start(self, pc: RTCPeerConnection, answer: str) -> None:
        """Start the lower layers' senders once ``pc`` is connected (if the answer accepts
        simulcast; otherwise the top layer goes alone)."""
        if self.senders:
            return  # already started (a renegotiation)
        section = read_answer(answer, self.mid)
        self.accepted = section.simulcast
        top = self.transceiver.sender
        if not section.simulcast:
            for track in self.simulcast.layers[:-1]:
                track.stop()  # never sent (an encoded layer releases its source)
            return
        transport = top.transport
        stamper = _stampers.get(transport)
        if stamper is None:
            stamper = _stampers[transport] = _RidStamper(transport)
        stamper.configure(section.extensions)
        params = RTCRtpSendParameters(
            codecs=section.codecs, headerExtensions=section.extensions, muxId=self.mid
        )
        params.rtcp.mux = True
        for track in self.simulcast.layers[:-1]:
            sender = RTCRtpSender(track, transport)
            forward_keyframe_requests(sender, track)
            self.senders.append(sender)
        self.senders.append(top)
        for sender, rid in zip(self.senders, self.simulcast.rids, strict=True):
            stamper.by_ssrc[sender._ssrc] = (rid, False)
            stamper.by_ssrc[sender._rtx_ssrc] = (rid, True)
        self._task = asyncio.ensure_future(self._start_when_connected(pc, params))

    async def _start_when_connected(self, pc: RTCPeerConnection, params: Any) -> None:
        # aiortc's sender task ends at the first ConnectionError: start once DTLS is up.
        while pc.connectionState != "connected":
            if pc.connectionState in ("failed", "closed"):
                return
            await asyncio.sleep(0.02)
        cname = f"simulcast-{id(self)}"
        for sender in self.senders[:-1]:
            params.rtcp.cname = cname
            params.rtcp.ssrc = sender._ssrc
            await sender.send(params)

    async def stop(self) -> None:
        """Stop the lower layers' senders (the transceiver's own stops with the connection)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for sender in self.senders[:-1]:
            await sender.stop()
            if sender.track is not None:
                sender.track.stop()
