"""The mixed file (``python -P -m sfu.recording.mix DIR``): recordings built here with PyAV
(solid-colour VP8 WebM and H.264 Matroska, Opus tones in Ogg), mixed by the real command in
a subprocess, and the result decoded: who is where and when, which tones are heard when, and
what the manifest says. Plus the pure parts (grid, fit, limiter, label, manifest checks)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from sfu.recording.mixplan import (
    SAMPLE_RATE,
    Limiter,
    ManifestError,
    Rect,
    draw_label,
    fit,
    grid,
    label_text,
    plan,
)

MIX = [sys.executable, "-P", "-m", "sfu.recording.mix"]
STARTED_AT = 1_795_812_967_321

# (Y, U, V) of the test colours (BT.601).
RED = (81, 90, 240)
GREEN = (145, 54, 34)
BLUE = (41, 240, 110)
BLACK = (16, 128, 128)


# --- building recordings ---------------------------------------------------------------


def solid(colour: tuple[int, int, int], w: int = 320, h: int = 240) -> av.VideoFrame:
    planes = np.empty(w * h * 3 // 2, dtype=np.uint8)
    planes[: w * h] = colour[0]
    planes[w * h : w * h * 5 // 4] = colour[1]
    planes[w * h * 5 // 4 :] = colour[2]
    return av.VideoFrame.from_ndarray(planes.reshape(h * 3 // 2, w), format="yuv420p")


def write_video(
    path: Path, codec: str, colours: list[tuple[float, tuple[int, int, int]]], seconds: float
) -> int:
    """A 320x240 15 fps clip: from each ``(time, colour)`` on, that solid colour. Frames."""
    fmt = "webm" if codec == "vp8" else "matroska"
    fps = 15
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream("libvpx" if codec == "vp8" else "libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        stream.bit_rate = 300_000
        if codec == "h264":
            stream.options = {"preset": "ultrafast", "tune": "zerolatency"}
        else:
            stream.options = {"deadline": "realtime", "cpu-used": "8"}
        n = round(seconds * fps)
        for i in range(n):
            frame = solid([c for t, c in colours if t <= i / fps][-1])
            frame.pts, frame.time_base = i, Fraction(1, fps)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return n


def write_resized_vp8(path: Path, parts: list[tuple[int, int, tuple[int, int, int]]]) -> int:
    """VP8 WebM at 15 fps whose picture size changes, as a WebRTC sender's does under
    congestion: one second of each ``(width, height, colour)``, each from a keyframe."""
    packets: list[av.Packet] = []
    for w, h, colour in parts:
        encoder = av.CodecContext.create("libvpx", "w")
        encoder.width, encoder.height, encoder.pix_fmt = w, h, "yuv420p"
        encoder.time_base, encoder.bit_rate = Fraction(1, 15), 300_000
        for i in range(15):
            frame = solid(colour, w, h)
            frame.pts = i
            packets.extend(encoder.encode(frame))
        packets.extend(encoder.encode(None))
    with av.open(str(path), "w", format="webm") as out:
        stream = out.add_mux_stream("vp8", rate=15, width=parts[0][0], height=parts[0][1])
        for i, packet in enumerate(packets):
            packet.stream, packet.time_base = stream, Fraction(1, 15)
            packet.pts = packet.dts = i
            out.mux(packet)
    return len(packets)


def write_tone(
    path: Path, freq: float, seconds: float, gap: tuple[float, float] | None = None
) -> int:
    """``seconds`` of a sine at ``freq`` Hz (amplitude 0.4) as Opus in Ogg. Packets.

    ``gap=(at, length)``: no packets for ``length`` seconds from ``at`` (the timestamps jump,
    as with discontinuous transmission), the tone going on after it."""
    jump_at = round(gap[0] * SAMPLE_RATE) if gap else None
    jump = round(gap[1] * SAMPLE_RATE) if gap else 0

    def shifted(packets: list[av.Packet]) -> list[av.Packet]:
        for p in packets:
            if jump_at is not None and p.pts is not None and p.pts >= jump_at:
                p.pts += jump
                p.dts = p.pts
        return packets

    with av.open(str(path), "w", format="ogg") as out:
        stream = out.add_stream("libopus", rate=SAMPLE_RATE, layout="mono")
        t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
        wave = (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
        for start in range(0, len(wave), 960):
            frame = av.AudioFrame.from_ndarray(
                wave[start : start + 960].reshape(1, -1), format="flt", layout="mono"
            )
            frame.sample_rate, frame.pts = SAMPLE_RATE, start
            frame.time_base = Fraction(1, SAMPLE_RATE)
            out.mux(shifted(stream.encode(frame)))
        out.mux(shifted(stream.encode(None)))
    return len(wave) // 960


def segment(file: str, start: float, duration: float, count: int) -> dict[str, Any]:
    return {
        "file": file,
        "container": file.rsplit(".", 1)[1],
        "start": start,
        "duration": duration,
        "frames": count,
        "bytes": 0,
        "complete": True,
    }


def track(n: int, participant: str, kind: str, source: str, codec: str, *segments: Any) -> Any:
    return {
        "track": f"{participant}:{n}",
        "participant": participant,
        "kind": kind,
        "source": source,
        "codec": codec,
        "segments": list(segments),
    }


def manifest(tracks: list[Any], end: float, *, audio_only: bool = False) -> dict[str, Any]:
    return {
        "version": 1,
        "id": "rec_0123456789abcdef",
        "room": "lobby",
        "by": {"identity": "alice", "name": "Alice"},
        "audio_only": audio_only,
        "identities": None,
        "started_at": STARTED_AT,
        "ended_at": STARTED_AT + round(end * 1000),
        "stop_reason": "stopped",
        "participants": [
            {"participant": "pA", "identity": "alice", "name": "Alice"},
            {"participant": "pB", "identity": "bob", "name": "Bob"},
            {"participant": "pC", "identity": "carol", "name": "Carol"},
        ],
        "tracks": tracks,
        "mixed": None,
    }


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files of the three-person call, encoded once for the module:

    Alice: VP8 camera from 0.0 s, red then green from 1.5 s, and a 440 Hz tone, 3 s.
    Bob: H.264 camera, blue, and a 1000 Hz tone, both from 1.0 s for 2 s.
    Carol: audio only, a 2500 Hz tone from 0.5 s for 1 s.
    """
    d = tmp_path_factory.mktemp("media")
    counts = {
        "t1-s1.webm": write_video(d / "t1-s1.webm", "vp8", [(0, RED), (1.5, GREEN)], 3.0),
        "t2-s1.ogg": write_tone(d / "t2-s1.ogg", 440, 3.0),
        "t3-s1.mkv": write_video(d / "t3-s1.mkv", "h264", [(0, BLUE)], 2.0),
        "t4-s1.ogg": write_tone(d / "t4-s1.ogg", 1000, 2.0),
        "t5-s1.ogg": write_tone(d / "t5-s1.ogg", 2500, 1.0),
    }

    def seg(file: str, start: float, duration: float) -> dict[str, Any]:
        return segment(file, start, duration, counts[file])

    tracks = [
        track(0, "pA", "video", "camera", "vp8", seg("t1-s1.webm", 0.0, 3.0)),
        track(1, "pA", "audio", "microphone", "opus", seg("t2-s1.ogg", 0.0, 3.0)),
        track(0, "pB", "video", "camera", "h264", seg("t3-s1.mkv", 1.0, 2.0)),
        track(1, "pB", "audio", "microphone", "opus", seg("t4-s1.ogg", 1.0, 2.0)),
        track(0, "pC", "audio", "microphone", "opus", seg("t5-s1.ogg", 0.5, 1.0)),
    ]
    (d / "manifest.json").write_text(json.dumps(manifest(tracks, 3.2)))
    return d


