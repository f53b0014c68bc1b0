"""Relayed throughput and server CPU per relayed message: Rallypoint's TURN vs coturn.

Both servers run on loopback with the same shared secret, one after the other in the same
run, and coturn's own ``turnutils_uclient`` loads them identically: client-to-client
messages through channels (``-y``), 10 clients, 1,000-byte messages. Every message crosses
two relays (client A -> A's relay -> B's relay -> client B), so "per packet" below means
per client-to-client message, i.e. two relay hops. Server CPU is the time the kernel
accounts to the server's threads (/proc/<pid>/task/*/schedstat, nanoseconds; user +
system) around each load run.

The machine is shared and noisy, so the figure is a median of ratios: one short
warm-up run per server, then ``--rounds`` rounds that each run both servers back to back
(the order alternates every round), the ratio Rallypoint / coturn taken per round, and
the median of those ratios reported with their spread (min-max).

    .venv/bin/python bench/turn.py [--messages 1000] [--interval-ms 5] [--rounds 7]

Prints a table, then a final JSON line
``{"us_per_packet": {"rallypoint": x, "coturn": y}, "ratio_vs_coturn": median, ...}``,
and records the figures in the TURN section of docs/BENCHMARKS.md (``--no-record`` to
skip). Needs ``apt-get install coturn``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from procs import stop

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-secret"
TICKS = os.sysconf("SC_CLK_TCK")
RUN_TIMEOUT_S = 180


@dataclass
class Run:
    server: str
    messages: int
    lost: int
    cpu_s: float
    wall_s: float

    @property
    def us_per_message(self) -> float:
        return self.cpu_s / self.messages * 1e6


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


def cpu_seconds(pid: int) -> float:
    """CPU time of all of ``pid``'s threads, from schedstat (ns) or else /proc/<pid>/stat."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):  # a thread that just exited
                total += int((task / "schedstat").read_text().split()[0])
    except OSError:
        total = 0
    if total:
        return total / 1e9
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of the whole line (1-based); 10 ms ticks.
    return (int(fields[11]) + int(fields[12])) / TICKS


def wait_for_stun(port: int, timeout_s: float = 10.0) -> None:
    """Wait until a STUN Binding request on ``port`` is answered."""
    request = bytes.fromhex("000100002112a442") + os.urandom(12)
    deadline = time.monotonic() + timeout_s
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        while time.monotonic() < deadline:
            sock.sendto(request, ("127.0.0.1", port))
            try:
                sock.recv(2048)
                return
            except OSError:
                continue
    raise RuntimeError(f"server on port {port} did not answer STUN")


