"""The classroom against the real server, on both stores (in-process and a real redis-server):
timetable import/API/windows, roles and tokens (expiry, revocation, kick), websocket events
(chat, questions and answers, hands, floor, mute, presence, history, limits), attendance."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any, Iterator, Optional

import aiohttp
import av
import numpy as np
import pytest

from skyclass.loadtest.clients import IndexedVideoTrack, SignallingFailed, ToneAudioTrack, publish, watch
from skyclass.server.tokens import issue_token

from classroom_clients import WsClient, presence_where
from conftest import ROOT, SECRET, ServerProcess

BAD_SDP = "this is not SDP"


@pytest.fixture(scope="module", params=["inprocess", "redis"])
def cls_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    extra: list[str] = []
    if request.param == "redis":
        extra = ["--redis", request.getfixturevalue("redis_url"), "--node-id", f"solo-{secrets.token_hex(2)}"]
    proc = ServerProcess(tmp_path_factory.mktemp(f"classroom-{request.param}"), extra)
    proc.store = request.param  # type: ignore[attr-defined]
    proc.redis = extra[1] if extra else None  # type: ignore[attr-defined]
    yield proc
    proc.stop()


def tok(role: str, room: str, name: str, ttl: int = 3600, **extra: Any) -> str:
    return issue_token(SECRET, role, room, name, ttl, extra=extra or None)


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


OPS = tok("ops", "*", "Ops")


async def api(method: str, url: str, token: Optional[str] = None, body: Any = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http:
        async with http.request(method, url, json=body, headers=headers) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text


async def sdp_post(url: str, token: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=BAD_SDP, headers={"Authorization": f"Bearer {token}",
                                                        "Content-Type": "application/sdp"}) as resp:
            return resp.status, await resp.text()


async def make_lesson(server: ServerProcess, room: str, start_in: float = -60, length: float = 3600,
                      **fields: Any) -> dict:
    now = time.time()
    body = {"room": room, "subject": "maths", "teacher": "Ms Li", "grade": "7",
            "start": now + start_in, "end": now + start_in + length, **fields}
    status, saved = await api("POST", server.url + "/api/timetable", OPS, body)
    assert status == 201, saved
    return saved["saved"][0]


async def ws_refused(server: ServerProcess, room: str, token: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http:
        try:
            ws = await http.ws_connect(f"{server.url}/ws/{room}?token={token}")
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status, exc.message
        await ws.close()
        raise AssertionError("websocket was accepted")


# timetable -------------------------------------------------------------------------------------

def test_timetable_import_cli(cls_server: ServerProcess, tmp_path: Path) -> None:
    room_a, room_b = unique("imp-a"), unique("imp-b")
    csv_file = tmp_path / "day.csv"
    csv_file.write_text("start,end,room,grade,subject,kind,audience,school,class,teacher\n"
                        f"08:00,08:50,{room_a},7,maths,lesson,district,,,Ms Li\n"
                        f"14:00,16:00,{room_b},7,maths,qa,class,north,7B,Mr Fischer\n")
    store = ["--redis", cls_server.redis] if cls_server.redis else []  # type: ignore[attr-defined]
    cli = [sys.executable, "-m", "skyclass.server.cli", "timetable"]
    done = subprocess.run(cli + ["import", str(csv_file), "--date", "2031-05-06", "--data", str(cls_server.data)]
                          + store, capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "imported 2 lesson(s)" in done.stdout
    listed = subprocess.run(cli + ["list", "--date", "2031-05-06", "--data", str(cls_server.data)] + store,
                            capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert room_a in listed.stdout and room_b in listed.stdout

    async def check() -> None:
        status, body = await api("GET", cls_server.url + "/api/timetable?date=2031-05-06", OPS)
        assert status == 200
        mine = {l["room"]: l for l in body["lessons"] if l["room"] in (room_a, room_b)}
        assert mine[room_a]["kind"] == "lesson" and mine[room_b]["class"] == "7B"
        assert mine[room_a]["start_iso"].startswith("2031-05-06T08:00")
        assert mine[room_a]["status"] == "upcoming"
        # A timetabled room is closed until its lesson: WHEP refused with the reason.
        status, text = await sdp_post(f"{cls_server.url}/whep/{room_a}", tok("student", room_a, "s"))
        assert status == 403 and "opens at 2031-05-06T07:50" in text, text

    asyncio.run(check())
    bad = tmp_path / "bad.csv"
    bad.write_text("start,end,room,subject,teacher\n08:00,07:00,r1,maths,T\n")
    done = subprocess.run(cli + ["import", str(bad), "--data", str(cls_server.data)] + store,
                          capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert done.returncode == 2 and "line 2: end must be after start" in done.stderr


async def test_timetable_api_crud_and_permissions(cls_server: ServerProcess) -> None:
    url = cls_server.url
    room = unique("crud")
    now = time.time()
    lesson = {"room": room, "subject": "physics", "teacher": "Mr Sato", "grade": "8", "kind": "qa",
              "audience": "school", "school": "north", "start": now + 7200, "end": now + 9000}
    assert (await api("POST", url + "/api/timetable", None, lesson))[0] == 401
    assert (await api("POST", url + "/api/timetable", tok("student", "*", "kid"), lesson))[0] == 403
    status, body = await api("POST", url + "/api/timetable", tok("teacher", "*", "Ms Li"), lesson)
    assert status == 403 and "his own" in body["detail"]
    status, body = await api("POST", url + "/api/timetable", tok("teacher", "*", "Mr Sato"), lesson)
    assert status == 201, body
    lesson_id = body["saved"][0]["id"]
    status, body = await api("POST", url + "/api/timetable", OPS, {**lesson, "kind": "lecture"})
    assert status == 400 and "kind 'lecture'" in body["detail"]
    status, body = await api("POST", url + "/api/timetable", OPS,
                             {**lesson, "id": unique("other"), "start": now + 8000, "end": now + 9500})
    assert status == 409 and "overlap" in body["detail"]

    status, body = await api("PATCH", f"{url}/api/lessons/{lesson_id}", tok("teacher", "*", "Mr Sato"),
                             {"subject": "chemistry"})
    assert status == 200 and body["subject"] == "chemistry" and body["room"] == room
    assert (await api("PATCH", f"{url}/api/lessons/{lesson_id}", tok("teacher", "*", "Ms Li"),
                      {"subject": "x"}))[0] == 403
    status, body = await api("GET", f"{url}/api/lessons/{lesson_id}", tok("student", "*", "kid", school="north",
                                                                           grade="8"))
    assert status == 200 and body["subject"] == "chemistry"
    # A student outside the audience does not see it.
    assert (await api("GET", f"{url}/api/lessons/{lesson_id}", tok("student", "*", "kid", grade="5")))[0] == 404

    # Listing: links per role.
    status, body = await api("GET", f"{url}/api/timetable?date=all&room={room}",
                             tok("student", "*", "kid", school="north", grade="8"))
    assert [l["links"].keys() for l in body["lessons"]] == [{"watch"}]
    status, body = await api("GET", f"{url}/api/timetable?date=all&room={room}", OPS)
    links = body["lessons"][0]["links"]
    assert set(links) == {"teach", "assist", "watch"} and links["teach"].startswith(f"/teach/{room}?token=")
    status, body = await api("GET", f"{url}/api/timetable?date=all&room={room}", tok("teacher", room, "Mr Sato"))
    assert set(body["lessons"][0]["links"]) == {"teach", "watch"}
    assert (await api("GET", f"{url}/api/timetable?date=nope", OPS))[0] == 400

    # Minted student link for the lesson.
    status, body = await api("POST", f"{url}/api/lessons/{lesson_id}/tokens", tok("teacher", "*", "Mr Sato"),
                             {"role": "student", "name": "Zoe"})
    assert status == 201 and body["url"].startswith(f"/watch/{room}?token=")
    assert (await api("POST", f"{url}/api/lessons/{lesson_id}/tokens", tok("teacher", "*", "Mr Sato"),
                      {"role": "teacher", "name": "Zoe"}))[0] == 403

    assert (await api("DELETE", f"{url}/api/lessons/{lesson_id}", tok("student", room, "kid")))[0] in (403, 404)
    assert (await api("DELETE", f"{url}/api/lessons/{lesson_id}", OPS))[0] == 200
    assert (await api("GET", f"{url}/api/lessons/{lesson_id}", OPS))[0] == 404


async def test_room_windows_and_audience(cls_server: ServerProcess) -> None:
    url = cls_server.url
    future, now_room, past, free = unique("later"), unique("now"), unique("past"), unique("adhoc")
    await make_lesson(cls_server, future, start_in=3600)
    await make_lesson(cls_server, now_room, start_in=-60, audience="school", school="north")
    await make_lesson(cls_server, past, start_in=-7200, length=3600)
    student = lambda room: tok("student", room, "kid")  # noqa: E731

    status, text = await sdp_post(f"{url}/whep/{future}", student(future))
    assert status == 403 and "opens at" in text
    status, text = await sdp_post(f"{url}/whip/{past}", tok("teacher", past, "Ms Li"))
    assert status == 403 and "ended at" in text
    status, _ = await ws_refused(cls_server, future, student(future))
    assert status == 403
    # Open now, and rooms outside the timetable: the gate lets them through to WHEP (which then
    # finds the SDP malformed).
    assert (await sdp_post(f"{url}/whep/{now_room}", student(now_room)))[0] == 400
    assert (await sdp_post(f"{url}/whep/{free}", student(free)))[0] == 400
    # Staff may open the websocket of a closed room (e.g. to read the Q&A afterwards).
    teacher = await WsClient.connect(url, past, tok("teacher", past, "Ms Li"))
    await teacher.close()

    # A district-wide student token ("*") gets in by audience only.
    north = tok("student", "*", "Nia", grade="7", school="north")
    south = tok("student", "*", "Sol", grade="7", school="south")
    assert (await sdp_post(f"{url}/whep/{now_room}", north))[0] == 400
    status, text = await sdp_post(f"{url}/whep/{now_room}", south)
    assert status == 403 and "school north" in text
    client = await WsClient.connect(url, now_room, north)
    assert client.welcome["lesson"]["room"] == now_room and client.welcome["kind"] == "lesson"
    await client.close()


# roles and tokens ----------------------------------------------------------------------------------

async def test_expired_and_revoked_tokens(cls_server: ServerProcess) -> None:
    url, room = cls_server.url, unique("tokens")
    expired = tok("student", room, "old", ttl=-10)
    status, _ = await ws_refused(cls_server, room, expired)
    assert status == 401
    status, text = await sdp_post(f"{url}/whep/{room}", expired)
    assert status == 401 and "expired" in text

    token = tok("student", room, "Rev")
    client = await WsClient.connect(url, room, token)
    other = await WsClient.connect(url, room, tok("student", room, "Rev"))  # same name, another token
    teacher_token = tok("teacher", room, "T")
    assert (await api("POST", url + "/api/tokens/revoke", token, {"token": token}))[0] == 403
    assert (await api("POST", url + "/api/tokens/revoke", tok("teacher", "elsewhere", "U"), {"token": token}))[0] == 403
    status, body = await api("POST", url + "/api/tokens/revoke", teacher_token, {"token": token})
    assert status == 200, body
    error = await client.next("error", timeout=5)
    assert error["error"] == "revoked"
    await asyncio.wait_for(client.closed.wait(), 5)
    assert not other.closed.is_set()  # only that token's connection ends
    status, body = await ws_refused(cls_server, room, token)
    assert status == 401
    status, text = await sdp_post(f"{url}/whep/{room}", token)
    assert status == 401 and "revoked" in text
    assert (await api("GET", f"{url}/api/rooms/{room}/history", token))[0] == 401
    await client.close()
    await other.close()


async def test_kick_ends_websocket_and_watch_session(cls_server: ServerProcess) -> None:
    url, room = cls_server.url, unique("kick")
    teacher = await WsClient.connect(url, room, tok("teacher", room, "T"))
    kid_token = tok("student", room, "Kid")
    kid = await WsClient.connect(url, room, kid_token)
    session = await watch(url, room, kid_token, lambda track: None)
    try:
        await asyncio.wait_for(session.connected.wait(), 15)
        assert (await api("GET", f"{url}/api/rooms/{room}"))[1]["viewers"] == 1
        mark = await kid.send(type="kick", name="T")
        assert (await kid.next("error", after=mark))["error"] == "forbidden"
        await teacher.send(type="kick", name="Kid")
        kicked = await kid.next("kicked")
        assert kicked["name"] == "Kid"
        await asyncio.wait_for(kid.closed.wait(), 5)
        assert (await teacher.next("kicked"))["name"] == "Kid"

        async def viewers() -> int:
            return (await api("GET", f"{url}/api/rooms/{room}"))[1]["viewers"]

        for _ in range(50):
            if await viewers() == 0:
                break
            await asyncio.sleep(0.1)
        assert await viewers() == 0, "the kicked student's WHEP session is still there"
        status, text = await ws_refused(cls_server, room, kid_token)
        assert status == 403
        status, text = await sdp_post(f"{url}/whep/{room}", kid_token)
        assert status == 403 and "removed" in text
        # The kick over the API works as well.
        other = await WsClient.connect(url, room, tok("student", room, "Other"))
        assert (await api("POST", f"{url}/api/rooms/{room}/kick", tok("teacher", room, "T"), {"name": "Other"}))[0] == 200
        await asyncio.wait_for(other.closed.wait(), 5)
        await other.close()
    finally:
        await session.pc.close()
        await kid.close()
        await teacher.close()


# websocket events ----------------------------------------------------------------------------------

async def test_questions_answers_and_chat(cls_server: ServerProcess) -> None:
    url, room = cls_server.url, unique("qa")
    teacher = await WsClient.connect(url, room, tok("teacher", room, "T"))
    ann = await WsClient.connect(url, room, tok("student", room, "Ann"))
    bob = await WsClient.connect(url, room, tok("student", room, "Bob"))
    try:
        await ann.send(type="question", text="Why is the sky blue?")
        question = (await teacher.next("question"))["question"]
        assert question["name"] == "Ann" and question["text"] == "Why is the sky blue?"
        assert (await ann.next("question"))["question"]["id"] == question["id"]  # the asker sees his own
        mark = await teacher.send(type="questions")
        queue = await teacher.next("questions", after=mark)
        assert [q["id"] for q in queue["questions"]] == [question["id"]]
        await teacher.send(type="answered", id=question["id"], answer="Rayleigh scattering")
        answered = await bob.next("answered")
        assert answered["question"]["answer"] == "Rayleigh scattering" and answered["question"]["answered"]
        assert not bob.of("question"), "another student saw an unanswered question"
        mark = await bob.send(type="answered", id=question["id"])
        assert (await bob.next("error", after=mark))["error"] == "forbidden"
        mark = await teacher.send(type="answered", id="nope")
        assert (await teacher.next("error", after=mark))["error"] == "not_found"

        # In a qa room (and outside the timetable) chat goes to everyone.
        await bob.send(type="chat", text="hello all")
        for client in (teacher, ann, bob):
            assert (await client.next("chat"))["text"] == "hello all"
    finally:
        for c in (teacher, ann, bob):
            await c.close()


async def test_lesson_room_chat_staff_only_and_no_floor(cls_server: ServerProcess) -> None:
    url, room = cls_server.url, unique("big")
    await make_lesson(cls_server, room, kind="lesson")
    teacher = await WsClient.connect(url, room, tok("teacher", room, "Ms Li"))
    ann = await WsClient.connect(url, room, tok("student", room, "Ann"))
    bob = await WsClient.connect(url, room, tok("student", room, "Bob"))
    try:
        await ann.send(type="chat", text="only for the teacher")
        assert (await teacher.next("chat"))["text"] == "only for the teacher"
        assert (await ann.next("chat"))["name"] == "Ann"
        await teacher.send(type="chat", text="for everyone")
        assert (await bob.next("chat"))["text"] == "for everyone"
        assert [m["text"] for m in bob.of("chat")] == ["for everyone"]
        mark = await teacher.send(type="floor", action="give", name="Ann")
        error = await teacher.next("error", after=mark)
        assert error["error"] == "forbidden" and "lesson" in error["detail"]
        # Students never publish in a lesson room.
        status, text = await sdp_post(f"{url}/whip/{room}", tok("student", room, "Ann"))
        assert status == 403
    finally:
        for c in (teacher, ann, bob):
            await c.close()


async def test_hands_floor_mute_and_speaker_publish(cls_server: ServerProcess) -> None:
    url, room = cls_server.url, unique("floor")
    await make_lesson(cls_server, room, kind="qa", teacher="T")
    teacher = await WsClient.connect(url, room, tok("teacher", room, "T"))
    ann_token = tok("student", room, "Ann")
    ann = await WsClient.connect(url, room, ann_token)
    bob = await WsClient.connect(url, room, tok("student", room, "Bob"))
    speaker = None
    try:
        await ann.send(type="raise")
        hand = await teacher.next("hand")
        assert hand["name"] == "Ann" and hand["raised"] is True
        assert not bob.of("hand"), "hands are for the staff and the student himself"
        mark = await ann.send(type="hand", raised=True, name="Bob")
        assert (await ann.next("error", after=mark))["error"] == "forbidden"

        # Without the floor a student's WHIP is refused.
        with pytest.raises(SignallingFailed) as refused:
            await publish(url, room, ann_token, [ToneAudioTrack()])
        assert refused.value.status == 403

        await teacher.send(type="floor", action="give", name="Ann")
        floor = await ann.next("floor")
        assert floor["holder"] == "Ann" and floor["by"] == "T"
        assert (await bob.next("floor"))["holder"] == "Ann"
        assert (await teacher.next("hand", where=lambda m: m["raised"] is False))["name"] == "Ann"

        speaker = await publish(url, room, ann_token, [ToneAudioTrack()])
        await asyncio.wait_for(speaker.connected.wait(), 15)
        assert (await teacher.next("speaking"))["state"] == "on"

        async def speakers() -> list:
            return (await api("GET", f"{url}/api/rooms/{room}"))[1].get("speakers", [])

        assert await speakers() == ["Ann"]
        await teacher.send(type="mute", name="Ann", muted=True)
        muted = await ann.next("mute")
        assert muted["muted"] is True and muted["name"] == "Ann"

        await teacher.send(type="floor", action="take")
        assert (await ann.next("floor", where=lambda m: m["holder"] is None))["taken_from"] == "Ann"
        for _ in range(50):
            if not await speakers():
                break
            await asyncio.sleep(0.1)
        assert await speakers() == [], "the speaker's WHIP session outlived the floor"
        assert (await teacher.next("speaking", where=lambda m: m["state"] == "off"))["name"] == "Ann"
        snapshot = (await api("GET", f"{url}/api/rooms/{room}/classroom", tok("teacher", room, "T")))[1]
        assert snapshot["floor"] is None and snapshot["kind"] == "qa"
    finally:
        if speaker is not None:
            await speaker.pc.close()
        for c in (teacher, ann, bob):
            await c.close()


def tone_presence(samples, rate: int, freq: float, window: float = 0.1):
    """Per ``window`` seconds: True where ``freq`` stands out of the spectrum (a tone is in it)."""
    n = int(rate * window)
    out = []
    for i in range(0, len(samples) - n + 1, n):
        spectrum = np.abs(np.fft.rfft(samples[i:i + n] * np.hanning(n)))
        k = int(round(freq * n / rate))
        peak = spectrum[k - 1:k + 2].max()
        # the tones are sent at 1/4 of full scale (a Hann-windowed peak of ~n/16); a start-up
        # click in near silence stands out of the median but not this
        out.append(peak > n / 100 and peak > 20 * np.median(spectrum))
    return out


async def test_speaker_is_mixed_into_the_recording(cls_server: ServerProcess) -> None:
    """The replay has one audio track: the student's voice is in it while they had the floor."""
    url, room = cls_server.url, unique("floor-rec")
    await make_lesson(cls_server, room, kind="qa", teacher="T")
    teacher_ws = await WsClient.connect(url, room, tok("teacher", room, "T"))
    ann_token = tok("student", room, "Ann")
    ann = await WsClient.connect(url, room, ann_token)
    teacher = speaker = None
    try:
        teacher = await publish(url, room, tok("teacher", room, "T"), [IndexedVideoTrack(), ToneAudioTrack(440)])
        await asyncio.wait_for(teacher.connected.wait(), 15)
        await asyncio.sleep(3)
        await teacher_ws.send(type="floor", action="give", name="Ann")
        await ann.next("floor")
        speaker = await publish(url, room, ann_token, [ToneAudioTrack(1500)])
        await asyncio.wait_for(speaker.connected.wait(), 15)
        await asyncio.sleep(3)
        await teacher_ws.send(type="floor", action="take")
        await teacher_ws.next("speaking", where=lambda m: m["state"] == "off")
        await asyncio.sleep(3)
        await teacher.close(delete=True)
        teacher = None
        deadline = time.monotonic() + 20
        recs: list = []
        while time.monotonic() < deadline:
            recs = (await api("GET", f"{url}/api/recordings?room={room}"))[1]["recordings"]
            if recs and recs[0]["state"] == "complete":
                break
            await asyncio.sleep(0.2)
        assert recs and recs[0]["state"] == "complete", recs
        with av.open(f"{url}{recs[0]['playlist']}") as container:
            pcm = np.concatenate([f.to_ndarray().mean(axis=0) for f in container.decode(audio=0)])
    finally:
        for session in (speaker, teacher):
            if session is not None:
                await session.close()
        await teacher_ws.close()
        await ann.close()
    teacher_tone = tone_presence(pcm, 48000, 440)
    student_tone = tone_presence(pcm, 48000, 1500)
    assert sum(teacher_tone) >= 0.9 * len(teacher_tone), "the teacher's audio has holes"
    # about 3 s of the student's tone (~30 windows), in one stretch, neither at the start nor the end
    first, last = student_tone.index(True), len(student_tone) - 1 - student_tone[::-1].index(True)
    assert 20 <= sum(student_tone) <= 45, sum(student_tone)
    assert sum(student_tone[first:last + 1]) >= 0.9 * (last - first + 1), "the speaker's audio has holes"
    assert first >= 15 and last <= len(student_tone) - 15, (first, last, len(student_tone))


