"""A participant's media through the SFU, for aiortc clients (tests, benchmarks, bots).

``SfuSession`` drives the two peer connections of the protocol (docs/PROTOCOL.md, "Media"):
it publishes tracks with `publish` (client offers, server answers) and answers every
`subscribe_offer`, counting decoded frames of each received track with a ``FrameCounter``
(or, with ``decode=False``, only counting packets). Its answers are compacted
(``signaling.sdk.sdp.compact_answer``) so that they fit the protocol's limits in large rooms.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import av
from aiortc import (
    RTCBundlePolicy,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamTrack

from sfu.tasks import TaskSet
from signaling.sdk import RallypointClient
from signaling.sdk.sdp import compact_answer
from signaling.sdk.simulcast import (
    Simulcast,
    SimulcastSender,
    encoded_layers,
    layer_specs,
    offer_simulcast,
)
from signaling.sdk.wsclient import Client

from .receiver import FrameCounter
from .relay import UdpRelay
from .rtx import route_rtx_by_ssrc

log = logging.getLogger("rallypoint.media.session")


def _config() -> RTCConfiguration:
    return RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)


class SfuSession:
    """One client's publisher and subscriber connections in one room."""

    def __init__(
        self,
        client: Client | RallypointClient,
        room: str,
        *,
        decode: bool = True,
        on_track: Callable[[str, Any], None] | None = None,
        relay: UdpRelay | None = None,
    ) -> None:
        self.client = client
        self.room = room
        self.decode = decode
        self.on_track = on_track
        self.relay = relay
        """The subscriber connection goes through this relay (its candidates rewritten)."""
        self.pub: RTCPeerConnection | None = None
        self.sub: RTCPeerConnection | None = None
        # Track id -> info: the tracks of the last offer answered, less those unpublished
        # since (they leave the next offer). ``seen``: every track ever offered.
        self.tracks: dict[str, dict[str, Any]] = {}
        self.seen: dict[str, dict[str, Any]] = {}
        self._gone: set[str] = set()  # unpublished (until published again: same id)
        self.mid_track: dict[str, str] = {}  # subscriber mid -> track id
        self.counters: dict[str, FrameCounter] = {}  # track id -> counter
        self.offers = 0
        self.errors: list[dict[str, Any]] = []
        self._tasks = TaskSet()
        self._lock = asyncio.Lock()
        self._routed: set[int] = set()  # transceivers whose RTX is routed by SSRC
        self._drops: set[asyncio.Future[None]] = set()  # subscriber connections being dropped
        self._answered = 0  # number of the last subscriber offer answered
        self.simulcast: dict[str, SimulcastSender] = {}  # publisher mid -> its layers' senders
        client.listeners.append(self._on_event)
        # Tell the server we are ready: offers sent before this session existed were missed.
        self._tasks.spawn(self._ready())

    async def _ready(self) -> None:
        try:
            await self.client.request({"type": "subscribe", "room": self.room}, timeout=20)
        except Exception as e:  # recorded for the test to assert on
            self.errors.append({"error": repr(e)})

    # -- publishing ----------------------------------------------------------------------------

    async def publish(
        self, tracks: list[tuple[MediaStreamTrack | Simulcast, str]], *, simulcast: bool = False
    ) -> list[RTCRtpTransceiver]:
        """Publish ``(track, source)`` pairs; returns their transceivers.

        A :class:`Simulcast` goes out as its layers (signaling/sdk/simulcast.py);
        ``simulcast=True`` makes one of every raw camera track from 480x270 up (its first
        frame tells the size; each layer is scaled and encoded on its own)."""
        if self.pub is None:
            self.pub = RTCPeerConnection(_config())
        pc = self.pub
        added: list[tuple[RTCRtpTransceiver, str]] = []
        layered: list[tuple[RTCRtpTransceiver, Simulcast]] = []
        for track, source in tracks:
            if simulcast and isinstance(track, MediaStreamTrack) and source == "camera":
                track = await _layered(track)
            if isinstance(track, Simulcast):
                tr = pc.addTransceiver(track.layers[-1], direction="sendonly")
                layered.append((tr, track))
            else:
                tr = pc.addTransceiver(track, direction="sendonly")
            added.append((tr, source))
        await self._negotiate(added, layered)
        return [tr for tr, _ in added]

    async def _negotiate(
        self,
        added: list[tuple[RTCRtpTransceiver, str]],
        layered: list[tuple[RTCRtpTransceiver, Simulcast]],
    ) -> None:
        """Offer (simulcast sections marked), send it, apply the answer."""
        pc = self.pub
        assert pc is not None
        await pc.setLocalDescription(await pc.createOffer())
        assert pc.localDescription is not None
        for tr, sim in layered:
            self.simulcast[tr.mid or ""] = SimulcastSender(tr, sim)
        meta = [{"mid": tr.mid, "source": source} for tr, source in added]
        sections = {
            mid: s.simulcast.rids
            for mid, s in self.simulcast.items()
            if s.transceiver.direction != "inactive"
        }
        answer = await self.client.request(
            {
                "type": "publish",
                "room": self.room,
                "sdp": offer_simulcast(pc.localDescription.sdp, sections),
                "tracks": meta,
            },
            timeout=20,
        )
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        for mid in sections:
            self.simulcast[mid].start(pc, answer["sdp"])

    async def unpublish(self, transceiver: RTCRtpTransceiver) -> None:
        """Stop a published track (renegotiates with the track's section inactive)."""
        assert self.pub is not None
        transceiver.direction = "inactive"
        layers = self.simulcast.pop(transceiver.mid or "", None)
        if layers is not None:
            await layers.stop()
        await self._negotiate([], [])

    # -- subscribing ---------------------------------------------------------------------------

    def _on_event(self, ev: dict[str, Any]) -> None:
        if ev.get("room") != self.room:
            return
        t = ev.get("type")
        if t == "subscribe_offer":
            self._tasks.spawn(self._answer(ev))
        elif t == "track_unpublished":
            self._gone.add(ev["track"])
            self.tracks.pop(ev["track"], None)
        elif t == "track_published":
            self._gone.discard(ev["track"]["id"])
        elif t == "media_failed" and ev.get("which") in ("subscriber", "all"):
            # The server dropped our subscriber connection and offers a new one by itself (a
            # new ICE session: aiortc cannot restart ICE on the old one), as web/rallypoint.js
            # drops it: the next offer gets a new peer connection. Not one of ``_tasks``: a
            # connection being closed is closed to the end, even by ``close``.
            drop = asyncio.ensure_future(self._drop_subscriber())
            self._drops.add(drop)
            drop.add_done_callback(self._drops.discard)

    async def _drop_subscriber(self) -> None:
        async with self._lock:  # after an answer in progress, before the next offer's
            pc, self.sub = self.sub, None
            self._routed.clear()
            if pc is not None:
                await pc.close()

    async def _answer(self, ev: dict[str, Any]) -> None:
        async with self._lock:  # offers are answered in order
            if self.sub is None:
                self.sub = RTCPeerConnection(_config())
                pc = self.sub

                @pc.on("track")
                def _track(track: Any) -> None:
                    self._got_track(track)

            pc = self.sub
            if ev["offer"] <= self._answered:
                return  # an offer sent again (after `subscribe`) that we answered already
            # The offer lists every track the connection carries: the list replaces the last
            # one (a track gone since was sent again by an offer still waiting: left out).
            self.tracks = {t["id"]: t for t in ev["tracks"] if t["id"] not in self._gone}
            for t in ev["tracks"]:
                self.seen[t["id"]] = t
                self.mid_track[t["mid"]] = t["id"]
            try:
                offer = ev["sdp"] if self.relay is None else self.relay.offer(ev["sdp"])
                await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
                for tr in pc.getTransceivers():  # before they start (in setLocalDescription)
                    if id(tr) not in self._routed:
                        self._routed.add(id(tr))
                        route_rtx_by_ssrc(tr.receiver)
                await pc.setLocalDescription(await pc.createAnswer())
                assert pc.localDescription is not None
                self._answered = ev["offer"]
                # aiortc's answer is ~1,270 characters a section, too long for a large room
                # (60,000 characters hold 47 sections); compacted, ~670 (signaling.sdk.sdp).
                sdp = compact_answer(pc.localDescription.sdp)
                if self.relay is not None:
                    sdp = self.relay.answer(sdp)
                await self.client.request(
                    {"type": "subscribe_answer", "room": self.room, "sdp": sdp}, timeout=20
                )
                self.offers += 1
            except Exception as e:  # recorded for the test to assert on
                log.warning("answering a subscribe offer failed: %s", e)
                self.errors.append({"error": repr(e)})

    def _got_track(self, track: Any) -> None:
        assert self.sub is not None
        mid = next((t.mid for t in self.sub.getTransceivers() if t.receiver.track is track), None)
        tid = self.mid_track.get(mid or "", f"unknown:{mid}")
        if self.on_track is not None:
            self.on_track(tid, track)
        if self.decode:
            counter = FrameCounter(track)
            counter.start()
            self.counters[tid] = counter

    def counter_for(self, participant: str, kind: str) -> FrameCounter | None:
        """The counter of ``participant``'s (first) track of ``kind``: of one it receives now,
        else of one it received (the publisher left or stopped it)."""
        for tid, t in [*self.tracks.items(), *self.seen.items()]:
            if t["participant"] == participant and t["kind"] == kind and tid in self.counters:
                return self.counters[tid]
        return None

    async def close(self) -> None:
        if self._on_event in self.client.listeners:
            self.client.listeners.remove(self._on_event)
        await self._tasks.cancel()
        await asyncio.gather(*self._drops)  # the answers they waited for are cancelled
        for layers in self.simulcast.values():
            await layers.stop()
        for c in self.counters.values():
            await c.stop()
        for pc in (self.pub, self.sub):
            if pc is not None:
                await pc.close()


async def _layered(track: MediaStreamTrack) -> MediaStreamTrack | Simulcast:
    """``track``'s simulcast layers, or ``track`` itself when it is too small for two."""
    if track.kind != "video":
        return track
    frame = await track.recv()  # the size decides the layers; this one frame is not sent
    if not isinstance(frame, av.VideoFrame) or len(layer_specs(frame.width, frame.height)) < 2:
        return track
    return encoded_layers(track, frame.width, frame.height)
