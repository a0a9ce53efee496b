"""The web pages end to end in a real browser: Chromium teaches and watches through the real server.

Kept light for 2-core machines (testing.md): one browser, at most two pages at a time.
Media goes to 127.0.0.1 only: the server offers only that candidate (``--ice-address``) and
Chromium enumerates no interface (``--webrtc-ip-handling-policy``, see CHROMIUM_FLAGS), so both
ends of the selected candidate pair are 127.0.0.1; the main test checks that.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

import aiohttp
import pytest
from conftest import require_binary

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
    "--autoplay-policy=no-user-gesture-required", "--allow-loopback-in-peer-connection",
    # Not in testing.md's list, and needed: without it Chromium also gathers eth0's address and
    # nominates that socket (lower network cost than loopback), so the server would send media to
    # the machine's other address. With adapter enumeration off, Chromium offers no host candidate
    # and checks the server's 127.0.0.1 from an unbound socket: the server learns 127.0.0.1 as a
    # peer-reflexive candidate and every packet goes 127.0.0.1 <-> 127.0.0.1 (asserted below).
    "--webrtc-ip-handling-policy=default_public_interface_only",
]
SCREENSHOTS = Path("/tmp")


async def room_state(server, room: str) -> dict:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/api/rooms/{room}") as resp:
            return await resp.json()


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll ``check`` until it returns something truthy; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")


@pytest.fixture
async def browser():
    require_binary(CHROMIUM)
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        # Never `playwright install`: Debian's chromium is the browser under test.
        instance = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        context = await instance.new_context(viewport={"width": 1280, "height": 720})
        try:
            yield context
        finally:
            await context.close()
            await instance.close()


def console_log(page, sink: list[str]) -> None:
    page.on("console", lambda msg: sink.append(f"{msg.type}: {msg.text}"))
    page.on("pageerror", lambda exc: sink.append(f"pageerror: {exc}"))


async def frames_beyond(page, minimum: int) -> Optional[dict]:
    stats = await page.evaluate("window.skyclass.stats()")
    return stats if stats["framesDecoded"] > minimum else None


async def test_teacher_publishes_student_watches(server, browser) -> None:
    room = "browser-lesson"
    logs: list[str] = []
    teach = await browser.new_page()
    watch = await browser.new_page()
    console_log(teach, logs)
    console_log(watch, logs)
    try:
        await teach.goto(f"{server.url}/teach/{room}?token={server.token('teacher', room, 'Ms Browser')}")
        assert await teach.evaluate("window.skyclass.state()") == "idle"
        await teach.click("#start")
        await eventually(lambda: teach.evaluate("window.skyclass.state() === 'live'"), 30, "teacher live")

        await watch.goto(f"{server.url}/watch/{room}?token={server.token('student', room, 'Sam')}")
        stats = await eventually(lambda: frames_beyond(watch, 30), 60, "30 decoded frames on the watch page")
        assert stats["packetsReceived"] > 0 and stats["frameWidth"] > 0
        # Decoding keeps going: the stream is live, not one burst.
        await eventually(lambda: frames_beyond(watch, stats["framesDecoded"] + 10), 20, "more frames")
        assert await watch.evaluate("window.skyclass.state()") == "live"
        watch_stats = await watch.evaluate("window.skyclass.stats()")
        assert watch_stats["audioPacketsReceived"] > 0, "audio did not arrive"
        assert (watch_stats["localAddress"], watch_stats["remoteAddress"]) == ("127.0.0.1", "127.0.0.1"), watch_stats

        state = await room_state(server, room)
        assert state["live"] is True and state["viewers"] == 1 and state["publisher"] == "Ms Browser"
        # The teacher page polls the room every 2 s.
        await eventually(lambda: teach.evaluate("document.getElementById('viewers').textContent === '1'"),
                         10, "viewer count 1 on the teach page")

        # Codec: the page must prefer H.264 whenever Chromium can encode it (Debian's chromium 156
        # can, with OpenH264: measured here, the room runs H.264); a build without an H.264 encoder
        # sends its default, VP8, which the server accepts.
        teacher = await teach.evaluate("window.skyclass.stats()")
        can_encode_h264 = await teach.evaluate(
            "RTCRtpSender.getCapabilities('video').codecs.some(c => c.mimeType.toLowerCase() === 'video/h264')")
        if can_encode_h264:
            assert teacher["preferredVideoCodec"] == "video/H264", teacher
            assert teacher["offeredVideoCodecs"][0] == "H264", teacher
        expected = "video/h264" if can_encode_h264 else "video/vp8"
        assert state["codecs"]["video"].lower() == expected, (teacher, state)
        assert state["codecs"]["audio"].lower() == "audio/opus"
        assert (teacher["codec"] or "").lower() == expected, teacher
        assert (teacher["localAddress"], teacher["remoteAddress"]) == ("127.0.0.1", "127.0.0.1"), teacher
        assert (watch_stats["codec"] or "").lower() == expected, watch_stats

        await teach.screenshot(path=str(SCREENSHOTS / "skyclass-teach.png"))
        await watch.screenshot(path=str(SCREENSHOTS / "skyclass-watch.png"))

        # Stop ends the WHIP session (DELETE): the room is no longer live, the student stays.
        await teach.click("#stop")
        await eventually(lambda: teach.evaluate("window.skyclass.state() === 'idle'"), 5, "teacher idle")
        await eventually(lambda: _not_live(server, room), 10, "room not live after Stop")
        await eventually(lambda: watch.evaluate("window.skyclass.state() === 'waiting'"), 15, "student waiting")
    except BaseException:
        print("\n".join(logs[-50:]))
        print(server.log())
        raise
    finally:
        await teach.close()
        await watch.close()


async def _not_live(server, room: str) -> bool:
    state = await room_state(server, room)
    return not state["live"] and state["viewers"] == 1


async def test_student_waits_for_the_teacher(server, browser) -> None:
    """A student who arrives early connects at once and sees the lesson when it starts."""
    room = "browser-early"
    logs: list[str] = []
    watch = await browser.new_page()
    teach = await browser.new_page()
    console_log(teach, logs)
    console_log(watch, logs)
    try:
        await watch.goto(f"{server.url}/watch/{room}?token={server.token('student', room, 'Early')}")
        await eventually(lambda: watch.evaluate("window.skyclass.state() === 'waiting'"), 20, "student waiting")
        assert (await room_state(server, room))["viewers"] == 1
        await watch.screenshot(path=str(SCREENSHOTS / "skyclass-watch-waiting.png"))

        await teach.goto(f"{server.url}/teach/{room}?token={server.token('teacher', room, 'Late')}")
        await teach.click("#start")
        await eventually(lambda: frames_beyond(watch, 30), 60, "30 decoded frames after the teacher started")
        assert await watch.evaluate("window.skyclass.stats().then(s => s.reconnects)") == 0
    except BaseException:
        print("\n".join(logs[-50:]))
        print(server.log())
        raise
    finally:
        await teach.close()
        await watch.close()


async def test_bad_token_shows_the_reason(server, browser) -> None:
    """A WHEP refusal is shown as the server's text reason, and a 403 is not retried."""
    page = await browser.new_page()
    try:
        # A teacher token for another room: the server answers 403 with a reason.
        await page.goto(f"{server.url}/watch/room-a?token={server.token('student', 'room-b', 'Lost')}")
        await eventually(lambda: page.evaluate("window.skyclass.state() === 'error'"), 15, "error state")
        note = await page.text_content("#note")
        assert "forbidden" in note and "room-b" in note, note

        await page.goto(f"{server.url}/")
        await page.fill("#room", "grade7")
        await page.fill("#token", "abc.def")
        await page.screenshot(path=str(SCREENSHOTS / "skyclass-index.png"))
        await page.click("button[type=submit]")
        await page.wait_for_url("**/watch/grade7?token=abc.def")
    finally:
        await page.close()


