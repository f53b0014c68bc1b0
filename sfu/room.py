"""A room inside an SFU worker: participants' peer connections and the tracks between them.

Each participant has up to two peer connections, as in LiveKit: a *publisher* connection (the
client offers its tracks, the room answers) and a *subscriber* connection (the room offers every
other participant's tracks and renegotiates as they come and go; the client answers). Negotiation
of a subscriber connection is serialized: a change while an offer is out is folded into the next.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

from aiortc import (
    RTCBundlePolicy,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.exceptions import InternalError, InvalidStateError, OperationError
from aiortc.sdp import SessionDescription

from .bandwidth import BandwidthAllocator
from .channel import (
    ForwardingStats,
    RecordStartRequest,
    RenderSize,
    SubscribeOfferEvent,
    TrackInfo,
    TrackMeta,
    WorkerEvent,
)
from .forward import Counters, DownTrack, UpTrack
from .layers import Layer, choose_layer, climb_bps, highest_needed, unseen_wanted
from .munger import LayerMunger
from .recording.manifest import Manifest
from .recording.recorder import MIN_FREE_BYTES, RoomRecorder
from .rtc import (
    FastSender,
    NeverTrack,
    PublisherHooks,
    SenderReports,
    SimulcastHooks,
    SubscriberHooks,
    accept_rid_extensions,
    close_late_sockets,
    dtls_of,
    layout_for,
    negotiated_codec,
    route_by_mid,
    sender_ssrcs,
)
from .rtp import abs_send_time_now
from .simulcast import SimulcastSection, accept_in_answer, read_offer
from .speaker import SpeakerDetector
from .tasks import TaskSet

log = logging.getLogger("rallypoint.sfu.room")

Emit = Callable[[WorkerEvent], None]
SOURCES = ("camera", "microphone", "screen")
RECORDING_ID = re.compile(r"rec_[0-9a-f]{16}")
CODECS = {"vp8": "video/VP8", "h264": "video/H264"}
# The largest render box a client may report (larger ones are taken as this).
MAX_RENDER = 16384
# After a simulcast subscriber is switched up, its REMB lags (it grows ~8 %/s towards 1.5 times
# what arrives) and is not taken as congestion for this long.
REMB_GRACE_S = 5.0
REMB_PERSIST_S = 2.0


def _moved(new: int | None, old: int | None) -> bool:
    """Whether a REMB bound changed enough (10 %) to tell the publisher."""
    if new is None or old is None:
        return new != old
    return abs(new - old) > new // 10


class MediaError(Exception):
    """A media request the room refuses; carries a signaling error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _preferences(kind: str, video_codec: str) -> list[Any]:
    caps = RTCRtpSender.getCapabilities(kind).codecs
    if kind == "audio":
        return [c for c in caps if c.mimeType.lower() == "audio/opus"]
    want = CODECS[video_codec].lower()
    chosen = [c for c in caps if c.mimeType.lower() == want]
    if video_codec == "h264":  # constrained baseline, packetization mode 1 only
        chosen = [
            c
            for c in chosen
            if c.parameters.get("packetization-mode") == "1"
            and str(c.parameters.get("profile-level-id", "")).startswith("42e0")
        ]
    return chosen + [c for c in caps if c.mimeType.lower() == "video/rtx"]


def _config() -> RTCConfiguration:
    return RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)


@dataclass(frozen=True)
class Failure:
    """Why a peer connection went to "failed" or "closed" (``failure_reason``)."""

    failed: bool  # a failure (else the client closed it)
    reason: str


def failure_reason(pc: RTCPeerConnection, connected: bool) -> Failure:
    """Why ``pc`` failed or closed, from its ICE and DTLS transports' states as its state
    changes (aiortc says no more); ``connected``: it had been connected. Called once per
    connection, off the media path."""
    dtls = {tr.receiver.transport for tr in pc.getTransceivers()}
    ice = {d.transport.state for d in dtls}
    if "failed" in ice:
        if connected:
            # aioice closes a connected ICE connection by itself only when consent expires
            # (RFC 7675): its checks, one try of 0.5 s every ~5 s, went unanswered 6 times
            # in a row. An answer this worker reads late, or drops on a full socket, counts
            # as none.
            return Failure(
                True,
                "ICE consent expired (6 checks in a row unanswered in time: the client is "
                "gone or unreachable, or this worker is too busy to read the answers)",
            )
        return Failure(True, "ICE connectivity checks failed")
    if "failed" in {d.state for d in dtls}:
        return Failure(True, "DTLS failed" if connected else "DTLS handshake failed")
    if pc.connectionState == "failed":
        return Failure(True, "unknown")
    return Failure(False, "closed by the client (DTLS close_notify)")


