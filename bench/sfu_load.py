"""Load-generator pieces shared by the three servers of ``bench/sfu.py``.

Subscribers in this benchmark do not decode: each received track's ``RTCRtpReceiver`` has its
``_handle_rtp_packet`` replaced *on the instance* by a counter that never calls aiortc's own
handling, so no jitter buffer, NACK generator, REMB estimator or decoder runs in the load
generator. The price: the subscribers send no NACK, PLI or REMB, for every server alike (each
server asks the publisher for keyframes itself when a subscriber joins).

Publishers send a pre-encoded clip (640x480 VP8 at ~800 kbps plus Opus) without encoding.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpReceiver, RTCRtpSender

from media.clip import ClipSpec, load_clip
from media.tracks import EncodedAudioTrack, EncodedVideoTrack

TICKS = os.sysconf("SC_CLK_TCK")
CLIP_SECONDS = 4.0
LAG_S = 0.25  # receive counts are read this long after the send counts


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid``."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(x) for x in text]
    return out


def _udp_inodes() -> dict[int, int]:
    """Socket inode -> datagrams the kernel dropped on it (full receive buffer), all UDP."""
    out: dict[int, int] = {}
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            out[int(f[9])] = int(f[12])
    return out


def _socket_fds(pid: int) -> dict[int, int]:
    """Socket inode -> fd number, for the process's open sockets."""
    out: dict[int, int] = {}
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = list(fd_dir.iterdir())
    except OSError:
        return out
    for fd in entries:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            out[int(target[8:-1])] = int(fd.name)
    return out


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine have used (busy time of every core)."""
    f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return (user + nice + system + irq + softirq + steal) / TICKS


def udp_drops(pids: list[int]) -> int:
    """Datagrams dropped on full receive buffers, over the UDP sockets of ``pids``."""
    table = _udp_inodes()
    return sum(table.get(inode, 0) for pid in pids for inode in _socket_fds(pid))


def enlarge_own_udp_buffers(size: int = 4 << 20) -> int:
    """Give every UDP socket of this process a ``size`` receive buffer; returns how many.

    The load generator receives up to ~12,000 packets/s on one event loop: with the default
    ~200 KB buffers a short stall overflows its sockets and the loss would be blamed on the
    server. ``SO_RCVBUFFORCE`` (root) passes net.core.rmem_max; ``SO_RCVBUF`` is the fallback.
    """
    table = _udp_inodes()
    done = 0
    for inode, fd in _socket_fds(os.getpid()).items():
        if inode not in table:
            continue
        sock = socket.socket(fileno=os.dup(fd))
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, 33, size)  # SO_RCVBUFFORCE
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
            done += 1
        except OSError:
            pass
        finally:
            sock.close()
    return done


def peer_connection() -> RTCPeerConnection:
    # No STUN: there is no network, and aiortc would otherwise try Google's server.
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


def vp8_only(kind: str) -> list[Any]:
    """Codec preferences: VP8 (and its RTX) for video, Opus for audio."""
    caps = RTCRtpSender.getCapabilities(kind).codecs
    if kind == "audio":
        return [c for c in caps if c.mimeType.lower() == "audio/opus"]
    return [c for c in caps if c.mimeType.lower() in ("video/vp8", "video/rtx")]


@dataclass(slots=True)
class RtpCount:
    """Packets of one received track: count, bytes, frames (marker bits), highest sequence."""

    kind: str
    packets: int = 0
    octets: int = 0
    frames: int = 0
    highest: int = -1  # extended highest sequence number, -1 before the first packet

    def add(self, seq: int, size: int, marker: int) -> None:
        self.packets += 1
        self.octets += size
        self.frames += marker
        if self.highest < 0:
            self.highest = seq
            return
        delta = (seq - self.highest) & 0xFFFF
        if delta < 0x8000:  # newer (RFC 3550 A.1 style wrap handling)
            self.highest += delta

    def snapshot(self) -> tuple[int, int, int, int]:
        return self.packets, self.octets, self.frames, self.highest


def count_receiver(receiver: RTCRtpReceiver, count: RtpCount) -> None:
    """Make ``receiver`` count packets into ``count`` instead of handling them (bench hack)."""

    async def handle(packet: Any, arrival_time_ms: int) -> None:
        count.add(packet.sequence_number, len(packet.payload) + 12, packet.marker)

    receiver._handle_rtp_packet = handle  # type: ignore[method-assign]


@dataclass
class Subscriber:
    """What one subscriber received, by track key."""

    name: str
    counts: dict[str, RtpCount] = field(default_factory=dict)

    def track(self, key: str, kind: str) -> RtpCount:
        c = self.counts.get(key)
        if c is None:
            c = self.counts[key] = RtpCount(kind)
        return c

    def ready(self, videos: int) -> bool:
        """``videos`` video tracks past their first frames, and audio arriving.

        Audio is not required per track: with several audio sections on one connection
        from Janus, aiortc's router delivers the later ones' packets to the first audio
        receiver (it learns their unknown SSRCs by payload type), which moves packets between
        this subscriber's counters but not its totals.
        """
        live = [c for c in self.counts.values() if c.kind == "video" and c.packets > 30]
        audio = sum(c.packets for c in self.counts.values() if c.kind == "audio")
        return len(live) >= videos and audio > 5


@dataclass
class Publisher:
    """One publisher's pre-encoded tracks and (once negotiated) their senders."""

    index: int
    video: EncodedVideoTrack
    audio: EncodedAudioTrack
    senders: list[RTCRtpSender] = field(default_factory=list)

    @classmethod
    def make(cls, index: int) -> Publisher:
        clip = load_clip(ClipSpec(publisher_id=index % 256, seconds=CLIP_SECONDS))
        return cls(index, EncodedVideoTrack(clip), EncodedAudioTrack(clip))

    async def sent(self) -> int:
        """RTP packets sent so far on all tracks (from the senders' stats)."""
        total = 0
        for sender in self.senders:
            for stats in (await sender.getStats()).values():
                if getattr(stats, "type", "") == "outbound-rtp":
                    total += stats.packetsSent
        return total


