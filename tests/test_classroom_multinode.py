"""Two server processes sharing one redis-server: a question asked on node A reaches the teacher on
node B, presence counts add up across nodes, floor/kick/history cross nodes, Redis says
where the room lives, and one recordings catalogue lists every node's lessons."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from datetime import date
from pathlib import Path
from typing import Iterator

import aiohttp
import pytest

from skyclass.loadtest.clients import IndexedVideoTrack, SignallingFailed, ToneAudioTrack, publish
from skyclass.media import aiortc_glue
from skyclass.server.tokens import issue_token

from classroom_clients import WsClient, presence_where
from conftest import SECRET, ServerProcess


@pytest.fixture(scope="module")
def two_nodes(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    a = ServerProcess(tmp_path_factory.mktemp("node-a"), ["--redis", redis_url, "--node-id", "node-a",
                                                          "--workers", "1"])
    try:
        b = ServerProcess(tmp_path_factory.mktemp("node-b"), ["--redis", redis_url, "--node-id", "node-b",
                                                              "--workers", "1"])
    except Exception:
        a.stop()
        raise
    yield a, b
    a.stop()
    b.stop()


def tok(role: str, room: str, name: str) -> str:
    return issue_token(SECRET, role, room, name, 3600)


async def get(url: str, token: str) -> dict:
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()


async def test_question_crosses_nodes_and_presence_adds_up(two_nodes: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = two_nodes
    room = f"multi-{secrets.token_hex(3)}"
    teacher_token = tok("teacher", room, "T")
    teacher = await WsClient.connect(b.url, room, teacher_token)
    on_a = [await WsClient.connect(a.url, room, tok("student", room, f"a{i}")) for i in range(3)]
    on_b = [await WsClient.connect(b.url, room, tok("student", room, f"b{i}")) for i in range(2)]
    teacher_pub = await publish(b.url, room, teacher_token, [ToneAudioTrack()])
    try:
        await asyncio.wait_for(teacher_pub.connected.wait(), 15)
        # Redis says where the room lives, seen from the other node.
        for _ in range(50):
            snapshot = await get(f"{a.url}/api/rooms/{room}/classroom", teacher_token)
            if snapshot["lives_on"] == "node-b":
                break
            await asyncio.sleep(0.1)
        assert snapshot["node"] == "node-a" and snapshot["lives_on"] == "node-b"
        assert (await on_a[0].next("lesson", where=lambda m: m["state"] == "live"))["node"] == "node-b"

        sent = time.monotonic()
        await on_a[0].send(type="question", text="asked on node A")
        question = (await teacher.next("question"))["question"]
        assert question["name"] == "a0" and question["text"] == "asked on node A"
        assert time.monotonic() - sent < 2.0

        # Presence: both nodes see the sum (teacher 1 on B, students 3 on A + 2 on B).
        for client in (teacher, on_a[1], on_b[0]):
            presence = await presence_where(client, lambda p: p["counts"].get("student") == 5
                                            and p["counts"].get("teacher") == 1)
            assert presence["total"] == 6
            assert {n["name"] for n in presence["names"]} == {"T", "a0", "a1", "a2", "b0", "b1"}
        await on_a[2].close()
        await presence_where(teacher, lambda p: p["counts"].get("student") == 4)

        # Answers, the floor and kicks reach node A from the teacher on node B.
        await teacher.send(type="answered", id=question["id"], answer="yes")
        assert (await on_a[1].next("answered"))["question"]["answer"] == "yes"
        await teacher.send(type="floor", action="give", name="a1")
        assert (await on_a[1].next("floor"))["holder"] == "a1"
        await teacher.send(type="kick", name="a0")
        await asyncio.wait_for(on_a[0].closed.wait(), 5)
        assert (await on_a[0].next("kicked"))["name"] == "a0"

        # A late joiner on node A gets the history written from both nodes.
        await on_b[0].send(type="chat", text="chat from node B")
        await on_a[1].next("chat")
        late = await WsClient.connect(a.url, room, tok("student", room, "late"))
        assert [e["text"] for e in late.welcome["history"] if e["type"] == "chat"] == ["chat from node B"]
        assert late.welcome["floor"]["holder"] == "a1"
        await late.close()

        # The room's durable log is written once, on the node where the room lives.
        day = date.today().isoformat()
        log_b = Path(b.data) / "classroom" / room / f"{day}.jsonl"
        log_a = Path(a.data) / "classroom" / room / f"{day}.jsonl"
        types = [json.loads(line)["type"] for line in log_b.read_text().splitlines()]
        assert "question" in types and "chat" in types and "floor" in types
        assert not log_a.exists()
    finally:
        await teacher_pub.pc.close()
        for client in [teacher] + on_a + on_b:
            await client.close()


async def test_recordings_catalogue_is_shared_and_replays_redirect(two_nodes: tuple[ServerProcess, ServerProcess]) -> None:
    """A lesson recorded on node A is in the catalogue node B lists (one catalogue in Redis), and
    B sends the replay's media requests to A, which holds the files."""
    a, b = two_nodes
    room = f"multi-rec-{secrets.token_hex(3)}"
    teacher = await publish(a.url, room, tok("teacher", room, "T"), [IndexedVideoTrack(fps=15), ToneAudioTrack()])
    try:
        await asyncio.wait_for(teacher.connected.wait(), 15)
        await asyncio.sleep(4)
    finally:
        await teacher.close()  # DELETE: the lesson ends, the recording is finalised on A

    async with aiohttp.ClientSession() as http:
        listing: list[dict] = []
        for _ in range(100):
            async with http.get(f"{b.url}/api/recordings?room={room}") as resp:
                assert resp.status == 200
                listing = (await resp.json())["recordings"]
            if listing and listing[0]["state"] == "complete":
                break
            await asyncio.sleep(0.1)
        assert len(listing) == 1 and listing[0]["state"] == "complete", listing
        rec = listing[0]
        assert rec["node"] == "node-a" and rec["origin"] == a.url, rec
        async with http.get(f"{b.url}/api/recordings?date={date.today()}") as resp:
            assert rec["id"] in {r["id"] for r in (await resp.json())["recordings"]}
        async with http.get(f"{b.url}/api/recordings/{rec['id']}") as resp:
            assert resp.status == 200 and (await resp.json())["room"] == room

        async with http.get(f"{b.url}{rec['playlist']}", allow_redirects=False) as resp:
            assert resp.status == 307 and resp.headers["Location"] == f"{a.url}{rec['playlist']}", resp.headers
        async with http.get(f"{b.url}{rec['playlist']}") as resp:  # followed: A serves it
            assert resp.status == 200 and str(resp.url).startswith(a.url)
            playlist = await resp.text()
        assert "#EXT-X-ENDLIST" in playlist
        segment = next(line for line in playlist.splitlines() if line and not line.startswith("#"))
        async with http.get(f"{b.url}/replay/{rec['id']}/{segment}", allow_redirects=False) as resp:
            assert resp.status == 307 and resp.headers["Location"].startswith(a.url)
        async with http.get(f"{b.url}/replay/{rec['id']}/{segment}") as resp:
            assert resp.status == 200 and len(await resp.read()) > 1000
        # A recording nobody has is still a plain 404 on either node.
        async with http.get(f"{b.url}/replay/no-such-recording/index.m3u8", allow_redirects=False) as resp:
            assert resp.status == 404


