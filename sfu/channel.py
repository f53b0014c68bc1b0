"""The local channel between the signaling process and an SFU worker, and its messages.

Frames are length-prefixed JSON over a Unix socket pair. The signaling side sends requests
(``op``), each with an ``id`` added by the pool and answered by one ``Reply`` with that ``id``;
the worker sends events (``ev``) with no ``id``. Every message is a ``TypedDict`` below, so both
ends are checked by mypy against one definition; ``docs/SFU.md`` lists them (a test keeps the
two in step).
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any, Literal, NotRequired, TypedDict

import orjson

LENGTH = struct.Struct("!I")
MAX_FRAME = 4 * 1024 * 1024


# -- requests (signaling -> worker) ----------------------------------------------------------


class TrackMeta(TypedDict):
    """What the client said of one media section of its publisher offer."""

    mid: str
    source: str  # camera | microphone | screen


class JoinRequest(TypedDict):
    op: Literal["join"]
    room: str
    participant: str
    subscribe: bool  # whether the participant receives the room's tracks
    identity: str  # the participant's identity (a recording may select by it)
    name: str  # its display name (for a recording's manifest)


class LeaveRequest(TypedDict):
    op: Literal["leave"]
    room: str
    participant: str


class PublishRequest(TypedDict):
    op: Literal["publish"]
    room: str
    participant: str
    sdp: str  # the client's offer
    tracks: list[TrackMeta]


class SubscribeRequest(TypedDict):
    """Send the waiting subscriber offer again (a resumed client may have missed it)."""

    op: Literal["subscribe"]
    room: str
    participant: str


class AnswerRequest(TypedDict):
    op: Literal["answer"]
    room: str
    participant: str
    sdp: str  # the client's answer to a subscriber offer


class IceRequest(TypedDict):
    op: Literal["ice"]
    room: str
    participant: str
    target: Literal["publisher", "subscriber"]
    candidate: dict[str, Any] | None  # RTCIceCandidateInit; None = end of candidates


class MuteRequest(TypedDict):
    op: Literal["mute"]
    room: str
    participant: str
    track: str
    muted: bool


class PauseRequest(TypedDict):
    op: Literal["pause"]
    room: str
    participant: str
    track: str
    paused: bool


class RenderSize(TypedDict):
    """The box a subscriber shows one track in, in device pixels; 0 x 0: not shown."""

    track: str
    width: int
    height: int


class RenderRequest(TypedDict):
    """The subscriber's render boxes (``track_render``): every track is checked before any is
    applied (``no_such_track``)."""

    op: Literal["render"]
    room: str
    participant: str
    tracks: list[RenderSize]


class RoomStatsRequest(TypedDict):
    """What the room's subscribers are sent, per track (tests and operators)."""

    op: Literal["room_stats"]
    room: str


class UnpublishRequest(TypedDict):
    op: Literal["unpublish"]
    room: str
    participant: str
    track: str


class RecordStartRequest(TypedDict):
    """Record the room's tracks into ``directory`` (docs/RECORDING.md)."""

    op: Literal["record_start"]
    room: str
    recording: str  # rec_ + 16 hex digits
    directory: str  # absolute path, made by the signaling side (made here if missing)
    audio_only: bool
    identities: list[str] | None  # record only these participants' tracks; None: everyone
    by: dict[str, Any]  # who started it, as the manifest says
    max_bytes: int  # the whole recording's limit (then it stops: size_limit)


class RecordStopRequest(TypedDict):
    op: Literal["record_stop"]
    room: str


class StatsRequest(TypedDict):
    op: Literal["stats"]


RoomRequest = (
    JoinRequest
    | LeaveRequest
    | PublishRequest
    | SubscribeRequest
    | AnswerRequest
    | IceRequest
    | MuteRequest
    | PauseRequest
    | RenderRequest
    | RoomStatsRequest
    | UnpublishRequest
    | RecordStartRequest
    | RecordStopRequest
)
Request = RoomRequest | StatsRequest


