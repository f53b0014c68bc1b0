"""Recording in the SFU worker with real aiortc publishers: a ``Worker`` driven through its
channel ops (its events read from the other end of a real socket pair), the project's marker
clips published into a room, and the files decoded with PyAV afterwards."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
import statistics
import subprocess
import time
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import pytest
from aiortc import RTCBundlePolicy, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from sfu_helpers import until

from media.clip import Clip, ClipSpec, load_clip
from media.loss import inject_loss
from media.marker import read_marker
from media.tracks import EncodedAudioTrack, EncodedVideoTrack, attach_keyframe_requests
from sfu.channel import read_frame
from sfu.forward import Counters, UpTrack
from sfu.recording.manifest import Manifest
from sfu.recording.recorder import RoomRecorder
from sfu.room import MediaError
from sfu.worker import Worker

FPS = 30
CLIP_FRAMES = 120  # 4 s clips: markers wrap at 120


class StampedVideo(EncodedVideoTrack):
    """The clip's video, noting the wall time each frame went to the sender."""

    def __init__(self, clip: Clip) -> None:
        super().__init__(clip)
        self.sent: list[float] = []

    async def recv(self) -> av.Packet:
        packet = await super().recv()
        self.sent.append(time.time())
        return packet


class StampedAudio(EncodedAudioTrack):
    def __init__(self, clip: Clip) -> None:
        super().__init__(clip)
        self.sent: list[float] = []

    async def recv(self) -> av.Packet:
        packet = await super().recv()
        self.sent.append(time.time())
        return packet


@dataclass
class Publisher:
    pid: str
    pc: RTCPeerConnection
    video: StampedVideo
    audio: StampedAudio
    mids: dict[str, str]  # kind -> mid


@dataclass
class Sfu:
    """A worker and what it said on its channel."""

    worker: Worker
    room: str
    events: list[dict[str, Any]] = field(default_factory=list)
    pcs: list[RTCPeerConnection] = field(default_factory=list)

    async def request(self, req: dict[str, Any]) -> dict[str, Any]:
        return await self.worker.handle(req)  # type: ignore[arg-type]

    async def publish(
        self, pid: str, identity: str, clip: Clip, *, kinds: tuple[str, ...] = ("video", "audio")
    ) -> Publisher:
        await self.request(
            {
                "op": "join",
                "room": self.room,
                "participant": pid,
                "subscribe": False,
                "identity": identity,
                "name": identity.title(),
            }
        )
        pc = RTCPeerConnection(
            RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)
        )
        self.pcs.append(pc)
        video, audio = StampedVideo(clip), StampedAudio(clip)
        trs = {}
        if "video" in kinds:
            trs["video"] = pc.addTransceiver(video, direction="sendonly")
            attach_keyframe_requests(trs["video"].sender, video)
        if "audio" in kinds:
            trs["audio"] = pc.addTransceiver(audio, direction="sendonly")
        await self._offer(pid, pc, trs)
        return Publisher(pid, pc, video, audio, {k: t.mid or "" for k, t in trs.items()})

    async def _offer(self, pid: str, pc: RTCPeerConnection, trs: dict[str, Any]) -> None:
        await pc.setLocalDescription(await pc.createOffer())
        answer = await self.request(
            {
                "op": "publish",
                "room": self.room,
                "participant": pid,
                "sdp": pc.localDescription.sdp,
                "tracks": [
                    {"mid": t.mid, "source": "camera" if k == "video" else "microphone"}
                    for k, t in trs.items()
                ],
            }
        )
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))

    async def republish(self, p: Publisher) -> None:
        """Offer the same tracks again (after an unpublish: they come back as new tracks)."""
        trs = {t.kind: t for t in p.pc.getTransceivers()}
        await self._offer(p.pid, p.pc, trs)

    def uptrack(self, p: Publisher, kind: str) -> Any:
        return self.worker.rooms[self.room].tracks[f"{p.pid}:{p.mids[kind]}"]

    async def start(self, directory: Path, **options: Any) -> str:
        rec = "rec_" + os.urandom(8).hex()
        req: dict[str, Any] = {
            "op": "record_start",
            "room": self.room,
            "recording": rec,
            "directory": str(directory / rec),
            "audio_only": False,
            "identities": None,
            "by": {"identity": "alice", "name": "Alice"},
            "max_bytes": 1 << 30,
        }
        req.update(options)
        assert await self.request(req) == {}
        return rec

    async def event(self, ev: str, timeout: float) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                for e in self.events:
                    if e.get("ev") == ev:
                        return e
                await asyncio.sleep(0.05)


