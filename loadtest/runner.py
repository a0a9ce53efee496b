"""The load-test harness: run a scenario against a deployment, sample it, judge it.

    skyclass loadtest SCENARIO --url URL --report DIR [--scale S] [--workers N]

One orchestrating process (this module) and ``--workers`` client processes of simulated
students plus one process of simulated teachers (:mod:`harness_worker`). The orchestrator
turns the scenario into a schedule (who publishes, joins, drops, rejoins and replays
when), hands every process its part with times on the shared monotonic clock, then only
samples: every ``sample_interval`` it collects the students' counters, the server's
``/metrics`` and, when the server runs on this machine, its process tree's CPU and memory
from ``/proc``. At the end every process returns its sessions' records, and
:mod:`analysis` turns them into figures and a verdict, :mod:`report` into files.

With ``--url local`` (the default) the harness starts ``skyclass serve`` itself on a free
port (media on 127.0.0.1 only) and stops it afterwards; ``--nodes N`` starts N of them on a
throwaway Redis (a cluster), and ``--url A,B,…`` names the nodes of a deployment. Students
and teachers are spread over the nodes round robin, as a load balancer would.
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from skyclass.server.tokens import issue_token

from . import analysis, light_clients
from .common import (ROOT, PipeProcess, RedisServer, ServerProcess, find_listening_pid, machine_busy_seconds,
                     process_tree_cpu_seconds, process_tree_rss_bytes, scrape_metrics)
from .harness_worker import harness_worker_main
from .scenario import Scenario, Teacher, join_offsets

logger = logging.getLogger(__name__)

LOCAL = ("", "local")


class HarnessError(RuntimeError):
    """The run could not be carried out (bad target, missing secret, crashed clients)."""


@dataclass
class Options:
    scenario: Scenario
    report_dir: Path
    url: str = "local"
    secret: Optional[str] = None
    scale: float = 1.0
    workers: int = 2
    room_prefix: str = "lt-"
    server_workers: Optional[int] = None
    max_viewers_per_worker: Optional[int] = None
    nodes: int = 1  # with url "local": servers started, sharing a throwaway Redis when more than one
    seed: int = 1
    progress: Optional[Callable[[dict, dict], None]] = None  # (timeline row, context) -> None
    say: Callable[[str], None] = field(default=lambda text: logger.info("%s", text))


# --- the server under test ---------------------------------------------------------------

class Node:
    """One server of the target: its URL and, when it runs on this machine, its process."""

    def __init__(self, url: str, server: Optional[ServerProcess] = None) -> None:
        self.url = url.rstrip("/")
        self.server = server
        self.pid: Optional[int] = server.pid if server else None
        host = urllib.parse.urlsplit(self.url).hostname or ""
        self.same_machine = host in ("127.0.0.1", "localhost", "::1")
        if self.pid is None and self.same_machine:
            port = urllib.parse.urlsplit(self.url).port or 80
            self.pid = find_listening_pid(port)


class Target:
    """Where the load goes: a deployment by URL (or several nodes of one, comma-separated), or
    servers this harness started.

    Tokens are signed with the deployment's secret (``--secret`` or ``SKYCLASS_SECRET``):
    the harness needs nothing else from it. With several nodes, students and teachers are
    spread over them as a load balancer would (the nodes relay each room among themselves),
    and the server figures are the sum over the nodes. A node on this machine has its CPU and
    memory read from ``/proc`` (its pid found by the port it listens on)."""

    def __init__(self, nodes: list[Node], secret: str, redis: Optional[RedisServer] = None) -> None:
        self.nodes = nodes
        self.secret = secret
        self.redis = redis
        self.data_dirs: list[Path] = []
        self._description: Optional[dict[str, Any]] = None

    @property
    def url(self) -> str:
        """The first node: where one-off requests go (they answer for the whole deployment)."""
        return self.nodes[0].url

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def url_for(self, index: int) -> str:
        """The node the ``index``-th student (or teacher) reaches: round robin."""
        return self.nodes[index % len(self.nodes)].url

    @property
    def server(self) -> Optional[ServerProcess]:
        return self.nodes[0].server

    @property
    def pid(self) -> Optional[int]:
        return self.nodes[0].pid

    @property
    def same_machine(self) -> bool:
        return all(node.same_machine for node in self.nodes)

    @classmethod
    def open(cls, options: Options, say: Callable[[str], None]) -> "Target":
        if options.url.strip().lower() in LOCAL:
            secret = options.secret or secrets.token_urlsafe(32)
            extra = []
            settings = options.scenario.run
            workers = options.server_workers if options.server_workers is not None else settings.server_workers
            if workers is not None:
                extra += ["--workers", str(workers)]
            cap = options.max_viewers_per_worker or settings.max_viewers_per_worker
            if cap is not None:
                extra += ["--max-viewers-per-worker", str(cap)]
            redis = RedisServer() if options.nodes > 1 else None
            target = cls([], secret, redis)
            try:
                for i in range(options.nodes):
                    data = Path(tempfile.mkdtemp(prefix="skyclass-loadtest-server-"))
                    node_flags = ["--redis", redis.url, "--node-id", f"lt-node-{i}"] if redis is not None else []
                    server = ServerProcess("skyclass", data, secret, extra + node_flags)
                    say(f"started a local server: {server.url} (pid {server.pid}, data {data})")
                    target.nodes.append(Node(server.url, server))
                    target.data_dirs.append(data)
            except Exception:
                target.close()
                raise
            return target
        secret = options.secret or os.environ.get("SKYCLASS_SECRET", "")
        if not secret:
            raise HarnessError("a remote target needs its token secret: --secret S or SKYCLASS_SECRET")
        target = cls([Node(url) for url in options.url.split(",") if url.strip()], secret)
        for node in target.nodes:
            try:
                with urllib.request.urlopen(node.url + "/healthz", timeout=10) as resp:
                    resp.read()
            except (OSError, urllib.error.URLError) as exc:
                raise HarnessError(f"{node.url}/healthz: {exc}") from exc
        return target

    def host_addresses(self) -> Optional[list[str]]:
        """ICE host candidates for the simulated clients: loopback only against servers on
        this machine (media never leaves 127.0.0.1 then), the machine's interfaces against a
        deployment elsewhere."""
        return ["127.0.0.1"] if self.same_machine else None

    def token(self, role: str, room: str, name: str, ttl: int) -> str:
        return issue_token(self.secret, role, room, name, ttl)

    def cpu_seconds(self) -> Optional[float]:
        """CPU of every node's process tree, summed (None if a node's is unknown)."""
        total = 0.0
        for node in self.nodes:
            if node.pid is None:
                return None
            used = process_tree_cpu_seconds(node.pid)
            if not used:
                return None
            total += sum(used.values())
        return total

    def rss_bytes(self) -> Optional[int]:
        sizes = [process_tree_rss_bytes(node.pid) if node.pid is not None else None for node in self.nodes]
        return None if any(size is None for size in sizes) else sum(sizes)  # type: ignore[misc]

    def metrics(self) -> dict[str, float]:
        """Every node's ``/metrics``, summed (counters and gauges alike: each node counts its own)."""
        total: dict[str, float] = {}
        for node in self.nodes:
            try:
                values = scrape_metrics(node.url, timeout=5)
            except (OSError, urllib.error.URLError, ValueError) as exc:
                logger.warning("scraping %s/metrics failed: %s", node.url, exc)
                continue
            for name, value in values.items():
                total[name] = total.get(name, 0.0) + value
        return total

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as resp:
            return json.loads(resp.read())

    def describe(self) -> dict[str, Any]:
        """What the target is; read once while it runs (a started server is gone when the report is built)."""
        if self._description is None:
            self._description = self._describe()
        return self._description

    def _describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"url": self.url, "started_by_harness": self.server is not None,
                                "same_machine": self.same_machine, "server_pid": self.pid}
        if len(self.nodes) > 1:
            info["nodes"] = [{"url": node.url, "server_pid": node.pid} for node in self.nodes]
        workers = 0
        for node in self.nodes:
            try:
                with urllib.request.urlopen(node.url + "/readyz", timeout=10) as resp:
                    workers += len(json.loads(resp.read()).get("workers", []))
            except (OSError, urllib.error.URLError, ValueError):
                pass  # /readyz answers 503 when full: not an error for a description
        if workers:
            info["fan_out_workers"] = workers
        return info

    def close(self, keep_log: Optional[Path] = None) -> None:
        for i, node in enumerate(self.nodes):
            if node.server is None:
                continue
            node.server.stop()
            if keep_log is not None and node.server.log_path.exists():
                name = keep_log.name if i == 0 else f"{keep_log.stem}-node{i}{keep_log.suffix}"
                shutil.copy(node.server.log_path, keep_log.with_name(name))
        for data in self.data_dirs:
            shutil.rmtree(data, ignore_errors=True)
        if self.redis is not None:
            self.redis.stop()
            self.redis = None


