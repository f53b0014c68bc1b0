"""The one module that touches aiortc's (and aioice's) internals.

aiortc has no public RTP API (its maintainer declined one several times), so forwarding without
decoding hooks private methods, all of which have kept their signatures since aiortc 0.9.28.
``check_internals`` verifies at start-up every private this module uses (``PRIVATE_INTERNALS``;
a test compares it with this file's source), the public-looking members of undocumented
aioice/aiortc objects it reaches through them (``INTERNAL_MEMBERS``), and the parameters of the
methods it replaces or calls by keyword (``SIGNATURES``), and fails with a clear message if a
version change removed or changed any. What is used:

- publisher side: ``RTCRtpReceiver._handle_rtp_packet`` (replaced per instance: forward first,
  then only what the SFU needs of aiortc's handling: its bandwidth estimate (REMB), receiver
  report statistics and NACKs upstream, kept in aiortc's own state so its RTCP task sends them;
  no depayloading, no frame assembly), ``_handle_rtcp_packet`` (sender reports, for A/V sync),
  ``_send_rtcp`` (to rewrite REMB with the subscribers' estimates),
  ``_send_rtcp_pli``/``_send_rtcp_nack``, the RTX maps, the RTP router's SSRC table (RTX
  routing), and the decoder thread, which is stopped (nobody consumes decoded frames);
- subscriber side: an ``RTCRtpSender`` whose track never yields (so no encoder exists), its
  ``_ssrc``/``_rtx_ssrc``, ``_handle_rtcp_packet`` (NACK, PLI/FIR, REMB) and the counters its
  sender reports are built from; packets go out through the DTLS transport's SRTP session
  (``_tx_srtp``) and the nominated ICE pair's socket (``RTCIceTransport._connection``,
  ``Connection._nominated``) directly, skipping four coroutine layers per packet;
- simulcast publishers (``SimulcastHooks``): the RID and repaired-RID header extensions added to
  the transceiver's negotiated ``_headerExtensions`` (aiortc negotiates neither), the RTP
  router's ``route_rtp`` wrapped per connection to bind an unknown SSRC to its receiver by the
  MID extension (``mid_table``), and per layer a ``NackGenerator`` of its own;
- ``HostCandidatePolicy`` replaces aioice's ``Connection.get_component_candidates`` (bind and
  announced address, port range) and refuses to install if that method is gone or changed.
"""

from __future__ import annotations

import ast
import asyncio
import functools
import importlib.metadata
import inspect
import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any, Final, NoReturn

import aioice.ice
import aiortc
from aiortc import (
    RTCRtpHeaderExtensionParameters,
    RTCRtpReceiver,
    RTCRtpSender,
    RTCRtpTransceiver,
    clock,
)
from aiortc.codecs import is_rtx
from aiortc.mediastreams import MediaStreamTrack
from aiortc.rate import RemoteBitrateEstimator
from aiortc.rtcdtlstransport import RTCDtlsTransport, RtpRouter
from aiortc.rtcicetransport import RTCIceTransport
from aiortc.rtcrtpreceiver import NackGenerator, StreamStatistics
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTCP_PSFB_FIR,
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    RtcpPsfbPacket,
    RtcpRrPacket,
    RtcpRtpfbPacket,
    RtcpSrPacket,
    RtpPacket,
    pack_remb_fci,
    unpack_remb_fci,
    unwrap_rtx,
)

from .rtp import URI_ABS_SEND_TIME, URI_AUDIO_LEVEL, URI_MID, ExtensionLayout, abs_send_time_now
from .simulcast import URI_REPAIRED_RID, URI_RID, SimulcastSection

log = logging.getLogger("rallypoint.sfu.rtc")

