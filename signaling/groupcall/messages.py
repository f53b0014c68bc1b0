"""The messages of group-call media (publishing and subscribing through the SFU) and their
error codes."""

from __future__ import annotations

from typing import Final

from ..wire.spec import REQUEST_ID, ROOM_PATTERN, Field, Messages, MessageSpec, out

_ROOM = Field("room", "string", "Room name.", required=True, pattern=ROOM_PATTERN)
_SDP = Field("sdp", "string", "Session description (SDP).", required=True, max_length=60000)
TRACK_PATTERN: Final = r"^[\x21-\x7e]{1,160}$"
_TRACK = Field(
    "track",
    "string",
    "Track id (from `tracks` or `track_published`).",
    required=True,
    pattern=TRACK_PATTERN,
)
#: The largest render box side a client may report (device pixels), and the most boxes at once.
MAX_RENDER_SIDE: Final = 16384
MAX_RENDER_TRACKS: Final = 64


_CLIENT = (
    MessageSpec(
        "publish",
        "Offer the tracks this client sends to the room's SFU (also to "
        "add, e.g. a screen share, or stop tracks later); answered with "
        "`publish_answer`.",
        (
            _ROOM,
            _SDP,
            Field(
                "tracks",
                "array",
                "`{mid, source}` for the offer's media "
                "sections; source is camera, microphone or screen.",
                items="object",
                max_items=16,
            ),
            REQUEST_ID,
        ),
    ),
    MessageSpec(
        "subscribe",
        "Ready to receive: the server (re)sends the current "
        "`subscribe_offer` (one is also sent unasked after `join` and on changes).",
        (_ROOM, REQUEST_ID),
    ),
    MessageSpec("subscribe_answer", "Answer to a `subscribe_offer`.", (_ROOM, _SDP, REQUEST_ID)),
    MessageSpec(
        "ice",
        "A trickled ICE candidate for the publisher or subscriber "
        "connection; without `candidate`, end of candidates.",
        (
            _ROOM,
            Field(
                "target",
                "string",
                "Which connection.",
                required=True,
                enum=("publisher", "subscriber"),
            ),
            Field(
                "candidate",
                "object",
                "RTCIceCandidateInit: `candidate`, `sdpMid`, `sdpMLineIndex`.",
            ),
            REQUEST_ID,
        ),
    ),
    MessageSpec(
        "track_mute",
        "Mark one of your published tracks muted or unmuted.",
        (_ROOM, _TRACK, Field("muted", "boolean", "Muted.", required=True), REQUEST_ID),
    ),
    MessageSpec(
        "track_pause",
        "Stop or resume receiving a track (a hidden tile costs nothing downstream).",
        (_ROOM, _TRACK, Field("paused", "boolean", "Paused.", required=True), REQUEST_ID),
    ),
    MessageSpec(
        "track_render",
        "The sizes at which you show the video tracks you receive (device pixels; 0 x 0: "
        "not shown): the SFU forwards the smallest simulcast layer that fills each box, and "
        "nothing for a hidden one. Several tracks at once; audio is never affected.",
        (
            _ROOM,
            Field(
                "tracks",
                "array",
                f"`{{track, width, height}}` for each track; `width` and `height` integers "
                f"from 0 to {MAX_RENDER_SIDE}.",
                required=True,
                items="object",
                max_items=MAX_RENDER_TRACKS,
            ),
            REQUEST_ID,
        ),
    ),
    MessageSpec("unpublish", "Stop publishing a track.", (_ROOM, _TRACK, REQUEST_ID)),
)

_SERVER = (
    MessageSpec(
        "publish_answer",
        "Answer to `publish`.",
        (
            out("room", "string", "Room."),
            out("sdp", "string", "SDP answer."),
            out("re", "string", "Request id.", required=False),
        ),
    ),
    MessageSpec(
        "subscribe_offer",
        "The SFU offers the room's tracks (again, after each "
        "change); answer with `subscribe_answer`.",
        (
            out("room", "string", "Room."),
            out("sdp", "string", "SDP offer."),
            out(
                "tracks",
                "array",
                "Each offered track with the `mid` of its media section.",
                ref="Track",
            ),
            out(
                "offer",
                "integer",
                "Number of this offer on the connection (a resent offer keeps its number: "
                "answer each number once).",
            ),
        ),
    ),
    MessageSpec(
        "track_published",
        "A participant started publishing a track.",
        (out("room", "string", "Room."), out("track", "object", "The track.", ref="Track")),
    ),
    MessageSpec(
        "track_unpublished",
        "A track is gone.",
        (
            out("room", "string", "Room."),
            out("track", "string", "Track id."),
            out("participant", "string", "Its publisher."),
        ),
    ),
    MessageSpec(
        "track_updated",
        "A track's muted state changed.",
        (out("room", "string", "Room."), out("track", "object", "The track.", ref="Track")),
    ),
    MessageSpec(
        "track_starved",
        "Your bandwidth is too low for this video track: it is "
        "paused for you (audio goes on) until the estimate recovers.",
        (
            out("room", "string", "Room."),
            out("track", "string", "Track id."),
            out("starved", "boolean", "true: paused for bandwidth."),
        ),
    ),
    MessageSpec(
        "active_speaker",
        "Who is speaking, loudest first (may be empty).",
        (out("room", "string", "Room."), out("speakers", "array", "Participant ids.")),
    ),
    MessageSpec(
        "media_failed",
        "Your media connection failed or the SFU restarted; "
        "publish again (a new `subscribe_offer` follows when there is "
        "something to receive).",
        (out("room", "string", "Room."), out("which", "string", "publisher | subscriber | all")),
    ),
)

ERRORS: Final[dict[str, str]] = {
    "bad_sdp": "The SDP offer, answer or ICE candidate is malformed or does not fit.",
    "no_usable_codec": "The offer has no codec the room uses (Opus; VP8 or H.264).",
    "no_such_track": "No such track (or it is not yours to change).",
    "sfu_unavailable": "Media is not available (SFU disabled, starting or restarting).",
    "media_unavailable": (
        "Cluster: the node hosting the room's media did not answer in time (or the "
        "cluster's Redis cannot be reached); retry."
    ),
}

TRACK_DEFINITION: Final[dict[str, object]] = {
    "type": "object",
    "required": ["id", "participant", "kind", "source", "muted", "codec"],
    "properties": {
        "id": {"type": "string"},
        "participant": {"type": "string", "description": "Publisher's participant id."},
        "kind": {"enum": ["audio", "video"]},
        "source": {"enum": ["camera", "microphone", "screen"]},
        "muted": {"type": "boolean"},
        "codec": {"type": "string"},
        "mid": {"type": "string", "description": "In `subscribe_offer`: the media section."},
    },
}

MESSAGES: Final = Messages(
    client=_CLIENT,
    server=_SERVER,
    errors=ERRORS,
    definitions={"Track": TRACK_DEFINITION},
)
