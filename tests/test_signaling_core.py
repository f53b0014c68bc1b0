"""Pure cores: rooms, presence, rate limiting, tokens and configuration."""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import pytest

from signaling.config import ConfigError, load_config, sample_keys
from signaling.core.presence import PresenceBook
from signaling.core.ratelimit import TokenBucket
from signaling.core.rooms import Participant, Room, RoomRegistry
from signaling.core.tokens import create_token, verify_token
from signaling.wire.errors import ProtocolError

ROOT = Path(__file__).resolve().parent.parent
SECRET = "a-test-secret-of-at-least-32-bytes"


def _p(pid: str, moderator: bool = False) -> Participant:
    return Participant(pid, f"id-{pid}", pid.upper(), 0, moderator)


def test_room_limit_and_lock() -> None:
    room = Room("r", max_participants=2)
    room.join(_p("a"), 0)
    room.join(_p("b"), 0)
    with pytest.raises(ProtocolError) as e:
        room.join(_p("c"), 0)
    assert e.value.code == "room_full"
    room.leave("b", 1)
    room.locked = True
    with pytest.raises(ProtocolError) as e:
        room.join(_p("c"), 0)
    assert e.value.code == "room_locked"
    room.join(_p("m", moderator=True), 0)  # moderators may enter a locked room
    assert set(room.participants) == {"a", "m"}
    assert [p.id for p in room.others("a")] == ["m"]


def test_empty_room_closes_after_grace() -> None:
    reg = RoomRegistry(10, empty_grace_s=5)
    room = reg.get_or_create("r")
    room.join(_p("a"), 0)
    room.leave("a", 100.0)
    assert reg.expire(104.0) == []
    room.join(_p("b"), 104.5)  # back before the grace ended: stays open
    room.leave("b", 105.0)
    assert reg.expire(109.0) == []
    assert reg.expire(110.0) == ["r"]
    assert reg.get("r") is None


def test_room_errors_for_missing_participants() -> None:
    room = Room("r", 5)
    with pytest.raises(ProtocolError) as e:
        room.require("x")
    assert e.value.code == "not_in_room"
    with pytest.raises(ProtocolError) as e:
        room.target("x")
    assert e.value.code == "no_such_participant"


def test_presence_across_devices() -> None:
    book = PresenceBook()
    assert book.status("alice") == "offline"
    assert book.set("alice", "phone", "online") == "online"
    assert book.set("alice", "laptop", "away") is None  # online still wins
    assert book.set("alice", "phone", "away") == "away"
    assert book.set("alice", "laptop", "busy") == "busy"
    assert book.remove("alice", "laptop") == "away"
    assert book.remove("alice", "phone") == "offline"
    assert book.remove("alice", "phone") is None


def test_token_bucket() -> None:
    b = TokenBucket(rate=10, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = b.take(0.0)
    assert wait == pytest.approx(0.1)
    assert b.take(0.1) == 0.0
    assert b.take(100.0) == 0.0  # refills to burst, not beyond
    assert b.take(100.0) == 0.0
    assert b.take(100.0) == 0.0
    assert b.take(100.0) > 0


def test_tokens_round_trip_and_grants() -> None:
    tok = create_token("key", SECRET, "alice", rooms={"lobby": ["join", "chat"]}, name="Alice")
    claims = verify_token(tok, "key", SECRET)
    assert claims.identity == "alice" and claims.name == "Alice"
    assert claims.can("lobby", "chat") and not claims.can("lobby", "moderate")
    assert claims.grants_for("elsewhere") is None
    star = verify_token(create_token("key", SECRET, "bob", rooms={"*": ["join"]}), "key", SECRET)
    assert star.can("anything", "join")
    # Users manage their own contacts only where a token says so.
    assert claims.contacts is False and star.contacts is False
    own = verify_token(create_token("key", SECRET, "c", rooms={}, contacts=True), "key", SECRET)
    assert own.contacts is True


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (
            lambda: create_token("key", SECRET, "a", rooms={"r": ["join"]}, ttl_s=-60),
            "token_expired",
        ),
        (
            lambda: create_token(
                "key", "another-secret-of-at-least-32-bytes!!", "a", rooms={"r": ["join"]}
            ),
            "token_invalid",
        ),
        (lambda: create_token("other-key", SECRET, "a", rooms={"r": ["join"]}), "token_invalid"),
        (lambda: "not.a.token", "token_invalid"),
        (
            lambda: jwt.encode(
                {"iss": "key", "sub": "a", "exp": int(time.time()) + 60, "rooms": {"r": ["fly"]}},
                SECRET,
                algorithm="HS256",
            ),
            "token_invalid",
        ),
        (
            lambda: jwt.encode(
                {"iss": "key", "sub": "a b", "exp": int(time.time()) + 60},
                SECRET,
                algorithm="HS256",
            ),
            "token_invalid",
        ),
        (
            lambda: jwt.encode(
                {"iss": "key", "sub": "a", "exp": int(time.time()) + 60},
                SECRET * 2,
                algorithm="HS512",
            ),
            "token_invalid",
        ),
        (
            lambda: jwt.encode({"iss": "key", "sub": "a"}, SECRET, algorithm="HS256"),
            "token_invalid",
        ),
        (
            lambda: jwt.encode(
                {"iss": "key", "sub": "a", "exp": int(time.time()) + 60, "contacts": "yes"},
                SECRET,
                algorithm="HS256",
            ),
            "token_invalid",
        ),
    ],
)
def test_bad_tokens(make: object, code: str) -> None:
    with pytest.raises(ProtocolError) as e:
        verify_token(make(), "key", SECRET)  # type: ignore[operator]
    assert e.value.code == code


