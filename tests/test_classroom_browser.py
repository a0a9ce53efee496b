"""The classroom in a real browser: a student's page asks, raises a hand, is given the floor and
speaks (WHIP from the page); the teacher's page sees the queue, gives and takes the floor and
hears the student (audio stats of its speaker-slot WHEP session). The landing page's
timetable with join links, and the replay page's Q&A and watch time."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from classroom_clients import WsClient
from test_browser import CHROMIUM, CHROMIUM_FLAGS, console_log, eventually  # noqa: F401  (same browser setup)
from test_browser import browser  # noqa: F401  (the fixture)

from skyclass.loadtest.clients import IndexedVideoTrack, publish
from skyclass.media import aiortc_glue
from skyclass.server.tokens import issue_token

from conftest import SECRET


async def room_state(server, room: str) -> dict:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/api/rooms/{room}") as resp:
            return await resp.json()


async def test_student_page_speaks_and_teacher_page_hears(server, browser) -> None:  # noqa: F811
    room = f"browser-floor-{int(time.time() * 1000) % 100000}"
    logs: list[str] = []
    teacher = await browser.new_page()
    console_log(teacher, logs)
    await teacher.goto(f"{server.url}/teach/{room}?token={server.token('teacher', room, 'Ms Li')}")
    student = await browser.new_page()
    console_log(student, logs)
    await student.goto(f"{server.url}/watch/{room}?token={server.token('student', room, 'Ana')}")
    try:
        state = "(window.skyclass.classroom ? window.skyclass.classroom.state() : {})"
        await eventually(lambda: student.evaluate(f"{state}.status === 'open'"), 15, "student events")
        await eventually(lambda: teacher.evaluate(f"{state}.status === 'open'"), 15, "teacher events")

        # Ask a question from the page; the teacher's page queues it and marks it answered.
        await student.fill("#classroom input[aria-label='Your question']", "What is a prime?")
        await student.click("#classroom .cr-form button:has-text('Ask')")
        await eventually(lambda: teacher.locator("#classroom .cr-questions li").count(), 10, "the question queued")
        await teacher.fill("#classroom .cr-questions input", "Divisible by 1 and itself only")
        await teacher.click("#classroom .cr-questions button:has-text('Answered')")
        await eventually(lambda: student.locator("#classroom .cr-answers .cr-answer",
                                                 has_text="Divisible by 1").count(), 10, "the answer shown")

        # Raise a hand; the teacher gives the floor; the page speaks over WHIP.
        await student.click("#classroom .cr-hand")
        await eventually(lambda: teacher.locator("#classroom .cr-hands li", has_text="Ana").count(), 10, "the hand")
        await teacher.click("#classroom .cr-hands button:has-text('Give the floor')")
        await eventually(lambda: student.evaluate(f"{state}.speaking"), 20,
                         f"the student's WHIP session (page says {logs[-3:]})")
        assert await student.locator("#classroom .cr-speaking", has_text="You are speaking").is_visible()
        assert (await room_state(server, room))["speakers"] == ["Ana"]

        # The teacher's page hears the student through the speaker slot.
        async def hears() -> bool:
            stats = await teacher.evaluate("window.skyclass.classroom.speakerStats()")
            return stats["audioPacketsReceived"] > 50
        await eventually(hears, 30, "audio from the student on the teacher's page")

        await teacher.click("#classroom button:has-text('Take the floor back')")
        await eventually(lambda: student.evaluate(f"!{state}.speaking && !{state}.floor"), 10, "speaking stopped")

        async def no_speakers() -> bool:
            return (await room_state(server, room)).get("speakers") == []
        await eventually(no_speakers, 10, "the speaker's session ended on the server")
        assert not [line for line in logs if line.startswith("pageerror")], logs
    finally:
        await student.close()
        await teacher.close()


async def test_landing_page_timetable_links(server, browser) -> None:  # noqa: F811
    room = f"browser-tt-{int(time.time() * 1000) % 100000}"
    now = time.time()
    ops = issue_token(SECRET, "ops", "*", "Ops", 600)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.url}/api/timetable", headers={"Authorization": f"Bearer {ops}"},
                             json={"room": room, "subject": "maths", "grade": "7", "teacher": "Ms Li",
                                   "title": "Browser maths", "start": now - 60, "end": now + 3600}) as resp:
            assert resp.status == 201, await resp.text()
    page = await browser.new_page()
    try:
        student = issue_token(SECRET, "student", "*", "Ana", 600, extra={"grade": "7"})
        await page.goto(f"{server.url}/?token={student}")
        row = page.locator("#timetable tr", has_text="Browser maths")
        await eventually(lambda: row.count(), 10, "the lesson in the timetable")
        link = await row.locator("a:has-text('Watch')").get_attribute("href")
        assert link.startswith(f"/watch/{room}?token=")
        other = issue_token(SECRET, "student", "*", "Bo", 600, extra={"grade": "8"})
        await page.goto(f"{server.url}/?token={other}")
        await eventually(lambda: page.locator("#tt-who", has_text="Bo").count(), 10, "the other student")
        assert await page.locator("#timetable tr", has_text="Browser maths").count() == 0
    finally:
        await page.close()


async def test_replay_page_shows_the_qa_and_counts_watch_time(server, browser) -> None:  # noqa: F811
    """A recorded Q&A lesson: the timetable links its replay; the replay page lists the chat and
    the answered question at their offsets, seeks to one when clicked, and reports the seconds
    the student played into the lesson's attendance."""
    room = f"browser-replay-{int(time.time() * 1000) % 100000}"
    now = time.time()
    ops = issue_token(SECRET, "ops", "*", "Ops", 600)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.url}/api/timetable", headers={"Authorization": f"Bearer {ops}"},
                             json={"room": room, "subject": "physics", "grade": "8", "teacher": "Mr Bo",
                                   "kind": "qa", "title": "Replay physics", "start": now - 60,
                                   "end": now + 3600}) as resp:
            assert resp.status == 201, await resp.text()
            lesson_id = (await resp.json())["saved"][0]["id"]
    teacher_token = server.token("teacher", room, "Mr Bo")
    student_token = issue_token(SECRET, "student", "*", "Ana", 600, extra={"grade": "8"})
    aiortc_glue.restrict_host_addresses(["127.0.0.1"])
    teacher_ws = await WsClient.connect(server.url, room, teacher_token)
    ana = await WsClient.connect(server.url, room, student_token)
    video = IndexedVideoTrack(fps=15)
    teacher = await publish(server.url, room, teacher_token, [video])
    try:
        await asyncio.wait_for(teacher.connected.wait(), 15)
        await asyncio.sleep(2.5)
        await ana.send(type="question", text="Why do magnets attract?")
        question = (await teacher_ws.next("question"))["question"]
        await asyncio.sleep(1.5)
        await teacher_ws.send(type="answered", id=question["id"], answer="Aligned domains")
        await ana.next("answered")
        await ana.send(type="chat", text="thank you")
        await teacher_ws.next("chat")
        await asyncio.sleep(3)
    finally:
        await teacher.close()  # DELETE: the lesson ends and its recording is finalised
        await ana.close()
        await teacher_ws.close()

    async def replay_link() -> str:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{server.url}/api/timetable?room={room}",
                                headers={"Authorization": f"Bearer {student_token}"}) as resp:
                lessons = (await resp.json())["lessons"]
        return lessons[0]["links"].get("replay", "") if lessons else ""
    link = await eventually(replay_link, 15, "a replay link in the student's timetable")
    assert link.startswith("/replay/") and f"token={student_token}" in link

    async def complete() -> bool:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{server.url}/api/recordings?room={room}") as resp:
                found = (await resp.json())["recordings"]
        return bool(found) and found[0]["state"] == "complete"
    await eventually(complete, 15, "the recording finalised")

    page = await browser.new_page()
    logs: list[str] = []
    console_log(page, logs)
    try:
        await page.goto(server.url + link)
        qa = await eventually(lambda: page.evaluate("window.skyclassReplay && window.skyclassReplay.state().qa"),
                              15, "the replay's Q&A")
        by_kind = {entry["kind"]: entry for entry in qa}
        assert by_kind["question"]["text"] == "Why do magnets attract?", qa
        assert by_kind["question"]["answer"] == "Aligned domains" and by_kind["question"]["who"] == "Ana"
        assert by_kind["chat"]["text"] == "thank you"
        # offsets are seconds into the recording: the answer came ~4 s in, the chat right after it
        assert 1.0 < by_kind["question"]["offset"] <= by_kind["chat"]["offset"] < 12, qa
        assert await page.locator("#qa-list li", has_text="Aligned domains").is_visible()

        await page.wait_for_function("window.skyclassReplay.state().readyState >= 1", timeout=15000)
        await page.evaluate("document.getElementById('video').muted = true")
        await page.locator("#qa-list li.qa-question .qa-time").click()  # seek to the question, play from there

        async def played_past_question() -> bool:
            state = await page.evaluate("window.skyclassReplay.state()")
            return state["currentTime"] > by_kind["question"]["offset"] + 1.0 and not state["paused"]
        await eventually(played_past_question, 15, "playback from the question")
        assert await page.locator("#qa-list li.qa-question.qa-past").count() == 1

        await eventually(lambda: page.evaluate("window.skyclassReplay.state().watch.pending >= 1.5"), 15,
                         "watch time counted")
        await page.evaluate("window.skyclassReplay.flushWatchTime()")

        async def replay_seconds() -> float:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{server.url}/api/lessons/{lesson_id}/attendance",
                                    headers={"Authorization": f"Bearer {teacher_token}"}) as resp:
                    report = await resp.json()
            people = {p["name"]: p for p in report.get("participants", [])}
            return people.get("Ana", {}).get("replay_seconds", 0)
        seconds = await eventually(replay_seconds, 10, "Ana's replay time in the attendance")
        assert 1.0 <= seconds <= 12, seconds
        assert not [line for line in logs if line.startswith("pageerror")], logs
    finally:
        await page.close()
