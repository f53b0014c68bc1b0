"""CPU cost of the mixed file (``python -m sfu.recording.mix``) for a four-person call.

Builds a recording of ``--seconds`` (default 60): four participants, each with a 640x480
30 fps camera (the project's test pattern, a moving box on a scrolling texture: two in VP8
WebM, two in H.264 Matroska, the pre-encoded clips of ``media.clip`` looped) and an Opus
microphone (a tone; the fourth joins 5 s late), then runs the job as the server would
(``python -P -m sfu.recording.mix DIR``, so at nice 19) and measures its CPU time (user +
system, from the child's rusage), wall time and peak memory (max RSS). The baseline, in the
same run: the CPU time of only decoding every segment (what any mix must do), in this process.

    python bench/mix.py [--seconds 60] [--keep DIR]

Prints the measurements and a final JSON line with CPU seconds per minute of call.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import av
import numpy as np

from media.clip import ClipSpec, load_clip
from sfu.recording.mixplan import SAMPLE_RATE

CLIP_SECONDS = 4.0


def write_camera(path: Path, n: int, codec: str, seconds: float) -> int:
    clip = load_clip(ClipSpec(publisher_id=n, seconds=CLIP_SECONDS, codec=codec))  # type: ignore[arg-type]
    fps = clip.spec.fps
    frames = round(seconds * fps)
    fmt = "webm" if codec == "vp8" else "matroska"
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_mux_stream(codec, rate=fps, width=clip.spec.width, height=clip.spec.height)
        for i in range(frames):
            p = clip.video[i % len(clip.video)]
            packet = av.Packet(p.data)
            packet.stream = stream
            packet.time_base = Fraction(1, fps)
            packet.pts = packet.dts = i
            packet.is_keyframe = p.keyframe
            out.mux(packet)
    return frames


def write_microphone(path: Path, freq: float, seconds: float) -> int:
    with av.open(str(path), "w", format="ogg") as out:
        stream = out.add_stream("libopus", rate=SAMPLE_RATE, layout="mono")
        total = round(seconds * SAMPLE_RATE)
        for start in range(0, total, 960):
            t = np.arange(start, min(total, start + 960)) / SAMPLE_RATE
            wave = (0.2 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(wave.reshape(1, -1), format="flt", layout="mono")
            frame.sample_rate, frame.pts = SAMPLE_RATE, start
            frame.time_base = Fraction(1, SAMPLE_RATE)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return round(seconds * 50)


def build(directory: Path, seconds: float) -> None:
    tracks: list[dict[str, Any]] = []
    people = []
    for n in range(4):
        pid = f"p{n}"
        late = 5.0 if n == 3 else 0.0
        length = seconds - late
        codec = "vp8" if n < 2 else "h264"
        video = f"t{2 * n + 1}-s1.{'webm' if codec == 'vp8' else 'mkv'}"
        audio = f"t{2 * n + 2}-s1.ogg"
        frames = write_camera(directory / video, n, codec, length)
        packets = write_microphone(directory / audio, 300 + 200 * n, length)
        people.append({"participant": pid, "identity": f"user{n}", "name": f"User {n}"})
        for kind, source, c, file, count in [
            ("video", "camera", codec, video, frames),
            ("audio", "microphone", "opus", audio, packets),
        ]:
            tracks.append(
                {
                    "track": f"{pid}:{kind}",
                    "participant": pid,
                    "kind": kind,
                    "source": source,
                    "codec": c,
                    "segments": [
                        {
                            "file": file,
                            "container": file.rsplit(".", 1)[1],
                            "start": late,
                            "duration": length,
                            "frames": count,
                            "bytes": (directory / file).stat().st_size,
                            "complete": True,
                        }
                    ],
                }
            )
    manifest = {
        "version": 1,
        "id": directory.name,
        "room": "bench",
        "by": {"api": True},
        "audio_only": False,
        "identities": None,
        "started_at": 1_795_812_967_321,
        "ended_at": 1_795_812_967_321 + round(seconds * 1000),
        "stop_reason": "stopped",
        "participants": people,
        "tracks": tracks,
        "mixed": None,
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))


def decode_only(directory: Path) -> float:
    """CPU seconds to decode every segment of the recording, and nothing else."""
    start = time.process_time()
    for path in sorted(directory.glob("t*-s*.*")):
        with av.open(str(path)) as container:
            stream = container.streams[0]
            stream.codec_context.thread_count = 1
            for _ in container.decode(stream):
                pass
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--keep", type=Path, help="build the recording here and keep it")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-mix-"))
    directory = root / "rec_0000000000000bec"
    directory.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    build(directory, args.seconds)
    print(f"built a {args.seconds:.0f} s four-person recording in {time.monotonic() - t:.1f} s")

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-P", "-m", "sfu.recording.mix", str(directory)],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    wall = time.monotonic() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        sys.exit(f"mix failed: {result.stderr.strip()}")
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    rss_mb = after.ru_maxrss / 1024
    decode = decode_only(directory)
    size = (directory / "mixed.webm").stat().st_size
    per_minute = (user + system) * 60 / args.seconds
    print(f"mix: {user:.1f} s user + {system:.1f} s system CPU, {wall:.1f} s wall")
    print(f"= {per_minute:.1f} s of CPU per minute of call; mixed.webm {size / 1e6:.1f} MB")
    print(f"peak memory (max RSS) {rss_mb:.0f} MB")
    print(f"baseline, decoding every segment only: {decode:.1f} s of CPU")
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(
        json.dumps(
            {
                "seconds": args.seconds,
                "cpu_user": round(user, 2),
                "cpu_system": round(system, 2),
                "wall": round(wall, 2),
                "cpu_per_minute": round(per_minute, 2),
                "bytes": size,
                "max_rss_mb": round(rss_mb),
                "decode_only_cpu": round(decode, 2),
            }
        )
    )
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
