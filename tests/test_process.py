"""The `rallypoint` command as a process: start-up, tokens, SIGTERM, and durability after
SIGKILL."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import subprocess
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from processes import RALLYPOINT, Server

from signaling.core.tokens import verify_token
from signaling.sdk.wsclient import Client, ClientError

SECRET = "a-test-secret-of-at-least-32-bytes"


async def test_open_mode_start_up_and_sigterm(tmp_path: Path, servers: list[Server]) -> None:
    srv = Server(tmp_path / "data")
    servers.append(srv)
    await srv.start()
    c = Client(srv.url)
    await c.connect(name="Ann", identity="ann")
    await c.request({"type": "join", "room": "lobby"})
    ack = await c.send_chat("room:lobby", "kept")
    assert srv.stop(signal.SIGTERM) == 0
    ev = await c.next_event("_closed", timeout=10)
    assert ev["code"] == 1001  # GOING_AWAY
    await c.close()
    assert "OPEN MODE" in srv.log.read_text()
    srv2 = Server(tmp_path / "data")
    servers.append(srv2)
    await srv2.start()
    c2 = Client(srv2.url)
    await c2.connect(name="Ann", identity="ann")
    await c2.request({"type": "join", "room": "lobby"})
    hist = await c2.request({"type": "history", "conversation": "room:lobby"})
    assert [(m["seq"], m["text"]) for m in hist["messages"]] == [(ack["seq"], "kept")]
    await c2.close()


async def test_acknowledged_messages_survive_sigkill(tmp_path: Path, servers: list[Server]) -> None:
    srv = Server(
        tmp_path / "data",
        env={"RALLYPOINT_LIMITS_RATE_PER_S": "100000", "RALLYPOINT_LIMITS_BURST": "100000"},
    )
    servers.append(srv)
    await srv.start()
    clients = [Client(srv.url) for _ in range(4)]
    for i, c in enumerate(clients):
        await c.connect(name=f"u{i}", identity=f"u{i}")
        await c.request({"type": "join", "room": "crash"})
    acked: list[dict[str, object]] = []
    stop = asyncio.Event()

    async def writer(c: Client, n: int) -> None:
        for k in range(2000):  # bounded; the kill comes long before
            if stop.is_set():
                return
            try:
                acked.append(await c.send_chat("room:crash", f"{n}-{k}", cid=f"{n}-{k}", retries=0))
            except (ClientError, ConnectionError, TimeoutError):
                return

    tasks = [asyncio.create_task(writer(c, i)) for i, c in enumerate(clients)]
    while len(acked) < 300:
        await asyncio.sleep(0.01)
    srv.stop(signal.SIGKILL)
    stop.set()
    await asyncio.gather(*tasks)
    for c in clients:
        await c.close()
    assert len(acked) >= 300

    srv2 = Server(tmp_path / "data")
    servers.append(srv2)
    await srv2.start()
    c = Client(srv2.url)
    await c.connect(name="check", identity="check")
    stored: dict[int, str] = {}
    after = 0
    while True:
        page = await c.request(
            {"type": "history", "conversation": "room:crash", "after": after, "limit": 200}
        )
        stored.update({m["seq"]: m["cid"] for m in page["messages"]})
        if not page["more"]:
            break
        after = page["messages"][-1]["seq"]
    await c.close()
    assert sorted(stored) == list(range(1, len(stored) + 1))  # gap-free
    missing = [a for a in acked if stored.get(a["seq"]) != a["cid"]]  # type: ignore[call-overload]
    assert missing == []


MARK = "PROCESS_TEST_MARK"  # not RALLYPOINT_*: the server reads those as config
SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


def marked(mark: str) -> dict[int, str]:
    """Live processes (zombies aside) whose environment carries ``MARK=mark``, with their command
    lines: a server started with that mark and every process it started, wherever they were
    reparented (a worker left behind by a dead server is no longer its child)."""
    tag = f"{MARK}={mark}".encode()
    found: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if tag not in (d / "environ").read_bytes().split(b"\0"):
                continue
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # it exited while we looked
            continue
        if state != "Z":
            found[int(d.name)] = cmd
    return found


def catches(pid: int, bit: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    line = next(x for x in status.splitlines() if x.startswith("SigCgt:"))
    return bool(int(line.split()[1], 16) & bit)


async def sfu_workers_up(srv: Server, mark: str, n: int) -> list[int]:
    """Wait until the server's ``n`` SFU workers run their event loop. A worker installs its
    SIGTERM handler in its loop just before it reports ready, so that is when /proc shows it
    catching SIGTERM."""
    assert srv.proc is not None
    async with asyncio.timeout(60):
        while True:
            workers = [pid for pid, cmd in marked(mark).items() if "sfu.worker" in cmd]
            if len(workers) == n and all(catches(pid, SIGTERM_BIT) for pid in workers):
                return workers
            if srv.proc.poll() is not None:
                raise RuntimeError(srv.log.read_text())
            await asyncio.sleep(0.05)


def sfu_server(tmp_path: Path, mark: str) -> Server:
    env = {"RALLYPOINT_SFU_ENABLED": "true", "RALLYPOINT_SFU_WORKERS": "2", MARK: mark}
    return Server(tmp_path / "data", env=env, session=True)


async def test_ctrl_c_stops_the_server_and_its_sfu_workers_quietly(
    tmp_path: Path, servers: list[Server]
) -> None:
    """Ctrl-C in a terminal sends SIGINT to the whole foreground process group: the server must
    stop as quietly as on SIGTERM, closing its SFU workers itself (no worker tracebacks, no
    "worker died; restarting"), and leave no process behind."""
    mark = uuid.uuid4().hex
    srv = sfu_server(tmp_path, mark)
    servers.append(srv)
    await srv.start()
    await sfu_workers_up(srv, mark, 2)
    assert srv.proc is not None
    os.killpg(srv.proc.pid, signal.SIGINT)  # the server leads its own group, as in a terminal
    assert srv.proc.wait(timeout=30) == 0
    log = srv.log.read_text()
    assert "Traceback" not in log, log
    assert "died" not in log, log
    assert marked(mark) == {}


async def test_sfu_workers_exit_when_the_server_is_killed(
    tmp_path: Path, servers: list[Server]
) -> None:
    """The workers run in their own session, so no signal to the server's group reaches them;
    when the server dies without closing them, each reads the end of its channel and exits."""
    mark = uuid.uuid4().hex
    srv = sfu_server(tmp_path, mark)
    servers.append(srv)
    await srv.start()
    await sfu_workers_up(srv, mark, 2)
    srv.stop(signal.SIGKILL)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while (left := marked(mark)) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    for pid in left:  # a failed run must not leave them running
        os.kill(pid, signal.SIGKILL)
    assert left == {}


def token_cli(*args: str, **run: Any) -> subprocess.CompletedProcess[str]:
    """Run ``rallypoint token`` with ``args``."""
    return subprocess.run([*RALLYPOINT, "token", *args], capture_output=True, text=True, **run)


def test_token_command(tmp_path: Path) -> None:
    out = token_cli(
        *("--room", "lobby", "--room", "side", "--identity", "alice", "--name", "Alice A"),
        *("--ttl", "600", "--grant", "join,chat", "--grant", "moderate"),
        *("--api-key", "k1", "--api-secret", SECRET),
        check=True,
    )
    claims = verify_token(out.stdout.strip(), "k1", SECRET)
    assert claims.identity == "alice" and claims.name == "Alice A"
    assert claims.rooms == {
        "lobby": frozenset({"join", "chat", "moderate"}),
        "side": frozenset({"join", "chat", "moderate"}),
    }
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[auth]\napi_key = "k2"\napi_secret = "{SECRET}"\n')
    out = token_cli("--config", str(cfg), "--room", "*", "--identity", "bob", check=True)
    assert verify_token(out.stdout.strip(), "k2", SECRET).can("any", "publish")
    bad = token_cli(
        "--room", "r", "--identity", "x", env={**os.environ, "HOME": "/tmp"}, cwd=tmp_path
    )
    assert bad.returncode == 2 and "API key" in bad.stderr
    bad = token_cli(
        *("--room", "r", "--identity", "x", "--grant", "fly"),
        *("--api-key", "k", "--api-secret", SECRET),
    )
    assert bad.returncode == 2 and "unknown grant" in bad.stderr


def test_serve_refuses_unknown_config_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[server]\nhots = '0.0.0.0'\n")
    r = subprocess.run(
        [*RALLYPOINT, "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2 and "server.hots" in r.stderr
    r = subprocess.run(
        [*RALLYPOINT, "serve"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "RALLYPOINT_LIMITS_BURTS": "3"},
    )
    assert r.returncode == 2 and "RALLYPOINT_LIMITS_BURTS" in r.stderr


async def tls_closed(raw: socket.socket) -> None:
    """Wait for a TLS socket's close_notify exchange: aiohttp closes TLS transports without
    waiting for it (aio-libs/aiohttp#1925), and a test loop that ends first leaks the socket."""
    for _ in range(100):  # bounded: 5 s
        if raw.fileno() == -1:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the TLS connection did not close")


async def test_token_mode_and_tls(tmp_path: Path, servers: list[Server]) -> None:
    """With a key and secret the server wants tokens; with a certificate it serves WSS."""
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_pem.write_to_path(key_file)
    cert.cert_chain_pems[0].write_to_path(cert_file)
    srv = Server(
        tmp_path / "data",
        env={"RALLYPOINT_AUTH_API_KEY": "k", "RALLYPOINT_AUTH_API_SECRET": SECRET},
        args=["--tls-cert", str(cert_file), "--tls-key", str(key_file)],
    )
    servers.append(srv)
    await srv.start()
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"wss://127.0.0.1:{srv.port}/ws", ssl=ctx) as ws:
            raw = ws.get_extra_info("socket")
            await ws.send_json({"type": "hello", "v": 1, "name": "anon"})
            msg = await ws.receive_json()
            assert msg["code"] == "token_required"
        await tls_closed(raw)
        token = token_cli(
            *("--room", "x", "--identity", "t", "--api-key", "k", "--api-secret", SECRET),
            check=True,
        ).stdout.strip()
        async with http.ws_connect(f"wss://127.0.0.1:{srv.port}/ws", ssl=ctx) as ws:
            raw = ws.get_extra_info("socket")
            await ws.send_json({"type": "hello", "v": 1, "token": token})
            msg = await ws.receive_json()
            assert msg["type"] == "welcome" and msg["open_mode"] is False
        await tls_closed(raw)
    assert "token mode" in srv.log.read_text()