def start_rallypoint(port: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "turn", "--listen", f"127.0.0.1:{port}"]
    command += ["--secret", SECRET, "--allow-peer", "127.0.0.0/8", "--relay-ip", "127.0.0.1"]
    command += ["--relay-ports", "40000-44999", "--max-allocations-per-user", "1000"]
    command += ["--max-allocations-per-address", "5000"]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_coturn(port: int) -> subprocess.Popen[bytes]:
    command = ["turnserver", "-n", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1"]
    command += [f"--listening-port={port}", "--use-auth-secret"]
    command += [f"--static-auth-secret={SECRET}", "--realm=rallypoint"]
    command += ["--allow-loopback-peers", "--no-cli", "--no-tls", "--no-dtls"]
    command += ["--min-port=45000", "--max-port=49999", "--no-stdout-log"]
    command += ["--log-file=stdout", "--simple-log"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def load(server: str, pid: int, port: int, args: argparse.Namespace, messages: int = 0) -> Run:
    command = ["turnutils_uclient", "-W", SECRET, "-y", "-m", str(args.clients)]
    command += ["-n", str(messages or args.messages), "-l", str(args.length)]
    command += ["-z", str(args.interval_ms)]
    command += ["-p", str(port), "127.0.0.1"]
    before = cpu_seconds(pid)
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    wall = time.monotonic() - started
    cpu = cpu_seconds(pid) - before
    output = result.stdout + result.stderr
    totals = re.findall(r"tot_send_msgs=(\d+), tot_recv_msgs=(\d+)", output)
    lost = re.search(r"Total lost packets (\d+)", output)
    if not totals or lost is None:
        raise RuntimeError(f"{server}: turnutils_uclient failed:\n{output[-2000:]}")
    sent, received = map(int, totals[-1])
    return Run(server, received, int(lost.group(1)) + sent - received, cpu, wall)


def model_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def coturn_version() -> str:
    result = subprocess.run(["turnserver", "--version"], capture_output=True, text=True)
    return "coturn " + (result.stdout or result.stderr).strip().splitlines()[-1]


def record(section: str) -> None:
    path = ROOT / "docs" / "BENCHMARKS.md"
    text = path.read_text()
    heading = "## TURN (`bench/turn.py`)"
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    end = len(text) if end < 0 else end + 1
    path.write_text(
        text[:start] + section.rstrip() + "\n" + ("\n" + text[end:] if end < len(text) else "")
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10, help="turnutils_uclient -m")
    parser.add_argument("--messages", type=int, default=1000, help="per session (-n)")
    parser.add_argument("--length", type=int, default=1000, help="message bytes (-l)")
    parser.add_argument("--interval-ms", type=int, default=5, help="pacing per session (-z)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of both servers (1-30)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    args.rounds = max(1, min(args.rounds, 30))
    if not shutil.which("turnserver") or not shutil.which("turnutils_uclient"):
        print("bench/turn.py needs coturn: apt-get install coturn", file=sys.stderr)
        return 2
    names = ("rallypoint", "coturn")
    ports = {"rallypoint": free_port(), "coturn": free_port()}
    processes = {
        "rallypoint": start_rallypoint(ports["rallypoint"]),
        "coturn": start_coturn(ports["coturn"]),
    }
    runs: dict[str, list[Run]] = {name: [] for name in names}
    try:
        for port in ports.values():
            wait_for_stun(port)
        for name in names:  # warm-up: imports, caches, first allocations; not counted
            load(name, processes[name].pid, ports[name], args, messages=100)
        for index in range(args.rounds):
            for name in names if index % 2 == 0 else names[::-1]:
                run = load(name, processes[name].pid, ports[name], args)
                runs[name].append(run)
                print(
                    f"round {index + 1}: {name:>10}: {run.messages} messages, lost {run.lost}, "
                    f"cpu {run.cpu_s:.3f} s, wall {run.wall_s:.1f} s, "
                    f"{run.us_per_message:.1f} us/message",
                    flush=True,
                )
    finally:
        for process in processes.values():
            stop(process)

    ratios = [
        r.us_per_message / c.us_per_message
        for r, c in zip(runs["rallypoint"], runs["coturn"], strict=True)
    ]
    ratio = round(statistics.median(ratios), 3)
    low, high = round(min(ratios), 2), round(max(ratios), 2)
    us = {n: round(statistics.median(r.us_per_message for r in runs[n]), 2) for n in names}
    spread = {
        n: (
            round(min(r.us_per_message for r in runs[n]), 1),
            round(max(r.us_per_message for r in runs[n]), 1),
        )
        for n in names
    }
    rates = {
        n: round(sum(r.messages for r in runs[n]) / sum(r.wall_s for r in runs[n])) for n in names
    }
    losses = {n: sum(r.lost for r in runs[n]) for n in names}
    cpus = os.cpu_count()
    machine = f"{cpus} vCPU, {model_name()}, Linux {platform.release()}"
    load_desc = (
        f"`turnutils_uclient -y -m {args.clients} -n {args.messages} -l {args.length} "
        f"-z {args.interval_ms}`"
    )
    rows = "\n".join(
        f"| {label} | {us[n]} | {spread[n][0]}-{spread[n][1]} | {rates[n]} | {losses[n]} |"
        for n, label in (("rallypoint", "Rallypoint `turn/`"), ("coturn", "coturn"))
    )
    per_round = ", ".join(f"{x:.2f}" for x in ratios)
    print()
    print(rows)
    print(f"ratio per round: {per_round}; median {ratio}")
    section = f"""## TURN (`bench/turn.py`)

Server CPU (user + system, all threads, from /proc/<pid>/task/*/schedstat) per
client-to-client message relayed through two allocations (A -> A's relay -> B's relay ->
B), with coturn as the baseline in the same run. Load: {load_desc} (1,000-byte
messages, 5 ms apart per client); both servers on loopback with
the same REST secret. Method: one warm-up run per server, then {args.rounds} rounds that
each run both servers back to back (order alternating); the ratio is taken per round and
the median reported, because this shared 2-vCPU machine is noisy.
Machine: {machine}; {coturn_version()}; Python {platform.python_version()}
(Rallypoint runs `python -m turn` on uvloop, one event loop).

| server | CPU us per message (median) | range over rounds | messages/s relayed | lost |
|---|---|---|---|---|
{rows}

Ratio Rallypoint / coturn: **{ratio}x** (median of {args.rounds} per-round ratios; range
{low}-{high}x; target <= 1.5x). Per-round ratios: {per_round}. Measured
{time.strftime("%Y-%m-%d")}. Reproduce: `.venv/bin/python bench/turn.py`.
"""
    if not args.no_record:
        record(section)
    print(
        json.dumps(
            {
                "us_per_packet": us,
                "ratio_vs_coturn": ratio,
                "ratio_range": [low, high],
                "ratios": [round(x, 3) for x in ratios],
                "messages_per_s": rates,
                "lost": losses,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
