"""Lesson lifecycle: students before the teacher, teacher reconnects, students leave or vanish, loss repair."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from conftest import PEER_TIMEOUT

from skyclass.loadtest.clients import FrameChecker, IndexedVideoTrack, ToneAudioTrack, publish, watch
from skyclass.media import aiortc_glue


async def room_state(server, room: str) -> dict:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/api/rooms/{room}") as resp:
            return await resp.json()


async def metric(server, name: str) -> float:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/metrics") as resp:
            text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"metric {name} not found")


async def wait_for(predicate, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(interval)
    return False


class Student:
    """A watching student that decodes video and records the RTP it gets."""

    def __init__(self) -> None:
        self.checker: FrameChecker | None = None
        self.video_rtp: list[tuple[int, int, float]] = []  # (seq, timestamp, arrival)
        self.session = None

    async def join(self, server, room: str, name: str, drop=None) -> "Student":
        def on_track(track) -> None:
            if track.kind == "video":
                self.checker = FrameChecker(track)

        self.session = await watch(server.url, room, server.token("student", room, name), on_track)
        if drop is not None:
            aiortc_glue.intercept_datagrams(self.session.pc, drop)
        for transceiver in self.session.pc.getTransceivers():
            if transceiver.kind == "video":
                def observe(packet) -> bool:
                    self.video_rtp.append((packet.sequence_number, packet.timestamp, time.monotonic()))
                    return True

                aiortc_glue.observe_rtp(transceiver.receiver, observe)
        return self

    @property
    def frames(self) -> int:
        return len(self.checker.indices) if self.checker else 0

    async def wait_frames(self, count: int, timeout: float = 30) -> bool:
        deadline = time.monotonic() + timeout
        while self.checker is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return self.checker is not None and await self.checker.wait_frames(count, deadline - time.monotonic())

    async def close(self, delete: bool = True) -> None:
        if self.checker:
            self.checker.stop()
        if self.session:
            try:
                await self.session.close(delete=delete)
            except Exception:
                pass


async def test_student_joining_before_teacher_gets_the_lesson(server) -> None:
    room = "before-teacher"
    student = await Student().join(server, room, "early")
    try:
        await asyncio.wait_for(student.session.connected.wait(), 15)
        state = await room_state(server, room)
        assert state["live"] is False and state["viewers"] == 1
        await asyncio.sleep(1.0)
        video = IndexedVideoTrack()
        teacher = await publish(server.url, room, server.token("teacher", room, "T"), [video, ToneAudioTrack()])
        try:
            assert await student.wait_frames(20, 30), "student who joined first never saw the lesson"
            assert set(student.checker.indices) <= set(video.sent)
            assert (await room_state(server, room))["live"] is True
        finally:
            await teacher.close()
    finally:
        await student.close()


async def test_teacher_reconnect_keeps_students_continuous(server) -> None:
    room = "reconnect"
    first = IndexedVideoTrack(start=0)
    teacher = await publish(server.url, room, server.token("teacher", room, "T"), [first, ToneAudioTrack()])
    students = [await Student().join(server, room, f"s{i}") for i in range(3)]
    try:
        assert all(await asyncio.gather(*(s.wait_frames(15) for s in students)))
        sessions_before = [s.session.resource for s in students]
        # The teacher's network drops: no DELETE; a new WHIP session with new SSRCs follows.
        await teacher.pc.close()
        await asyncio.sleep(0.5)
        second = IndexedVideoTrack(start=2000)
        teacher = await publish(server.url, room, server.token("teacher", room, "T"), [second, ToneAudioTrack()])

        async def all_see_second() -> bool:
            return all(any(i >= 2000 for i in s.checker.indices[-5:]) for s in students)

        assert await wait_for(all_see_second, 30), "students did not get the reconnected teacher"
        for s in students:
            assert s.session.resource in sessions_before  # nobody rejoined
            assert s.session.pc.connectionState == "connected"
            # sequence numbers run on across the switch: no jump, no reset
            seqs = [seq for seq, _, _ in s.video_rtp]
            jumps = [((b - a) & 0xFFFF) for a, b in zip(seqs, seqs[1:])]
            assert max(j for j in jumps if j < 0x8000) <= 5, "sequence numbers jumped at the teacher switch"
            # timestamps advance about as much as wall-clock time did (no restart at a random value)
            (_, ts0, t0), (_, ts1, t1) = s.video_rtp[0], s.video_rtp[-1]
            elapsed_ts = ((ts1 - ts0) & 0xFFFFFFFF) / 90000
            assert abs(elapsed_ts - (t1 - t0)) < 2.0, (elapsed_ts, t1 - t0)
        state = await room_state(server, room)
        assert state["live"] and state["viewers"] == 3
    finally:
        await asyncio.gather(*(s.close() for s in students))
        await teacher.close()


async def test_student_leaving_and_vanishing_do_not_disturb_others(server) -> None:
    room = "leave-vanish"
    video = IndexedVideoTrack()
    teacher = await publish(server.url, room, server.token("teacher", room, "T"), [video, ToneAudioTrack()])
    stayer, leaver, vanisher = [await Student().join(server, room, n) for n in ("stay", "leave", "vanish")]
    try:
        assert all(await asyncio.gather(*(s.wait_frames(10) for s in (stayer, leaver, vanisher))))
        assert (await room_state(server, room))["viewers"] == 3
        await leaver.close(delete=True)
        assert (await room_state(server, room))["viewers"] == 2, "DELETE did not end the session at once"
        aiortc_glue.vanish(vanisher.session.pc)

        async def gone() -> bool:
            return (await room_state(server, room))["viewers"] == 1

        # consent checks fail within about the server's peer timeout
        assert await wait_for(gone, 2 * PEER_TIMEOUT + 4), "a vanished student was never cleaned up"
        before = stayer.frames
        await asyncio.sleep(2)
        assert stayer.frames >= before + 15, "the remaining student stalled"
    finally:
        await stayer.close()
        await vanisher.close(delete=False)
        await teacher.close()


async def test_lost_packets_are_repaired_from_the_cache(server) -> None:
    room = "nack-repair"
    video = IndexedVideoTrack()
    teacher = await publish(server.url, room, server.token("teacher", room, "T"), [video, ToneAudioTrack()])
    dropped: set[int] = set()
    video_pts: set[int] = set()

    def drop_every_10th_once(datagram: bytes) -> bool:
        """Lose 1 in 10 video packets on the student's link (SRTP headers are clear)."""
        if len(datagram) < 12 or not 128 <= datagram[0] < 192 or datagram[1] & 0x7F not in video_pts:
            return True  # STUN, DTLS, RTCP and audio pass
        seq = int.from_bytes(datagram[2:4], "big")
        if seq % 10 == 0 and seq not in dropped:
            dropped.add(seq)
            return False
        return True

    nacks_before = await metric(server, "skyclass_nacks_received_total")
    retrans_before = await metric(server, "skyclass_retransmissions_total")
    lossy = await Student().join(server, room, "lossy", drop=drop_every_10th_once)
    video_line = next(l for l in lossy.session.pc.remoteDescription.sdp.splitlines() if l.startswith("m=video"))
    video_pts.update(int(pt) for pt in video_line.split()[3:])
    try:
        assert await lossy.wait_frames(90, 40)
        assert len(dropped) >= 5
        received = {seq for seq, _, _ in lossy.video_rtp}
        repaired = dropped & received
        assert len(repaired) >= len(dropped) * 0.8, f"{len(repaired)} of {len(dropped)} lost packets repaired"
        # fan-out workers report their counters to /metrics every half second
        async def counted() -> bool:
            return (await metric(server, "skyclass_nacks_received_total") > nacks_before
                    and await metric(server, "skyclass_retransmissions_total") >= retrans_before + len(repaired))

        assert await wait_for(counted, 5), "NACKs/retransmissions missing from /metrics"
        # frames stay whole and in order despite 1 in 10 packets lost on the student's link
        idx = lossy.checker.indices
        assert idx == sorted(idx) and lossy.checker.bad_frames <= 2
    finally:
        await lossy.close()
        await teacher.close()
