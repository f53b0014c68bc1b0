"""A/B of the signaling server: this checkout against another (``--server-path``), in turns.

Runs ``bench/signaling.py`` on each side in alternating order (A B, B A, ...), each run the same
fixed offered rates (no search, no memory phase, no raw server), and compares, step by step,
the server's CPU per delivery (server process and its store writer) and the ack p99. This
machine's speed drifts within minutes, so only ratios taken within a round are compared; the
final JSON line has every value, the per-round ratios and their medians.

    .venv/bin/python bench/signaling_ab.py --server-path DIR [--rounds 3] [--rates 6000,8000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def run(server_path: str | None, rates: str, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, str(ROOT / "bench" / "signaling.py"), "--skip-memory", "--skip-raw"]
    cmd += ["--rates", rates, *extra]
    if server_path:
        cmd += ["--server-path", server_path]
    for attempt in (1, 2):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
        if out.returncode == 0:
            break
        print(f"run failed (attempt {attempt}):\n{out.stderr[-1500:]}", file=sys.stderr, flush=True)
    else:
        raise SystemExit(f"{cmd} failed twice")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def per_delivery_us(step: dict[str, Any]) -> float:
    return step["server_cpu"] / max(step["deliveries_per_s"], 1) * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server-path", required=True, help="the other checkout (B)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rates", default="6000,8000", help="offered msgs/s, each run in order")
    p.add_argument("--duration", default="8", help="measured seconds per step")
    a = p.parse_args()
    extra = [
        "--duration",
        a.duration,
        "--noise-budget",
        "120",
        "--skip-encodings",
        "--skip-encodings-load",
    ]
    sides: dict[str, list[dict[str, Any]]] = {"this": [], "base": []}
    for rnd in range(a.rounds):
        order = ["this", "base"] if rnd % 2 == 0 else ["base", "this"]
        for side in order:
            res = run(a.server_path if side == "base" else None, a.rates, extra)
            sides[side].append(res)
            steps = ", ".join(
                f"{s['offered_per_s']}/s: {per_delivery_us(s):.2f} us/delivery, "
                f"ack p99 {s['ack_p99_ms']} ms{'' if s['ok'] else ' FAIL'}"
                for s in res["steps"]
            )
            print(
                f"round {rnd + 1} {side:>4}: ack p50/p99 at 1,000/s "
                f"{res['ack_p50_ms']}/{res['ack_p99_ms']} ms; {steps}",
                flush=True,
            )
    out: dict[str, Any] = {"rates": a.rates, "rounds": a.rounds, "steps": {}}
    n_steps = len(sides["this"][0]["steps"])
    for i in range(n_steps):
        mine = [per_delivery_us(r["steps"][i]) for r in sides["this"]]
        base = [per_delivery_us(r["steps"][i]) for r in sides["base"]]
        ratios = [m / b for m, b in zip(mine, base, strict=True)]
        p99 = [r["steps"][i]["ack_p99_ms"] for r in sides["this"]]
        p99_base = [r["steps"][i]["ack_p99_ms"] for r in sides["base"]]
        out["steps"][f"{i + 1}@{sides['this'][0]['steps'][i]['offered_per_s']}"] = {
            "us_per_delivery": [round(x, 2) for x in mine],
            "us_per_delivery_base": [round(x, 2) for x in base],
            "ratios": [round(x, 3) for x in ratios],
            "ratio_median": round(statistics.median(ratios), 3),
            "ack_p99_ms": p99,
            "ack_p99_ms_base": p99_base,
        }
    lat = [r["ack_p99_ms"] for r in sides["this"]]
    lat_base = [r["ack_p99_ms"] for r in sides["base"]]
    out["ack_p99_ms_at_1000"] = {"this": lat, "base": lat_base}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