# --- the teacher's clip ---------------------------------------------------------------------

def ensure_clip(teacher: Teacher) -> Path:
    """The teacher's clip for these settings, encoded once per machine and cached (libx264
    takes seconds; a run should not pay that every time)."""
    cache = Path(tempfile.gettempdir()) / "skyclass-loadtest"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / (f"clip-{teacher.width}x{teacher.height}-{teacher.fps}fps-{teacher.bitrate}bps-"
                    f"{teacher.clip_seconds}s-gop{teacher.gop_seconds}.h264")
    if not path.exists() or path.stat().st_size == 0:
        partial = path.with_suffix(f".{os.getpid()}.partial")
        light_clients.make_h264_clip(partial, teacher.width, teacher.height, teacher.fps, teacher.clip_seconds,
                                     teacher.bitrate, teacher.gop_seconds)
        os.replace(partial, path)
    return path


# --- the schedule --------------------------------------------------------------------------

@dataclass
class Plan:
    """Who does what when, in seconds from the run's t0 (tokens included)."""

    lessons: list[dict] = field(default_factory=list)
    sessions: list[dict] = field(default_factory=list)
    viewers: list[dict] = field(default_factory=list)
    rooms: list[dict] = field(default_factory=list)
    impaired: set[str] = field(default_factory=set)
    steady: tuple[float, float] = (0.0, 0.0)
    end: float = 0.0

    def describe(self) -> dict[str, Any]:
        return {"rooms": self.rooms, "teachers": len(self.lessons), "students": len({s["student"] for s in self.sessions}),
                "sessions": len(self.sessions), "rejoins": sum(1 for s in self.sessions if s.get("rejoin")),
                "impaired_students": len({s["student"] for s in self.sessions if s.get("drop_every")}),
                "replay_viewers": len(self.viewers), "steady_state_s": list(self.steady), "duration_s": self.end}


