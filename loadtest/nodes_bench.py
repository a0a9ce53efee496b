"""Scale-out benchmark: what a second node costs when it serves students of a room taught elsewhere.

    python -m skyclass.loadtest.nodes_bench [--students 100] [--duration 10] [--workers 4] [--quick]

Two ``skyclass serve`` processes (nodes ``a`` and ``b``, one fan-out worker each) share a
throwaway ``redis-server``; a teacher publishes the 640x480 30 fps ~1 Mbps H.264 + Opus
clip to node A (as in ``fanout_bench``). Then, in the same run:

1. **origin alone**: A's CPU with the teacher and nobody watching (and later B's, idle);
2. **local**: ``--students`` students join A; A's CPU per student (it ingests and fans out);
3. **edge**: they leave, and as many join node B, which relays the room from A over the
   relay protocol (``docs/relay-protocol.md``, "Between machines") and fans it out itself:
   B's CPU per student, and what serving B costs A (A's CPU now minus A alone: one relayed
   stream per track, whatever the number of B's students).

Figures: the edge's CPU per student against the origin's, each beyond its own fixed cost
(ratio near 1: a room's capacity grows by a node's worth per node added), the origin's
cost of one edge node in % of a core, and the edge students' loss. Every node and client shares this machine, so read
the ratios, not the absolute numbers. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from . import light_clients
from .common import PipeProcess, RedisServer, ServerProcess, process_tree_cpu_seconds
from .fanout_bench import Settings, StudentPool, _grow, _publish, _safe, _wait_flowing


def _cpu_cores(server: ServerProcess, seconds: float) -> float:
    """CPU of the node's whole process tree (front and workers), in cores, over ``seconds``."""
    before, started = process_tree_cpu_seconds(server.pid), time.monotonic()
    time.sleep(seconds)
    after, wall = process_tree_cpu_seconds(server.pid), time.monotonic() - started
    return sum(end - before.get(pid, 0.0) for pid, end in after.items()) / wall


def run(args: argparse.Namespace) -> dict[str, Any]:
    base = Path(args.work_dir or tempfile.mkdtemp(prefix="nodes-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    clip = base / "clip.h264"
    light_clients.make_h264_clip(clip, seconds=4 if args.quick else 10)
    secret = secrets.token_urlsafe(24)
    settings = Settings(counts=[args.students], relay_counts=[], duration=args.duration, join_count=0,
                        join_window=5.0, settle=args.settle, workers=args.workers, log=sys.stderr)
    results: dict[str, Any] = {"benchmark": "nodes", "machine": {"cores": os.cpu_count()},
                               "settings": {"students": args.students, "duration_s": args.duration,
                                            "client_processes": args.workers}}
    redis = RedisServer()
    nodes: list[ServerProcess] = []
    pool: Optional[StudentPool] = None
    teacher: Optional[PipeProcess] = None
    room = "nodes"
    try:
        for name in ("a", "b"):
            nodes.append(ServerProcess("skyclass", base / name, secret,
                                       ["--redis", redis.url, "--node-id", name, "--workers", "1",
                                        "--max-viewers-per-worker", "1000", "--no-record", "*"]))
        a, b = nodes
        pool = StudentPool(args.workers)
        teacher = PipeProcess(light_clients.teacher_main, str(clip))
        _publish(teacher, a, room)
        _wait_flowing(a)
        time.sleep(args.settle)
        results["origin_alone_cores"] = round(_cpu_cores(a, args.duration), 4)
        settings.say(f"nodes: origin alone {results['origin_alone_cores']:.3f} cores")

        settings.say(f"nodes: {args.students} students on the origin (node a)")
        (local,) = _grow(a, pool, teacher, room, [args.students], settings, None)
        pool.close_all()
        time.sleep(args.settle)

        results["edge_idle_cores"] = round(_cpu_cores(b, args.duration), 4)
        settings.say(f"nodes: {args.students} students on the edge (node b, relaying from a)")
        (edge,) = _grow(b, pool, teacher, room, [args.students], settings, None)
        origin_with_edge = _cpu_cores(a, args.duration)
        results["origin_with_edge_cores"] = round(origin_with_edge, 4)
        results["local"], results["edge"] = local, edge
    finally:
        if teacher is not None:
            _safe(lambda: teacher.call("unpublish", timeout=30))
        if pool is not None:
            _safe(pool.close_all)
            pool.stop()
        if teacher is not None:
            teacher.stop()
        for node in nodes:
            node.stop()
        redis.stop()
        if args.work_dir is None:
            shutil.rmtree(base, ignore_errors=True)
    n = args.students
    # The origin's own students cost it what fan-out costs; its teacher and idle processes are
    # the fixed part, which the edge does not have (it has the relay hop in instead).
    local_per_student = 100 * (local["server_cpu_cores"] - results["origin_alone_cores"]) / n
    edge_per_student = 100 * (edge["server_cpu_cores"] - results["edge_idle_cores"]) / n
    results["summary"] = {
        "origin_cpu_per_student_pct": round(local_per_student, 3),
        "edge_cpu_per_student_pct": round(edge_per_student, 3),
        "edge_vs_origin_ratio": round(edge_per_student / local_per_student, 2) if local_per_student > 0 else None,
        "origin_cost_of_one_edge_pct_core": round(100 * (results["origin_with_edge_cores"]
                                                         - results["origin_alone_cores"]), 2),
        "edge_loss_pct_max": edge["loss_pct_max"],
        "edge_students_receiving": edge["students_measured"] - edge["silent"],
        "edge_relay_pps_in": edge.get("teacher_pps_in"),
        "edge_pps_out": edge.get("forwarded_pps"),
    }
    return results


def format_report(results: dict) -> str:
    s, local, edge = results["summary"], results["local"], results["edge"]
    rows = [
        ("origin (node a) alone: teacher in, nobody watching", f"{results['origin_alone_cores']:.3f} cores"),
        (f"{local['n']} students on the origin: node a CPU", f"{local['server_cpu_cores']:.3f} cores "
         f"({s['origin_cpu_per_student_pct']:.3f}% of a core per student beyond the teacher)"),
        ("edge (node b) idle", f"{results['edge_idle_cores']:.3f} cores"),
        (f"{edge['n']} students on the edge: node b CPU", f"{edge['server_cpu_cores']:.3f} cores "
         f"({s['edge_cpu_per_student_pct']:.3f}% per student beyond idle, relay hop included)"),
        ("edge / origin CPU per student", f"{s['edge_vs_origin_ratio']}"),
        ("what serving node b costs node a", f"{s['origin_cost_of_one_edge_pct_core']}% of a core "
         f"(node a: {results['origin_with_edge_cores']:.3f} cores)"),
        ("edge: relayed in / forwarded out", f"{s['edge_relay_pps_in']} / {s['edge_pps_out']} pkt/s"),
        ("edge students receiving / loss max", f"{s['edge_students_receiving']}/{edge['n']} / {s['edge_loss_pct_max']} %"),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skyclass.loadtest.nodes_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--students", type=int, default=100)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured window")
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=4, help="student processes")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 4 students, short windows")
    parser.add_argument("--work-dir", type=Path, help="keep the nodes' data and logs here")
    args = parser.parse_args(argv)
    if args.quick:
        args.students, args.duration, args.settle, args.workers = 4, 2.0, 1.0, 2
    results = run(args)
    print(format_report(results))
    print(json.dumps(results, separators=(",", ":")), flush=True)
    s = results["summary"]
    return 0 if s["edge_students_receiving"] == args.students else 1


if __name__ == "__main__":
    sys.exit(main())
