"""The one module that touches aiortc's (and aioice's, and pylibsrtp's) internals.

aiortc has no public RTP API (its maintainer declined one several times), so forwarding without
decoding hooks private methods, all of which have kept their signatures since aiortc 0.9.28.
``check_internals`` verifies at start-up every private this module uses (``PRIVATE_INTERNALS``;
a test compares it with this file's source), the public-looking members of undocumented
aioice/aiortc objects it reaches through them (``INTERNAL_MEMBERS``), and the parameters of the
methods it replaces or calls by keyword (``SIGNATURES``), and fails with a clear message if a
version change removed or changed any. What is used:

- publisher side: ``RTCRtpReceiver._handle_rtp_packet`` (replaced per instance: forward first,
  then only what the SFU needs of aiortc's handling: receiver report statistics, kept in
  aiortc's own state so its RTCP task sends them, and the active SSRCs; the bandwidth estimate
  (REMB) and NACKs upstream are ours (``sfu/estimator.py``, cheaper per packet than aiortc's
  estimator and NACK generator); no depayloading, no frame assembly), ``_handle_rtcp_packet``
  (sender reports, for A/V sync), ``_send_rtcp`` (to rewrite REMB with the subscribers' estimates),
  ``_send_rtcp_pli``/``_send_rtcp_nack``, the RTX maps, the RTP router's SSRC table (RTX
  routing), and the decoder thread, which is stopped (nobody consumes decoded frames); media
  is taken off the publisher connection as it arrives (``fast_receive`` replaces aioice's
  ``Connection.data_received`` per connection, wraps its sockets' ``StunProtocol.
  datagram_received`` so RTP and RTCP skip the STUN parser, decrypts in place with the DTLS
  transport's ``_rx_srtp`` and parses with ``parse_rtp`` by the negotiated IDs of its
  ``_rtp_header_extensions_map``, ``HeaderExtensionsMap``'s ``__ids``), instead of through
  aiortc's queue and receive task;
- subscriber side: an ``RTCRtpSender`` whose track never yields (so no encoder exists), its
  ``_ssrc``/``_rtx_ssrc``, ``_handle_rtcp_packet`` (NACK, PLI/FIR, REMB) and the counters its
  sender reports are built from; packets go out through the DTLS transport's SRTP session
  (``_tx_srtp``) and the nominated ICE pair's socket (``RTCIceTransport._connection``,
  ``Connection._nominated``) directly, skipping four coroutine layers per packet; the
  forwarding path builds each packet in the SRTP session's own buffer and protects it in place
  (``pylibsrtp.Session``'s ``_srtp``, ``_cdata``, ``_buffer``: ``FastSender.send_rtp``) and
  sends it from that buffer on a duplicate of the pair's socket; the sender's RTCP task
  (``_run_rtcp``, replaced per instance) is a registration with ``SenderReports``, one timer
  per connection for all its senders' reports, which keeps what the task kept (its
  ``__rtcp_started``/``__rtcp_exited`` events, ``__lsr``/``__lsr_time``) and reads its
  ``__cname``;
- simulcast publishers (``SimulcastHooks``): the RID and repaired-RID header extensions added to
  the transceiver's negotiated ``_headerExtensions`` (aiortc negotiates neither), the RTP
  router's ``route_rtp`` wrapped per connection to bind an unknown SSRC to its receiver by the
  MID extension (``mid_table``), and per layer a NACK tracker of its own;
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
import os
import random
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, Final, NoReturn

import aioice.ice
import aiortc
import pylibsrtp
from aiortc import (
    RTCPeerConnection,
    RTCRtpHeaderExtensionParameters,
    RTCRtpReceiver,
    RTCRtpSender,
    RTCRtpTransceiver,
    clock,
)
from aiortc.codecs import is_rtx
from aiortc.mediastreams import MediaStreamTrack
from aiortc.rtcdtlstransport import RTCDtlsTransport, RtpRouter
from aiortc.rtcicetransport import RTCIceTransport
from aiortc.rtcrtpreceiver import StreamStatistics
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTCP_PSFB_FIR,
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    HeaderExtensionsMap,
    RtcpPsfbPacket,
    RtcpRrPacket,
    RtcpRtpfbPacket,
    RtcpSrPacket,
    RtpPacket,
    pack_remb_fci,
    unpack_remb_fci,
)

from . import rtcp
from .estimator import NackTracker, ReceiveEstimator
from .rtp import (
    HEADER,
    NTP_EPOCH_OFFSET,
    URI_ABS_SEND_TIME,
    URI_AUDIO_LEVEL,
    URI_MID,
    ExtensionLayout,
    abs_send_time_now,
    build,
)
from .simulcast import URI_REPAIRED_RID, URI_RID, SimulcastSection
from .tasks import TaskSet

log = logging.getLogger("rallypoint.sfu.rtc")

_srtp_ffi: Any = pylibsrtp.ffi
_srtp_protect: Any = pylibsrtp.lib.srtp_protect
_srtp_unprotect: Any = pylibsrtp.lib.srtp_unprotect
_PROFILE: Final = struct.Struct("!HH")
_U24: Final = struct.Struct("!L")  # read from the byte before a 3-byte value, then masked
_U16: Final = struct.Struct("!H")
# The room an RTP packet has in pylibsrtp's 1500-byte buffer before SRTP's trailer (the most
# libsrtp appends: SRTP_MAX_TRAILER_LEN).
SRTP_ROOM: Final = 1500 - pylibsrtp.SRTP_MAX_TRAILER_LEN

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
    (RTCRtpReceiver, "_RTCRtpReceiver__active_ssrc"),
    (RTCRtpReceiver, "_RTCRtpReceiver__remote_streams"),
    (RTCDtlsTransport, "_rtp_router"),
    # subscriber side (SubscriberHooks, sender_ssrcs, FastSender)
    (RTCRtpSender, "_handle_rtcp_packet"),  # wrapped: NACK, PLI/FIR, REMB
    (RTCRtpSender, "_ssrc"),
    (RTCRtpSender, "_rtx_ssrc"),
    (RTCRtpSender, "_RTCRtpSender__ntp_timestamp"),
    (RTCRtpSender, "_RTCRtpSender__rtp_timestamp"),
    (RTCRtpSender, "_RTCRtpSender__packet_count"),
    (RTCRtpSender, "_RTCRtpSender__octet_count"),
    # ... SenderReports: aiortc's RTCP task per sender replaced by one timer per connection
    (RTCRtpSender, "_run_rtcp"),  # replaced per instance
    (RTCRtpSender, "_RTCRtpSender__rtcp_started"),  # stop() waits for these two
    (RTCRtpSender, "_RTCRtpSender__rtcp_exited"),
    (RTCRtpSender, "_RTCRtpSender__lsr"),  # RTT from receiver reports (_handle_rtcp_packet)
    (RTCRtpSender, "_RTCRtpSender__lsr_time"),
    (RTCRtpSender, "_RTCRtpSender__cname"),
    (RTCDtlsTransport, "_tx_srtp"),
    (RTCDtlsTransport, "_rx_srtp"),  # fast_receive
    (RTCDtlsTransport, "_rtp_header_extensions_map"),
    (HeaderExtensionsMap, "_HeaderExtensionsMap__ids"),  # parse_rtp: the negotiated IDs
    (RTCDtlsTransport, "_handle_rtcp_data"),
    (pylibsrtp.Session, "_srtp"),  # FastSender.send_rtp: protected in place
    (pylibsrtp.Session, "_cdata"),
    (pylibsrtp.Session, "_buffer"),
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
    (aioice.ice.Connection, "data_received"),  # replaced per instance by fast_receive
    (aioice.ice.StunProtocol, "datagram_received"),  # wrapped per instance by fast_receive
    (HeaderExtensionsMap, "get"),  # parse_rtp: two-byte header extensions
    (StreamStatistics, "add"),
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
    (RTCRtpReceiver, "_handle_rtp_packet"): ("self", "packet", "arrival_time_ms"),
    (RtpRouter, "route_rtp"): ("self", "packet"),
    (aioice.ice.Connection, "data_received"): ("self", "data", "component"),
    (aioice.ice.StunProtocol, "datagram_received"): ("self", "data", "addr"),
    (HeaderExtensionsMap, "get"): ("self", "extension_profile", "extension_value"),
    (RTCDtlsTransport, "_handle_rtcp_data"): ("self", "data"),
    (RTCRtpReceiver, "_handle_rtcp_packet"): ("self", "packet"),
    (RTCRtpReceiver, "_send_rtcp"): ("self", "packet"),
    (RTCRtpSender, "_handle_rtcp_packet"): ("self", "packet"),
    (RTCRtpSender, "_run_rtcp"): ("self",),
    (aioice.ice.Connection, "get_component_candidates"): (
        "self",
        "component",
        "addresses",
        "timeout",
    ),
}


_LIBRARIES: Final = ("aiortc", "aioice", "pylibsrtp")


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
        if c.__module__.split(".")[0] in _LIBRARIES and name in _assigned_on_self(c):
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
    """Protect and send RTP for one DTLS transport, straight to the nominated pair's socket.

    ``send_rtp`` (the forwarding path) writes the packet's parts straight into the SRTP
    session's own buffer and protects it in place through libsrtp (``pylibsrtp``'s ``_srtp``,
    ``_cdata``, ``_buffer``): no intermediate packet is built, and none of
    ``Session.protect``'s per-call checks and allocations run (what it does is done here once
    per session). The protected packet goes out from a view of that buffer (no copy) on a
    duplicate of the pair's socket (``os.dup``: ours to close, ``close``), not through the
    event loop's transport, which would keep a view it could not send at once (and costs more
    per call): a send the socket cannot take now (``BlockingIOError``, a full send buffer) or
    that fails is dropped like a UDP drop on the way, and counted (``on_drop``)."""

    __slots__ = (
        "_addr",
        "_buf",
        "_cdata",
        "_closed",
        "_conn",
        "_ctx",
        "_dtls",
        "_len",
        "_nominated",
        "_on_drop",
        "_pair",
        "_sendto",
        "_slow",
        "_sock",
        "_srtp",
        "_view",
    )

    def __init__(self, dtls: RTCDtlsTransport, on_drop: Callable[[], None] | None = None) -> None:
        self._dtls = dtls
        self._on_drop = on_drop
        self._slow: set[asyncio.Future[None]] = set()
        self._conn: aioice.ice.Connection = dtls.transport._connection
        self._nominated: dict[int, Any] = self._conn._nominated
        self._pair: Any = None
        self._addr: Any = None
        self._srtp: Any = None
        self._sock: socket.socket | None = None
        self._sendto: Any = None
        self._buf: Any = None
        self._view: memoryview | None = None
        self._cdata: Any = None
        self._ctx: Any = None
        self._len: Any = _srtp_ffi.new("int *")
        self._closed = False

    @property
    def ready(self) -> bool:
        return (
            not self._closed
            and self._dtls._tx_srtp is not None
            and self._nominated.get(1) is not None
        )

    def close(self) -> None:
        """Close our socket; nothing is sent any more."""
        self._closed = True
        self._drop_route()

    def _drop_route(self) -> None:
        self._pair = self._sendto = self._view = None
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _route(self) -> Any:
        """The nominated pair, after taking its address, socket and the SRTP session again
        if it changed (None: not ready)."""
        pair = self._nominated.get(1)
        if pair is not self._pair:  # first packet, or ICE nominated another pair
            self._drop_route()
            srtp = self._dtls._tx_srtp
            if pair is None or srtp is None or self._closed:
                return None
            self._pair, self._srtp = pair, srtp
            self._buf, self._cdata, self._ctx = srtp._buffer, srtp._cdata, srtp._srtp[0]
            self._view = memoryview(self._buf)
            # CandidatePair.remote_addr builds a tuple per call: take it once per pair.
            self._addr = pair.remote_addr
            protocol = pair.protocol
            if type(protocol) is aioice.ice.StunProtocol:
                own = protocol.transport.get_extra_info("socket")
                sock = socket.socket(own.family, own.type, 0, os.dup(own.fileno()))
                sock.setblocking(False)
                self._sock, self._sendto = sock, sock.sendto
        return pair

    def _dropped(self) -> None:
        if self._on_drop is not None:
            self._on_drop()

    def send(self, data: bytes) -> None:
        pair = self._route()
        if pair is not None:
            self._send_protected(pair, self._srtp.protect(data))

    def send_rtcp(self, data: bytes) -> None:
        """Protect one compound RTCP packet (SRTCP) and send it as ``send`` sends RTP."""
        pair = self._route()
        if pair is not None:
            self._send_protected(pair, self._srtp.protect_rtcp(data))

    def _send_protected(self, pair: Any, data: bytes) -> None:
        sendto = self._sendto
        if sendto is not None:
            try:
                sendto(data, self._addr)
            except OSError:  # BlockingIOError (buffer full), or the network refused it
                self._dropped()
            return
        # A TURN-relayed pair on the server side (rare): aioice's coroutine path.
        fut = asyncio.ensure_future(pair.protocol.send_data(data, self._addr))
        self._slow.add(fut)
        fut.add_done_callback(self._slow.discard)

    def send_rtp(
        self, pt_byte: int, seq: int, ts: int, ssrc: int, head: bytes, body: bytes
    ) -> None:
        """``send(sfu.rtp.build(pt_byte, seq, ts, ssrc, head, body, b""))``, built in the SRTP
        buffer and protected in place (``sfu.forward.SendRtp``)."""
        sendto = self._sendto
        if sendto is None or self._nominated.get(1) is not self._pair:
            self.send(build(pt_byte, seq, ts, ssrc, head, body, b""))
            return
        buf = self._buf
        end = 12 + len(head)
        HEADER.pack_into(buf, 0, 0x90 if head else 0x80, pt_byte, seq, ts, ssrc)
        buf[12:end] = head
        n = end + len(body)
        if n > SRTP_ROOM:  # too long to protect in the buffer: as Session.protect would say
            raise ValueError("packet is too long")
        buf[end:n] = body
        length = self._len
        length[0] = n
        if _srtp_protect(self._ctx, self._cdata, length):
            raise RuntimeError("SRTP protection failed")
        try:
            sendto(self._view[: length[0]], self._addr)  # type: ignore[index]
        except OSError:
            self._dropped()


class _Reporting:
    """A sender whose reports a ``SenderReports`` sends."""

    __slots__ = ("chunk", "sender", "ssrc")

    def __init__(self, sender: RTCRtpSender, chunk: bytes) -> None:
        self.sender = sender
        self.ssrc: int = sender._ssrc
        self.chunk = chunk  # its SDES CNAME chunk (b"": no CNAME)


class SenderReports:
    """The RTCP sender reports of one subscriber connection (one DTLS transport), on one timer.

    aiortc runs a task per sender (``RTCRtpSender._run_rtcp``) that sends an SR and an SDES
    every 0.5-1.5 s: in a room of 25, 1,200 wake-ups, packet builds, SRTCP protections and
    sends per second. ``attach`` replaces that task, on the sender instance before its
    ``send()`` starts it, by a registration here: every 0.5-1.5 s (RFC 3550 section 6.2's
    randomization, aiortc's nominal 1 s) the connection's registered senders' SRs go out
    together, built with ``struct`` (``sfu.rtcp``), as compound packets of at most
    ``rtcp.MAX_COMPOUND`` bytes, each protected once and sent through ``send_rtcp``
    (``FastSender.send_rtcp``).

    What aiortc's task did is kept: a sender reports from its ``send()`` on (zero counts and
    timestamps until ``SubscriberHooks.set_sender_report`` gives it the publisher's mapping);
    its ``__rtcp_started``/``__rtcp_exited`` events, so ``RTCRtpSender.stop()`` still returns;
    its ``__lsr``/``__lsr_time`` at each SR, so aiortc's handler of receiver reports still
    measures the RTT; and a BYE when it stops (in a compound packet after its last SR, where
    aiortc sends a bare one). ``send()`` wraps what ``_run_rtcp`` returns in a task
    (``asyncio.ensure_future``): here it is a plain future, so there is no task at all, and
    ``stop()`` cancelling it unregisters the sender."""

    def __init__(self, send_rtcp: Callable[[bytes], None]) -> None:
        self._send = send_rtcp
        self._senders: dict[RTCRtpSender, _Reporting] = {}
        self._timer: asyncio.TimerHandle | None = None

    def attach(self, sender: RTCRtpSender) -> None:
        """Send ``sender``'s reports from here once it starts (call before its ``send()``)."""
        sender._run_rtcp = functools.partial(self._start, sender)  # type: ignore[method-assign, assignment]

    @property
    def senders(self) -> int:
        return len(self._senders)

    def _start(self, sender: RTCRtpSender) -> asyncio.Future[None]:
        """``sender._run_rtcp()``, called by its ``send()``: register, and return the future its
        ``stop()`` cancels."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        cname: str | None = sender._RTCRtpSender__cname  # type: ignore[attr-defined]
        chunk = rtcp.cname_chunk(sender._ssrc, cname) if cname is not None else b""
        self._senders[sender] = _Reporting(sender, chunk)
        done.add_done_callback(functools.partial(self._stopped, sender))
        sender._RTCRtpSender__rtcp_started.set()  # type: ignore[attr-defined]
        if self._timer is None:
            self._schedule(loop)
        return done

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = loop.call_later(0.5 + random.random(), self._fire, loop)

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if not self._senders:
            return
        try:
            self.send_reports()
        except Exception:  # the next round tries again
            log.exception("sending sender reports failed")
        self._schedule(loop)

    @staticmethod
    def _report(r: _Reporting, now: float) -> bytes:
        """The sender's SR as aiortc's task built it (also noting what RTT needs)."""
        s = r.sender
        ntp: int = s._RTCRtpSender__ntp_timestamp  # type: ignore[attr-defined]
        s._RTCRtpSender__lsr = (ntp >> 16) & 0xFFFFFFFF  # type: ignore[attr-defined]
        s._RTCRtpSender__lsr_time = now  # type: ignore[attr-defined]
        return rtcp.sender_report(
            r.ssrc,
            ntp,
            s._RTCRtpSender__rtp_timestamp,  # type: ignore[attr-defined]
            s._RTCRtpSender__packet_count,  # type: ignore[attr-defined]
            s._RTCRtpSender__octet_count,  # type: ignore[attr-defined]
        )

    def send_reports(self) -> None:
        """Send every registered sender's SR now (the timer calls this)."""
        now = time.time()
        report = self._report
        send = self._send
        for packet in rtcp.compound((report(r, now), r.chunk) for r in self._senders.values()):
            send(packet)

    def _stopped(self, sender: RTCRtpSender, _: asyncio.Future[None]) -> None:
        """The sender stopped (its ``stop()`` cancelled our future): its BYE, and the event its
        ``stop()`` waits for."""
        try:
            r = self._senders.pop(sender, None)
            if r is not None:
                self._send(rtcp.goodbye(self._report(r, time.time()), r.chunk, r.ssrc))
        except Exception:
            log.exception("sending a BYE failed")
        finally:
            sender._RTCRtpSender__rtcp_exited.set()  # type: ignore[attr-defined]
            if not self._senders and self._timer is not None:
                self._timer.cancel()
                self._timer = None


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


def parse_rtp(data: bytes, extensions_map: HeaderExtensionsMap) -> RtpPacket:
    """``RtpPacket.parse(data, extensions_map)``: the same packet and fields, in a fraction of
    the time (one unpack for the fixed header; one-byte header extensions read in place, by
    the map's negotiated IDs, its ``_HeaderExtensionsMap__ids``, instead of listed, sliced and
    mapped). Errors are ``ValueError``, also for an extension of the wrong length, where
    aiortc's ``struct.error`` would escape its callers. A two-byte header block (no browser
    sends one for these extensions) goes to aiortc's parser."""
    n = len(data)
    if n < 12:
        raise ValueError("RTP packet length is less than 12 bytes")
    b0, b1, seq, ts, ssrc = HEADER.unpack_from(data)
    if b0 >> 6 != 2:
        raise ValueError("RTP packet has invalid version")
    cc = b0 & 0x0F
    pos = 12 + 4 * cc
    if n < pos:
        raise ValueError("RTP packet has truncated CSRC")
    packet = RtpPacket(b1 & 0x7F, b1 >> 7, seq, ts, ssrc)
    if cc:
        packet.csrc = list(struct.unpack_from(f"!{cc}L", data, 12))
    if b0 & 0x10:
        if n < pos + 4:
            raise ValueError("RTP packet has truncated extension profile / length")
        profile, words = _PROFILE.unpack_from(data, pos)
        pos += 4
        end = pos + 4 * words
        if n < end:
            raise ValueError("RTP packet has truncated extension value")
        if profile == 0xBEDE:
            ids = extensions_map._HeaderExtensionsMap__ids  # type: ignore[attr-defined]
            ext = packet.extensions
            while pos < end:
                b = data[pos]
                if b == 0:  # padding
                    pos += 1
                    continue
                x_id = b >> 4
                x_len = (b & 0x0F) + 1
                pos += 1
                x_end = pos + x_len
                if x_end > end:
                    raise ValueError("RTP one-byte header extension value is truncated")
                # In aiortc's order (HeaderExtensionsMap.get), should two share an ID.
                if x_id == ids.mid:
                    ext.mid = data[pos:x_end].decode("utf8")
                elif x_id == ids.repaired_rtp_stream_id:
                    ext.repaired_rtp_stream_id = data[pos:x_end].decode("ascii")
                elif x_id == ids.rtp_stream_id:
                    ext.rtp_stream_id = data[pos:x_end].decode("ascii")
                elif x_id == ids.abs_send_time:
                    _length(x_len, 3)
                    ext.abs_send_time = _U24.unpack_from(data, pos - 1)[0] & 0xFFFFFF
                elif x_id == ids.transmission_offset:
                    _length(x_len, 3)
                    ext.transmission_offset = int.from_bytes(data[pos:x_end], "big", signed=True)
                elif x_id == ids.audio_level:
                    _length(x_len, 1)
                    level = data[pos]
                    ext.audio_level = (level & 0x80 == 0x80, level & 0x7F)
                elif x_id == ids.transport_sequence_number:
                    _length(x_len, 2)
                    ext.transport_sequence_number = _U16.unpack_from(data, pos)[0]
                pos = x_end
        else:
            packet.extensions = extensions_map.get(profile, data[pos:end])
            pos = end
    if b0 & 0x20:
        padding = data[-1]
        if not padding or padding > n - pos:
            raise ValueError("RTP packet padding length is invalid")
        packet.padding_size = padding
        packet.payload = data[pos:-padding]
    else:
        packet.payload = data[pos:]
    return packet


def _length(have: int, want: int) -> None:
    if have != want:
        raise ValueError("RTP header extension has the wrong length")


def fast_receive(dtls: RTCDtlsTransport) -> None:
    """Handle a publisher connection's SRTP media as it arrives.

    aiortc queues every datagram (aioice's ``Connection.data_received``) for its DTLS
    transport's receive task, which takes it off the queue, decrypts it, parses it and awaits
    the receiver's handler: a task switch and several coroutine layers per packet. This does
    the same work in the datagram's own callback: decrypt (the transport's ``_rx_srtp``, in
    its own buffer as ``FastSender`` protects), parse (``parse_rtp``, with the IDs of its
    ``_rtp_header_extensions_map``), route (its RTP router), and hand it to the hooked
    receiver's ``receive`` (``PublisherHooks``); RTCP is decrypted and handed to aiortc's
    handler (``_handle_rtcp_data``) at once too, so it keeps its place among the RTP (sender
    reports map the RTP times for lip sync and recordings). Everything else (STUN, DTLS, media
    before the DTLS handshake is done) goes on to aiortc as before. The connection's sockets
    hand RTP and RTCP straight to this (their ``StunProtocol.datagram_received``, which tries
    to parse every datagram as STUN first, is bypassed for them). The transport's own byte
    and packet counters (``getStats()``'s transport entry) no longer count the media."""
    conn = dtls.transport._connection
    if getattr(conn, "rallypoint_fast", False):
        return
    queue = conn.data_received
    router = dtls._rtp_router
    extensions_map = dtls._rtp_header_extensions_map
    tasks = TaskSet()
    length = _srtp_ffi.new("int *")
    rx: list[Any] = [None, None, None, None]  # the session, its buffer, cdata and context

    def data_received(data: bytes, component: int) -> None:
        srtp = dtls._rx_srtp
        if srtp is None or not data or not 127 < data[0] < 192:
            queue(data, component)
            return
        if len(data) > 1 and 191 < data[1] < 209:  # is_rtcp(data), inlined
            # RTCP is handled as it arrives too, so it keeps its place among the RTP.
            try:
                plain = srtp.unprotect_rtcp(data)
            except pylibsrtp.Error:
                return
            tasks.spawn(dtls._handle_rtcp_data(plain))
            return
        if rx[0] is not srtp:
            rx[:] = srtp, srtp._buffer, srtp._cdata, srtp._srtp[0]
        _, buf, cdata, ctx = rx
        n = len(data)
        if n > 1500:  # more than the session's buffer (and than the path's MTU)
            return
        buf[0:n] = data
        length[0] = n
        if _srtp_unprotect(ctx, cdata, length):
            return  # as aiortc: not authentic (or a replay)
        # aiortc's clock.current_ms(), without building two datetimes per packet.
        arrival_time_ms = int((time.time() + NTP_EPOCH_OFFSET) * 1000)
        try:
            packet = parse_rtp(buf[0 : length[0]], extensions_map)
        except ValueError:
            return  # as aiortc: not RTP
        receiver = router.route_rtp(packet)
        if receiver is None:
            return
        receive = getattr(receiver, "rallypoint_receive", None)
        if receive is not None:
            receive(packet, arrival_time_ms)
        else:  # a receiver the SFU did not hook (none are): aiortc's handler
            tasks.spawn(receiver._handle_rtp_packet(packet, arrival_time_ms=arrival_time_ms))

    conn.data_received = data_received  # type: ignore[method-assign]
    for protocol in conn._protocols:
        if type(protocol) is aioice.ice.StunProtocol:
            _bypass_stun_parse(protocol, data_received)
    conn.rallypoint_fast = True  # type: ignore[attr-defined]
    conn.rallypoint_tasks = tasks  # type: ignore[attr-defined]


def _bypass_stun_parse(
    protocol: aioice.ice.StunProtocol, data_received: Callable[[bytes, int], None]
) -> None:
    """Hand the socket's RTP and RTCP (first byte 128-191: never STUN, whose first two bits
    are 0, nor DTLS) straight to ``data_received``; the rest to aioice as before."""
    original = protocol.datagram_received
    component = protocol.local_candidate.component

    def datagram_received(data: bytes | str, addr: tuple[Any, ...]) -> None:
        if type(data) is bytes and data and 127 < data[0] < 192:
            data_received(data, component)
        else:
            original(data, addr)

    protocol.datagram_received = datagram_received  # type: ignore[method-assign]


class _Stream:
    """Receive state of one SSRC of a publisher receiver."""

    __slots__ = ("active_due", "media_ssrc", "nacks", "stats")

    def __init__(self, stats: Any, media_ssrc: int | None, nacks: NackTracker | None) -> None:
        self.stats = stats  # aiortc's StreamStatistics, in its receiver's dict
        self.media_ssrc = media_ssrc  # the SSRC NACKs name (the original's, for RTX)
        self.nacks = nacks  # the media SSRC's tracker, for RTX too (None: audio)
        self.active_due = 0  # when to note the SSRC as active again (ms)


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
        # aiortc's per-receiver state that _feedback keeps up to date as aiortc would. Each is
        # created in RTCRtpReceiver.__init__ and never replaced (the dicts are filled in place),
        # so one lookup of the mangled names per receiver will do.
        self._codecs: dict[int, Any] = receiver._RTCRtpReceiver__codecs  # type: ignore[attr-defined]
        self._rtx_ssrc: dict[int, int] = receiver._RTCRtpReceiver__rtx_ssrc  # type: ignore[attr-defined]
        self._active_ssrc: dict[int, Any] = receiver._RTCRtpReceiver__active_ssrc  # type: ignore[attr-defined]
        self._streams: dict[int, Any] = receiver._RTCRtpReceiver__remote_streams  # type: ignore[attr-defined]
        # Ours instead of aiortc's estimator and NACK generator (sfu/estimator.py: a few integer
        # operations per packet, the rest per 250 ms window or per loss); video only, as aiortc.
        self._video = receiver.track.kind == "video"
        self.estimator: ReceiveEstimator | None = ReceiveEstimator() if self._video else None
        self._known: dict[int, _Stream] = {}  # ssrc -> its receive state
        self._nack_due: _Stream | None = None
        self._tasks = TaskSet()  # feedback sends started by receive()
        self._orig_rtcp = receiver._handle_rtcp_packet
        self._orig_send_rtcp = receiver._send_rtcp
        self._orig_receive = receiver.receive
        receiver._handle_rtp_packet = self._handle_rtp  # type: ignore[method-assign]
        receiver.rallypoint_receive = self.receive  # type: ignore[attr-defined]  # fast_receive
        receiver._handle_rtcp_packet = self._handle_rtcp  # type: ignore[method-assign]
        receiver._send_rtcp = self._send_rtcp  # type: ignore[method-assign]
        receiver.receive = self._receive  # type: ignore[method-assign]

    async def _receive(self, parameters: Any) -> None:
        await self._orig_receive(parameters)
        route_rtx_by_ssrc(self.receiver)
        fast_receive(self.receiver.transport)
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
        """aiortc's path (through its DTLS transport's receive task): packets that arrived
        before ``fast_receive`` took over the connection."""
        if self._take(packet, arrival_time_ms):
            await self._send_feedback(packet, arrival_time_ms)

    def receive(self, packet: RtpPacket, arrival_time_ms: int) -> None:
        """``fast_receive``'s path: as ``_handle_rtp``, without a coroutine per packet."""
        if self._take(packet, arrival_time_ms):
            self._tasks.spawn(self._send_feedback(packet, arrival_time_ms))

    def _take(self, packet: RtpPacket, arrival_time_ms: int) -> bool:
        """Forward one packet, then ``_feedback``; True if feedback is due."""
        pt = packet.payload_type
        payload = packet.payload
        seq = packet.sequence_number
        if pt in self._rtx:
            # RFC 4588: a repaired packet; its original sequence number leads the payload.
            if len(payload) < 2:
                self.on_malformed()
                return False
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
        # as aiortc: a disabled receiver counts and reports nothing
        return self.receiver._enabled and self._feedback(packet, arrival_time_ms, seq)

    def _feedback(self, packet: RtpPacket, arrival_time_ms: int, seq: int) -> bool:
        """What aiortc's ``RTCRtpReceiver._handle_rtp_packet`` did that the SFU still needs:
        the statistics its receiver reports are built from (in aiortc's own objects, so its
        RTCP task and ``getStats()`` go on working), the active SSRCs (at most once a second
        per SSRC), the receive rate for the bandwidth estimate and the missing sequence
        numbers (``seq``: a repaired packet's original one). True if a REMB or a NACK is due
        (``_send_feedback``). Not the rest, which only fed the decoder: depayloading, frame
        assembly, decoder errors."""
        stream = self._known.get(packet.ssrc)
        if stream is None:
            stream = self._new_stream(packet)
            if stream is None:
                return False  # a payload type not negotiated: aiortc counts nothing either
        stream.stats.add(packet)
        if arrival_time_ms >= stream.active_due:  # getSynchronizationSources()
            self._active_ssrc[packet.ssrc] = clock.current_datetime()
            stream.active_due = arrival_time_ms + 1000
        due = False
        estimator = self.estimator
        if estimator is not None:
            estimator.octets += len(packet.payload) + packet.padding_size
            estimator.packets += 1
            due = arrival_time_ms >= estimator.due_ms
        nacks = stream.nacks
        if nacks is not None and nacks.add(seq):
            self._nack_due = stream
            due = True
        return due

    def _new_stream(self, packet: RtpPacket) -> _Stream | None:
        """The receive state of an SSRC seen for the first time (None: not negotiated)."""
        codec = self._codecs.get(packet.payload_type)
        if codec is None:
            return None
        ssrc = packet.ssrc
        stats = self._streams.get(ssrc)
        if stats is None:
            stats = self._streams[ssrc] = StreamStatistics(codec.clockRate)
        media_ssrc, nacks = self._tracker(packet)
        stream = self._known[ssrc] = _Stream(stats, media_ssrc, nacks)
        return stream

    def _tracker(self, packet: RtpPacket) -> tuple[int | None, NackTracker | None]:
        """The SSRC a new stream's losses are NACKed for, and its tracker (shared by a media
        SSRC and its RTX SSRC; ``None`` for audio, or RTX of an unknown stream)."""
        pt, ssrc = packet.payload_type, packet.ssrc
        media_ssrc: int | None = ssrc
        if pt in self._rtx_pts:
            media_ssrc = self._rtx_ssrc.get(ssrc)
            if self._rtx.get(pt) not in self._codecs:
                media_ssrc = None
        if not self._video or media_ssrc is None:
            return media_ssrc, None
        media = self._known.get(media_ssrc)
        return media_ssrc, media.nacks if media is not None else NackTracker()

    async def _send_feedback(self, packet: RtpPacket, arrival_time_ms: int) -> None:
        """Send what ``_feedback`` found due: the REMB at the end of the estimator's window
        (through our _send_rtcp, which caps it at the subscribers' estimate), and NACKs."""
        estimator = self.estimator
        if estimator is not None and arrival_time_ms >= estimator.due_ms:
            lost = sum(s.nacks.lost for s in self._known.values() if s.nacks is not None)
            ast = packet.extensions.abs_send_time
            bitrate = estimator.tick(arrival_time_ms, ast, lost)
            rtcp_ssrc = self.receiver._RTCRtpReceiver__rtcp_ssrc  # type: ignore[attr-defined]
            if bitrate is not None and rtcp_ssrc is not None:
                ssrcs = [s for s, st in self._known.items() if st.media_ssrc == s]
                await self._send_rtcp(
                    RtcpPsfbPacket(
                        fmt=RTCP_PSFB_APP,
                        ssrc=rtcp_ssrc,
                        media_ssrc=0,
                        fci=pack_remb_fci(bitrate, ssrcs),
                    )
                )
        stream = self._nack_due
        if stream is not None:
            self._nack_due = None
            assert stream.nacks is not None and stream.media_ssrc is not None
            await self.receiver._send_rtcp_nack(stream.media_ssrc, sorted(stream.nacks.missing))

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
        """What to tell the publisher when its own estimate is ``own``: at most the cap."""
        cap = self.remb_cap
        return own if cap is None else min(own, cap)

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
        self.nacks = NackTracker()


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
                self._known.pop(layer.ssrc, None)
                if layer.rtx_ssrc is not None:  # its RTX stream NACKs for the new tracker
                    self._known.pop(layer.rtx_ssrc, None)
                layer.nacks = NackTracker()
            layer.ssrc = packet.ssrc
        bound = self.bound[packet.ssrc] = (index, rtx)
        return bound

    def _take(self, packet: RtpPacket, arrival_time_ms: int) -> bool:
        bound = self.bound.get(packet.ssrc)
        if bound is None:
            bound = self._bind(packet)
            if bound is None:
                self.on_unrouted()
                return False
        index, rtx = bound
        payload = packet.payload
        seq = packet.sequence_number
        if rtx:
            if len(payload) < 2:
                self.on_malformed()
                return False
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
        return self.receiver._enabled and self._feedback(packet, arrival_time_ms, seq)

    def _tracker(self, packet: RtpPacket) -> tuple[int | None, NackTracker | None]:
        """A layer's SSRC and its tracker, for its RTX SSRC too (``_feedback``'s NACKs name the
        layer's SSRC; aiortc's one generator would take the layers' interleaved sequence
        numbers for losses)."""
        index, rtx = self.bound[packet.ssrc]  # bound by _handle_rtp before this
        layer = self.layers[index]
        if rtx and (layer.ssrc is None or self._rtx.get(packet.payload_type) is None):
            return None, None
        return layer.ssrc, layer.nacks

    async def _handle_rtcp(self, packet: Any) -> None:
        if isinstance(packet, RtcpSrPacket):
            bound = self.bound.get(packet.ssrc)
            if bound is not None and not bound[1]:
                info = packet.sender_info
                self.on_layer_sr(bound[0], info.ntp_timestamp, info.rtp_timestamp)
        await self._orig_rtcp(packet)

    def _wanted(self, own: int) -> int:
        """At least the floor the layers subscribers need take, at most the cap."""
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


async def close_late_sockets(pc: RTCPeerConnection) -> None:
    """Close the ICE sockets that a gathering under way when ``pc`` was closed bound after it:
    aioice's ``Connection.close`` closes the sockets it has at that moment, and the gathering
    adds its own when it ends, which nothing would close."""
    seen: set[int] = set()
    for tr in pc.getTransceivers():
        dtls = tr.sender.transport
        conn = dtls.transport._connection
        if id(conn) in seen:
            continue
        seen.add(id(conn))
        late = list(conn._protocols)
        conn._protocols.clear()
        for protocol in late:
            await protocol.close()


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