# Every aiortc/aioice private (leading underscore) this module reads, writes or replaces; no
# more, no fewer (tests/sfu/test_internals.py compares it with the names in this file's source).
PRIVATE_INTERNALS: Final[tuple[tuple[type, str], ...]] = (
    # publisher side (PublisherHooks, route_rtx_by_ssrc)
    (RTCRtpReceiver, "_handle_rtp_packet"),  # replaced per instance (forward, _feedback)
    (RTCRtpReceiver, "_handle_rtcp_packet"),  # wrapped: sender reports
    (RTCRtpReceiver, "_send_rtcp"),  # wrapped: REMB capped
    (RTCRtpReceiver, "_send_rtcp_pli"),
    (RTCRtpReceiver, "_send_rtcp_nack"),
    (RTCRtpReceiver, "_RTCRtpReceiver__stop_decoder"),
    (RTCRtpReceiver, "_RTCRtpReceiver__rtx_ssrc"),
    (RTCRtpReceiver, "_RTCRtpReceiver__codecs"),
    (RTCRtpReceiver, "_RTCRtpReceiver__rtcp_ssrc"),
    # ... and the state aiortc's handler kept, which _feedback keeps instead
    (RTCRtpReceiver, "_enabled"),
    (RTCRtpReceiver, "_RTCRtpReceiver__remote_bitrate_estimator"),
    (RTCRtpReceiver, "_RTCRtpReceiver__active_ssrc"),
    (RTCRtpReceiver, "_RTCRtpReceiver__remote_streams"),
    (RTCRtpReceiver, "_RTCRtpReceiver__nack_generator"),
    (RTCDtlsTransport, "_rtp_router"),
    # subscriber side (SubscriberHooks, sender_ssrcs, FastSender)
    (RTCRtpSender, "_handle_rtcp_packet"),  # wrapped: NACK, PLI/FIR, REMB
    (RTCRtpSender, "_ssrc"),
    (RTCRtpSender, "_rtx_ssrc"),
    (RTCRtpSender, "_RTCRtpSender__ntp_timestamp"),
    (RTCRtpSender, "_RTCRtpSender__rtp_timestamp"),
    (RTCRtpSender, "_RTCRtpSender__packet_count"),
    (RTCRtpSender, "_RTCRtpSender__octet_count"),
    (RTCDtlsTransport, "_tx_srtp"),
    (RTCIceTransport, "_connection"),
    (aioice.ice.Connection, "_nominated"),
    # negotiation (extension_ids, negotiated_codec)
    (RTCRtpTransceiver, "_codecs"),
    (RTCRtpTransceiver, "_headerExtensions"),
    # HostCandidatePolicy
    (aioice.ice.Connection, "_protocols"),
)

# Public-looking names on objects neither library documents (aioice's candidate pairs and
# sockets, aiortc's RTP router), reached through the privates above. A rename here breaks the
# SFU as surely, so they are checked too; every one is used in this file (the test checks that).
INTERNAL_MEMBERS: Final[tuple[tuple[type, str], ...]] = (
    (RtpRouter, "ssrc_table"),
    (RtpRouter, "mid_table"),
    (RtpRouter, "route_rtp"),  # wrapped per instance by route_by_mid
    (RemoteBitrateEstimator, "add"),
    (StreamStatistics, "add"),
    (NackGenerator, "add"),
    (NackGenerator, "missing"),
    (aioice.ice.CandidatePair, "protocol"),
    (aioice.ice.CandidatePair, "remote_addr"),
    (aioice.ice.StunProtocol, "transport"),
    (aioice.ice.StunProtocol, "send_data"),
    (aioice.ice.StunProtocol, "local_candidate"),
    (aioice.ice.Connection, "get_component_candidates"),  # replaced by HostCandidatePolicy
    (aioice.ice.Connection, "stun_server"),
    (aioice.ice.Connection, "turn_server"),
)

# Methods replaced by ours, with the parameters aiortc/aioice call them with, and methods we call
# by keyword, with theirs: a renamed parameter would break a call at the first packet or the
# first gathering, not at start-up.
SIGNATURES: Final[dict[tuple[type, str], tuple[str, ...]]] = {
    (RemoteBitrateEstimator, "add"): (
        "self",
        "arrival_time_ms",
        "abs_send_time",
        "payload_size",
        "ssrc",
    ),
    (RTCRtpReceiver, "_handle_rtp_packet"): ("self", "packet", "arrival_time_ms"),
    (RtpRouter, "route_rtp"): ("self", "packet"),
    (RTCRtpReceiver, "_handle_rtcp_packet"): ("self", "packet"),
    (RTCRtpReceiver, "_send_rtcp"): ("self", "packet"),
    (RTCRtpSender, "_handle_rtcp_packet"): ("self", "packet"),
    (aioice.ice.Connection, "get_component_candidates"): (
        "self",
        "component",
        "addresses",
        "timeout",
    ),
}


@functools.cache
def _module_classes(module: str) -> dict[str, ast.ClassDef]:
    tree = ast.parse(inspect.getsource(sys.modules[module]))
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


@functools.cache
def _assigned_on_self(cls: type) -> frozenset[str]:
    """Names the class's own methods assign on ``self`` (instance attributes), mangled as
    Python mangles ``self.__x`` inside the class."""
    node = _module_classes(cls.__module__).get(cls.__name__)
    if node is None:
        return frozenset()
    names: set[str] = set()
    prefix = "_" + cls.__name__.lstrip("_")
    for n in ast.walk(node):
        if isinstance(n, ast.Assign):
            targets = n.targets
        elif isinstance(n, ast.AnnAssign | ast.AugAssign):
            targets = [n.target]
        else:
            continue
        for target in targets:
            for t in ast.walk(target):
                if (
                    isinstance(t, ast.Attribute)
                    and isinstance(t.value, ast.Name)
                    and t.value.id == "self"
                ):
                    mangled = t.attr.startswith("__") and not t.attr.endswith("__")
                    names.add(prefix + t.attr if mangled else t.attr)
    return frozenset(names)