async def test_pages_reconnect_after_a_server_restart(tmp_path, monkeypatch, browser) -> None:
    """Teacher and student pages come back by themselves when the server restarts."""
    import conftest

    first = conftest.ServerProcess(tmp_path / "first")
    servers = [first]
    room = "browser-restart"
    logs: list[str] = []
    teach = await browser.new_page()
    watch = await browser.new_page()
    console_log(teach, logs)
    console_log(watch, logs)
    try:
        await teach.goto(f"{first.url}/teach/{room}?token={first.token('teacher', room, 'T')}")
        await teach.click("#start")
        await watch.goto(f"{first.url}/watch/{room}?token={first.token('student', room, 'S')}")
        await eventually(lambda: frames_beyond(watch, 30), 60, "frames before the restart")

        first.stop()
        # Chromium notices the silence (ICE consent) within seconds; the pages then retry the POST.
        await eventually(lambda: watch.evaluate("window.skyclass.state() === 'reconnecting'"), 30, "student reconnecting")
        await eventually(lambda: teach.evaluate("window.skyclass.state() === 'connecting'"), 30, "teacher reconnecting")

        # Same port (and secret), so the pages' URLs and tokens stay valid.
        monkeypatch.setattr(conftest, "free_port", lambda: first.port)
        second = conftest.ServerProcess(tmp_path / "second")
        servers.append(second)
        await eventually(lambda: teach.evaluate("window.skyclass.state() === 'live'"), 45, "teacher live again")
        await eventually(lambda: frames_beyond(watch, 30), 60, "frames after the restart")
        assert (await watch.evaluate("window.skyclass.stats()"))["reconnects"] >= 1
        state = await room_state(second, room)
        assert state["live"] is True and state["viewers"] == 1, state
    except BaseException:
        print("\n".join(logs[-50:]))
        print(servers[-1].log())
        raise
    finally:
        await teach.close()
        await watch.close()
        for srv in servers:
            srv.stop()


