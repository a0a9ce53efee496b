"""The front's side of the fan-out workers: spawn them, route each student to one, watch them.

The front process keeps the teachers (ingress: ICE, DTLS, SRTP decrypt, keyframe
aggregation, packet cache, recorder) where no fan-out can starve it, and serves every
room's packets to the workers through a :class:`~skyclass.media.relay.RelayOrigin`.
Students are spread over the workers with the fewest viewers; past every worker's
capacity a student is refused with 503 rather than degrading the lesson for everyone.
A worker that dies loses only its own students, whose pages reconnect and land on a
live worker; it is restarted.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import aiohttp

from skyclass.media.relay import RelayOrigin

from .config import Config
from .errors import HttpError
from .rooms import RoomRegistry, Session

logger = logging.getLogger(__name__)

POLL_INTERVAL = 0.5
RETRY_AFTER_SECONDS = 5


@dataclass
class Worker:
    index: int
    socket: Path
    process: Optional[asyncio.subprocess.Process] = None
    http: Optional[aiohttp.ClientSession] = None
    up: bool = False
    viewers: set[str] = field(default_factory=set)
    pending: int = 0  # offers being negotiated right now
    counters: dict[str, int] = field(default_factory=dict)
    restarts: int = 0
    started_at: float = 0.0

    @property
    def load(self) -> int:
        return len(self.viewers) + self.pending


class WorkerPool:
    def __init__(self, config: Config, registry: RoomRegistry) -> None:
        self.config = config
        self.registry = registry
        self.count = config.workers
        self.capacity = config.max_viewers_per_worker
        self.run_dir = config.data / "run"
        self.origin = RelayOrigin(self._room_streams)
        self.workers: list[Worker] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        registry.close_remote = self._close_remote

    def _room_streams(self, room: str) -> Optional[dict]:
        found = self.registry.get(room)
        return found.router.streams if found is not None else None

    # lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        await self.origin.start()
        self.workers = [Worker(i, self.run_dir / f"worker-{i}-{secrets.token_hex(3)}.sock") for i in range(self.count)]
        await asyncio.gather(*(self._spawn(w) for w in self.workers))
        self._tasks = [asyncio.ensure_future(self._supervise(w)) for w in self.workers]
        self._tasks.append(asyncio.ensure_future(self._poll()))
        logger.info("%d fan-out workers up, relay origin %s", self.count, self.origin.address)

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for w in self.workers:
            if w.process and w.process.returncode is None:
                w.process.terminate()
        for w in self.workers:
            if w.process:
                try:
                    await asyncio.wait_for(w.process.wait(), 5)
                except asyncio.TimeoutError:
                    w.process.kill()
            if w.http:
                await w.http.close()
            w.socket.unlink(missing_ok=True)
        self.origin.close()

    async def _spawn(self, w: Worker) -> None:
        host, port = self.origin.address
        args = [sys.executable, "-m", "skyclass.server.worker", "--index", str(w.index), "--socket", str(w.socket),
                "--origin", f"{host}:{port}", "--peer-timeout", str(self.config.peer_timeout),
                "--keyframe-interval", str(self.config.keyframe_interval),
                "--log-level", logging.getLevelName(logging.getLogger().level)]
        for addr in self.config.ice_addresses:
            args += ["--ice-address", addr]
        w.socket.unlink(missing_ok=True)
        # stdin is a pipe we never write: the worker exits when the front goes away.
        w.process = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.PIPE)
        w.started_at = time.monotonic()
        if w.http is None or w.http.closed:
            w.http = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(w.socket)),
                                           timeout=aiohttp.ClientTimeout(total=15))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and w.process.returncode is None:
            try:
                async with w.http.get("http://worker/status") as resp:
                    if resp.status == 200:
                        w.up = True
                        logger.info("worker %d up (pid %d)", w.index, w.process.pid)
                        return
            except (aiohttp.ClientError, OSError):
                pass
            await asyncio.sleep(0.1)
        logger.error("worker %d did not start", w.index)

    async def _supervise(self, w: Worker) -> None:
        """Restart a worker that died, after ending its students' sessions here."""
        while not self._closing:
            assert w.process is not None
            code = await w.process.wait()
            if self._closing:
                return
            w.up = False
            lost = list(w.viewers)
            logger.error("worker %d exited with %s; %d viewers lost, restarting", w.index, code, len(lost))
            await self._forget(w, lost)
            w.restarts += 1
            await asyncio.sleep(min(0.5 * w.restarts, 5))
            await self._spawn(w)

    async def _forget(self, w: Worker, session_ids: list[str]) -> None:
        for sid in session_ids:
            w.viewers.discard(sid)
            session = self.registry.sessions.get(sid)
            if session is not None:
                await self.registry.close_session(session, reason=f"worker {w.index} dropped it", remote_ended=True)

    async def _poll(self) -> None:
        """Learn which viewers each worker still has (ICE consent failures end them there)."""
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            for w in self.workers:
                if not w.up or w.http is None:
                    continue
                try:
                    async with w.http.get("http://worker/status") as resp:
                        status = await resp.json()
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
                    continue
                w.counters = status["counters"]
                alive = set(status["viewers"])
                # Only sessions the worker had and lost; ones still being created are pending.
                gone = [sid for sid in w.viewers if sid not in alive]
                if gone:
                    await self._forget(w, gone)

    # routing ---------------------------------------------------------------------------
    def _pick(self) -> Worker:
        candidates = [w for w in self.workers if w.up and w.load < self.capacity]
        if not candidates:
            up = sum(1 for w in self.workers if w.up)
            raise HttpError(503, "over capacity",
                            f"all {up} fan-out workers are full ({self.capacity} viewers each); retry shortly",
                            headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        return min(candidates, key=lambda w: w.load)

    @property
    def ready(self) -> bool:
        return any(w.up and w.load < self.capacity for w in self.workers)

    async def open_viewer(self, registry: RoomRegistry, room_name: str, name: str, offer: str,
                          kinds: list[str]) -> tuple[Session, str]:
        w = self._pick()
        room = registry.get_or_create(room_name)  # the origin's room: the worker subscribes to it
        session = Session(kind="whep", room=room_name, name=name, pc=None, worker=w.index)
        body = {"room": room_name, "name": name, "offer": offer, "kinds": kinds, "session_id": session.id,
                "codecs": {k: v for k, v in room.router.codecs().items() if v}}
        w.pending += 1
        try:
            assert w.http is not None
            async with w.http.post("http://worker/viewers", json=body) as resp:
                result = await resp.json()
                status = resp.status
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            result, status = {"status": 503, "error": "over capacity",
                              "detail": f"fan-out worker {w.index} unavailable: {exc}"}, 503
        finally:
            w.pending -= 1
        if status != 201:
            if room.idle:
                registry.drop_room(room)
            headers = {"Retry-After": "1"} if status == 503 else None
            raise HttpError(result.get("status", status), result.get("error", "error"), result.get("detail", ""),
                            headers=headers)
        w.viewers.add(session.id)
        registry.add_session(session)
        return session, result["answer"]

    async def _close_remote(self, session: Session) -> None:
        w = self.workers[session.worker] if session.worker is not None else None
        if w is None:
            return
        w.viewers.discard(session.id)
        if not w.up or w.http is None:
            return
        try:
            async with w.http.delete(f"http://worker/viewers/{session.id}") as resp:
                await resp.read()
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            pass

    def worker_stats(self) -> list[dict]:
        return [{"worker": w.index, "up": w.up, "viewers": len(w.viewers), "restarts": w.restarts,
                 "pid": w.process.pid if w.process else None, "counters": w.counters} for w in self.workers]