@dataclass
class Participant:
    id: str
    subscribe: bool = True
    identity: str = ""
    name: str = ""
    pub: RTCPeerConnection | None = None
    sub: RTCPeerConnection | None = None
    hooks: dict[str, PublisherHooks] = field(default_factory=dict)  # by publisher-side mid
    published: dict[str, UpTrack] = field(default_factory=dict)  # by publisher-side mid
    transceivers: dict[str, RTCRtpTransceiver] = field(default_factory=dict)  # by track id
    downtracks: dict[str, DownTrack] = field(default_factory=dict)  # by track id
    fast: FastSender | None = None  # the subscriber connection's sending path
    reports: SenderReports | None = None  # and its senders' RTCP sender reports
    offer: SubscribeOfferEvent | None = None  # the subscriber offer waiting for an answer
    offers: int = 0  # subscriber offers made so far (each offer's number)
    negotiating: bool = False
    pending: bool = False


class Room:
    """One room of one worker."""

    def __init__(self, name: str, emit: Emit, counters: Counters, video_codec: str = "vp8") -> None:
        self.name = name
        self.emit = emit
        self.counters = counters
        self.video_codec = video_codec
        self.participants: dict[str, Participant] = {}
        self.tracks: dict[str, UpTrack] = {}
        self.allocators: dict[str, BandwidthAllocator] = {}
        self.speaker = SpeakerDetector()
        self.recorder: RoomRecorder | None = None
        self.simulcast_hooks: dict[str, SimulcastHooks] = {}  # by track id
        self.last_tick: float | None = None
        self._tasks = TaskSet(self._failed)

    # -- helpers -------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a coroutine the room owns (cancelled at close; failures are logged)."""
        self._tasks.spawn(coro)

    def _failed(self, exc: BaseException) -> None:
        log.error("room %s task failed", self.name, exc_info=exc)

    def _send_dropped(self) -> None:
        self.counters.dropped_send += 1

    def _drop_downtracks(self, p: Participant) -> None:
        """Stop forwarding every track to ``p`` (it left, or its subscriber connection died)."""
        for tid in p.downtracks:
            up = self.tracks.get(tid)
            if up is not None:
                up.downtracks.pop(p.id, None)
                alloc = self.allocators.get(tid)
                if alloc is not None:
                    alloc.remove(p.id)

    def participant(self, pid: str) -> Participant:
        p = self.participants.get(pid)
        if p is None:
            raise MediaError("not_in_room", "join the room before sending media")
        return p

    def track_list(self) -> list[TrackInfo]:
        return [t.info() for t in self.tracks.values()]

    # -- membership ----------------------------------------------------------------------------

    def join(
        self, pid: str, subscribe: bool, identity: str = "", name: str = ""
    ) -> list[TrackInfo]:
        p = self.participants.get(pid)
        if p is None:
            p = self.participants[pid] = Participant(pid, subscribe, identity, name)
        if subscribe and any(t.publisher != pid for t in self.tracks.values()):
            self._spawn(self._renegotiate(p))
        return self.track_list()

    async def leave(self, pid: str, reason: str = "left") -> None:
        p = self.participants.pop(pid, None)
        if p is None:
            return
        for mine in list(p.published.values()):
            self._unpublish(mine)
        self._drop_downtracks(p)
        self.speaker.remove(pid)
        for pc in (p.pub, p.sub):
            if pc is not None:
                await pc.close()  # stops the senders: their BYEs go out through p.fast
        if p.fast is not None:
            p.fast.close()
            p.fast = p.reports = None

    async def close(self) -> None:
        for pid in list(self.participants):
            await self.leave(pid)
        rec = self.recorder
        if rec is not None:
            self.recorder = None
            if rec.active:
                reason = await rec.stop("room_closed")
                self.emit(
                    {
                        "ev": "recording_stopped",
                        "room": self.name,
                        "recording": rec.id,
                        "reason": "room_closed" if reason == "room_closed" else "error",
                    }
                )
        await self._tasks.cancel()

    # -- recording -----------------------------------------------------------------------------

    async def start_recording(
        self, req: RecordStartRequest, *, min_free: int = MIN_FREE_BYTES
    ) -> None:
        """Start recording every (selected) track, present and to come (docs/RECORDING.md);
        it stops when less than ``min_free`` bytes are free on its disk."""
        if self.recorder is not None:
            raise MediaError("already_recording", f"room {self.name!r} is being recorded")
        directory = req["directory"]
        if not os.path.isabs(directory):
            raise MediaError("bad_field", "the recording directory must be an absolute path")
        if not RECORDING_ID.fullmatch(req["recording"]):
            raise MediaError("bad_field", "a recording id is rec_ and 16 lowercase hex digits")
        if req["max_bytes"] <= 0:
            raise MediaError("bad_field", "max_bytes must be positive")
        manifest = Manifest(
            req["recording"],
            self.name,
            directory,
            by=req["by"],
            audio_only=req["audio_only"],
            identities=req["identities"],
        )
        rec = RoomRecorder(
            manifest,
            max_bytes=req["max_bytes"],
            loop=asyncio.get_running_loop(),
            stopped_by_itself=lambda reason: self._recording_stopped(rec, reason),
            min_free=min_free,
        )
        self.recorder = rec
        if not await rec.wait_ready():
            if self.recorder is rec:
                self.recorder = None
            raise MediaError("recording_unavailable", "the recording directory cannot be written")
        for up in self.tracks.values():
            self._record(up)

    async def stop_recording(self) -> str:
        """Stop the recording; returns its id once the final manifest is written."""
        rec = self.recorder
        if rec is None:
            raise MediaError("not_recording", f"room {self.name!r} is not being recorded")
        self.recorder = None
        await rec.stop("stopped")
        return rec.id

    def _record(self, up: UpTrack) -> None:
        rec = self.recorder
        p = self.participants.get(up.publisher)
        if rec is not None and p is not None and rec.wants(up.kind, p.identity):
            if up.simulcast:  # the recording gets the highest layer, through a switcher
                up.tap_munger = LayerMunger(up.codec, up.layers)
                up.tap_munger.set_target(up.layers - 1)
            rec.attach(up, p.identity, p.name)

    def _recording_stopped(self, rec: RoomRecorder, reason: str) -> None:
        """The recording's writer thread stopped by itself (a limit, the disk, an error)."""
        if self.recorder is rec:
            self.recorder = None
        why: Literal["disk_full", "size_limit", "error"] = (
            "disk_full"
            if reason == "disk_full"
            else "size_limit"
            if reason == "size_limit"
            else "error"
        )
        self.emit(
            {"ev": "recording_stopped", "room": self.name, "recording": rec.id, "reason": why}
        )

    # -- publishing ----------------------------------------------------------------------------

    async def publish(self, pid: str, sdp: str, meta: list[TrackMeta]) -> str:
        """Answer a publisher's offer; new tracks are offered to everyone else."""
        p = self.participant(pid)
        try:
            offer = SessionDescription.parse(sdp)
        except Exception:
            raise MediaError("bad_sdp", "the offer is not valid SDP") from None
        if not offer.media:
            raise MediaError("bad_sdp", "the offer has no media sections")
        simulcast = read_offer(sdp)
        if p.pub is None:
            p.pub = self._connection(pid, "publisher")
        pc = p.pub
        known = {t.mid for t in pc.getTransceivers()}
        for media in offer.media:
            if media.kind in ("audio", "video") and media.rtp.muxId not in known:
                tr = pc.addTransceiver(media.kind, direction="recvonly")
                tr.setCodecPreferences(_preferences(media.kind, self.video_codec))
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            for tr in pc.getTransceivers():
                section = simulcast.get(tr.mid or "")
                if section is not None and tr.kind == "video":
                    accept_rid_extensions(tr, section)
                    route_by_mid(tr)
            await pc.setLocalDescription(await pc.createAnswer())
        except OperationError:
            raise MediaError(
                "no_usable_codec",
                f"the offer has no codec this room uses (Opus and {self.video_codec.upper()})",
            ) from None
        except (ValueError, InternalError, InvalidStateError) as e:
            raise MediaError("bad_sdp", f"the offer was refused: {e}") from None
        sources = {m.get("mid"): m.get("source") for m in meta}
        directions = {m.rtp.muxId: m.direction for m in offer.media}
        for tr in pc.getTransceivers():
            mid = tr.mid
            if mid is None:
                continue
            sending = directions.get(mid) in ("sendonly", "sendrecv")
            if sending and mid not in p.published:
                section = simulcast.get(mid) if tr.kind == "video" else None
                self._add_uptrack(p, tr, sources.get(mid), section)
            elif not sending and mid in p.published:
                self._unpublish(p.published[mid])
        assert pc.localDescription is not None
        return accept_in_answer(pc.localDescription.sdp, simulcast)

    def _add_uptrack(
        self,
        p: Participant,
        tr: RTCRtpTransceiver,
        source: str | None,
        section: SimulcastSection | None = None,
    ) -> None:
        kind = tr.kind
        assert tr.mid is not None
        codec, _, _ = negotiated_codec(tr)
        if source not in SOURCES:
            source = "microphone" if kind == "audio" else "camera"
        tid = f"{p.id}:{tr.mid}"
        hooks_box: list[PublisherHooks] = []

        def request_keyframe() -> None:
            if hooks_box:
                self._spawn(hooks_box[0].request_keyframe())

        layers = len(section.rids) if section is not None else 1
        up = UpTrack(tid, p.id, kind, source, codec, request_keyframe, self.counters, layers=layers)
        if kind == "audio":
            up.on_level = self.speaker.add

        def malformed() -> None:
            self.counters.dropped_malformed += 1

        hooks: PublisherHooks
        if section is not None:

            def unrouted() -> None:
                self.counters.dropped_no_route += 1

            sim = SimulcastHooks(
                tr.receiver,
                section.rids,
                up.forward_layer,
                up.layer_sender_report,
                malformed,
                unrouted,
            )

            def request_layer_keyframe(layer: int) -> None:
                self._spawn(sim.request_layer_keyframe(layer))

            up.request_layer_keyframe = request_layer_keyframe
            self.simulcast_hooks[tid] = sim
            hooks = sim
        else:
            hooks = PublisherHooks(tr.receiver, up.forward, up.sender_report, malformed)
        hooks_box.append(hooks)
        p.hooks[tr.mid] = hooks
        p.published[tr.mid] = up
        self.tracks[tid] = up
        if kind == "video" and not up.simulcast:
            self.allocators[tid] = BandwidthAllocator()
        self._record(up)
        self.emit({"ev": "track_published", "room": self.name, "track": up.info()})
        for other in self.participants.values():
            if other.id != p.id and other.subscribe:
                self._spawn(self._renegotiate(other))

    def _unpublish(self, up: UpTrack) -> None:
        if self.recorder is not None:
            self.recorder.detach(up)
        self.tracks.pop(up.id, None)
        self.allocators.pop(up.id, None)
        self.simulcast_hooks.pop(up.id, None)
        owner = self.participants.get(up.publisher)
        if owner is not None:
            for mid, t in list(owner.published.items()):
                if t is up:
                    del owner.published[mid]
        up.downtracks.clear()
        self.emit(
            {
                "ev": "track_unpublished",
                "room": self.name,
                "track": up.id,
                "participant": up.publisher,
            }
        )
        for other in self.participants.values():
            offer = other.offer
            if offer is not None and any(t["id"] == up.id for t in offer["tracks"]):
                # The offer waiting for an answer is sent again as it is on `subscribe`: its
                # SDP cannot change (the track's section goes inactive in the next offer,
                # made once it is answered), but it no longer names the track.
                other.offer = {
                    "ev": "subscribe_offer",
                    "room": offer["room"],
                    "participant": offer["participant"],
                    "sdp": offer["sdp"],
                    "tracks": [t for t in offer["tracks"] if t["id"] != up.id],
                    "offer": offer["offer"],
                }
            if up.id in other.transceivers:
                other.downtracks.pop(up.id, None)
                self._spawn(self._renegotiate(other))

    def unpublish(self, pid: str, tid: str) -> None:
        up = self.tracks.get(tid)
        if up is None or up.publisher != pid:
            raise MediaError("no_such_track", f"you publish no track {tid!r}")
        self._unpublish(up)

    def mute(self, pid: str, tid: str, muted: bool) -> None:
        up = self.tracks.get(tid)
        if up is None or up.publisher != pid:
            raise MediaError("no_such_track", f"you publish no track {tid!r}")
        if up.muted != muted:
            up.muted = muted
            self.emit({"ev": "track_updated", "room": self.name, "track": up.info()})

    # -- subscribing ---------------------------------------------------------------------------

    async def _renegotiate(self, p: Participant) -> None:
        log.debug("renegotiate %s negotiating=%s", p.id, p.negotiating)
        if p.negotiating:
            p.pending = True
            return
        if self.participants.get(p.id) is not p:
            return  # it left (and may have joined again: another Participant, its own offers)
        wanted = {tid for tid, up in self.tracks.items() if up.publisher != p.id}
        if p.sub is not None and wanted == p.transceivers.keys():
            return  # nothing changed since the last (answered) offer
        if p.sub is not None and p.sub.connectionState == "closed":
            # The client closed it and _transport_failed, on its way, makes a new one and
            # offers that (adding a transceiver to a closed connection raises).
            return
        p.negotiating = True
        p.pending = False
        if p.sub is None:
            p.sub = self._connection(p.id, "subscriber", lambda: self._request_waiting_keyframes(p))
        pc = p.sub
        for tid in sorted(wanted - p.transceivers.keys()):
            up = self.tracks[tid]
            tr = pc.addTransceiver(NeverTrack(up.kind), direction="sendonly")
            tr.setCodecPreferences(_preferences(up.kind, self.video_codec))
            p.transceivers[tid] = tr
            if p.fast is None or p.reports is None:
                p.fast = FastSender(dtls_of(tr), self._send_dropped)
                p.reports = SenderReports(p.fast.send_rtcp)
            p.reports.attach(tr.sender)  # before its send() (after the answer) starts it
        for tid in list(p.transceivers.keys() - wanted):
            # m-lines are never recycled: a removed track's transceiver goes inactive.
            p.transceivers.pop(tid).direction = "inactive"
        p.offer = None
        try:
            await pc.setLocalDescription(await pc.createOffer())
        except InvalidStateError:  # closed meanwhile: the participant left or failed
            p.negotiating = False
            await close_late_sockets(pc)
            return
        assert pc.localDescription is not None
        if self.participants.get(p.id) is not p:
            # It left while the offer was made. An offer of a participant that left must not
            # go out: its id may be in the room again (a session that moved to another node
            # and joined from there), whose client would take this offer for its own.
            p.negotiating = False
            await pc.close()
            await close_late_sockets(pc)
            return
        tracks: list[TrackInfo] = []
        for tid, tr in p.transceivers.items():
            if tid in self.tracks:
                info = self.tracks[tid].info()
                info["mid"] = tr.mid or ""
                tracks.append(info)
        p.offers += 1
        self.counters.subscribe_offers += 1
        p.offer = {
            "ev": "subscribe_offer",
            "room": self.name,
            "participant": p.id,
            "sdp": pc.localDescription.sdp,
            "tracks": tracks,
            "offer": p.offers,
        }
        self.emit(p.offer)

    async def resubscribe(self, pid: str) -> None:
        """The client is ready to receive: send the pending offer again, or a new one."""
        p = self.participant(pid)
        if p.negotiating:
            if p.offer is not None:  # else the offer being made now will be sent
                self.emit(p.offer)
        elif p.subscribe and any(t.publisher != pid for t in self.tracks.values()):
            await self._renegotiate(p)

    async def subscribe_answer(self, pid: str, sdp: str) -> None:
        p = self.participant(pid)
        if p.sub is None or not p.negotiating:
            raise MediaError("bad_sdp", "no subscriber offer is waiting for an answer")
        try:
            parsed = SessionDescription.parse(sdp)
        except Exception:
            raise MediaError("bad_sdp", "the answer is not valid SDP") from None
        if len(parsed.media) != len(p.sub.getTransceivers()):
            raise MediaError("bad_sdp", "the answer's media sections do not match the offer")
        try:
            await p.sub.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
        except (ValueError, OperationError, InternalError, InvalidStateError) as e:
            raise MediaError("bad_sdp", f"the answer was refused: {e}") from None
        log.debug("answer from %s pending=%s", p.id, p.pending)
        now = time.monotonic()
        for tid, tr in p.transceivers.items():
            up = self.tracks.get(tid)
            if up is None or tid in p.downtracks:
                continue
            self._add_downtrack(p, up, tr, now)
        p.negotiating = False
        p.offer = None
        if p.pending:
            self._spawn(self._renegotiate(p))

    def _add_downtrack(
        self, p: Participant, up: UpTrack, tr: RTCRtpTransceiver, now: float
    ) -> None:
        assert p.fast is not None  # made with the connection's first transceiver
        _, pt, rtx_pt = negotiated_codec(tr)
        ssrc, rtx_ssrc = sender_ssrcs(tr.sender)
        allocator = self.allocators.get(up.id)
        hooks_box: list[SubscriberHooks] = []

        def set_sr(ntp: int, rtp_ts: int, packets: int, octets: int) -> None:
            hooks_box[0].set_sender_report(ntp, rtp_ts, packets, octets)

        dt = DownTrack(
            p.id,
            up.kind,
            ssrc,
            pt,
            layout_for(tr),
            p.fast.send,
            rtx_ssrc=rtx_ssrc if rtx_pt is not None else None,
            rtx_pt=rtx_pt,
            set_sender_report=set_sr,
            send_rtp=p.fast.send_rtp,
        )
        publisher = self.participants.get(up.publisher)
        pub_hooks = None
        if publisher is not None:
            for mid, t in publisher.published.items():
                if t is up:
                    pub_hooks = publisher.hooks.get(mid)

        if up.simulcast:
            self._add_simulcast_downtrack(p, up, tr, dt)
            return

        def on_nack(lost: list[int]) -> None:
            missing = up.retransmit(dt, lost, abs_send_time_now(), time.monotonic())
            if missing and pub_hooks is not None:
                self._spawn(pub_hooks.nack(missing))

        def on_keyframe() -> None:
            up.want_keyframe(time.monotonic())

        def on_remb(bps: int) -> None:
            if allocator is None:
                return
            change = allocator.report(p.id, bps)
            if change is True:
                dt.starved = True
                self.emit(
                    {
                        "ev": "track_starved",
                        "room": self.name,
                        "participant": p.id,
                        "track": up.id,
                        "starved": True,
                    }
                )
            elif change is False:
                dt.starved = False
                dt.waiting = True
                up.want_keyframe(time.monotonic())
                self.emit(
                    {
                        "ev": "track_starved",
                        "room": self.name,
                        "participant": p.id,
                        "track": up.id,
                        "starved": False,
                    }
                )
            target = allocator.target()
            if (
                target is not None
                and pub_hooks is not None
                and (pub_hooks.remb_cap is None or abs(target - pub_hooks.remb_cap) > 0.1 * target)
            ):
                self._spawn(pub_hooks.send_remb(target))

        hooks_box.append(SubscriberHooks(tr.sender, on_nack, on_keyframe, on_remb))
        p.downtracks[up.id] = dt
        if p.fast.ready:
            self._start_downtrack(p, up, dt, now)
        elif up.kind == "video":
            # Asked now, the keyframe is in the track's cache by the time the connection is
            # up (DTLS takes longer than a frame), and is replayed from there.
            up.want_keyframe(now)

    def _start_downtrack(self, p: Participant, up: UpTrack, dt: DownTrack, now: float) -> None:
        """Forward ``up`` to ``p`` from now on (its connection is up): video from a recent
        cached keyframe at once, else from the next keyframe, asked for."""
        up.downtracks[p.id] = dt
        if up.kind == "video" and not up.replay_keyframe(dt, abs_send_time_now()):
            up.want_keyframe(now)

    def _add_simulcast_downtrack(
        self, p: Participant, up: UpTrack, tr: RTCRtpTransceiver, dt: DownTrack
    ) -> None:
        """A subscriber's copy of a simulcast track: its layer is chosen at each tick."""
        up.make_simulcast(dt)
        munger, rate = dt.munger, dt.rate
        assert munger is not None and rate is not None

        def on_nack(lost: list[int]) -> None:
            up.retransmit_sent(dt, lost, abs_send_time_now(), time.monotonic())

        def on_keyframe() -> None:
            layer = munger.current if munger.current is not None else munger.target
            if layer is not None:
                up.want_layer_keyframe(layer, time.monotonic())

        def on_remb(bps: int) -> None:
            # A REMB is a congestion signal, not a bound (see RateController.congested): REMBs
            # well below what the subscriber is sent for REMB_PERSIST_S (a receiver's estimate
            # dips for a moment when its host is busy), outside the few seconds after a
            # switch up in which the receiver's estimate catches up, bring the estimate down
            # (at most to what the next layer down needs; the lowest layer's subscriber
            # starves only if it lasts another REMB_PERSIST_S).
            now = time.monotonic()
            if now - dt.switched_up_at <= REMB_GRACE_S or 4 * bps >= 3 * dt.sent_bps:
                dt.remb_low_since = None
                return
            if dt.remb_low_since is None:
                dt.remb_low_since = now
            elif now - dt.remb_low_since >= REMB_PERSIST_S:
                # One layer down per REMB_PERSIST_S: a busy receiver host makes every estimate
                # dip at once, and a dip should not starve a subscriber in one step.
                below = 0
                current = munger.current
                if current is not None and current > 0:
                    below = -(-up.layer_bps[current - 1] * 8 // 7)
                log.debug("%s: %s congested (REMB %d, sent %d)", up.id, p.id, bps, dt.sent_bps)
                rate.congested(now, max(bps, below))
                dt.remb_low_since = now

        def on_loss(fraction_lost: int) -> None:
            dt.loss = fraction_lost
            layers = self._layers(up)
            rate.report_loss(
                time.monotonic(),
                fraction_lost,
                dt.sent_bps,
                climb_bps(layers, munger.current, dt.render),
            )

        hooks = SubscriberHooks(tr.sender, on_nack, on_keyframe, on_remb, on_loss)
        dt.set_sender_report = hooks.set_sender_report
        p.downtracks[up.id] = dt
        up.downtracks[p.id] = dt
        self._choose_layer(p, up, dt, time.monotonic())

    @staticmethod
    def _layers(up: UpTrack, rates: list[int] | None = None) -> list[Layer]:
        """The track's layers as ``sfu.layers`` takes them: each one's picture size (from its
        keyframes) and rate (``rates``, else the measured ones)."""
        return [
            Layer(w, h, bps)
            for (w, h), bps in zip(up.layer_sizes, rates or up.layer_bps, strict=True)
        ]

    def _choose_layer(self, p: Participant, up: UpTrack, dt: DownTrack, now: float) -> None:
        """Pick a simulcast subscriber's layer from its budget (docs/SFU.md, Simulcast)."""
        munger, rate = dt.munger, dt.rate
        assert munger is not None and rate is not None
        if dt.paused or p.fast is None or not p.fast.ready:
            # Paused, or its connection is not up yet: the first packets of a keyframe switched
            # to now would go nowhere, and the receiver would start from a broken keyframe.
            munger.set_target(None)
            return
        layers = self._layers(up)
        if not any(layer.bps for layer in layers):
            # Nothing measured yet (the track just started): start on the lowest layer.
            if munger.target is None and not dt.starved:
                munger.set_target(0)
        else:
            choice = choose_layer(layers, munger.current, rate.estimate, dt.render)
            if choice.starved != dt.starved:
                dt.starved = choice.starved
                self.emit(
                    {
                        "ev": "track_starved",
                        "room": self.name,
                        "participant": p.id,
                        "track": up.id,
                        "starved": choice.starved,
                    }
                )
            if choice.layer != munger.target:
                log.debug(
                    "%s: %s gets layer %s (budget %d, sent %d; layers %s, loss %d)",
                    up.id,
                    p.id,
                    choice.layer,
                    rate.estimate,
                    dt.sent_bps,
                    [layer.bps for layer in layers],
                    dt.loss,
                )
                if choice.layer is not None and (
                    munger.current is None or choice.layer > munger.current
                ):
                    dt.switched_up_at = now
                munger.set_target(choice.layer)
        want = munger.want_keyframe
        if want is not None and p.fast is not None and p.fast.ready:
            up.want_layer_keyframe(want, now)

    def _tick_simulcast(self, up: UpTrack, elapsed: float, now: float) -> None:
        up.measure(elapsed)
        for pid, dt in up.downtracks.items():
            p = self.participants.get(pid)
            if p is not None:
                self._choose_layer(p, up, dt, now)
        m = up.tap_munger
        if m is not None and up.tap is not None:
            top = max((i for i, bps in enumerate(up.layer_bps) if bps > 0), default=None)
            if top is not None and m.target != top:
                m.set_target(top)
            if m.want_keyframe is not None:
                up.want_layer_keyframe(m.want_keyframe, now)
        hooks = self.simulcast_hooks.get(up.id)
        if hooks is None:
            return
        # The publisher is asked for the highest layer anyone needs: at least 3/2 of what the
        # layers up to it take, even when it has stopped sending that layer (a subscriber's
        # wish is chosen from the rates last seen), so that it can ramp up to its encodings'
        # own limits (its loss-based estimate still guards its uplink; aiortc's delay-based
        # estimate of this link dips whenever this host is busy); and at most that plus one
        # more layer, so that a subscriber can still climb to a layer being sent.
        # A layer never received is asked for when a subscriber on the highest one received
        # shows the track larger than that (see ``unseen_wanted``).
        known = up.layer_known_bps
        seen = self._layers(up, known)
        subscribers = [
            (dt.munger, dt.rate, dt.render)
            for dt in up.downtracks.values()
            if dt.munger is not None and dt.rate is not None and not dt.paused
        ]
        needed = highest_needed(
            choose_layer(seen, m.current, r.estimate, box).layer for m, r, box in subscribers
        )
        unseen = max((unseen_wanted(seen, m.current, box) for m, _, box in subscribers), default=0)
        floor: int | None = None
        cap: int | None = None
        if needed is not None:
            floor = (sum(known[: needed + 1]) + unseen) * 3 // 2
            if needed + 2 < up.layers and all(known[: needed + 2]):
                cap = sum(known[: needed + 2]) * 5 // 4
        if _moved(floor, hooks.remb_floor) or _moved(cap, hooks.remb_cap):
            self._spawn(hooks.send_layer_remb(floor, cap))

    def _request_waiting_keyframes(self, p: Participant) -> None:
        """The subscriber connection is up: start the tracks waiting for it."""
        now = time.monotonic()
        ready = p.fast is not None and p.fast.ready
        for tid, dt in p.downtracks.items():
            up = self.tracks.get(tid)
            if up is None:
                continue
            if up.downtracks.get(p.id) is not dt:
                if ready:
                    self._start_downtrack(p, up, dt, now)
            elif up.kind != "video":
                continue
            elif dt.munger is not None:
                self._choose_layer(p, up, dt, now)  # a layer now, and its keyframe asked for
            elif dt.waiting:
                up.want_keyframe(now)

    def _received(self, p: Participant, tid: str) -> tuple[DownTrack, UpTrack]:
        dt = p.downtracks.get(tid)
        up = self.tracks.get(tid)
        if dt is None or up is None:
            raise MediaError("no_such_track", f"you receive no track {tid!r}")
        return dt, up

    def pause(self, pid: str, tid: str, paused: bool) -> None:
        p = self.participant(pid)
        dt, up = self._received(p, tid)
        dt.asked_pause = paused
        self._update_forwarding(p, up, dt)

    def render(self, pid: str, sizes: list[RenderSize]) -> None:
        """The subscriber shows these tracks in boxes of these sizes (device pixels; 0 x 0:
        not shown). Every track is checked before any is changed. A hidden video is not
        forwarded; a shown simulcast video gets the smallest layer that fills its box (within
        its bandwidth); a single-stream video is forwarded whatever the size; audio is never
        affected."""
        p = self.participant(pid)
        found = [(self._received(p, s["track"]), s) for s in sizes]
        for (dt, up), s in found:
            if up.kind != "video":
                continue
            w, h = s["width"], s["height"]
            dt.render = (0, 0) if w <= 0 or h <= 0 else (min(w, MAX_RENDER), min(h, MAX_RENDER))
            self._update_forwarding(p, up, dt)

    def _update_forwarding(self, p: Participant, up: UpTrack, dt: DownTrack) -> None:
        """Apply a change of ``track_pause`` or of the render box: pausing stops at once (no
        keyframe asked); resuming starts at a keyframe, asked for (of the chosen layer)."""
        paused = dt.asked_pause or dt.hidden
        changed = paused != dt.paused
        dt.paused = paused
        now = time.monotonic()
        if dt.munger is not None:
            self._choose_layer(p, up, dt, now)  # a new box may mean another layer
        elif changed and not paused and up.kind == "video":
            dt.waiting = True  # restart at a keyframe
            up.want_keyframe(now)

    def forwarding(self) -> list[ForwardingStats]:
        """What each subscriber is sent of each track (the ``room_stats`` op)."""
        out: list[ForwardingStats] = []
        for p in self.participants.values():
            for tid, dt in p.downtracks.items():
                m = dt.munger
                out.append(
                    {
                        "participant": p.id,
                        "track": tid,
                        "kind": dt.kind,
                        "packets": dt.packets,
                        "octets": dt.octets,
                        "paused": dt.paused,
                        "starved": dt.starved,
                        "render": [dt.render[0], dt.render[1]],
                        "layer": m.current if m is not None else None,
                        "target": m.target if m is not None else None,
                    }
                )
        return out

    def layer_sizes(self) -> dict[str, list[list[int]]]:
        """Each simulcast track's layers' picture sizes, lowest first ((0, 0): not known)."""
        return {
            tid: [[w, h] for w, h in up.layer_sizes]
            for tid, up in self.tracks.items()
            if up.simulcast
        }

    def _connection(
        self,
        pid: str,
        which: Literal["publisher", "subscriber"],
        on_connected: Callable[[], None] | None = None,
    ) -> RTCPeerConnection:
        """A new peer connection of ``pid``'s, watched: ``on_connected`` once it connects, and
        ``_transport_failed`` (with why) when it fails or the client closes it."""
        pc = RTCPeerConnection(_config())
        connected = False

        @pc.on("connectionstatechange")
        def _state() -> None:
            nonlocal connected
            if pc.connectionState == "connected":
                connected = True
                if on_connected is not None:
                    on_connected()
            elif pc.connectionState in ("failed", "closed"):
                why = failure_reason(pc, connected)
                self._spawn(self._transport_failed(pid, which, why))

        return pc

    async def _transport_failed(
        self, pid: str, which: Literal["publisher", "subscriber"], why: Failure
    ) -> None:
        """A connection failed or the client closed it: drop what went over it. A new
        subscriber connection is offered at once (the client may still be there); a publisher
        publishes again when it wants. Logged (a failure at warning: operators need it)."""
        p = self.participants.get(pid)
        if p is None:
            return
        pc = p.pub if which == "publisher" else p.sub
        if pc is None or pc.connectionState not in ("failed", "closed"):
            return
        log.log(
            logging.WARNING if why.failed else logging.INFO,
            "room %s: participant %s (%s): %s connection %s: %s",
            self.name,
            pid,
            p.identity or p.name or "-",
            which,
            "failed" if why.failed else "closed",
            why.reason,
        )
        self.emit({"ev": "media_failed", "room": self.name, "participant": pid, "which": which})
        if which == "publisher":
            for mine in list(p.published.values()):
                self._unpublish(mine)
            p.hooks.clear()
            p.pub = None
        else:
            self._drop_downtracks(p)
            p.downtracks.clear()
            p.transceivers.clear()
            if p.fast is not None:
                p.fast.close()
                p.fast = p.reports = None
            p.sub = None
            p.negotiating = p.pending = False
            p.offer = None
        await pc.close()
        if which == "subscriber" and p.subscribe and self.participants.get(pid) is p:
            await self._renegotiate(p)

    # -- periodic ------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Every ~250 ms: the recording's batch, active speaker, and keyframes for subscribers
        still waiting."""
        if self.recorder is not None:
            self.recorder.flush()
        order = self.speaker.tick(now)
        if order is not None:
            self.emit({"ev": "active_speaker", "room": self.name, "speakers": order})
        elapsed = now - self.last_tick if self.last_tick is not None else 0.0
        self.last_tick = now
        for track in self.tracks.values():
            if track.simulcast:
                self._tick_simulcast(track, elapsed, now)
        for p in self.participants.values():
            if p.fast is not None and p.fast.ready:
                for tid, dt in p.downtracks.items():
                    up = self.tracks.get(tid)
                    if up is not None and up.downtracks.get(p.id) is not dt:
                        self._start_downtrack(p, up, dt, now)  # ready after the state event
                    elif (
                        dt.waiting
                        and up is not None
                        and up.kind == "video"
                        and dt.active
                        and dt.munger is None
                    ):
                        up.want_keyframe(now)
