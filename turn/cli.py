"""``rallypoint turn``: run the STUN/TURN server standalone.

``rallypoint turn --listen HOST:PORT --secret SECRET [--realm R] [--allow-peer CIDR]...
[--relay-ports LO-HI] [--external-ip IP] [--tls-cert F --tls-key F]``, also available as
``python -m turn``. Prints one ``turn: listening ...`` line once bound, then serves until
SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys

from .server import TurnServer
from .settings import TurnSettings


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host or "0.0.0.0", int(port)


def _port_range(value: str) -> tuple[int, int]:
    low, sep, high = value.partition("-")
    if not sep or not low.isdigit() or not high.isdigit():
        raise argparse.ArgumentTypeError(f"expected LO-HI, got {value!r}")
    return int(low), int(high)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``rallypoint turn``."""
    parser = argparse.ArgumentParser(
        prog="rallypoint turn",
        description="Run the Rallypoint STUN/TURN server (coturn-compatible REST credentials).",
    )
    parser.add_argument("--listen", type=_host_port, default=("0.0.0.0", 3478), metavar="HOST:PORT")
    parser.add_argument(
        "--secret",
        default=os.environ.get("RALLYPOINT_TURN_SECRET", ""),
        help="shared secret (default: $RALLYPOINT_TURN_SECRET)",
    )
    parser.add_argument("--realm", default="rallypoint")
    parser.add_argument(
        "--allow-peer",
        action="append",
        default=[],
        metavar="CIDR",
        help="allow relaying to this otherwise denied range (repeatable)",
    )
    parser.add_argument("--relay-ports", type=_port_range, default=(49152, 65535), metavar="LO-HI")
    parser.add_argument("--relay-ip", default="", help="local address relay sockets bind to")
    parser.add_argument(
        "--external-ip", default="", help="public address announced for relays (1:1 NAT)"
    )
    parser.add_argument("--max-allocations", type=int, default=1000)
    parser.add_argument("--max-allocations-per-user", type=int, default=10)
    parser.add_argument("--max-allocations-per-address", type=int, default=300)
    parser.add_argument(
        "--max-bps", type=int, default=0, help="bytes per second per allocation (0 = unlimited)"
    )
    parser.add_argument("--no-tcp", action="store_true", help="UDP only")
    parser.add_argument(
        "--max-tcp-connections-per-address",
        type=int,
        default=300,
        help="TCP and TLS connections per client IP address",
    )
    parser.add_argument(
        "--tcp-first-request-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="close a TCP/TLS connection whose first STUN request has not come by then",
    )
    parser.add_argument("--tls-cert", default="")
    parser.add_argument("--tls-key", default="")
    parser.add_argument("--tls-port", type=int, default=5349)
    parser.add_argument("--uvloop", choices=("auto", "on", "off"), default="auto")
    return parser


def settings_from_args(args: argparse.Namespace) -> TurnSettings:
    """TurnSettings from parsed arguments (raises ValueError on bad values)."""
    return TurnSettings(
        listen_host=args.listen[0],
        listen_port=args.listen[1],
        secret=args.secret,
        realm=args.realm,
        allow_peers=tuple(args.allow_peer),
        relay_port_min=args.relay_ports[0],
        relay_port_max=args.relay_ports[1],
        relay_host=args.relay_ip,
        external_address=args.external_ip,
        max_allocations=args.max_allocations,
        max_allocations_per_user=args.max_allocations_per_user,
        max_allocations_per_address=args.max_allocations_per_address,
        max_bps_per_allocation=args.max_bps,
        tcp=not args.no_tcp,
        max_tcp_connections_per_address=args.max_tcp_connections_per_address,
        tcp_first_request_timeout_s=args.tcp_first_request_timeout,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_port=args.tls_port,
    )


async def serve(settings: TurnSettings) -> None:
    """Run a TurnServer until SIGINT or SIGTERM."""
    server = TurnServer(settings)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    host, port = server.udp_address
    listeners = [f"udp {host}:{port}"]
    if server.tcp_address:
        listeners.append("tcp {}:{}".format(*server.tcp_address))
    if server.tls_address:
        listeners.append("tls {}:{}".format(*server.tls_address))
    print(
        f"turn: listening {', '.join(listeners)}; relays on {server.relay_host} "
        f"ports {settings.relay_port_min}-{settings.relay_port_max}",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        print(f"turn: stopping; stats {server.stats}", flush=True)
        await server.close()


def main(argv: list[str]) -> int:
    """Entry point of ``rallypoint turn`` (``argv`` are the arguments after ``turn``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.secret:
        parser.error("--secret (or $RALLYPOINT_TURN_SECRET) is required")
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    use_uvloop = args.uvloop != "off"
    runner: contextlib.AbstractContextManager[asyncio.Runner]
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            if args.uvloop == "on":
                parser.error("uvloop is not installed")
            use_uvloop = False
    try:
        if use_uvloop:
            runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        else:
            runner = asyncio.Runner()
        with runner as r:
            r.run(serve(settings))
    except OSError as exc:
        print(f"turn: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0
