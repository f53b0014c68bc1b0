"""The signaling process's side of the SFU: worker processes and the room -> worker map.

``SfuPool`` starts one worker per core (configurable), assigns each room to the worker with the
fewest rooms when the room first needs media, and forwards requests and events. A worker that
dies fails its pending requests, reports its rooms lost, and is restarted.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import Any, cast

from .channel import (
    PoolEvent,
    Reply,
    RoomEvent,
    RoomRequest,
    StatsRequest,
    encode_frame,
    read_frame,
)

log = logging.getLogger("rallypoint.sfu.pool")


class SfuError(Exception):
    """A refused or failed media request, with a signaling error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class WorkerHandle:
    """One worker process and its channel."""

    def __init__(
        self,
        index: int,
        on_event: Callable[[WorkerHandle, RoomEvent], None],
        on_lost: Callable[[WorkerHandle], None],
        video_codec: str,
        log_level: str,
        extra_args: list[str],
    ) -> None:
        self.extra_args = extra_args
        self.index = index
        self.on_event = on_event
        self.on_lost = on_lost
        self.video_codec = video_codec
        self.log_level = log_level
        self.proc: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.rooms: set[str] = set()
        self.pending: dict[int, asyncio.Future[Reply]] = {}
        self.ready = asyncio.Event()
        self.reader_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-P",  # no working directory on the path: only the installed package runs
            "-m",
            "sfu.worker",
            "--fd",
            str(child.fileno()),
            "--video-codec",
            self.video_codec,
            "--log-level",
            self.log_level,
            *self.extra_args,
            pass_fds=[child.fileno()],
            env=env,
            # A terminal's Ctrl-C (SIGINT to its foreground process group) is the server's to
            # handle: it closes this pool in order. In the server's group each worker would die
            # of it at the same moment, and be reported dead and restarted. Outside the group a
            # worker still exits when the server dies: it reads the end of its channel.
            start_new_session=True,
        )
        child.close()
        reader, self.writer = await asyncio.open_unix_connection(sock=parent)
        self.ready.clear()
        self.reader_task = asyncio.ensure_future(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                msg = await read_frame(reader)
            except ValueError:
                msg = None
            if msg is None:
                break
            rid = msg.get("id")
            if rid is not None:
                fut = self.pending.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_result(cast(Reply, msg))
            elif msg.get("ev") == "ready":
                self.ready.set()
            else:
                try:
                    self.on_event(self, cast(RoomEvent, msg))
                except Exception:  # the owner's bug must not stop this worker's replies
                    log.exception("handling SFU worker %d's event %s failed", self.index, msg["ev"])
        self.ready.clear()  # requests wait for the restarted worker, not the dead one's socket
        if self.writer is not None:
            self.writer.close()
        err = SfuError("sfu_unavailable", "the media server restarted; publish again")
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(err)
        self.pending.clear()
        self.on_lost(self)

    def send(self, msg: dict[str, Any]) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(encode_frame(msg))

    async def stop(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self.reader_task is not None:
            self.reader_task.cancel()
            await asyncio.gather(self.reader_task, return_exceptions=True)


class SfuPool:
    """Worker processes and routing of rooms to them."""

    def __init__(
        self,
        workers: int,
        on_event: Callable[[PoolEvent], None],
        video_codec: str = "vp8",
        log_level: str = "warning",
        timeout_s: float = 15.0,
        *,
        bind: str = "",
        announce: str = "",
        port_min: int = 0,
        port_max: int = 0,
    ) -> None:
        self.n = workers or (os.cpu_count() or 1)
        self.on_event = on_event
        self.video_codec = video_codec
        self.log_level = log_level
        self.timeout_s = timeout_s
        self.extra_args = ["--bind", bind, "--announce", announce]
        if port_min and port_max:
            # Each worker gets its own slice of the range.
            n = self.n
            span = (port_max - port_min + 1) // n
            if span < 1:
                raise ValueError("sfu port range is smaller than the number of workers")
            self._slices = [(port_min + i * span, port_min + (i + 1) * span - 1) for i in range(n)]
        else:
            self._slices = [(0, 0)] * self.n
        self.workers: list[WorkerHandle] = []
        self.room_worker: dict[str, WorkerHandle] = {}
        # Room -> participants asked to join it (`join` sent or waiting for the worker) and not
        # asked to leave since. A room its worker closed (`room_closed`) stays placed there
        # while this has someone: a join sent after the last leave opened it there again.
        self.members: dict[str, set[str]] = {}
        self._ids = itertools.count(1)
        self._closing = False
        self._restarts: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        from .rtc import check_internals

        check_internals()  # fail at start-up, in the main process, with a clear message
        self.workers = [
            WorkerHandle(
                i,
                self._event,
                self._lost,
                self.video_codec,
                self.log_level,
                [*self.extra_args, "--ports", f"{lo}-{hi}" if lo else ""],
            )
            for i, (lo, hi) in enumerate(self._slices)
        ]
        await asyncio.gather(*(w.start() for w in self.workers))

    async def close(self) -> None:
        self._closing = True
        for t in self._restarts:
            t.cancel()
        await asyncio.gather(*(w.stop() for w in self.workers), return_exceptions=True)

    def _lost(self, worker: WorkerHandle) -> None:
        """A worker's channel closed: it died, or the pool is closing."""
        lost = sorted(worker.rooms)
        worker.rooms.clear()
        for room in lost:
            self.room_worker.pop(room, None)
            self.members.pop(room, None)  # joined again (``room_lost``)
        if self._closing:  # stopped on purpose: nothing to tell, nobody to rejoin
            return
        for room in lost:
            self.on_event({"ev": "room_lost", "room": room})
        log.error("SFU worker %d died; restarting it", worker.index)
        task = asyncio.ensure_future(worker.start())
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    def _event(self, worker: WorkerHandle, ev: RoomEvent) -> None:
        if ev["ev"] == "room_closed":
            room = ev["room"]
            # Closed when its last participant left; someone asked to join it since (the join
            # reached the worker after that leave, or is on its way to it) is there: it stays.
            if not self.members.get(room) and self.room_worker.get(room) is worker:
                del self.room_worker[room]
                worker.rooms.discard(room)
        self.on_event(ev)

    def hosts(self, room: str) -> bool:
        """Whether a worker hosts ``room`` now."""
        return room in self.room_worker

    def worker_for(self, room: str) -> WorkerHandle:
        w = self.room_worker.get(room)
        if w is None:
            w = min(self.workers, key=lambda x: len(x.rooms))
            self.room_worker[room] = w
            w.rooms.add(room)
        return w

    async def request(self, req: RoomRequest) -> dict[str, Any]:
        """Send a request to the room's worker and wait for its reply's result."""
        room = req["room"]
        w = self.worker_for(room)
        if req["op"] == "join":
            self.members.setdefault(room, set()).add(req["participant"])
        elif req["op"] == "leave":
            members = self.members.get(room)
            if members is not None:
                members.discard(req["participant"])
                if not members:
                    del self.members[room]
        try:
            await asyncio.wait_for(w.ready.wait(), self.timeout_s)
        except TimeoutError:
            raise SfuError("sfu_unavailable", "the media server is not ready") from None
        rid = next(self._ids)
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        w.pending[rid] = fut
        w.send({**req, "id": rid})
        try:
            reply = await asyncio.wait_for(fut, self.timeout_s)
        except TimeoutError:
            w.pending.pop(rid, None)
            raise SfuError("sfu_unavailable", "the media server did not answer") from None
        if not reply["ok"]:
            raise SfuError(reply.get("code", "internal_error"), reply.get("message", ""))
        return reply.get("result", {})

    async def stats(self) -> list[dict[str, Any]]:
        out = []
        for w in self.workers:
            rid = next(self._ids)
            fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
            w.pending[rid] = fut
            req: StatsRequest = {"op": "stats"}
            w.send({**req, "id": rid})
            try:
                out.append((await asyncio.wait_for(fut, 5)).get("result", {}))
            except (TimeoutError, SfuError):
                out.append({})
        return out
