"""Fan-out benchmark: one teacher, N students, what the server spends per student.

    python -m skyclass.loadtest.fanout_bench [--counts 1,10,50,100,200] [--relay-counts 1,2,5]
                                             [--duration 10] [--quick] [--profile-at 100]

Phases, in one run:

1. **raw**: this machine's ceiling for a Python forwarding loop: pylibsrtp
   ``Session.protect`` + ``socket.sendto`` of 1,200-byte RTP packets to a local socket
   in a tight loop (and the same with the 12-byte header rewrite skyclass does per
   student), in packets per core-second.
2. **fanout**: ``skyclass serve`` as a subprocess on a free port with a fresh data
   directory; a teacher process publishes a 640x480 30 fps ~1 Mbps H.264 (constrained
   baseline, IDR every 2 s) + Opus clip, pre-encoded, so aiortc only packetizes; student
   processes add students up to each N in ``--counts``. After the joins, ``--settle``
   seconds and until the students' video queueing delay is back under 100 ms (p95; a
   join burst can put the server seconds behind), a steady-state window of
   ``--duration`` seconds measures the server's CPU (utime + stime from
   ``/proc/PID/stat`` of the server process and every descendant: the front and its
   fan-out worker processes, all threads), packets forwarded
   (``skyclass_rtp_packets_out`` from ``/metrics``; with fan-out workers the front
   aggregates their counters every 0.5 s, so this rate is good to a few percent), and
   per student: loss (from sequence numbers), duplicates, sequence discontinuities,
   frame rate (marker bits) and video queueing delay (arrival time against RTP
   timestamp); and the students' own CPU and event-loop lag.
3. **relay**: the same teacher and students against ``loadtest/relay_baseline.py``, a
   plain aiortc server that decodes the teacher once and re-encodes per student through
   ``MediaRelay``: the approach skyclass replaces.
4. **workers**: the process model's cost: the same students against ``--workers 0`` (the
   front process fans out itself) and ``--workers 2`` (one fan-out worker per core, fed by
   the relay protocol), each on a fresh server, at each N of ``--worker-counts``; server
   CPU per student summed over all processes, and the ratio between the two. Plus a
   microbenchmark of the relay hop alone: CPU per packet to frame a room packet, send it
   to a worker's socket, read it in a batch and parse it.
5. **join**: a fresh skyclass server, the teacher, and ``--join-count`` students whose
   WHEP POSTs are spread evenly over ``--join-window`` seconds; per student the time from
   its POST to its first video keyframe (first RTP packet whose payload starts an
   IDR/SPS): p50/p95/max, and whether every student saw video.

Students are :class:`skyclass.loadtest.light_clients.CountingStudent`: real aiortc peers
that count clear RTP headers instead of decrypting and decoding, spread over
``--workers`` processes, so the load generator is not the bottleneck (its CPU is
reported). The teacher runs in its own process, so neither is counted in the server's
CPU. All media goes to 127.0.0.1. On a shared machine the figures are noisy: the
``busy`` column is the whole machine's CPU use during each window, for judging that.

It prints a table and, last, one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import light_clients
# (free_port and process_cpu_seconds stay importable from here for older callers)
from .common import (ROOT, PipeProcess, ServerProcess, free_port, machine_busy_seconds, metric,  # noqa: F401
                     percentile, process_cpu_seconds, process_tree_cpu_seconds, scrape_metrics)


FULL = {"counts": [1, 10, 50, 100, 200], "relay_counts": [1, 2, 5], "duration": 10.0, "join_count": 100,
        "join_window": 5.0, "settle": 3.0, "clip_seconds": 10, "worker_counts": [100, 200]}
QUICK = {"counts": [1, 10], "relay_counts": [1], "duration": 5.0, "join_count": 20,
         "join_window": 2.0, "settle": 2.0, "clip_seconds": 4, "worker_counts": [10]}


# --- measuring ------------------------------------------------------------------------

def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else round(1000 * seconds, 1)


# --- the raw ceiling ------------------------------------------------------------------

_DRAIN = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
while True:
    s.recv(2048)
"""


