"""The classroom in a real browser: a student's page asks, raises a hand, is given the floor and
speaks (WHIP from the page); the teacher's page sees the queue, gives and takes the floor and
hears the student (audio stats of its speaker-slot WHEP session). And the landing page's
timetable with join links."""

from __future__ import annotations

import time

import aiohttp
from test_browser import CHROMIUM, CHROMIUM_FLAGS, console_log, eventually  # noqa: F401  (same browser setup)
from test_browser import browser  # noqa: F401  (the fixture)

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
