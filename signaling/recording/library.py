"""The recordings on disk: where they live, who may be started, what is listed, served and
deleted, and what the age limit removes.

A recording is a directory ``<root>/<id>/`` (``id`` = ``rec_`` + 16 lowercase hex digits)
holding its track files and ``manifest.json`` (the format is in docs/RECORDING.md; the recorder
rewrites it atomically whenever a segment starts or ends, ``ended_at`` is null while it
records). This module reads manifests and never trusts a name from a client: a file is served
only if its recording's manifest lists it, its name is a plain file name of the formats we
write, and it is a regular file inside the recording's directory (no symlink).

The decisions are pure functions of what a scan found (``plan_prune``, ``committed_bytes``,
``admits``, ``page``); ``RecordingLibrary`` is the thin file-system part around them, and runs
every file-system call in a thread so the event loop never waits for a disk.

One server process owns a recordings root: at start-up, a manifest still saying it is being
recorded (or mixed) was left by a process that is gone, and is closed as ``stop_reason:
"error"`` (``RecordingLibrary.open``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson

from ..config import RecordingSection
from ..core.metrics import Metric

log = logging.getLogger("rallypoint.recording")

MANIFEST: Final = "manifest.json"
MANIFEST_VERSION: Final = 1
#: A recording's id, and its directory's name.
RECORDING_ID: Final = re.compile(r"rec_[0-9a-f]{16}")
#: A directory being deleted (renamed first, so that it vanishes at once for readers and a
#: crash half-way leaves something the next prune finishes).
_TRASH: Final = re.compile(r"\.(rec_[0-9a-f]{16})\.deleting")
#: The only file names ever served: one plain name (no dot but the extension's, so no ``..``
#: and no separator) of a format the recorder writes.
CONTENT_TYPES: Final = {
    "webm": "video/webm",
    "ogg": "audio/ogg",
    "mkv": "video/x-matroska",
    "json": "application/json",
}
SERVABLE_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}\.(webm|ogg|mkv|json)")
DAY_MS: Final = 86_400_000
#: A manifest's inode, modification time (ns) and size: changed when the recorder rewrites it.
_ManifestKey = tuple[int, int, int]


class RecordingError(Exception):
    """A refused request, with a stable code (``bad_field``, ``no_such_recording``,
    ``no_such_file``, ``recording_active``, ``recording_disabled``,
    ``recording_storage_full``) and a human message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def content_type(name: str) -> str:
    """The Content-Type of a servable file name (``SERVABLE_NAME``)."""
    return CONTENT_TYPES[name.rpartition(".")[2]]


# --- manifests (pure) ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Manifest:
    """What this module needs of a manifest, checked, and the manifest itself (``raw``)."""

    id: str
    room: str
    started_at: int
    ended_at: int | None
    #: The servable names it lists: every segment's file and the mixed file, in order.
    files: tuple[str, ...]
    mixed_status: str | None
    raw: dict[str, Any]

    @property
    def busy(self) -> bool:
        """Being recorded, or its mixed file being made: not to be deleted."""
        return self.ended_at is None or self.mixed_status == "pending"


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_manifest(data: bytes, rec_id: str) -> Manifest:
    """Check a manifest's fields this module relies on; ``ValueError`` if it is not one of
    recording ``rec_id`` (wrong id, not JSON, a field of the wrong type)."""
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    if raw.get("version") != MANIFEST_VERSION:
        raise ValueError(f"version {raw.get('version')!r}, expected {MANIFEST_VERSION}")
    if raw.get("id") != rec_id:
        raise ValueError(f"id {raw.get('id')!r} in the directory of {rec_id}")
    room, started, ended = raw.get("room"), raw.get("started_at"), raw.get("ended_at")
    if not isinstance(room, str) or not isinstance(started, int) or not _int(started):
        raise ValueError("room or started_at of the wrong type")
    if not (ended is None or _int(ended)):
        raise ValueError("ended_at of the wrong type")
    tracks = raw.get("tracks")
    if not isinstance(tracks, list):
        raise ValueError("tracks is not a list")
    files: list[str] = []
    for track in tracks:
        segments = track.get("segments") if isinstance(track, dict) else None
        if not isinstance(segments, list):
            raise ValueError("a track without a list of segments")
        for seg in segments:
            name = seg.get("file") if isinstance(seg, dict) else None
            if not isinstance(name, str):
                raise ValueError("a segment without a file name")
            files.append(name)
    mixed = raw.get("mixed")
    mixed_status = None
    if mixed is not None:
        if not isinstance(mixed, dict) or not isinstance(mixed.get("file"), str):
            raise ValueError("mixed is neither null nor an object with a file name")
        files.append(mixed["file"])
        status = mixed.get("status")
        mixed_status = status if isinstance(status, str) else None
    servable = tuple(n for n in files if SERVABLE_NAME.fullmatch(n) and n != MANIFEST)
    return Manifest(rec_id, room, started, ended, servable, mixed_status, raw)