def raw_microbench(seconds: float = 1.0, size: int = 1200) -> dict[str, float]:
    """Packets per core-second (the sending process's CPU) of a Python loop doing SRTP
    protect + UDP ``sendto`` to a local socket, in three variants:

    * ``protect_sendto``: to a socket nobody reads (the kernel drops what overflows its
      buffer; the cheapest case: no receiver is woken);
    * ``rewrite_protect_sendto``: the same with skyclass's per-student work, a fresh
      12-byte header (``build_header``) + payload concatenation before protect;
    * ``protect_sendto_read``: as the first, to a socket another process drains, as
      every student's is in the benchmark (on loopback the sender's ``sendto`` also
      pays for delivering and waking the receiver).
    """
    from pylibsrtp import Policy, Session

    from skyclass.media.rtp import build_header

    policy = Policy(key=os.urandom(30), ssrc_type=Policy.SSRC_ANY_OUTBOUND)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))  # never read
    drain = subprocess.Popen([sys.executable, "-c", _DRAIN], stdout=subprocess.PIPE, text=True)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.setblocking(False)
    payload = os.urandom(size - 12)
    results: dict[str, float] = {}
    try:
        assert drain.stdout is not None
        drained = ("127.0.0.1", int(drain.stdout.readline()))
        for name, addr in (("protect_sendto", sink.getsockname()), ("rewrite_protect_sendto", sink.getsockname()),
                           ("protect_sendto_read", drained)):
            session = Session(policy=policy)
            packet = bytearray(build_header(0, 96, 0, 0, 0x1234) + payload)
            seq_field = struct.Struct("!H")
            rewrite = name.startswith("rewrite")
            count, seq = 0, 0
            wall = time.perf_counter()
            cpu = time.process_time()
            while time.perf_counter() - wall < seconds:
                for _ in range(500):
                    seq = (seq + 1) & 0xFFFF
                    if rewrite:
                        data = session.protect(build_header(0, 96, seq, seq * 3000, 0x1234) + payload)
                    else:
                        seq_field.pack_into(packet, 2, seq)
                        data = session.protect(bytes(packet))
                    try:
                        sender.sendto(data, addr)
                    except (BlockingIOError, InterruptedError):
                        pass
                    count += 1
            used = time.process_time() - cpu
            results[f"{name}_pps_per_core"] = count / used if used > 0 else 0.0
    finally:
        drain.kill()
        drain.wait()
        sink.close()
        sender.close()
    results["packet_bytes"] = size
    return results


# --- processes --------------------------------------------------------------------------

class StudentPool:
    """``size`` student processes; student ``i`` lives in process ``i % size``."""

    def __init__(self, size: int) -> None:
        self.workers = [PipeProcess(light_clients.student_worker_main, i) for i in range(size)]
        self.count = 0

    def broadcast(self, op: str, per_worker: Optional[list[dict]] = None, timeout: float = 300.0,
                  **kwargs: Any) -> list[Any]:
        for i, worker in enumerate(self.workers):
            worker.send(op, **kwargs, **(per_worker[i] if per_worker else {}))
        return [worker.reply(timeout) for worker in self.workers]

    def join(self, url: str, room: str, tokens: list[str], schedule: Optional[list[float]] = None,
             wait_keyframe: float = 0.0, concurrency: int = 8) -> list[dict]:
        """Add ``len(tokens)`` students (named after their global index)."""
        shares: list[list] = [[] for _ in self.workers]
        for k, token in enumerate(tokens):
            index = self.count + k
            shares[index % len(self.workers)].append((f"s{index}", token, schedule[k] if schedule else None))
        self.count += len(tokens)
        return self.broadcast("join", per_worker=[{"students_": s} for s in shares], url=url, room=room,
                              wait_keyframe=wait_keyframe, concurrency=concurrency)

    def totals(self) -> list[dict]:
        return self.broadcast("totals", timeout=60)

    def close_all(self) -> None:
        self.broadcast("close_all", timeout=120)
        self.count = 0

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()


# --- one steady-state window ----------------------------------------------------------------

@dataclass
class Snapshot:
    wall: float
    server_cpu: dict[int, float]
    machine: tuple[float, float]
    metrics: dict[str, float]
    workers: list[dict]
    teacher: dict


def snapshot(server: ServerProcess, pool: StudentPool, teacher: PipeProcess) -> Snapshot:
    wall = time.monotonic()
    cpu = process_tree_cpu_seconds(server.pid)
    machine = machine_busy_seconds()
    teacher_state = teacher.call("cpu")  # right before the scrape: packets sent vs received
    values = scrape_metrics(server.url) if server.kind == "skyclass" else {}
    return Snapshot(wall, cpu, machine, values, pool.totals(), teacher_state)


