"""Cluster benchmark (issue 14): the chat load of ``bench/signaling.py`` on one node with SQLite,
one node on PostgreSQL + Redis, and two nodes on PostgreSQL + Redis, in one run; then a failover.

Scenarios, all three servers up side by side, each with a load generator of its own
(``bench/wsload.py``, pinned to the second core; the idle ones stay quiet):

(a) ``sqlite``: one node, the SQLite store (its writer process pinned to the second core, as
    ``bench/signaling.py`` does);
(b) ``postgres``: one node in cluster mode (PostgreSQL store, Redis bus and shared state);
(c) ``two_nodes``: two nodes on one PostgreSQL schema and one Redis key prefix; the first member
    of each room (its only sender) is on node A, the room's 9 other members on node B, so every
    delivery crosses Redis.

The nodes are pinned to the first core (both nodes of (c) too: the cluster gets the server core
the single node gets); PostgreSQL (a private one, initdb'd for the run with its default
settings, on a free port, a schema per scenario; ``--pg-url`` for another) and Redis (a private
``redis-server`` on a free port, a key prefix per scenario) are not pinned. 1,000 clients per
scenario in rooms of 10 send ~150-byte chat messages (``send``, acknowledged after the commit).

Phases, each bounded:

1. latency: each scenario at ``--latency-rate`` (1,000 msgs/s): ack p99, delivery p99 (from the
   send time at the start of each text to the room's last member; in (c) on the other node:
   ``cross_node_p99_ms``);
2. CPU per delivery: each scenario at ``--cpu-rate`` (3,000 msgs/s), ``--cpu-rounds`` rounds, the
   order alternating; server-side CPU over deliveries, median of the rounds. Counted: (a) the node
   and its store writer; (b) the node, every process of the private PostgreSQL and the
   redis-server; (c) both nodes, every process of the PostgreSQL and the redis-server (both
   shared by (b) and (c): each counts them while the other is idle);
3. throughput: the sustainable acked msgs/s of each scenario (ack and delivery p99 <= 50 ms,
   acks and deliveries keeping up), the searches of ``bench/signaling.py`` taking turns, a step
   each;
4. failover: (a)-(c) stopped; two new nodes (``--heartbeat`` 1 s, the default), ``--failover-
   clients`` (1,000) on node A in rooms of 10 plus one observer per room on node B, all in one
   load generator process; A's clients send acked messages at ``--failover-rate``; the load
   generator SIGKILLs A, and each of A's clients opens a connection to B with its resume token
   as soon as its connection drops. ``failover_s`` = SIGKILL to the last client resumed;
   ``lost_acked`` = acknowledged messages not in the store afterwards (read from PostgreSQL,
   counted: each must be there exactly once); the observers count participant_left/joined.

    .venv/bin/python bench/cluster.py            # full run, ~10 minutes
    .venv/bin/python bench/cluster.py --quick    # smoke run, ~2 minutes

Prints progress on stderr, then a table, then one JSON line (the last line of stdout).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import importlib.util
import json
import math
import os
import pwd
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

_BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(_BENCH))

import asyncpg  # noqa: E402
from procs import free_port  # noqa: E402
from wsload import LoadGen  # noqa: E402

# bench/signaling.py under another name (``signaling`` is the server's package)
_spec = importlib.util.spec_from_file_location("chatbench", _BENCH / "signaling.py")
assert _spec is not None and _spec.loader is not None
chatbench = importlib.util.module_from_spec(_spec)
sys.modules["chatbench"] = chatbench
_spec.loader.exec_module(chatbench)

HOST = "127.0.0.1"
SCENARIOS = ("sqlite", "postgres", "two_nodes")
CPU_KEY = {"sqlite": "sqlite", "postgres": "single", "two_nodes": "cluster"}  # in the JSON
TARGETS = {
    "postgres_acked_msgs_per_s": 5000,
    "cross_node_p99_ms": 15.0,
    "cluster_cpu_ratio": 1.5,
    "failover_s": 10.0,
    "lost_acked": 0,
}
PG_BACKGROUND = ("walwriter", "checkpointer", "background writer")
log = chatbench.log


def sql(url: str, q: str, *args: Any) -> list[Any]:
    async def run() -> list[Any]:
        conn = await asyncpg.connect(url)
        try:
            return list(await conn.fetch(q, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


@contextlib.contextmanager
def pg_schema(url: str, tag: str) -> Iterator[str]:
    """A fresh schema (dropped after) as a store URL whose connections are named after it
    (``application_name``), so that their backends can be found."""
    name = f"bench_{tag}_{os.getpid()}_{secrets.token_hex(3)}"
    sql(url, f"CREATE SCHEMA {name}")
    try:
        yield f"{url}{'&' if '?' in url else '?'}search_path={name}&application_name={name}"
    finally:
        sql(url, f"DROP SCHEMA {name} CASCADE")


def pg_pids(url: str, store_url: str) -> list[int]:
    """The PostgreSQL backends of ``store_url``'s connections, and PostgreSQL's background
    writers (with ``--pg-url``: shared with anything else on that PostgreSQL)."""
    app = store_url.rpartition("application_name=")[2]
    rows = sql(
        url,
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1 OR backend_type = ANY($2)",
        app,
        list(PG_BACKGROUND),
    )
    return [r["pid"] for r in rows]


def scenario_pids(
    pg: PrivatePostgres | None, url: str, store_url: str, redis: PrivateRedis
) -> list[int]:
    """What a PostgreSQL scenario counts besides its nodes: the private PostgreSQL's processes
    (all of them: the other scenario is idle meanwhile), or on a shared one (``--pg-url``) the
    scenario's backends and the background writers; and the redis-server."""
    return [*(pg.pids() if pg else pg_pids(url, store_url)), redis.proc.pid]


