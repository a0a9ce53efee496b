"""Fan-out workers: students spread over processes, admission control, a worker killed mid-lesson."""

from __future__ import annotations

import asyncio
import os
import signal

import aiohttp
import pytest

from skyclass.loadtest.clients import IndexedVideoTrack, SignallingFailed, ToneAudioTrack, publish

from conftest import ServerProcess
from test_lifecycle import Student, room_state, wait_for


async def readyz(server) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/readyz") as resp:
            return resp.status, await resp.json()


def loss(student: Student) -> float:
    """Fraction of video packets missing from a student's sequence space."""
    seqs = sorted({seq for seq, _, _ in student.video_rtp})
    if len(seqs) < 2:
        return 1.0
    expected = seqs[-1] - seqs[0] + 1
    return 1 - len(seqs) / expected


@pytest.fixture
def small_server(tmp_path):
    proc = ServerProcess(tmp_path / "server", ["--workers", "2", "--max-viewers-per-worker", "3"])
    yield proc
    proc.stop()


async def test_overload_refuses_extra_students_and_keeps_the_lesson(small_server) -> None:
    server, room = small_server, "overload"
    video = IndexedVideoTrack()
    teacher = await publish(server.url, room, server.token("teacher", room, "T"), [video, ToneAudioTrack()])
    admitted: list[Student] = []
    refused: list[SignallingFailed] = []
    try:
        for i in range(12):  # twice the node's capacity of 2 workers x 3
            try:
                admitted.append(await Student().join(server, room, f"s{i}"))
            except SignallingFailed as exc:
                refused.append(exc)
        assert len(admitted) == 6 and len(refused) == 6
        for exc in refused:
            assert exc.status == 503 and int(exc.headers["Retry-After"]) > 0 and "full" in exc.text
        status, body = await readyz(server)
        assert status == 503 and body["ready"] is False
        assert sorted(w["viewers"] for w in body["workers"]) == [3, 3], body
        assert all(await asyncio.gather(*(s.wait_frames(45, 40) for s in admitted)))
        for s in admitted:
            assert loss(s) < 0.01, f"admitted student lost {loss(s):.2%}"
            assert set(s.checker.indices) <= set(video.sent)
        assert teacher.pc.connectionState == "connected"
        state = await room_state(server, room)
        assert state["live"] and state["viewers"] == 6
        # a seat frees up: the next student is admitted again
        await admitted.pop().close()
        admitted.append(await Student().join(server, room, "late"))
        assert await admitted[-1].wait_frames(10, 30)
    finally:
        await asyncio.gather(*(s.close() for s in admitted))
        await teacher.close()


async def test_killed_worker_loses_only_its_students(fresh_server) -> None:
    server, room = fresh_server, "worker-kill"
    video = IndexedVideoTrack()
    teacher = await publish(server.url, room, server.token("teacher", room, "T"), [video, ToneAudioTrack()])
    students = [await Student().join(server, room, f"s{i}") for i in range(6)]
    try:
        assert all(await asyncio.gather(*(s.wait_frames(15, 30) for s in students)))
        _, body = await readyz(server)
        victim = next(w for w in body["workers"] if w["viewers"] > 0)
        survivors_before = {w["worker"]: w["viewers"] for w in body["workers"]}
        assert sum(survivors_before.values()) == 6 and len(survivors_before) == 2
        os.kill(victim["pid"], signal.SIGKILL)

        async def viewers_dropped() -> bool:
            return (await room_state(server, room))["viewers"] == 6 - victim["viewers"]

        assert await wait_for(viewers_dropped, 10), "the dead worker's students were not removed"
        # Students on the other worker carry on without a glitch.
        frames_before = {id(s): s.frames for s in students}
        await asyncio.sleep(3)
        alive = [s for s in students if s.frames > frames_before[id(s)] + 20]
        assert len(alive) == 6 - victim["viewers"], "students of the surviving worker stalled"
        for s in alive:
            assert loss(s) < 0.005, f"surviving student lost {loss(s):.2%}"
        assert teacher.pc.connectionState == "connected"
        # The dead worker's students reconnect (as the watch page does) and get the lesson again.
        lost = [s for s in students if s not in alive]
        for s in lost:
            await s.close(delete=False)
        rejoined = [await Student().join(server, room, f"again{i}") for i in range(len(lost))]
        students = alive + rejoined
        assert all(await asyncio.gather(*(s.wait_frames(10, 30) for s in rejoined)))
        # the worker was restarted
        async def restarted() -> bool:
            _, body = await readyz(server)
            return all(w["up"] for w in body["workers"])

        assert await wait_for(restarted, 15)
    finally:
        await asyncio.gather(*(s.close() for s in students))
        await teacher.close()


async def test_metrics_report_each_process(server) -> None:
    """Ops see the front's CPU and each worker's: CPU per student is a sum over processes."""
    values: dict[str, float] = {}

    async def scraped() -> bool:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{server.url}/metrics") as resp:
                text = await resp.text()
        values.clear()
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        # the front learns workers' figures from their status every half second
        return values.get('skyclass_worker_cpu_seconds_total{worker="1"}', 0) > 0

    assert await wait_for(scraped, 5)
    assert values["process_cpu_seconds_total"] > 0
    workers = {k: v for k, v in values.items() if k.startswith("skyclass_worker_cpu_seconds_total{")}
    assert len(workers) == 2 and all(v > 0 for v in workers.values()), workers
    assert values['skyclass_worker_up{worker="0"}'] == 1 and values['skyclass_worker_up{worker="1"}'] == 1


async def test_single_process_mode_still_serves_students(tmp_path) -> None:
    server = ServerProcess(tmp_path / "server", ["--workers", "0"])
    room = "single"
    try:
        video = IndexedVideoTrack()
        teacher = await publish(server.url, room, server.token("teacher", room, "T"), [video, ToneAudioTrack()])
        students = [await Student().join(server, room, f"s{i}") for i in range(3)]
        try:
            assert all(await asyncio.gather(*(s.wait_frames(20, 30) for s in students)))
            status, body = await readyz(server)
            assert status == 200 and body["workers"][0]["viewers"] == 3
        finally:
            await asyncio.gather(*(s.close() for s in students))
            await teacher.close()
    finally:
        server.stop()