def build_plan(scenario: Scenario, scale: float, target: Target, prefix: str, rng: random.Random,
               recordings: Optional[list[dict]] = None) -> Plan:
    """Turn the scenario at ``scale`` into a schedule."""
    plan = Plan()
    ttl = int(scenario.duration() + 3600)
    steady_starts, steady_ends = [], []
    impairments = {}
    for impairment in scenario.impairments:
        room = impairment.room or (scenario.rooms[0].room_names(1)[0] if scenario.rooms else "")
        impairments[room] = impairment
    for group in scenario.rooms:
        rooms, per_room = scenario.scaled_rooms(group, scale)
        names = group.room_names(rooms)
        end = group.start + group.lesson
        steady_starts.append(group.start + group.teacher_lead + group.ramp + 3.0)
        steady_ends.append(end - 1.0)
        churners = set(rng.sample(range(rooms * per_room), int(round(rooms * per_room * group.churn_pct / 100))))
        for r, name in enumerate(names):
            room = prefix + name
            plan.rooms.append({"room": room, "group": group.name, "students": per_room})
            plan.lessons.append({"room": room, "token": target.token("teacher", room, f"teacher-{name}", ttl),
                                 "at": group.start, "until": end + 0.5})
            impairment = impairments.get(name) or impairments.get(room)
            for i, offset in enumerate(join_offsets(group, per_room, rng)):
                student = f"{room}/s{i}"
                join = group.start + group.teacher_lead + offset
                drop_every = impairment.drop_every if impairment and i < impairment.students else 0
                session = {"id": student, "student": student, "room": room, "join_at": join, "leave_at": end,
                           "leave_mode": "end", "drop_every": drop_every,
                           "token": target.token("student", room, student, ttl)}
                plan.sessions.append(session)
                if drop_every:
                    plan.impaired.add(student)
                if r * per_room + i in churners:
                    earliest, latest = join + 5.0, end - group.rejoin_after - 6.0
                    if latest <= earliest:
                        continue  # the lesson is too short to drop and come back: stays
                    leave = rng.uniform(earliest, latest)
                    session.update(leave_at=leave, leave_mode=group.churn_mode)
                    rejoin = dict(session, id=student + "#2", join_at=leave + group.rejoin_after, leave_at=end,
                                  leave_mode="end", rejoin=True, token=target.token("student", room, student, ttl))
                    plan.sessions.append(rejoin)
                    if drop_every:
                        plan.impaired.add(rejoin["id"])
    for group in scenario.replay:
        if not recordings:
            break
        count = scenario.scaled_viewers(group, scale)
        for i in range(count):
            recording = recordings[i % len(recordings)]
            plan.viewers.append({"id": f"{group.name}/v{i}", "recording": recording["id"],
                                 "playlist": recording["playlist"], "watch": group.watch,
                                 "buffer_ahead": group.buffer_ahead, "at": group.start + group.ramp * (i + 0.5) / count})
    plan.sessions.sort(key=lambda s: s["join_at"])
    plan.steady = (max(steady_starts, default=0.0), min(steady_ends, default=0.0))
    plan.end = scenario.duration()
    return plan


