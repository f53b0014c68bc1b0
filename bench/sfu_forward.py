"""Python CPU per forwarded packet in the SFU's forwarding core (``sfu.forward``), this
checkout against another (``--server-path``), in turns.

The core is what runs per packet and per subscriber between the receive path and the send:
the header rewriting, and for a simulcast track the layer switcher (``sfu.munger``) and the
VP8 descriptor. Nothing is sent: each subscriber's ``send_rtp`` is a function that does
nothing, so the figure is the core's own cost (the send, SRTP and the system call come on
top, ``bench/sfu.py``). Two tracks, each with 24 subscribers as in the 25-person room:

- ``simulcast``: a VP8 track of three layers (1,100-byte payloads with a 15-bit picture id,
  TL0PICIDX and TID, as Chromium sends); 9 subscribers show it (layer 1), 3 of them after a
  switch from layer 0 (their picture ids are rewritten), and 15 do not (paused, as a hidden
  tile). Each incoming packet of layer 1 is forwarded 9 times; layers 0 and 2 to nobody.
- ``single``: one VP8 stream without simulcast, forwarded to all 24.

Rounds alternate this checkout and the other (A B B A ...; this machine's speed drifts within
minutes), each in a fresh process, each timing ``--packets`` incoming packets per track after
a warm-up.

    python bench/sfu_forward.py [--server-path ../other-checkout] [--rounds 6]

Prints each round, the medians in nanoseconds per forwarded packet, the ratios (this checkout
to the other) and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
# bench/sfu.py would shadow the sfu package: the checkout's (PYTHONPATH) goes first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE / "bench"]
SUBSCRIBERS = 24
SHOWN = 9
SWITCHED = 3
PAYLOAD = 1100


def _vp8(pid: int, tl0: int, key: bool) -> bytes:
    """A VP8 payload as Chromium's simulcast sends: X, I (15-bit), L, T; then the frame."""
    head = bytes((0x90, 0xE0, 0x80 | (pid >> 8), pid & 0xFF, tl0 & 0xFF, 0x20))
    frame = (b"\x10" if key else b"\x11") + b"\x9d\x01\x2a" + bytes(PAYLOAD - 10)
    return head + frame


