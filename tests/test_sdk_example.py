"""The runnable example of docs/SDK.md works against a real server."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from aiohttp.test_utils import TestServer

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "call_demo.py"


async def test_call_demo_runs(server: TestServer) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        f"ws://127.0.0.1:{server.port}/ws",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode()
    assert proc.returncode == 0, text
    assert "his phone got: call_answered_elsewhere" in text
    assert "decoded 10 frames of 640x480 video" in text
    assert "call ended: completed" in text
    for device in ("alice", "bob-phone", "bob-tablet"):
        assert f"{device} sees in dm:alice|bob: 'Video call, 0:0" in text