async def test_students_on_another_node_watch_through_the_relay(two_nodes: tuple[ServerProcess, ServerProcess]) -> None:
    """Scale-out: the teacher publishes on node A; students whose requests land on node B are
    served by B, which relays the room from A (one stream per room per node). A student who
    joined B before the teacher started follows the lesson when it does; a publisher who
    reaches B is forwarded to A, where the room lives."""
    from test_lifecycle import Student

    a, b = two_nodes
    room = f"multi-edge-{secrets.token_hex(3)}"
    aiortc_glue.restrict_host_addresses(["127.0.0.1"])
    students: list[Student] = []
    teacher = None
    try:
        students.append(await Student().join(b, room, "early-on-b"))  # before the teacher starts anywhere
        video = IndexedVideoTrack(fps=15)
        teacher = await publish(a.url, room, tok("teacher", room, "T"), [video, ToneAudioTrack()])
        await asyncio.wait_for(teacher.connected.wait(), 15)
        for _ in range(50):  # the classroom says where the room lives
            snapshot = await get(f"{b.url}/api/rooms/{room}/classroom", tok("teacher", room, "T"))
            if snapshot["lives_on"] == "node-a":
                break
            await asyncio.sleep(0.1)
        students += [await Student().join(b, room, f"b{i}") for i in range(2)]
        students.append(await Student().join(a, room, "on-a"))
        assert all(await asyncio.gather(*(s.wait_frames(30, 40) for s in students))), \
            [s.frames for s in students]
        for s in students:
            assert set(s.checker.indices) <= set(video.sent), "a student decoded frames the teacher never sent"
            assert s.checker.bad_frames == 0

        async with aiohttp.ClientSession() as http:
            async with http.get(f"{b.url}/api/rooms/{room}") as resp:
                on_b = await resp.json()
            async with http.get(f"{a.url}/api/rooms/{room}") as resp:
                on_a = await resp.json()
            assert on_b["live"] is True and on_b["upstream"] == "node-a" and on_b["viewers"] == 3, on_b
            assert on_a["live"] is True and on_a["upstream"] is None and on_a["viewers"] == 1, on_a
            # B's workers forward B's students' copies; A sends B one relayed stream per track.
            async with http.get(f"{b.url}/api/ops", headers={"Authorization": f"Bearer {tok('ops', '*', 'Ops')}"}) as resp:
                ops_b = await resp.json()
            assert ops_b["counters"]["packets_in"] > 0 and ops_b["counters"]["packets_out"] > 0, ops_b["counters"]


        # The teacher reconnects through node B (as a load balancer may route it): B forwards the
        # WHIP to A, where the room lives; the session's resource stays under B; students on
        # both nodes go on with the new connection's frames without rejoining.
        video2 = IndexedVideoTrack(fps=15, start=2000)
        teacher2 = await publish(b.url, room, tok("teacher", room, "T"), [video2, ToneAudioTrack()])
        await asyncio.wait_for(teacher2.connected.wait(), 15)
        assert teacher2.resource.startswith(f"{b.url}/whip/{room}/"), teacher2.resource
        for _ in range(100):
            if all(max(s.checker.indices) >= 2000 + 15 for s in students):
                break
            await asyncio.sleep(0.1)
        assert all(max(s.checker.indices) >= 2000 + 15 for s in students), [max(s.checker.indices) for s in students]
        for s in students:
            assert set(s.checker.indices) <= set(video.sent) | set(video2.sent)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{a.url}/api/rooms/{room}") as resp:
                assert (await resp.json())["publisher"] == "T"
            async with http.get(f"{b.url}/api/rooms/{room}") as resp:
                assert (await resp.json())["upstream"] == "node-a"
        await teacher2.close()  # DELETE through B, forwarded: the lesson ends on A
        for _ in range(50):
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{a.url}/api/rooms/{room}") as resp:
                    state = await resp.json()
            if state["publisher"] is None:
                break
            await asyncio.sleep(0.1)
        assert state["publisher"] is None and state["live"] is False, state
    finally:
        await asyncio.gather(*(s.close() for s in students))
        if teacher is not None:
            await teacher.close()