def _has(cls: type, name: str) -> bool:
    """Whether instances of ``cls`` have ``name``: a class attribute (method, property), an
    annotated attribute, or one the class's methods assign on ``self``."""
    if hasattr(cls, name):
        return True
    for c in cls.__mro__:
        if name in inspect.get_annotations(c):
            return True
        if c.__module__.split(".")[0] in ("aiortc", "aioice") and name in _assigned_on_self(c):
            return True
    return False


def _params_changed(cls: type, name: str) -> str | None:
    """``"Cls.name(params)"`` if the method takes other parameters than we expect."""
    want = SIGNATURES[(cls, name)]
    have = tuple(inspect.signature(getattr(cls, name)).parameters)
    return None if have == want else f"{cls.__name__}.{name}({', '.join(want)})"


def _lacking(internals: Iterable[tuple[type, str]]) -> list[str]:
    missing = [f"{cls.__name__}.{name}" for cls, name in internals if not _has(cls, name)]
    for cls, name in SIGNATURES:
        if f"{cls.__name__}.{name}" not in missing and hasattr(cls, name):
            changed = _params_changed(cls, name)
            if changed is not None:
                missing.append(changed)
    return missing


def _fail(missing: list[str]) -> NoReturn:
    raise RuntimeError(
        f"the SFU needs aiortc/aioice internals that aiortc {aiortc.__version__} and aioice "
        f"{importlib.metadata.version('aioice')} lack or changed: {', '.join(missing)}; "
        "install aiortc==1.16.0 and aioice==0.13.0"
    )


def check_internals() -> None:
    """Fail with a clear message if this aiortc/aioice lacks a hook the SFU needs."""
    missing = _lacking((*PRIVATE_INTERNALS, *INTERNAL_MEMBERS))
    if missing:
        _fail(missing)


class NeverTrack(MediaStreamTrack):
    """A sender's track that never yields a frame: the sender never creates an encoder, and the
    SFU sends the packets itself."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    async def recv(self) -> Any:
        await asyncio.Event().wait()  # forever (cancelled when the sender stops)


class FastSender:
    """Protect and send RTP for one DTLS transport, straight to the nominated pair's socket."""

    __slots__ = ("_addr", "_conn", "_dtls", "_nominated", "_pair", "_sendto", "_slow", "_srtp")

    def __init__(self, dtls: RTCDtlsTransport) -> None:
        self._dtls = dtls
        self._slow: set[asyncio.Future[None]] = set()
        self._conn: aioice.ice.Connection = dtls.transport._connection
        self._nominated: dict[int, Any] = self._conn._nominated
        self._pair: Any = None
        self._addr: Any = None
        self._srtp: Any = None
        self._sendto: Any = None

    @property
    def ready(self) -> bool:
        return self._dtls._tx_srtp is not None and self._nominated.get(1) is not None

    def send(self, data: bytes) -> None:
        pair = self._nominated.get(1)
        if pair is not self._pair:  # first packet, or ICE nominated another pair
            self._pair = self._sendto = None
            srtp = self._dtls._tx_srtp
            if pair is None or srtp is None:
                return
            self._pair, self._srtp = pair, srtp
            # CandidatePair.remote_addr builds a tuple per call: take it once per pair.
            self._addr = pair.remote_addr
            protocol = pair.protocol
            if type(protocol) is aioice.ice.StunProtocol:
                self._sendto = protocol.transport.sendto
        elif pair is None:
            return
        sendto = self._sendto
        if sendto is not None:
            sendto(self._srtp.protect(data), self._addr)
            return
        # A TURN-relayed pair on the server side (rare): aioice's coroutine path.
        fut = asyncio.ensure_future(pair.protocol.send_data(self._srtp.protect(data), self._addr))
        self._slow.add(fut)
        fut.add_done_callback(self._slow.discard)


def extension_ids(transceiver: RTCRtpTransceiver) -> dict[str, int]:
    return {x.uri: x.id for x in transceiver._headerExtensions}


def layout_for(transceiver: RTCRtpTransceiver) -> ExtensionLayout:
    ids = extension_ids(transceiver)
    return ExtensionLayout(
        ids.get(URI_MID),
        transceiver.mid,
        ids.get(URI_ABS_SEND_TIME),
        ids.get(URI_AUDIO_LEVEL),
        transceiver.kind == "audio",
    )


def negotiated_codec(transceiver: RTCRtpTransceiver) -> tuple[str, int, int | None]:
    """(codec name, payload type, RTX payload type) negotiated on a transceiver."""
    codecs = transceiver._codecs
    main = next(c for c in codecs if not is_rtx(c))
    assert main.payloadType is not None
    rtx = next(
        (
            c.payloadType
            for c in codecs
            if is_rtx(c) and c.parameters.get("apt") == main.payloadType
        ),
        None,
    )
    return main.mimeType.split("/")[1].lower(), main.payloadType, rtx