SfuFactory = Callable[[str], Awaitable[Sfu]]


@pytest.fixture
async def sfu() -> AsyncIterator[SfuFactory]:
    """``await sfu("vp8")``: a worker on a real socket pair, its events collected."""
    made: list[tuple[Sfu, asyncio.Task[None], asyncio.Task[None], Any]] = []

    async def make(codec: str) -> Sfu:
        a, b = socket.socketpair()
        _, writer = await asyncio.open_unix_connection(sock=a)
        reader, other = await asyncio.open_unix_connection(sock=b)
        s = Sfu(Worker(writer, codec), "call")

        async def read() -> None:
            while (msg := await read_frame(reader)) is not None:
                s.events.append(msg)

        async def tick() -> None:
            await s.worker.ticker()

        made.append((s, asyncio.ensure_future(read()), asyncio.ensure_future(tick()), other))
        return s

    yield make
    for s, reading, ticking, other in made:
        ticking.cancel()
        for pc in s.pcs:
            await pc.close()
        await s.worker.close()
        reading.cancel()
        await asyncio.gather(reading, ticking, return_exceptions=True)
        s.worker.writer.close()
        other.close()


def clip(n: int, codec: str = "vp8", audio: str = "tone") -> Clip:
    return load_clip(ClipSpec(publisher_id=n, seconds=4.0, codec=codec, audio=audio))  # type: ignore[arg-type]


