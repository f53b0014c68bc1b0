"""``manifest.json`` of a recording (docs/RECORDING.md, "The manifest").

The document is built in memory and written whole, atomically (a temporary file in the same
directory, then ``os.replace``), whenever a segment starts or ends and at the end, so a crash
leaves a manifest that names every file written so far.
"""

from __future__ import annotations

import os
import time
from typing import Any

import orjson

VERSION = 1
STOP_REASONS = ("stopped", "room_closed", "disk_full", "size_limit", "error")


class Manifest:
    """The manifest of one recording; only the recording's writer thread touches it."""

    def __init__(
        self,
        recording: str,
        room: str,
        directory: str,
        *,
        by: dict[str, Any],
        audio_only: bool,
        identities: list[str] | None,
        started_at: int | None = None,
    ) -> None:
        self.id = recording
        self.directory = directory
        self.started_at = started_at if started_at is not None else int(time.time() * 1000)
        self.doc: dict[str, Any] = {
            "version": VERSION,
            "id": recording,
            "room": room,
            "by": by,
            "audio_only": audio_only,
            "identities": identities,
            "started_at": self.started_at,
            "ended_at": None,
            "stop_reason": None,
            "participants": [],
            "tracks": [],
            "mixed": None,
        }
        self._tracks: dict[str, dict[str, Any]] = {}

    def add_segment(
        self,
        track: str,
        *,
        participant: str,
        identity: str,
        name: str,
        kind: str,
        source: str,
        codec: str,
    ) -> tuple[dict[str, Any], int, int]:
        """A new segment of ``track`` (the track's entry and the participant's are made on
        its first); returns the track entry, its number and the segment's number (from 1)."""
        entry = self._tracks.get(track)
        if entry is None:
            if not any(p["participant"] == participant for p in self.doc["participants"]):
                self.doc["participants"].append(
                    {"participant": participant, "identity": identity, "name": name}
                )
            entry = {
                "track": track,
                "participant": participant,
                "kind": kind,
                "source": source,
                "codec": codec,
                "segments": [],
            }
            self._tracks[track] = entry
            self.doc["tracks"].append(entry)
        number = self.doc["tracks"].index(entry) + 1
        entry["segments"].append(
            {
                "file": "",
                "container": {"vp8": "webm", "h264": "mkv", "opus": "ogg"}[codec],
                "start": 0.0,
                "duration": 0.0,
                "frames": 0,
                "bytes": 0,
                "complete": False,
            }
        )
        return entry, number, len(entry["segments"])

    def end(self, reason: str, ended_at: int | None = None) -> None:
        if reason not in STOP_REASONS:
            raise ValueError(f"unknown stop reason {reason!r}")
        self.doc["ended_at"] = ended_at if ended_at is not None else int(time.time() * 1000)
        self.doc["stop_reason"] = reason

    def write(self) -> None:
        """Replace ``manifest.json`` atomically."""
        path = os.path.join(self.directory, "manifest.json")
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(orjson.dumps(self.doc, option=orjson.OPT_INDENT_2))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