def measure(packets: int) -> dict[str, float]:
    """Nanoseconds of the core per forwarded packet, per track (run in this process, with
    whichever ``sfu`` is first on ``sys.path``)."""
    from sfu.forward import Counters, DownTrack, UpTrack
    from sfu.rtp import ExtensionLayout

    def nothing(pt: int, seq: int, ts: int, ssrc: int, head: bytes, body: bytes) -> None:
        pass

    def layout(i: int) -> ExtensionLayout:  # abs-send-time and a MID of the subscriber's
        return ExtensionLayout(1, str(i % 12), 3, None, False)

    out: dict[str, float] = {}

    # simulcast: three layers, 9 of 24 subscribers on layer 1
    up = UpTrack("p:v", "p", "video", "camera", "vp8", lambda: None, Counters(), layers=3)
    up.request_layer_keyframe = lambda layer: None
    for i in range(SUBSCRIBERS):
        dt = DownTrack(f"s{i}", "video", 1000 + i, 96, layout(i), lambda d: None, send_rtp=nothing)
        up.make_simulcast(dt)
        up.downtracks[dt.subscriber] = dt
        assert dt.munger is not None
        if i >= SHOWN:
            dt.paused = True
        dt.munger.set_target(0 if i < SWITCHED else 1)
    ntp = 3_900_000_000 << 32
    for layer in range(3):
        up.layer_sender_report(layer, ntp, 1000 * layer)
    seqs = [100, 20_000, 40_000]
    pids = [10, 5_000, 20_000]

    def frame(n: int, key: bool) -> None:
        for layer in range(3):
            for part in range(3):  # a frame of three packets
                payload = _vp8(pids[layer], n & 0xFF, key and part == 0)
                up.forward_layer(
                    layer, seqs[layer], 1000 * layer + 3000 * n, part == 2, payload, 12345
                )
                seqs[layer] = (seqs[layer] + 1) & 0xFFFF
            pids[layer] = (pids[layer] + 1) & 0x7FFF

    frame(0, True)
    for i in range(SWITCHED):  # these go on to layer 1 at its next keyframe
        m = up.downtracks[f"s{i}"].munger
        assert m is not None
        m.set_target(1)
    frame(1, True)
    assert all(up.downtracks[f"s{i}"].munger.current == 1 for i in range(SHOWN))  # type: ignore[union-attr]
    frames = max(1, packets // 9)
    for n in range(2, 2 + frames // 4):  # warm-up
        frame(n, False)
    before = up.counters.packets_out
    t = time.perf_counter_ns()
    for n in range(2 + frames // 4, 2 + frames // 4 + frames):
        frame(n, False)
    took = time.perf_counter_ns() - t
    forwarded = up.counters.packets_out - before
    assert forwarded == frames * 3 * SHOWN, forwarded
    out["simulcast"] = took / forwarded

    # single: one stream to all 24
    up1 = UpTrack("p:w", "p", "video", "camera", "vp8", lambda: None, Counters())
    for i in range(SUBSCRIBERS):
        dt = DownTrack(f"s{i}", "video", 2000 + i, 96, layout(i), lambda d: None, send_rtp=nothing)
        up1.downtracks[dt.subscriber] = dt
    seq = 7
    key = _vp8(1, 0, True)
    delta = _vp8(2, 0, False)
    up1.forward(seq, 0, True, key, 12345, None)
    for _ in range(packets // 4):
        seq = (seq + 1) & 0xFFFF
        up1.forward(seq, 3000 * seq, seq % 3 == 0, delta, 12345, None)
    before = up1.counters.packets_out
    t = time.perf_counter_ns()
    for _ in range(packets):
        seq = (seq + 1) & 0xFFFF
        up1.forward(seq, 3000 * seq, seq % 3 == 0, delta, 12345, None)
    took = time.perf_counter_ns() - t
    forwarded = up1.counters.packets_out - before
    assert forwarded == packets * SUBSCRIBERS, forwarded
    out["single"] = took / forwarded
    return out


def run_round(path: Path, packets: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(path))
    r = subprocess.run(
        [sys.executable, __file__, "--only", "--packets", str(packets)],
        env=env,
        cwd=path,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result: dict[str, float] = json.loads(r.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server-path", help="another checkout to compare with, in turns")
    ap.add_argument("--rounds", type=int, default=6, help="rounds of each checkout")
    ap.add_argument("--packets", type=int, default=30_000, help="incoming packets per round")
    ap.add_argument("--only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:  # one measurement, in a process of its own (the checkout: PYTHONPATH)
        print(json.dumps(measure(args.packets)))
        return
    checkouts: dict[str, Path] = {"this": HERE}
    if args.server_path:
        checkouts["other"] = Path(args.server_path).resolve()
    results: dict[str, list[dict[str, float]]] = {k: [] for k in checkouts}
    order = list(checkouts)
    for i in range(args.rounds):
        for name in order if i % 2 == 0 else order[::-1]:
            r = run_round(checkouts[name], args.packets)
            results[name].append(r)
            print(
                f"round {i + 1} {name:5}: " + ", ".join(f"{k} {v:.0f} ns" for k, v in r.items()),
                flush=True,
            )
    final: dict[str, Any] = {}
    for name, rs in results.items():
        med = {k: round(statistics.median(r[k] for r in rs)) for k in rs[0]}
        final[f"ns_per_forwarded_{name}"] = med
        print(
            f"{name} ({checkouts[name]}): medians "
            + ", ".join(f"{k} {v} ns" for k, v in med.items())
        )
    if "other" in results:
        ratios = {
            k: round(final["ns_per_forwarded_this"][k] / final["ns_per_forwarded_other"][k], 3)
            for k in final["ns_per_forwarded_this"]
        }
        final["ratio_this_to_other"] = ratios
        print("this / other: " + ", ".join(f"{k} {v}" for k, v in ratios.items()))
    print(json.dumps(final))


if __name__ == "__main__":
    main()
