"""What the benchmarks and the load-test harness share: client processes, the server under
test as a subprocess, and reading CPU, memory and metrics.

One copy, so that ``fanout_bench`` and the harness measure a server the same way and a fix
to, say, how a process tree's CPU is read reaches both.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

from skyclass.server.tokens import issue_token

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# --- measuring ------------------------------------------------------------------------

def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) from ``/proc/PID/stat``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    return children


def process_tree(pid: int) -> list[int]:
    """``pid`` and every live descendant (a server's fan-out workers are its children)."""
    children = _children_by_parent()
    result, todo = [], [pid]
    while todo:
        current = todo.pop()
        if os.path.exists(f"/proc/{current}"):
            result.append(current)
            todo.extend(children.get(current, []))
    return result


def process_tree_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds of ``pid`` and of every live descendant, by pid."""
    result: dict[int, float] = {}
    for current in process_tree(pid):
        try:
            result[current] = process_cpu_seconds(current)
        except (OSError, IndexError, ValueError):
            continue
    return result


def process_tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants (shared pages counted in each)."""
    total = 0
    for current in process_tree(pid):
        try:
            with open(f"/proc/{current}/statm") as f:
                total += int(f.read().split()[1]) * PAGE_SIZE
        except (OSError, IndexError, ValueError):
            continue
    return total


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from ``/proc/stat``."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


def find_listening_pid(port: int, host: str = "127.0.0.1") -> Optional[int]:
    """The pid of the process listening on TCP ``port`` on this machine, or None.

    Lets the harness read a local server's CPU from ``/proc`` when someone else started
    it (a test fixture, ``scripts/serve``): the server's ``/metrics`` has no CPU figure.
    """
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    local, state, inode = parts[1], parts[3], parts[9]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        inodes.add(inode)
        except OSError:
            continue
    if not inodes:
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}
    candidates = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if os.readlink(f"/proc/{entry}/fd/{fd}") in targets:
                    candidates.append(int(entry))
                    break
        except OSError:
            continue
    if not candidates:
        return None
    # With SO_REUSEPORT children the parent is the root of the tree: the smallest pid in it.
    children = _children_by_parent()
    parents = {c: p for p, cs in children.items() for c in cs}
    roots = [c for c in candidates if parents.get(c) not in candidates]
    return min(roots or candidates)


def scrape_metrics(base_url: str, labelled: bool = False, timeout: float = 10.0) -> dict[str, float]:
    """Samples of a Prometheus text page by name; with ``labelled`` also the labelled ones,
    keyed ``name{labels}`` exactly as exposed."""
    with urllib.request.urlopen(base_url.rstrip("/") + "/metrics", timeout=timeout) as resp:
        text = resp.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or ("{" in line and not labelled):
            continue
        name, _, value = line.rpartition(" ")
        try:
            values[name] = float(value)
        except ValueError:
            pass
    return values


def metric(values: dict[str, float], name: str) -> float:
    """A counter by its name with or without the ``_total`` suffix (0 if absent)."""
    return values.get(name + "_total", values.get(name, 0.0))


def percentile(values: list[float], p: float) -> Optional[float]:
    """Nearest-rank percentile (``p`` in 0-100) or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, int(-(-p * len(ordered) // 100)))  # ceil
    return ordered[min(rank, len(ordered)) - 1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- processes --------------------------------------------------------------------------

class PipeProcess:
    """A ``multiprocessing`` (spawn) process driven by request/reply messages."""

    def __init__(self, target: Any, *args: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=target, args=(child, *args), daemon=True)
        self.process.start()
        child.close()

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid

    def send(self, op: str, **kwargs: Any) -> None:
        self.conn.send({"op": op, **kwargs})

    def reply(self, timeout: float = 300.0) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError("no reply from client process")
        result = self.conn.recv()
        if isinstance(result, dict) and "error" in result:
            raise RuntimeError(result["error"])
        return result

    def call(self, op: str, timeout: float = 300.0, **kwargs: Any) -> Any:
        self.send(op, **kwargs)
        return self.reply(timeout)

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.call("exit", timeout=15)
            except Exception:
                pass
            self.process.join(5)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()


class ServerProcess:
    """A server under test as a subprocess on a free port: ``skyclass serve`` (media on
    127.0.0.1 only) or the MediaRelay baseline. ``extra`` flags go to ``serve``."""

    def __init__(self, kind: str, data: Path, secret: str, extra: Optional[list[str]] = None,
                 ready_timeout: float = 30.0, log_level: str = "INFO") -> None:
        self.kind = kind
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.secret = secret
        data.mkdir(parents=True, exist_ok=True)
        if kind == "skyclass":
            args = [sys.executable, "-m", "skyclass.server.cli", "--log-level", log_level, "serve", "--host", "127.0.0.1",
                    "--port", str(self.port), "--data", str(data), "--secret", secret,
                    "--ice-address", "127.0.0.1"] + list(extra or [])
        else:
            args = [sys.executable, "-m", "skyclass.loadtest.relay_baseline", "--host", "127.0.0.1",
                    "--port", str(self.port), "--ice-address", "127.0.0.1"]
        self.log_path = data / "server.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.pid = self.proc.pid
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{kind} server exited: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{kind} server not ready: {self.log_tail()}")
                time.sleep(0.1)

    def token(self, role: str, room: str, name: str) -> str:
        return issue_token(self.secret, role, room, name, 3600)

    def log_tail(self, chars: int = 3000) -> str:
        self._log.flush()
        return self.log_path.read_text()[-chars:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()


class RedisServer:
    """A throwaway ``redis-server`` on a free port (no persistence) for benchmarks on several nodes."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("this benchmark needs redis-server on PATH (apt install redis-server)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)