async def test_presence_counts_and_names(cls_server: ServerProcess) -> None:
    url, room = cls_server.url, unique("presence")
    teacher = await WsClient.connect(url, room, tok("teacher", room, "T"))
    students = [await WsClient.connect(url, room, tok("student", room, f"s{i}")) for i in range(5)]
    try:
        presence = await presence_where(teacher, lambda p: p["counts"].get("student") == 5)
        assert presence["counts"]["teacher"] == 1 and presence["total"] == 6
        assert {n["name"] for n in presence["names"]} == {"T", "s0", "s1", "s2", "s3", "s4"}
        await students[0].close()
        await students[1].close()
        await presence_where(teacher, lambda p: p["counts"].get("student") == 3)
        # Students hear the counts too.
        await presence_where(students[2], lambda p: p["counts"].get("student") == 3)
        mark = await students[2].send(type="presence")
        assert (await students[2].next("presence", after=mark))["total"] == 4
    finally:
        for c in [teacher] + students[2:]:
            await c.close()


async def test_history_for_late_joiners_api_and_log(cls_server: ServerProcess) -> None:
    url, room = cls_server.url, unique("history")
    start = time.time()
    teacher = await WsClient.connect(url, room, tok("teacher", room, "T"))
    ann = await WsClient.connect(url, room, tok("student", room, "Ann"))
    try:
        await ann.send(type="chat", text="first")
        await ann.send(type="question", text="a question")
        question = (await teacher.next("question"))["question"]
        await ann.send(type="question", text="unanswered one")
        await teacher.next("question", where=lambda m: m["question"]["text"] == "unanswered one")
        await teacher.send(type="answered", id=question["id"], answer="the answer")
        await ann.next("answered")
        late = await WsClient.connect(url, room, tok("student", room, "Late"))
        welcome = late.welcome
        assert [e["text"] for e in welcome["history"] if e["type"] == "chat"] == ["first"]
        assert [q["text"] for q in welcome["questions"]] == ["a question"]  # answered only, not others' open ones
        late_teacher = await WsClient.connect(url, room, tok("assistant", room, "Asst"))
        assert {q["text"] for q in late_teacher.welcome["questions"]} == {"a question", "unanswered one"}
        await late.close()
        await late_teacher.close()

        status, body = await api("GET", f"{url}/api/rooms/{room}/history?since={start - 1}&until={time.time() + 1}",
                                 tok("student", room, "Late"))
        assert status == 200
        kinds = [e["type"] for e in body["entries"]]
        assert kinds == ["chat", "answered"], kinds  # a student sees the public entries only
        status, body = await api("GET", f"{url}/api/rooms/{room}/history?since={start - 1}", tok("teacher", room, "T"))
        assert [e["type"] for e in body["entries"]] == ["chat", "question", "question", "answered"]
        status, body = await api("GET", f"{url}/api/rooms/{room}/history?since={time.time() + 10}",
                                 tok("teacher", room, "T"))
        assert body["entries"] == []
        assert (await api("GET", f"{url}/api/rooms/{room}/history?since=abc", tok("teacher", room, "T")))[0] == 400
        # The durable log next to the recordings: one JSON line per entry.
        log = cls_server.data / "classroom" / room / f"{date.today().isoformat()}.jsonl"
        lines = [json.loads(line) for line in log.read_text().splitlines()]
        assert [e["type"] for e in lines] == ["chat", "question", "question", "answered"]
        assert all(isinstance(e["ts"], float) for e in lines)
    finally:
        await teacher.close()
        await ann.close()