def test_create_token_refuses_unknown_grants() -> None:
    with pytest.raises(ValueError, match="unknown grant"):
        create_token("k", "s", "a", rooms={"r": ["teleport"]})


def test_config_layers(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[server]\nport = 9000\nhost = "0.0.0.0"\n[limits]\nrate_per_s = 5\n')
    cfg = load_config(
        f,
        env={"RALLYPOINT_SERVER_PORT": "9100", "RALLYPOINT_ICE_RELAY_ONLY": "true"},
        overrides={"server.host": "127.0.0.2", "server.data_dir": None},
    )
    assert cfg.server.port == 9100  # env beats file
    assert cfg.server.host == "127.0.0.2"  # flags beat env
    assert cfg.limits.rate_per_s == 5.0
    assert cfg.ice.relay_only is True
    assert cfg.server.data_dir == "./data"  # None flags change nothing
    assert cfg.open_mode


@pytest.mark.parametrize(
    ("toml", "env", "needle"),
    [
        ("[server]\nprot = 1\n", {}, "server.prot"),
        ("[sever]\nport = 1\n", {}, "[sever]"),
        ("port = 1\n", {}, "port"),
        ("[server]\nport = 'x'\n", {}, "server.port"),
        ("", {"RALLYPOINT_SERVER_PROT": "1"}, "RALLYPOINT_SERVER_PROT"),
        ("[auth]\napi_key = 'k'\n", {}, "api_secret"),
        ("[auth]\napi_key = 'k'\napi_secret = 'short'\n", {}, "32 bytes"),
        ("[server\n", {}, "not valid TOML"),
        ("[privacy]\npresence = 'friends'\n", {}, "privacy.presence"),
        ("[privacy]\nmax_pending_requests = 0\n", {}, "privacy.max_pending_requests"),
        ("[store]\nurl = 'mysql://db/chat'\n", {}, "store.url"),
        ("[cluster]\nredis_url = 'http://r:6379'\n", {}, "cluster.redis_url"),
        ("", {"RALLYPOINT_CLUSTER_NODE_ID": "a b"}, "cluster.node_id"),
        ("[cluster]\nkey_prefix = ''\n", {}, "cluster.key_prefix"),
    ],
)
def test_config_errors_name_the_key(
    tmp_path: Path, toml: str, env: dict[str, str], needle: str
) -> None:
    f = tmp_path / "c.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_config(f, env=env)
    assert needle in str(e.value)


def test_sample_config_documents_every_setting() -> None:
    """config.sample.toml loads, and names every setting the server knows."""
    import tomllib

    sample = ROOT / "config.sample.toml"
    data = tomllib.loads(sample.read_text())
    found = {f"{s}.{k}" for s, v in data.items() for k in v}
    assert found == sample_keys()
    cfg = load_config(sample, env={})
    assert cfg.open_mode and cfg.server.port == 8080


def _signed(**claims: object) -> str:
    base: dict[str, object] = {"iss": "key", "sub": "a", "exp": int(time.time()) + 60}
    base.update(claims)
    return jwt.encode({k: v for k, v in base.items() if v is not None}, SECRET, algorithm="HS256")


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": 10**401},  # a correctly signed, absurd expiry: crashed hello with a traceback
        {"exp": str(int(time.time()) + 60)},  # a numeric string
        {"exp": float(int(time.time()) + 60)},
        {"exp": True},
        {"exp": -5},
        {"iat": "0"},
        {"iat": int(time.time()) + 3600},  # issued in the future
        {"nbf": int(time.time()) + 3600},  # not valid yet
        {"nbf": 10**30},
    ],
    ids=[
        "huge-exp",
        "string-exp",
        "float-exp",
        "bool-exp",
        "negative-exp",
        "string-iat",
        "future-iat",
        "future-nbf",
        "huge-nbf",
    ],
)
def test_time_claims_must_be_plausible_integers(claims: dict[str, object]) -> None:
    with pytest.raises(ProtocolError) as e:
        verify_token(_signed(**claims), "key", SECRET)
    assert e.value.code in ("token_invalid", "token_expired")
    assert e.value.code == "token_expired" or "`" in e.value.message


def test_a_maximum_token_lifetime() -> None:
    far = _signed(exp=int(time.time()) + 40 * 86400)
    assert verify_token(far, "key", SECRET).identity == "a"  # no maximum: accepted
    with pytest.raises(ProtocolError) as e:
        verify_token(far, "key", SECRET, max_lifetime_s=30 * 86400)
    assert e.value.code == "token_invalid" and "longer" in e.value.message
    near = _signed(exp=int(time.time()) + 3600)
    assert verify_token(near, "key", SECRET, max_lifetime_s=30 * 86400).identity == "a"


def test_store_url_selects_the_back_end(tmp_path: Path) -> None:
    from signaling.app import make_store
    from signaling.chat.postgres import PostgresStore
    from signaling.chat.sqlite import SqliteStore

    def store(url: str) -> object:
        return make_store(load_config(None, env={}, overrides={"store.url": url}))

    default = store("")
    assert isinstance(default, SqliteStore) and default.path == Path("data/chat.sqlite3")
    own = store(str(tmp_path / "x.db"))
    assert isinstance(own, SqliteStore) and own.path == tmp_path / "x.db"
    pg = store("postgresql://rp@db.example.com/chat")
    assert isinstance(pg, PostgresStore) and pg.url == "postgresql://rp@db.example.com/chat"
