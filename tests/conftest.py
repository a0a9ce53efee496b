"""Fixtures: the real server as a subprocess on a free port, tokens, loopback-only ICE for clients."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Optional

import pytest

from skyclass.media import aiortc_glue
from skyclass.server.tokens import issue_token

SECRET = "test-secret-not-for-production-0123456789"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_binary(path: str) -> None:
    """Skip when a binary is absent, except under CI where every test must run."""
    if shutil.which(path) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{path} is required under CI but missing")
        pytest.skip(f"{path} not installed")


# Generous for a loaded 2-core CI machine whose consent replies come late; tests that wait
# for a vanished peer to be dropped derive their bounds from it.
PEER_TIMEOUT = 8


class ServerProcess:
    """``skyclass serve`` in a subprocess, media on 127.0.0.1 only."""

    def __init__(self, data: Path, extra: Optional[list[str]] = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = data
        self.log_path = data / "server.log"
        data.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "skyclass.server.cli", "serve", "--host", "127.0.0.1",
                "--port", str(self.port), "--data", str(data), "--secret", SECRET,
                "--ice-address", "127.0.0.1", "--peer-timeout", str(PEER_TIMEOUT), "--workers", "2"] + (extra or [])
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"server not ready: {self.log()}")

    def token(self, role: str, room: str, name: str = "someone", ttl: int = 3600) -> str:
        return issue_token(SECRET, role, room, name, ttl)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-5000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(autouse=True)
def loopback_ice() -> None:
    """aioice skips 127.0.0.1 when gathering; test clients must offer it (testing.md)."""
    aiortc_glue.restrict_host_addresses(["127.0.0.1"])


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("server"))
    yield proc
    proc.stop()


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path / "server")
    yield proc
    proc.stop()


class RedisServer:
    """A throwaway ``redis-server`` on a free port: no persistence, stopped at the end."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server for the whole session (skipped without it, unless CI is set)."""
    require_binary("redis-server")
    redis = RedisServer()
    yield redis.url
    redis.stop()