@pytest.fixture
def recording(media: Path, tmp_path: Path) -> Path:
    """A fresh copy of the three-person recording, for a test to mix (or damage first)."""
    d = tmp_path / "rec_0123456789abcdef"
    shutil.copytree(media, d)
    return d


def run_mix(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MIX, str(directory), *args], capture_output=True, text=True, timeout=120, check=False
    )


def mixed_of(directory: Path) -> Any:
    return json.loads((directory / "manifest.json").read_text())["mixed"]


# --- decoding the result ---------------------------------------------------------------


def decode_video(path: Path) -> list[tuple[float, np.ndarray]]:
    """(time, yuv420p planes as one flat array) of every frame."""
    with av.open(str(path)) as c:
        return [
            (float(f.time), f.to_ndarray().reshape(-1))
            for f in c.decode(c.streams.video[0])
            if f.time is not None
        ]


def decode_audio(path: Path) -> np.ndarray:
    """The audio as mono float samples at 48 kHz from time 0."""
    with av.open(str(path)) as c:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        parts = [
            f.to_ndarray().reshape(-1)
            for frame in c.decode(c.streams.audio[0])
            for f in resampler.resample(frame)
        ]
    return np.concatenate(parts)


def colour_at(planes: np.ndarray, rect: Rect, w: int = 1280, h: int = 720) -> tuple[int, ...]:
    """Mean (Y, U, V) of the middle quarter of ``rect`` in a frame's planes."""
    y = planes[: w * h].reshape(h, w)
    u = planes[w * h : w * h * 5 // 4].reshape(h // 2, w // 2)
    v = planes[w * h * 5 // 4 :].reshape(h // 2, w // 2)
    x0, x1 = rect.x + rect.w * 3 // 8, rect.x + rect.w * 5 // 8
    y0, y1 = rect.y + rect.h * 3 // 8, rect.y + rect.h * 5 // 8
    return (
        round(float(y[y0:y1, x0:x1].mean())),
        round(float(u[y0 // 2 : y1 // 2, x0 // 2 : x1 // 2].mean())),
        round(float(v[y0 // 2 : y1 // 2, x0 // 2 : x1 // 2].mean())),
    )


def near(colour: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(colour, expected, strict=True))


def tone_levels(samples: np.ndarray, start: float, end: float, freqs: list[float]) -> list[float]:
    """Amplitude of each frequency in ``[start, end)`` seconds (Hann-windowed DFT)."""
    part = samples[round(start * SAMPLE_RATE) : round(end * SAMPLE_RATE)]
    window = np.hanning(len(part))
    t = np.arange(len(part)) / SAMPLE_RATE
    return [
        float(2 * abs(np.sum(part * window * np.exp(-2j * np.pi * f * t))) / np.sum(window))
        for f in freqs
    ]


CELLS = grid(3, 1280, 720)  # Alice, Bob, Carol


# --- the command on a whole recording ----------------------------------------------------


def test_three_people_mixed_on_the_common_clock(recording: Path) -> None:
    result = run_mix(recording)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert mixed_of(recording) == {"file": "mixed.webm", "status": "done", "error": None}
    assert not list(recording.glob(".*")), "no temp or partial file left"

    frames = decode_video(recording / "mixed.webm")
    times = [t for t, _ in frames]
    assert times[-1] >= 3.0 - 1 / 15 - 0.01 and times[-1] < 3.5
    assert np.allclose(np.diff(times), 1 / 15, atol=0.002), "15 fps, no gap"

    def at(t: float) -> np.ndarray:
        return min(frames, key=lambda f: abs(f[0] - t))[1]

    alice, bob, carol = CELLS
    carol_colour = colour_at(at(0.0), carol)
    for t, alice_expected, bob_expected in [
        (0.3, RED, BLACK),
        (0.9, RED, BLACK),  # Bob's camera starts at 1.0 s, not before
        (1.2, RED, BLUE),
        (1.4, RED, BLUE),
        (1.7, GREEN, BLUE),  # Alice's own 1.5 s
        (2.8, GREEN, BLUE),
    ]:
        planes = at(t)
        assert near(colour_at(planes, alice), alice_expected), (t, colour_at(planes, alice))
        assert near(colour_at(planes, bob), bob_expected), (t, colour_at(planes, bob))
        assert near(colour_at(planes, carol), carol_colour, 4), "Carol's label cell stays"
    assert not near(carol_colour, BLACK, 20), "a participant without video gets a plain cell"
    # The label: white text on that cell's background.
    y = at(0.3)[: 1280 * 720].reshape(720, 1280)
    label = y[carol.y : carol.y + carol.h, carol.x : carol.x + carol.w]
    assert (label > 200).sum() > 1000

    samples = decode_audio(recording / "mixed.webm")
    assert len(samples) >= 2.95 * SAMPLE_RATE
    a, b, c = 440.0, 1000.0, 2500.0
    for start, end, heard in [
        (0.1, 0.45, {a}),
        (0.6, 0.95, {a, c}),
        (1.1, 1.45, {a, b, c}),
        (1.6, 2.9, {a, b}),
    ]:
        levels = dict(zip([a, b, c], tone_levels(samples, start, end, [a, b, c]), strict=True))
        for f, level in levels.items():
            if f in heard:
                assert level > 0.25, (start, f, levels)  # written at 0.4
            else:
                assert level < 0.02, (start, f, levels)
    # Three tones at 0.4 sum to peaks of 1.2 (from 1.0 to 1.5 s); limited to 0.98, plus the
    # little that lossy coding adds.
    assert np.max(np.abs(samples)) < 1.05


def test_a_corrupt_and_a_missing_file_are_skipped_and_named(recording: Path) -> None:
    (recording / "t3-s1.mkv").write_bytes(b"\x1a\x45\xdf\xa3" + bytes(range(256)) * 40)
    (recording / "t5-s1.ogg").unlink()
    result = run_mix(recording)
    assert result.returncode == 0, result.stderr
    mixed = mixed_of(recording)
    assert mixed["status"] == "done"
    assert "t3-s1.mkv: skipped" in mixed["error"]
    assert "t5-s1.ogg: skipped (file missing)" in mixed["error"]
    assert result.stderr.count("\n") == 1 and "t5-s1.ogg" in result.stderr

    frames = decode_video(recording / "mixed.webm")
    alice, bob, _ = CELLS
    for t, planes in frames:
        assert near(colour_at(planes, bob), BLACK), t
    assert near(colour_at(frames[len(frames) // 4][1], alice), RED)
    samples = decode_audio(recording / "mixed.webm")
    levels = tone_levels(samples, 0.6, 0.95, [440.0, 2500.0])
    assert levels[0] > 0.25 and levels[1] < 0.02


def rewrite_vp8(path: Path, change: Callable[[int, bytes], tuple[int, bytes]]) -> None:
    """Rewrite a 15 fps 320x240 VP8 WebM packet by packet: frame ``i`` with ``data`` becomes
    ``change(i, data)``: (its pts in frames, its bytes)."""
    with av.open(str(path)) as c:
        packets = [(bytes(p), p.is_keyframe) for p in c.demux(video=0) if p.size]
    with av.open(str(path), "w", format="webm") as out:
        stream = out.add_mux_stream("vp8", rate=15, width=320, height=240)
        for i, (data, key) in enumerate(packets):
            pts, changed = change(i, data)
            packet = av.Packet(changed)
            packet.stream, packet.time_base = stream, Fraction(1, 15)
            packet.pts = packet.dts = pts
            packet.is_keyframe = key
            out.mux(packet)


def test_a_timestamp_far_off_does_not_stretch_the_file(recording: Path) -> None:
    """From frame 20 on, Alice's camera says it is a day later (a corrupt file): those frames
    are dropped, the file still ends with the call, and the note says where hers stopped."""
    rewrite_vp8(recording / "t1-s1.webm", lambda i, data: (i + 86400 * 15 if i >= 20 else i, data))
    result = run_mix(recording)
    assert result.returncode == 0, result.stderr
    assert mixed_of(recording)["error"] == "t1-s1.webm: ends at 1.3 s of 3.0 s"
    frames = decode_video(recording / "mixed.webm")
    assert 2.9 <= frames[-1][0] < 3.1
    alice = CELLS[0]
    assert near(colour_at(min(frames, key=lambda f: abs(f[0] - 1.0))[1], alice), RED)
    assert near(colour_at(min(frames, key=lambda f: abs(f[0] - 2.0))[1], alice), BLACK)


def test_damaged_frames_are_left_out_and_the_rest_kept(recording: Path) -> None:
    """Three frames in the middle of Alice's camera that do not decode: left out, noted, and
    her picture goes on after them (not cut at the first error)."""
    rewrite_vp8(
        recording / "t1-s1.webm", lambda i, data: (i, b"\xff" * 50 if 10 <= i < 13 else data)
    )
    result = run_mix(recording)
    assert result.returncode == 0, result.stderr
    assert mixed_of(recording) == {
        "file": "mixed.webm",
        "status": "done",
        "error": "t1-s1.webm: 3 damaged frames left out",
    }
    frames = decode_video(recording / "mixed.webm")
    alice = CELLS[0]
    late = min(frames, key=lambda f: abs(f[0] - 2.8))[1]
    assert near(colour_at(late, alice), GREEN)


def test_a_truncated_file_gives_what_it_holds(recording: Path) -> None:
    """A segment cut short (a crash while writing): its frames up to the cut, then black."""
    data = (recording / "t1-s1.webm").read_bytes()
    (recording / "t1-s1.webm").write_bytes(data[: len(data) // 3])
    result = run_mix(recording)
    assert result.returncode == 0, result.stderr
    mixed = mixed_of(recording)
    assert mixed["status"] == "done"
    assert mixed["error"].startswith("t1-s1.webm: ")
    assert mixed["error"].endswith(" of 3.0 s") or " cut at " in mixed["error"]
    frames = decode_video(recording / "mixed.webm")
    alice = CELLS[0]
    assert near(colour_at(frames[2][1], alice), RED)
    assert near(colour_at(frames[-1][1], alice), BLACK)


def test_nothing_decodable_fails(recording: Path) -> None:
    for name in ("t1-s1.webm", "t2-s1.ogg", "t3-s1.mkv", "t4-s1.ogg", "t5-s1.ogg"):
        (recording / name).write_bytes(b"not a media file")
    result = run_mix(recording)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    mixed = mixed_of(recording)
    assert mixed["status"] == "failed"
    assert mixed["error"].startswith("no segment could be decoded")
    assert not (recording / "mixed.webm").exists()
    assert not list(recording.glob(".*"))


def test_out_of_cpu_budget_fails(recording: Path) -> None:
    result = run_mix(recording, "--cpu-seconds", "0")
    assert result.returncode == 1
    assert mixed_of(recording) == {
        "file": "mixed.webm",
        "status": "failed",
        "error": "gave up after 0 s of CPU",
    }
    assert not (recording / "mixed.webm").exists()


def test_audio_only_recording_gives_ogg(media: Path, tmp_path: Path) -> None:
    d = tmp_path / "rec_00000000000000aa"
    d.mkdir()
    for name in ("t2-s1.ogg", "t4-s1.ogg"):
        shutil.copy(media / name, d / name)
    tracks = [
        track(1, "pA", "audio", "microphone", "opus", segment("t2-s1.ogg", 0.0, 3.0, 150)),
        track(1, "pB", "audio", "microphone", "opus", segment("t4-s1.ogg", 1.0, 2.0, 100)),
    ]
    (d / "manifest.json").write_text(json.dumps(manifest(tracks, 3.0, audio_only=True)))
    result = run_mix(d)
    assert result.returncode == 0, result.stderr
    assert mixed_of(d) == {"file": "mixed.ogg", "status": "done", "error": None}
    with av.open(str(d / "mixed.ogg")) as c:
        assert not c.streams.video
        assert c.streams.audio[0].codec_context.name == "opus"
    samples = decode_audio(d / "mixed.ogg")
    assert 2.95 * SAMPLE_RATE <= len(samples) <= 3.3 * SAMPLE_RATE
    early, late = (
        tone_levels(samples, 0.1, 0.9, [440, 1000]),
        tone_levels(samples, 1.2, 2.9, [440, 1000]),
    )
    assert early[0] > 0.25 and early[1] < 0.02
    assert late[0] > 0.25 and late[1] > 0.25


def test_a_gap_in_the_audio_keeps_its_place(tmp_path: Path) -> None:
    """No packets for a second (discontinuous transmission): silence there, and what comes
    after it at its own time, not moved up to close the gap."""
    d = tmp_path / "rec_00000000000000dd"
    d.mkdir()
    count = write_tone(d / "t1-s1.ogg", 440, 2.0, gap=(1.0, 1.0))
    tracks = [track(0, "pA", "audio", "microphone", "opus", segment("t1-s1.ogg", 0.5, 3.0, count))]
    (d / "manifest.json").write_text(json.dumps(manifest(tracks, 3.5, audio_only=True)))
    result = run_mix(d)
    assert result.returncode == 0, result.stderr
    samples = decode_audio(d / "mixed.ogg")
    assert len(samples) >= 3.45 * SAMPLE_RATE
    for start, end, level in [(0.1, 0.4, 0), (0.6, 1.4, 0.4), (1.6, 2.4, 0), (2.6, 3.4, 0.4)]:
        (measured,) = tone_levels(samples, start, end, [440])
        assert abs(measured - level) < 0.05, (start, measured)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ended_at": None}, "has not ended"),
        ({"version": 2}, "not a version 1"),
        ({"tracks": "x"}, "tracks is not a list"),
    ],
)
def test_unusable_manifest_leaves_it_alone(
    recording: Path, change: dict[str, Any], message: str
) -> None:
    m = json.loads((recording / "manifest.json").read_text())
    m.update(change)
    (recording / "manifest.json").write_text(json.dumps(m))
    before = (recording / "manifest.json").read_bytes()
    result = run_mix(recording)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert (recording / "manifest.json").read_bytes() == before


def one_person(directory: Path, tracks: list[Any], end: float) -> Path:
    m = manifest(tracks, end)
    m["participants"] = m["participants"][:1]
    (directory / "manifest.json").write_text(json.dumps(m))
    return directory


def test_screen_before_camera_and_gaps_between_segments(tmp_path: Path) -> None:
    """Alice's camera in two segments with a gap (black between them), and a screen share
    that takes her cell while it runs."""
    d = tmp_path / "rec_00000000000000bb"
    d.mkdir()
    cam1 = write_video(d / "t1-s1.webm", "vp8", [(0, RED)], 1.0)
    cam2 = write_video(d / "t1-s2.webm", "vp8", [(0, RED)], 1.0)
    screen = write_video(d / "t2-s1.mkv", "h264", [(0, GREEN)], 0.6)
    one_person(
        d,
        [
            track(
                0,
                "pA",
                "video",
                "camera",
                "vp8",
                segment("t1-s1.webm", 0.0, 1.0, cam1),
                segment("t1-s2.webm", 2.0, 1.0, cam2),
            ),
            track(1, "pA", "video", "screen", "h264", segment("t2-s1.mkv", 2.3, 0.6, screen)),
        ],
        3.0,
    )
    result = run_mix(d)
    assert result.returncode == 0, result.stderr
    frames = decode_video(d / "mixed.webm")
    whole = Rect(0, 0, 1280, 720)
    seen = [(t, colour_at(planes, whole)) for t, planes in frames]
    for t, expected in [(0.5, RED), (1.5, BLACK), (2.1, RED), (2.5, GREEN), (2.95, RED)]:
        colour = min(seen, key=lambda s: abs(s[0] - t))[1]
        assert near(colour, expected), (t, colour)


def test_picture_size_changes_within_a_segment(tmp_path: Path) -> None:
    """A 4:3 picture, then a 4:1 one: each scaled into the cell keeping its aspect ratio, with
    black bars where it does not reach (and none left over from the previous size)."""
    d = tmp_path / "rec_00000000000000cc"
    d.mkdir()
    count = write_resized_vp8(d / "t1-s1.webm", [(320, 240, RED), (640, 160, BLUE)])
    one_person(
        d, [track(0, "pA", "video", "camera", "vp8", segment("t1-s1.webm", 0.0, 2.0, count))], 2.0
    )
    result = run_mix(d)
    assert result.returncode == 0, result.stderr
    frames = decode_video(d / "mixed.webm")
    first = min(frames, key=lambda f: abs(f[0] - 0.5))[1]
    second = min(frames, key=lambda f: abs(f[0] - 1.5))[1]
    middle, side, top = Rect(600, 320, 80, 80), Rect(20, 320, 80, 80), Rect(600, 40, 80, 80)
    # 320x240 -> 960x720 from x = 160; 640x160 -> 1280x320 from y = 200.
    assert near(colour_at(first, middle), RED) and near(colour_at(first, side), BLACK)
    assert near(colour_at(second, middle), BLUE) and near(colour_at(second, side), BLUE)
    assert near(colour_at(second, top), BLACK)


def test_one_job_per_recording(recording: Path) -> None:
    import fcntl
    import os

    before = (recording / "manifest.json").read_bytes()
    fd = os.open(recording, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run_mix(recording)
    finally:
        os.close(fd)
    assert result.returncode == 2
    assert "another mix of this recording is running" in result.stderr
    assert (recording / "manifest.json").read_bytes() == before


def test_stopped_job_says_so_and_runs_at_low_priority(recording: Path) -> None:
    """SIGTERM (a server shutting down) leaves the manifest failed, not pending forever."""
    m = json.loads((recording / "manifest.json").read_text())
    m["tracks"][1]["segments"][0]["duration"] = 600.0  # ten minutes to mix: time to stop it
    m["ended_at"] = STARTED_AT + 600_000
    (recording / "manifest.json").write_text(json.dumps(m))
    job = subprocess.Popen(
        [*MIX, str(recording)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while mixed_of(recording) is None:
            assert time.monotonic() < deadline and job.poll() is None
            time.sleep(0.02)
        assert mixed_of(recording)["status"] == "pending"
        nice = int(Path(f"/proc/{job.pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
        assert nice == 19
        job.terminate()
        _, err = job.communicate(timeout=30)
    finally:
        job.kill()
        job.wait()
    assert job.returncode == 1
    assert err.strip().endswith("stopped by a signal") and err.count("\n") == 1
    assert mixed_of(recording) == {
        "file": "mixed.webm",
        "status": "failed",
        "error": "stopped by a signal",
    }
    assert not (recording / "mixed.webm").exists() and not list(recording.glob(".*"))


def test_missing_directory(tmp_path: Path) -> None:
    result = run_mix(tmp_path / "nope")
    assert result.returncode == 2
    assert "no manifest.json" in result.stderr and "Traceback" not in result.stderr


# --- the pure parts ---------------------------------------------------------------------


def test_grid() -> None:
    assert grid(1, 1280, 720) == [Rect(0, 0, 1280, 720)]
    assert grid(2, 1280, 720) == [Rect(0, 0, 640, 720), Rect(640, 0, 640, 720)]
    assert grid(4, 1280, 720)[3] == Rect(640, 360, 640, 360)
    three = grid(3, 1280, 720)
    assert three[2] == Rect(320, 360, 640, 360), "a short last row is centred"
    nine = grid(9, 1280, 720)
    assert nine[0] == Rect(0, 0, 426, 240) and nine[8] == Rect(852, 480, 426, 240)
    for n in range(1, 30):
        rects = grid(n, 1280, 720)
        assert len(rects) == n
        for r in rects:
            assert r.x % 2 == r.y % 2 == r.w % 2 == r.h % 2 == 0
            assert 0 <= r.x and r.x + r.w <= 1280 and 0 <= r.y and r.y + r.h <= 720
        for i, r in enumerate(rects):
            for s in rects[i + 1 :]:
                assert r.x + r.w <= s.x or s.x + s.w <= r.x or r.y + r.h <= s.y or s.y + s.h <= r.y


def test_fit_keeps_aspect() -> None:
    assert fit(1280, 720, 640, 360) == (640, 360)
    assert fit(320, 240, 640, 360) == (480, 360)
    assert fit(720, 1280, 640, 360) == (202, 360)  # a phone held upright
    assert fit(1920, 1080, 426, 240) == (426, 240)
    assert fit(3, 1, 640, 360) == (640, 212)


def test_limiter_keeps_peaks_under_the_ceiling_and_lets_quiet_sound_through() -> None:
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    quiet = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    assert np.array_equal(Limiter().process(quiet.copy()), quiet)
    loud = (1.8 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    limiter = Limiter()
    out = np.concatenate(
        [limiter.process(loud[i : i + 3200].copy()) for i in range(0, len(loud), 3200)]
    )
    assert np.max(np.abs(out)) <= 1.0
    # Limited, not hard-clipped: after the first chunk nearly nothing sits at the clip level.
    assert np.mean(np.abs(out[480:]) >= 0.999) < 0.001
    assert np.max(np.abs(out[480:])) > 0.9
    # And the gain comes back after the loud part.
    after = limiter.process(quiet.copy())
    assert np.max(np.abs(after[SAMPLE_RATE // 2 :] - quiet[SAMPLE_RATE // 2 :])) < 1e-3


def test_label() -> None:
    assert label_text("José  Núñez-Ruiz!") == "JOSE NUNEZ-RUIZ"
    assert label_text("王") == ""
    y = np.zeros((360, 640), dtype=np.uint8)
    u = np.zeros((180, 320), dtype=np.uint8)
    v = np.zeros((180, 320), dtype=np.uint8)
    draw_label(y, u, v, "carol", "Carol")
    assert (y == 235).sum() > 1000 and len(np.unique(u)) == 1
    rows = np.nonzero((y == 235).any(axis=1))[0]
    assert 150 < (rows[0] + rows[-1]) / 2 < 210, "centred"


def test_someone_who_comes_back_keeps_their_cell() -> None:
    """Alice leaves and joins again (a new participant id): one cell, both segments. Bob on
    two devices at once: two cells."""
    m = manifest(
        [
            track(0, "pA", "video", "camera", "vp8", segment("t1-s1.webm", 0.0, 2.0, 30)),
            track(0, "pB", "video", "camera", "vp8", segment("t2-s1.webm", 0.5, 4.0, 60)),
            track(0, "pA2", "video", "camera", "vp8", segment("t3-s1.webm", 2.5, 1.5, 20)),
            track(0, "pB2", "audio", "microphone", "opus", segment("t4-s1.ogg", 1.0, 1.0, 50)),
        ],
        5.0,
    )
    m["participants"] += [
        {"participant": "pA2", "identity": "alice", "name": "Alice"},
        {"participant": "pB2", "identity": "bob", "name": "Bob (phone)"},
    ]
    p = plan(m)
    assert [(c.participant, c.name) for c in p.cells] == [
        ("pA", "Alice"),
        ("pB", "Bob"),
        ("pB2", "Bob (phone)"),
    ]
    assert [s.file for s in p.cells[0].video] == ["t1-s1.webm", "t3-s1.webm"]
    assert p.cells[1].rect == grid(3, 1280, 720)[1]


def test_manifest_checks() -> None:
    good = manifest(
        [track(0, "pA", "video", "camera", "vp8", segment("t1-s1.webm", 0.5, 2.0, 30))], 3.0
    )
    p = plan(good)
    assert [c.name for c in p.cells] == ["Alice"]
    assert p.duration == 2.5
    assert p.cells[0].video[0].cap == 4.5  # complete: declared end + 2 s
    for bad, message in [
        ({"file": "../etc/passwd"}, "plain file name"),
        ({"file": ".hidden.webm"}, "plain file name"),
        ({"container": "ogg"}, "does not hold video"),
        ({"start": "1"}, "start is not a number"),
        ({"start": float("nan")}, "start is not a number"),
        ({"start": 100.0}, "out of range"),
    ]:
        m = json.loads(json.dumps(good))
        m["tracks"][0]["segments"][0].update(bad)
        with pytest.raises(ManifestError, match=message):
            plan(m)
    # An incomplete segment may hold more than the manifest knew: up to the recording's end.
    good["tracks"][0]["segments"][0].update(complete=False, duration=0.0)
    assert plan(good).cells[0].video[0].cap == 5.0
    audio_only = dict(good, audio_only=True)
    assert plan(audio_only).cells == ()
