"""Fault benchmark: a node under twice its capacity, and a fan-out worker killed mid-lesson.

    python -m skyclass.loadtest.faults_bench [--per-worker 50] [--window 10] [--kill-window 8]
                                             [--workers 4] [--quick]

Against ``skyclass serve --workers 2 --max-viewers-per-worker C`` as a subprocess (fresh
data directory, media on 127.0.0.1), with a teacher publishing the 640x480 30 fps ~1 Mbps
H.264 + Opus clip from its own process (as in ``fanout_bench``):

1. **overload**: ``4 C`` students (twice the node's capacity of ``2 C``) POST their WHEP
   offers. Counted: students admitted, students refused and with what status and
   ``Retry-After``; then, over ``--window`` seconds, the admitted students' loss (from the
   clear RTP sequence numbers), the teacher's connection state (sampled every second from
   its own peer connection) and whether the room stayed live (``/api/rooms/{room}``).
2. **kill**: the lesson goes on; ``/readyz`` says which worker process holds whom; one
   worker gets ``SIGKILL``. Over ``--kill-window`` seconds around the kill (2 s before, the
   rest after) the students still receiving are the other worker's: their loss during the
   event. Then the dead worker's students reconnect as the watch page does (new WHEP
   POSTs): how many are admitted again and how long until each sees a keyframe, and
   whether the worker pool restarted the dead process.

Targets (issue 6): admitted students < 1 % loss under 2x overload, the teacher never
disconnected, every refused student told 503 with ``Retry-After``; the surviving worker's
students < 0.5 % loss during the kill. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from . import light_clients
from .common import PipeProcess, ServerProcess, percentile
from .fanout_bench import StudentPool, _publish, _wait_flowing


def _get_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # /readyz answers 503 with a body when full
        return exc.code, json.loads(exc.read() or b"null")


def _students(pool: StudentPool) -> dict[str, dict]:
    return {name: s for w in pool.totals() for name, s in w["students"].items()}


def _video_loss(before: dict[str, dict], after: dict[str, dict], names: list[str]) -> tuple[list[float], int, int]:
    """Per-student video loss between two totals snapshots, and the packets in it."""
    losses, rx_sum, exp_sum = [], 0, 0
    for name in names:
        rx = after[name]["video_rx"] - before[name]["video_rx"]
        exp = after[name]["video_exp"] - before[name]["video_exp"]
        if exp > 0:
            losses.append(max(0.0, 1 - rx / exp))
            rx_sum += rx
            exp_sum += exp
    return losses, rx_sum, exp_sum


def _pct(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(100 * x, 3)


def _watch_teacher(teacher: PipeProcess, server: ServerProcess, room: str, seconds: float) -> dict:
    """Sample the teacher's own connection state and the room's liveness once a second."""
    states: Counter = Counter()
    not_live = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        states[teacher.call("cpu", timeout=30)["state"]] += 1
        _, room_state = _get_json(f"{server.url}/api/rooms/{room}")
        if not room_state.get("live"):
            not_live += 1
        time.sleep(max(0.0, min(1.0, deadline - time.monotonic())))
    return {"teacher_states": dict(states), "room_not_live_samples": not_live,
            "teacher_always_connected": set(states) == {"connected"} and not_live == 0}


def run_overload(args: argparse.Namespace, server: ServerProcess, pool: StudentPool, teacher: PipeProcess,
                 room: str) -> tuple[dict, list[str]]:
    capacity = 2 * args.per_worker
    offered = 2 * capacity
    tokens = [server.token("student", room, f"s{i}") for i in range(offered)]
    started = time.monotonic()
    replies = pool.join(server.url, room, tokens, concurrency=16)
    join_s = time.monotonic() - started
    admitted = [n for r in replies for n, t in r["join"].items() if t["connected"] is not None]
    refused = [x for r in replies for x in r["refused"]]
    failed = [f for r in replies for f in r["failed"]]
    told_503 = [x for x in refused if x["status"] == 503 and x["retry_after"] and int(x["retry_after"]) > 0]
    _, ready = _get_json(f"{server.url}/readyz")
    say(f"overload: {offered} students offered to a node of {capacity} seats: {len(admitted)} admitted, "
        f"{len(refused)} refused ({len(told_503)} with 503 + Retry-After) in {join_s:.1f}s")
    time.sleep(args.settle)
    before = _students(pool)
    teacher_watch = _watch_teacher(teacher, server, room, args.window)
    after = _students(pool)
    losses, rx, exp = _video_loss(before, after, admitted)
    result = {
        "capacity": capacity, "offered": offered, "admitted": len(admitted), "refused": len(refused),
        "refused_with_503_retry_after": len(told_503), "other_failures": len(failed) - len(refused),
        "refusal_statuses": dict(Counter(str(x["status"]) for x in refused)),
        "retry_after_s": sorted({x["retry_after"] for x in refused if x["retry_after"]}),
        "readyz_ready_when_full": ready.get("ready") if isinstance(ready, dict) else None,
        "join_s": round(join_s, 2),
        "window_s": args.window,
        "admitted_loss_pct_mean": _pct(sum(losses) / len(losses)) if losses else None,
        "admitted_loss_pct_max": _pct(max(losses)) if losses else None,
        "admitted_loss_pct_p95": _pct(percentile(losses, 95)),
        "admitted_loss_pct_aggregate": _pct(1 - rx / exp) if exp else None,
        "admitted_receiving": len(losses),
        **teacher_watch,
    }
    say(f"  window {args.window:.0f}s: admitted loss mean {result['admitted_loss_pct_mean']}%, "
        f"max {result['admitted_loss_pct_max']}%; teacher states {teacher_watch['teacher_states']}, "
        f"room not live in {teacher_watch['room_not_live_samples']} samples")
    return result, admitted


def run_kill(args: argparse.Namespace, server: ServerProcess, pool: StudentPool, teacher: PipeProcess,
             room: str, admitted: list[str]) -> dict:
    _, ready = _get_json(f"{server.url}/readyz")
    workers = ready["workers"]
    victim = max(workers, key=lambda w: w["viewers"])
    say(f"kill: workers {[(w['worker'], w['viewers']) for w in workers]}; SIGKILL worker {victim['worker']} "
        f"(pid {victim['pid']}, {victim['viewers']} students)")
    before = _students(pool)
    time.sleep(2.0)
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    teacher_watch = _watch_teacher(teacher, server, room, max(1.0, args.kill_window - 2.0))
    after = _students(pool)
    # The dead worker's students stop receiving at the kill; the rest are the survivors.
    moving = [n for n in admitted if after[n]["frames"] - before[n]["frames"] > 0]
    later = _students(pool)
    time.sleep(1.0)
    latest = _students(pool)
    survivors = [n for n in moving if latest[n]["frames"] > later[n]["frames"]]
    stalled = [n for n in admitted if n not in survivors]
    losses, rx, exp = _video_loss(before, after, survivors)
    result: dict[str, Any] = {
        "victim_students": victim["viewers"], "survivors": len(survivors), "stalled": len(stalled),
        "survivors_expected": sum(w["viewers"] for w in workers) - victim["viewers"],
        "window_s": args.kill_window,
        "survivor_loss_pct_mean": _pct(sum(losses) / len(losses)) if losses else None,
        "survivor_loss_pct_max": _pct(max(losses)) if losses else None,
        "survivor_loss_pct_aggregate": _pct(1 - rx / exp) if exp else None,
        **teacher_watch,
    }
    say(f"  survivors {len(survivors)} (expected {result['survivors_expected']}): loss during the kill mean "
        f"{result['survivor_loss_pct_mean']}%, max {result['survivor_loss_pct_max']}%; "
        f"teacher states {teacher_watch['teacher_states']}")
    # The dead worker's students come back as the watch page does: a new WHEP POST.
    count = len(stalled)
    tokens = [server.token("student", room, f"again{i}") for i in range(count)]
    started = time.monotonic()
    replies = pool.join(server.url, room, tokens, wait_keyframe=20.0, concurrency=16)
    joins = {n: t for r in replies for n, t in r["join"].items()}
    keyframes = [t["keyframe"] for t in joins.values() if t["keyframe"] is not None]
    restarted_after = None
    while time.monotonic() - killed_at < 60:
        _, ready = _get_json(f"{server.url}/readyz")
        if all(w.get("up") for w in ready["workers"]):
            restarted_after = time.monotonic() - killed_at
            break
        time.sleep(0.2)
    result.update({
        "rejoined": len(keyframes), "rejoin_attempts": count,
        "rejoin_refused": dict(Counter(str(x["status"]) for r in replies for x in r["refused"])),
        "rejoin_keyframe_ms_p50": _ms(percentile(keyframes, 50)),
        "rejoin_keyframe_ms_p95": _ms(percentile(keyframes, 95)),
        "rejoin_s_total": round(time.monotonic() - started, 2),
        "worker_restarted_after_s": round(restarted_after, 2) if restarted_after is not None else None,
    })
    say(f"  rejoin: {len(keyframes)}/{count} saw video again, keyframe p95 {result['rejoin_keyframe_ms_p95']} ms; "
        f"worker restarted after {result['worker_restarted_after_s']} s")
    return result


def _ms(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(1000 * x, 1)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skyclass.loadtest.faults_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-worker", type=int, default=50, help="--max-viewers-per-worker of the server")
    parser.add_argument("--window", type=float, default=10.0, help="seconds of the overload window")
    parser.add_argument("--kill-window", type=float, default=8.0, help="seconds around the kill")
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=4, help="student processes")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 3 seats per worker, short windows")
    parser.add_argument("--work-dir", type=Path, help="keep the server's data and log here")
    args = parser.parse_args(argv)
    if args.quick:
        args.per_worker, args.window, args.kill_window, args.settle, args.workers = 3, 3.0, 4.0, 1.0, 2
    base = Path(args.work_dir or tempfile.mkdtemp(prefix="faults-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    clip = base / "clip.h264"
    light_clients.make_h264_clip(clip, seconds=4 if args.quick else 10)
    secret = secrets.token_urlsafe(24)
    results: dict[str, Any] = {"benchmark": "faults", "machine": {"cores": os.cpu_count()},
                               "settings": {"per_worker": args.per_worker, "window_s": args.window,
                                            "kill_window_s": args.kill_window, "client_processes": args.workers}}
    server = ServerProcess("skyclass", base / "server", secret,
                           ["--workers", "2", "--max-viewers-per-worker", str(args.per_worker), "--no-record", "*"])
    pool = StudentPool(args.workers)
    teacher = PipeProcess(light_clients.teacher_main, str(clip))
    room = "faults"
    try:
        _publish(teacher, server, room)
        _wait_flowing(server)
        results["overload"], admitted = run_overload(args, server, pool, teacher, room)
        results["kill"] = run_kill(args, server, pool, teacher, room, admitted)
    finally:
        for step in (lambda: teacher.call("unpublish", timeout=30), lambda: pool.close_all()):
            try:
                step()
            except Exception as exc:  # cleanup goes on
                say(f"cleanup: {exc}")
        pool.stop()
        teacher.stop()
        server.stop()
    o, k = results["overload"], results["kill"]
    results["targets"] = {
        "admitted_loss_under_1pct": o["admitted_loss_pct_max"] is not None and o["admitted_loss_pct_max"] < 1.0,
        "teacher_never_disconnected": o["teacher_always_connected"] and k["teacher_always_connected"],
        "every_refused_told_503": o["refused"] == o["offered"] - o["capacity"] == o["refused_with_503_retry_after"],
        "survivors_loss_under_half_pct": k["survivor_loss_pct_max"] is not None and k["survivor_loss_pct_max"] < 0.5
        and k["survivors"] == k["survivors_expected"],
    }
    rows = [
        ("offered / seats / admitted / refused (503 + Retry-After)",
         f"{o['offered']} / {o['capacity']} / {o['admitted']} / {o['refused']} ({o['refused_with_503_retry_after']})"),
        ("admitted loss under 2x overload: mean / p95 / max", f"{o['admitted_loss_pct_mean']} / "
         f"{o['admitted_loss_pct_p95']} / {o['admitted_loss_pct_max']} %"),
        ("teacher connected throughout", str(results["targets"]["teacher_never_disconnected"])),
        ("kill -9 of a worker: survivors / expected", f"{k['survivors']} / {k['survivors_expected']}"),
        ("survivors' loss during the kill: mean / max", f"{k['survivor_loss_pct_mean']} / {k['survivor_loss_pct_max']} %"),
        ("dead worker's students back with video / p95 keyframe", f"{k['rejoined']}/{k['rejoin_attempts']} / "
         f"{k['rejoin_keyframe_ms_p95']} ms"),
        ("worker restarted after", f"{k['worker_restarted_after_s']} s"),
    ]
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    print(json.dumps(results))
    return 0 if all(results["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