async def test_over_capacity_honours_retry_after(tmp_path, browser) -> None:
    """A full node answers 503: the page shows the reason, waits Retry-After, and gets in once a
    seat frees up. The node is really full: one worker with room for one student."""
    import conftest
    from skyclass.loadtest.clients import watch as aiortc_watch

    server = conftest.ServerProcess(tmp_path / "full", ["--workers", "1", "--max-viewers-per-worker", "1"])
    room = "browser-full"
    seated = await aiortc_watch(server.url, room, server.token("student", room, "Seated"))
    page = await browser.new_page()
    try:
        await page.goto(f"{server.url}/watch/{room}?token={server.token('student', room, 'Patient')}")
        await eventually(lambda: page.evaluate("window.skyclass.state() === 'reconnecting'"), 15, "refused and retrying")
        assert "full" in await page.text_content("#note")
        refused_at = time.monotonic()
        await asyncio.sleep(1)
        assert (await room_state(server, room))["viewers"] == 1
        await seated.close()
        await eventually(lambda: page.evaluate("window.skyclass.state() === 'waiting'"), 30, "admitted at last")
        # the server said Retry-After: 5; the page waited at least that before its next try
        assert time.monotonic() - refused_at >= 4
        assert (await room_state(server, room))["viewers"] == 1
    finally:
        await page.close()
        server.stop()


async def test_ops_dashboard(server, browser) -> None:
    """/ops in Chromium: a wrong token is asked to be replaced; an ops token shows the live room
    with its students and the node's packet rate, refreshed by polling."""
    from skyclass.loadtest.clients import IndexedVideoTrack, publish, watch
    from skyclass.media import aiortc_glue
    from skyclass.server.tokens import issue_token

    from conftest import SECRET

    room = f"browser-ops-{int(time.time() * 1000) % 100000}"
    aiortc_glue.restrict_host_addresses(["127.0.0.1"])
    teacher = await publish(server.url, room, server.token("teacher", room, "Ms Ops"), [IndexedVideoTrack()])
    students = [await watch(server.url, room, server.token("student", room, f"s{i}"), lambda track: None)
                for i in range(3)]
    page = await browser.new_page()
    logs: list[str] = []
    console_log(page, logs)
    try:
        await asyncio.wait_for(teacher.connected.wait(), 20)
        for s in students:
            await asyncio.wait_for(s.connected.wait(), 20)
        await page.goto(f"{server.url}/ops?token={server.token('student', room, 'nosy')}")
        await page.wait_for_selector("#token-form:not(.hidden)", timeout=10000)
        assert "cannot open the ops view" in await page.text_content("#message")

        await page.fill("#token", issue_token(SECRET, "ops", "*", "Ops", 600))
        await page.click("#token-form button")
        row = page.locator(f"#rooms tr[data-room='{room}']")
        await eventually(lambda: row.count(), 10, "the room in the ops table")
        cells = await row.locator("td").all_text_contents()
        assert cells[1] == "live" and cells[2] == "Ms Ops" and cells[3] == "3", cells
        assert cells[8].startswith("recording"), cells

        async def rates() -> Optional[dict]:
            return (await page.evaluate("window.skyclassOps.state()"))["rates"]
        measured = await eventually(rates, 10, "rates from two polls")
        assert measured["packets_out"] > 10, measured  # three students of a 15 fps teacher: about 45
        shown = await page.text_content(".tile[data-key='packets_out'] .value")
        assert int(shown.replace(",", "")) > 0, shown
        assert await page.locator("#workers tr").count() == 2
        assert not [line for line in logs if line.startswith("pageerror")], logs
    finally:
        await page.close()
        for s in students:
            await s.close()
        await teacher.close()