async def test_a_client_vanishing_with_chat_writes_in_flight_harms_nobody(
    tmp_path: Path, servers: list[Server]
) -> None:
    """The acknowledgement of a chat write goes to a socket the client has just dropped: under
    uvloop (as `serve` runs) writing to it raised, and the exception escaped the store link's
    data_received, which failed every write in flight and restarted the store writer."""
    srv = Server(
        tmp_path / "data",
        env={"RALLYPOINT_LIMITS_RATE_PER_S": "100000", "RALLYPOINT_LIMITS_BURST": "100000"},
    )
    servers.append(srv)
    await srv.start()
    other = Client(srv.url)
    await other.connect(name="Other", identity="other")
    await other.request({"type": "join", "room": "v"})
    async with aiohttp.ClientSession() as http:
        for i in range(40):  # bounded: each round is a few ms
            ws = await http.ws_connect(srv.url)
            await ws.send_json({"type": "hello", "v": 1, "name": "Gone", "identity": "gone"})
            assert (await ws.receive_json())["type"] == "welcome"
            await ws.send_json({"type": "join", "room": "v", "id": "j"})
            while (await ws.receive_json()).get("re") != "j":
                pass
            for k in range(60):
                await ws.send_json(
                    {"type": "send", "conversation": "room:v", "cid": f"{i}-{k}", "text": "x"}
                )
            response = ws._response
            response.connection.transport.abort()  # type: ignore[union-attr]  # gone, no close
            response.close()  # handshake, its acks still to come
    await other.send_chat("room:v", "still here", retries=0)  # the store still works
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{srv.port}/metrics") as r:
            text = await r.text()
    samples = dict(line.split() for line in text.splitlines() if not line.startswith("#"))
    assert float(samples["rallypoint_store_writer_restarts_total"]) == 0
    assert float(samples["rallypoint_internal_errors_total"]) == 0
    await other.close()
    srv.stop()
    log = srv.log.read_text()
    assert "Traceback" not in log and "restarting" not in log, log[-3000:]


