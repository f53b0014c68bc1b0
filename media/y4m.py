"""Write the test pattern as a Y4M file, a fake camera for Chromium.

``chromium --use-file-for-fake-video-capture=clip.y4m`` loops the file as the camera; it
accepts only 4:2:0 files whose header says ``C420``.
"""

from __future__ import annotations

from pathlib import Path

from media.pattern import TestPattern


def write_y4m(
    path: Path,
    *,
    publisher_id: int = 0,
    seconds: float = 1.0,
    width: int = 640,
    height: int = 480,
    fps: int = 30,
) -> Path:
    """Write ``seconds`` of the publisher's test pattern (raw, about 14 MB per second at VGA)."""
    frame_count = round(seconds * fps)
    pattern = TestPattern(width, height, publisher_id, frame_count)
    with path.open("wb") as f:
        f.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420\n".encode())
        for index in range(frame_count):
            f.write(b"FRAME\n")
            for plane in pattern.frame(index):
                f.write(plane)
    return path
