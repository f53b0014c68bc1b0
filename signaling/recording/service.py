"""Recording group calls: who may start and stop a room's recording, the request to the room's
SFU worker (which writes the files, ``sfu.recording``), and telling everyone in the room.

A room has at most one recording at a time. Its state here is what the room is told
(``recording`` events, ``joined.recording``); the files, the manifest and the limits while
recording are the worker's. The worker ends a recording by itself when the room empties, the
disk fills or the size limit is reached (``recording_stopped``); a worker that dies ends it with
``error``. After a recording ends, the optional mixed file is made by a background process at
low priority (``python -m sfu.recording.mix``), never on a media worker.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sfu.channel import RecordStartRequest, RecordStopRequest
from sfu.pool import SfuError
from sfu.tasks import TaskSet

from ..core.feature import Feature
from ..core.hub import Hub
from ..core.session import Session
from ..groupcall.router import GroupCall
from ..wire.errors import ProtocolError
from ..wire.framing import encode
from .library import RecordingError, RecordingLibrary
from .messages import ERRORS, MESSAGES

log = logging.getLogger("rallypoint.recording")

#: ``by`` of a recording started (or stopped) through the HTTP API.
BY_API: dict[str, Any] = {"api": True}


@dataclass(slots=True)
class Active:
    """A room's running recording, as the room is told of it."""

    id: str
    room: str
    by: dict[str, Any]
    audio_only: bool
    identities: list[str] | None
    started_at: int
    directory: Path

    def to_wire(self) -> dict[str, Any]:
        """The `recording` event's fields while it runs (``joined.recording`` too)."""
        out: dict[str, Any] = {
            "active": True,
            "recording": self.id,
            "by": self.by,
            "audio_only": self.audio_only,
            "started_at": self.started_at,
        }
        if self.identities is not None:
            out["identities"] = self.identities
        return out


