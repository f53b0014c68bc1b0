"""One segment's file: pre-encoded frames muxed with PyAV, never decoded or encoded.

VP8 goes to WebM, H.264 to Matroska, Opus to Ogg (``CONTAINERS``). Video streams are created
with ``OutputContainer.add_mux_stream`` (PyAV >= 17: a stream without a codec context); PyAV
takes the H.264 extradata (SPS/PPS) from the first packet, a keyframe in Annex B form. An Ogg
Opus file needs an identification header (RFC 7845 section 5.1, ``OpusHead``) that a stream
without a codec context does not get, so the Opus stream has a libopus encoder context that
is opened (which writes the header) but never fed: the packets muxed are the publisher's.
Its header announces a pre-skip of 312 samples (libopus's look-ahead, which the publisher's
libopus encoder had too, as browsers' do), so decoders drop the first 6.5 ms.

Timestamps: packets carry pts in 1/90000 (video) or 1/48000 (Opus) from 0 at the first frame.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Final

import av

#: codec -> (container format, file extension, time base of the packets)
CONTAINERS: Final = {
    "vp8": ("webm", "webm", Fraction(1, 90000)),
    "h264": ("matroska", "mkv", Fraction(1, 90000)),
    "opus": ("ogg", "ogg", Fraction(1, 48000)),
}


def extension(codec: str) -> str:
    """The file extension (and manifest ``container``) of a codec's segments."""
    return CONTAINERS[codec][1]


class SegmentFile:
    """A container file being written; ``close`` writes its trailer (index, duration)."""

    def __init__(self, path: str, codec: str, width: int = 0, height: int = 0) -> None:
        fmt, _, time_base = CONTAINERS[codec]
        self.path = path
        self.codec = codec
        self.time_base = time_base
        self.closed = False
        self.container = av.open(path, "w", format=fmt)
        stream: av.stream.Stream
        try:
            if codec == "opus":
                stream = self.container.add_stream("libopus", rate=48000, layout="stereo")
            else:
                stream = self.container.add_mux_stream(codec, width=width, height=height)
            stream.time_base = time_base
        except BaseException:
            self.container.close()
            raise
        self.stream = stream

    def write(self, data: bytes, pts: int, keyframe: bool, duration: int) -> None:
        """Mux one frame (``pts`` and ``duration`` in the codec's time base)."""
        packet = av.Packet(data)
        packet.stream = self.stream
        packet.time_base = self.time_base
        packet.pts = packet.dts = pts
        packet.duration = duration
        packet.is_keyframe = keyframe
        self.container.mux(packet)

    def close(self) -> None:
        """Write the trailer and close the file (once; raises what the disk said)."""
        if self.closed:
            return
        self.closed = True
        self.container.close()