def manifest(directory: Path, rec: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((directory / rec / "manifest.json").read_text())
    return doc


def track_of(doc: dict[str, Any], pid: str, kind: str) -> dict[str, Any]:
    (t,) = [t for t in doc["tracks"] if t["participant"] == pid and t["kind"] == kind]
    return t


@dataclass
class VideoFile:
    indices: list[int]  # marker index of every decoded frame
    times: list[float]  # pts of each frame, seconds from the file's start
    corrupt: int


def decode_video(path: Path) -> VideoFile:
    out = VideoFile([], [], 0)
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        for frame in c.decode(stream):
            if frame.format.name != "yuv420p":
                frame = frame.reformat(format="yuv420p")
            plane = frame.planes[0]
            m = read_marker(memoryview(plane), plane.line_size, frame.width)
            if m is None:
                out.corrupt += 1
                continue
            out.indices.append(m.index)
            assert frame.pts is not None and frame.time_base is not None
            out.times.append(float(frame.pts * frame.time_base))
    return out


def decode_audio(path: Path) -> tuple[list[float], int]:
    """Each decoded sample's absolute value (first channel) and the time of the first
    (seconds from the file's start, after the pre-skip)."""
    samples: list[float] = []
    first: float | None = None
    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        assert stream.codec_context.extradata.startswith(b"OpusHead")
        for frame in c.decode(stream):
            if first is None:
                assert frame.pts is not None and frame.time_base is not None
                first = float(frame.pts * frame.time_base)
            assert frame.format.name == "fltp"
            plane = array("f", bytes(frame.planes[0]))[: frame.samples]  # the first channel
            samples.extend(abs(v) for v in plane)
    assert first is not None
    return samples, round(first * 48000)


def consecutive(indices: list[int]) -> bool:
    return all(b == (a + 1) % CLIP_FRAMES for a, b in itertools.pairwise(indices))


def video_error(vf: VideoFile, start: float, sent: list[float]) -> list[float]:
    """Recorded time on the common clock minus the time each frame was sent, per frame (the
    frame's global number is the one with its marker index sent closest to that time)."""
    errors = []
    for index, t in zip(vf.indices, vf.times, strict=True):
        recorded = start + t
        n = min(
            (n for n in range(index, len(sent), CLIP_FRAMES)), key=lambda n: abs(sent[n] - recorded)
        )
        errors.append(recorded - sent[n])
    return errors


def beep_onsets(samples: list[float], first: int) -> list[int]:
    """Sample numbers (from the file's time 0) where a beep starts after >= 200 ms of quiet."""
    peak = max(samples)
    onsets = []
    quiet = 0
    for i, v in enumerate(samples):
        if v > peak * 0.2:
            if quiet >= 9600:
                onsets.append(i + first)
            quiet = 0
        else:
            quiet += 1
    return onsets


def audio_error(onsets: list[int], start: float, sent: list[float]) -> list[float]:
    """Recorded time of each beep minus the time the packet it starts in was sent."""
    errors = []
    for s in onsets:
        recorded = start + s / 48000
        # A beep starts every 50 packets (one per second of clip time).
        n = min(range(0, len(sent), 50), key=lambda n: abs(sent[n] - recorded))
        errors.append(recorded - sent[n])
    return errors


async def frames_after(p: Publisher, n: int, timeout: float) -> None:
    """Wait until publisher ``p`` has sent ``n`` more video frames."""
    target = len(p.video.sent) + n
    await until(lambda: len(p.video.sent) >= target, timeout)


# -- tests -----------------------------------------------------------------------------------


async def test_vp8_room_is_recorded_per_track_and_aligned(sfu: SfuFactory, tmp_path: Path) -> None:
    s = await sfu("vp8")
    alice = await s.publish("pa", "alice", clip(1, audio="beeps"))
    bob = await s.publish("pb", "bob", clip(2, audio="beeps"))
    await frames_after(alice, 45, 20)  # flowing, with a few sender reports behind it
    t0 = time.time()
    rec = await s.start(tmp_path)
    with pytest.raises(MediaError) as e:
        await s.start(tmp_path)
    assert e.value.code == "already_recording"
    # While recording, the manifest names the files so far, not ended.
    await until(lambda: len(manifest(tmp_path, rec)["tracks"]) == 4, 10)
    doc = manifest(tmp_path, rec)
    assert doc["ended_at"] is None and doc["stop_reason"] is None
    assert not any(seg["complete"] for t in doc["tracks"] for seg in t["segments"])
    await frames_after(alice, 4 * FPS, 20)
    t1 = time.time()
    assert await s.request({"op": "record_stop", "room": s.room}) == {"recording": rec}
    with pytest.raises(MediaError) as e:
        await s.request({"op": "record_stop", "room": s.room})
    assert e.value.code == "not_recording"

    doc = manifest(tmp_path, rec)
    assert doc["id"] == rec and doc["room"] == "call" and doc["version"] == 1
    assert doc["by"] == {"identity": "alice", "name": "Alice"}
    assert doc["stop_reason"] == "stopped" and doc["ended_at"] >= doc["started_at"]
    assert abs(doc["started_at"] / 1000 - t0) < 0.5
    assert {(p["participant"], p["identity"], p["name"]) for p in doc["participants"]} == {
        ("pa", "alice", "Alice"),
        ("pb", "bob", "Bob"),
    }
    assert sorted(os.listdir(tmp_path / rec)) == sorted(
        ["manifest.json", "t1-s1.webm", "t2-s1.ogg", "t3-s1.webm", "t4-s1.ogg"]
        if doc["tracks"][0]["kind"] == "video"
        else ["manifest.json", "t1-s1.ogg", "t2-s1.webm", "t3-s1.ogg", "t4-s1.webm"]
    )
    video_errors: dict[str, float] = {}
    audio_errors: dict[str, float] = {}
    for p in (alice, bob):
        vt = track_of(doc, p.pid, "video")
        assert (vt["codec"], vt["source"], vt["track"]) == (
            "vp8",
            "camera",
            f"{p.pid}:{p.mids['video']}",
        )
        (seg,) = vt["segments"]
        assert seg["container"] == "webm" and seg["complete"] is True
        path = tmp_path / rec / seg["file"]
        assert seg["bytes"] == path.stat().st_size
        vf = decode_video(path)
        # Every frame decodes and shows its marker; no frame is missing or repeated.
        assert vf.corrupt == 0 and consecutive(vf.indices), vf.indices
        assert len(vf.indices) == seg["frames"]
        assert vf.times[0] == 0.0
        sent = sum(1 for t in p.video.sent if t0 <= t <= t1)
        assert sent - 4 <= seg["frames"] <= sent + 1, (sent, seg["frames"])
        assert seg["duration"] == pytest.approx(seg["frames"] / FPS, abs=0.05)
        start = doc["started_at"] / 1000 + seg["start"]
        assert 0 <= seg["start"] < 0.5
        errs = video_error(vf, start, p.video.sent)
        assert max(errs) - min(errs) < 0.02  # the timestamps inside the file are the sender's
        video_errors[p.pid] = statistics.median(errs)

        at = track_of(doc, p.pid, "audio")
        assert (at["codec"], at["source"]) == ("opus", "microphone")
        (aseg,) = at["segments"]
        assert aseg["container"] == "ogg" and aseg["complete"] is True
        samples, first = decode_audio(tmp_path / rec / aseg["file"])
        asent = sum(1 for t in p.audio.sent if t0 <= t <= t1)
        assert asent - 5 <= aseg["frames"] <= asent + 1, (asent, aseg["frames"])
        assert abs(len(samples) - aseg["frames"] * 960) <= 960
        onsets = beep_onsets(samples, first)
        assert len(onsets) >= 3, onsets
        aerrs = audio_error(onsets, doc["started_at"] / 1000 + aseg["start"], p.audio.sent)
        audio_errors[p.pid] = statistics.median(aerrs)
    print("video errors", video_errors, "audio errors", audio_errors)
    for pid in ("pa", "pb"):  # audio and video of one publisher
        assert abs(video_errors[pid] - audio_errors[pid]) < 0.040
    assert abs(video_errors["pa"] - video_errors["pb"]) < 0.040  # two publishers


async def test_h264_room_recording_ends_when_the_room_closes(
    sfu: SfuFactory, tmp_path: Path
) -> None:
    s = await sfu("h264")
    alice = await s.publish("pa", "alice", clip(1, "h264"))
    await frames_after(alice, 15, 20)
    rec = await s.start(tmp_path)
    await frames_after(alice, 3 * FPS, 20)
    await s.request({"op": "leave", "room": s.room, "participant": "pa"})
    ev = await s.event("recording_stopped", 10)
    assert ev == {
        "ev": "recording_stopped",
        "room": "call",
        "recording": rec,
        "reason": "room_closed",
    }
    assert s.room not in s.worker.rooms
    doc = manifest(tmp_path, rec)
    assert doc["stop_reason"] == "room_closed"
    vt = track_of(doc, "pa", "video")
    assert vt["codec"] == "h264"
    (seg,) = vt["segments"]
    assert seg["container"] == "mkv" and seg["file"].endswith(".mkv") and seg["complete"]
    vf = decode_video(tmp_path / rec / seg["file"])
    assert vf.corrupt == 0 and consecutive(vf.indices) and len(vf.indices) == seg["frames"]
    assert seg["frames"] >= 3 * FPS - 5


async def test_recording_under_loss_stays_decodable(sfu: SfuFactory, tmp_path: Path) -> None:
    s = await sfu("vp8")
    alice = await s.publish("pa", "alice", clip(1, audio="beeps"))
    await frames_after(alice, 45, 20)
    loss = inject_loss(alice.pc, 0.05, seed=3)
    t0 = time.time()
    rec = await s.start(tmp_path)
    await frames_after(alice, 4 * FPS, 20)
    t1 = time.time()
    await s.request({"op": "record_stop", "room": s.room})
    assert loss.counts.media_dropped > 20  # the loss was real
    doc = manifest(tmp_path, rec)
    (seg,) = track_of(doc, "pa", "video")["segments"]
    vf = decode_video(tmp_path / rec / seg["file"])
    assert vf.corrupt == 0 and len(vf.indices) == seg["frames"]  # every frame decodes
    gaps = sum(1 for a, b in itertools.pairwise(vf.indices) if b != (a + 1) % CLIP_FRAMES)
    # NACK/RTX repairs video loss: almost every frame is there.
    print("loss", loss.counts, "frames", seg["frames"], "gaps", gaps)
    assert seg["frames"] >= 4 * FPS - 35  # an unrepaired loss costs ~0.5 s (deadline + keyframe)
    # Audio is not repaired (no NACK for Opus): lost packets are concealed, so the stream
    # stays continuous and in step with the video.
    (aseg,) = track_of(doc, "pa", "audio")["segments"]
    samples, first = decode_audio(tmp_path / rec / aseg["file"])
    asent = sum(1 for t in alice.audio.sent if t0 <= t <= t1)
    assert asent - 5 <= aseg["frames"] <= asent + 1, (asent, aseg["frames"])
    assert abs(len(samples) - aseg["frames"] * 960) <= 960
    verrs = video_error(vf, doc["started_at"] / 1000 + seg["start"], alice.video.sent)
    onsets = beep_onsets(samples, first)
    aerrs = audio_error(onsets, doc["started_at"] / 1000 + aseg["start"], alice.audio.sent)
    print("under loss: video error", statistics.median(verrs), "audio errors", aerrs)
    assert len(onsets) >= 3
    assert all(abs(e - statistics.median(verrs)) < 0.040 for e in aerrs)  # every beep


async def test_size_limit_stops_with_valid_files(sfu: SfuFactory, tmp_path: Path) -> None:
    s = await sfu("vp8")
    alice = await s.publish("pa", "alice", clip(1))
    await frames_after(alice, 15, 20)
    rec = await s.start(tmp_path, max_bytes=150_000)  # ~1.5 s at 800 kbps
    ev = await s.event("recording_stopped", 15)
    assert ev == {
        "ev": "recording_stopped",
        "room": "call",
        "recording": rec,
        "reason": "size_limit",
    }
    assert s.worker.rooms[s.room].recorder is None
    assert s.uptrack(alice, "video").tap is None  # forwarding goes on, untapped
    with pytest.raises(MediaError) as e:
        await s.request({"op": "record_stop", "room": s.room})
    assert e.value.code == "not_recording"
    doc = manifest(tmp_path, rec)
    assert doc["stop_reason"] == "size_limit" and doc["ended_at"] is not None
    (seg,) = track_of(doc, "pa", "video")["segments"]
    vf = decode_video(tmp_path / rec / seg["file"])
    assert vf.corrupt == 0 and consecutive(vf.indices) and len(vf.indices) == seg["frames"] > 10
    total = sum(sg["bytes"] for t in doc["tracks"] for sg in t["segments"])
    assert 150_000 <= total < 250_000


async def test_republished_track_gets_a_second_segment_and_selection_holds(
    sfu: SfuFactory, tmp_path: Path
) -> None:
    s = await sfu("vp8")
    alice = await s.publish("pa", "alice", clip(1))
    bob = await s.publish("pb", "bob", clip(2))
    await frames_after(alice, 15, 20)
    rec = await s.start(tmp_path, audio_only=True, identities=["alice"])
    await frames_after(alice, FPS, 20)
    assert s.uptrack(alice, "video").tap is None and s.uptrack(bob, "audio").tap is None
    audio_id = f"pa:{alice.mids['audio']}"
    await s.request({"op": "unpublish", "room": s.room, "participant": "pa", "track": audio_id})
    await until(
        lambda: (
            len(track_of(manifest(tmp_path, rec), "pa", "audio")["segments"]) == 1
            and track_of(manifest(tmp_path, rec), "pa", "audio")["segments"][0]["complete"]
        ),
        10,
    )
    await s.republish(alice)
    assert s.uptrack(alice, "audio").tap is not None
    await frames_after(alice, FPS, 20)
    await s.request({"op": "record_stop", "room": s.room})
    doc = manifest(tmp_path, rec)
    assert doc["audio_only"] is True and doc["identities"] == ["alice"]
    (t,) = doc["tracks"]  # alice's audio only: no video, nothing of bob's
    assert t["track"] == audio_id and [p["identity"] for p in doc["participants"]] == ["alice"]
    s1, s2 = t["segments"]
    assert (s1["file"], s2["file"]) == ("t1-s1.ogg", "t1-s2.ogg")
    assert s1["complete"] and s2["complete"]
    assert s2["start"] >= s1["start"] + s1["duration"] - 0.05
    for seg in (s1, s2):
        samples, _ = decode_audio(tmp_path / rec / seg["file"])
        assert seg["frames"] >= 40 and abs(len(samples) - seg["frames"] * 960) <= 960


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1.25 MiB tmpfs: a disk that fills up (mounting needs root, as CI and tests/run have)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1280k", "tmpfs", str(disk)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {done.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


async def test_full_disk_stops_cleanly_and_forwarding_goes_on(
    sfu: SfuFactory, small_disk: Path
) -> None:
    s = await sfu("vp8")
    alice = await s.publish("pa", "alice", clip(1))
    await frames_after(alice, 15, 20)
    rec = await s.start(small_disk)
    ev = await s.event("recording_stopped", 30)
    assert ev == {
        "ev": "recording_stopped",
        "room": "call",
        "recording": rec,
        "reason": "disk_full",
    }
    assert s.uptrack(alice, "video").tap is None and s.worker.rooms[s.room].recorder is None
    packets = s.worker.counters.packets_in
    await frames_after(alice, 10, 10)
    assert s.worker.counters.packets_in > packets  # the room goes on
    doc = manifest(small_disk, rec)  # the last manifest was written (the reserve was freed)
    assert doc["stop_reason"] == "disk_full" and doc["ended_at"] is not None
    assert not (small_disk / rec / ".reserve").exists()
    # It stopped before a write failed: the files are whole, every frame decodes, in order.
    (seg,) = track_of(doc, "pa", "video")["segments"]
    assert seg["complete"] is True
    vf = decode_video(small_disk / rec / seg["file"])
    assert vf.corrupt == 0 and consecutive(vf.indices) and len(vf.indices) == seg["frames"] >= 10
    (aseg,) = track_of(doc, "pa", "audio")["segments"]
    samples, _ = decode_audio(small_disk / rec / aseg["file"])
    assert aseg["complete"] and abs(len(samples) - aseg["frames"] * 960) <= 960


async def test_a_failed_write_stops_with_disk_full_and_keeps_what_was_written(
    sfu: SfuFactory, small_disk: Path
) -> None:
    """No free-space margin: a write fails with ENOSPC mid-file."""
    s = await sfu("vp8")
    fast = ClipSpec(publisher_id=1, seconds=4.0, video_bitrate=2_400_000)  # fills it sooner
    alice = await s.publish("pa", "alice", await asyncio.to_thread(load_clip, fast))
    await frames_after(alice, 15, 20)
    rec = "rec_" + os.urandom(8).hex()
    await s.worker.rooms[s.room].start_recording(
        {
            "op": "record_start",
            "room": s.room,
            "recording": rec,
            "directory": str(small_disk / rec),
            "audio_only": False,
            "identities": None,
            "by": {"api": True},
            "max_bytes": 1 << 30,
        },
        min_free=0,
    )
    ev = await s.event("recording_stopped", 30)
    assert ev["reason"] == "disk_full"
    doc = manifest(small_disk, rec)  # written after the failure (the reserve was freed)
    assert doc["stop_reason"] == "disk_full" and doc["by"] == {"api": True}
    (seg,) = track_of(doc, "pa", "video")["segments"]
    vf = decode_video(small_disk / rec / seg["file"])
    print("failed write: manifest", seg, "decoded", len(vf.indices), "corrupt", vf.corrupt)
    # What reached the disk decodes, in order (the last frame may be cut off).
    assert consecutive(vf.indices) and len(vf.indices) >= 30 and vf.corrupt <= 1


async def test_a_writer_too_far_behind_stops_taking_packets(tmp_path: Path) -> None:
    """A disk slower than the media: the writer thread is stuck (here writing its reserve file
    into a FIFO nobody reads yet). After ``max_backlog`` batches the recorder stops taking
    packets, so memory stays bounded; once the writer gets going again it writes what was
    queued and the recording ends by itself with ``error``."""
    directory = tmp_path / "rec"
    directory.mkdir()
    os.mkfifo(directory / ".reserve")
    stopped: list[str] = []
    manifest = Manifest(
        "rec_0123456789abcdef",
        "room",
        str(directory),
        by={"api": True},
        audio_only=False,
        identities=None,
    )
    rec = RoomRecorder(
        manifest,
        max_bytes=10**9,
        loop=asyncio.get_running_loop(),
        stopped_by_itself=stopped.append,
        max_backlog=3,
    )
    up = UpTrack("p:0", "p", "audio", "microphone", "opus", lambda: None, Counters())
    rec.attach(up, "alice", "Alice")  # the writer's queue: open
    seq = itertools.count()
    for _ in range(2):  # two batches: open + 2 < 3 queued, taken
        for _ in range(5):
            n = next(seq)
            up.forward(n, n * 960, False, b"\xfc" + bytes(40), 0, None)
        rec.flush()
        assert up.tap is not None and not rec.overrun
    n = next(seq)
    up.forward(n, n * 960, False, b"\xfc" + bytes(40), 0, None)
    rec.flush()  # 3 queued: too far behind
    assert rec.overrun and up.tap is None and rec.tracks == {}
    n = next(seq)
    up.forward(n, n * 960, False, b"\xfc" + bytes(40), 0, None)  # not taken any more
    assert up.tap is None
    reserve = await asyncio.to_thread((directory / ".reserve").read_bytes)  # the disk is back
    assert len(reserve) == 64 * 1024
    assert await asyncio.wait_for(asyncio.shield(rec.done), 10) == "error"
    await until(lambda: stopped == ["error"], 5)
    doc = json.loads((directory / "manifest.json").read_text())
    assert doc["stop_reason"] == "error"
    (track,) = doc["tracks"]
    assert track["segments"][0]["frames"] == 11  # what was queued was written