def new_manifest(
    rec_id: str,
    *,
    room: str,
    by: dict[str, Any],
    audio_only: bool,
    identities: list[str] | None,
    started_at: int,
) -> dict[str, Any]:
    """The manifest of a recording that has just started: no participants, tracks or end."""
    return {
        "version": MANIFEST_VERSION,
        "id": rec_id,
        "room": room,
        "by": by,
        "audio_only": audio_only,
        "identities": identities,
        "started_at": started_at,
        "ended_at": None,
        "stop_reason": None,
        "participants": [],
        "tracks": [],
        "mixed": None,
    }


def interrupted(manifest: Manifest, last_write_ms: int) -> dict[str, Any] | None:
    """The manifest a busy recording left by a process that is gone gets (ended at its last
    write, ``stop_reason: "error"``; a pending mixed file ``failed``), or None if it is not
    busy."""
    if not manifest.busy:
        return None
    raw = dict(manifest.raw)
    if manifest.ended_at is None:
        raw["ended_at"] = max(manifest.started_at, last_write_ms)
        raw["stop_reason"] = "error"
    if manifest.mixed_status == "pending":
        raw["mixed"] = {**raw["mixed"], "status": "failed", "error": "interrupted"}
    return raw


# --- what a scan found, and the decisions on it (pure) ------------------------------------------


@dataclass(frozen=True, slots=True)
class Stored:
    """A recording on disk: its manifest, the bytes of its regular files, and the time of
    the last write to any of them (ms since the epoch)."""

    manifest: Manifest
    bytes: int
    last_write_ms: int

    def summary(self) -> dict[str, Any]:
        """The recording as ``GET /api/recordings`` lists it."""
        m, raw = self.manifest, self.manifest.raw
        participants = raw.get("participants")
        identities = sorted(
            {
                p["identity"]
                for p in (participants if isinstance(participants, list) else ())
                if isinstance(p, dict) and isinstance(p.get("identity"), str)
            }
        )
        return {
            "id": m.id,
            "room": m.room,
            "by": raw.get("by"),
            "audio_only": raw.get("audio_only") is True,
            "started_at": m.started_at,
            "ended_at": m.ended_at,
            "stop_reason": raw.get("stop_reason"),
            "identities": identities,
            "files": len(m.files),
            "bytes": self.bytes,
            "mixed": m.mixed_status,
        }


@dataclass(frozen=True, slots=True)
class Scan:
    """Everything under the recordings root: the recordings, and the bytes of what is not
    one (directories with a missing or broken manifest, half-deleted ones)."""

    recordings: list[Stored] = field(default_factory=list)
    other_bytes: int = 0
    #: Names of directories whose manifest is missing or broken (kept, never served).
    invalid: list[str] = field(default_factory=list)
    #: Names of half-deleted directories (``.rec_<hex>.deleting``).
    trash: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes for r in self.recordings) + self.other_bytes


def plan_prune(recordings: Iterable[Stored], now_ms: int, max_age_days: int) -> list[str]:
    """The recordings the age limit removes: finished (and not being mixed) and ended more
    than ``max_age_days`` before ``now_ms``; none when ``max_age_days`` is 0. Oldest first."""
    if max_age_days <= 0:
        return []
    cutoff = now_ms - max_age_days * DAY_MS
    old = [
        r.manifest
        for r in recordings
        if not r.manifest.busy and r.manifest.ended_at is not None and r.manifest.ended_at < cutoff
    ]
    return [m.id for m in sorted(old, key=lambda m: (m.ended_at or 0, m.id))]