class Recordings:
    """The rooms' recordings on this node."""

    def __init__(
        self,
        hub: Hub,
        media: GroupCall,
        library: RecordingLibrary,
        *,
        max_bytes: int,
        mix: bool,
    ) -> None:
        self.hub = hub
        self.media = media
        self.library = library
        self.max_bytes = max_bytes
        self.mix = mix
        self.active: dict[str, Active] = {}
        self._starting: set[str] = set()
        self._stopping: set[str] = set()
        self._tasks = TaskSet(lambda e: log.error("recording task failed", exc_info=e))
        self.mixes: dict[Path, asyncio.subprocess.Process] = {}

    def feature(self) -> Feature:
        return Feature(
            "recording",
            MESSAGES,
            {"recording_start": self.on_start, "recording_stop": self.on_stop},
        )

    async def close(self) -> None:
        await self._tasks.cancel()
        for proc in self.mixes.values():
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        self.mixes.clear()

    def recording_of(self, room: str) -> dict[str, Any] | None:
        """What someone who joins ``room`` now is told (``joined.recording``)."""
        a = self.active.get(room)
        return None if a is None else a.to_wire()

    # -- starting and stopping ---------------------------------------------------------------

    async def start(
        self, room: str, by: dict[str, Any], audio_only: bool, identities: list[str] | None
    ) -> Active:
        """Start recording ``room`` (someone must be in it); tell the room."""
        if self.media.pool is None:
            raise ProtocolError("recording_unavailable", "media is disabled on this server")
        hub_room = self.hub.rooms.get(room)
        if hub_room is None or not hub_room.participants:
            raise ProtocolError("no_such_room", f"nobody is in room {room!r}")
        if room in self.active or room in self._starting or room in self._stopping:
            raise ProtocolError("already_recording", f"room {room!r} is being recorded already")
        self._starting.add(room)  # a second start is refused while this one is on its way
        try:
            try:
                manifest, directory = await self.library.create(
                    room=room, by=by, audio_only=audio_only, identities=identities
                )
            except RecordingError as e:
                code = "recording_unavailable" if e.code == "recording_disabled" else e.code
                raise ProtocolError(code, e.message) from None
            req: RecordStartRequest = {
                "op": "record_start",
                "room": room,
                "recording": manifest.id,
                "directory": str(directory),
                "audio_only": audio_only,
                "identities": identities,
                "by": by,
                "max_bytes": self.max_bytes,
            }
            try:
                await self._call(req)
            except BaseException:
                await self.library.discard(manifest.id)  # nothing was recorded
                raise
        finally:
            self._starting.discard(room)
        a = Active(manifest.id, room, by, audio_only, identities, manifest.started_at, directory)
        self.active[room] = a
        self._tell(room, a.to_wire())
        return a

    async def stop(self, room: str, by: dict[str, Any]) -> Active:
        """Stop ``room``'s recording (the worker closes its files first); tell the room."""
        a = self.active.get(room)
        if a is None or room in self._stopping:
            raise ProtocolError("not_recording", f"room {room!r} is not being recorded")
        self._stopping.add(room)
        try:
            await self._call({"op": "record_stop", "room": room})
        except ProtocolError as e:
            if e.code != "not_recording":  # else the worker ended it already: so be it
                raise
        finally:
            self._stopping.discard(room)
        if self.active.get(room) is a:
            self._end(a, "stopped", by)
        return a

    def ended(self, room: str, recording: str, reason: str) -> None:
        """The worker ended a recording by itself, or died (``error``: its manifest is
        closed here, as the worker could not)."""
        a = self.active.get(room)
        if a is not None and a.id == recording:
            self._end(a, reason, None, died=reason == "error")

    def _end(
        self, a: Active, reason: str, by: dict[str, Any] | None, *, died: bool = False
    ) -> None:
        del self.active[a.room]
        msg: dict[str, Any] = {**a.to_wire(), "active": False, "reason": reason}
        if by is not None:
            msg["stopped_by"] = by
        self._tell(a.room, msg)
        self._tasks.spawn(self._after(a, died))

    async def _after(self, a: Active, died: bool) -> None:
        if died:
            await self.library.close_interrupted(a.id)
        if self.mix:
            await self._mix(a.directory)

    def _tell(self, room: str, fields: dict[str, Any]) -> None:
        self.hub.bus.publish(f"room:{room}", encode({"type": "recording", "room": room, **fields}))

    async def _call(self, req: RecordStartRequest | RecordStopRequest) -> dict[str, Any]:
        pool = self.media.pool
        if pool is None:
            raise ProtocolError("recording_unavailable", "media is disabled on this server")
        elsewhere = self.media.media_node(req["room"])
        if elsewhere:  # its files would be that node's, its manifest this node's
            raise ProtocolError(
                "recording_unavailable",
                f"the room's media is on node {elsewhere}: record it there "
                "(recording across nodes is not supported yet)",
            )
        try:
            return await pool.request(req)
        except SfuError as e:
            if e.code in ERRORS or e.code == "sfu_unavailable":
                raise ProtocolError(e.code, e.message) from None
            if e.code == "not_in_room":
                raise ProtocolError("no_such_room", "the room has no media yet") from None
            raise ProtocolError("internal_error", e.message) from None

    async def _mix(self, directory: Path) -> None:
        """Make the optional mixed file: a background process at the lowest priority."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-P",
            "-m",
            "sfu.recording.mix",
            str(directory),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self.mixes[directory] = proc
        try:
            _, err = await proc.communicate()
        finally:
            self.mixes.pop(directory, None)
        if proc.returncode != 0:
            log.warning("mixing %s failed: %s", directory.name, err.decode(errors="replace")[-500:])

    # -- handlers ----------------------------------------------------------------------------

    def _moderator(self, s: Session, room: str) -> dict[str, Any]:
        p = s.rooms.get(room)
        if p is None:
            raise ProtocolError("not_in_room", f"join room {room!r} first")
        if not p.moderator:
            raise ProtocolError("forbidden", f"you are not a moderator of {room!r}")
        return {"identity": s.identity, "name": s.name}

    async def on_start(self, s: Session, m: dict[str, Any]) -> None:
        by = self._moderator(s, m["room"])
        await self.start(m["room"], by, m.get("audio_only", False), m.get("identities"))
        s.ok(m)

    async def on_stop(self, s: Session, m: dict[str, Any]) -> None:
        by = self._moderator(s, m["room"])
        await self.stop(m["room"], by)
        s.ok(m)
