"""Rallypoint servers as real processes (``python -m signaling serve``), for the tests that
start, signal and kill them."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from nethelpers import free_port

# -P: the server itself never imports from the working directory (a test runs it in one
# that holds a `signaling/` folder); what it starts must not either.
RALLYPOINT = [sys.executable, "-P", "-m", "signaling"]


class Server:
    def __init__(
        self,
        data: Path,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        *,
        session: bool = False,
        cwd: Path | None = None,
        preexec: Callable[[], None] | None = None,
    ) -> None:
        self.cwd = cwd
        self.preexec = preexec
        self.port = free_port()
        self.data = data
        self.env = {**os.environ, "RALLYPOINT_TURN_ENABLED": "false", **(env or {})}
        self.args = args or []
        self.session = session  # its own session and process group, as a terminal gives it
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data.parent / f"server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def start(self) -> None:
        self.data.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    *RALLYPOINT,
                    "serve",
                    "--port",
                    str(self.port),
                    "--data-dir",
                    str(self.data),
                    *self.args,
                ],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.session,
                cwd=self.cwd,
                preexec_fn=self.preexec,
            )
        for _ in range(200):
            try:
                _, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.close()
                await w.wait_closed()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(self.log.read_text()) from None
                await asyncio.sleep(0.05)
        raise RuntimeError("server did not start")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=20)
