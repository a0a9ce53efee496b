"""Recording benchmark: what recording a lesson costs, how fast replays are served, how soon they exist.

    python -m skyclass.loadtest.record_bench [--window 10] [--students 5] [--serve-seconds 5]
                                             [--concurrency 16] [--workers 0] [--quick]

One run, against ``skyclass serve`` as a subprocess (fresh data directory, media on 127.0.0.1):

1. **ingress**: a teacher publishes a 640x480 30 fps ~1 Mbps H.264 + Opus clip (encoded once
   with libx264 before the run, so the teacher only packetizes) into a room the server does
   not record (``--no-record``); the server's CPU over ``--window`` seconds (utime + stime of
   its process and descendants, from ``/proc``).
2. **fan-out**: ``--students`` students join that room (real WHEP peers: ICE, DTLS, SRTP,
   RTCP; they count RTP from clear headers and never decrypt or decode it); the server's
   CPU again: the live fan-out of the lesson, per student.
3. **recording**: the same teacher in a room that is recorded; the server's CPU, and the
   recorder's writer thread's own CPU (the thread names itself ``skyrec``: read from
   ``/proc/PID/task/TID/stat``). The live-path part (one deque append per packet) is
   timed in-process with the real sink class.
4. **replay available**: the teacher ends the lesson (WHIP DELETE); time until the
   playlist is VOD (``#EXT-X-ENDLIST``) over HTTP.
5. **serving**: a concurrent aiohttp client fetches the recording's segments for
   ``--serve-seconds`` from the server's ``/replay/{id}/…`` and, in the same run, the same
   files from two plain static servers: aiohttp's ``add_static`` and ``python -m http.server``
   (alternating in three rounds each, so background load spreads over all three).

Prints a table, then one JSON line. Targets (issue 3): recording < 5 % of a core for
~1 Mbps; VOD < 5 s after the end; serving >= 50 % of the static baseline. On a shared
2-core machine the figures are noisy: the ``busy`` column is the whole machine's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import fractions
import json
import logging
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

import aiohttp
import av
import numpy as np
from aiortc.mediastreams import MediaStreamTrack

from skyclass.media import aiortc_glue
from skyclass.server.tokens import issue_token

from .clients import PeerSession, publish, watch
from .common import ServerProcess

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SECRET = "record-bench-secret-0123456789abcdef"
TARGETS = {"recording_pct_core": 5.0, "vod_after_end_s": 5.0, "serving_vs_static": 0.5}


# --- measuring ---------------------------------------------------------------------------

def _stat_cpu(path: str) -> float:
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its live descendants (fan-out workers, if any)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    children[int(f.read().rsplit(")", 1)[1].split()[1])].append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            total += _stat_cpu(f"/proc/{current}/stat")
        except (OSError, ValueError, IndexError):
            continue
        todo.extend(children.get(current, []))
    return total


def thread_cpu(pid: int, name: str) -> float:
    """CPU seconds of the threads of ``pid`` whose OS name is ``name``."""
    total = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if f.read().strip() != name:
                    continue
            total += _stat_cpu(f"/proc/{pid}/task/{tid}/stat")
        except OSError:
            continue
    return total


def machine_busy() -> tuple[float, float]:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


class Window:
    """CPU of the server (and of the machine) over a measuring window."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = time.monotonic()
        self.cpu = tree_cpu(pid)
        self.thread = thread_cpu(pid, "skyrec")
        self.busy = machine_busy()

    def end(self) -> dict[str, float]:
        wall = time.monotonic() - self.start
        busy, total = machine_busy()
        return {
            "seconds": round(wall, 2),
            "server_pct_core": round(100 * (tree_cpu(self.pid) - self.cpu) / wall, 2),
            "recorder_thread_pct_core": round(100 * (thread_cpu(self.pid, "skyrec") - self.thread) / wall, 3),
            "machine_busy_pct": round(100 * (busy - self.busy[0]) / max(total - self.busy[1], 1e-9), 1),
        }


# --- the lesson: encoded once, then only packetized --------------------------------------