@dataclass
class Window:
    """One measurement window: CPU and packet counts, before and after."""

    seconds: float
    server_cpu: dict[str, float]  # process role -> CPU seconds used in the window
    load_cpu: float  # the load generator's own CPU seconds
    sent: list[int]  # per publisher: packets sent in the window
    received: list[int]  # per subscriber: packets received
    expected: list[int]  # per subscriber: packets its publishers sent
    seq_expected: list[int]  # per subscriber: packets by sequence-number range
    video_frames: list[int]  # per subscriber: video frames (marker bits) received
    video_octets: list[int]  # per subscriber: video bytes received
    video_tracks: list[int]  # per subscriber: video tracks that received packets in the window
    server_drops: int  # datagrams dropped on the servers' full UDP receive buffers
    load_drops: int  # ... on the load generator's
    other_cpu: float  # CPU seconds the rest of the machine used meanwhile (not ours)

    @property
    def forwarded(self) -> int:
        return sum(self.received)

    @property
    def server_cpu_total(self) -> float:
        return sum(self.server_cpu.values())

    def loss(self) -> float:
        """1 - received / expected over all subscribers (expected from the publishers)."""
        expected = sum(self.expected)
        return 1 - self.forwarded / expected if expected else 0.0

    def worst_loss(self) -> float:
        return max(
            (1 - r / e for r, e in zip(self.received, self.expected, strict=True) if e),
            default=0.0,
        )

    def worst_seq_loss(self) -> float:
        """The worst subscriber's loss from gaps in its sequence numbers."""
        return max(
            (1 - r / e for r, e in zip(self.received, self.seq_expected, strict=True) if e),
            default=0.0,
        )

    def seq_loss(self) -> float:
        """Loss from gaps in each subscriber's sequence numbers (any server, even re-encoding)."""
        expected = sum(self.seq_expected)
        return 1 - self.forwarded / expected if expected else 0.0

    def fps(self) -> float:
        """Mean video frame rate per received video track."""
        tracks = sum(self.video_tracks)
        return sum(self.video_frames) / tracks / self.seconds if tracks else 0.0

    def video_kbps(self) -> float:
        """Mean video bitrate per received video track (RTP payload + 12-byte header)."""
        tracks = sum(self.video_tracks)
        return sum(self.video_octets) * 8 / tracks / self.seconds / 1000 if tracks else 0.0


Snapshot = tuple[int, int, int, int]  # RtpCount.snapshot()