async def test_rate_and_size_limits(cls_server: ServerProcess) -> None:
    url, room = cls_server.url, unique("limits")
    kid = await WsClient.connect(url, room, tok("student", room, "Spammer"))
    teacher = await WsClient.connect(url, room, tok("teacher", room, "T"))
    try:
        for i in range(6):
            await kid.send(type="chat", text=f"msg {i}", ref=i)
        error = await kid.next("error", where=lambda m: m.get("ref") == 5)
        assert error["error"] == "rate_limited" and error["retry_after"] > 0 and "retry in" in error["detail"]
        await kid.next("chat", where=lambda m: m["text"] == "msg 4")
        assert len(kid.of("chat")) == 5
        mark = await kid.send(type="question", text="x" * 501)
        error = await kid.next("error", after=mark)
        assert error["error"] == "too_large" and "at most 500" in error["detail"]
        mark = await kid.send(type="question", text="ok", padding="y" * 3000)
        assert "at most 2048" in (await kid.next("error", after=mark))["detail"]
        mark = len(kid.messages)
        await kid.ws.send_str("{not json")
        assert (await kid.next("error", after=mark))["error"] == "bad_request"
        mark = await kid.send(type="teleport")
        assert "unknown message type" in (await kid.next("error", after=mark))["detail"]
        mark = await kid.send(type="chat")
        assert "'text' is required" in (await kid.next("error", after=mark))["detail"]
        # Staff are not rate limited.
        for i in range(10):
            await teacher.send(type="chat", text=f"t{i}")
        await teacher.next("chat", where=lambda m: m["text"] == "t9")
        assert not teacher.of("error")
    finally:
        await kid.close()
        await teacher.close()


