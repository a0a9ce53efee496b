"""Classroom events benchmark: websocket latency at 1,000 clients, presence + chat cost at 5,000.

    python -m skyclass.loadtest.ws_bench [--clients 1000] [--questions 300] [--question-seconds 15]
                                         [--lesson 5000] [--window 20] [--idle-window 10]
                                         [--chat-rate 1] [--churn 5] [--procs N] [--store memory|redis]

Two phases against ``skyclass serve`` started as a subprocess (``--workers 0``: only the front
process, which is where the websockets live; in-process state by default, a fresh local
``redis-server`` with ``--store redis``):

1. **latency**: ``--clients`` websockets in one room outside the timetable (a qa room): one
   teacher, the rest students. ``--questions`` students each ask one question, spread evenly
   over ``--question-seconds``; the question carries its send time (same machine, same
   clock) and the teacher's client records when it arrives: p50/p95/p99/max.
2. **lesson**: a timetabled "lesson" room and ``--lesson`` students plus the teacher. After
   everyone joined and the presence settled, the server's CPU (utime + stime from
   ``/proc/PID/stat``) is measured over ``--idle-window`` seconds with nothing happening
   (the cost of keeping the connections), then over two windows of ``--window`` seconds
   while ``--churn`` students per second leave and come back (every leave/join changes the
   presence, which the server aggregates and announces at most twice a second to staff and
   every 30 s to students of a big room): first while the students chat ``--chat-rate``
   messages per second between them (the lesson's chat: in a lesson room it goes to the
   staff), then — the worst case — while the teacher chats ``--chat-rate`` messages per
   second to everyone. Clients count the chat messages they receive (delivery).

Clients are plain aiohttp websockets spread over ``--procs`` processes (they count messages
without decoding them, except the teacher's, which times questions), so the load generator
stays light. It prints a table and, last, one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import secrets
import shutil
import signal
import socket
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

from .common import RedisServer, ServerProcess

TARGET_P95_MS = 200.0
TARGET_CPU_PCT = 10.0
CONNECT_CONCURRENCY = 200


# ---------------------------------------------------------------------------------------------
# client processes


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class _Clients:
    """The websockets of one client process and what they received."""

    def __init__(self, url: str, secret: str) -> None:
        import aiohttp

        self.aiohttp = aiohttp
        self.url = url
        self.secret = secret
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True),
                                          timeout=aiohttp.ClientTimeout(total=60))
        self.sockets: dict[str, Any] = {}
        self.readers: dict[str, asyncio.Task[None]] = {}
        self.counts = {"chat": 0, "presence": 0, "question": 0, "error": 0, "other": 0, "closed": 0}
        self.latencies: list[float] = []
        self.teacher_name: Optional[str] = None

    def token(self, role: str, room: str, name: str) -> str:
        from skyclass.server.tokens import issue_token

        return issue_token(self.secret, role, room, name, 4 * 3600)

    async def _read(self, name: str, ws: Any) -> None:
        timing = name == self.teacher_name
        try:
            async for message in ws:
                if message.type != self.aiohttp.WSMsgType.TEXT:
                    continue
                data = message.data
                if timing and '"type":"question"' in data:
                    arrived = time.time()
                    text = json.loads(data)["question"]["text"]
                    self.latencies.append(arrived - float(text.rsplit(" ", 1)[1]))
                    self.counts["question"] += 1
                elif '"type":"chat"' in data[:20]:
                    self.counts["chat"] += 1
                elif '"type":"presence"' in data[:20]:
                    self.counts["presence"] += 1
                elif '"type":"error"' in data[:20]:
                    self.counts["error"] += 1
                else:
                    self.counts["other"] += 1
        except Exception:
            pass
        finally:
            self.counts["closed"] += 1

    async def open(self, role: str, room: str, name: str) -> bool:
        try:
            ws = await self.http.ws_connect(f"{self.url}/ws/{room}?token={self.token(role, room, name)}",
                                            heartbeat=None, autoping=True, compress=0)
        except Exception:
            return False
        self.sockets[name] = ws
        self.readers[name] = asyncio.ensure_future(self._read(name, ws))
        return True

    async def shut(self, name: str) -> None:
        ws = self.sockets.pop(name, None)
        if ws is not None:
            await ws.close()
        reader = self.readers.pop(name, None)
        if reader is not None:
            await asyncio.wait([reader], timeout=2)

    async def connect(self, role: str, room: str, names: list[str]) -> dict:
        started = time.monotonic()
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def one(name: str) -> bool:
            async with gate:
                return await self.open(role, room, name)

        results = await asyncio.gather(*(one(n) for n in names))
        return {"connected": sum(results), "failed": len(results) - sum(results),
                "seconds": time.monotonic() - started}

    async def ask(self, schedule: list[tuple[str, float]]) -> dict:
        start = time.monotonic()
        sent = 0
        for name, at in sorted(schedule, key=lambda x: x[1]):
            delay = start + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            ws = self.sockets.get(name)
            if ws is None:
                continue
            await ws.send_str(json.dumps({"type": "question", "text": f"bench {name} {time.time():.6f}"}))
            sent += 1
        return {"asked": sent}

    async def chat(self, name: str, rate: float, seconds: float) -> dict:
        ws = self.sockets[name]
        start, sent = time.monotonic(), 0
        if rate <= 0:
            await asyncio.sleep(seconds)
            return {"sent": 0}
        while time.monotonic() - start < seconds:
            await ws.send_str(json.dumps({"type": "chat", "text": f"announcement {sent}"}))
            sent += 1
            await asyncio.sleep(max(0.0, start + sent / rate - time.monotonic()))
        return {"sent": sent}

    async def student_chat(self, rate: float, seconds: float) -> dict:
        """This process's students chat, ``rate`` messages per second between them (each a
        different student in turn, so none hits the per-student rate limit)."""
        names = [n for n in self.sockets if n != self.teacher_name]
        start, sent = time.monotonic(), 0
        if rate <= 0 or not names:
            await asyncio.sleep(seconds)
            return {"sent": 0}
        while time.monotonic() - start < seconds:
            ws = self.sockets.get(names[sent % len(names)])
            if ws is not None and not ws.closed:
                await ws.send_str(json.dumps({"type": "chat", "text": f"student says {sent}"}))
            sent += 1
            await asyncio.sleep(max(0.0, start + sent / rate - time.monotonic()))
        return {"sent": sent}

    async def churn(self, room: str, rate: float, seconds: float) -> dict:
        """Every 1/rate s one student leaves and comes straight back (a join and a leave)."""
        names = [n for n in self.sockets if n != self.teacher_name]
        start, done, i = time.monotonic(), 0, 0
        while names and time.monotonic() - start < seconds:
            name = names[i % len(names)]
            i += 1
            await self.shut(name)
            await self.open("student", room, name)
            done += 1
            await asyncio.sleep(max(0.0, start + done / rate - time.monotonic()))
        return {"churned": done}

    def stats(self) -> dict:
        return {"open": len(self.sockets), **self.counts, "latencies": list(self.latencies)}

    def reset(self) -> None:
        for key in self.counts:
            self.counts[key] = 0
        self.latencies.clear()

    async def close(self) -> None:
        await asyncio.gather(*(ws.close() for ws in self.sockets.values()), return_exceptions=True)
        for reader in self.readers.values():
            reader.cancel()
        await self.http.close()


def client_main(conn: Any, url: str, secret: str) -> None:
    """A client process: runs commands from the pipe until "close"."""
    _raise_fd_limit()
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        clients = _Clients(url, secret)
        while True:
            cmd = await loop.run_in_executor(None, conn.recv)
            op = cmd.pop("op")
            if op == "close":
                await clients.close()
                conn.send({"closed": True})
                return
            if op == "teacher":
                clients.teacher_name = cmd["name"]
                reply: Any = await clients.connect("teacher", cmd["room"], [cmd["name"]])
            elif op == "connect":
                reply = await clients.connect(cmd.get("role", "student"), cmd["room"], cmd["names"])
            elif op == "start":  # long-running jobs, run together: answer when all are done
                jobs = cmd.get("jobs") or [cmd]
                reply = await asyncio.gather(*(getattr(clients, job.pop("what"))(**job) for job in jobs))
                if "jobs" not in cmd:
                    reply = reply[0]
            elif op == "stats":
                reply = clients.stats()
            elif op == "reset":
                clients.reset()
                reply = {}
            elif op == "shut_all":
                await asyncio.gather(*(clients.shut(n) for n in list(clients.sockets)))
                reply = {}
            else:
                reply = {"error": f"unknown op {op}"}
            conn.send(reply)

    asyncio.run(run())


class ClientProc:
    def __init__(self, url: str, secret: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=client_main, args=(child, url, secret), daemon=True)
        self.proc.start()

    def send(self, op: str, **kwargs: Any) -> None:
        self.conn.send({"op": op, **kwargs})

    def reply(self, timeout: float = 600) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError("client process did not answer")
        return self.conn.recv()

    def call(self, op: str, **kwargs: Any) -> Any:
        self.send(op, **kwargs)
        return self.reply()

    def stop(self) -> None:
        try:
            self.call("close")
        except Exception:
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()


def broadcast(procs: list[ClientProc], op: str, per_proc: list[dict]) -> list[Any]:
    for proc, kwargs in zip(procs, per_proc):
        proc.send(op, **kwargs)
    return [proc.reply() for proc in procs]


# ---------------------------------------------------------------------------------------------
# the server and measurements


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of ``pid`` (all threads) from /proc, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all threads)."""
    return sum(cpu_times(pid))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], p: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def _api(url: str, token: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


def _split(names: list[str], parts: int) -> list[list[str]]:
    return [names[i::parts] for i in range(parts)]


def _server_cpu_window(server: ServerProcess, seconds: float) -> tuple[float, float]:
    """(server CPU seconds, wall seconds) over a window of ``seconds``."""
    c0, t0 = cpu_seconds(server.proc.pid), time.monotonic()
    time.sleep(seconds)
    return cpu_seconds(server.proc.pid) - c0, time.monotonic() - t0


def run_latency(server: ServerProcess, procs: list[ClientProc], teacher: ClientProc, args: argparse.Namespace) -> dict:
    room = f"bench-qa-{secrets.token_hex(2)}"
    teacher.call("teacher", room=room, name="Teacher")
    students = [f"s{i}" for i in range(args.clients - 1)]
    started = time.monotonic()
    joined = broadcast(procs, "connect", [{"room": room, "names": part} for part in _split(students, len(procs))])
    connect_s = time.monotonic() - started
    connected = 1 + sum(r["connected"] for r in joined)
    time.sleep(args.settle)
    teacher.call("reset")
    askers = students[: args.questions]
    spacing = args.question_seconds / max(1, len(askers))
    schedule = {name: i * spacing for i, name in enumerate(askers)}
    c0, t0 = cpu_seconds(server.proc.pid), time.monotonic()
    sent = broadcast(procs, "start", [{"what": "ask", "schedule": [(n, schedule[n]) for n in part if n in schedule]}
                                      for part in _split(students, len(procs))])
    asked = sum(r["asked"] for r in sent)
    deadline = time.monotonic() + 10
    stats = teacher.call("stats")
    while len(stats["latencies"]) < asked and time.monotonic() < deadline:
        time.sleep(0.2)
        stats = teacher.call("stats")
    cpu = cpu_seconds(server.proc.pid) - c0
    wall = time.monotonic() - t0
    latencies_ms = [x * 1000 for x in stats["latencies"]]
    broadcast(procs, "shut_all", [{} for _ in procs])
    teacher.call("shut_all")
    return {
        "clients": connected, "wanted": args.clients, "connect_seconds": round(connect_s, 2),
        "questions": asked, "delivered": len(latencies_ms),
        "p50_ms": _round(percentile(latencies_ms, 50)), "p95_ms": _round(percentile(latencies_ms, 95)),
        "p99_ms": _round(percentile(latencies_ms, 99)), "max_ms": _round(max(latencies_ms) if latencies_ms else None),
        "server_cpu_pct": round(100 * cpu / wall, 1),
    }


def run_lesson(server: ServerProcess, procs: list[ClientProc], teacher: ClientProc, args: argparse.Namespace,
               secret: str) -> dict:
    from skyclass.server.tokens import issue_token

    room = f"bench-lesson-{secrets.token_hex(2)}"
    now = time.time()
    ops = issue_token(secret, "ops", "*", "bench", 600)
    _api(server.url + "/api/timetable", ops, {"room": room, "subject": "maths", "grade": "7", "teacher": "Teacher",
                                              "kind": "lesson", "start": now - 60, "end": now + 3 * 3600})
    teacher.call("teacher", room=room, name="Teacher")
    students = [f"l{i}" for i in range(args.lesson)]
    started = time.monotonic()
    joined = broadcast(procs, "connect", [{"room": room, "names": part} for part in _split(students, len(procs))])
    connect_s = time.monotonic() - started
    connected = sum(r["connected"] for r in joined)
    time.sleep(args.settle + args.lesson_settle)  # let the join burst's presence updates go out
    rss = rss_mb(server.proc.pid)

    idle_cpu, idle_wall = _server_cpu_window(server, args.idle_window)
    result: dict[str, Any] = {
        "students": connected, "wanted": args.lesson, "connect_seconds": round(connect_s, 2),
        "server_rss_mb": round(rss, 1), "idle_window_s": round(idle_wall, 1),
        "idle_cpu_pct": round(100 * idle_cpu / idle_wall, 2), "chat_rate": args.chat_rate,
    }
    # Window 1: the lesson's chat — students chat (1 msg/s between them; in a lesson room it
    # goes to the staff), presence changes with the churn.
    result["student_chat"] = _lesson_window(server, procs, teacher, args, room, connected, broadcast_chat=False)
    # Window 2: the worst case — the teacher chats to all students at the same rate.
    result["broadcast"] = _lesson_window(server, procs, teacher, args, room, connected, broadcast_chat=True)
    broadcast(procs, "shut_all", [{} for _ in procs])
    teacher.call("shut_all")
    return result


def _lesson_window(server: ServerProcess, procs: list[ClientProc], teacher: ClientProc, args: argparse.Namespace,
                   room: str, connected: int, broadcast_chat: bool) -> dict:
    """One measured window: churn in every client process, and either the students' chat
    (spread over the client processes) or the teacher's chat to everyone, at ``--chat-rate``."""
    broadcast(procs, "reset", [{} for _ in procs])
    teacher.call("reset")
    per_proc = len(procs)
    for proc in procs:
        jobs = [{"what": "churn", "room": room, "rate": args.churn / per_proc, "seconds": args.window}]
        if not broadcast_chat:
            jobs.append({"what": "student_chat", "rate": args.chat_rate / per_proc, "seconds": args.window})
        proc.send("start", jobs=jobs)
    if broadcast_chat:
        teacher.send("start", what="chat", name="Teacher", rate=args.chat_rate, seconds=args.window)
    (u0, s0), t0 = cpu_times(server.proc.pid), time.monotonic()
    replies = [proc.reply() for proc in procs]
    teacher_sent = teacher.reply()["sent"] if broadcast_chat else 0
    (u1, s1), wall = cpu_times(server.proc.pid), time.monotonic() - t0
    cpu, sys_cpu = (u1 - u0) + (s1 - s0), s1 - s0
    churned = sum(r[0]["churned"] for r in replies)
    students_sent = sum(r[1]["sent"] for r in replies) if not broadcast_chat else 0
    time.sleep(1.0)  # the last chat message in flight
    stats = broadcast(procs, "stats", [{} for _ in procs])
    teacher_got = teacher.call("stats")["chat"]
    received = sum(s["chat"] for s in stats)
    presence = sum(s["presence"] for s in stats)
    still_open = sum(s["open"] for s in stats)
    if broadcast_chat:
        delivered = 100 * received / (teacher_sent * connected) if teacher_sent else None
    else:  # each student message goes to the staff (the teacher) and back to its sender
        delivered = 100 * teacher_got / students_sent if students_sent else None
    return {
        "window_s": round(wall, 1), "chat_sent": teacher_sent or students_sent,
        "chat_per_s": round((teacher_sent or students_sent) / wall, 2),
        "churned": churned, "churn_rate": round(churned / wall, 2),
        "cpu_pct": round(100 * cpu / wall, 2),
        "sys_pct": round(100 * sys_cpu / wall, 2),  # kernel share (loopback TCP sends)
        "chat_delivered_pct": round(delivered, 2) if delivered is not None else None,
        "chat_sends": received + teacher_got,  # websocket messages of chat the server wrote
        "presence_per_student_per_min": round(presence / max(1, still_open) / wall * 60, 2),
    }


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 1)


