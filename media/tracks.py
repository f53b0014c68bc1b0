"""aiortc tracks that send a pre-encoded clip in real time, without encoding.

``RTCRtpSender`` packs an ``av.Packet`` returned by ``track.recv()`` with the codec's
``Encoder.pack()`` (aiortc/codecs/vpx.py, h264.py, opus.py): it needs the bytes, ``pts``
and ``time_base`` (from which it derives the RTP timestamp). The tracks loop the clip with
ever-increasing pts, so the RTP timestamp never goes backwards, and pace packets on the
event loop clock (not ``MediaPlayer``, whose pacing stops after the first loop: aiortc
issue 869).

A keyframe request (:meth:`EncodedVideoTrack.request_keyframe`, wired to RTCP PLI/FIR by
:func:`attach_keyframe_requests`) makes the next frame come from the clip's all-intra
version; the normal stream then continues, predicting from a slightly different picture
(drift too small to see, and the stream stays decodable).
"""

from __future__ import annotations

import asyncio
import fractions
import math
from array import array
from typing import Any, cast

import av
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError, MediaStreamTrack

from media.clip import AUDIO_FRAME_SAMPLES, Clip, EncodedPacket

# If the consumer falls this far behind the clock, restart pacing from now instead of
# sending a burst of late frames.
MAX_LAG_S = 0.5


class _PacedClipTrack(MediaStreamTrack):
    """Returns ``packets`` in a loop, one per ``period`` seconds of the event loop clock."""

    def __init__(
        self,
        packets: tuple[EncodedPacket, ...],
        time_base: fractions.Fraction,
        ticks_per_packet: int,
    ) -> None:
        super().__init__()
        if not packets:
            raise ValueError("empty clip")
        self._packets = packets
        self._time_base = time_base
        self._loop_ticks = ticks_per_packet * len(packets)
        self._period = float(time_base * ticks_per_packet)
        self._next_time: float | None = None
        self.frames_sent = 0
        """Packets returned by :meth:`recv` so far (one per video frame or 20 ms of audio)."""

    def _choose(self, index: int) -> EncodedPacket:
        return self._packets[index]

    async def recv(self) -> av.Packet:
        """The next packet, at its time: pts increases by one frame per call, across loops."""
        if self.readyState != "live":
            raise MediaStreamError
        now = asyncio.get_running_loop().time()
        if self._next_time is None or now - self._next_time > MAX_LAG_S:
            self._next_time = now
        elif self._next_time > now:
            await asyncio.sleep(self._next_time - now)
            if self.readyState != "live":
                raise MediaStreamError
        self._next_time += self._period

        n = self.frames_sent
        laps, index = divmod(n, len(self._packets))
        source = self._choose(index)
        packet = av.Packet(source.data)
        packet.pts = laps * self._loop_ticks + source.pts
        packet.dts = packet.pts
        packet.time_base = self._time_base
        packet.is_keyframe = source.keyframe
        self.frames_sent += 1
        return packet


class EncodedVideoTrack(_PacedClipTrack):
    """Video track sending a clip's pre-encoded video (VP8 or H.264) at its frame rate."""

    kind = "video"

    def __init__(self, clip: Clip) -> None:
        super().__init__(clip.video, clip.spec.video_time_base, ticks_per_packet=1)
        self.clip = clip
        self._intra = clip.video_intra
        self._keyframe_pending = False
        self.keyframe_requests = 0
        """Keyframe requests received (PLI/FIR through :func:`attach_keyframe_requests`)."""
        self.intra_frames_sent = 0
        """Frames taken from the all-intra version to answer a request."""
        self.keyframes_sent = 0
        """All keyframes sent: the clip's own (start of each loop) and requested ones."""

    def request_keyframe(self) -> None:
        """Make the next frame a keyframe. Requests before that frame coalesce into one."""
        self.keyframe_requests += 1
        self._keyframe_pending = True

    def _choose(self, index: int) -> EncodedPacket:
        packet = self._packets[index]
        if self._keyframe_pending:
            self._keyframe_pending = False
            if not packet.keyframe:
                packet = self._intra[index]
                self.intra_frames_sent += 1
        if packet.keyframe:
            self.keyframes_sent += 1
        return packet


class EncodedAudioTrack(_PacedClipTrack):
    """Audio track sending a clip's pre-encoded Opus audio, 20 ms per packet."""

    kind = "audio"

    def __init__(self, clip: Clip) -> None:
        super().__init__(
            clip.audio, clip.spec.audio_time_base, ticks_per_packet=AUDIO_FRAME_SAMPLES
        )
        self.clip = clip


def add_clip_tracks(pc: Any, clip: Clip) -> tuple[EncodedVideoTrack, EncodedAudioTrack]:
    """Add a clip's video and audio tracks to ``pc`` (an ``RTCPeerConnection``).

    Keyframe requests reaching the video sender go to the video track.
    """
    video = EncodedVideoTrack(clip)
    audio = EncodedAudioTrack(clip)
    attach_keyframe_requests(pc.addTrack(video), video)
    pc.addTrack(audio)
    return video, audio


def attach_keyframe_requests(sender: Any, track: EncodedVideoTrack) -> None:
    """Make PLI/FIR received by ``sender`` (an ``RTCRtpSender``) call ``track.request_keyframe()``.

    aiortc's sender answers PLI/FIR in ``_handle_rtcp_packet`` by calling
    ``self._send_keyframe()``, which only reaches an encoder; pre-encoded tracks need the
    request themselves. The method is wrapped on this sender instance only.
    """
    original = getattr(sender, "_send_keyframe", None)
    if not callable(original):
        raise RuntimeError(
            "aiortc RTCRtpSender has no _send_keyframe(): this aiortc version is not "
            "supported by media.tracks (pinned: aiortc==1.16.0)"
        )

    def send_keyframe() -> None:
        track.request_keyframe()
        original()

    sender._send_keyframe = send_keyframe


class ToneTrack(AudioStreamTrack):
    """A 440 Hz tone, encoded by aiortc (so its packets carry audio levels): loud by default;
    ``amplitude`` may change while it plays (0: silence)."""

    def __init__(self, amplitude: float = 0.5) -> None:
        super().__init__()
        self.amplitude = amplitude
        self._n = 0

    async def recv(self) -> av.AudioFrame:
        # Paced 20 ms frames of silence with proper timestamps.
        silence = cast(av.AudioFrame, await super().recv())
        n, rate = silence.samples, silence.sample_rate
        pcm = array(
            "h",
            (
                int(math.sin(2 * math.pi * 440 * (k + self._n) / rate) * self.amplitude * 32767)
                for k in range(n)
            ),
        )
        self._n += n
        frame = av.AudioFrame(format="s16", layout="mono", samples=n)
        frame.planes[0].update(pcm.tobytes())
        frame.pts, frame.time_base, frame.sample_rate = silence.pts, silence.time_base, rate
        return frame