def route_rtx_by_ssrc(receiver: RTCRtpReceiver) -> None:
    """Route a receiver's RTX stream by SSRC.

    aiortc's router knows a receiver's media SSRC but not its RTX SSRC: it routes RTX by
    payload type, which fails as soon as two video receivers share a connection (a camera and
    a screen share), so every retransmission would be dropped. The RTX SSRCs were signaled
    (a=ssrc-group:FID) and are in the receiver's RTX map.
    """
    router = receiver.transport._rtp_router
    for rtx_ssrc in receiver._RTCRtpReceiver__rtx_ssrc:  # type: ignore[attr-defined]
        router.ssrc_table[rtx_ssrc] = receiver


class PublisherHooks:
    """Takes over one publisher receiver: RTP to ``on_rtp``, SRs to ``on_sr``, REMB capped."""

    def __init__(
        self,
        receiver: RTCRtpReceiver,
        on_rtp: Callable[[int, int, bool, bytes, int, int | None], None],
        on_sr: Callable[[int, int], None],
        on_malformed: Callable[[], None],
    ) -> None:
        self.receiver = receiver
        self.on_rtp = on_rtp
        self.on_sr = on_sr
        self.on_malformed = on_malformed
        self.media_ssrc: int | None = None
        self.remb_cap: int | None = None  # the subscribers' combined estimate
        self.remb_own: int | None = None  # aiortc's estimate of our own downlink
        self._rtx: dict[int, int] = {}  # rtx payload type -> original payload type
        self._rtx_pts: frozenset[int] = frozenset()  # every RTX payload type, even without apt
        # aiortc's per-receiver state that _feedback keeps up to date as aiortc would. Each is
        # created in RTCRtpReceiver.__init__ and never replaced (the dicts are filled in place),
        # so one lookup of the mangled names per receiver will do.
        self._codecs: dict[int, Any] = receiver._RTCRtpReceiver__codecs  # type: ignore[attr-defined]
        self._rtx_ssrc: dict[int, int] = receiver._RTCRtpReceiver__rtx_ssrc  # type: ignore[attr-defined]
        self._active_ssrc: dict[int, Any] = receiver._RTCRtpReceiver__active_ssrc  # type: ignore[attr-defined]
        self._streams: dict[int, Any] = receiver._RTCRtpReceiver__remote_streams  # type: ignore[attr-defined]
        self._nacks: Any = receiver._RTCRtpReceiver__nack_generator  # type: ignore[attr-defined]
        self._estimator: Any = receiver._RTCRtpReceiver__remote_bitrate_estimator  # type: ignore[attr-defined]
        self._orig_rtcp = receiver._handle_rtcp_packet
        self._orig_send_rtcp = receiver._send_rtcp
        self._orig_receive = receiver.receive
        receiver._handle_rtp_packet = self._handle_rtp  # type: ignore[method-assign]
        receiver._handle_rtcp_packet = self._handle_rtcp  # type: ignore[method-assign]
        receiver._send_rtcp = self._send_rtcp  # type: ignore[method-assign]
        receiver.receive = self._receive  # type: ignore[method-assign]

    async def _receive(self, parameters: Any) -> None:
        await self._orig_receive(parameters)
        route_rtx_by_ssrc(self.receiver)
        codecs = self._codecs
        self._rtx = {
            pt: c.parameters["apt"]
            for pt, c in codecs.items()
            if is_rtx(c) and isinstance(c.parameters.get("apt"), int)
        }
        self._rtx_pts = frozenset(pt for pt, c in codecs.items() if is_rtx(c))
        # Nobody consumes decoded frames: stop the decoder thread that receive() started (it
        # would wait for frames forever). Packets never reach it: _feedback replaces aiortc's
        # handler, which depayloaded each one and assembled frames for the decoder.
        self.receiver._RTCRtpReceiver__stop_decoder()  # type: ignore[attr-defined]

    async def _handle_rtp(self, packet: RtpPacket, arrival_time_ms: int) -> None:
        pt = packet.payload_type
        payload = packet.payload
        seq = packet.sequence_number
        if pt in self._rtx:
            # RFC 4588: a repaired packet; its original sequence number leads the payload.
            if len(payload) < 2:
                self.on_malformed()
                return
            seq = (payload[0] << 8) | payload[1]
            payload = payload[2:]
        else:
            self.media_ssrc = packet.ssrc
        level = packet.extensions.audio_level
        try:
            self.on_rtp(
                seq,
                packet.timestamp,
                bool(packet.marker),
                payload,
                abs_send_time_now(),
                level[1] if level is not None else None,
            )
        except Exception:  # never let one packet kill the receiver
            log.exception("forwarding failed")
            self.on_malformed()
        if self.receiver._enabled:  # as aiortc: a disabled receiver counts and reports nothing
            await self._feedback(packet, arrival_time_ms)

    async def _feedback(self, packet: RtpPacket, arrival_time_ms: int) -> None:
        """What aiortc's ``RTCRtpReceiver._handle_rtp_packet`` does that the SFU still needs, in
        its order: the bandwidth estimate (REMB to the publisher), the active SSRCs, the
        statistics its receiver reports are built from, and NACKs for missing packets (RTX
        unwrapped first, so a repaired packet is no longer missing). Not the rest, which only
        fed the decoder: depayloading, frame assembly, decoder errors."""
        remb = self._estimate(packet, arrival_time_ms)
        if remb is not None:
            await self._send_rtcp(remb)
        if not self._count(packet):
            return  # a payload type not negotiated: aiortc counts nothing either
        pt = packet.payload_type
        ssrc = packet.ssrc
        nacks = self._nacks  # video only
        if nacks is None:
            return
        if pt in self._rtx_pts:
            original_ssrc = self._rtx_ssrc.get(ssrc)
            apt = self._rtx.get(pt)
            if original_ssrc is None or apt not in self._codecs or len(packet.payload) < 2:
                return
            packet = unwrap_rtx(packet, payload_type=apt, ssrc=original_ssrc)
        if nacks.add(packet):
            await self.receiver._send_rtcp_nack(packet.ssrc, sorted(nacks.missing))

    def _estimate(self, packet: RtpPacket, arrival_time_ms: int) -> RtcpPsfbPacket | None:
        """Feed the bandwidth estimator (video only); the REMB to send the publisher, if due
        (it goes through our _send_rtcp, which caps it at the subscribers' estimate)."""
        estimator = self._estimator
        if estimator is None or packet.extensions.abs_send_time is None:
            return None
        remb = estimator.add(
            abs_send_time=packet.extensions.abs_send_time,
            arrival_time_ms=arrival_time_ms,
            payload_size=len(packet.payload) + packet.padding_size,
            ssrc=packet.ssrc,
        )
        rtcp_ssrc = self.receiver._RTCRtpReceiver__rtcp_ssrc  # type: ignore[attr-defined]
        if rtcp_ssrc is None or remb is None:
            return None
        return RtcpPsfbPacket(
            fmt=RTCP_PSFB_APP, ssrc=rtcp_ssrc, media_ssrc=0, fci=pack_remb_fci(*remb)
        )

    def _count(self, packet: RtpPacket) -> bool:
        """The active SSRCs and the statistics receiver reports are built from; False if the
        packet's payload type was not negotiated (nothing counted, as aiortc)."""
        ssrc = packet.ssrc
        self._active_ssrc[ssrc] = clock.current_datetime()  # getSynchronizationSources()
        codec = self._codecs.get(packet.payload_type)
        if codec is None:
            return False
        stats = self._streams.get(ssrc)
        if stats is None:
            stats = self._streams[ssrc] = StreamStatistics(codec.clockRate)
        stats.add(packet)
        return True

    async def _handle_rtcp(self, packet: Any) -> None:
        if isinstance(packet, RtcpSrPacket):
            self.on_sr(packet.sender_info.ntp_timestamp, packet.sender_info.rtp_timestamp)
        await self._orig_rtcp(packet)

    async def _send_rtcp(self, packet: Any) -> None:
        if isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
            try:
                bitrate, ssrcs = unpack_remb_fci(packet.fci)
            except ValueError:
                return
            self.remb_own = bitrate
            if self.remb_cap is not None and self.remb_cap < bitrate:
                packet = RtcpPsfbPacket(
                    fmt=RTCP_PSFB_APP,
                    ssrc=packet.ssrc,
                    media_ssrc=0,
                    fci=pack_remb_fci(self.remb_cap, ssrcs),
                )
        await self._orig_send_rtcp(packet)

    async def send_remb(self, bitrate: int) -> None:
        """Tell the publisher at once that the subscribers can take only ``bitrate``."""
        self.remb_cap = bitrate
        rtcp_ssrc = self.receiver._RTCRtpReceiver__rtcp_ssrc  # type: ignore[attr-defined]
        if self.media_ssrc is None or rtcp_ssrc is None:
            return
        if self.remb_own is not None:
            bitrate = min(bitrate, self.remb_own)
        await self._orig_send_rtcp(
            RtcpPsfbPacket(
                fmt=RTCP_PSFB_APP,
                ssrc=rtcp_ssrc,
                media_ssrc=0,
                fci=pack_remb_fci(bitrate, [self.media_ssrc]),
            )
        )

    async def request_keyframe(self) -> None:
        if self.media_ssrc is not None:
            await self.receiver._send_rtcp_pli(self.media_ssrc)

    async def nack(self, lost: list[int]) -> None:
        if self.media_ssrc is not None and lost:
            await self.receiver._send_rtcp_nack(self.media_ssrc, sorted(lost))


