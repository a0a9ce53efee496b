"""A client process of the load-test harness: simulated students (live and replay) and teachers.

The orchestrator (:mod:`skyclass.loadtest.runner`) sends each process its whole schedule up
front, with times on the machine's monotonic clock (shared by every process), and then
only samples it. So a busy orchestrator can never delay a join, a drop or a rejoin, and
the join storm's shape is the scenario's, not the pipe's.

Students are :class:`skyclass.loadtest.light_clients.CountingStudent` (real aiortc peers
that read clear RTP headers and never decrypt or decode), teachers publish the
pre-encoded clip of :mod:`light_clients`, replay viewers are
:class:`skyclass.loadtest.hls_clients.ReplayViewer`. Ops (one reply each, over the pipe):

* ``live(url, sessions)``: schedule student sessions (join at, leave at, how, impairment);
* ``teach(url, clip, fps, lessons)``: schedule teachers (publish at, unpublish at);
* ``replay(url, viewers)``: schedule replay viewers;
* ``sample()``: cumulative counters of everything, this process's CPU and event-loop lag;
* ``finish()``: end whatever still runs and return every session's record.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

import aiohttp

from skyclass.media import aiortc_glue

from . import light_clients
from .clients import SignallingFailed, publish
from .hls_clients import ReplayViewer

logger = logging.getLogger(__name__)

RTP_FIRST_BYTE = range(128, 192)
RTCP_SECOND_BYTE = range(192, 209)


def lossy_filter(drop_every: int) -> tuple[Callable[[bytes], bool], dict[str, int]]:
    """A datagram filter for :func:`aiortc_glue.intercept_datagrams` that drops the first
    arrival of every ``drop_every``-th RTP packet, and its ground-truth counters.

    Only RTP is dropped (STUN, DTLS and RTCP pass, so the peer stays connected), and only
    first arrivals: a NACKed retransmission of a dropped packet passes, like on a real
    lossy link whose loss is random rather than aimed at one sequence number.
    """
    counts = {"rtp": 0, "dropped": 0}
    dropped: set[bytes] = set()

    def accept(data: bytes) -> bool:
        if len(data) < 12 or data[0] not in RTP_FIRST_BYTE or data[1] in RTCP_SECOND_BYTE:
            return True
        key = data[2:4] + data[8:12]  # sequence number + SSRC: clear in SRTP
        if key in dropped:
            return True  # a retransmission
        counts["rtp"] += 1
        if counts["rtp"] % drop_every == 0:
            counts["dropped"] += 1
            dropped.add(key)
            return False
        return True

    return accept, counts


class LiveSession:
    """One attempt of one student to watch a room, as the scenario scheduled it."""

    def __init__(self, spec: dict, feedback: bool) -> None:
        self.id: str = spec["id"]
        self.student_name: str = spec.get("student", self.id)
        self.room: str = spec["room"]
        self.token: str = spec["token"]
        self.join_at: float = spec["join_at"]
        self.leave_at: Optional[float] = spec.get("leave_at")
        self.leave_mode: str = spec.get("leave_mode", "leave")
        self.drop_every: int = int(spec.get("drop_every", 0))
        self.student = light_clients.CountingStudent(self.id, feedback=feedback)
        self.state = "scheduled"
        self.failure = ""
        self.http_status: Optional[int] = None
        self.attempts = 0
        self.requested_at: Optional[float] = None
        self.ended_at: Optional[float] = None
        self.injected: Optional[dict[str, int]] = None

    async def run(self, url: str, limit: asyncio.Semaphore, timeout: float, stop: asyncio.Event) -> None:
        await asyncio.sleep(max(0.0, self.join_at - time.monotonic()))
        if stop.is_set():
            self.state = "not started"
            return
        self.state = "joining"
        self.requested_at = time.monotonic()
        deadline = self.requested_at + timeout
        try:
            await self._join(url, deadline, limit)
        except Exception as exc:
            self.state = "failed"
            self.failure = self.failure or f"{exc.__class__.__name__}: {exc}"
            await self.student.close()
            return
        self.state = "connected"
        # Stay until the scenario says so (a drop) or the run ends.
        wait = None if self.leave_at is None else max(0.0, self.leave_at - time.monotonic())
        try:
            await asyncio.wait_for(stop.wait(), wait)
            return  # the run ended: finish() closes everything
        except asyncio.TimeoutError:
            pass
        await self.leave(self.leave_mode)

    async def _join(self, url: str, deadline: float, limit: asyncio.Semaphore) -> None:
        """WHEP with a browser's patience: retry a 503 after its Retry-After until the deadline.

        ``limit`` bounds the handshakes this process runs at once (offer, POST, ICE, DTLS),
        so a join storm cannot starve the students already watching here; a student
        waiting for it is already "requesting" (its join time includes the wait, and the
        report flags harness lag when that matters)."""
        while True:
            self.attempts += 1
            try:
                async with limit:
                    await asyncio.wait_for(self._attempt(url), max(0.1, deadline - time.monotonic()))
                break
            except SignallingFailed as exc:
                self.http_status = exc.status
                self.failure = f"HTTP {exc.status}: {exc.text.strip()[:120]}"
                retry = exc.headers.get("Retry-After")
                if exc.status != 503 or retry is None:
                    raise
                pause = float(retry) if retry.replace(".", "", 1).isdigit() else 5.0
                if time.monotonic() + pause >= deadline:
                    raise
                await asyncio.sleep(pause)
                self.student = light_clients.CountingStudent(self.id, feedback=self.student.feedback)
        self.failure = ""

    async def _attempt(self, url: str) -> None:
        """One WHEP request, then ICE and DTLS until connected."""
        await self.student.join(url, self.room, self.token)
        self.http_status = 201
        session = self.student.session
        assert session is not None
        if self.drop_every:
            # Wraps the student's own counting handler: drops happen before it counts.
            accept, self.injected = lossy_filter(self.drop_every)
            aiortc_glue.intercept_datagrams(session.pc, accept)
        await session.connected.wait()

    async def leave(self, mode: str) -> None:
        if self.state != "connected":
            return
        self.ended_at = time.monotonic()
        self.state = {"vanish": "vanished", "end": "ended"}.get(mode, "left")
        session = self.student.session
        if mode == "vanish" and session is not None:
            aiortc_glue.vanish(session.pc)
            self.student.stop_counting()
            await session.pc.close()
            self.student.session = None
        else:
            self.student.stop_counting()
            await self.student.close()

    def sample(self, now: float) -> tuple:
        totals = self.student.sample(now) if self.state == "connected" else self.student.last_sample
        return (self.state, *totals)

    def record(self) -> dict[str, Any]:
        times = self.student.event_times()
        since = self.requested_at

        def rel(t: Optional[float]) -> Optional[float]:
            return None if t is None or since is None else round(t - since, 4)

        return {
            "id": self.id, "student": self.student_name, "room": self.room, "state": self.state,
            "failure": self.failure, "http_status": self.http_status, "attempts": self.attempts,
            "scheduled_at": self.join_at, "requested_at": self.requested_at, "ended_at": self.ended_at,
            "answer_s": rel(times.get("answered_at")), "ice_s": rel(times.get("ice_connected_at")),
            "dtls_s": rel(times.get("connected_at")), "first_packet_s": rel(times.get("first_packet_at")),
            "keyframe_s": rel(times.get("keyframe_at")), "keyframe_at": times.get("keyframe_at"),
            "drop_every": self.drop_every, "injected": self.injected,
            "media": self.student.summary(),
        }


class Teacher:
    """A scheduled lesson's teacher: publishes the clip at ``at``, unpublishes at ``until``."""

    def __init__(self, spec: dict) -> None:
        self.room: str = spec["room"]
        self.token: str = spec["token"]
        self.at: float = spec["at"]
        self.until: float = spec["until"]
        self.state = "scheduled"
        self.failure = ""
        self.connected_in: Optional[float] = None
        self.live_at: Optional[float] = None
        self.session = None
        self.video: Optional[light_clients.PacketVideoTrack] = None
        self.packets_sent = 0

    async def run(self, url: str, units: list, opus: list, fps: int, stop: asyncio.Event) -> None:
        await asyncio.sleep(max(0.0, self.at - time.monotonic()))
        for attempt in range(3):  # an encoder retries a failed WHIP publish
            try:
                self.video = light_clients.PacketVideoTrack(units, fps)
                audio = light_clients.PacketAudioTrack(opus)
                self.session = await publish(url, self.room, self.token, [self.video, audio])
                light_clients.honour_keyframe_requests(self.session, self.video)
                await asyncio.wait_for(self.session.connected.wait(), 15)
                self.connected_in = time.monotonic() - self.session.posted_at
                self.live_at = time.monotonic()
                self.state = "live"
                break
            except Exception as exc:
                self.failure = f"{exc.__class__.__name__}: {exc}"
                logger.warning("room=%s teacher publish attempt %d failed: %s", self.room, attempt + 1, self.failure)
                await self._close()
                await asyncio.sleep(1.0)
        else:
            self.state = "failed"
            return
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, self.until - time.monotonic()))
        except asyncio.TimeoutError:
            pass
        await self.end()

    async def _close(self) -> None:
        if self.session is not None:
            try:
                await asyncio.wait_for(self.session.close(delete=True), 5)
            except Exception:
                await self.session.pc.close()
            self.session = None

    async def end(self) -> None:
        if self.state == "live":
            self.packets_sent = await self.count_sent()
            self.state = "ended"
        await self._close()

    async def count_sent(self) -> int:
        sent = 0
        if self.session is not None:
            for sender in self.session.pc.getSenders():
                for stats in (await sender.getStats()).values():
                    if stats.type == "outbound-rtp":
                        sent += stats.packetsSent
        return sent

    def record(self) -> dict[str, Any]:
        return {"room": self.room, "state": self.state, "failure": self.failure,
                "connected_in_s": None if self.connected_in is None else round(self.connected_in, 3),
                "live_at": self.live_at, "packets_sent": self.packets_sent,
                "keyframes_sent": getattr(self.video, "keyframes_sent", 0),
                "keyframe_requests": getattr(self.video, "keyframe_requests", 0)}


