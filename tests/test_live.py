"""The live path end to end: an aiortc teacher, aiortc students, the real server in between."""

from __future__ import annotations

import asyncio

import aiohttp

from skyclass.loadtest.clients import FrameChecker, IndexedVideoTrack, ToneAudioTrack, publish, watch


async def room_state(server, room: str) -> dict:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/api/rooms/{room}") as resp:
            return await resp.json()


async def start_students(server, room: str, count: int):
    checkers: list[FrameChecker] = []
    sessions = []

    def make_on_track(store: list):
        def on_track(track):
            if track.kind == "video":
                store.append(FrameChecker(track))
        return on_track

    for i in range(count):
        sessions.append(await watch(server.url, room, server.token("student", room, f"s{i}"), make_on_track(checkers)))
    return sessions, checkers


def assert_matches_teacher(checker: FrameChecker, teacher: IndexedVideoTrack, minimum: int) -> None:
    seen = checker.indices
    assert len(seen) >= minimum, f"only {len(seen)} frames decoded"
    sent = set(teacher.sent)
    assert all(i in sent for i in seen), "a student decoded a frame the teacher never sent"
    # frames arrive in the teacher's order (indices increase; 12-bit wrap not reached in a test)
    assert seen == sorted(seen), "frames out of order"


async def test_lesson_with_many_students(server) -> None:
    room = "lesson-many"
    video = IndexedVideoTrack()
    teacher = await publish(server.url, room, server.token("teacher", room, "Ms T"), [video, ToneAudioTrack()])
    sessions, checkers = await start_students(server, room, 20)
    try:
        await asyncio.wait_for(teacher.connected.wait(), 15)
        for s in sessions:
            await asyncio.wait_for(s.connected.wait(), 20)
        ok = await asyncio.gather(*(c.wait_frames(30, 30) for c in checkers))
        assert len(checkers) == 20
        assert all(ok), [len(c.indices) for c in checkers]
        for c in checkers:
            assert_matches_teacher(c, video, 30)
        state = await room_state(server, room)
        assert state["live"] is True and state["viewers"] == 20 and state["publisher"] == "Ms T"
        assert state["codecs"]["video"].lower() == "video/h264"
        assert state["codecs"]["audio"].lower() == "audio/opus"
        # the node's default is one fan-out worker per core: students were spread over them
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{server.url}/readyz") as resp:
                workers = (await resp.json())["workers"]
        assert len(workers) >= 2 and all(w["viewers"] > 0 for w in workers), workers
        assert sum(w["viewers"] for w in workers) == 20
    finally:
        for c in checkers:
            c.stop()
        await asyncio.gather(*(s.close() for s in sessions))
        await teacher.close()