def accept_rid_extensions(transceiver: RTCRtpTransceiver, section: SimulcastSection) -> None:
    """Accept the offer's RID and repaired-RID header extensions on a publisher transceiver
    (aiortc negotiates neither): call after ``setRemoteDescription``, which resets the list,
    and before ``createAnswer``, which writes it. The receiver's packets then carry
    ``extensions.rtp_stream_id`` / ``repaired_rtp_stream_id``."""
    have = {x.uri for x in transceiver._headerExtensions}
    for uri, ext_id in ((URI_RID, section.rid_ext), (URI_REPAIRED_RID, section.repaired_rid_ext)):
        if ext_id is not None and uri not in have:
            transceiver._headerExtensions.append(
                RTCRtpHeaderExtensionParameters(id=ext_id, uri=uri)
            )


def route_by_mid(transceiver: RTCRtpTransceiver) -> None:
    """Route a connection's unknown SSRCs by their MID header extension.

    A simulcast publisher signals no SSRCs: aiortc's router then learns an SSRC only when a
    single receiver has its payload type, which fails as soon as two video tracks (camera and
    screen) share the connection. The MID extension names the receiver; once bound, the SSRC
    routes as any other (Chromium stops sending MID after the first receiver report)."""
    router = transceiver.receiver.transport._rtp_router
    if getattr(router, "rallypoint_by_mid", False):
        return
    original = router.route_rtp
    ssrc_table = router.ssrc_table
    mid_table = router.mid_table

    def route_rtp(packet: RtpPacket) -> Any:
        if packet.ssrc not in ssrc_table:
            mid = packet.extensions.mid
            if mid is not None:
                receiver = mid_table.get(mid)
                if receiver is not None:
                    ssrc_table[packet.ssrc] = receiver
        return original(packet)

    router.route_rtp = route_rtp  # type: ignore[method-assign]
    router.rallypoint_by_mid = True  # type: ignore[attr-defined]