def encode_clip(seconds: int = 4, width: int = 640, height: int = 480, fps: int = 30,
                bitrate: int = 1_000_000) -> list[tuple[bytes, bool]]:
    """Access units (Annex B) of a textured, moving clip at ~``bitrate``, IDR every 2 s."""
    codec = av.CodecContext.create("libx264", "w")
    codec.width, codec.height, codec.pix_fmt = width, height, "yuv420p"
    codec.time_base = fractions.Fraction(1, fps)
    codec.bit_rate = bitrate
    kbps = bitrate // 1000
    codec.options = {"preset": "veryfast", "tune": "zerolatency", "profile": "baseline",
                     "x264-params": f"keyint={2 * fps}:min-keyint={2 * fps}:scenecut=0:bframes=0:repeat-headers=1"
                                    f":vbv-maxrate={kbps}:vbv-bufsize={kbps}"}
    rng = np.random.default_rng(7)
    texture = rng.integers(0, 256, (height * 2, width * 2), dtype=np.uint8)
    chroma = np.full((height // 2, width), 128, dtype=np.uint8)
    units = []
    for i in range(seconds * fps):
        y, x = (i * 3) % height, (i * 5) % width
        frame = av.VideoFrame.from_ndarray(np.concatenate([texture[y:y + height, x:x + width], chroma]),
                                           format="yuv420p")
        frame.pts = i
        units.extend((bytes(p), bool(p.is_keyframe)) for p in codec.encode(frame))
    units.extend((bytes(p), bool(p.is_keyframe)) for p in codec.encode(None))
    return units


def encode_opus(seconds: float = 1.0) -> list[bytes]:
    codec = av.CodecContext.create("libopus", "w")
    codec.sample_rate, codec.layout, codec.format, codec.bit_rate = 48000, "mono", "s16", 32000
    codec.open()
    packets = []
    for i in range(int(seconds * 50) + 4):
        t = (np.arange(960) + i * 960) / 48000
        frame = av.AudioFrame.from_ndarray((np.sin(2 * math.pi * 440 * t) * 8000).astype(np.int16).reshape(1, -1),
                                           format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 48000, i * 960, fractions.Fraction(1, 48000)
        packets.extend(bytes(p) for p in codec.encode(frame))
    return packets[:int(seconds * 50)]


class PacketTrack(MediaStreamTrack):
    """Pre-encoded packets as ``av.Packet`` in real time, looped; a keyframe request skips
    to the next IDR, as an encoder would honour it."""

    def __init__(self, kind: str, units: list[tuple[bytes, bool]], interval: float, clock: int) -> None:
        super().__init__()
        self.kind = kind
        self.units, self.interval, self.clock = units, interval, clock
        self._start: Optional[float] = None
        self._count = 0
        self._pos = 0
        self._want_key = False

    def request_keyframe(self) -> None:
        self._want_key = True

    async def recv(self) -> av.Packet:  # type: ignore[override]
        if self._start is None:
            self._start = time.monotonic()
        delay = self._start + self._count * self.interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if self._want_key:
            self._want_key = False
            while not self.units[self._pos][1]:
                self._pos = (self._pos + 1) % len(self.units)
        data, _ = self.units[self._pos]
        self._pos = (self._pos + 1) % len(self.units)
        packet = av.Packet(data)
        packet.pts = int(self._count * self.interval * self.clock)
        packet.time_base = fractions.Fraction(1, self.clock)
        self._count += 1
        return packet


async def teach(url: str, room: str, units, opus) -> tuple[PeerSession, list[PacketTrack]]:
    video = PacketTrack("video", units, 1 / 30, 90000)
    audio = PacketTrack("audio", [(p, True) for p in opus], 0.02, 48000)
    session = await publish(url, room, issue_token(SECRET, "teacher", room, "Bench Teacher", 3600), [video, audio])
    for sender in session.pc.getSenders():
        if sender.track is video:
            sender._send_keyframe = video.request_keyframe  # honour PLIs (private, aiortc 1.16)
    await asyncio.wait_for(session.connected.wait(), 20)
    return session, [video, audio]


async def student(url: str, room: str, name: str, counter: collections.Counter) -> PeerSession:
    """A real WHEP peer that counts RTP packets and drops them before SRTP (no decrypt/decode)."""
    session = await watch(url, room, issue_token(SECRET, "student", room, name, 3600))

    def accept(data: bytes) -> bool:
        if len(data) > 12 and 127 < data[0] < 192 and not 191 < data[1] < 209:
            counter[name] += 1
            return False
        return True

    aiortc_glue.intercept_datagrams(session.pc, accept)
    await asyncio.wait_for(session.connected.wait(), 20)
    return session


def hot_path_ns() -> float:
    """Nanoseconds per packet the recorder adds to the live path (its sink's ``on_rtp``)."""
    from skyclass.recordings.recorder import _Source, _Tap

    stream = type("S", (), {"kind": "video", "mime_type": "video/H264", "clock_rate": 90000})()
    queue: collections.deque = collections.deque(maxlen=50_000)
    tap = _Tap(queue, _Source("bench"), stream)  # type: ignore[arg-type]
    payload = bytes(1200)
    n = 200_000
    start = time.perf_counter_ns()
    for i in range(n):
        tap.on_rtp(i & 0xFFFF, i * 3000, 0, payload, False)
    return (time.perf_counter_ns() - start) / n


# --- serving ------------------------------------------------------------------------------

STATIC_SERVER = """
import sys
from aiohttp import web
app = web.Application()
app.router.add_static("/files/", sys.argv[2])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


async def hammer(urls: list[str], seconds: float, concurrency: int) -> dict[str, float]:
    """GET ``urls`` (at random) from ``concurrency`` clients for ``seconds``."""
    done = errors = size = 0
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        async def client() -> None:
            nonlocal done, errors, size
            while time.monotonic() < deadline:
                async with http.get(random.choice(urls)) as resp:
                    body = await resp.read()
                    if resp.status == 200:
                        done += 1
                        size += len(body)
                    else:
                        errors += 1

        start = time.monotonic()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.monotonic() - start
    return {"requests_per_s": round(done / wall, 1), "mb_per_s": round(size / wall / 1e6, 1), "errors": errors}


# --- the run --------------------------------------------------------------------------------

async def run(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    aiortc_glue.restrict_host_addresses(["127.0.0.1"])
    units, opus = encode_clip(), encode_opus()
    clip_kbps = sum(len(u) for u, _ in units) * 8 / (len(units) / 30) / 1000
    server = ServerProcess("skyclass", data, SECRET, extra=["--workers", str(args.workers), "--no-record", "bench-live*"])
    results: dict[str, Any] = {"clip_video_kbps": round(clip_kbps), "students": args.students,
                               "window_s": args.window, "workers": args.workers}
    try:
        # 1-2: ingress alone, then with students (a room that is not recorded)
        teacher, _ = await teach(server.url, "bench-live", units, opus)
        await asyncio.sleep(args.settle)
        window = Window(server.proc.pid)
        await asyncio.sleep(args.window)
        results["ingress"] = window.end()
        counter: collections.Counter = collections.Counter()
        students = [await student(server.url, "bench-live", f"s{i}", counter) for i in range(args.students)]
        await asyncio.sleep(args.settle)
        before = sum(counter.values())
        window = Window(server.proc.pid)
        await asyncio.sleep(args.window)
        results["fanout"] = window.end()
        results["fanout"]["student_pps"] = round((sum(counter.values()) - before) / args.window / max(1, args.students))
        await asyncio.gather(*(s.close() for s in students), return_exceptions=True)
        await teacher.close()
        await asyncio.sleep(1.0)

        # 3: the same lesson, recorded
        teacher, _ = await teach(server.url, "bench-rec", units, opus)
        await asyncio.sleep(args.settle)
        window = Window(server.proc.pid)
        await asyncio.sleep(args.window)
        results["recording"] = window.end()

        # 4: replay available after the end
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{server.url}/api/recordings?room=bench-rec") as resp:
                rec = (await resp.json())["recordings"][0]
            ended = time.monotonic()
            await teacher.close()
            delete_done = time.monotonic() - ended
            vod_after = None
            while time.monotonic() - ended < 30:
                async with http.get(f"{server.url}{rec['playlist']}") as resp:
                    if resp.status == 200 and "#EXT-X-ENDLIST" in await resp.text():
                        vod_after = time.monotonic() - ended
                        break
                await asyncio.sleep(0.01)
            # the catalogue entry is finalised just after the playlist's ENDLIST is written
            deadline = time.monotonic() + 10
            while True:
                async with http.get(f"{server.url}/api/recordings/{rec['id']}") as resp:
                    rec = await resp.json()
                if rec["state"] != "recording" or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
        results["replay"] = {"vod_after_end_s": None if vod_after is None else round(vod_after, 3),
                             "delete_s": round(delete_done, 3), "duration_s": rec["duration"],
                             "segments": rec["segments"], "size_bytes": rec["size"], "state": rec["state"]}

        # 5: serving the segments, against two static servers on the same files
        directory = data / "recordings" / rec["id"]
        names = sorted(p.name for p in directory.glob("seg_*.m4s"))
        results["serving"] = {"segment_kb": round(sum((directory / n).stat().st_size for n in names)
                                                  / max(1, len(names)) / 1000, 1)}
        static_port, simple_port = free_port(), free_port()
        static = subprocess.Popen([sys.executable, "-c", STATIC_SERVER, str(static_port), str(directory)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        simple = subprocess.Popen([sys.executable, "-m", "http.server", str(simple_port), "--bind", "127.0.0.1",
                                   "--directory", str(directory)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            wait_http(f"http://127.0.0.1:{static_port}/files/{names[0]}")
            wait_http(f"http://127.0.0.1:{simple_port}/{names[0]}")
            targets = {
                "skyclass": [f"{server.url}/replay/{rec['id']}/{n}" for n in names],
                "aiohttp_static": [f"http://127.0.0.1:{static_port}/files/{n}" for n in names],
                "http_server": [f"http://127.0.0.1:{simple_port}/{n}" for n in names],
            }
            # Alternate the servers in short rounds so that a burst of other work on this
            # (shared) machine does not land on one of them only.
            rounds = 3
            totals: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
            for _ in range(rounds):
                for name, urls in targets.items():
                    totals[name].append(await hammer(urls, args.serve_seconds / rounds, args.concurrency))
            for name, runs in totals.items():
                results["serving"][name] = {
                    "requests_per_s": round(sum(x["requests_per_s"] for x in runs) / rounds, 1),
                    "mb_per_s": round(sum(x["mb_per_s"] for x in runs) / rounds, 1),
                    "errors": sum(int(x["errors"]) for x in runs)}
        finally:
            for proc in (static, simple):
                proc.terminate()
                proc.wait()
    finally:
        server.stop()
    results["hot_path_ns_per_packet"] = round(hot_path_ns(), 1)
    return results


def summarize(r: dict[str, Any]) -> dict[str, Any]:
    ingress, fanout, recording = r["ingress"], r["fanout"], r["recording"]
    per_student = (fanout["server_pct_core"] - ingress["server_pct_core"]) / max(1, r["students"])
    pps = fanout.get("student_pps", 0)
    hot_pct = r["hot_path_ns_per_packet"] * pps / 1e7  # ns/packet x packets/s -> % of a core
    serving = r["serving"]
    best_static = max(serving["aiohttp_static"]["mb_per_s"], serving["http_server"]["mb_per_s"])
    return {
        "recording_pct_core": round(recording["recorder_thread_pct_core"] + hot_pct, 3),
        "recording_thread_pct_core": recording["recorder_thread_pct_core"],
        "recording_hot_path_pct_core": round(hot_pct, 3),
        "recording_process_delta_pct_core": round(recording["server_pct_core"] - ingress["server_pct_core"], 2),
        "fanout_pct_core_per_student": round(per_student, 2),
        "recording_in_students": round((recording["recorder_thread_pct_core"] + hot_pct) / per_student, 2)
        if per_student > 0 else None,
        "vod_after_end_s": r["replay"]["vod_after_end_s"],
        "serving_vs_static": round(serving["skyclass"]["mb_per_s"] / best_static, 2) if best_static else None,
    }


def print_table(r: dict[str, Any], s: dict[str, Any]) -> None:
    lines = [f"lesson: 640x480 30 fps H.264 ~{r['clip_video_kbps']} kbps + Opus; window {r['window_s']} s; "
             f"fan-out workers: {r['workers']}",
             f"{'phase':<28}{'server %core':>14}{'recorder thread':>17}{'busy %':>9}"]
    for phase, label in (("ingress", "teacher only (not recorded)"), ("fanout", f"+ {r['students']} students"),
                         ("recording", "teacher, recorded")):
        w = r[phase]
        lines.append(f"{label:<28}{w['server_pct_core']:>14.2f}{w['recorder_thread_pct_core']:>17.3f}"
                     f"{w['machine_busy_pct']:>9.1f}")
    lines += [
        f"recording one lesson: {s['recording_pct_core']:.2f} % of a core (writer thread "
        f"{s['recording_thread_pct_core']:.2f} + live path {s['recording_hot_path_pct_core']:.3f}; process delta "
        f"{s['recording_process_delta_pct_core']:.2f}) = {s['recording_in_students']} students' fan-out "
        f"({s['fanout_pct_core_per_student']:.2f} % each)   target < {TARGETS['recording_pct_core']} %",
        f"replay complete (VOD) {s['vod_after_end_s']} s after the lesson ended   target < "
        f"{TARGETS['vod_after_end_s']} s",
        f"{'segments (' + str(r['serving']['segment_kb']) + ' kB each)':<28}{'req/s':>10}{'MB/s':>10}{'errors':>8}",
    ]
    for name in ("skyclass", "aiohttp_static", "http_server"):
        row = r["serving"][name]
        lines.append(f"{name:<28}{row['requests_per_s']:>10.1f}{row['mb_per_s']:>10.1f}{row['errors']:>8}")
    lines.append(f"serving vs the faster static server: {s['serving_vs_static']}   target >= "
                 f"{TARGETS['serving_vs_static']}")
    sys.stdout.write("\n".join(lines) + "\n")


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=float, default=10.0, help="seconds per CPU window")
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--students", type=int, default=5)
    parser.add_argument("--serve-seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0, help="server fan-out workers (0: in the front process)")
    parser.add_argument("--quick", action="store_true", help="short windows (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.window, args.settle, args.students, args.serve_seconds = 2.0, 1.0, 1, 1.0
    logging.basicConfig(level=logging.WARNING)
    data = Path(tempfile.mkdtemp(prefix="record-bench-"))
    try:
        results = asyncio.run(run(args, data))
    finally:
        shutil.rmtree(data, ignore_errors=True)
    results["summary"] = summarize(results)
    results["targets"] = TARGETS
    print_table(results, results["summary"])
    sys.stdout.write(json.dumps(results) + "\n")
    return results


if __name__ == "__main__":
    main()