class PrivatePostgres:
    """A PostgreSQL of this run's own on a free port (initdb in ``work``, the server's default
    settings: fsync and synchronous commit on), so that all its processes are this run's; as the
    postgres user when run as root (PostgreSQL refuses to run as root)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="rallypoint-bench-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.user: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.user = ["runuser", "-u", "postgres", "--"]
        self.url = f"postgresql://postgres@{HOST}:{self.port}/postgres"
        binary = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
        self.bin = Path(binary[0]).parent if binary else None
        if self.bin is None:
            raise RuntimeError("PostgreSQL not found (tests/apt-packages.txt)")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses={HOST} -c max_connections=200"
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"), "-w")
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])

    def _run(self, tool: str, *args: str) -> None:
        assert self.bin is not None
        cmd = [*self.user, str(self.bin / tool), *args]
        if tool == "pg_ctl":
            cmd.append("start")
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)

    def pids(self) -> list[int]:
        """The postmaster and its children (backends, writers)."""
        out = [self.pid]
        with contextlib.suppress(OSError):
            out += [
                int(c)
                for c in Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
            ]
        return out

    def stop(self) -> None:
        assert self.bin is not None
        subprocess.run(
            [
                *self.user,
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRedis:
    """A redis-server of this run's own on a free port (nothing saved)."""

    def __init__(self, work: Path) -> None:
        self.port = free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found (tests/apt-packages.txt)")
        args = ["--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no"]
        with open(work / "redis.log", "wb") as out:
            self.proc = subprocess.Popen([exe, *args], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                socket.create_connection((HOST, self.port), 0.5).close()
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Group:
    """One scenario's processes: its node(s) (``nodes[0]`` takes the senders), and the store
    and Redis processes it uses, for the CPU count (``pids``) of ``bench/signaling.py``'s steps."""

    def __init__(self, name: str, nodes: list[Any], extra: Callable[[], list[int]]) -> None:
        self.name = name
        self.nodes = nodes
        self.extra = extra

    @property
    def port(self) -> int:
        port: int = self.nodes[0].port
        return port

    def pids(self) -> list[int]:
        out: list[int] = []
        for n in self.nodes:
            out += n.pids()
        return out + self.extra()

    def metrics(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for n in self.nodes:
            for k, v in n.metrics().items():
                total[k] = total.get(k, 0.0) + v
        return total


def node(
    work: Path,
    name: str,
    core: int | None,
    a: argparse.Namespace,
    store_url: str | None = None,
    redis_url: str = "",
    prefix: str = "",
) -> Any:
    srv = chatbench.rallypoint_server(
        work / name, core, a.load_connections + 200, a.room_size, a.server_path, store_url
    )
    srv.name = name
    srv.store_processes = False  # counted by the Group: only this run's backends
    srv.env["RALLYPOINT_SFU_ENABLED"] = "false"
    if redis_url:
        srv.env.update(
            RALLYPOINT_CLUSTER_REDIS_URL=redis_url,
            RALLYPOINT_CLUSTER_KEY_PREFIX=prefix,
            RALLYPOINT_CLUSTER_HEARTBEAT_S=str(a.heartbeat),
        )
    return srv


def connect(gen: LoadGen, g: Group, a: argparse.Namespace, prefix: str, **kw: Any) -> int:
    n = kw.pop("n", a.load_connections)
    r = gen.call(
        "connect",
        a.connect_timeout + 30,
        host=HOST,
        port=g.port,
        n=n,
        room_size=kw.pop("room_size", a.room_size),
        mode="rp",
        prefix=prefix,
        timeout_s=a.connect_timeout,
        message_bytes=a.message_bytes,
        **kw,
    )
    log(
        f"{g.name}: {r['connected']}/{n} connected in {r['seconds']:.1f} s"
        + (f"; errors: {r['errors']}" if r["failed"] else "")
    )
    if r["connected"] < n * 0.99:
        raise RuntimeError(f"too few connections to {g.name}")
    connected: int = r["connected"]
    return connected


def us_per_delivery(r: dict[str, Any]) -> float:
    return float(r["server_cpu"] / max(r["deliveries_per_s"], 1.0) * 1e6)


def failover_phase(
    work: Path, a: argparse.Namespace, cores: Any, pg_url: str, redis: PrivateRedis
) -> dict[str, Any]:
    n, rs = a.failover_clients, a.room_size
    with pg_schema(pg_url, "f") as url:
        prefix = "bench-f-" + secrets.token_hex(4)
        nodes = [node(work, f"f{i}", cores[0], a, url, redis.url, prefix) for i in (0, 1)]
        gen = LoadGen(cores[1])
        try:
            for srv in nodes:
                srv.start()
            a_node = Group("failover node A", nodes[:1], list)
            b_node = Group("failover node B", nodes[1:], list)
            connect(gen, a_node, a, "f", n=n, room_prefix="f")
            rooms = math.ceil(n / rs)
            connect(
                gen, b_node, a, "o", n=rooms, room_size=1, room_prefix="f", sends=False, append=True
            )
            log(
                f"failover: {n} clients on node A ({rooms} rooms, an observer each on B), "
                f"{a.failover_rate:.0f} msgs/s; SIGKILL A after {a.failover_before:.0f} s"
            )
            r = gen.call(
                "failover",
                a.failover_before + a.failover_after + a.failover_timeout + 60,
                rate=a.failover_rate,
                before_s=a.failover_before,
                after_s=a.failover_after,
                kill_pid=nodes[0].pid,
                to_port=nodes[1].port,
                timeout_s=a.failover_timeout,
            )
            nodes[0].proc.wait(10)
            acked: list[int] = r.pop("acked_ids")
            rows = sql(
                pg_url,
                f"SELECT split_part(text, ' ', 1) AS t, count(*) AS n "
                f"FROM {url.split('search_path=')[1].split('&')[0]}.messages GROUP BY 1",
            )
            stored = {row["t"]: row["n"] for row in rows}
            r["acked_total"] = len(acked)
            r["lost_acked"] = sum(1 for t in acked if str(t) not in stored)
            r["duplicated_acked"] = sum(1 for t in acked if stored.get(str(t), 0) > 1)
            r["stored_total"] = sum(stored.values())
            r["acked_ids_unique"] = len(set(acked)) == len(acked)
            log(
                f"failover: {r['resumed']}/{r['clients']} resumed on B, the last "
                f"{r['failover_s']:.2f} s after the SIGKILL (median {r['resume_p50_s']:.2f} s); "
                f"{r['acked_total']} acked, {r['lost_acked']} missing from the store, "
                f"{r['duplicated_acked']} stored twice; {r['unacked_at_kill']} unacked at the "
                f"kill; the observers saw {r['room_events']} participant_left/joined"
            )
            return r
        finally:
            gen.stop()
            for srv in nodes:
                srv.stop()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="short smoke run (~2 minutes)")
    p.add_argument(
        "--pg-url",
        help="a PostgreSQL to use (a schema per scenario) instead of a private one started "
        "for the run, e.g. postgresql://postgres@127.0.0.1:5432/test",
    )
    chatbench.add_load_options(p)
    p.set_defaults(noise_threshold=0.3)
    p.add_argument("--cpu-rate", type=float, default=3000.0)
    p.add_argument("--cpu-rounds", type=int, help="rounds of the CPU steps (3)")
    p.add_argument("--heartbeat", type=float, default=1.0, help="cluster.heartbeat_s")
    p.add_argument("--failover-clients", type=int, default=1000)
    p.add_argument("--failover-rate", type=float, default=1000.0)
    p.add_argument("--failover-before", type=float, default=4.0)
    p.add_argument("--failover-after", type=float, default=3.0)
    p.add_argument("--failover-timeout", type=float, default=30.0)
    p.add_argument("--skip-search", action="store_true", help="no throughput search")
    p.add_argument("--only-failover", action="store_true", help="the failover phase alone")
    p.add_argument(
        "--server-path",
        help="run the nodes of another checkout of the server (e.g. the previous commit's), "
        "to compare its line with this one's",
    )
    a = p.parse_args(argv)
    q = a.quick
    defaults = {
        "load_connections": 500 if q else 1000,
        "duration": 2.0 if q else 6.0,
        "warmup": 0.5 if q else 1.5,
        "latency_seconds": 3.0 if q else 10.0,
        "start_rate": 2500.0,
        "cpu_rounds": 1 if q else 3,
        "max_steps": 3 if q else 10,
        "search_budget": 15.0 if q else 240.0,
        "connect_timeout": 60.0,
        "noise_budget": 10.0 if q else 120.0,
    }
    chatbench.fill_defaults(a, defaults)
    if q:
        a.failover_before = min(a.failover_before, 2.0)
        a.failover_after = min(a.failover_after, 1.0)
    return a


def load_phases(
    work: Path,
    a: argparse.Namespace,
    cores: Any,
    redis: PrivateRedis,
    pg: PrivatePostgres | None,
    res: dict[str, Any],
) -> None:
    """Phases 1-3: the three scenarios side by side (their servers stopped at the end)."""
    stack = contextlib.ExitStack()
    gens: dict[str, LoadGen] = {}
    try:
        url_b = stack.enter_context(pg_schema(a.pg_url, "b"))
        url_c = stack.enter_context(pg_schema(a.pg_url, "c"))
        prefix = "bench-" + secrets.token_hex(4)
        sq = node(work, "sqlite", cores[0], a)
        pb = node(work, "postgres", cores[0], a, url_b, redis.url, prefix + "-b")
        ca = node(work, "node_a", cores[0], a, url_c, redis.url, prefix + "-c")
        cb = node(work, "node_b", cores[0], a, url_c, redis.url, prefix + "-c")
        for srv in (sq, pb, ca, cb):
            stack.callback(srv.stop)
            srv.start()
        sq.place_store_writer(cores[1])
        groups = {
            "sqlite": Group("sqlite", [sq], list),
            "postgres": Group("postgres", [pb], lambda: scenario_pids(pg, a.pg_url, url_b, redis)),
            "two_nodes": Group(
                "two_nodes", [ca, cb], lambda: scenario_pids(pg, a.pg_url, url_c, redis)
            ),
        }
        for name in SCENARIOS:
            gens[name] = LoadGen(cores[1])
        noise = chatbench.Noise(
            a.noise_threshold,
            a.noise_budget,
            [os.getpid(), *(g.proc.pid or 0 for g in gens.values())],
        )
        connect(gens["sqlite"], groups["sqlite"], a, "s")
        connect(gens["postgres"], groups["postgres"], a, "p")
        connect(gens["two_nodes"], groups["two_nodes"], a, "c", other_port=cb.port)

        log(f"phase 1: latency at {a.latency_rate:.0f} msgs/s")
        res["latency"] = {
            name: chatbench.latency_phase(gens[name], groups[name], a, cores, noise)
            for name in SCENARIOS
        }

        log(f"phase 2: CPU per delivery at {a.cpu_rate:.0f} msgs/s, {a.cpu_rounds} rounds")
        cpu: dict[str, list[float]] = {name: [] for name in SCENARIOS}
        res["cpu_steps"] = []
        for rnd in range(a.cpu_rounds):
            order = SCENARIOS if rnd % 2 == 0 else SCENARIOS[::-1]
            for name in order:
                r = chatbench.run_step(
                    gens[name], groups[name], a.cpu_rate, a.duration, a, cores, noise
                )
                cpu[name].append(us_per_delivery(r))
                res["cpu_steps"].append({"scenario": name, **r})
                log(f"{name}: {chatbench.describe(r, True)} -> {cpu[name][-1]:.1f} us/delivery")
        res["cpu_us_per_delivery"] = {k: statistics.median(v) for k, v in cpu.items()}

        if not a.skip_search:
            log("phase 3: sustainable acked msgs/s, the three searches taking turns")
            searches = {
                name: chatbench.Search(gens[name], groups[name], True, a, cores, noise)
                for name in SCENARIOS
            }
            chatbench.interleaved(list(searches.values()))
            res["throughput"] = {name: s.result() for name, s in searches.items()}
        for name in SCENARIOS:
            m = groups[name].metrics()
            res.setdefault("server_metrics", {})[name] = {
                k: m.get(f"rallypoint_{k}_total", 0)
                for k in ("internal_errors", "slow_consumers", "rate_limited", "bus_dropped")
            }
            gens[name].stop()
        for srv in (sq, pb, ca, cb):
            srv.stop()
        res["other_cpu_max"] = noise.max_seen
    finally:
        for gen in gens.values():
            gen.stop()
        stack.close()


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, chatbench._terminate)
    t_start = time.monotonic()
    chatbench.raise_nofile(4 * a.load_connections + a.failover_clients + 2000)
    cpus = sorted(os.sched_getaffinity(0))
    cores: tuple[int | None, int | None] = (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)
    if cores[1] is not None:
        os.sched_setaffinity(0, {cores[1]})
    work = Path(tempfile.mkdtemp(prefix="rallypoint-cluster-bench-"))
    stack = contextlib.ExitStack()
    res: dict[str, Any] = {"machine": chatbench.machine()}
    try:
        redis = PrivateRedis(work)
        stack.callback(redis.stop)
        pg: PrivatePostgres | None = None
        if not a.pg_url:
            pg = PrivatePostgres()
            stack.callback(pg.stop)
            a.pg_url = pg.url
        if not a.only_failover:
            load_phases(work, a, cores, redis, pg, res)
        log("phase 4: failover")
        res["failover"] = failover_phase(work, a, cores, a.pg_url, redis)
    finally:
        stack.close()
        if a.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    res["seconds"] = time.monotonic() - t_start
    summary = report(res)
    print_table(res, summary)
    print(json.dumps(summary, allow_nan=True))
    return 0