def count_deltas(
    subs0: list[list[Snapshot]], subs1: list[list[Snapshot]], kinds0: list[list[str]]
) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """Per subscriber, from its counts' snapshots before and after a window (and their kinds,
    before): packets received, packets by sequence-number range, video frames, video bytes,
    video tracks that received packets in the window."""
    received, seq_expected, frames, octets, vtracks = [], [], [], [], []
    for before, after, kind in zip(subs0, subs1, kinds0, strict=True):
        after = after[: len(before)]  # tracks added during the window are not counted
        received.append(sum(b[0] - a[0] for a, b in zip(before, after, strict=True)))
        seq_expected.append(sum(b[3] - a[3] for a, b in zip(before, after, strict=True)))
        video = [(a, b) for a, b, k in zip(before, after, kind, strict=True) if k == "video"]
        frames.append(sum(b[2] - a[2] for a, b in video))
        octets.append(sum(b[1] - a[1] for a, b in video))
        # Tracks with packets in the window: a subscriber that stopped showing one (the
        # 25-person room's hidden tiles) keeps its counter, which would dilute the frame rate.
        vtracks.append(sum(1 for a, b in video if b[0] > a[0]))
    return received, seq_expected, frames, octets, vtracks


async def measure(
    seconds: float,
    pids: dict[str, list[int]],
    publishers: list[Publisher],
    subscribers: list[Subscriber],
    sources: list[list[int]],
) -> Window:
    """Measure for ``seconds``. ``sources[i]`` lists the publishers subscriber ``i`` receives."""

    async def sent() -> list[int]:
        return [await p.sent() for p in publishers]

    async def counts() -> tuple[list[list[Snapshot]], list[list[str]]]:
        subs = [[c.snapshot() for c in s.counts.values()] for s in subscribers]
        return subs, [[c.kind for c in s.counts.values()] for s in subscribers]

    return await measure_window(
        seconds,
        pids,
        [os.getpid()],
        sent,
        counts,
        lambda sent: [sum(sent[j] for j in src) for src in sources],
    )


async def measure_window(
    seconds: float,
    pids: dict[str, list[int]],
    load_pids: list[int],
    sent: Callable[[], Awaitable[list[int]]],
    counts: Callable[[], Awaitable[tuple[list[list[Snapshot]], list[list[str]]]]],
    expected: Callable[[list[int]], list[int]],
) -> Window:
    """Measure for ``seconds``: the server's processes (``pids``, by role), the load
    generator's (``load_pids``), the publishers' packets sent (``sent``), the subscribers'
    counts and their kinds (``counts``); ``expected`` gives each subscriber's expected packets
    from the publishers' sent."""
    import asyncio

    def cpu() -> dict[str, float]:
        return {role: sum(cpu_seconds(p) for p in ps) for role, ps in pids.items()}

    def load_cpu() -> float:
        return sum(cpu_seconds(p) for p in load_pids)

    server_pids = [p for ps in pids.values() for p in ps]
    drops0 = udp_drops(server_pids), udp_drops(load_pids)
    sent0 = await sent()
    await asyncio.sleep(LAG_S)
    subs0, kinds0 = await counts()
    cpu0, self0, busy0 = cpu(), load_cpu(), machine_busy_seconds()
    t0 = time.monotonic()
    await asyncio.sleep(seconds)
    cpu1, self1, busy1 = cpu(), load_cpu(), machine_busy_seconds()
    wall = time.monotonic() - t0
    # Packets sent in the window's last moments are still on their way: count what the
    # subscribers received a little later (the publishers' counts were taken at the end).
    sent1 = await sent()
    await asyncio.sleep(LAG_S)
    subs1, _ = await counts()
    drops1 = udp_drops(server_pids), udp_drops(load_pids)
    sent_in = [b - a for a, b in zip(sent0, sent1, strict=True)]
    received, seq_expected, frames, octets, vtracks = count_deltas(subs0, subs1, kinds0)
    return Window(
        seconds=wall,
        server_cpu={role: cpu1[role] - cpu0[role] for role in pids},
        load_cpu=self1 - self0,
        sent=sent_in,
        received=received,
        expected=expected(sent_in),
        seq_expected=seq_expected,
        video_frames=frames,
        video_octets=octets,
        video_tracks=vtracks,
        server_drops=drops1[0] - drops0[0],
        load_drops=drops1[1] - drops0[1],
        other_cpu=max(
            0.0, busy1 - busy0 - (self1 - self0) - sum(cpu1.values()) + sum(cpu0.values())
        ),
    )