def committed_bytes(scan: Scan, max_bytes: int) -> int:
    """The bytes stored, counting each recording being made as ``max_bytes`` (what it may
    still write) when it has written less."""
    out = scan.other_bytes
    for r in scan.recordings:
        out += max(r.bytes, max_bytes) if r.manifest.ended_at is None else r.bytes
    return out


def admits(scan: Scan, max_bytes: int, max_total_bytes: int) -> bool:
    """Whether a new recording may start: its ``max_bytes`` fits under ``max_total_bytes``
    beside what is committed (0 = no cap). So the cap holds even if every running recording
    reaches its own limit."""
    return max_total_bytes == 0 or committed_bytes(scan, max_bytes) + max_bytes <= max_total_bytes


def _key(m: Manifest) -> tuple[int, str]:
    return (m.started_at, m.id)


def encode_cursor(m: Manifest) -> str:
    """An opaque position in the list: after this recording."""
    return base64.urlsafe_b64encode(f"{m.started_at}.{m.id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    """The position ``encode_cursor`` made; ``ValueError`` for anything else."""
    if len(cursor) > 64:
        raise ValueError("too long")
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise ValueError("not base64url") from None
    started, _, rec_id = text.partition(".")
    if not started.isdigit() or not RECORDING_ID.fullmatch(rec_id):
        raise ValueError("not a position")
    return int(started), rec_id


def page(
    recordings: Iterable[Stored], *, room: str | None, limit: int, cursor: str | None
) -> tuple[list[Stored], str | None]:
    """A page of the list, newest first (by ``started_at``, then id): at most ``limit``
    recordings after ``cursor``, of ``room`` if given, and the cursor of the next page (None
    at the end). ``ValueError`` for a cursor this module did not make."""
    after = decode_cursor(cursor) if cursor is not None else None
    chosen = sorted(
        (
            r
            for r in recordings
            if (room is None or r.manifest.room == room)
            and (after is None or _key(r.manifest) < after)
        ),
        key=lambda r: _key(r.manifest),
        reverse=True,
    )
    out = chosen[:limit]
    more = len(chosen) > limit
    return out, encode_cursor(out[-1].manifest) if more else None


# --- the file system ----------------------------------------------------------------------------


def _read_manifest(directory: Path, rec_id: str) -> Manifest:
    """The manifest in ``directory`` (never through a symlink); ``ValueError`` or ``OSError``."""
    fd = os.open(directory / MANIFEST, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError("manifest.json is not a regular file")
        data = f.read(16 * 1024 * 1024 + 1)
    if len(data) > 16 * 1024 * 1024:
        raise ValueError("manifest.json is larger than 16 MiB")
    return parse_manifest(data, rec_id)


def _usage(directory: Path) -> tuple[int, int]:
    """Bytes of the regular files directly in ``directory`` (symlinks are not followed), and
    the latest of their modification times, in ms."""
    total, latest_ns = 0, 0
    with os.scandir(directory) as it:
        for entry in it:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
                latest_ns = max(latest_ns, st.st_mtime_ns)
            elif stat.S_ISDIR(st.st_mode):  # nothing of ours; counted all the same
                total += _tree_bytes(Path(entry.path))
    return total, latest_ns // 1_000_000


def _tree_bytes(directory: Path) -> int:
    total = 0
    for base, _, names in os.walk(directory):
        for n in names:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(base, n))
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
    return total


def write_manifest(directory: Path, raw: dict[str, Any]) -> None:
    """Replace ``directory``'s manifest atomically (a temporary file, fsync, ``os.replace``,
    fsync of the directory): a crash leaves the old one or the new one."""
    tmp = directory / f".{MANIFEST}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(orjson.dumps(raw, option=orjson.OPT_INDENT_2))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / MANIFEST)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@dataclass(frozen=True, slots=True)
class RecordingFile:
    """A file of a recording, checked and ready to serve."""

    path: Path
    name: str
    size: int
    content_type: str


class RecordingLibrary:
    """The recordings under ``root``, with the ``[recording]`` limits.

    ``open()`` closes recordings left busy by a process that is gone and applies the age
    limit once; ``start()`` applies it every ``prune_interval_s`` in a task of its own, which
    ``close()`` stops. Every other method may be called at any time (and from several
    requests at once).
    """

    def __init__(
        self, root: Path, cfg: RecordingSection, clock: Callable[[], float] = time.time
    ) -> None:
        self.root = root
        self.cfg = cfg
        self.clock = clock
        self._create_lock = asyncio.Lock()  # admission and creation, one at a time
        self._task: asyncio.Task[None] | None = None
        # Finished recordings by id, with the (inode, mtime, size) of the manifest they were
        # read from: a scan reads again only what changed (docs/RECORDING.md, "Access").
        self._cache: dict[str, tuple[_ManifestKey, Stored]] = {}
        # For /metrics: gauges as of the last scan, counters since start.
        self.stored = 0
        self.stored_bytes = 0
        self.pruned = 0
        self.deleted = 0
        self.refused_full = 0
        self.prune_failures = 0

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # --- life cycle

    async def open(self) -> None:
        """Close what a previous process left busy, then apply the age limit once."""
        scan = await self.scan()
        for r in scan.recordings:
            raw = interrupted(r.manifest, r.last_write_ms)
            if raw is not None:
                log.warning(
                    "recording %s was left %s by a previous run: closed as stop_reason %r",
                    r.manifest.id,
                    "unfinished" if r.manifest.ended_at is None else "mixing",
                    raw["stop_reason"],
                )
                await asyncio.to_thread(write_manifest, self.root / r.manifest.id, raw)
        await self.prune()

    def start(self) -> None:
        """Apply the age limit every ``prune_interval_s`` until ``close()``."""
        if self._task is None:
            self._task = asyncio.create_task(self._prune_forever(), name="recording-prune")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.prune_interval_s)
            try:
                await self.prune()
            except Exception:  # a disk error (or a bug): say so, try again next time
                self.prune_failures += 1
                log.exception("pruning recordings failed")

    # --- reading

    async def scan(self) -> Scan:
        """Every recording and the bytes of everything else under the root."""
        scan = await asyncio.to_thread(self._scan)
        self.stored = len(scan.recordings)
        self.stored_bytes = scan.total_bytes
        return scan

    def _scan(self) -> Scan:
        recordings: list[Stored] = []
        invalid: list[str] = []
        trash: list[str] = []
        other = 0
        cache: dict[str, tuple[_ManifestKey, Stored]] = {}
        try:
            it = os.scandir(self.root)
        except FileNotFoundError:
            return Scan()
        with it:
            for entry in it:
                if not entry.is_dir(follow_symlinks=False):
                    continue  # a symlinked directory is never a recording
                path = Path(entry.path)
                try:
                    if RECORDING_ID.fullmatch(entry.name):
                        stored = self._look(path, entry.name, cache)
                        if isinstance(stored, Stored):
                            recordings.append(stored)
                        else:
                            invalid.append(entry.name)
                            other += stored
                    elif _TRASH.fullmatch(entry.name):
                        trash.append(entry.name)
                        other += _tree_bytes(path)
                except FileNotFoundError:  # deleted while we looked
                    continue
        self._cache = cache  # one assignment: a concurrent scan sees the old or the new
        return Scan(recordings, other, invalid, trash)

    def _look(
        self, path: Path, rec_id: str, cache: dict[str, tuple[_ManifestKey, Stored]]
    ) -> Stored | int:
        """The recording in ``path``, or the bytes of a directory without a usable manifest;
        a finished recording whose manifest is unchanged since the last look is not read
        again (its files are as they were), and goes into ``cache``."""
        try:
            mst = os.lstat(path / MANIFEST)
            key = (mst.st_ino, mst.st_mtime_ns, mst.st_size)
        except FileNotFoundError:
            key = (0, 0, -1)  # matches no cache entry
        cached = self._cache.get(rec_id)
        if cached is not None and cached[0] == key:
            cache[rec_id] = cached
            return cached[1]
        size, last = _usage(path)
        try:
            manifest = _read_manifest(path, rec_id)
        except (OSError, ValueError) as e:
            log.debug("recording %s has no usable manifest: %s", rec_id, e)
            return size
        stored = Stored(manifest, size, last)
        if not manifest.busy:
            cache[rec_id] = (key, stored)
        return stored

    async def list_page(
        self, *, room: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """A page of summaries, newest first, and the next page's cursor (``bad_field`` for a
        cursor this server did not give)."""
        scan = await self.scan()
        try:
            found, next_cursor = page(scan.recordings, room=room, limit=limit, cursor=cursor)
        except ValueError:
            raise RecordingError("bad_field", "`cursor` is not one this server gave") from None
        return [r.summary() for r in found], next_cursor

    async def get(self, rec_id: str) -> Manifest:
        """A recording's manifest (``no_such_recording`` for an unknown or malformed id)."""
        return await asyncio.to_thread(self._get, rec_id)

    def _get(self, rec_id: str) -> Manifest:
        directory = self._directory(rec_id)
        try:
            return _read_manifest(directory, rec_id)
        except (OSError, ValueError):
            raise _no_such_recording() from None

    def _directory(self, rec_id: str) -> Path:
        """The directory of ``rec_id`` (a real directory, not a symlink), or
        ``no_such_recording``: the same for a malformed id as for an unknown one."""
        if not RECORDING_ID.fullmatch(rec_id):
            raise _no_such_recording()
        path = self.root / rec_id
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise _no_such_recording()
        except OSError:
            raise _no_such_recording() from None
        return path

    async def file(self, rec_id: str, name: str) -> RecordingFile:
        """A file of a recording to download: ``manifest.json`` or a name its manifest lists
        (a segment's file, the mixed file), a regular file right in its directory; else
        ``no_such_file`` (``no_such_recording`` for the recording)."""
        return await asyncio.to_thread(self._file, rec_id, name)

    def _file(self, rec_id: str, name: str) -> RecordingFile:
        manifest = self._get(rec_id)
        if not SERVABLE_NAME.fullmatch(name) or (name != MANIFEST and name not in manifest.files):
            raise _no_such_file()
        directory = self.root / rec_id
        path = directory / name
        try:
            st = os.lstat(path)
        except OSError:
            raise _no_such_file() from None
        # lstat: a symlink is refused whatever it points to; and the file is where we think.
        if not stat.S_ISREG(st.st_mode) or Path(os.path.realpath(path)).parent != Path(
            os.path.realpath(directory)
        ):
            raise _no_such_file()
        return RecordingFile(path, name, st.st_size, content_type(name))

    async def total_bytes(self) -> int:
        """Bytes under the root: every recording, and what is not one."""
        return (await self.scan()).total_bytes

    # --- starting

    async def check_can_start(self) -> None:
        """Raise ``RecordingError`` if a new recording may not start now:
        ``recording_disabled`` (``recording.enabled`` is false) or ``recording_storage_full``
        (its ``max_bytes`` would not fit under ``max_total_bytes``, see ``admits``)."""
        self._check_can_start(await self.scan())

    def _check_can_start(self, scan: Scan) -> None:
        if not self.cfg.enabled:
            raise RecordingError("recording_disabled", "recording is disabled on this server")
        if not admits(scan, self.cfg.max_bytes, self.cfg.max_total_bytes):
            self.refused_full += 1
            raise RecordingError(
                "recording_storage_full",
                "the recordings' storage is full (recording.max_total_bytes): delete "
                "recordings to record again",
            )

    async def create(
        self,
        *,
        room: str,
        by: dict[str, Any],
        audio_only: bool = False,
        identities: list[str] | None = None,
    ) -> tuple[Manifest, Path]:
        """Start a recording: check it may start (``check_can_start``), make its directory
        (mode 0o750) with a first manifest (``started_at`` now, ``ended_at`` null), and return
        the manifest and the directory the recorder writes into."""
        async with self._create_lock:  # so that two starts cannot both take the last room
            scan = await self.scan()
            self._check_can_start(scan)
            rec_id = "rec_" + secrets.token_hex(8)
            raw = new_manifest(
                rec_id,
                room=room,
                by=by,
                audio_only=audio_only,
                identities=identities,
                started_at=self.now_ms(),
            )
            directory = await asyncio.to_thread(self._create, rec_id, raw)
        return parse_manifest(orjson.dumps(raw), rec_id), directory

    def _create(self, rec_id: str, raw: dict[str, Any]) -> Path:
        self.root.mkdir(mode=0o750, parents=True, exist_ok=True)
        directory = self.root / rec_id
        directory.mkdir(mode=0o750)  # FileExistsError on a collision of 64 random bits
        os.chmod(directory, 0o750)  # whatever the umask
        write_manifest(directory, raw)
        return directory

    # --- removing

    async def delete(self, rec_id: str) -> None:
        """Delete a finished recording (``recording_active`` while it is being recorded or
        its mixed file made; ``no_such_recording``)."""
        manifest = await self.get(rec_id)
        if manifest.busy:
            raise RecordingError(
                "recording_active", "the recording is still being made: stop it first"
            )
        await asyncio.to_thread(self._remove, rec_id)
        self.deleted += 1
        log.info("recording %s deleted through the API", rec_id)

    async def discard(self, rec_id: str) -> None:
        """Remove a recording that never started (its worker refused it): nothing was
        recorded, so nothing is kept."""
        await asyncio.to_thread(self._remove, rec_id)

    async def close_interrupted(self, rec_id: str) -> None:
        """Close the manifest of a recording whose worker died while this server runs, as
        ``open`` does for one a previous run left (ended at its last write, ``error``)."""

        def close() -> None:
            path = self.root / rec_id
            _, last = _usage(path)
            raw = interrupted(_read_manifest(path, rec_id), last)
            if raw is not None:
                write_manifest(path, raw)

        await asyncio.to_thread(close)

    def _remove(self, rec_id: str) -> None:
        trash = self.root / f".{rec_id}.deleting"
        try:
            os.rename(self.root / rec_id, trash)  # gone at once for every reader
        except FileNotFoundError:
            raise _no_such_recording() from None
        shutil.rmtree(trash)

    async def prune(self, now_ms: int | None = None) -> list[str]:
        """Apply the age limit now (``now_ms``: the clock's time unless given) and finish
        half-done deletions; the ids removed."""
        scan = await self.scan()
        now = self.now_ms() if now_ms is None else now_ms
        removed = []
        for rec_id in plan_prune(scan.recordings, now, self.cfg.max_age_days):
            try:
                await asyncio.to_thread(self._remove, rec_id)
            except RecordingError:  # deleted meanwhile
                continue
            removed.append(rec_id)
        for name in scan.trash:
            await asyncio.to_thread(shutil.rmtree, self.root / name, True)
        if removed:
            self.pruned += len(removed)
            log.info(
                "removed %d recordings older than %d days", len(removed), self.cfg.max_age_days
            )
            await self.scan()  # the gauges
        return removed

    # --- /metrics

    HELP: Final = {
        "recordings": ("gauge", "Recordings on disk (as of the last look)."),
        "recordings_bytes": ("gauge", "Bytes under the recordings root (as of the last look)."),
        "recordings_pruned": ("counter", "Recordings removed by recording.max_age_days."),
        "recordings_deleted": ("counter", "Recordings deleted through the HTTP API."),
        "recordings_refused_full": (
            "counter",
            "Recordings refused because of recording.max_total_bytes.",
        ),
        "recordings_prune_failures": ("counter", "Prune passes that failed (logged)."),
    }

    def metrics(self) -> Iterator[Metric]:
        values = {
            "recordings": self.stored,
            "recordings_bytes": self.stored_bytes,
            "recordings_pruned": self.pruned,
            "recordings_deleted": self.deleted,
            "recordings_refused_full": self.refused_full,
            "recordings_prune_failures": self.prune_failures,
        }
        for name, (kind, help_) in self.HELP.items():
            yield Metric(name, "gauge" if kind == "gauge" else "counter", help_, values[name])


def _no_such_recording() -> RecordingError:
    return RecordingError("no_such_recording", "no such recording")


def _no_such_file() -> RecordingError:
    return RecordingError("no_such_file", "the recording has no such file")


def recordings_root(cfg: RecordingSection, data_dir: str) -> Path:
    """The recordings root ``recording.path`` names (``recordings/`` in the data directory
    when empty)."""
    return Path(cfg.path) if cfg.path else Path(data_dir) / "recordings"