def measure(server: ServerProcess, pool: StudentPool, teacher: PipeProcess, n: int, duration: float) -> dict:
    """Figures for one steady-state window of ``duration`` seconds with ``n`` students."""
    a = snapshot(server, pool, teacher)
    time.sleep(duration)
    b = snapshot(server, pool, teacher)
    wall = b.wall - a.wall
    used = {pid: end - a.server_cpu.get(pid, 0.0) for pid, end in b.server_cpu.items()}
    cpu = sum(used.values()) / wall
    front_cpu = used.get(server.pid, 0.0) / wall
    busy = (b.machine[0] - a.machine[0]) / wall
    losses, fps, rx_rates, dups, delays, max_delays = [], [], [], [], [], []
    jumpy = jumps_total = ssrcs = 0
    client_cpu = 0.0
    silent = 0
    states: Counter = Counter()
    for before, after in zip(a.workers, b.workers):
        dt = after["time"] - before["time"]
        client_cpu += (after["cpu"] - before["cpu"]) / dt
        for name, end in after["students"].items():
            start = before["students"].get(name, {"rx": 0, "exp": 0, "dup": 0, "jumps": 0, "frames": 0})
            delays.append(end["delay"])
            max_delays.append(end["max_delay"])
            jumps = end["jumps"] - start["jumps"]
            if jumps:
                jumpy += 1
                jumps_total += jumps
            ssrcs = max(ssrcs, end["ssrcs"])
            states[end["state"] if not end["state"].startswith("failed") else "failed"] += 1
            rx, exp = end["rx"] - start["rx"], end["exp"] - start["exp"]
            dup = end["dup"] - start["dup"]
            if exp <= 0:
                silent += 1
                losses.append(100.0)
                fps.append(0.0)
                rx_rates.append(0.0)
                dups.append(0.0)
                continue
            losses.append(max(0.0, 100.0 * (1 - (rx - dup) / exp)))
            dups.append(100.0 * dup / rx if rx else 0.0)
            fps.append((end["frames"] - start["frames"]) / dt)
            rx_rates.append(rx / dt)
    received_pps = sum(rx_rates)
    row: dict[str, Any] = {
        "n": n,
        "students_measured": len(losses),
        "connected": states.get("connected", 0),
        "silent": silent,
        "window_s": round(wall, 2),
        "server_cpu_cores": round(cpu, 4),
        "server_processes": len(used),
        "server_front_cpu_cores": round(front_cpu, 4),
        "server_children_cpu_cores": round(cpu - front_cpu, 4),
        "server_cpu_per_student_pct": round(100 * cpu / n, 3) if n else None,
        "students_per_core": round(n / cpu, 1) if cpu > 0 else None,
        "received_pps": round(received_pps, 1),
        "pps_per_student": round(received_pps / len(rx_rates), 1) if rx_rates else 0.0,
        "loss_pct_mean": round(sum(losses) / len(losses), 3) if losses else None,
        "loss_pct_p95": round(percentile(losses, 95) or 0.0, 3) if losses else None,
        "loss_pct_max": round(max(losses), 3) if losses else None,
        "students_with_loss": sum(1 for x in losses if x > 0),
        "queue_delay_ms_p50": _ms(percentile(delays, 50)),
        "queue_delay_ms_p95": _ms(percentile(delays, 95)),
        "queue_delay_ms_max_in_window": _ms(max(max_delays) if max_delays else None),
        "client_max_loop_lag_ms": _ms(max(w["max_loop_lag"] for w in b.workers)),
        "students_with_seq_discontinuities": jumpy,
        "seq_discontinuities": jumps_total,
        "max_ssrcs_per_student": ssrcs,
        "duplicate_pct_mean": round(sum(dups) / len(dups), 3) if dups else None,
        "duplicate_pct_max": round(max(dups), 3) if dups else None,
        "video_fps_mean": round(sum(fps) / len(fps), 2) if fps else None,
        "video_fps_min": round(min(fps), 2) if fps else None,
        "client_cpu_cores": round(client_cpu, 4),
        "client_cpu_per_student_pct": round(100 * client_cpu / n, 3) if n else None,
        "teacher_cpu_cores": round((b.teacher["cpu"] - a.teacher["cpu"]) / (b.teacher["time"] - a.teacher["time"]), 4),
        "machine_busy_cores": round(busy, 3),
    }
    if server.kind == "skyclass":
        def rate(name: str) -> float:
            return (metric(b.metrics, name) - metric(a.metrics, name)) / wall
        row["forwarded_pps"] = round(rate("skyclass_rtp_packets_out"), 1)
        row["forwarded_mbps"] = round(rate("skyclass_rtp_bytes_out") * 8 / 1e6, 2)
        row["teacher_pps_in"] = round(rate("skyclass_rtp_packets_in"), 1)
        sent = b.teacher["packets_sent"] - a.teacher["packets_sent"]
        got = metric(b.metrics, "skyclass_rtp_packets_in") - metric(a.metrics, "skyclass_rtp_packets_in")
        # Loss between teacher and server is loss for every student at once.
        row["ingress_loss_pct"] = round(max(0.0, 100 * (1 - got / sent)), 3) if sent else None
        row["dropped_slow_viewer_pps"] = round(rate("skyclass_packets_dropped_slow_viewer"), 1)
        row["server_cpu_us_per_packet"] = round(1e6 * cpu / row["forwarded_pps"], 2) if row["forwarded_pps"] else None
    else:
        row["forwarded_pps"] = row["received_pps"]  # no counters in the baseline: what students got
    return row


# --- profiling -------------------------------------------------------------------------------