def report(res: dict[str, Any]) -> dict[str, Any]:
    nan = {"ack_p99_ms": math.nan, "delivery_p99_ms": math.nan}
    lat = res.get("latency", dict.fromkeys(SCENARIOS, nan))
    tp, fo = res.get("throughput", {}), res["failover"]
    cpu = res.get("cpu_us_per_delivery", dict.fromkeys(SCENARIOS, math.nan))

    def best(name: str) -> dict[str, Any] | None:
        b: dict[str, Any] | None = tp.get(name, {}).get("best")
        return b

    acked = {name: (b["acked_per_s"] if (b := best(name)) else math.nan) for name in SCENARIOS}
    ratio = cpu["two_nodes"] / cpu["postgres"]
    s: dict[str, Any] = {
        "acked_msgs_per_s": {k: round(v) if not math.isnan(v) else v for k, v in acked.items()},
        "cross_node_p99_ms": round(lat["two_nodes"]["delivery_p99_ms"], 2),
        "cpu_us_per_delivery": {
            "single": round(cpu["postgres"], 2),
            "cluster": round(cpu["two_nodes"], 2),
            "sqlite": round(cpu["sqlite"], 2),
        },
        "failover_s": round(fo["failover_s"], 2),
        "lost_acked": fo["lost_acked"],
        "duplicated_acked": fo["duplicated_acked"],
        "resumed": f"{fo['resumed']}/{fo['clients']}",
        "failover_room_events": fo["room_events"],
        "cluster_cpu_ratio": round(ratio, 3),
        "ack_p99_ms_at_latency_rate": {k: round(v["ack_p99_ms"], 2) for k, v in lat.items()},
        "ack_p99_ms_at_sustainable": {
            k: (round(b["ack_p99_ms"], 1) if (b := best(k)) else None) for k in SCENARIOS
        },
        "other_cpu_max": round(res.get("other_cpu_max", math.nan), 2),
        "server_metrics": res.get("server_metrics", {}),
        "seconds": round(res["seconds"]),
        "machine": res["machine"],
    }
    s["targets_met"] = {
        "postgres_acked_msgs_per_s": acked["postgres"] >= TARGETS["postgres_acked_msgs_per_s"],
        "cross_node_p99_ms": s["cross_node_p99_ms"] < TARGETS["cross_node_p99_ms"],
        "cluster_cpu_ratio": ratio <= TARGETS["cluster_cpu_ratio"],
        "failover_s": fo["failover_s"] <= TARGETS["failover_s"] and fo["resumed"] == fo["clients"],
        "lost_acked": fo["lost_acked"] == 0 and fo["duplicated_acked"] == 0,
    }
    return s