def run(args: argparse.Namespace) -> dict:
    _raise_fd_limit()
    secret = secrets.token_urlsafe(32)
    base = Path(tempfile.mkdtemp(prefix="ws-bench-"))
    redis = RedisServer() if args.store == "redis" else None
    server = ServerProcess("skyclass", base, secret, log_level=args.log_level,
                           extra=["--workers", "0", "--node-id", "bench"] + (["--redis", redis.url] if redis else []))
    procs = [ClientProc(server.url, secret) for _ in range(args.procs)]
    teacher = ClientProc(server.url, secret)
    results: dict[str, Any] = {"benchmark": "ws_bench", "store": args.store, "procs": args.procs,
                               "cpus": os.cpu_count()}
    try:
        if args.clients > 0:
            results["latency"] = run_latency(server, procs, teacher, args)
        if args.lesson > 0:
            results["lesson"] = run_lesson(server, procs, teacher, args, secret)
    finally:
        for proc in procs + [teacher]:
            proc.stop()
        server.stop()
        if redis is not None:
            redis.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    latency, lesson = results.get("latency"), results.get("lesson")
    results["pass"] = {
        "question_p95_under_200ms": bool(latency and latency["p95_ms"] is not None
                                         and latency["p95_ms"] < TARGET_P95_MS
                                         and latency["delivered"] == latency["questions"]),
        "lesson_cpu_under_10pct": bool(lesson and lesson["student_chat"]["cpu_pct"] < TARGET_CPU_PCT),
        "broadcast_cpu_under_10pct": bool(lesson and lesson["broadcast"]["cpu_pct"] < TARGET_CPU_PCT),
    }
    return results


