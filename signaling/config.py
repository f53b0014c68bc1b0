"""Typed configuration: defaults, then a TOML file, then ``RALLYPOINT_*`` variables, then flags.

Every setting lives in a section dataclass below; ``config.sample.toml`` documents each one, and a
test keeps the two in step. Unknown sections or keys are an error that names them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: A node id or key prefix: safe in a Redis channel name and a log line.
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


class ConfigError(Exception):
    """A configuration problem, with a message that names the offending key."""


@dataclass
class ServerSection:
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: str = "./data"
    tls_cert: str = ""
    tls_key: str = ""
    # Origins allowed to open /ws from a browser, e.g. ["https://rtc.example.com"]. Empty:
    # pages from loopback addresses, or from this server's address written as an IP. ["*"]: any.
    allowed_origins: list[str] = field(default_factory=list)
    # permessage-deflate costs ~6x memory per connection and halves fan-out; off by default.
    compression: bool = False
    log_level: str = "info"
    # A connection whose first request's headers are not complete this long after it opened
    # is closed (slow-header attacks hold sockets open for minutes otherwise).
    header_timeout_s: float = 10.0
    # Idle keep-alive HTTP connections are closed after this.
    keepalive_timeout_s: float = 15.0
    # Open connections (HTTP and WebSocket) per client address; 0 = no cap. An office or a
    # mobile carrier puts many users behind one address: keep it well above one user's needs.
    max_connections_per_address: int = 1200
    # "HOST:PORT" of a listener of its own for /metrics (no credentials: bind it to an address
    # only Prometheus reaches); "" = /metrics on the main listener, where in token mode it
    # needs the API credentials.
    metrics_listen: str = ""


@dataclass
class AuthSection:
    api_key: str = ""
    api_secret: str = ""
    token_ttl_s: int = 3600  # default lifetime of tokens made by `rallypoint token`
    # Tokens whose expiry lies further ahead are refused (token_invalid); 0 = no maximum.
    max_token_lifetime_s: int = 30 * 86400


@dataclass
class LimitsSection:
    max_frame_bytes: int = 65536
    hard_frame_bytes: int = 1048576  # frames above this close the connection (1009)
    max_text_chars: int = 8000
    rate_per_s: float = 20.0
    burst: int = 60
    # Refused frames (beyond the rate) a connection may send before it is closed with 4029;
    # the allowance refills at rate_per_s.
    flood_close_after: int = 200
    max_outbox_bytes: int = 262144
    # No history or sync reply is larger: pages are cut by size and say `more`. At most half
    # of max_outbox_bytes, so an answer never makes its reader a slow consumer.
    max_reply_bytes: int = 131072
    hello_timeout_s: float = 10.0
    max_sessions: int = 20000
    # WebSocket connections per client address; 0 = no cap (see server.max_connections_...).
    max_sessions_per_address: int = 1000


@dataclass
class RoomsSection:
    max_participants: int = 100
    empty_room_grace_s: float = 60.0
    # Open mode only: the first participant of a room becomes its moderator.
    first_joiner_moderates: bool = True


@dataclass
class SessionSection:
    heartbeat_interval_s: float = 25.0
    resume_grace_s: float = 30.0


@dataclass
class ChatSection:
    edit_window_s: int = 900
    history_page_default: int = 50
    max_group_members: int = 1000


@dataclass
class StoreSection:
    # Where chat is stored: "" (the default) is the SQLite file chat.sqlite3 in
    # server.data_dir; a path is that SQLite file; "postgresql://user@host:port/db" is
    # PostgreSQL (libpq URL syntax; "?search_path=schema" picks a schema).
    url: str = ""
    # SQLite only: "normal" survives a process crash (WAL); "full" also survives power loss.
    synchronous: str = "normal"

    @property
    def postgres(self) -> bool:
        return self.url.startswith(("postgresql://", "postgres://"))


@dataclass
class ClusterSection:
    # Several nodes as one (docs/CLUSTER.md). Cluster mode = this and a PostgreSQL store.url.
    # "redis://host:6379/0" (or rediss://, unix://): the cluster's Redis; "" = one node.
    redis_url: str = ""
    # This node's name on the bus; "" = the host name and a random suffix, new on each start
    # (two nodes must never share one: a node ignores frames that carry its own id).
    node_id: str = ""
    # Every Redis key and channel of this cluster starts with this and a colon.
    key_prefix: str = "rallypoint"
    # How often this node refreshes its heartbeat in Redis. A node silent for 3 heartbeats
    # is dead: the others take its devices offline and its participants out of their rooms.
    heartbeat_s: float = 1.0
    # A group call's media lives on one node (the SFU's public_address is what that node's ICE
    # candidates announce); the other nodes relay their participants' media requests to it
    # and wait this long for its answer (then: media_unavailable).
    media_timeout_s: float = 5.0

    @property
    def dead_after_s(self) -> float:
        """A node whose heartbeat is older than this is dead (its key expires)."""
        return 3 * self.heartbeat_s


@dataclass
class IceSection:
    # Extra STUN/TURN servers for clients, e.g.
    # {urls = ["turn:turn.example.com:3478"], secret = "..."} (coturn use-auth-secret) or
    # {urls = ["stun:stun.example.com"]}, or with fixed username/credential.
    servers: list[dict[str, Any]] = field(default_factory=list)
    # Clients should use relay candidates only (hides client addresses, tests TURN).
    relay_only: bool = False
    credential_ttl_s: int = 86400


@dataclass
class TurnSection:
    enabled: bool = True
    listen_host: str = "0.0.0.0"
    port: int = 3478
    # Host name or address clients use to reach the TURN server; "" = the server's host.
    public_host: str = ""
    realm: str = "rallypoint"
    secret: str = ""  # "" = generated once and kept in the data directory
    allow_peers: list[str] = field(default_factory=list)
    relay_port_min: int = 49152
    relay_port_max: int = 65535
    # Local address relay sockets bind to; "" = listen_host, or this machine's address.
    relay_host: str = ""
    external_address: str = ""
    tcp: bool = True
    max_tcp_connections_per_address: int = 300  # TCP and TLS connections per client IP address
    # A new TCP/TLS connection whose first STUN request is not answered by then is closed.
    tcp_first_request_timeout_s: float = 5.0
    # TURN over TLS with server.tls_cert/tls_key (when set); 0 = no TLS listener.
    tls_port: int = 5349
    max_allocations: int = 1000
    max_allocations_per_user: int = 10
    max_allocations_per_address: int = 300  # per client IP address (a NAT counts as one)
    max_bps_per_allocation: int = 0  # bytes/s per allocation, both directions; 0 = unlimited
    default_lifetime_s: int = 600  # allocation lifetime granted without a longer request
    max_lifetime_s: int = 3600  # longest lifetime a client may request


@dataclass
class CallsSection:
    ring_timeout_s: float = 45.0  # no answer within this is a missed call
    # How a 1:1 call's media flows: "p2p" (between the two devices, TURN as fallback) or "sfu"
    # (through the server, like group calls).
    one_to_one_media: str = "p2p"
    # A call started from a group rings its other members: at most this many (a larger group
    # is refused with `bad_field`: start the call in a room, or call some members).
    max_group_callees: int = 32


@dataclass
class PrivacySection:
    # Who may `watch` an identity's presence: "private" (its contacts, the members of a group
    # it is in, and the partners of direct conversations in which both have written) or
    # "open" (anyone). Nobody it blocked, either way.
    presence: str = "private"
    # Direct messages and calls to identities that are not contacts; off: contacts only.
    dm_strangers: bool = True
    call_strangers: bool = True
    # Contact requests an identity may have waiting for an answer (spam protection).
    max_pending_requests: int = 500


@dataclass
class PushSection:
    # The app backend's webhook for devices that are offline; "" = no pushes.
    webhook_url: str = ""
    secret: str = ""  # HMAC-SHA256 key for the signature header (required with a URL)
    include_text: bool = False  # put message text in `message` pushes (off: ids and counts)
    max_attempts: int = 5
    retry_base_s: float = 1.0  # backoff: base * 2^(attempt-1), with jitter, capped
    retry_max_s: float = 60.0
    timeout_s: float = 5.0  # per request
    queue_size: int = 1000  # events waiting; more are dropped (counted in /metrics)


@dataclass
class SfuSection:
    enabled: bool = True  # run the SFU (group calls through the server)
    workers: int = 0  # SFU worker processes; 0 = one per core
    video_codec: str = "vp8"  # the one video codec of every room: "vp8" or "h264"
    log_level: str = "warning"  # log level of the worker processes
    bind_address: str = ""  # where media sockets bind; "" = each interface
    public_address: str = ""  # address announced in ICE candidates (1:1 NAT, cloud VMs)
    port_min: int = 0  # UDP port range of media sockets; 0 = any
    port_max: int = 0


@dataclass
class RecordingSection:
    # Group calls may be recorded (issue 17); false: nothing new is recorded (recordings
    # already on disk stay listed, downloadable, deletable, and are pruned by age).
    enabled: bool = True
    # The recordings root, one directory per recording; "" = recordings/ in server.data_dir.
    path: str = ""
    # One recording's track files; the recorder stops it there (stop_reason "size_limit").
    max_bytes: int = 2 * 1024**3
    # Every recording in all; a new one is refused (`recording_storage_full`) unless its
    # max_bytes fits beside what is stored and what the running ones may still write. Nothing
    # is deleted to make room. 0 = no cap.
    max_total_bytes: int = 20 * 1024**3
    # Finished recordings older than this (from their end) are deleted; 0 = kept forever.
    max_age_days: int = 30
    # How often the age limit is applied (and half-deleted directories are cleared).
    prune_interval_s: float = 3600.0
    # After each recording, also make one mixed file (re-encoded) beside the track files.
    mix: bool = False


@dataclass
class Config:
    server: ServerSection = field(default_factory=ServerSection)
    auth: AuthSection = field(default_factory=AuthSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    rooms: RoomsSection = field(default_factory=RoomsSection)
    session: SessionSection = field(default_factory=SessionSection)
    chat: ChatSection = field(default_factory=ChatSection)
    store: StoreSection = field(default_factory=StoreSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    ice: IceSection = field(default_factory=IceSection)
    turn: TurnSection = field(default_factory=TurnSection)
    sfu: SfuSection = field(default_factory=SfuSection)
    calls: CallsSection = field(default_factory=CallsSection)
    push: PushSection = field(default_factory=PushSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    recording: RecordingSection = field(default_factory=RecordingSection)

    @property
    def open_mode(self) -> bool:
        """No API secret: anyone may join with a display name."""
        return not self.auth.api_secret

    def validate(self) -> None:
        """Check cross-field rules; raise ``ConfigError``."""
        if self.auth.max_token_lifetime_s < 0:
            raise ConfigError("auth.max_token_lifetime_s must be >= 0 (0 = no maximum)")
        if self.auth.max_token_lifetime_s and not (
            0 < self.auth.token_ttl_s <= self.auth.max_token_lifetime_s
        ):
            raise ConfigError("auth.token_ttl_s must be between 1 and auth.max_token_lifetime_s")
        if bool(self.auth.api_key) != bool(self.auth.api_secret):
            raise ConfigError("auth.api_key and auth.api_secret must be set together")
        if self.auth.api_secret and len(self.auth.api_secret.encode()) < 32:
            raise ConfigError("auth.api_secret must be at least 32 bytes (HS256 key length)")
        if bool(self.server.tls_cert) != bool(self.server.tls_key):
            raise ConfigError("server.tls_cert and server.tls_key must be set together")
        if self.sfu.video_codec not in ("vp8", "h264"):
            raise ConfigError("sfu.video_codec must be 'vp8' or 'h264'")
        if bool(self.sfu.port_min) != bool(self.sfu.port_max) or (
            self.sfu.port_min > self.sfu.port_max
        ):
            raise ConfigError("sfu.port_min and sfu.port_max must be set together, min <= max")
        if self.sfu.workers < 0:
            raise ConfigError("sfu.workers must be >= 0 (0 = one per core)")
        if self.store.synchronous not in ("normal", "full"):
            raise ConfigError("store.synchronous must be 'normal' or 'full'")
        if "://" in self.store.url and not self.store.postgres:
            raise ConfigError(
                "store.url must be empty (SQLite in server.data_dir), a SQLite file's path, "
                "or postgresql://..."
            )
        cl = self.cluster
        if cl.redis_url and not cl.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("cluster.redis_url must be empty, redis://, rediss:// or unix://")
        if cl.node_id and not _NAME.fullmatch(cl.node_id):
            raise ConfigError("cluster.node_id must be 1-64 of A-Z a-z 0-9 . _ - (or empty)")
        if not _NAME.fullmatch(cl.key_prefix):
            raise ConfigError("cluster.key_prefix must be 1-64 of A-Z a-z 0-9 . _ -")
        if cl.redis_url and not self.store.postgres:
            raise ConfigError(
                "cluster.redis_url needs store.url = postgresql://... (every node of a cluster "
                "shares one chat store; a SQLite file is one node's)"
            )
        if not 0.05 <= cl.heartbeat_s <= 60:
            raise ConfigError("cluster.heartbeat_s must be between 0.05 and 60")
        if not 0.1 <= cl.media_timeout_s <= 60:
            raise ConfigError("cluster.media_timeout_s must be between 0.1 and 60")
        if self.server.metrics_listen:
            host, sep, port = self.server.metrics_listen.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError("server.metrics_listen must be HOST:PORT, e.g. 127.0.0.1:9100")
        if self.server.header_timeout_s <= 0 or self.server.keepalive_timeout_s <= 0:
            raise ConfigError("server.header_timeout_s and server.keepalive_timeout_s must be > 0")
        if self.server.max_connections_per_address < 0 or self.limits.max_sessions_per_address < 0:
            raise ConfigError(
                "server.max_connections_per_address and limits.max_sessions_per_address must "
                "be >= 0 (0 = no cap)"
            )
        if not 0 < self.server.port < 65536:
            raise ConfigError("server.port must be 1-65535")
        if not 2 <= self.chat.max_group_members <= 100_000:
            raise ConfigError("chat.max_group_members must be 2-100000")
        lim = self.limits
        if not 4 * lim.max_text_chars + 8192 <= lim.max_reply_bytes <= lim.max_outbox_bytes // 2:
            raise ConfigError(
                "limits.max_reply_bytes must be at least 4 * limits.max_text_chars + 8192 (one "
                "message of the longest text fits) and at most limits.max_outbox_bytes / 2"
            )
        if self.limits.max_frame_bytes > self.limits.hard_frame_bytes:
            raise ConfigError("limits.max_frame_bytes must not exceed limits.hard_frame_bytes")
        if self.session.heartbeat_interval_s <= 0 or self.limits.rate_per_s <= 0:
            raise ConfigError("session.heartbeat_interval_s and limits.rate_per_s must be > 0")
        if self.calls.one_to_one_media not in ("p2p", "sfu"):
            raise ConfigError("calls.one_to_one_media must be 'p2p' or 'sfu'")
        if not 1 <= self.calls.max_group_callees <= 1000:
            raise ConfigError("calls.max_group_callees must be 1-1000")
        if self.calls.ring_timeout_s <= 0:
            raise ConfigError("calls.ring_timeout_s must be > 0")
        if self.push.webhook_url:
            if not self.push.webhook_url.startswith(("http://", "https://")):
                raise ConfigError("push.webhook_url must be an http:// or https:// URL")
            if len(self.push.secret.encode()) < 16:
                raise ConfigError(
                    "push.secret must be at least 16 bytes when push.webhook_url is set"
                )
        if self.privacy.presence not in ("private", "open"):
            raise ConfigError("privacy.presence must be 'private' or 'open'")
        if self.privacy.max_pending_requests < 1:
            raise ConfigError("privacy.max_pending_requests must be >= 1")
        if self.push.max_attempts < 1 or self.push.queue_size < 1:
            raise ConfigError("push.max_attempts and push.queue_size must be >= 1")
        rec = self.recording
        if rec.max_bytes < 65536:
            raise ConfigError("recording.max_bytes must be at least 65536 (64 KiB)")
        if rec.max_total_bytes and rec.max_total_bytes < rec.max_bytes:
            raise ConfigError(
                "recording.max_total_bytes must be 0 (no cap) or at least recording.max_bytes"
            )
        if not 0 <= rec.max_age_days <= 36500:
            raise ConfigError("recording.max_age_days must be 0-36500 (0 = kept forever)")
        if not 0 < rec.prune_interval_s <= 86400:
            raise ConfigError("recording.prune_interval_s must be > 0 and at most 86400")
        for s in self.ice.servers:
            if not isinstance(s.get("urls"), list | str):
                raise ConfigError("each ice.servers entry needs `urls`")
            unknown = set(s) - {"urls", "username", "credential", "secret"}
            if unknown:
                raise ConfigError(f"unknown key ice.servers[].{sorted(unknown)[0]}")


SECTIONS: dict[str, type] = {
    f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)
}


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = (
                json.loads(value)
                if value.strip().startswith("[")
                else [v.strip() for v in value.split(",") if v.strip()]
            )
        if isinstance(value, list):
            item_type = typing.get_origin(item) or item
            if all(isinstance(v, item_type) for v in value):
                return list(value)
    raise ConfigError(f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _apply(cfg: Config, section: str, key: str, value: Any, source: str) -> None:
    sect_type = SECTIONS.get(section)
    if sect_type is None:
        raise ConfigError(f"{source}: unknown section [{section}]")
    hints = typing.get_type_hints(sect_type)
    if key not in hints:
        raise ConfigError(f"{source}: unknown key {section}.{key}")
    setattr(getattr(cfg, section), key, _coerce(value, hints[key], f"{source}: {section}.{key}"))


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the configuration: defaults < TOML file < environment < ``overrides``.

    ``overrides`` keys are ``"section.key"`` (from command-line flags); None values are skipped.
    Environment variables are ``RALLYPOINT_<SECTION>_<KEY>``, e.g. ``RALLYPOINT_SERVER_PORT``.
    """
    cfg = Config()
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: unknown key {section} (settings live in sections)")
            for key, value in values.items():
                _apply(cfg, section, key, value, str(path))
    env = os.environ if env is None else env
    for name, value in env.items():
        if not name.startswith("RALLYPOINT_") or name == "RALLYPOINT_CONFIG":
            continue
        rest = name[len("RALLYPOINT_") :].lower()
        section, _, key = rest.partition("_")
        _apply(cfg, section, key, value, f"environment variable {name}")
    for dotted, value in (overrides or {}).items():
        if value is not None:
            section, _, key = dotted.partition(".")
            _apply(cfg, section, key, value, "command line")
    cfg.validate()
    return cfg


def sample_keys() -> set[str]:
    """Every ``section.key`` the configuration knows (for the sample-file test)."""
    out: set[str] = set()
    for section, t in SECTIONS.items():
        out.update(f"{section}.{k}" for k in typing.get_type_hints(t))
    return out


__all__ = ["Config", "ConfigError", "load_config", "sample_keys"]