def harness_worker_main(conn: Any, worker_id: int, host_addresses: Optional[list[str]] = None) -> None:
    """Entry point of a client process (``multiprocessing`` spawn). ``host_addresses``:
    the ICE host candidates its peers may offer (["127.0.0.1"] against a server on this
    machine; None to gather the machine's interfaces for a remote deployment)."""
    sessions: dict[str, LiveSession] = {}
    teachers: list[Teacher] = []
    viewers: list[ReplayViewer] = []
    tasks: list[asyncio.Task] = []
    state: dict[str, Any] = {"lag": 0.0, "stop": None, "limit": None, "http": None, "ticker": None}

    def stop_event() -> asyncio.Event:
        if state["stop"] is None:
            state["stop"] = asyncio.Event()
        return state["stop"]

    async def ticker() -> None:
        """Event-loop lag (if high, delays measured here are ours) and the students' NACK
        retries and PLIs, for all students from one timer rather than one each."""
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.05)
            now = time.monotonic()
            state["lag"] = max(state["lag"], now - before - 0.05)
            for session in sessions.values():
                if session.state == "connected":
                    session.student.maintain(now)

    def ensure_ticker() -> None:
        if state["ticker"] is None:
            state["ticker"] = asyncio.ensure_future(ticker())

    async def live(url: str, sessions_: list[dict], timeout: float = 20.0, concurrency: int = 16,
                   feedback: bool = True) -> dict:
        ensure_ticker()
        if state["limit"] is None:
            state["limit"] = asyncio.Semaphore(concurrency)
        for spec in sessions_:
            session = sessions[spec["id"]] = LiveSession(spec, feedback)
            # a spec may name its node (a cluster target spreads students as a load balancer would)
            tasks.append(asyncio.ensure_future(session.run(spec.get("url") or url, state["limit"], timeout,
                                                           stop_event())))
        return {"worker": worker_id, "scheduled": len(sessions_)}

    async def teach(url: str, clip: str, fps: int, lessons: list[dict]) -> dict:
        ensure_ticker()
        units = light_clients.load_h264_access_units(Path(clip))
        opus = light_clients.make_opus_packets()
        for spec in lessons:
            teacher = Teacher(spec)
            teachers.append(teacher)
            tasks.append(asyncio.ensure_future(teacher.run(spec.get("url") or url, units, opus, fps, stop_event())))
        return {"worker": worker_id, "scheduled": len(lessons)}

    async def replay(url: str, viewers_: list[dict]) -> dict:
        ensure_ticker()
        if state["http"] is None:
            state["http"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

        async def run_viewer(viewer: ReplayViewer, at: float) -> None:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            if not stop_event().is_set():
                await viewer.play(state["http"], url)

        for spec in viewers_:
            viewer = ReplayViewer(spec["id"], spec["recording"], spec["playlist"], spec["watch"], spec["buffer_ahead"])
            viewers.append(viewer)
            tasks.append(asyncio.ensure_future(run_viewer(viewer, spec["at"])))
        return {"worker": worker_id, "scheduled": len(viewers_)}

    async def sample() -> dict:
        ensure_ticker()
        now = time.monotonic()
        lag, state["lag"] = state["lag"], 0.0
        hist = light_clients.merge_histograms(
            s.student.take_window_histogram() for s in sessions.values() if s.state == "connected" and not s.drop_every)
        return {"worker": worker_id, "time": now, "cpu": light_clients.process_cpu(), "lag": lag, "hist": hist,
                "live": {s.id: s.sample(now) for s in sessions.values()},
                "replay": {v.id: v.sample() for v in viewers},
                "teachers": {t.room: t.state for t in teachers}}

    async def finish() -> dict:
        """End everything still running (students first, then teachers) and report."""
        stop_event().set()
        for session in list(sessions.values()):
            session.student.stop_counting()
        await asyncio.gather(*(s.leave("end") for s in sessions.values()), return_exceptions=True)
        await asyncio.gather(*(t.end() for t in teachers), return_exceptions=True)
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if state["http"] is not None:
            await state["http"].close()
        return {"worker": worker_id, "cpu": light_clients.process_cpu(),
                "live": [s.record() for s in sessions.values()],
                "teachers": [t.record() for t in teachers],
                "replay": [v.record() for v in viewers]}

    async def join_times(ids: list[str]) -> dict:
        """Join outcome of the sessions among ``ids`` that live here (the capacity finder
        judges each step's joins)."""
        out = {}
        for sid in ids:
            session = sessions.get(sid)
            if session is not None:
                record = session.record()
                out[sid] = {"keyframe_s": record["keyframe_s"], "http_status": record["http_status"],
                            "state": record["state"]}
        return out

    light_clients.serve_pipe(conn, {"live": live, "teach": teach, "replay": replay, "sample": sample,
                                    "finish": finish, "join_times": join_times}, host_addresses)