async def test_failover_when_the_rooms_node_dies(redis_url: str, tmp_path: Path) -> None:
    """kill -9 of the node a lesson lives on: the teacher's client publishes again through the
    other node (as its page does, with backoff), which takes the room over; that node's
    students go on with the lesson in the same sessions, without rejoining."""
    from test_lifecycle import Student

    a = ServerProcess(tmp_path / "a", ["--redis", redis_url, "--node-id", "fail-a", "--workers", "1"])
    b = ServerProcess(tmp_path / "b", ["--redis", redis_url, "--node-id", "fail-b", "--workers", "1"])
    room = f"failover-{secrets.token_hex(3)}"
    aiortc_glue.restrict_host_addresses(["127.0.0.1"])
    students: list[Student] = []
    sessions = []
    try:
        video = IndexedVideoTrack(fps=15)
        sessions.append(await publish(a.url, room, tok("teacher", room, "T"), [video, ToneAudioTrack()]))
        await asyncio.wait_for(sessions[0].connected.wait(), 15)
        for _ in range(50):
            if (await get(f"{b.url}/api/rooms/{room}/classroom", tok("teacher", room, "T")))["lives_on"] == "fail-a":
                break
            await asyncio.sleep(0.1)
        students = [await Student().join(b, room, f"s{i}") for i in range(2)]
        assert all(await asyncio.gather(*(s.wait_frames(15, 30) for s in students)))

        a.proc.kill()  # the room's node dies mid-lesson
        killed = time.monotonic()
        video2 = IndexedVideoTrack(fps=15, start=2000)
        teacher2 = None
        while teacher2 is None and time.monotonic() - killed < 30:
            try:  # B forwards to A while A may still be alive, then takes the room itself
                teacher2 = await publish(b.url, room, tok("teacher", room, "T"), [video2, ToneAudioTrack()])
            except SignallingFailed as exc:
                assert exc.status == 503 and "Retry-After" in exc.headers, (exc.status, exc.text)
                await asyncio.sleep(1.0)
        assert teacher2 is not None, "node b never took the room over"
        sessions.append(teacher2)
        await asyncio.wait_for(teacher2.connected.wait(), 15)
        for _ in range(200):
            if all(s.checker.indices and max(s.checker.indices) >= 2000 + 15 for s in students):
                break
            await asyncio.sleep(0.1)
        back = time.monotonic() - killed
        assert all(max(s.checker.indices) >= 2000 + 15 for s in students), [max(s.checker.indices) for s in students]
        assert back < 30, back
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{b.url}/api/rooms/{room}") as resp:
                state = await resp.json()
        assert state["publisher"] == "T" and state["upstream"] is None and state["viewers"] == 2, state
        assert (await get(f"{b.url}/api/rooms/{room}/classroom", tok("teacher", room, "T")))["lives_on"] == "fail-b"
    finally:
        await asyncio.gather(*(s.close() for s in students))
        for session in sessions:
            await session.pc.close()
        a.stop()
        b.stop()