class _Layer:
    """Receive state of one simulcast layer (one SSRC, and its RTX SSRC)."""

    __slots__ = ("nacks", "rtx_ssrc", "ssrc")

    def __init__(self) -> None:
        self.ssrc: int | None = None
        self.rtx_ssrc: int | None = None
        self.nacks = NackGenerator()


class SimulcastHooks(PublisherHooks):
    """Takes over the receiver of a simulcast video track: each layer is its own RTP stream.

    An SSRC is bound to its layer on first sight by the RID extension (RTX by the repaired
    RID) and keeps it: Chromium stops sending the extensions once it gets a receiver report.
    Packets of an SSRC not bound yet and without a RID are dropped. Each layer has its own
    NACK generator (aiortc's one generator would take the layers' interleaved sequence
    numbers for losses), keyframe requests and NACKs go to the layer's SSRC; receiver
    reports are per SSRC in aiortc's own statistics already, and its bandwidth estimate
    covers all of them."""

    def __init__(
        self,
        receiver: RTCRtpReceiver,
        rids: list[str],
        on_rtp: Callable[[int, int, int, bool, bytes, int], None],
        on_sr: Callable[[int, int, int], None],
        on_malformed: Callable[[], None],
        on_unrouted: Callable[[], None],
    ) -> None:
        super().__init__(receiver, self._no_rtp, self._no_sr, on_malformed)
        self.rids = rids
        self.on_layer_rtp = on_rtp
        self.on_layer_sr = on_sr
        self.on_unrouted = on_unrouted
        self.layers = [_Layer() for _ in rids]
        self.remb_floor: int | None = None  # what the layers subscribers need take
        # ssrc -> (layer, is RTX)
        self.bound: dict[int, tuple[int, bool]] = {}

    @staticmethod
    def _no_rtp(seq: int, ts: int, marker: bool, payload: bytes, t: int, lv: int | None) -> None:
        raise AssertionError("a simulcast receiver forwards by layer")

    @staticmethod
    def _no_sr(ntp: int, rtp_ts: int) -> None:
        raise AssertionError("a simulcast receiver's reports are by layer")

    def _bind(self, packet: RtpPacket) -> tuple[int, bool] | None:
        ext = packet.extensions
        rid = ext.rtp_stream_id
        rtx = False
        if rid is None:
            rid = ext.repaired_rtp_stream_id
            rtx = True
        if rid is None or rid not in self.rids:
            return None
        index = self.rids.index(rid)
        layer = self.layers[index]
        if rtx:
            layer.rtx_ssrc = packet.ssrc
        else:
            if layer.ssrc is not None:  # the publisher restarted the layer on a new SSRC
                self.bound.pop(layer.ssrc, None)
                layer.nacks = NackGenerator()
            layer.ssrc = packet.ssrc
        bound = self.bound[packet.ssrc] = (index, rtx)
        return bound

    async def _handle_rtp(self, packet: RtpPacket, arrival_time_ms: int) -> None:
        bound = self.bound.get(packet.ssrc)
        if bound is None:
            bound = self._bind(packet)
            if bound is None:
                self.on_unrouted()
                return
        index, rtx = bound
        payload = packet.payload
        seq = packet.sequence_number
        if rtx:
            if len(payload) < 2:
                self.on_malformed()
                return
            seq = (payload[0] << 8) | payload[1]
            payload = payload[2:]
        else:
            self.media_ssrc = packet.ssrc
        try:
            self.on_layer_rtp(
                index, seq, packet.timestamp, bool(packet.marker), payload, abs_send_time_now()
            )
        except Exception:  # never let one packet kill the receiver
            log.exception("forwarding failed")
            self.on_malformed()
        if self.receiver._enabled:
            await self._layer_feedback(packet, arrival_time_ms, index, rtx)

    async def _layer_feedback(
        self, packet: RtpPacket, arrival_time_ms: int, index: int, rtx: bool
    ) -> None:
        """``PublisherHooks._feedback`` for one layer: its own NACK generator and SSRC."""
        remb = self._estimate(packet, arrival_time_ms)
        if remb is not None:
            await self._send_rtcp(remb)
        if not self._count(packet):
            return
        layer = self.layers[index]
        if rtx:
            apt = self._rtx.get(packet.payload_type)
            if layer.ssrc is None or apt is None or len(packet.payload) < 2:
                return
            packet = unwrap_rtx(packet, payload_type=apt, ssrc=layer.ssrc)
        nacks = layer.nacks
        if nacks.add(packet):
            await self.receiver._send_rtcp_nack(packet.ssrc, sorted(nacks.missing))

    async def _handle_rtcp(self, packet: Any) -> None:
        if isinstance(packet, RtcpSrPacket):
            bound = self.bound.get(packet.ssrc)
            if bound is not None and not bound[1]:
                info = packet.sender_info
                self.on_layer_sr(bound[0], info.ntp_timestamp, info.rtp_timestamp)
        await self._orig_rtcp(packet)

    async def _send_rtcp(self, packet: Any) -> None:
        if isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
            try:
                bitrate, ssrcs = unpack_remb_fci(packet.fci)
            except ValueError:
                return
            self.remb_own = bitrate
            wanted = self._wanted(bitrate)
            if wanted != bitrate:
                packet = RtcpPsfbPacket(
                    fmt=RTCP_PSFB_APP,
                    ssrc=packet.ssrc,
                    media_ssrc=0,
                    fci=pack_remb_fci(wanted, ssrcs),
                )
        await self._orig_send_rtcp(packet)

    def _wanted(self, own: int) -> int:
        floor, cap = self.remb_floor, self.remb_cap
        bitrate = own if floor is None else max(own, floor)
        return bitrate if cap is None else min(bitrate, cap)

    async def send_layer_remb(self, floor: int | None, cap: int | None) -> None:
        """Ask the publisher for at least ``floor`` (what the layers subscribers need take)
        and at most ``cap`` (``None``: no bound). Its own loss-based estimate still guards
        its uplink: a sender's estimate is the smaller of that and the REMB."""
        self.remb_floor, self.remb_cap = floor, cap
        rtcp_ssrc = self.receiver._RTCRtpReceiver__rtcp_ssrc  # type: ignore[attr-defined]
        if self.media_ssrc is None or rtcp_ssrc is None:
            return
        bitrate = self._wanted(self.remb_own if self.remb_own is not None else floor or 0)
        if bitrate <= 0:
            return
        await self._orig_send_rtcp(
            RtcpPsfbPacket(
                fmt=RTCP_PSFB_APP,
                ssrc=rtcp_ssrc,
                media_ssrc=0,
                fci=pack_remb_fci(bitrate, [self.media_ssrc]),
            )
        )

    async def request_layer_keyframe(self, index: int) -> None:
        ssrc = self.layers[index].ssrc
        if ssrc is not None:
            await self.receiver._send_rtcp_pli(ssrc)

    async def request_keyframe(self) -> None:
        for index in range(len(self.layers)):
            await self.request_layer_keyframe(index)

    async def nack_layer(self, index: int, lost: list[int]) -> None:
        ssrc = self.layers[index].ssrc
        if ssrc is not None and lost:
            await self.receiver._send_rtcp_nack(ssrc, sorted(lost))