class Reply(TypedDict):
    """The answer to request ``id``: ``result`` if ``ok``, else ``code`` and ``message``."""

    id: int
    ok: bool
    result: NotRequired[dict[str, Any]]
    code: NotRequired[str]
    message: NotRequired[str]


class ForwardingStats(TypedDict):
    """One subscriber's copy of one track, in the ``room_stats`` result."""

    participant: str  # the subscriber
    track: str
    kind: str
    packets: int  # forwarded to it so far
    octets: int  # payload bytes forwarded to it so far
    paused: bool  # not forwarded: track_pause, or a 0 x 0 render box
    starved: bool  # not forwarded: too little bandwidth
    render: list[int]  # [width, height] of its render box (65536 x 65536 before any report)
    layer: int | None  # simulcast: the layer it is sent now (None: none)
    target: int | None  # simulcast: the layer chosen for it (switched to at its keyframe)


# -- events (worker -> signaling) ------------------------------------------------------------


class TrackInfo(TypedDict):
    """A published track as clients see it (the protocol's ``Track``)."""

    id: str
    participant: str
    kind: str  # audio | video
    source: str  # camera | microphone | screen
    muted: bool
    codec: str
    mid: NotRequired[str]  # in a subscriber offer: the track's media section


class ReadyEvent(TypedDict):
    ev: Literal["ready"]
    pid: int


class SubscribeOfferEvent(TypedDict):
    ev: Literal["subscribe_offer"]
    room: str
    participant: str
    sdp: str
    tracks: list[TrackInfo]
    offer: int  # the offer's number on this subscriber connection


class TrackPublishedEvent(TypedDict):
    ev: Literal["track_published"]
    room: str
    track: TrackInfo


class TrackUpdatedEvent(TypedDict):
    ev: Literal["track_updated"]
    room: str
    track: TrackInfo


class TrackUnpublishedEvent(TypedDict):
    ev: Literal["track_unpublished"]
    room: str
    track: str
    participant: str


class ActiveSpeakerEvent(TypedDict):
    ev: Literal["active_speaker"]
    room: str
    speakers: list[str]


class TrackStarvedEvent(TypedDict):
    ev: Literal["track_starved"]
    room: str
    participant: str
    track: str
    starved: bool


class MediaFailedEvent(TypedDict):
    ev: Literal["media_failed"]
    room: str
    participant: str
    which: Literal["publisher", "subscriber", "all"]


class RoomClosedEvent(TypedDict):
    """The room's last participant left; the worker closed it."""

    ev: Literal["room_closed"]
    room: str


class RoomLostEvent(TypedDict):
    """Made by the pool, not a worker: the worker hosting the room died."""

    ev: Literal["room_lost"]
    room: str


class RecordingStoppedEvent(TypedDict):
    """The worker ended a recording by itself (not after ``record_stop``)."""

    ev: Literal["recording_stopped"]
    room: str
    recording: str
    reason: Literal["room_closed", "disk_full", "size_limit", "error"]


RoomEvent = (
    SubscribeOfferEvent
    | TrackPublishedEvent
    | TrackUpdatedEvent
    | TrackUnpublishedEvent
    | ActiveSpeakerEvent
    | TrackStarvedEvent
    | MediaFailedEvent
    | RoomClosedEvent
    | RecordingStoppedEvent
)
WorkerEvent = ReadyEvent | RoomEvent
#: What the pool hands its owner: a worker's room events, and rooms lost with a worker.
PoolEvent = RoomEvent | RoomLostEvent


# -- framing ----------------------------------------------------------------------------------


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next frame, or None at end of stream."""
    try:
        head = await reader.readexactly(4)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    (n,) = LENGTH.unpack(head)
    if n > MAX_FRAME:
        raise ValueError(f"channel frame of {n} bytes")
    try:
        body = await reader.readexactly(n)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    msg: dict[str, Any] = orjson.loads(body)
    return msg


def encode_frame(msg: Any) -> bytes:
    """A frame carrying ``msg`` (one of the messages above, or a request with its ``id``)."""
    body = orjson.dumps(msg)
    return LENGTH.pack(len(body)) + body