async def test_child_processes_import_only_the_installed_package(
    tmp_path: Path, servers: list[Server]
) -> None:
    """The store writer and the SFU workers run `python -m ...`: Python put the working
    directory first on their path, so a `signaling/` or `sfu/` folder there (another checkout,
    or anything an attacker can write) ran instead of the installed package."""
    evil = tmp_path / "evil"
    marker = tmp_path / "ran-from-the-working-directory"
    payload = f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\n"
    for pkg in ("signaling", "signaling/chat", "sfu"):
        (evil / pkg).mkdir(parents=True)
        (evil / pkg / "__init__.py").write_text(payload)
    (evil / "signaling" / "chat" / "writer.py").write_text(payload)
    (evil / "sfu" / "worker.py").write_text(payload)
    srv = Server(tmp_path / "data", env={"RALLYPOINT_SFU_WORKERS": "1"}, cwd=evil)
    servers.append(srv)
    await srv.start()
    c = Client(srv.url)
    await c.connect(name="Ann", identity="ann")
    await c.request({"type": "join", "room": "safe"})
    await c.send_chat("room:safe", "stored by the real writer")
    async with aiohttp.ClientSession() as http:  # the SFU worker is up and answers
        async with http.get(f"http://127.0.0.1:{srv.port}/metrics") as r:
            assert "rallypoint_sfu_rooms" in await r.text()
    await c.close()
    assert srv.stop() == 0
    assert not marker.exists(), marker.read_text()