class SubscriberHooks:
    """Takes over one subscriber sender's RTCP: NACK, PLI/FIR and REMB go to callbacks."""

    def __init__(
        self,
        sender: RTCRtpSender,
        on_nack: Callable[[list[int]], None],
        on_keyframe: Callable[[], None],
        on_remb: Callable[[int], None],
        on_loss: Callable[[int], None] | None = None,
    ) -> None:
        self.sender = sender
        self.on_nack = on_nack
        self.on_keyframe = on_keyframe
        self.on_remb = on_remb
        self.on_loss = on_loss  # a receiver report's fraction lost (0-255) for our SSRC
        self._orig = sender._handle_rtcp_packet
        sender._handle_rtcp_packet = self._handle_rtcp  # type: ignore[method-assign]

    async def _handle_rtcp(self, packet: Any) -> None:
        if isinstance(packet, RtcpRtpfbPacket) and packet.fmt == RTCP_RTPFB_NACK:
            self.on_nack(list(packet.lost))
        elif isinstance(packet, RtcpPsfbPacket) and packet.fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
            self.on_keyframe()
        elif isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
            try:
                bitrate, _ = unpack_remb_fci(packet.fci)
            except ValueError:
                return
            self.on_remb(bitrate)
        else:
            on_loss = self.on_loss
            if on_loss is not None and isinstance(packet, RtcpRrPacket | RtcpSrPacket):
                ssrc = self.sender._ssrc
                for report in packet.reports:
                    if report.ssrc == ssrc:
                        on_loss(report.fraction_lost)
            await self._orig(packet)  # receiver reports: RTT and loss statistics

    def set_sender_report(self, ntp: int, rtp_ts: int, packets: int, octets: int) -> None:
        """Make the sender's next SR carry the publisher's NTP/RTP mapping and our counts."""
        s = self.sender
        s._RTCRtpSender__ntp_timestamp = ntp  # type: ignore[attr-defined]
        s._RTCRtpSender__rtp_timestamp = rtp_ts  # type: ignore[attr-defined]
        s._RTCRtpSender__packet_count = packets  # type: ignore[attr-defined]
        s._RTCRtpSender__octet_count = octets  # type: ignore[attr-defined]


