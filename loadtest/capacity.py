"""``--find-capacity``: how many students one room holds with every objective met, per server
core, and how many servers the scenario needs at full size.

One teacher publishes into one room; students are added in steps (``[capacity]`` of the
scenario: start, step, growth, each step's join ramp, a settling time and a measuring
window). Each step is judged with the scenario's own objectives, on the step's joins
(success, first keyframe) and on the window (every student's loss before and after
repair, freezes, the end-to-end delay of every frame). The first step that breaks one
ends the search; the largest count that held is the capacity.

Per core: that count divided by the server's CPU (cores) measured in its window, so the
figure does not depend on how many cores the test machine had free. When the server and
the harness share a machine, what breaks first may be the machine, not the server: the
report says so when the machine was saturated or the harness lagged at the break.

A local server started by the harness gets an admission cap far above the search's
maximum: the finder measures what the forwarding path holds, not the configured cap
(which it then recommends). Against a deployment, a 503 is a break like any other
(``admission``).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, replace
from typing import Any, Optional

from . import analysis
from .report import _fmt, line_chart, run_charts
from .runner import ClientPool, Options, Target, _code_version, ensure_clip, take_snapshot

SATURATED = 0.95  # of the machine's cores: beyond this the machine, not the server, may be the limit


def _merge_hist(snapshots: list[analysis.Snapshot]) -> dict[int, int]:
    return analysis.merge_histograms(w.get("hist", {}) for snap in snapshots for w in snap.workers)


def judge_step(objectives: Any, count: int, joins: dict, window: dict) -> tuple[bool, str]:
    """Does a step hold? (holds, the objectives it broke)."""
    broken = []
    checks = [("join_success_pct", joins.get("success_pct"), True),
              ("first_keyframe_p95_s", joins.get("keyframe_p95_s"), False),
              ("loss_p95_pct", window.get("loss_p95"), False),
              ("residual_loss_p95_pct", window.get("residual_p95"), False),
              ("freeze_pct", window.get("freeze_pct"), False),
              ("delay_p95_ms", window.get("delay_p95"), False)]
    for name, value, higher in checks:
        target = getattr(objectives, name)
        if target is None:
            continue
        if value is None:
            if name in ("join_success_pct", "loss_p95_pct"):
                broken.append(f"{name}: nothing measured")
            continue
        if (value < target) if higher else (value >= target):
            broken.append(f"{name} {value:g} (objective {'>=' if higher else '<'} {target:g})")
    if joins.get("http_503"):
        broken.append(f"admission: {joins['http_503']} refused with 503")
    return not broken, "; ".join(broken)


def plan_district(scenario: Any, per_core: Optional[float], per_node: Optional[float]) -> dict[str, Any]:
    """Servers for the scenario at full size, from the capacity of one core (or node)."""
    total = scenario.full_size_students()
    largest_room = max((g.students for g in scenario.rooms), default=0)
    rooms = sum(g.rooms for g in scenario.rooms)
    headroom = scenario.plan.headroom_pct / 100
    cores_per_server = scenario.plan.cores_per_server
    out: dict[str, Any] = {"students": total, "rooms": rooms, "largest_room": largest_room,
                           "headroom_pct": scenario.plan.headroom_pct, "cores_per_server": cores_per_server}
    if per_core:
        usable = per_core * (1 - headroom)
        per_server = usable * cores_per_server
        cores = math.ceil(total / usable) if usable else None
        out.update({
            "students_per_core_measured": round(per_core, 1),
            "students_per_core_planned": round(usable, 1),
            "students_per_server": int(per_server),
            "cores": cores,
            "servers": math.ceil(total / per_server) if per_server else None,
            "servers_for_largest_room": math.ceil(largest_room / per_server) if per_server else None,
            "max_viewers_per_worker": int(usable),
        })
        if out["servers_for_largest_room"] and out["servers_for_largest_room"] > 1:
            out["note"] = (f"a {largest_room}-student room does not fit one {cores_per_server}-core server "
                           f"({int(per_server)} students): it needs {out['servers_for_largest_room']} servers, an "
                           "origin plus edge nodes on other machines relaying it (nodes sharing one --redis; "
                           "students may join through any of them: docs/relay-protocol.md, 'Between machines')")
    elif per_node:
        usable = per_node * (1 - headroom)
        out.update({"students_per_node_measured": round(per_node, 1),
                    "servers": math.ceil(total / usable) if usable else None,
                    "note": "server CPU unknown (remote server): planned per node of the measured size"})
    return out


def find_capacity(options: Options) -> dict[str, Any]:
    """Run the search; the report (``report.json``'s content)."""
    scenario = options.scenario
    cap = scenario.capacity
    settings = scenario.run
    say = options.say
    started = time.time()
    options.report_dir.mkdir(parents=True, exist_ok=True)
    if options.url.strip().lower() in ("", "local") and options.max_viewers_per_worker is None:
        options = replace(options, max_viewers_per_worker=max(10 * cap.max, 10000))
    target = Target.open(options, say)
    pool: Optional[ClientPool] = None
    steps: list[dict] = []
    timeline: list[dict] = []
    best: Optional[dict] = None
    room = options.room_prefix + "capacity"
    ttl = 24 * 3600
    cores = os.cpu_count() or 1
    try:
        target.describe()  # while the servers run
        clip = ensure_clip(scenario.teacher)
        pool = ClientPool(options.workers, target.host_addresses())
        pool.wait_ready()
        t0 = time.monotonic() + 0.5
        pool.teacher.call("teach", url=target.url, clip=str(clip), fps=scenario.teacher.fps,
                          lessons=[{"room": room, "token": target.token("teacher", room, "teacher-capacity", ttl),
                                    "at": t0, "until": t0 + ttl}])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            _, teacher = pool.sample()
            if teacher["teachers"].get(room) in ("live", "failed"):
                break
            time.sleep(0.2)
        if teacher["teachers"].get(room) != "live":
            raise RuntimeError(f"the teacher could not publish into {room}")
        time.sleep(1.0)
        previous = take_snapshot(pool, target)
        count, goal, step = 0, cap.start, float(cap.step)
        impaired: set[str] = set()
        context: dict[str, Any] = {"duration": None, "sessions": 0, "label": ""}

        def sample_for(seconds: float) -> list[analysis.Snapshot]:
            nonlocal previous
            taken = []
            end = time.monotonic() + seconds
            while True:
                time.sleep(max(0.0, min(settings.sample_interval, end - time.monotonic())))
                current = take_snapshot(pool, target)
                row = analysis.window_stats(previous, current, t0, cores, impaired)
                row["students"] = goal
                timeline.append(row)
                if options.progress:
                    options.progress(row, context)
                previous = current
                taken.append(current)
                if time.monotonic() >= end:
                    return taken

        while goal <= cap.max:
            added = goal - count
            now = time.monotonic() + 0.5
            ids = [f"{room}/s{count + i}" for i in range(added)]
            sessions = [{"id": sid, "student": sid, "room": room, "token": target.token("student", room, sid, ttl),
                         "join_at": now + cap.join_ramp * (i + 0.5) / added, "leave_at": now + ttl,
                         "leave_mode": "end", "url": target.url_for(count + i)} for i, sid in enumerate(ids)]
            pool.add_sessions(target.url, sessions, settings)
            context.update(sessions=goal, label=f"capacity step {goal} students:")
            say(f"step: {goal} students ({added} joining over {cap.join_ramp:g} s)")
            # joins: until none of this step's students is still joining
            wait_until = now + cap.join_ramp + settings.join_timeout + 2
            step_ids = set(ids)
            while time.monotonic() < wait_until:
                snaps = sample_for(1.0)
                states = {sid: v[0] for w in snaps[-1].workers for sid, v in w["live"].items() if sid in step_ids}
                if states and all(s not in ("scheduled", "joining") for s in states.values()):
                    break
            sample_for(cap.settle)
            first = previous
            window_snaps = sample_for(cap.window)
            last = window_snaps[-1]
            window = analysis.window_stats(first, last, t0, cores, impaired)
            hist = _merge_hist(window_snaps)
            window.update(delay_p50=analysis.histogram_percentile(hist, 50),
                          delay_p95=analysis.histogram_percentile(hist, 95))
            joins = step_joins(pool, step_ids)
            holds, reason = judge_step(scenario.objectives, goal, joins, window)
            row = {"students": goal, "held": holds, "reason": reason, "join_success_pct": joins.get("success_pct"),
                   "keyframe_p95_s": joins.get("keyframe_p95_s"), "loss_p95_pct": window.get("loss_p95"),
                   "residual_p95_pct": window.get("residual_p95"), "freeze_pct": window.get("freeze_pct"),
                   "delay_p95_ms": window.get("delay_p95"), "server_cpu_cores": window.get("server_cpu"),
                   "client_cpu_cores": window.get("client_cpu"), "teacher_cpu_cores": window.get("teacher_cpu"),
                   "machine_busy_cores": window.get("machine_busy_cores"), "client_lag_ms": window.get("client_lag_ms"),
                   "server_pps_out": window.get("server_pps_out"), "active": window.get("active")}
            step_rows = [r for r in timeline if r.get("students") == goal]
            row["machine_busy_max"] = max((r["machine_busy_cores"] for r in step_rows), default=None)
            row["client_lag_ms_max"] = max((r["client_lag_ms"] or 0 for r in step_rows), default=None)
            steps.append(row)
            say(f"  {goal} students: {'holds' if holds else 'breaks: ' + reason}; server "
                f"{_fmt(row['server_cpu_cores'], '.2f')} cores, loss p95 {_fmt(row['loss_p95_pct'], '.2f')}%, "
                f"delay p95 {_fmt(row['delay_p95_ms'], '.0f')} ms, machine busy {_fmt(row['machine_busy_cores'], '.2f')}")
            if not holds:
                break
            best = row
            count = goal
            step *= cap.growth
            goal = count + max(1, int(round(step)))
        pool.finish()
    finally:
        if pool is not None:
            pool.stop()
        target.close(keep_log=options.report_dir / "server.log")
    return capacity_report(options, target, steps, best, timeline, started, cores)


def step_joins(pool: ClientPool, ids: set[str]) -> dict[str, Any]:
    """A step's joins: how many reached a keyframe, the 95th percentile of the time it took,
    and how many the server refused with 503 (its admission control)."""
    for process in pool.students:
        process.send("join_times", ids=sorted(ids))
    times: dict[str, dict] = {}
    for process in pool.students:
        times.update(process.reply(60))
    if not times:
        return {}
    keyframes = [t["keyframe_s"] for t in times.values() if t["keyframe_s"] is not None]
    p95 = analysis.percentile(keyframes, 95)
    return {"success_pct": round(100.0 * len(keyframes) / len(times), 3), "joined": len(keyframes),
            "attempted": len(times), "http_503": sum(1 for t in times.values() if t["http_status"] == 503),
            "keyframe_p95_s": None if p95 is None else round(p95, 3)}


def marginal_students_per_core(steps: list[dict]) -> Optional[float]:
    """Students per core of the server's CPU growth from step to step (least-squares slope
    of CPU over students): the per-student cost without the fixed cost of a room (teacher
    ingress, recorder, the front process). The at-capacity figure, fixed costs included,
    is the one the plan uses; this one says how much of it is fixed."""
    points = [(s["students"], s["server_cpu_cores"]) for s in steps if s.get("server_cpu_cores") is not None]
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx <= 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return round(1 / slope, 1) if slope > 0 else None


def capacity_report(options: Options, target: Target, steps: list[dict], best: Optional[dict],
                    timeline: list[dict], started: float, cores: int) -> dict[str, Any]:
    scenario = options.scenario
    notes = []
    per_core = None
    if best and best.get("server_cpu_cores"):
        per_core = best["students"] / best["server_cpu_cores"]
    broke = steps[-1] if steps and not steps[-1]["held"] else None
    if broke:
        if (broke.get("machine_busy_max") or 0) >= SATURATED * cores or (broke.get("client_lag_ms_max") or 0) > 250:
            notes.append(f"at the break the machine was saturated (up to {_fmt(broke.get('machine_busy_max'), '.2f')} "
                         f"of {cores} cores busy, harness lag up to {_fmt(broke.get('client_lag_ms_max'), '.0f')} ms): "
                         "server and "
                         "load generator share it, so the count that held is a lower bound for the server; the "
                         "per-core figure (students per core of server CPU) is the one to plan with")
    else:
        notes.append(f"no objective broke up to capacity.max = {scenario.capacity.max}: raise it to find the limit")
    if best and best["server_cpu_cores"] is None:
        notes.append("server CPU unavailable (remote server): the plan is per node, not per core")
    marginal = marginal_students_per_core([s for s in steps if s["held"]])
    plan = plan_district(scenario, per_core, best["students"] if best and per_core is None else None)
    capacity = {
        "room_capacity": best["students"] if best else 0,
        "server_cpu_cores_at_capacity": best.get("server_cpu_cores") if best else None,
        "students_per_server_core": round(per_core, 1) if per_core else None,
        "server_cpu_per_student_pct": round(100 / per_core, 3) if per_core else None,
        "marginal_students_per_server_core": marginal,
        "harness_cpu_per_student_pct": (round(100 * best["client_cpu_cores"] / best["students"], 3)
                                        if best and best.get("client_cpu_cores") is not None else None),
        "broke_at": broke["students"] if broke else None,
        "broke_because": broke["reason"] if broke else None,
        "admission_cap_used": options.max_viewers_per_worker,
        "plan": plan,
        "steps": steps,
    }
    verdict = "pass" if best else "fail"
    objectives = [{"objective": "capacity", "describe": "students one room holds with every objective met",
                   "op": ">=", "target": scenario.capacity.start, "measured": capacity["room_capacity"], "unit": "",
                   "ok": bool(best), "status": verdict}]
    return {
        "tool": "skyclass loadtest --find-capacity",
        "scenario": {"name": scenario.name, "description": scenario.description, "path": scenario.path,
                     "scale": options.scale, "full_size_students": scenario.full_size_students(),
                     "objectives": asdict(scenario.objectives), "capacity_settings": asdict(scenario.capacity)},
        "plan": {"rooms": [], "teachers": 1, "students": steps[-1]["students"] if steps else 0,
                 "sessions": steps[-1]["students"] if steps else 0, "rejoins": 0, "impaired_students": 0,
                 "replay_viewers": 0, "duration_s": timeline[-1]["t"] if timeline else 0.0},
        "target": target.describe(),
        "machine": {"cores": cores, "loadavg_end": list(os.getloadavg())},
        "code": _code_version(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_s": round(time.time() - started, 1),
        "verdict": verdict,
        "objectives": objectives,
        "capacity": capacity,
        "summary": {},
        "timeline": timeline,
        "notes": notes,
    }


def capacity_charts(report: dict) -> list[str]:
    steps = report["capacity"]["steps"]
    held = [s for s in steps]
    charts = [
        line_chart("Server CPU by students in the room", [("server", [(s["students"], s["server_cpu_cores"]) for s in held]),
                                                          ("simulated students", [(s["students"], s["client_cpu_cores"]) for s in held]),
                                                          ("machine busy", [(s["students"], s["machine_busy_cores"]) for s in held])],
                   x_label="students", y_label="cores"),
        line_chart("Loss by students in the room (window p95)", [("before repair", [(s["students"], s["loss_p95_pct"]) for s in held]),
                                                                 ("after repair", [(s["students"], s["residual_p95_pct"]) for s in held])],
                   x_label="students", y_label="%"),
        line_chart("Delay by students in the room (p95 of frames)", [("delay", [(s["students"], s["delay_p95_ms"]) for s in held])],
                   x_label="students", y_label="ms"),
    ]
    timeline = report["timeline"]
    charts.append(line_chart("Students over time", [("target", [(r["t"], r.get("students")) for r in timeline]),
                                                    ("watching", [(r["t"], r["active"]) for r in timeline])],
                             y_label="students", step=True))
    return charts + [c for c in run_charts({**report, "joins_curve": []})[1:]]


def capacity_summary(report: dict) -> str:
    cap = report["capacity"]
    plan = cap["plan"]
    lines = [f"capacity: one room held {cap['room_capacity']} students with every objective met"
             + (f"; broke at {cap['broke_at']} ({cap['broke_because']})" if cap["broke_at"] else "")]
    if cap["students_per_server_core"]:
        lines.append(f"  server CPU at that count: {_fmt(cap['server_cpu_cores_at_capacity'], '.3f')} cores -> "
                     f"{cap['students_per_server_core']:.0f} students per server core "
                     f"({cap['server_cpu_per_student_pct']:.3f}% of a core each, fixed costs included; "
                     f"{_fmt(cap.get('marginal_students_per_server_core'), '.0f')} per core at the margin); "
                     f"simulated students cost "
                     f"{_fmt(cap['harness_cpu_per_student_pct'], '.3f')}% of a core each")
    for step in cap["steps"]:
        lines.append(f"    {step['students']:>5} {'holds ' if step['held'] else 'BREAKS'} server "
                     f"{_fmt(step['server_cpu_cores'], '.2f')} cores  loss p95 {_fmt(step['loss_p95_pct'], '.2f')}%  "
                     f"delay p95 {_fmt(step['delay_p95_ms'], '.0f')} ms  freeze {_fmt(step['freeze_pct'], '.2f')}%  "
                     f"machine {_fmt(step['machine_busy_cores'], '.2f')} cores")
    if plan.get("servers"):
        lines.append(f"  plan for {report['scenario']['name']} at full size ({plan['students']} students in "
                     f"{plan['rooms']} rooms): with {plan['headroom_pct']:.0f}% headroom "
                     f"{plan.get('students_per_core_planned', '-')} students per core -> {plan.get('cores', '-')} cores = "
                     f"{plan['servers']} servers of {plan['cores_per_server']} cores"
                     + (f"; --max-viewers-per-worker {plan['max_viewers_per_worker']}" if plan.get("max_viewers_per_worker") else ""))
    if plan.get("note"):
        lines.append(f"  note: {plan['note']}")
    for note in report.get("notes", []):
        lines.append(f"  note: {note}")
    lines.append(f"verdict: {report['verdict'].upper()}")
    return "\n".join(lines)