# attendance and lesson start/end ---------------------------------------------------------------------

async def test_attendance_and_lesson_events(cls_server: ServerProcess) -> None:
    url, room = cls_server.url, unique("attend")
    lesson = await make_lesson(cls_server, room, kind="qa", teacher="T")
    lesson_id = lesson["id"]
    teacher_token = tok("teacher", room, "T")
    observer = await WsClient.connect(url, room, tok("assistant", room, "Asst"))
    ann = await WsClient.connect(url, room, tok("student", room, "Ann"))
    bob_token = tok("student", room, "Bob")
    bob_watch = await watch(url, room, bob_token, lambda track: None)
    teacher_pub = await publish(url, room, teacher_token, [ToneAudioTrack()])
    try:
        await asyncio.wait_for(teacher_pub.connected.wait(), 15)
        live = await observer.next("lesson", where=lambda m: m["state"] == "live")
        assert live["teacher"] == "T"
        await ann.send(type="chat", text="during the lesson")
        await observer.next("chat")
        await asyncio.sleep(1.2)
        await ann.close()
        await teacher_pub.close()  # DELETE: the teacher ends the lesson
        ended = await observer.next("lesson", where=lambda m: m["state"] == "ended")
        assert "ended the lesson" in ended["reason"]
        status, body = await api("POST", f"{url}/api/recordings/rec-{room}/watch", tok("student", room, "Cy"),
                                 {"seconds": 30, "lesson": lesson_id})
        assert status == 200 and body["seconds"] == 30

        # The recording of the lesson: its public Q&A for the replay page, and replay pings that
        # find the lesson from the recording id alone.
        status, listing = await api("GET", f"{url}/api/recordings?room={room}")
        assert status == 200 and len(listing["recordings"]) == 1, listing
        recording_id = listing["recordings"][0]["id"]
        status, body = await api("GET", f"{url}/api/recordings/{recording_id}/history")
        assert status == 200, body
        chat = [e for e in body["entries"] if e["type"] == "chat"]
        assert [e["text"] for e in chat] == ["during the lesson"] and chat[0]["offset"] >= 0
        # Once the recording is final its Q&A is kept in its own folder too, so the replay keeps
        # it when the room's log is gone (pruned, or the folder archived elsewhere).
        kept = cls_server.data / "recordings" / recording_id / "history.jsonl"
        for _ in range(100):
            if kept.exists():
                break
            await asyncio.sleep(0.1)
        assert "during the lesson" in kept.read_text()
        # The endpoint serves that copy: a line only the folder has (as after the room's log was
        # pruned) shows up in the replay's Q&A.
        with kept.open("a") as f:
            f.write(json.dumps({"id": "archived-1", "ts": listing["recordings"][0]["started_at"] + 0.5,
                                "type": "chat", "name": "Archive", "text": "kept in the folder", "to": "all"}) + "\n")
        status, body = await api("GET", f"{url}/api/recordings/{recording_id}/history")
        assert sorted(e["text"] for e in body["entries"] if e["type"] == "chat") == ["during the lesson",
                                                                                     "kept in the folder"], body
        status, body = await api("POST", f"{url}/api/recordings/{recording_id}/watch", tok("student", room, "Cy"),
                                 {"seconds": 12})
        assert status == 200 and body["lesson"] == lesson_id and body["seconds"] == 42
        status, body = await api("GET", f"{url}/api/rooms/{room}/history")  # no token: public entries
        assert status == 200 and {e.get("to") for e in body["entries"]} == {"all"}
        assert (await api("POST", f"{url}/api/recordings/x/watch", tok("student", room, "Cy"),
                          {"seconds": 9999}))[0] == 400

        assert (await api("GET", f"{url}/api/lessons/{lesson_id}/attendance", bob_token))[0] == 403
        report: dict = {}
        for _ in range(30):
            status, report = await api("GET", f"{url}/api/lessons/{lesson_id}/attendance", teacher_token)
            assert status == 200
            if {"Ann", "Bob", "T", "Asst", "Cy"} <= {p["name"] for p in report["participants"]}:
                break
            await asyncio.sleep(0.2)
        people = {p["name"]: p for p in report["participants"]}
        assert people["Ann"]["present"] is False and people["Ann"]["live_seconds"] >= 1.0
        assert people["Bob"]["present"] is True  # still watching over WHEP
        assert people["T"]["role"] == "teacher" and people["T"]["last_leave"] is not None
        assert people["Asst"]["role"] == "assistant"
        assert people["Cy"]["replay_seconds"] == 42 and people["Cy"]["live_seconds"] == 0
        assert report["totals"]["students_replay_only"] == 1
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/api/lessons/{lesson_id}/attendance?format=csv",
                                headers={"Authorization": f"Bearer {teacher_token}"}) as resp:
                assert resp.status == 200 and resp.content_type == "text/csv"
                rows = (await resp.text()).splitlines()
        assert rows[0] == "name,role,present,first_join,last_leave,live_seconds,joins,replay_seconds"
        assert any(r.startswith("Bob,student,yes,") for r in rows)
        # Rooms outside the timetable: ROOM@YYYY-MM-DD.
        status, _ = await api("GET", f"{url}/api/lessons/{room}-adhoc@{date.today()}/attendance", OPS)
        assert status == 200
        assert (await api("GET", f"{url}/api/lessons/nope/attendance", OPS))[0] == 404
    finally:
        await bob_watch.pc.close()
        await observer.close()