def print_table(res: dict[str, Any], s: dict[str, Any]) -> None:
    f = chatbench.fmt
    lat = res.get("latency")
    if lat is None:
        lat = {k: {"ack_p99_ms": math.nan, "delivery_p99_ms": math.nan} for k in SCENARIOS}
    print(f"\n{'scenario':<12} {'acked/s':>9} {'ack p99 @1k':>12} {'deliv p99 @1k':>14} ", end="")
    print(f"{'us/delivery':>12}")
    for name in SCENARIOS:
        print(
            f"{name:<12} {f(s['acked_msgs_per_s'][name]):>9} "
            f"{f(lat[name]['ack_p99_ms'], '.2f'):>12} {f(lat[name]['delivery_p99_ms'], '.2f'):>14} "
            f"{f(s['cpu_us_per_delivery'][CPU_KEY[name]], '.1f'):>12}"
        )
    fo = res["failover"]
    print(
        f"\nfailover: {fo['resumed']}/{fo['clients']} resumed in {fo['failover_s']:.2f} s, "
        f"{fo['lost_acked']} of {fo['acked_total']} acked lost, {fo['duplicated_acked']} twice"
    )
    print("\ntarget                        value        target   met")
    t = s["targets_met"]
    rows = [
        (
            "postgres acked msgs/s",
            s["acked_msgs_per_s"]["postgres"],
            ">= 5000",
            "postgres_acked_msgs_per_s",
        ),
        ("cross-node p99 ms @1k", s["cross_node_p99_ms"], "< 15", "cross_node_p99_ms"),
        ("cluster/single CPU/deliv", s["cluster_cpu_ratio"], "<= 1.5", "cluster_cpu_ratio"),
        ("failover s", s["failover_s"], "<= 10", "failover_s"),
        ("lost acked", s["lost_acked"], "0", "lost_acked"),
    ]
    for label, v, target, key in rows:
        print(f"{label:<29} {v!s:<12} {target:<8} {'yes' if t[key] else 'NO'}")
    print()


if __name__ == "__main__":
    sys.exit(main())