def format_report(results: dict) -> str:
    lines = [f"ws_bench — store {results['store']}, {results['procs']} client processes, {results['cpus']} CPUs"]
    latency = results.get("latency")
    if latency:
        lines += ["", "question → teacher latency",
                  f"{'clients':>8} {'connect s':>9} {'questions':>9} {'delivered':>9} {'p50 ms':>7} {'p95 ms':>7} "
                  f"{'p99 ms':>7} {'max ms':>7} {'server cpu %':>12}",
                  f"{latency['clients']:>8} {latency['connect_seconds']:>9} {latency['questions']:>9} "
                  f"{latency['delivered']:>9} {latency['p50_ms']!s:>7} {latency['p95_ms']!s:>7} "
                  f"{latency['p99_ms']!s:>7} {latency['max_ms']!s:>7} {latency['server_cpu_pct']:>12}"]
    lesson = results.get("lesson")
    if lesson:
        lines += ["", f"lesson: {lesson['students']} students (joined in {lesson['connect_seconds']} s, "
                      f"server RSS {lesson['server_rss_mb']} MB, idle CPU {lesson['idle_cpu_pct']} %)",
                  f"{'window':<28} {'s':>5} {'chat/s':>6} {'churn/s':>7} {'cpu %':>6} {'of it sys %':>11} "
                  f"{'chat sends':>10} {'delivered %':>11} {'presence/min':>12}"]
        for key, label in (("student_chat", "students chat (to staff)"), ("broadcast", "teacher chats to all")):
            w = lesson[key]
            lines.append(f"{label:<28} {w['window_s']:>5} {w['chat_per_s']:>6} {w['churn_rate']:>7} {w['cpu_pct']:>6} "
                         f"{w['sys_pct']:>11} {w['chat_sends']:>10} {w['chat_delivered_pct']!s:>11} "
                         f"{w['presence_per_student_per_min']:>12}")
    verdict = results["pass"]
    lines += ["", f"question p95 < {TARGET_P95_MS:.0f} ms: {'PASS' if verdict['question_p95_under_200ms'] else 'FAIL'};"
                  f"  lesson (presence + chat) < {TARGET_CPU_PCT:.0f}% of a core: "
                  f"{'PASS' if verdict['lesson_cpu_under_10pct'] else 'FAIL'};"
                  f"  teacher broadcast < {TARGET_CPU_PCT:.0f}%: {'PASS' if verdict['broadcast_cpu_under_10pct'] else 'FAIL'}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m skyclass.loadtest.ws_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=1000, help="websockets in the latency phase (0: skip)")
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--question-seconds", type=float, default=15.0)
    parser.add_argument("--lesson", type=int, default=5000, help="students in the lesson phase (0: skip)")
    parser.add_argument("--window", type=float, default=20.0, help="seconds of chat + churn measured")
    parser.add_argument("--idle-window", type=float, default=10.0)
    parser.add_argument("--chat-rate", type=float, default=1.0,
                        help="teacher chat messages per second, to everyone (0: none)")
    parser.add_argument("--churn", type=float, default=5.0, help="students leaving and rejoining per second")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds after the joins before measuring")
    parser.add_argument("--lesson-settle", type=float, default=5.0, help="extra settling after the lesson's joins")
    parser.add_argument("--procs", type=int, default=max(2, os.cpu_count() or 2), help="client processes")
    parser.add_argument("--store", choices=("memory", "redis"), default="memory")
    parser.add_argument("--log-level", default="INFO", help="the server's log level")
    parser.add_argument("--keep", action="store_true", help="keep the server's data directory (and log)")
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    results = run(args)
    # A benchmark's product is its table and its JSON line: stdout, on purpose.
    print(format_report(results))
    print(json.dumps(results, separators=(",", ":")), flush=True)


if __name__ == "__main__":
    main()