async def _closed_by_server(reader: asyncio.StreamReader, within_s: float) -> bool:
    """Whether the server closes this connection within ``within_s`` (reads until EOF)."""
    try:
        async with asyncio.timeout(within_s):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return True


async def test_slow_headers_are_cut_off_and_one_address_cannot_take_every_socket(
    tmp_path: Path, servers: list[Server]
) -> None:
    """Incomplete requests were held ~75 s and one address could open connections until the
    file descriptors ran out, health checks included."""
    srv = Server(
        tmp_path / "data",
        env={
            "RALLYPOINT_SERVER_HEADER_TIMEOUT_S": "1",
            "RALLYPOINT_SERVER_MAX_CONNECTIONS_PER_ADDRESS": "5",
        },
    )
    servers.append(srv)
    await srv.start()
    slow = []
    for _ in range(5):  # slowloris: a request line and a header, never the end of the headers
        r, w = await asyncio.open_connection("127.0.0.1", srv.port)
        w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: 1")
        slow.append((r, w))
    # The sixth from the same address is refused at once...
    r6, w6 = await asyncio.open_connection("127.0.0.1", srv.port)
    w6.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await _closed_by_server(r6, 5)
    # ...while another address is served (the kernel accepts any 127/8 source on loopback).
    r7, w7 = await asyncio.open_connection("127.0.0.1", srv.port, local_addr=("127.0.0.2", 0))
    w7.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    async with asyncio.timeout(5):
        answer = await r7.read()
    assert answer.startswith(b"HTTP/1.1 200")
    # The slow ones are closed by the header deadline, and their address is free again.
    for r, _ in slow:
        assert await _closed_by_server(r, 5)
    r8, w8 = await asyncio.open_connection("127.0.0.1", srv.port)
    w8.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    async with asyncio.timeout(5):
        assert (await r8.read()).startswith(b"HTTP/1.1 200")
    for w in [w for _, w in slow] + [w6, w7, w8]:
        w.close()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{srv.port}/metrics") as resp:
            text = await resp.text()
    samples = dict(line.split() for line in text.splitlines() if not line.startswith("#"))
    assert float(samples["rallypoint_http_connections_refused_per_address_total"]) >= 1
    assert float(samples["rallypoint_http_header_timeouts_total"]) == 5


def _soft_nofile(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-file limit in /proc")


async def test_the_open_file_limit_is_raised_to_what_the_configuration_needs(
    tmp_path: Path, servers: list[Server]
) -> None:
    """Under the common soft limit of 1,024 the server ran out of sockets long before
    limits.max_sessions (20,000): 1,100 half-open connections made every new one fail."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard >= 4000, "this test needs a hard limit of at least 4,000 open files"
    srv = Server(
        tmp_path / "data",
        env={"RALLYPOINT_LIMITS_MAX_SESSIONS": "3000"},
        preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)),
    )
    servers.append(srv)
    await srv.start()
    assert srv.proc is not None
    assert _soft_nofile(srv.proc.pid) == 3000 + 256  # sessions + room for the rest
    srv.stop()
    low = Server(  # a hard limit below the needs: raised as far as it goes, and a warning
        tmp_path / "data2",
        env={"RALLYPOINT_LIMITS_MAX_SESSIONS": "3000"},
        preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 1024)),
    )
    servers.append(low)
    await low.start()
    assert low.proc is not None
    assert _soft_nofile(low.proc.pid) == 1024
    low.stop()
    assert "LimitNOFILE" in low.log.read_text()
