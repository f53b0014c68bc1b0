"""The recordings library and its HTTP API, against the real server: recording directories made
here the way the recorder makes them (real WebM and Ogg files from PyAV, a manifest in the
format of docs/RECORDING.md), then listed, paged, read, downloaded (whole and by range),
attacked (traversal, symlinks, no credentials), deleted, pruned by age and refused by the
storage cap; and the pure decisions behind it, on their own."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import shutil
import stat
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import av
import pytest
from aiohttp.test_utils import TestServer
from yarl import URL

from signaling.app import RECORDINGS
from signaling.config import ConfigError, RecordingSection, load_config
from signaling.recording.library import (
    DAY_MS,
    Manifest,
    RecordingError,
    RecordingLibrary,
    Scan,
    Stored,
    admits,
    committed_bytes,
    decode_cursor,
    encode_cursor,
    interrupted,
    page,
    parse_manifest,
    plan_prune,
)

Start = Callable[..., Awaitable[TestServer]]
KEY, SECRET = "test-key", "a-test-secret-of-at-least-32-bytes"
BASIC = {"Authorization": "Basic " + base64.b64encode(f"{KEY}:{SECRET}".encode()).decode()}
NOW = 1_795_812_967_321  # ms
MIB = 1024**2


# --- real media files and recording directories -------------------------------------------------


def webm_bytes(frames: int = 12) -> bytes:
    """A short VP8 WebM (64x48, 10 fps), as the recorder writes a video segment."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="webm") as c:
        s = c.add_stream("libvpx", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            f = av.VideoFrame(64, 48, "yuv420p")
            for plane in f.planes:
                plane.update(bytes([(16 * i) % 256]) * plane.buffer_size)
            f.pts = i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def ogg_bytes(samples: int = 4800) -> bytes:
    """A short Opus Ogg (mono, 48 kHz), as the recorder writes an audio segment."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="ogg") as c:
        s = c.add_stream("libopus", rate=48000)
        s.layout = "mono"
        f = av.AudioFrame(format="s16", layout="mono", samples=samples)
        for plane in f.planes:
            plane.update(bytes(plane.buffer_size))
        f.sample_rate, f.pts = 48000, 0
        for p in s.encode(f):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


WEBM = webm_bytes()
OGG = ogg_bytes()


def manifest(
    rec_id: str,
    *,
    room: str = "lobby",
    started_at: int = NOW,
    ended_at: int | None = NOW + 30_000,
    files: tuple[str, ...] = ("t1-s1.webm", "t2-s1.ogg"),
    mixed: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A manifest in the recorder's format (docs/RECORDING.md), one segment per file."""
    tracks = []
    for n, name in enumerate(files, 1):
        video = name.endswith((".webm", ".mkv"))
        tracks.append(
            {
                "track": f"qYqNVriTn8hv:{n}",
                "participant": "qYqNVriTn8hv",
                "kind": "video" if video else "audio",
                "source": "camera" if video else "microphone",
                "codec": "vp8" if video else "opus",
                "segments": [
                    {
                        "file": name,
                        "container": name.rpartition(".")[2],
                        "start": 0.512,
                        "duration": 1.2,
                        "frames": 12,
                        "bytes": 0,
                        "complete": ended_at is not None,
                    }
                ],
            }
        )
    return {
        "version": 1,
        "id": rec_id,
        "room": room,
        "by": {"identity": "alice", "name": "Alice"},
        "audio_only": False,
        "identities": None,
        "started_at": started_at,
        "ended_at": ended_at,
        "stop_reason": None if ended_at is None else "stopped",
        "participants": [{"participant": "qYqNVriTn8hv", "identity": "alice", "name": "Alice"}],
        "tracks": tracks,
        "mixed": mixed,
    }


def rec_id(n: int) -> str:
    return f"rec_{n:016x}"


def make_recording(root: Path, rid: str, **kw: Any) -> dict[str, Any]:
    """A recording directory with real files for the names its manifest lists."""
    d = root / rid
    d.mkdir(parents=True, mode=0o750)
    m = manifest(rid, **kw)
    for track in m["tracks"]:
        for seg in track["segments"]:
            data = WEBM if seg["file"].endswith(".webm") else OGG
            (d / seg["file"]).write_bytes(data)
            seg["bytes"] = len(data)
    (d / "manifest.json").write_text(json.dumps(m))
    return m


def bytes_under(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


# --- the server and a client --------------------------------------------------------------------


class Http:
    def __init__(self, session: aiohttp.ClientSession, server: TestServer) -> None:
        self.session = session
        self.server = server
        self.base = f"http://127.0.0.1:{server.port}"

    async def json(
        self, method: str, path: str, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        url = URL(self.base + path, encoded=True)
        async with self.session.request(
            method, url, headers=BASIC if headers is None else headers
        ) as r:
            assert r.content_type == "application/json", (path, r.status)
            return r.status, await r.json()

    async def get(
        self, path: str, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        url = URL(self.base + path, encoded=True)
        async with self.session.get(url, headers={**BASIC, **(headers or {})}) as r:
            return r.status, dict(r.headers), await r.read()

    async def raw(self, target: str) -> tuple[int, bytes]:
        """A GET with ``target`` sent byte for byte (no client-side normalization of ``..``)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        try:
            writer.write(
                f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: {BASIC['Authorization']}"
                "\r\nConnection: close\r\n\r\n".encode()
            )
            async with asyncio.timeout(5):
                data = await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body


@pytest.fixture
async def http() -> Any:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "recs"


@pytest.fixture
async def api(start_server: Start, http: aiohttp.ClientSession, root: Path) -> Http:
    server = await start_server(
        auth__api_key=KEY, auth__api_secret=SECRET, recording__path=str(root)
    )
    return Http(http, server)


# --- listing, paging, reading -------------------------------------------------------------------


async def test_list_newest_first_in_pages_and_by_room(api: Http, root: Path) -> None:
    status, body = await api.json("GET", "/api/recordings")
    assert (status, body) == (200, {"recordings": [], "next_cursor": None})  # no root yet
    rooms = ["lobby", "side", "lobby", "lobby", "side"]
    for n, room in enumerate(rooms):
        make_recording(root, rec_id(n), room=room, started_at=NOW + 1000 * n)
    # Two started in the same millisecond: the id breaks the tie, and paging keeps both.
    make_recording(root, rec_id(9), room="lobby", started_at=NOW + 3000)
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        q = "/api/recordings?limit=2" + (f"&cursor={cursor}" if cursor else "")
        status, body = await api.json("GET", q)
        assert status == 200 and len(body["recordings"]) <= 2
        seen += [r["id"] for r in body["recordings"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == [rec_id(4), rec_id(9), rec_id(3), rec_id(2), rec_id(1), rec_id(0)]
    status, body = await api.json("GET", "/api/recordings?room=side")
    assert [r["id"] for r in body["recordings"]] == [rec_id(4), rec_id(1)]
    first = body["recordings"][0]
    assert first == {
        "id": rec_id(4),
        "room": "side",
        "by": {"identity": "alice", "name": "Alice"},
        "audio_only": False,
        "started_at": NOW + 4000,
        "ended_at": NOW + 30_000,
        "stop_reason": "stopped",
        "identities": ["alice"],
        "files": 2,
        "bytes": len(WEBM) + len(OGG) + (root / rec_id(4) / "manifest.json").stat().st_size,
        "mixed": None,
    }
    status, body = await api.json("GET", "/api/recordings?room=nowhere")
    assert (status, body["recordings"]) == (200, [])
    forged = base64.urlsafe_b64encode(b"1.../etc").decode()
    for bad in (
        "limit=0",
        "limit=201",
        "limit=x",
        "room=bad%20room",
        "cursor=!!",
        f"cursor={forged}",
    ):
        status, body = await api.json("GET", f"/api/recordings?{bad}")
        assert (status, body["code"]) == (400, "bad_field"), bad
        assert body["message"]


async def test_the_manifest_as_written(api: Http, root: Path) -> None:
    written = make_recording(
        root, rec_id(1), mixed={"file": "mixed.webm", "status": "pending", "error": None}
    )
    status, body = await api.json("GET", f"/api/recordings/{rec_id(1)}")
    assert (status, body) == (200, written)
    # Broken manifests, a manifest of another recording, a symlinked manifest: none is a
    # recording (not listed, 404), and the rest of the list is unharmed.
    (root / rec_id(2)).mkdir()
    (root / rec_id(2) / "manifest.json").write_text("{not json")
    make_recording(root, rec_id(3))
    (root / rec_id(3) / "manifest.json").write_text(json.dumps(manifest(rec_id(4))))
    (root / rec_id(5)).mkdir()
    (root / rec_id(5) / "manifest.json").symlink_to(root / rec_id(1) / "manifest.json")
    for n in (2, 3, 5, 6):
        status, body = await api.json("GET", f"/api/recordings/{rec_id(n)}")
        assert (status, body["code"]) == (404, "no_such_recording"), n
    status, body = await api.json("GET", "/api/recordings")
    assert [r["id"] for r in body["recordings"]] == [rec_id(1)]


async def test_malformed_ids_look_like_unknown_ones(api: Http) -> None:
    answers = set()
    for rid in (rec_id(7), "rec_0123", "REC_0123456789ABCDEF", "..", "%2E%2E", "%2Fetc", "x" * 300):
        for path in (f"/api/recordings/{rid}", f"/api/recordings/{rid}/files/manifest.json"):
            status, body = await api.json("GET", path)
            answers.add((status, body["code"], body["message"]))
        status, body = await api.json("DELETE", f"/api/recordings/{rid}")
        answers.add((status, body["code"], body["message"]))
    assert answers == {(404, "no_such_recording", "no such recording")}


# --- downloads ----------------------------------------------------------------------------------


async def test_download_whole_and_by_range(api: Http, root: Path) -> None:
    written = make_recording(root, rec_id(1))
    base = f"/api/recordings/{rec_id(1)}/files"
    status, headers, body = await api.get(f"{base}/t1-s1.webm")
    assert status == 200 and body == WEBM
    assert headers["Content-Type"] == "video/webm" and headers["Accept-Ranges"] == "bytes"
    assert headers["Content-Disposition"] == f'attachment; filename="{rec_id(1)}-t1-s1.webm"'
    with av.open(io.BytesIO(body)) as c:  # a real, decodable file came through
        assert sum(1 for _ in c.decode(video=0)) == 12
    status, headers, body = await api.get(f"{base}/t2-s1.ogg")
    assert (status, headers["Content-Type"], body) == (200, "audio/ogg", OGG)
    status, headers, body = await api.get(f"{base}/manifest.json")
    assert (status, headers["Content-Type"]) == (200, "application/json")
    assert json.loads(body) == written
    # Ranges: 206 with exactly those bytes.
    size = len(WEBM)
    for rng, want, content_range in (
        ("bytes=10-19", WEBM[10:20], f"bytes 10-19/{size}"),
        ("bytes=100-", WEBM[100:], f"bytes 100-{size - 1}/{size}"),
        ("bytes=-7", WEBM[-7:], f"bytes {size - 7}-{size - 1}/{size}"),
        (f"bytes=0-{size + 50}", WEBM, f"bytes 0-{size - 1}/{size}"),
    ):
        status, headers, body = await api.get(f"{base}/t1-s1.webm", {"Range": rng})
        assert (status, body, headers["Content-Range"]) == (206, want, content_range), rng
        assert int(headers["Content-Length"]) == len(want)
    # Unsatisfiable (or malformed) ranges: 416, in JSON, with the file's length.
    for rng in (f"bytes={size}-", f"bytes={size + 10}-{size + 20}", "bytes=20-10", "pages=1-2"):
        status, headers, body = await api.get(f"{base}/t1-s1.webm", {"Range": rng})
        assert status == 416, rng
        assert headers["Content-Range"] == f"bytes */{size}"
        assert json.loads(body)["code"] == "range_not_satisfiable"


async def test_only_listed_regular_files_inside_the_recording(
    api: Http, root: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.webm"
    secret.write_bytes(b"SECRET" * 10)
    make_recording(root, rec_id(1), files=("t1-s1.webm", "t2-s1.webm", "t3-s1.ogg"))
    d = root / rec_id(1)
    (d / "t2-s1.webm").unlink()
    (d / "t2-s1.webm").symlink_to(secret)  # listed, but a symlink pointing out
    (d / "t3-s1.ogg").unlink()
    (d / "t3-s1.ogg").symlink_to(d / "t1-s1.webm")  # a symlink even pointing in
    (d / "notes.webm").write_bytes(WEBM)  # in the directory, not in the manifest
    (d / "t1-s1.webm.gz").write_bytes(b"GZ")  # a compressed sibling FileResponse would pick
    (d / "sub").mkdir()
    (d / "sub" / "t9-s1.webm").write_bytes(WEBM)
    # A recording directory that is itself a symlink to one outside.
    outside = tmp_path / "outside"
    make_recording(outside, rec_id(2))
    (root / rec_id(2)).symlink_to(outside / rec_id(2), target_is_directory=True)
    base = f"/api/recordings/{rec_id(1)}/files"
    for name in (
        "t2-s1.webm",
        "t3-s1.ogg",
        "notes.webm",
        "..",
        "..%2F..%2Fsecret.webm",
        "%2E%2E%2F%2E%2E%2Fsecret.webm",
        "%2F" + str(secret).lstrip("/").replace("/", "%2F"),
        "sub%2Ft9-s1.webm",
        "t1-s1.webm%00",
        "t1-s1.webm%2F",
        "manifest.json%2F..%2F..%2F..%2Fsecret.webm",
    ):
        status, headers, body = await api.get(f"{base}/{name}")
        assert status == 404 and b"SECRET" not in body, name
        assert json.loads(body)["code"] in ("no_such_file", "not_found"), name
    status, headers, body = await api.get(f"{base}/t1-s1.webm", {"Accept-Encoding": "gzip"})
    assert (status, body) == (200, WEBM) and "Content-Encoding" not in headers
    status, _, body = await api.get(f"/api/recordings/{rec_id(2)}/files/t1-s1.webm")
    assert status == 404 and json.loads(body)["code"] == "no_such_recording"
    status, listed = await api.json("GET", "/api/recordings")
    assert [r["id"] for r in listed["recordings"]] == [rec_id(1)]
    # Dot segments sent as they are (a client would normalize them away).
    for target in (
        f"{base}/../../{rec_id(1)}/files/t1-s1.webm/../../../../../{secret}",
        f"{base}/../../../../..{secret}",
        f"/api/recordings/..%2F..%2F{secret.parent.name}/files/secret.webm",
    ):
        status, body = await api.raw(target)
        assert status == 404 and b"SECRET" not in body, target


async def test_nothing_without_the_api_credentials(
    api: Http, root: Path, start_server: Start, http: aiohttp.ClientSession
) -> None:
    make_recording(root, rec_id(1))
    paths = [
        ("GET", "/api/recordings"),
        ("GET", f"/api/recordings/{rec_id(1)}"),
        ("GET", f"/api/recordings/{rec_id(1)}/files/t1-s1.webm"),
        ("DELETE", f"/api/recordings/{rec_id(1)}"),
    ]
    wrong = "Basic " + base64.b64encode(f"{KEY}:not-the-secret".encode()).decode()
    for method, path in paths:
        for headers, code in (({}, "unauthorized"), ({"Authorization": wrong}, "bad_credentials")):
            status, body = await api.json(method, path, headers)
            assert (status, body["code"]) == (401, code), (method, path)
    assert (root / rec_id(1) / "t1-s1.webm").exists()  # the DELETEs did nothing
    # Open mode: the API is disabled, recordings too.
    open_server = await start_server(recording__path=str(root))
    open_api = Http(http, open_server)
    for method, path in paths:
        status, body = await open_api.json(method, path, {})
        assert (status, body["code"]) == (403, "api_disabled"), (method, path)


# --- deleting -----------------------------------------------------------------------------------


async def test_delete_finished_and_refuse_while_recording(api: Http, root: Path) -> None:
    make_recording(root, rec_id(1))
    make_recording(root, rec_id(2), ended_at=None)
    make_recording(
        root, rec_id(3), mixed={"file": "mixed.webm", "status": "pending", "error": None}
    )
    for n in (2, 3):
        status, body = await api.json("DELETE", f"/api/recordings/{rec_id(n)}")
        assert (status, body["code"]) == (409, "recording_active") and body["message"]
        assert (root / rec_id(n) / "t1-s1.webm").exists()
    status, body = await api.json("DELETE", f"/api/recordings/{rec_id(1)}")
    assert (status, body) == (200, {"id": rec_id(1), "deleted": True})
    assert sorted(os.listdir(root)) == [rec_id(2), rec_id(3)]
    status, body = await api.json("DELETE", f"/api/recordings/{rec_id(1)}")
    assert (status, body["code"]) == (404, "no_such_recording")
    status, body = await api.json("GET", "/api/recordings")
    assert [r["id"] for r in body["recordings"]] == [rec_id(3), rec_id(2)]  # same start: by id
    assert api.server.app[RECORDINGS].deleted == 1


# --- the age limit and the storage cap, through the server --------------------------------------


async def test_prune_by_age_on_the_running_server(
    start_server: Start, http: aiohttp.ClientSession, root: Path
) -> None:
    server = await start_server(
        auth__api_key=KEY,
        auth__api_secret=SECRET,
        recording__path=str(root),
        recording__max_age_days=2,
    )
    api, library = Http(http, server), server.app[RECORDINGS]
    assert library._task is not None and not library._task.done()  # the periodic pass runs
    now = library.now_ms()
    make_recording(root, rec_id(1), started_at=now - 5 * DAY_MS, ended_at=now - 3 * DAY_MS)
    make_recording(root, rec_id(2), started_at=now - 3 * DAY_MS, ended_at=now - DAY_MS)
    make_recording(root, rec_id(3), started_at=now - 4 * DAY_MS, ended_at=None)  # recording
    make_recording(
        root,
        rec_id(4),
        started_at=now - 9 * DAY_MS,
        ended_at=now - 8 * DAY_MS,
        mixed={"file": "mixed.webm", "status": "pending", "error": None},
    )
    (root / f".{rec_id(5)}.deleting").mkdir()  # a deletion a crash interrupted
    (root / f".{rec_id(5)}.deleting" / "t1-s1.webm").write_bytes(WEBM)
    assert await library.prune() == [rec_id(1)]
    assert sorted(os.listdir(root)) == [rec_id(2), rec_id(3), rec_id(4)]
    status, body = await api.json("GET", "/api/recordings")
    assert {r["id"] for r in body["recordings"]} == {rec_id(2), rec_id(3), rec_id(4)}
    # A day later the second goes too; the busy ones stay whatever their age.
    assert await library.prune(now + 2 * DAY_MS) == [rec_id(2)]
    assert library.pruned == 2 and library.stored == 2
    status, body = await api.json("GET", "/api/recordings")
    assert status == 200 and {r["id"] for r in body["recordings"]} == {rec_id(3), rec_id(4)}
    async with http.get(f"http://127.0.0.1:{server.port}/metrics", headers=BASIC) as r:
        text = await r.text()
    assert "rallypoint_recordings_pruned_total 2.0" in text
    assert re.search(r"^rallypoint_recordings 2\.0$", text, re.M)


async def test_the_periodic_pass_prunes(tmp_path: Path) -> None:
    """The task ``start()`` runs prunes every ``prune_interval_s``, and goes on after a pass
    that failed."""
    root = tmp_path / "recs"
    cfg = RecordingSection(max_age_days=1, prune_interval_s=0.01)
    library = RecordingLibrary(root, cfg, clock=lambda: NOW / 1000)
    root.write_bytes(b"")  # not a directory: the first passes fail
    library.start()
    try:
        async with asyncio.timeout(5):
            while library.prune_failures == 0:
                await asyncio.sleep(0.01)
            root.unlink()
            make_recording(root, rec_id(1), started_at=NOW - 3 * DAY_MS, ended_at=NOW - 2 * DAY_MS)
            make_recording(root, rec_id(2), started_at=NOW - 3 * DAY_MS, ended_at=NOW)
            while (root / rec_id(1)).exists():
                await asyncio.sleep(0.01)
    finally:
        await library.close()
    assert (root / rec_id(2)).exists()
    assert library.pruned == 1 and library._task is None


async def test_start_up_closes_what_a_crash_left_and_prunes(
    start_server: Start, http: aiohttp.ClientSession, root: Path
) -> None:
    """A server that starts finds recordings a previous run left busy: it closes them
    (ended at their last write, stop_reason "error"; a pending mixed file failed), so that
    they can be deleted, and applies the age limit before serving."""
    import time

    now = int(time.time() * 1000)
    make_recording(root, rec_id(1), started_at=now - 60_000, ended_at=None)
    make_recording(
        root, rec_id(2), mixed={"file": "mixed.webm", "status": "pending", "error": None}
    )
    make_recording(root, rec_id(3), started_at=now - 40 * DAY_MS, ended_at=now - 31 * DAY_MS)
    last_write = (root / rec_id(1) / "t2-s1.ogg").stat().st_mtime_ns // 1_000_000
    server = await start_server(
        auth__api_key=KEY, auth__api_secret=SECRET, recording__path=str(root)
    )
    api = Http(http, server)
    status, m1 = await api.json("GET", f"/api/recordings/{rec_id(1)}")
    assert m1["stop_reason"] == "error" and m1["ended_at"] >= last_write
    status, m2 = await api.json("GET", f"/api/recordings/{rec_id(2)}")
    assert m2["mixed"] == {"file": "mixed.webm", "status": "failed", "error": "interrupted"}
    assert m2["stop_reason"] == "stopped"
    assert not (root / rec_id(3)).exists()  # 31 days old: pruned at start-up
    for n in (1, 2):
        status, body = await api.json("DELETE", f"/api/recordings/{rec_id(n)}")
        assert status == 200, body


async def test_storage_cap_refuses_new_recordings(
    start_server: Start, http: aiohttp.ClientSession, root: Path
) -> None:
    server = await start_server(
        auth__api_key=KEY,
        auth__api_secret=SECRET,
        recording__path=str(root),
        recording__max_bytes=MIB,
        recording__max_total_bytes=3 * MIB,
    )
    library = server.app[RECORDINGS]
    old = make_recording(root, rec_id(1))
    (root / rec_id(1) / "t1-s1.webm").write_bytes(b"\0" * (MIB + MIB // 2))  # 1.5 MiB stored
    await library.check_can_start()  # 1.5 + 1 <= 3
    m, directory = await library.create(room="lobby", by={"api": True})
    # The new one: its directory (0750) and first manifest, in the recorder's format.
    assert re.fullmatch(r"rec_[0-9a-f]{16}", m.id) and directory == root / m.id
    assert stat.S_IMODE(directory.stat().st_mode) == 0o750
    raw = json.loads((directory / "manifest.json").read_text())
    assert raw == {
        **manifest(m.id, room="lobby", started_at=raw["started_at"], ended_at=None, files=()),
        "by": {"api": True},
        "participants": [],
    }
    assert abs(raw["started_at"] - library.now_ms()) < 60_000
    assert [r["id"] for r in (await library.list_page())[0]] == [m.id, old["id"]]
    # It may still write 1 MiB: 1.5 + 1 (reserved) + 1 > 3, refused.
    with pytest.raises(RecordingError) as e:
        await library.create(room="lobby", by={"api": True})
    assert e.value.code == "recording_storage_full" and library.refused_full == 1
    # Deleting the old one makes room again.
    status, _ = await Http(http, server).json("DELETE", f"/api/recordings/{rec_id(1)}")
    assert status == 200
    second, _ = await library.create(room="side", by={"identity": "bob", "name": "Bob"})
    assert second.id != m.id and second.room == "side"
    assert await library.total_bytes() == bytes_under(root)


async def test_disabled_refuses_new_recordings_but_serves_old_ones(
    start_server: Start, http: aiohttp.ClientSession, root: Path
) -> None:
    server = await start_server(
        auth__api_key=KEY,
        auth__api_secret=SECRET,
        recording__path=str(root),
        recording__enabled=False,
    )
    make_recording(root, rec_id(1))
    with pytest.raises(RecordingError) as e:
        await server.app[RECORDINGS].create(room="lobby", by={"api": True})
    assert e.value.code == "recording_disabled"
    status, body = await Http(http, server).json("GET", "/api/recordings")
    assert status == 200 and [r["id"] for r in body["recordings"]] == [rec_id(1)]


async def test_default_root_is_in_the_data_directory(start_server: Start, tmp_path: Path) -> None:
    server = await start_server()
    library = server.app[RECORDINGS]
    assert library.root == tmp_path / "data" / "recordings"
    _, directory = await library.create(room="lobby", by={"api": True})
    assert directory.parent == tmp_path / "data" / "recordings"


# --- the pure decisions -------------------------------------------------------------------------


def stored(n: int, *, ended_at: int | None, size: int = 100, **kw: Any) -> Stored:
    raw = manifest(rec_id(n), ended_at=ended_at, **kw)
    return Stored(parse_manifest(json.dumps(raw).encode(), rec_id(n)), size, NOW)


def test_plan_prune_by_age() -> None:
    recs = [
        stored(1, ended_at=NOW - 31 * DAY_MS),
        stored(2, ended_at=NOW - 30 * DAY_MS),  # exactly the limit: kept
        stored(3, ended_at=NOW - 40 * DAY_MS),
        stored(4, ended_at=None, started_at=NOW - 90 * DAY_MS),  # still recording
        stored(5, ended_at=NOW - 50 * DAY_MS, mixed={"file": "m.webm", "status": "pending"}),
        stored(6, ended_at=NOW - 50 * DAY_MS, mixed={"file": "m.webm", "status": "done"}),
        stored(7, ended_at=NOW),
    ]
    assert plan_prune(recs, NOW, 30) == [rec_id(6), rec_id(3), rec_id(1)]  # oldest first
    assert plan_prune(recs, NOW, 0) == []  # kept forever
    assert plan_prune(recs, NOW + 100 * DAY_MS, 1) == [
        rec_id(6),
        rec_id(3),
        rec_id(1),
        rec_id(2),
        rec_id(7),
    ]
    assert plan_prune([], NOW, 30) == []


def test_storage_cap_counts_what_running_recordings_may_still_write() -> None:
    done = stored(1, ended_at=NOW, size=5 * MIB)
    running_small = stored(2, ended_at=None, size=MIB // 2)
    running_big = stored(3, ended_at=None, size=3 * MIB)  # already past max_bytes
    scan = Scan([done, running_small, running_big], other_bytes=7)
    assert committed_bytes(scan, 2 * MIB) == 5 * MIB + 2 * MIB + 3 * MIB + 7
    assert scan.total_bytes == 5 * MIB + MIB // 2 + 3 * MIB + 7
    assert admits(scan, 2 * MIB, 12 * MIB + 7)
    assert not admits(scan, 2 * MIB, 12 * MIB + 6)
    assert admits(scan, 2 * MIB, 0)  # no cap
    assert admits(Scan(), 2 * MIB, 2 * MIB)


def test_paging_and_cursors() -> None:
    recs = [stored(n, ended_at=NOW, started_at=NOW + (n // 2)) for n in range(7)]
    out: list[str] = []
    cursor: str | None = None
    for _ in range(10):
        found, cursor = page(recs, room=None, limit=3, cursor=cursor)
        out += [r.manifest.id for r in found]
        if cursor is None:
            break
    assert out == [rec_id(n) for n in (6, 5, 4, 3, 2, 1, 0)]
    found, cursor = page(recs, room="lobby", limit=7, cursor=None)
    assert len(found) == 7 and cursor is None
    assert page(recs, room="other", limit=5, cursor=None) == ([], None)
    c = encode_cursor(recs[3].manifest)
    assert decode_cursor(c) == (recs[3].manifest.started_at, rec_id(3))
    for bad in ("", "!", "x" * 65, base64.urlsafe_b64encode(b"12.rec_zz").decode(), "MTI"):
        with pytest.raises(ValueError):
            decode_cursor(bad)


@pytest.mark.parametrize(
    "change",
    [
        {"version": 2},
        {"id": rec_id(9)},
        {"room": 5},
        {"started_at": "1"},
        {"started_at": True},
        {"ended_at": 1.5},
        {"tracks": None},
        {"tracks": [{"segments": [{"file": 3}]}]},
        {"mixed": {"status": "done"}},
    ],
)
def test_parse_manifest_refuses_what_it_cannot_use(change: dict[str, Any]) -> None:
    raw = {**manifest(rec_id(1)), **change}
    with pytest.raises(ValueError):
        parse_manifest(json.dumps(raw).encode(), rec_id(1))


def test_parse_manifest_serves_only_plain_names() -> None:
    raw = manifest(
        rec_id(1), files=("t1-s1.webm", "../x.webm", "/etc/passwd", "a.b.webm", "t2-s1.mkv")
    )
    m: Manifest = parse_manifest(json.dumps(raw).encode(), rec_id(1))
    assert m.files == ("t1-s1.webm", "t2-s1.mkv")
    with pytest.raises(ValueError):
        parse_manifest(b"[]", rec_id(1))


def test_interrupted_recordings_are_closed_as_errors() -> None:
    rec = stored(1, ended_at=None, started_at=NOW)
    raw = interrupted(rec.manifest, NOW + 5000)
    assert raw is not None and raw["ended_at"] == NOW + 5000 and raw["stop_reason"] == "error"
    assert interrupted(replace(rec.manifest, raw={**rec.manifest.raw}), NOW - 1) == {
        **rec.manifest.raw,
        "ended_at": NOW,  # never before it started
        "stop_reason": "error",
    }
    assert interrupted(stored(2, ended_at=NOW).manifest, NOW) is None


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("max_bytes", 1000, "recording.max_bytes"),
        ("max_total_bytes", 2 * MIB, "recording.max_total_bytes"),
        ("max_age_days", -1, "recording.max_age_days"),
        ("prune_interval_s", 0, "recording.prune_interval_s"),
        ("colour", "red", "unknown key recording.colour"),
    ],
)
def test_bad_recording_config(key: str, value: Any, needle: str) -> None:
    overrides: dict[str, Any] = {"recording.max_bytes": 4 * MIB, f"recording.{key}": value}
    with pytest.raises(ConfigError) as e:
        load_config(None, env={}, overrides=overrides)
    assert needle in str(e.value)


def test_recording_config_defaults() -> None:
    cfg = load_config(None, env={"RALLYPOINT_RECORDING_MAX_AGE_DAYS": "0"})
    assert cfg.recording == RecordingSection(max_age_days=0)
    assert cfg.recording.max_bytes == 2 * 1024**3 and cfg.recording.max_total_bytes == 20 * 1024**3
    assert cfg.recording.enabled and not cfg.recording.mix and cfg.recording.path == ""


# --- the documents ------------------------------------------------------------------------------

SPEC = json.loads((Path(__file__).resolve().parent.parent / "docs" / "openapi.json").read_text())


def check_against_spec(schema: str, value: Any) -> None:
    """``value`` is valid for ``components.schemas[schema]`` of docs/openapi.json."""
    from jsonschema import Draft202012Validator

    Draft202012Validator(
        {"$ref": f"#/components/schemas/{schema}", "components": SPEC["components"]}
    ).validate(value)


async def test_answers_match_the_documented_schemas(api: Http, root: Path) -> None:
    make_recording(root, rec_id(1), mixed={"file": "mixed.webm", "status": "done", "error": None})
    made, _ = await api.server.app[RECORDINGS].create(room="lobby", by={"api": True})
    status, body = await api.json("GET", "/api/recordings")
    assert status == 200 and len(body["recordings"]) == 2
    check_against_spec("RecordingList", body)
    for rid in (rec_id(1), made.id):
        status, body = await api.json("GET", f"/api/recordings/{rid}")
        check_against_spec("RecordingManifest", body)
    from jsonschema import ValidationError

    bad_track = {**manifest(rec_id(1))["tracks"][0], "kind": "smell"}
    with pytest.raises(ValidationError, match="'smell' is not one of"):
        check_against_spec("RecordingManifest", {**body, "tracks": [bad_track]})


def test_documented_error_codes_are_the_servers() -> None:
    from signaling.net.http_api import API_ERRORS

    assert set(SPEC["components"]["schemas"]["Error"]["properties"]["code"]["enum"]) == set(
        API_ERRORS
    )


async def test_changes_on_disk_are_seen(api: Http, root: Path) -> None:
    """Finished recordings are remembered between looks (by their manifest's inode, mtime and
    size): a rewritten manifest, a directory without one and a removed one are seen all the
    same, and the storage total counts what is not a recording."""
    library = api.server.app[RECORDINGS]
    make_recording(root, rec_id(1))
    make_recording(root, rec_id(2), ended_at=None)
    assert [r["id"] for r in (await library.list_page())[0]] == [rec_id(2), rec_id(1)]
    m = manifest(rec_id(1), room="renamed")
    (root / rec_id(1) / "manifest.json").write_text(json.dumps(m))
    (root / rec_id(2) / "t3-s1.webm").write_bytes(WEBM)  # still recording: grows
    (root / rec_id(3)).mkdir()  # no manifest (yet): not listed, its bytes counted
    (root / rec_id(3) / "t1-s1.webm").write_bytes(WEBM)
    found, _ = await library.list_page()
    assert [(r["id"], r["room"]) for r in found] == [(rec_id(2), "lobby"), (rec_id(1), "renamed")]
    assert found[0]["bytes"] == bytes_under(root / rec_id(2))
    assert await library.total_bytes() == bytes_under(root)
    await asyncio.to_thread(shutil.rmtree, root / rec_id(1))
    assert [r["id"] for r in (await library.list_page())[0]] == [rec_id(2)]