def sender_ssrcs(sender: RTCRtpSender) -> tuple[int, int]:
    return sender._ssrc, sender._rtx_ssrc


def dtls_of(transceiver: RTCRtpTransceiver) -> RTCDtlsTransport:
    return transceiver.sender.transport


class HostCandidatePolicy:
    """Where the SFU's ICE sockets bind and what address they announce (for a server behind a
    1:1 NAT, e.g. a cloud VM: bind 0.0.0.0, announce the public address, and keep media in a
    port range so a firewall can be opened precisely)."""

    def __init__(
        self, bind: str = "", announce: str = "", port_min: int = 0, port_max: int = 0
    ) -> None:
        self.bind = bind
        self.announce = announce
        self.ports = range(port_min, port_max + 1) if port_min and port_max else None
        self._next = 0

    @property
    def active(self) -> bool:
        return bool(self.bind or self.announce or self.ports)

    async def _bind(
        self, loop: asyncio.AbstractEventLoop, factory: Callable[[], Any], address: str
    ) -> tuple[Any, Any]:
        if self.ports is None:
            return await loop.create_datagram_endpoint(factory, local_addr=(address, 0))
        n = len(self.ports)
        for i in range(n):
            port = self.ports[(self._next + i) % n]
            try:
                result = await loop.create_datagram_endpoint(factory, local_addr=(address, port))
            except OSError:
                continue
            self._next = (self._next + i + 1) % n
            return result
        raise OSError(f"no free UDP port in {self.ports.start}-{self.ports.stop - 1}")

    def install(self) -> None:
        """Replace aioice's host candidate gathering in this (worker) process."""
        from aioice.candidate import Candidate, candidate_foundation, candidate_priority

        # Without the method this replaces, the patch would silently do nothing: ICE sockets
        # on every interface, any port, the private address announced.
        conn_cls = aioice.ice.Connection
        key = (conn_cls, "get_component_candidates")
        if not hasattr(conn_cls, key[1]):
            _fail([f"{conn_cls.__name__}.{key[1]}"])
        changed = _params_changed(*key)
        if changed is not None:
            _fail([changed])
        policy = self
        original = aioice.ice.Connection.get_component_candidates

        async def get_component_candidates(
            conn: aioice.ice.Connection, component: int, addresses: list[str], timeout: int = 5
        ) -> list[Any]:
            if conn.stun_server or conn.turn_server:  # not how the SFU is configured
                return await original(conn, component, addresses, timeout)
            loop = asyncio.get_running_loop()
            out = []
            for address in [policy.bind] if policy.bind else addresses:
                try:
                    transport, protocol = await policy._bind(
                        loop, lambda: aioice.ice.StunProtocol(conn), address
                    )
                except OSError as e:
                    log.warning("cannot bind ICE socket on %s: %s", address, e)
                    continue
                port = transport.get_extra_info("sockname")[1]
                host = policy.announce or transport.get_extra_info("sockname")[0]
                protocol.local_candidate = Candidate(
                    foundation=candidate_foundation("host", "udp", host),
                    component=component,
                    transport="udp",
                    priority=candidate_priority(component, "host"),
                    host=host,
                    port=port,
                    type="host",
                )
                conn._protocols.append(protocol)
                out.append(protocol.local_candidate)
            return out

        connection_class: Any = aioice.ice.Connection
        connection_class.get_component_candidates = get_component_candidates