def py_spy_binary() -> Optional[str]:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def profile_server(pid: int, seconds: float, out_dir: Path, top: int = 15) -> dict:
    """Sample the server with py-spy (``record``: raw collapsed stacks + speedscope) and
    summarise: the functions with the most samples on CPU, own time and inclusive."""
    binary = py_spy_binary()
    if binary is None:
        return {"error": "py-spy not installed (pip install py-spy)"}
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "server.collapsed.txt"
    speedscope = out_dir / "server.speedscope.json"
    proc = subprocess.run([binary, "record", "--pid", str(pid), "--subprocesses", "--duration", str(int(seconds)),
                           "--rate", "100", "--format", "raw", "--output", str(raw), "--nonblocking"],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not raw.exists():
        return {"error": f"py-spy failed: {proc.stderr.strip()[-500:]}"}
    own: Counter = Counter()
    inclusive: Counter = Counter()
    by_process: Counter = Counter()
    own_by_role: dict[str, Counter] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        # with --subprocesses each stack starts with "process PID:cmdline" frames, parent first
        processes = [f for f in frames if f.startswith("process ")]
        # by function, not by line: "f (path/file.py:123)" -> "f (path/file.py)"
        frames = [_LINE.sub(")", f) for f in frames if not f.startswith("process ")] or ["(no Python frame)"]
        role = _process_role(processes[-1]) if processes else "server"
        total += count
        by_process[role] += count
        own[frames[-1]] += count
        own_by_role.setdefault(role, Counter())[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    _convert_to_speedscope(raw, speedscope)

    def table(counter: Counter, n: int = top) -> list[list]:
        return [[frame, round(100 * c / total, 1)] for frame, c in counter.most_common(n)]

    # frames on (nearly) every stack (runpy, asyncio.run, the loop) say nothing
    inclusive = Counter({f: c for f, c in inclusive.items() if c < 0.9 * total})
    return {"samples": total, "collapsed": str(raw), "speedscope": str(speedscope) if speedscope.exists() else None,
            "by_process_pct": table(by_process), "self_pct": table(own), "inclusive_pct": table(inclusive),
            "self_pct_by_process": {role: table(c, 8) for role, c in sorted(own_by_role.items())}}


_LINE = re.compile(r":\d+\)$")


def _process_role(frame: str) -> str:
    """"process PID:cmdline" → "front PID" / "worker I PID"."""
    pid = frame.split(":", 1)[0].split()[-1]
    if "skyclass.server.worker" in frame:
        index = frame.split("--index", 1)[1].split()[0] if "--index" in frame else "?"
        return f"worker {index} (pid {pid})"
    if "serve" in frame:
        return f"front (pid {pid})"
    return f"pid {pid}"


def _convert_to_speedscope(raw: Path, out: Path) -> None:
    """Collapsed stacks → a speedscope "sampled" profile (open at speedscope.app)."""
    frames: dict[str, int] = {}
    samples, weights = [], []
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        samples.append([frames.setdefault(f, len(frames)) for f in stack.split(";")])
        weights.append(int(count))
    doc = {"$schema": "https://www.speedscope.app/file-format-schema.json",
           "shared": {"frames": [{"name": f} for f in frames]},
           "profiles": [{"type": "sampled", "name": "skyclass server", "unit": "none", "startValue": 0,
                         "endValue": sum(weights), "samples": samples, "weights": weights}]}
    out.write_text(json.dumps(doc))


# --- phases ----------------------------------------------------------------------------------

@dataclass
class Settings:
    counts: list[int]
    relay_counts: list[int]
    duration: float
    join_count: int
    join_window: float
    settle: float
    workers: int = 4
    clip_seconds: int = 10
    raw_seconds: float = 1.0
    profile_at: int = 0
    profile_seconds: float = 10.0
    worker_counts: list[int] = field(default_factory=lambda: [100])
    work_dir: Optional[Path] = None
    log: Any = field(default=None)

    def say(self, text: str) -> None:
        if self.log is not None:
            print(text, file=self.log, flush=True)


def _publish(teacher: PipeProcess, server: ServerProcess, room: str) -> dict:
    return teacher.call("publish", url=server.url, room=room, token=server.token("teacher", room, "Teacher"),
                        timeout=60)


def _wait_flowing(server: ServerProcess, seconds: float = 20.0) -> None:
    """Until the teacher's packets reach the server's router."""
    deadline = time.monotonic() + seconds
    first = metric(scrape_metrics(server.url), "skyclass_rtp_packets_in")
    while time.monotonic() < deadline:
        time.sleep(0.25)
        if metric(scrape_metrics(server.url), "skyclass_rtp_packets_in") > first + 30:
            return
    raise RuntimeError(f"teacher media never reached the server: {server.log_tail()}")


def _wait_steady(pool: StudentPool, minimum: float, threshold: float = 0.1, timeout: float = 30.0
                 ) -> Optional[float]:
    """Wait at least ``minimum`` seconds, then until 95 % of the students saw no video
    queueing delay above ``threshold`` seconds over the last half second. A join burst
    can leave the server seconds behind, which it then drains faster than real time:
    that is not a steady state. Returns the seconds waited, or None if still unsteady
    after ``timeout`` (the window is measured anyway)."""
    started = time.monotonic()
    time.sleep(minimum)
    pool.totals()  # resets the per-student maxima
    while time.monotonic() - started < timeout:
        time.sleep(0.5)
        delays = [s["max_delay"] for w in pool.totals() for s in w["students"].values()]
        if (percentile(delays, 95) or 0.0) <= threshold:
            return time.monotonic() - started
    return None


def _grow(server: ServerProcess, pool: StudentPool, teacher: PipeProcess, room: str, counts: list[int],
          settings: Settings, profile_dir: Optional[Path]) -> list[dict]:
    """Add students up to each N of ``counts`` and measure a steady-state window at each.

    Each row after the first also gets the marginal cost of the students added since the
    previous row (CPU difference / N difference), which leaves out the fixed costs
    (teacher ingress, idle processes) that make small N look expensive per student."""
    rows: list[dict] = []
    for n in counts:
        failed: list[str] = []
        if n > pool.count:
            started = time.monotonic()
            new = n - pool.count
            tokens = [server.token("student", room, f"s{i}") for i in range(pool.count, n)]
            replies = pool.join(server.url, room, tokens)
            failed = [f for r in replies for f in r["failed"]]
            settings.say(f"  {server.kind} N={n}: {new - len(failed)}/{new} new students connected in "
                         f"{time.monotonic() - started:.1f}s" + (f", failures: {dict(Counter(failed))}" if failed else ""))
        settled = _wait_steady(pool, settings.settle)
        row = measure(server, pool, teacher, n, settings.duration)
        row["join_failures"] = len(failed)
        row["settle_s"] = round(settled, 1) if settled is not None else None
        if rows and n > rows[-1]["n"]:
            extra = row["server_cpu_cores"] - rows[-1]["server_cpu_cores"]
            row["marginal_cpu_per_student_pct"] = round(100 * extra / (n - rows[-1]["n"]), 3)
            row["marginal_students_per_core"] = round((n - rows[-1]["n"]) / extra, 1) if extra > 0 else None
        if settled is None:
            settings.say(f"  {server.kind} N={n}: still not steady (p95 video delay > 100 ms) after 30 s; measuring anyway")
        elif settled > settings.settle + 1:
            settings.say(f"  {server.kind} N={n}: steady only {settled:.1f}s after the joins (server was behind)")
        settings.say(f"  {server.kind} N={n}: server {row['server_cpu_cores']:.3f} cores, "
                     f"{row['forwarded_pps']:.0f} pkt/s, loss mean {row['loss_pct_mean']}%, "
                     f"machine busy {row['machine_busy_cores']:.2f} cores")
        if profile_dir is not None and n == settings.profile_at:
            settings.say(f"  profiling the server with py-spy for {settings.profile_seconds:.0f}s at N={n}")
            row["profile"] = profile_server(server.pid, settings.profile_seconds, profile_dir)
        rows.append(row)
    return rows


def run_fanout(settings: Settings, pool: StudentPool, teacher: PipeProcess, base: Path, secret: str) -> dict:
    server = ServerProcess("skyclass", base / "fanout", secret)
    room = "fanout"
    try:
        settings.say(f"fanout: skyclass server pid {server.pid} on {server.url}")
        _publish(teacher, server, room)
        _wait_flowing(server)
        rows = _grow(server, pool, teacher, room, settings.counts, settings,
                     base / "profile" if settings.profile_at in settings.counts else None)
    finally:
        _safe(lambda: teacher.call("unpublish", timeout=30))
        _safe(pool.close_all)
        server.stop()
    return {"rows": rows}


def run_relay(settings: Settings, pool: StudentPool, teacher: PipeProcess, base: Path, secret: str) -> dict:
    server = ServerProcess("relay", base / "relay", secret)
    room = "relay"
    try:
        settings.say(f"relay: MediaRelay baseline server pid {server.pid} on {server.url}")
        _publish(teacher, server, room)
        time.sleep(2.0)  # the baseline decodes the teacher: let the decoder start
        rows = _grow(server, pool, teacher, room, settings.relay_counts, settings, None)
    finally:
        _safe(lambda: teacher.call("unpublish", timeout=30))
        _safe(pool.close_all)
        server.stop()
    return {"rows": rows}


def relay_hop_microbench(packets: int = 100_000, size: int = 1200) -> dict[str, float]:
    """CPU per packet of the origin→worker hop alone: frame, send, batch-read, parse."""
    import asyncio

    from skyclass.media.relay import _RTP, encode_rtp, open_endpoint

    received = 0

    def on_datagram(data: bytes, addr: tuple) -> None:
        nonlocal received
        _RTP.unpack_from(data)
        data[_RTP.size:]
        received += 1

    async def run() -> float:
        edge, edge_addr = await open_endpoint(on_datagram)
        origin, _ = await open_endpoint(lambda d, a: None)
        payload = bytes(size)
        started = time.process_time()
        for i in range(packets):
            try:
                origin.sendto(encode_rtp(7, i & 0xFFFF, i * 3000, 0, False, payload), edge_addr)
            except BlockingIOError:
                pass
            if i % 64 == 63:
                await asyncio.sleep(0)  # let the edge drain, as the event loop would
        while received < packets * 0.99:
            before = received
            await asyncio.sleep(0.01)
            if received == before:
                break
        cpu = time.process_time() - started
        edge.close()
        origin.close()
        return cpu

    cpu = asyncio.run(run())
    return {"us_per_packet": round(cpu / max(received, 1) * 1e6, 2), "delivered_pct": round(100 * received / packets, 2)}


def run_workers(settings: Settings, pool: StudentPool, teacher: PipeProcess, base: Path, secret: str) -> dict:
    """The same lesson with the front fanning out itself, then with two fan-out workers."""
    modes: dict[str, list[dict]] = {}
    for label, workers in (("single", 0), ("workers2", 2)):
        server = ServerProcess("skyclass", base / f"workers-{label}", secret,
                               extra=["--workers", str(workers), "--max-viewers-per-worker", "1000"])
        room = f"mode-{label}"
        try:
            settings.say(f"workers: {label} (--workers {workers}) server pid {server.pid}")
            _publish(teacher, server, room)
            _wait_flowing(server)
            modes[label] = _grow(server, pool, teacher, room, settings.worker_counts, settings, None)
        finally:
            _safe(lambda: teacher.call("unpublish", timeout=30))
            _safe(pool.close_all)
            server.stop()
    ratios = []
    for single, multi in zip(modes.get("single", []), modes.get("workers2", [])):
        if single["server_cpu_per_student_pct"]:
            ratios.append({"n": single["n"], "single_cpu_per_student_pct": single["server_cpu_per_student_pct"],
                           "workers2_cpu_per_student_pct": multi["server_cpu_per_student_pct"],
                           "ratio": round(multi["server_cpu_per_student_pct"] / single["server_cpu_per_student_pct"], 3),
                           "single_loss_pct_max": single["loss_pct_max"], "workers2_loss_pct_max": multi["loss_pct_max"]})
    settings.say("workers: relay hop microbenchmark")
    return {"modes": modes, "ratios": ratios, "relay_hop": relay_hop_microbench()}


def run_join(settings: Settings, pool: StudentPool, teacher: PipeProcess, base: Path, secret: str) -> dict:
    server = ServerProcess("skyclass", base / "join", secret)
    room = "join"
    count, window = settings.join_count, settings.join_window
    try:
        settings.say(f"join: {count} students within {window:.0f}s, skyclass server pid {server.pid}")
        _publish(teacher, server, room)
        _wait_flowing(server)
        time.sleep(1.0)
        tokens = [server.token("student", room, f"s{i}") for i in range(count)]
        start = time.monotonic() + 1.0  # every worker has its list by then
        schedule = [start + window * i / count for i in range(count)]
        cpu0, wall0 = process_tree_cpu_seconds(server.pid), time.monotonic()
        replies = pool.join(server.url, room, tokens, schedule=schedule, wait_keyframe=30.0,
                            concurrency=max(8, count))
        cpu1 = process_tree_cpu_seconds(server.pid)
        cpu = sum(end - cpu0.get(pid, 0.0) for pid, end in cpu1.items())
        wall = time.monotonic() - wall0
        joins = {name: t for r in replies for name, t in r["join"].items()}
        keyframe = [t["keyframe"] for t in joins.values() if t["keyframe"] is not None]
        connected = [t["connected"] for t in joins.values() if t["connected"] is not None]
        posted = [t["posted_at"] for t in joins.values() if t["posted_at"] is not None]
        failures = [f for r in replies for f in r["failed"]]

        result = {
            "students": count,
            "window_s": window,
            "posts_spread_s": round(max(posted) - min(posted), 2) if posted else None,
            "connected": len(connected),
            "saw_video": len(keyframe),
            "all_saw_video": len(keyframe) == count,
            "keyframe_ms_p50": _ms(percentile(keyframe, 50)),
            "keyframe_ms_p95": _ms(percentile(keyframe, 95)),
            "keyframe_ms_max": _ms(max(keyframe) if keyframe else None),
            "connected_ms_p50": _ms(percentile(connected, 50)),
            "connected_ms_p95": _ms(percentile(connected, 95)),
            "connected_ms_max": _ms(max(connected) if connected else None),
            "server_cpu_cores_during_join": round(cpu / wall, 3) if wall > 0 else None,
            "failures": dict(Counter(failures)),
        }
        settings.say(f"  join: {len(keyframe)}/{count} saw video; keyframe p50 {result['keyframe_ms_p50']} ms, "
                     f"p95 {result['keyframe_ms_p95']} ms, max {result['keyframe_ms_max']} ms")
    finally:
        reply = _safe(lambda: teacher.call("unpublish", timeout=30))
        _safe(pool.close_all)
        server.stop()
    if isinstance(reply, dict):
        result["teacher_keyframes_sent"] = reply.get("keyframes_sent")
        result["teacher_keyframe_requests"] = reply.get("keyframe_requests")
    return result


def _code_version() -> dict:
    """The commit measured, and whether media/ or server/ had uncommitted changes."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return ""
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or None,
            "uncommitted": [line[3:] for line in git("status", "--porcelain", "--", "media", "server").splitlines()]}


def _safe(fn):
    try:
        return fn()
    except Exception as exc:  # cleanup must go on
        print(f"cleanup: {exc}", file=sys.stderr)
        return None


def run_benchmark(settings: Settings) -> dict:
    """Every phase; returns the figures (the JSON line's content)."""
    base = Path(settings.work_dir or tempfile.mkdtemp(prefix="fanout-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(24)
    results: dict[str, Any] = {
        "benchmark": "fanout",
        "machine": {"cores": os.cpu_count(), "loadavg_start": list(os.getloadavg())},
        "settings": {"counts": settings.counts, "relay_counts": settings.relay_counts, "duration_s": settings.duration,
                     "join_count": settings.join_count, "join_window_s": settings.join_window,
                     "settle_s": settings.settle, "workers": settings.workers},
    }
    results["code"] = _code_version()
    settings.say(f"raw: protect + sendto for {settings.raw_seconds:.0f}s per variant")
    results["raw"] = {k: round(v, 1) for k, v in raw_microbench(settings.raw_seconds).items()}
    clip = base / "clip.h264"
    started = time.monotonic()
    light_clients.make_h264_clip(clip, seconds=settings.clip_seconds)
    units = light_clients.load_h264_access_units(clip)
    bits = sum(len(u) for u, _ in units) * 8 / (len(units) / 30)
    results["clip"] = {"width": 640, "height": 480, "fps": 30, "seconds": len(units) / 30,
                       "video_kbps": round(bits / 1000), "keyframe_every_s": 2.0}
    settings.say(f"clip: {len(units)} frames, {bits / 1e6:.2f} Mbps, made in {time.monotonic() - started:.1f}s")

    pool = StudentPool(settings.workers)
    teacher = PipeProcess(light_clients.teacher_main, str(clip))
    try:
        if settings.counts:
            results["fanout"] = run_fanout(settings, pool, teacher, base, secret)["rows"]
        if settings.relay_counts:
            results["relay"] = run_relay(settings, pool, teacher, base, secret)["rows"]
        if settings.worker_counts:
            results["workers"] = run_workers(settings, pool, teacher, base, secret)
        if settings.join_count:
            results["join"] = run_join(settings, pool, teacher, base, secret)
    finally:
        teacher.stop()
        pool.stop()
        if settings.work_dir is None and not settings.profile_at:
            shutil.rmtree(base, ignore_errors=True)
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    results["work_dir"] = str(base) if (settings.work_dir or settings.profile_at) else None
    return results


# --- report ----------------------------------------------------------------------------------

def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def format_report(results: dict) -> str:
    lines = []
    raw = results.get("raw", {})
    lines.append("raw ceiling (1 core, Python loop, 1,200-byte packets): "
                 f"protect+sendto {_fmt(raw.get('protect_sendto_pps_per_core'), ',.0f')} pkt/core-s; "
                 f"+header rewrite {_fmt(raw.get('rewrite_protect_sendto_pps_per_core'), ',.0f')}; "
                 f"to a socket being read {_fmt(raw.get('protect_sendto_read_pps_per_core'), ',.0f')} pkt/core-s")
    clip = results.get("clip", {})
    lines.append(f"teacher: H.264 640x480 30 fps {clip.get('video_kbps')} kbps (IDR every 2 s) + Opus, pre-encoded")
    rows = [("skyclass" if kind == "fanout" else "relay", row) for kind in ("fanout", "relay")
            for row in results.get(kind, [])]
    header = (f"{'server':<8} {'N':>4} {'cpu':>6} {'cpu/stu':>8} {'stu/core':>8} {'pkt/s out':>10} "
              f"{'pkt/s/stu':>9} {'loss% mean':>10} {'max':>6} {'fps min':>7} {'delay ms':>9} {'cli cpu/stu':>11} "
              f"{'busy':>5}")
    if rows:
        lines.append("")
        lines.append(header)
        lines.append("-" * len(header))
    for label, row in rows:
        lines.append(
            f"{label:<8} {row['n']:>4} "
            f"{_fmt(row['server_cpu_cores'], '.3f'):>6} "
            f"{_fmt(row['server_cpu_per_student_pct'], '.2f') + '%':>8} "
            f"{_fmt(row['students_per_core'], '.1f'):>8} {_fmt(row['forwarded_pps'], ',.0f'):>10} "
            f"{_fmt(row['pps_per_student'], '.1f'):>9} {_fmt(row['loss_pct_mean'], '.3f'):>10} "
            f"{_fmt(row['loss_pct_max'], '.2f'):>6} {_fmt(row['video_fps_min'], '.1f'):>7} "
        f"{_fmt(row['queue_delay_ms_max_in_window'], '.0f'):>9} "
            f"{_fmt(row['client_cpu_per_student_pct'], '.2f') + '%':>11} {_fmt(row['machine_busy_cores'], '.2f'):>5}")
    if rows:
        lines.append("cpu = server CPU seconds per second, front + fan-out worker processes (cores); "
                     "cpu/stu = % of a core per student; "
                     "stu/core = N / cpu; delay ms = highest video queueing delay any student saw in the window; "
                     "cli cpu/stu = the simulated students' CPU per student; "
                     "busy = whole machine's CPU use in the window, cores (others' work included)")
    fan = {row["n"]: row for row in results.get("fanout", [])}
    relay = results.get("relay", [])
    if fan:
        top = fan[max(fan)]
        text = f"skyclass: {_fmt(top['students_per_core'], '.0f')} students/core at N={top['n']}"
        if top.get("marginal_students_per_core"):
            text += f" ({top['marginal_students_per_core']:.0f} for the last students added: fixed costs excluded)"
        spc = [r["students_per_core"] for r in relay if r["students_per_core"]]
        if spc:
            text += (f"; MediaRelay baseline: {min(spc):.1f}-{max(spc):.1f} students/core at "
                     f"N={relay[0]['n']}-{relay[-1]['n']}")
        lines.append(text)
    workers = results.get("workers")
    if workers:
        lines.append("")
        lines.append("process model: server CPU per student, all processes summed")
        for r in workers["ratios"]:
            lines.append(f"  N={r['n']}: --workers 0 {r['single_cpu_per_student_pct']:.3f}% of a core, "
                         f"--workers 2 {r['workers2_cpu_per_student_pct']:.3f}% -> ratio {r['ratio']:.2f} "
                         f"(loss max {r['single_loss_pct_max']}% / {r['workers2_loss_pct_max']}%)")
        hop = workers["relay_hop"]
        lines.append(f"  relay hop alone: {hop['us_per_packet']} us of CPU per packet per worker "
                     f"(frame + sendto + batched recvfrom + parse; {hop['delivered_pct']}% delivered)")
    join = results.get("join")
    if join:
        lines.append("")
        lines.append(f"join: {join['students']} students, POSTs spread over {join['posts_spread_s']} s: "
                     f"{join['saw_video']}/{join['students']} saw video; POST -> first keyframe "
                     f"p50 {join['keyframe_ms_p50']} ms, p95 {join['keyframe_ms_p95']} ms, max {join['keyframe_ms_max']} ms; "
                     f"POST -> connected p50 {join['connected_ms_p50']} ms, p95 {join['connected_ms_p95']} ms")
    for row in results.get("fanout", []):
        profile = row.get("profile")
        if profile and "self_pct" in profile:
            lines.append("")
            lines.append(f"server profile at N={row['n']} (py-spy, {profile['samples']} samples on CPU; "
                         f"speedscope: {profile['speedscope']})")
            lines.append("  samples by process: " + ", ".join(f"{p} {pct}%" for p, pct in profile["by_process_pct"]))
            lines.append("  own time:")
            lines.extend(f"    {pct:5.1f}%  {frame}" for frame, pct in profile["self_pct"])
            lines.append("  inclusive:")
            lines.extend(f"    {pct:5.1f}%  {frame}" for frame, pct in profile["inclusive_pct"])
        elif profile:
            lines.append(f"server profile at N={row['n']}: {profile.get('error')}")
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m skyclass.loadtest.fanout_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--counts", type=_int_list, help="students per step (default 1,10,50,100,200)")
    parser.add_argument("--relay-counts", type=_int_list, help="MediaRelay baseline steps (default 1,2,5; '' to skip)")
    parser.add_argument("--duration", type=float, help="steady-state window per step, seconds (default 10)")
    parser.add_argument("--worker-counts", type=_int_list,
                        help="students per step for --workers 0 vs 2 (default 100,200; '' to skip)")
    parser.add_argument("--join-count", type=int, help="students in the join measurement (default 100; 0 to skip)")
    parser.add_argument("--join-window", type=float, help="seconds over which they POST (default 5)")
    parser.add_argument("--settle", type=float, help="seconds after joins before a window (default 3)")
    parser.add_argument("--workers", type=int, default=4, help="student processes (default 4)")
    parser.add_argument("--quick", action="store_true", help="small run: counts 1,10, relay 1, 5 s windows, 20 joins")
    parser.add_argument("--profile-at", type=int, default=0, help="py-spy the server after the window at this N")
    parser.add_argument("--profile-seconds", type=float, default=10.0)
    parser.add_argument("--work-dir", type=Path, help="keep server logs, clip and profiles here")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    base = dict(QUICK if args.quick else FULL)
    for key in ("counts", "relay_counts", "duration", "join_count", "join_window", "settle", "worker_counts"):
        value = getattr(args, key)
        if value is not None:
            base[key] = value
    return Settings(counts=sorted(base["counts"]), relay_counts=sorted(base["relay_counts"]),
                    duration=base["duration"], join_count=base["join_count"], join_window=base["join_window"],
                    settle=base["settle"], workers=args.workers, clip_seconds=base["clip_seconds"],
                    worker_counts=sorted(base["worker_counts"]),
                    profile_at=args.profile_at, profile_seconds=args.profile_seconds, work_dir=args.work_dir,
                    log=sys.stderr)


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    results = run_benchmark(settings_from_args(args))
    print(format_report(results))
    print(json.dumps(results, separators=(",", ":")), flush=True)


if __name__ == "__main__":
    main()
