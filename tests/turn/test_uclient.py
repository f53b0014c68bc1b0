"""coturn's own test client, turnutils_uclient, against the standalone command.

The server is started as ``python -m turn`` (what ``rallypoint turn`` runs).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
from turn_helpers import SECRET

UCLIENT = shutil.which("turnutils_uclient")


@pytest.fixture(scope="module")
def standalone() -> Iterator[tuple[subprocess.Popen[str], int]]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "turn",
            "--listen",
            "127.0.0.1:0",
            "--secret",
            SECRET,
            "--allow-peer",
            "127.0.0.0/8",
            "--relay-ip",
            "127.0.0.1",
            "--max-allocations-per-user",
            "100",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"udp 127\.0\.0\.1:(\d+), tcp 127\.0\.0\.1:(\d+)", line)
        assert match, line
        yield process, int(match.group(1))
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()


def uclient(port: int, *flags: str, secret: str = SECRET) -> str:
    assert UCLIENT is not None, "turnutils_uclient missing: apt-get install coturn"
    command = [UCLIENT, "-W", secret, "-p", str(port), "-m", "2", "-n", "50", "-l", "500"]
    command += ["-z", "5", *flags, "127.0.0.1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr


@pytest.mark.parametrize(
    "flags",
    [("-y",), ("-y", "-s"), ("-t", "-y"), ("-t", "-y", "-s")],
    ids=["udp-channels", "udp-send", "tcp-channels", "tcp-send"],
)
def test_uclient_relays_without_loss(
    standalone: tuple[subprocess.Popen[str], int], flags: tuple[str, ...]
) -> None:
    _, port = standalone
    output = uclient(port, *flags)
    totals = re.findall(r"tot_send_msgs=(\d+), tot_recv_msgs=(\d+)", output)
    assert totals, output
    sent, received = map(int, totals[-1])
    # -m 2 runs 2 client pairs with RTP and RTCP sessions: 4 sessions x 50 messages.
    assert sent == 200, output
    assert received == sent, output
    assert "Total lost packets 0 (0.000000%)" in output, output


def test_uclient_with_the_wrong_secret_is_refused(
    standalone: tuple[subprocess.Popen[str], int],
) -> None:
    _, port = standalone
    output = uclient(port, "-y", "-n", "5", secret="not-the-secret")
    # uclient retries the 401 challenge, then gives up.
    assert "Cannot complete Allocation" in output, output
    assert "tot_send_msgs" not in output, output


def test_cli_requires_a_secret() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "turn", "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "--secret" in result.stderr


def test_cli_reports_a_port_in_use(standalone: tuple[subprocess.Popen[str], int]) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "turn", "--listen", f"127.0.0.1:{port}", "--secret", "s"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert "cannot start" in result.stderr


# Last: it stops the module's server.
def test_standalone_stops_cleanly_on_sigterm(
    standalone: tuple[subprocess.Popen[str], int],
) -> None:
    process, port = standalone
    output = uclient(port, "-y", "-n", "5", secret="not-the-secret")
    assert "Cannot complete Allocation" in output, output
    output = uclient(port, "-y", "-n", "10")
    assert "Total lost packets 0 (0.000000%)" in output, output
    process.send_signal(signal.SIGTERM)
    assert process.wait(10) == 0
    assert process.stdout is not None
    rest = process.stdout.read()
    assert "turn: stopping; stats" in rest
    relayed = re.search(r"'relayed_packets': (\d+)", rest)
    # At least the 4 x 10 messages just sent, over two relay hops each.
    assert relayed and int(relayed.group(1)) >= 80, rest
    failures = re.search(r"'auth_failures': (\d+)", rest)
    assert failures and int(failures.group(1)) >= 1, rest
    assert "Traceback" not in rest, rest
