"""From raw samples and session records to figures and a verdict (pure functions, no I/O).

Kept apart from the orchestration so the arithmetic that decides pass or fail can be
tested without a server, and so ``--find-capacity`` judges each step with exactly the
rules a scenario run uses.

Definitions (they are what the report's tables say):

* a **join** succeeds when the student saw its first video keyframe (reached media);
  a student still not connected at the join timeout gives up; times are from its first request
  (503 retries included);
* **loss** is per student over its whole watch: sequence numbers missing at first
  arrival, of all expected (``raw``), and still missing after NACK repair (``residual``);
  the objectives use the 95th percentile over students;
* **freeze** time is the sum of gaps > 500 ms between video frames, of all watch time;
* **delay** is teacher-to-student, per video frame, from the RTCP sender reports' clock;
  its percentiles are over every frame of every student;
* students on an injected lossy network (scenario ``[[impairments]]``) are reported but
  never held to the objectives.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from .common import percentile
from .light_clients import SAMPLE_FIELDS, histogram_percentile, merge_histograms
from .scenario import Objectives

FIELD = {name: i + 1 for i, name in enumerate(SAMPLE_FIELDS)}  # +1: a session sample starts with its state
MIN_WINDOW_PACKETS = 20  # a window with fewer expected packets says nothing about loss


def _pct(part: float, whole: float) -> Optional[float]:
    return None if not whole else 100.0 * part / whole


def _r(value: Optional[float], digits: int = 3) -> Optional[float]:
    return None if value is None else round(value, digits)


# --- one sampling window ---------------------------------------------------------------

@dataclass
class Snapshot:
    """Everything sampled at one instant."""

    time: float                      # monotonic
    workers: list[dict]              # harness_worker sample() replies (student processes)
    teacher: Optional[dict]          # the teacher process's sample() reply
    server_cpu: Optional[float]      # CPU seconds of the server's process tree (local only)
    server_rss: Optional[int]        # bytes (local only)
    metrics: dict[str, float]        # /metrics, unlabelled samples
    machine: tuple[float, float]     # (busy, total) CPU seconds of this machine
    own_cpu: float                   # the orchestrator's CPU seconds


def _metric(values: dict[str, float], name: str) -> Optional[float]:
    if name + "_total" in values:
        return values[name + "_total"]
    return values.get(name)


def window_stats(prev: Snapshot, cur: Snapshot, t0: float, cores: int, impaired: set[str]) -> dict[str, Any]:
    """One row of the timeline: what happened between two snapshots."""
    dt = max(1e-6, cur.time - prev.time)
    before: dict[str, tuple] = {}
    for worker in prev.workers:
        before.update(worker["live"])
    states: Counter = Counter()
    losses, residuals, jitters = [], [], []
    frozen = watching = 0
    freeze_s = 0.0
    keyframes = 0
    nacks = plis = 0
    hist: dict[int, int] = {}
    for worker in cur.workers:
        hist = merge_histograms([hist, worker.get("hist", {})])
        for sid, now in worker["live"].items():
            states[now[0]] += 1
            keyframes += now[FIELD["keyframe"]]
            old = before.get(sid)
            if old is None or len(old) != len(now):
                old = (now[0],) + (0,) * len(SAMPLE_FIELDS)
            nacks += now[FIELD["nacks"]] - old[FIELD["nacks"]]
            plis += now[FIELD["plis"]] - old[FIELD["plis"]]
            if now[0] != "connected" or sid in impaired:
                continue
            exp = now[FIELD["exp"]] - old[FIELD["exp"]]
            if exp >= MIN_WINDOW_PACKETS:
                rx = now[FIELD["rx"]] - old[FIELD["rx"]]
                repaired = now[FIELD["repaired"]] - old[FIELD["repaired"]]
                losses.append(max(0.0, 100.0 * (exp - rx + repaired) / exp))
                residuals.append(max(0.0, 100.0 * (exp - rx) / exp))
                jitters.append(now[FIELD["jitter_ms"]])
            froze = now[FIELD["freeze_s"]] - old[FIELD["freeze_s"]]
            if froze > 0:
                frozen += 1
                freeze_s += min(froze, dt)
            watching += 1
    failed = states.get("failed", 0)
    row: dict[str, Any] = {
        "t": round(cur.time - t0, 2),
        "active": states.get("connected", 0),
        "joining": states.get("joining", 0),
        "joined": keyframes,
        "failed": failed,
        "ended": sum(states.get(s, 0) for s in ("left", "vanished", "ended")),
        "loss_p50": _r(percentile(losses, 50)), "loss_p95": _r(percentile(losses, 95)),
        "loss_max": _r(max(losses) if losses else None),
        "residual_p95": _r(percentile(residuals, 95)),
        "delay_p50": histogram_percentile(hist, 50), "delay_p95": histogram_percentile(hist, 95),
        "delay_p99": histogram_percentile(hist, 99), "frames_timed": sum(hist.values()),
        "jitter_p95": _r(percentile(jitters, 95), 2),
        "frozen": frozen, "freeze_pct": _r(_pct(freeze_s, watching * dt)), "nacks": nacks, "plis": plis,
        "client_cpu": _r(sum(w["cpu"] for w in cur.workers) - sum(w["cpu"] for w in prev.workers), 4),
        "client_lag_ms": _r(1000 * max((w["lag"] for w in cur.workers), default=0.0), 1),
    }
    row["client_cpu"] = _r(row["client_cpu"] / dt, 4)
    if cur.teacher and prev.teacher:
        row["teacher_cpu"] = _r((cur.teacher["cpu"] - prev.teacher["cpu"]) / dt, 4)
    row["harness_cpu"] = _r((row["client_cpu"] or 0) + (row.get("teacher_cpu") or 0)
                            + (cur.own_cpu - prev.own_cpu) / dt, 4)
    if cur.server_cpu is not None and prev.server_cpu is not None:
        row["server_cpu"] = _r(max(0.0, cur.server_cpu - prev.server_cpu) / dt, 4)
    if cur.server_rss is not None:
        row["server_rss_mb"] = round(cur.server_rss / 2 ** 20, 1)
    busy = (cur.machine[0] - prev.machine[0]) / max(1e-6, cur.machine[1] - prev.machine[1])
    row["machine_busy_cores"] = round(busy * cores, 3)
    for key, name in (("server_pps_out", "skyclass_rtp_packets_out"), ("server_pps_in", "skyclass_rtp_packets_in"),
                      ("server_nacks", "skyclass_nacks_received"), ("server_retransmissions", "skyclass_retransmissions"),
                      ("server_dropped_slow", "skyclass_packets_dropped_slow_viewer")):
        a, b = _metric(prev.metrics, name), _metric(cur.metrics, name)
        if a is not None and b is not None:
            row[key] = round(max(0.0, b - a) / dt, 1)
    viewers = _metric(cur.metrics, "skyclass_viewers_total")
    if viewers is not None:
        row["server_viewers"] = int(viewers)
    replay_states: Counter = Counter()
    replay_bytes = 0
    old_replay: dict[str, tuple] = {}
    for worker in prev.workers:
        old_replay.update(worker.get("replay", {}))
    for worker in cur.workers:
        for vid, now in worker.get("replay", {}).items():
            replay_states[now[0]] += 1
            replay_bytes += now[1] - old_replay.get(vid, (None, 0))[1]
    if replay_states:
        row["replay_playing"] = replay_states.get("playing", 0)
        row["replay_done"] = replay_states.get("done", 0)
        row["replay_failed"] = replay_states.get("failed", 0)
        row["replay_mbps"] = round(replay_bytes * 8 / dt / 1e6, 2)
    return row


def steady_rows(timeline: list[dict], start: float, end: float) -> list[dict]:
    """Timeline rows inside [start, end] (seconds from t0); if none, those with at least
    90 % of the peak of active students (a scenario whose lessons never overlap fully)."""
    rows = [r for r in timeline if start <= r["t"] <= end and r["active"] > 0]
    if rows:
        return rows
    peak = max((r["active"] for r in timeline), default=0)
    return [r for r in timeline if peak and r["active"] >= 0.9 * peak]


def cost_per_student(rows: list[dict]) -> dict[str, Any]:
    """Server and harness CPU per active student over ``rows`` (a steady state)."""
    if not rows:
        return {}
    active = sum(r["active"] for r in rows) / len(rows)

    def mean(key: str) -> Optional[float]:
        values = [r[key] for r in rows if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    out: dict[str, Any] = {"window_s": round(rows[-1]["t"] - rows[0]["t"], 1), "students": round(active, 1)}
    for key in ("server_cpu", "client_cpu", "teacher_cpu", "harness_cpu", "machine_busy_cores", "server_pps_out"):
        value = mean(key)
        out[key + "_cores" if key.endswith("cpu") else key] = _r(value, 4)
        if key.endswith("cpu") and value is not None and active:
            out[key + "_per_student_pct"] = _r(100 * value / active, 4)
    if out.get("server_cpu_cores"):
        out["students_per_server_core"] = round(active / out["server_cpu_cores"], 1)
    return out


# --- whole sessions --------------------------------------------------------------------

def _loss_by_student(sessions: list[dict]) -> dict[str, dict[str, Any]]:
    """Sessions merged per student (a rejoin continues the same student's watch)."""
    students: dict[str, dict[str, Any]] = {}
    for s in sessions:
        media = s.get("media") or {}
        if not media.get("exp"):
            continue
        st = students.setdefault(s["student"], {"exp": 0, "lost_raw": 0, "lost_residual": 0, "watch_s": 0.0,
                                                "freeze_s": 0.0, "impaired": False, "room": s["room"]})
        for key in ("exp", "lost_raw", "lost_residual", "watch_s", "freeze_s"):
            st[key] += media.get(key, 0)
        st["impaired"] = st["impaired"] or bool(s.get("drop_every"))
    for st in students.values():
        st["loss_raw_pct"] = 100.0 * st["lost_raw"] / st["exp"]
        st["loss_residual_pct"] = 100.0 * st["lost_residual"] / st["exp"]
        st["freeze_pct"] = 100.0 * st["freeze_s"] / st["watch_s"] if st["watch_s"] else 0.0
    return students


def _dist(values: list[float], digits: int = 3) -> dict[str, Optional[float]]:
    return {"p50": _r(percentile(values, 50), digits), "p95": _r(percentile(values, 95), digits),
            "max": _r(max(values) if values else None, digits), "n": len(values)}


def summarize_live(sessions: list[dict]) -> dict[str, Any]:
    """Joins and media over every session of a run (records from ``harness_worker``)."""
    attempted = [s for s in sessions if s["state"] not in ("scheduled", "not started")]
    joined = [s for s in attempted if s.get("keyframe_s") is not None]
    failures = Counter(_failure_reason(s) for s in attempted if s.get("keyframe_s") is None)
    joins = {
        "attempted": len(attempted), "joined": len(joined), "failed": len(attempted) - len(joined),
        "success_pct": _r(_pct(len(joined), len(attempted))),
        "retried_503": sum(1 for s in attempted if s.get("attempts", 1) > 1),
        "failures": dict(failures.most_common()),
    }
    for key in ("answer_s", "ice_s", "dtls_s", "first_packet_s", "keyframe_s"):
        joins[key] = _dist([s[key] for s in attempted if s.get(key) is not None])
    held = [s for s in sessions if not s.get("drop_every")]
    students = _loss_by_student(sessions)
    judged = [st for st in students.values() if not st["impaired"]]
    hist = merge_histograms((s.get("media") or {}).get("delay_hist", {}) for s in held)
    watch = sum(st["watch_s"] for st in judged)
    media_all = [(s.get("media") or {}) for s in held]
    media = {
        "students": len(judged),
        "loss_raw_pct": _dist([st["loss_raw_pct"] for st in judged]),
        "loss_residual_pct": _dist([st["loss_residual_pct"] for st in judged]),
        "freeze_pct": _r(_pct(sum(st["freeze_s"] for st in judged), watch)),
        "freeze_pct_per_student": _dist([st["freeze_pct"] for st in judged]),
        "freezes": sum(m.get("freezes", 0) for m in media_all),
        "watch_s": round(watch, 1),
        "delay_ms": {"p50": histogram_percentile(hist, 50), "p95": histogram_percentile(hist, 95),
                     "p99": histogram_percentile(hist, 99), "frames": sum(hist.values())},
        "jitter_ms_video": _dist([m["jitter_ms"]["video"] for m in media_all if "video" in m.get("jitter_ms", {})], 2),
        "fps": _dist([m["fps"] for m in media_all if m.get("watch_s", 0) > 2], 2),
        "nacks_sent": sum(m.get("nacks", 0) for m in media_all),
        "packets_nacked": sum(m.get("nacked", 0) for m in media_all),
        "packets_repaired": sum(m.get("repaired", 0) for m in media_all),
        "plis_sent": sum(m.get("plis", 0) for m in media_all),
        "seq_discontinuities": sum(m.get("jumps", 0) for m in media_all),
        "duplicates": sum(m.get("dup", 0) for m in media_all),
    }
    return {"joins": joins, "media": media, "per_student": students}


def _failure_reason(session: dict) -> str:
    failure = session.get("failure") or ""
    if session.get("http_status") and session["http_status"] != 201:
        return f"HTTP {session['http_status']}"
    if "TimeoutError" in failure or "CancelledError" in failure:
        return "timeout"
    if failure:
        return failure.split(":", 1)[0]
    if session.get("dtls_s") is None:
        return "never connected"
    return "no keyframe"


def summarize_impaired(sessions: list[dict]) -> list[dict]:
    """Students on an injected lossy network: what the harness measured against what the
    filter dropped (the ground truth of the loss measurement)."""
    out = []
    for s in sessions:
        if not s.get("drop_every"):
            continue
        media = s.get("media") or {}
        injected = s.get("injected") or {}
        exp = media.get("exp", 0)
        out.append({
            "id": s["id"], "drop_every": s["drop_every"], "expected_loss_pct": round(100.0 / s["drop_every"], 3),
            "injected_drops": injected.get("dropped"), "rtp_seen_by_filter": injected.get("rtp"),
            "measured_loss_raw_pct": _r(_pct(media.get("lost_raw", 0), exp)),
            "measured_loss_residual_pct": _r(_pct(media.get("lost_residual", 0), exp)),
            "packets_repaired": media.get("repaired"), "nacks_sent": media.get("nacks"),
        })
    return out


def summarize_replay(viewers: list[dict]) -> dict[str, Any]:
    attempted = [v for v in viewers if v["state"] not in ("scheduled",)]
    done = [v for v in attempted if v["state"] == "done"]
    startups = [v["startup_s"] for v in attempted if v.get("startup_s") is not None]
    media = sum(v.get("media_s", 0.0) for v in attempted)
    return {
        "viewers": len(attempted), "completed": len(done), "success_pct": _r(_pct(len(done), len(attempted))),
        "startup_s": _dist(startups), "stall_pct": _r(_pct(sum(v["stall_s"] for v in attempted), media)),
        "stalls": sum(v["stalls"] for v in attempted), "bytes": sum(v["bytes"] for v in attempted),
        "segments": sum(v["segments"] for v in attempted),
        "failures": dict(Counter(v["failure"].split(":", 1)[0] for v in attempted if v["state"] == "failed")),
    }


# --- the verdict -----------------------------------------------------------------------

@dataclass
class Check:
    name: str
    target: float
    higher_is_better: bool
    unit: str
    describe: str


CHECKS = {
    "join_success_pct": Check("join_success_pct", 0, True, "%", "joins that reached media"),
    "first_keyframe_p95_s": Check("first_keyframe_p95_s", 0, False, "s", "request to first keyframe, p95"),
    "loss_p95_pct": Check("loss_p95_pct", 0, False, "%", "loss before repair, p95 over students"),
    "residual_loss_p95_pct": Check("residual_loss_p95_pct", 0, False, "%", "loss after NACK repair, p95 over students"),
    "freeze_pct": Check("freeze_pct", 0, False, "%", "frozen video of all watch time"),
    "delay_p95_ms": Check("delay_p95_ms", 0, False, "ms", "teacher-to-student delay of video frames, p95"),
    "teacher_success_pct": Check("teacher_success_pct", 0, True, "%", "teachers who went live"),
    "replay_success_pct": Check("replay_success_pct", 0, True, "%", "replay viewers who played what they asked for"),
    "replay_startup_p95_s": Check("replay_startup_p95_s", 0, False, "s", "replay startup, p95"),
    "replay_stall_pct": Check("replay_stall_pct", 0, False, "%", "stalled replay time of all replay time"),
}
LIVE_CHECKS = ("join_success_pct", "first_keyframe_p95_s", "loss_p95_pct", "residual_loss_p95_pct", "freeze_pct",
               "delay_p95_ms", "teacher_success_pct")
REPLAY_CHECKS = ("replay_success_pct", "replay_startup_p95_s", "replay_stall_pct")


def measured_values(live: Optional[dict], teachers: Optional[list[dict]], replay: Optional[dict]) -> dict:
    values: dict[str, Optional[float]] = {}
    if live is not None:
        values["join_success_pct"] = live["joins"]["success_pct"]
        values["first_keyframe_p95_s"] = live["joins"]["keyframe_s"]["p95"]
        values["loss_p95_pct"] = live["media"]["loss_raw_pct"]["p95"]
        values["residual_loss_p95_pct"] = live["media"]["loss_residual_pct"]["p95"]
        values["freeze_pct"] = live["media"]["freeze_pct"]
        values["delay_p95_ms"] = live["media"]["delay_ms"]["p95"]
    if teachers:
        values["teacher_success_pct"] = _r(_pct(sum(1 for t in teachers if t["live_at"] is not None), len(teachers)))
    if replay is not None:
        values["replay_success_pct"] = replay["success_pct"]
        values["replay_startup_p95_s"] = replay["startup_s"]["p95"]
        values["replay_stall_pct"] = replay["stall_pct"]
    return values


def evaluate(objectives: Objectives, values: dict[str, Optional[float]], live: bool, replay: Optional[str]
             ) -> tuple[str, list[dict]]:
    """(verdict, one row per objective). ``replay`` is None when the run had replay
    viewers, or the reason their objectives were skipped.

    An objective that is set but has nothing measured fails (a run that could not show it
    holds must not pass), unless the part of the scenario it concerns was skipped."""
    rows = []
    for name, check in CHECKS.items():
        target = getattr(objectives, name)
        if target is None:
            continue
        if name in LIVE_CHECKS and not live:
            continue
        row: dict[str, Any] = {"objective": name, "describe": check.describe, "unit": check.unit,
                               "op": ">=" if check.higher_is_better else "<", "target": target,
                               "measured": values.get(name)}
        if name in REPLAY_CHECKS and replay is not None:
            if replay == "not in scenario":
                continue
            row.update(ok=None, status="skipped", note=replay)
        elif row["measured"] is None:
            row.update(ok=False, status="fail", note="nothing measured")
        else:
            ok = row["measured"] >= target if check.higher_is_better else row["measured"] < target
            row.update(ok=ok, status="pass" if ok else "fail")
        rows.append(row)
    judged = [r for r in rows if r["ok"] is not None]
    if not judged:
        return "skipped", rows
    return ("pass" if all(r["ok"] for r in judged) else "fail"), rows


def per_room(sessions: list[dict], teachers: list[dict]) -> list[dict]:
    """A row per room: who joined and how their lesson went."""
    rooms: dict[str, list[dict]] = {}
    for s in sessions:
        rooms.setdefault(s["room"], []).append(s)
    teacher_by_room = {t["room"]: t for t in teachers}
    rows = []
    for room in sorted(set(rooms) | set(teacher_by_room)):
        summary = summarize_live(rooms.get(room, []))
        teacher = teacher_by_room.get(room, {})
        rows.append({"room": room, "teacher": teacher.get("state"), "teacher_connected_in_s": teacher.get("connected_in_s"),
                     "sessions": summary["joins"]["attempted"], "joined": summary["joins"]["joined"],
                     "keyframe_p95_s": summary["joins"]["keyframe_s"]["p95"],
                     "loss_p95_pct": summary["media"]["loss_raw_pct"]["p95"],
                     "freeze_pct": summary["media"]["freeze_pct"],
                     "delay_p95_ms": summary["media"]["delay_ms"]["p95"]})
    return rows


def join_curve(sessions: Iterable[dict], t0: float) -> list[tuple[float, int, int]]:
    """(seconds from t0, joins succeeded so far, joins failed so far), one point per event."""
    events = []
    for s in sessions:
        if s.get("keyframe_at") is not None:
            events.append((s["keyframe_at"] - t0, 1, 0))
        elif s["state"] == "failed" and s.get("requested_at") is not None:
            events.append((s["requested_at"] - t0, 0, 1))
    events.sort()
    ok = bad = 0
    curve = []
    for t, a, b in events:
        ok += a
        bad += b
        curve.append((round(t, 3), ok, bad))
    return curve
