"""The ``rallypoint`` command: ``serve``, ``token`` and ``turn``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import ssl
import sys

from .config import Config, ConfigError, load_config
from .core.tokens import DEFAULT_GRANTS, GRANTS, create_token

log = logging.getLogger("rallypoint")


def _config(args: argparse.Namespace, overrides: dict[str, object]) -> Config:
    path = args.config or os.environ.get("RALLYPOINT_CONFIG") or None
    return load_config(path, overrides=overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _config(
        args,
        {
            "server.host": args.host,
            "server.port": args.port,
            "server.data_dir": args.data_dir,
            "server.tls_cert": args.tls_cert,
            "server.tls_key": args.tls_key,
        },
    )
    logging.basicConfig(
        level=cfg.server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if cfg.open_mode:
        log.warning(
            "OPEN MODE: no API key and secret are configured, so anyone may join any "
            "room with a display name and no token. Set auth.api_key and "
            "auth.api_secret to require tokens."
        )
    else:
        log.info("token mode: clients need a token signed with API key %r", cfg.auth.api_key)
    ssl_ctx = None
    if cfg.server.tls_cert:
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(cfg.server.tls_cert, cfg.server.tls_key)
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - non-Linux
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    from .app import ADDRESSES, make_app
    from .net.listener import serve

    raise_fd_limit(cfg)
    app = make_app(cfg)
    scheme = "https" if ssl_ctx else "http"
    log.info(
        "rallypoint listening on %s://%s:%d (data in %s)",
        scheme,
        cfg.server.host,
        cfg.server.port,
        cfg.server.data_dir,
    )
    serve(app, cfg, app[ADDRESSES], loop, ssl_ctx)
    return 0


def fd_needs(cfg: Config) -> int:
    """File descriptors the configuration may use at once: every WebSocket session, the TURN
    server's relays and TCP connections, and room for the rest (store, SFU channels, logs)."""
    need = cfg.limits.max_sessions + 256
    if cfg.turn.enabled:
        need += cfg.turn.max_allocations + 1000  # relay sockets; TCP/TLS clients (cap 1000)
    return need


def raise_fd_limit(cfg: Config) -> None:
    """Raise the soft limit on open files to what the configuration needs (the common default
    soft limit, 1,024, is far below 20,000 sessions: new connections, health checks included,
    would fail); warn if the hard limit is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = fd_needs(cfg)
    if soft >= need:
        return
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        log.info("raised the open-file limit from %d to %d", soft, target)
    if target < need:
        log.warning(
            "the open-file limit is %d but this configuration may need %d (limits.max_sessions "
            "and the TURN server's sockets): raise the hard limit (systemd: LimitNOFILE=%d; "
            "see docs/OPERATIONS.md) or lower limits.max_sessions",
            target,
            need,
            need,
        )


def cmd_token(args: argparse.Namespace) -> int:
    cfg = _config(args, {})
    key = args.api_key or cfg.auth.api_key
    secret = args.api_secret or cfg.auth.api_secret
    if not key or not secret:
        print(
            "rallypoint token: no API key and secret; set auth.api_key/auth.api_secret in the "
            "config (or RALLYPOINT_AUTH_API_KEY/RALLYPOINT_AUTH_API_SECRET, or --api-key/"
            "--api-secret)",
            file=sys.stderr,
        )
        return 2
    grants: list[str] = []
    for g in args.grant or []:
        grants.extend(x.strip() for x in g.split(",") if x.strip())
    grants = grants or list(DEFAULT_GRANTS)
    ttl = args.ttl if args.ttl is not None else cfg.auth.token_ttl_s
    longest = cfg.auth.max_token_lifetime_s
    if longest and not 0 < ttl <= longest:
        print(
            f"rallypoint token: --ttl must be between 1 and {longest} "
            "(auth.max_token_lifetime_s: the server refuses longer-lived tokens)",
            file=sys.stderr,
        )
        return 2
    try:
        token = create_token(
            key,
            secret,
            args.identity,
            rooms={r: grants for r in args.room},
            name=args.name,
            ttl_s=ttl,
            dm=not args.no_dm,
            contacts=args.contacts,
        )
    except ValueError as e:
        print(f"rallypoint token: {e}", file=sys.stderr)
        return 2
    print(token)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rallypoint", description="Rallypoint calls and chat server")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the server")
    s.add_argument("--host", help="listen address (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="listen port (default 8080)")
    s.add_argument("--config", help="TOML config file (default $RALLYPOINT_CONFIG)")
    s.add_argument("--data-dir", help="where the chat store lives (default ./data)")
    s.add_argument("--tls-cert", help="PEM certificate chain for HTTPS/WSS")
    s.add_argument("--tls-key", help="PEM private key for --tls-cert")
    s.set_defaults(func=cmd_serve)
    t = sub.add_parser("token", help="print an access token")
    t.add_argument(
        "--room",
        action="append",
        required=True,
        help="room the token is for (repeatable; '*' for every room)",
    )
    t.add_argument("--identity", required=True, help="user identity")
    t.add_argument("--name", help="display name (default: the identity)")
    t.add_argument("--ttl", type=int, help="lifetime in seconds (default auth.token_ttl_s)")
    t.add_argument(
        "--grant",
        action="append",
        help=f"grants, repeatable or comma-separated, from {', '.join(GRANTS)} "
        f"(default {','.join(DEFAULT_GRANTS)})",
    )
    t.add_argument("--no-dm", action="store_true", help="forbid direct messages")
    t.add_argument(
        "--contacts",
        action="store_true",
        help="let the identity manage its own contacts (request, accept, decline, remove)",
    )
    t.add_argument("--config", help="TOML config file with the API key and secret")
    t.add_argument("--api-key", help="API key (overrides the config)")
    t.add_argument("--api-secret", help="API secret (overrides the config)")
    t.set_defaults(func=cmd_token)
    sub.add_parser(
        "turn",
        help="run the STUN/TURN server standalone (see `rallypoint turn -h`)",
        add_help=False,
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "turn":
        from turn.cli import main as turn_main

        return turn_main(argv[1:])
    args = parser().parse_args(argv)
    try:
        rc: int = args.func(args)
    except ConfigError as e:
        print(f"rallypoint: configuration error: {e}", file=sys.stderr)
        return 2
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