# --- client processes ------------------------------------------------------------------------

class ClientPool:
    """``workers`` student processes and one teacher process, all :func:`harness_worker_main`."""

    def __init__(self, workers: int, host_addresses: Optional[list[str]]) -> None:
        self.students = [PipeProcess(harness_worker_main, i, host_addresses) for i in range(max(1, workers))]
        self.teacher = PipeProcess(harness_worker_main, -1, host_addresses)
        self.all = self.students + [self.teacher]

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until every process has booted (imports take a second or two each)."""
        for process in self.all:
            process.call("sample", timeout=timeout)

    def schedule(self, url: str, t0: float, plan: Plan, clip: Path, scenario: Scenario) -> None:
        settings = scenario.run
        if plan.lessons:
            lessons = [dict(l, at=t0 + l["at"], until=t0 + l["until"]) for l in plan.lessons]
            self.teacher.call("teach", url=url, clip=str(clip), fps=scenario.teacher.fps, lessons=lessons)
        shares: list[list[dict]] = [[] for _ in self.students]
        for i, session in enumerate(plan.sessions):
            spec = dict(session, join_at=t0 + session["join_at"], leave_at=t0 + session["leave_at"])
            shares[i % len(self.students)].append(spec)
        for process, share in zip(self.students, shares):
            process.send("live", url=url, sessions_=share, timeout=settings.join_timeout,
                         concurrency=settings.join_concurrency, feedback=settings.feedback)
        for process in self.students:
            process.reply(60)
        if plan.viewers:
            vshares: list[list[dict]] = [[] for _ in self.students]
            for i, viewer in enumerate(plan.viewers):
                vshares[i % len(self.students)].append(dict(viewer, at=t0 + viewer["at"]))
            for process, share in zip(self.students, vshares):
                process.call("replay", url=url, viewers_=share)

    def add_sessions(self, url: str, sessions: list[dict], settings: Any) -> None:
        """More students into a running pool (the capacity finder's steps)."""
        shares: list[list[dict]] = [[] for _ in self.students]
        for i, session in enumerate(sessions):
            shares[i % len(self.students)].append(session)
        for process, share in zip(self.students, shares):
            process.send("live", url=url, sessions_=share, timeout=settings.join_timeout,
                         concurrency=settings.join_concurrency, feedback=settings.feedback)
        for process in self.students:
            process.reply(60)

    def sample(self) -> tuple[list[dict], dict]:
        for process in self.all:
            process.send("sample")
        replies = [process.reply(60) for process in self.all]
        return replies[:-1], replies[-1]

    def finish(self, timeout: float = 120.0) -> tuple[list[dict], list[dict], list[dict], float]:
        """(live session records, teacher records, replay records, client CPU seconds)."""
        for process in self.students:
            process.send("finish")
        replies = [process.reply(timeout) for process in self.students]
        teacher = self.teacher.call("finish", timeout=timeout)
        live = [r for reply in replies for r in reply["live"]]
        replay = [r for reply in replies for r in reply["replay"]]
        return live, teacher["teachers"], replay, sum(r["cpu"] for r in replies)

    def stop(self) -> None:
        for process in self.all:
            process.stop()


def take_snapshot(pool: ClientPool, target: Target) -> analysis.Snapshot:
    workers, teacher = pool.sample()
    now = time.monotonic()
    t = os.times()
    metrics = target.metrics()
    cpu = target.cpu_seconds()
    if cpu is None:  # a remote server: its CPU only if its /metrics exports the standard process counter
        cpu = metrics.get("process_cpu_seconds_total")
    return analysis.Snapshot(time=now, workers=workers, teacher=teacher, server_cpu=cpu,
                             server_rss=target.rss_bytes(), metrics=metrics, machine=machine_busy_seconds(),
                             own_cpu=t.user + t.system)


# --- replay preparation ------------------------------------------------------------------------

def playable_recordings(target: Target) -> list[dict]:
    """Finished recordings with segments (a replay of a lesson still being recorded is a
    live-edge HLS client, a different load)."""
    try:
        recordings = target.get_json("/api/recordings").get("recordings", [])
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return []  # a server without replay
        raise
    return [r for r in recordings if r.get("state") in ("complete", "repaired") and r.get("segments", 0) > 0]


def prepare_recordings(target: Target, pool: ClientPool, scenario: Scenario, clip: Path, prefix: str,
                       say: Callable[[str], None]) -> tuple[list[dict], Optional[str]]:
    """(recordings to replay, or the reason the replay part is skipped). A server the
    harness started has none yet: it records a short lesson first."""
    recordings = playable_recordings(target)
    if recordings or not scenario.replay:
        return recordings, None
    if target.server is None:
        return [], "the server has no recordings"
    seconds = max(g.prepare_lesson for g in scenario.replay)
    room = prefix + "replay-prep"
    say(f"no recordings yet: recording a {seconds:.0f} s lesson in {room} first")
    now = time.monotonic()
    pool.teacher.call("teach", url=target.url, clip=str(clip), fps=scenario.teacher.fps,
                      lessons=[{"room": room, "token": target.token("teacher", room, "teacher-prep", 3600),
                                "at": now, "until": now + seconds}])
    deadline = now + seconds + 30
    while time.monotonic() < deadline:
        time.sleep(1.0)
        recordings = playable_recordings(target)
        if recordings:
            return recordings, None
    return [], "the server recorded nothing playable from the preparation lesson"


# --- the run -------------------------------------------------------------------------------------

def _code_version() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return {"commit": commit or None}


def run_scenario(options: Options) -> dict[str, Any]:
    """Run ``options.scenario`` and return the report (also written by :mod:`report`)."""
    scenario = options.scenario
    say = options.say
    rng = random.Random(options.seed)
    options.report_dir.mkdir(parents=True, exist_ok=True)
    target = Target.open(options, say)
    pool: Optional[ClientPool] = None
    started = time.time()
    try:
        target.describe()
        clip = ensure_clip(scenario.teacher)
        pool = ClientPool(options.workers, target.host_addresses())
        pool.wait_ready()
        recordings, replay_skip = prepare_recordings(target, pool, scenario, clip, options.room_prefix, say)
        if not scenario.replay:
            replay_skip = "not in scenario"
        elif replay_skip:
            say(f"replay part skipped: {replay_skip}")
        plan = build_plan(scenario, options.scale, target, options.room_prefix, rng, recordings)
        say(f"{scenario.name} at scale {options.scale:g}: {len(plan.lessons)} teachers, "
            f"{len({s['student'] for s in plan.sessions})} students ({len(plan.sessions)} sessions), "
            f"{len(plan.viewers)} replay viewers, {plan.end:.0f} s; {len(pool.students)} client processes")
        t0 = time.monotonic() + 1.0
        if len(target.nodes) > 1:  # spread as a load balancer would: the nodes relay rooms among themselves
            for i, lesson in enumerate(plan.lessons):
                lesson["url"] = target.url_for(i)
            for i, session in enumerate(plan.sessions):
                session["url"] = target.url_for(i)
        if plan.lessons or plan.sessions or plan.viewers:
            pool.schedule(target.url, t0, plan, clip, scenario)
            timeline = sample_until(pool, target, t0, plan.end + scenario.run.drain, scenario.run.sample_interval,
                                    plan, options)
        else:
            timeline = []  # everything was skipped: nothing to wait for
        live, teachers, viewers, _ = pool.finish()
    finally:
        if pool is not None:
            pool.stop()
        target.close(keep_log=options.report_dir / "server.log")
    return build_report(options, target, plan, timeline, live, teachers, viewers, replay_skip, t0, started)


def sample_until(pool: ClientPool, target: Target, t0: float, duration: float, interval: float, plan: Plan,
                 options: Options) -> list[dict]:
    """Sample every ``interval`` seconds from t0 until t0 + duration; the timeline."""
    cores = os.cpu_count() or 1
    timeline: list[dict] = []
    time.sleep(max(0.0, t0 - time.monotonic()))
    previous = take_snapshot(pool, target)
    tick = t0
    context = {"duration": duration, "sessions": len(plan.sessions), "viewers": len(plan.viewers)}
    while True:
        tick += interval
        if tick > t0 + duration + 1e-6:
            break
        time.sleep(max(0.0, tick - time.monotonic()))
        current = take_snapshot(pool, target)
        row = analysis.window_stats(previous, current, t0, cores, plan.impaired)
        timeline.append(row)
        if options.progress:
            options.progress(row, context)
        previous = current
        if not plan.sessions and plan.viewers and row.get("replay_done", 0) + row.get("replay_failed", 0) \
                >= len(plan.viewers):
            break  # a replay-only run is over when every viewer is
    return timeline


def build_report(options: Options, target: Target, plan: Plan, timeline: list[dict], live: list[dict],
                 teachers: list[dict], viewers: list[dict], replay_skip: Optional[str], t0: float,
                 started: float) -> dict[str, Any]:
    scenario = options.scenario
    summary: dict[str, Any] = {}
    live_summary = analysis.summarize_live(live) if plan.sessions else None
    per_student = live_summary.pop("per_student") if live_summary else {}
    replay_summary = analysis.summarize_replay(viewers) if viewers else None
    if live_summary:
        summary.update(live_summary)
    if teachers:
        summary["teachers"] = {"scheduled": len(teachers), "live": sum(1 for t in teachers if t["live_at"] is not None),
                               "connected_in_s": analysis._dist([t["connected_in_s"] for t in teachers
                                                                 if t["connected_in_s"] is not None])}
    if replay_summary:
        summary["replay"] = replay_summary
    rows = analysis.steady_rows(timeline, *plan.steady)
    summary["cost"] = analysis.cost_per_student(rows)
    server_rows = [r for r in timeline if r.get("server_cpu") is not None]
    summary["server"] = {
        "cpu_cores_max": max((r["server_cpu"] for r in server_rows), default=None),
        "rss_mb_max": max((r.get("server_rss_mb") or 0 for r in timeline), default=None) or None,
        "pps_out_max": max((r.get("server_pps_out") or 0 for r in timeline), default=None) or None,
        "viewers_max": max((r.get("server_viewers") or 0 for r in timeline), default=None) or None,
        "nacks_received": round(sum((r.get("server_nacks") or 0) * options.scenario.run.sample_interval
                                    for r in timeline)),
        "retransmissions": round(sum((r.get("server_retransmissions") or 0) * options.scenario.run.sample_interval
                                     for r in timeline)),
        "dropped_slow_viewer": round(sum((r.get("server_dropped_slow") or 0) * options.scenario.run.sample_interval
                                         for r in timeline)),
        "cpu_source": ("/proc (server on this machine)" if target.pid else
                       "/metrics process_cpu_seconds_total" if server_rows else
                       "unavailable (remote server whose /metrics has no process_cpu_seconds_total)"),
    }
    summary["harness"] = {"client_processes": options.workers,
                          "client_lag_ms_max": max((r["client_lag_ms"] or 0 for r in timeline), default=None),
                          "machine_busy_cores_max": max((r["machine_busy_cores"] for r in timeline), default=None)}
    values = analysis.measured_values(live_summary, teachers if plan.lessons else None, replay_summary)
    has_replay = bool(viewers)
    verdict, objectives = analysis.evaluate(scenario.objectives, values, bool(plan.sessions),
                                            None if has_replay else (replay_skip or "no replay viewers"))
    notes = []
    lag = summary["harness"]["client_lag_ms_max"] or 0
    if lag > 200:
        notes.append(f"the harness's own event loop lagged up to {lag:.0f} ms: delays and join times include "
                     "client-side waiting (add --workers or a load machine)")
    cores = os.cpu_count() or 1
    saturated = [r for r in timeline if r["machine_busy_cores"] >= 0.95 * cores]
    if len(saturated) >= max(2, 0.1 * len(timeline)):
        notes.append(f"this machine's CPU was saturated (>= 95 % of {cores} cores busy) in {len(saturated)} of "
                     f"{len(timeline)} samples, other processes included: server and simulated clients were starved "
                     "for CPU then, so failures there may be the machine's rather than the server's")
    cost = summary["cost"]
    if cost.get("client_cpu_per_student_pct") and cost.get("server_cpu_per_student_pct"):
        if cost["client_cpu_per_student_pct"] > cost["server_cpu_per_student_pct"]:
            notes.append("the simulated students cost more CPU per student than the server: on a shared machine "
                         "the harness, not the server, may be the limit")
    if replay_skip and scenario.replay:
        notes.append(f"replay part skipped: {replay_skip}")
    sessions_out = []
    for s in live:
        media = dict(s.get("media") or {})
        media.pop("delay_hist", None)
        sessions_out.append(dict(s, media=media))
    report: dict[str, Any] = {
        "tool": "skyclass loadtest",
        "scenario": {"name": scenario.name, "description": scenario.description, "path": scenario.path,
                     "scale": options.scale, "full_size_students": scenario.full_size_students(),
                     "objectives": asdict(scenario.objectives)},
        "plan": plan.describe(),
        "target": target.describe(),
        "machine": {"cores": os.cpu_count(), "loadavg_end": list(os.getloadavg())},
        "code": _code_version(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_s": round(time.time() - started, 1),
        "verdict": verdict,
        "objectives": objectives,
        "summary": summary,
        "impaired": analysis.summarize_impaired(live),
        "rooms": analysis.per_room(live, teachers),
        "joins_curve": analysis.join_curve(live, t0),
        "timeline": timeline,
        "teachers": teachers,
        "sessions": sessions_out,
        "students": [{"student": k, **{kk: (round(vv, 4) if isinstance(vv, float) else vv)
                                       for kk, vv in v.items()}} for k, v in sorted(per_student.items())],
        "replay_viewers": viewers,
        "notes": notes,
    }
    return report
