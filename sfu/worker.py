"""An SFU worker process: hosts rooms, talks to the signaling process over a channel.

Run as ``python -m sfu.worker --fd N`` with one end of a Unix socket pair inherited as fd N
(``sfu.pool`` does this). Each worker is one asyncio loop on one core; rooms are spread over
workers by the pool and a room lives in exactly one worker.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import socket
import sys
import time
from typing import Any, cast

from aiortc import RTCIceCandidate
from aiortc.sdp import candidate_from_sdp

from .channel import Reply, Request, WorkerEvent, encode_frame, read_frame
from .forward import Counters
from .room import MediaError, Room
from .rtc import HostCandidatePolicy, check_internals
from .tasks import TaskSet

log = logging.getLogger("rallypoint.sfu.worker")
TICK_S = 0.25


class Worker:
    """Rooms of this process and the request handlers."""

    def __init__(self, writer: asyncio.StreamWriter, video_codec: str) -> None:
        self.writer = writer
        self.video_codec = video_codec
        self.rooms: dict[str, Room] = {}
        self.counters = Counters()
        self._tasks = TaskSet()

    def emit(self, msg: WorkerEvent | Reply) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode_frame(msg))

    def room(self, name: str) -> Room:
        r = self.rooms.get(name)
        if r is None:
            r = self.rooms[name] = Room(name, self.emit, self.counters, self.video_codec)
        return r

    async def handle(self, req: Request) -> dict[str, Any]:
        """Carry out one request (``sfu.channel``); its result."""
        if req["op"] == "stats":
            return {"rooms": len(self.rooms), **dataclasses.asdict(self.counters)}
        name = req["room"]
        if req["op"] == "join":
            return {
                "tracks": self.room(name).join(
                    req["participant"], req["subscribe"], req["identity"], req["name"]
                )
            }
        room = self.rooms.get(name)
        if room is None:
            if req["op"] in ("record_start", "record_stop"):
                raise MediaError("not_in_room", "nobody is in the room's media: nothing to record")
            raise MediaError("not_in_room", "join the room before sending media")
        if req["op"] == "record_start":
            await room.start_recording(req)
            return {}
        if req["op"] == "record_stop":
            return {"recording": await room.stop_recording()}
        if req["op"] == "room_stats":
            return {"forwarding": room.forwarding(), "layer_sizes": room.layer_sizes()}
        pid = req["participant"]
        if req["op"] == "leave":
            await room.leave(pid)
            if not room.participants and self.rooms.get(name) is room:
                del self.rooms[name]
                await room.close()
                self.emit({"ev": "room_closed", "room": name})
            return {}
        if req["op"] == "publish":
            return {"sdp": await room.publish(pid, req["sdp"], req["tracks"])}
        if req["op"] == "subscribe":
            await room.resubscribe(pid)
        elif req["op"] == "answer":
            await room.subscribe_answer(pid, req["sdp"])
        elif req["op"] == "ice":
            await self._ice(room, pid, req["target"], req["candidate"])
        elif req["op"] == "mute":
            room.mute(pid, req["track"], req["muted"])
        elif req["op"] == "pause":
            room.pause(pid, req["track"], req["paused"])
        elif req["op"] == "render":
            self.counters.render_reports += 1
            room.render(pid, req["tracks"])
        elif req["op"] == "unpublish":
            room.unpublish(pid, req["track"])
        return {}

    async def _ice(self, room: Room, pid: str, target: str, cand: dict[str, Any] | None) -> None:
        p = room.participant(pid)
        pc = p.pub if target == "publisher" else p.sub
        if pc is None:
            raise MediaError("bad_sdp", f"no {target} connection to add a candidate to")
        if not cand or not cand.get("candidate"):
            return  # end of candidates
        text = cand["candidate"]
        try:
            c: RTCIceCandidate = candidate_from_sdp(
                text.split(":", 1)[1] if text.startswith("candidate:") else text
            )
        except (ValueError, IndexError):
            raise MediaError("bad_sdp", "the ICE candidate is malformed") from None
        c.sdpMid = cand.get("sdpMid")
        c.sdpMLineIndex = cand.get("sdpMLineIndex")
        if c.sdpMid is None and c.sdpMLineIndex is None:
            c.sdpMLineIndex = 0
        try:
            await pc.addIceCandidate(c)
        except ValueError as e:
            raise MediaError("bad_sdp", f"the ICE candidate was refused: {e}") from None

    async def _run_one(self, msg: dict[str, Any]) -> None:
        rid: int = msg.pop("id")
        req = cast(Request, msg)
        try:
            result = await self.handle(req)
            reply: Reply = {"id": rid, "ok": True, "result": result}
        except MediaError as e:
            reply = {"id": rid, "ok": False, "code": e.code, "message": e.message}
        except Exception:
            log.exception("worker op %s failed", req.get("op"))
            reply = {
                "id": rid,
                "ok": False,
                "code": "internal_error",
                "message": "the media server failed to handle this request",
            }
        self.emit(reply)

    def spawn(self, msg: dict[str, Any]) -> None:
        self._tasks.spawn(self._run_one(msg))

    async def ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            for room in list(self.rooms.values()):
                room.tick(now)

    async def close(self) -> None:
        for room in list(self.rooms.values()):
            await room.close()
        self.rooms.clear()


async def serve(
    sock: socket.socket, video_codec: str, policy: HostCandidatePolicy | None = None
) -> None:
    check_internals()
    if policy is not None and policy.active:
        policy.install()
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    worker = Worker(writer, video_codec)
    worker.emit({"ev": "ready", "pid": os.getpid()})
    ticker = asyncio.ensure_future(worker.ticker())
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # The pool starts workers in their own session, so a terminal's Ctrl-C does not reach them;
    # a SIGINT sent to a worker itself (kill -INT, or Ctrl-C on one run by hand) stops it as
    # SIGTERM does, without a KeyboardInterrupt traceback.
    loop.add_signal_handler(signal.SIGINT, stop.set)
    reading = asyncio.ensure_future(_read_loop(reader, worker))
    await asyncio.wait(
        [reading, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED
    )
    ticker.cancel()
    reading.cancel()
    await asyncio.gather(ticker, reading, return_exceptions=True)
    await worker.close()
    writer.close()


async def _read_loop(reader: asyncio.StreamReader, worker: Worker) -> None:
    while True:
        msg = await read_frame(reader)
        if msg is None:
            return  # the signaling process went away
        worker.spawn(msg)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sfu.worker")
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--video-codec", default="vp8", choices=("vp8", "h264"))
    p.add_argument("--log-level", default="warning")
    p.add_argument("--bind", default="", help="address ICE sockets bind to (default: each)")
    p.add_argument("--announce", default="", help="address announced in candidates (1:1 NAT)")
    p.add_argument("--ports", default="", help="UDP port range LO-HI for media")
    args = p.parse_args(argv)
    lo, _, hi = args.ports.partition("-")
    policy = HostCandidatePolicy(args.bind, args.announce, int(lo or 0), int(hi or 0))
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s sfu-worker %(name)s: %(message)s",
    )
    sock = socket.socket(fileno=args.fd)
    try:
        import uvloop

        uvloop.run(serve(sock, args.video_codec, policy))
    except ImportError:  # pragma: no cover - non-Linux
        asyncio.run(serve(sock, args.video_codec, policy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
