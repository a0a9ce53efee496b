"""Recording and replay end to end: a real server, real aiortc teachers, the HLS read back with PyAV.

The teacher's video spells each frame's index and its audio beeps exactly when frames
0, 15, 30, … are captured, so the test can check frame count and order, A/V sync, segment
starts and seeking from the recording alone.
"""

from __future__ import annotations

import asyncio
import fractions
import io
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import aiohttp
import av
import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamTrack

from conftest import PEER_TIMEOUT, ServerProcess
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender

from skyclass.loadtest.clients import IndexedVideoTrack, PeerSession, _exchange, decode_index_frame, publish
from skyclass.media import aiortc_glue

FPS = 15
BEEP_EVERY = 1.0  # seconds: one beep per FPS frames
BEEP_LENGTH = 0.1


class BeepAudioTrack(MediaStreamTrack):
    """Silence with a 1 kHz beep whenever ``video`` captures a frame whose index is a multiple
    of FPS: the same wall-clock instant in both tracks, so the recording's A/V offset is
    measurable."""

    kind = "audio"

    def __init__(self, video: IndexedVideoTrack, rate: int = 48000) -> None:
        super().__init__()
        self.video, self.rate = video, rate
        self._start: Optional[float] = None
        self._samples = 0

    async def recv(self) -> av.AudioFrame:
        if self._start is None:
            self._start = time.monotonic()
        n = self.rate // 50
        delay = self._start + self._samples / self.rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        times = self._start + (np.arange(n) + self._samples) / self.rate
        pcm = np.zeros(n)
        v0 = self.video._start
        if v0 is not None:
            # the video's k*FPS-th frame (index sent[0] + k*FPS) is captured at v0 + k*BEEP_EVERY
            since = times - v0
            on = (since >= 0) & ((since % BEEP_EVERY) < BEEP_LENGTH)
            pcm = np.where(on, np.sin(2 * math.pi * 1000 * times), 0.0)
        frame = av.AudioFrame.from_ndarray((pcm * 12000).astype(np.int16).reshape(1, -1), format="s16",
                                           layout="mono")
        frame.sample_rate = self.rate
        frame.pts = self._samples
        frame.time_base = fractions.Fraction(1, self.rate)
        self._samples += n
        return frame


@dataclass
class Lesson:
    room: str
    recording: dict
    sent: list[int]
    ended_after: float  # seconds from DELETE to a complete (VOD) recording
    live_playlist: str  # the playlist as a late student saw it during the lesson


async def get_json(url: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as resp:
            return resp.status, await resp.json()


async def recordings_of(server, room: str) -> list[dict]:
    status, body = await get_json(f"{server.url}/api/recordings?room={room}")
    assert status == 200
    return body["recordings"]


async def wait_state(server, room: str, states: tuple[str, ...], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    found: list[dict] = []
    while time.monotonic() < deadline:
        found = await recordings_of(server, room)
        if found and found[0]["state"] in states:
            return found[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"room {room}: no recording in {states} after {timeout} s: {found}")


async def publish_only(server, room: str, token: str, tracks: list, video_codec: str) -> PeerSession:
    """Publish offering a single video codec (the server would pick H.264 from a full offer)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    for track in tracks:
        transceiver = pc.addTransceiver(track, direction="sendonly")
        if track.kind == "video":
            caps = RTCRtpSender.getCapabilities("video").codecs
            transceiver.setCodecPreferences([c for c in caps if c.mimeType.lower() == video_codec.lower()])
    return await _exchange(server.url, f"/whip/{room}", token, pc)


async def run_lesson(server, room: str, seconds: float, codec: str = "video/H264") -> Lesson:
    video = IndexedVideoTrack(fps=FPS)
    teacher = await publish_only(server, room, server.token("teacher", room, "Ms Rivera"),
                                 [video, BeepAudioTrack(video)], video_codec=codec)
    await asyncio.wait_for(teacher.connected.wait(), 15)
    await asyncio.sleep(seconds * 0.6)
    recording = (await recordings_of(server, room))[0]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/replay/{recording['id']}/index.m3u8") as resp:
            live_playlist = await resp.text()
            assert resp.status == 200 and resp.headers["Cache-Control"] == "no-cache", (resp.status, live_playlist)
    await asyncio.sleep(seconds * 0.4)
    await teacher.close()  # DELETE: the lesson ends
    ended = time.monotonic()
    recording = await wait_state(server, room, ("complete",), 10)
    return Lesson(room, recording, list(video.sent), time.monotonic() - ended, live_playlist)


@pytest.fixture(scope="module")
def lessons(server) -> dict[str, Lesson]:
    """An H.264 and a VP8 lesson, recorded at the same time (two rooms), shared by the tests below."""
    aiortc_glue.restrict_host_addresses(["127.0.0.1"])

    async def both() -> list[Lesson]:
        return await asyncio.gather(run_lesson(server, "grade7-maths", 8.0),
                                    run_lesson(server, "g5_science", 5.0, codec="video/VP8"))

    h264, vp8 = asyncio.run(both())
    return {"h264": h264, "vp8": vp8}


def decode_all(container: av.container.InputContainer) -> tuple[list[tuple[float, Optional[int]]], np.ndarray, float]:
    """(video pts, index) per frame; mono audio samples; the first audio sample's time."""
    frames: list[tuple[float, Optional[int]]] = []
    chunks: list[np.ndarray] = []
    audio_start: Optional[float] = None
    for packet in container.demux():
        if packet.size == 0:
            continue
        for frame in packet.decode():
            if packet.stream.type == "video":
                frames.append((float(frame.time), decode_index_frame(frame.to_ndarray(format="gray"))))
            else:
                if audio_start is None:
                    audio_start = float(frame.time)
                chunks.append(frame.to_ndarray().reshape(frame.samples, -1)[:, 0] if frame.format.is_packed
                              else frame.to_ndarray()[0])
    return frames, np.concatenate(chunks) if chunks else np.zeros(0), audio_start or 0.0


def beep_onsets(samples: np.ndarray, start: float, rate: int = 48000) -> list[float]:
    window = rate // 1000  # 1 ms
    usable = len(samples) // window * window
    level = np.abs(samples[:usable].astype(np.float64)).reshape(-1, window).max(axis=1)
    threshold = level.max() * 0.3
    onsets, quiet = [], 0
    for i, value in enumerate(level):
        if value > threshold:
            if quiet >= 200:  # at least 200 ms of silence before: a new beep
                onsets.append(start + i / 1000)
            quiet = 0
        else:
            quiet += 1
    return onsets


async def fetch(url: str, headers: Optional[dict] = None) -> tuple[int, dict, bytes]:
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers=headers or {}) as resp:
            return resp.status, dict(resp.headers), await resp.read()


def test_lesson_is_recorded_and_catalogued(server, lessons) -> None:
    lesson = lessons["h264"]
    rec = lesson.recording
    assert lesson.ended_after < 5.0, "VOD playlist not complete within 5 s of the lesson's end"
    assert rec["room"] == "grade7-maths" and rec["teacher"] == "Ms Rivera" and rec["state"] == "complete"
    assert rec["grade"] == "7" and rec["subject"] == "maths" and rec["title"]
    assert rec["codecs"]["video"].startswith("avc1.") and rec["codecs"]["audio"] == "opus"
    assert rec["ended_at"] > rec["started_at"] and rec["size"] > 0 and rec["segments"] >= 3
    # the live playlist was an EVENT one, open-ended
    assert "#EXT-X-PLAYLIST-TYPE:EVENT" in lesson.live_playlist and "#EXT-X-ENDLIST" not in lesson.live_playlist
    status, one = asyncio.run(get_json(f"{server.url}/api/recordings/{rec['id']}"))
    assert status == 200 and one["id"] == rec["id"]
    for query, expected in (("grade=7", True), ("subject=maths", True), ("grade=5", False),
                            (f"date={rec['date']}", True), ("date=1999-01-01", False)):
        status, body = asyncio.run(get_json(f"{server.url}/api/recordings?{query}"))
        assert status == 200 and (rec["id"] in {r["id"] for r in body["recordings"]}) == expected, query
    assert asyncio.run(get_json(f"{server.url}/api/recordings/nope"))[0] == 404
    assert asyncio.run(get_json(f"{server.url}/api/recordings?date=yesterday"))[0] == 400


def test_replay_matches_the_lesson(server, lessons) -> None:
    lesson = lessons["h264"]
    rec = lesson.recording
    container = av.open(f"{server.url}{rec['playlist']}")
    frames, audio, audio_start = decode_all(container)
    duration = container.duration / 1e6
    container.close()

    lesson_seconds = len(lesson.sent) / FPS
    assert abs(duration - lesson_seconds) < 0.5, (duration, lesson_seconds)
    assert abs(rec["duration"] - lesson_seconds) < 0.5, (rec["duration"], lesson_seconds)
    indices = [i for _, i in frames]
    assert None not in indices, "a frame did not decode cleanly"
    assert indices == list(range(indices[0], indices[0] + len(indices))), "frames missing or out of order"
    assert indices[0] == lesson.sent[0] and len(indices) >= len(lesson.sent) - 3, (len(indices), len(lesson.sent))

    # A/V sync: each beep starts when the frame with index k*FPS is shown
    frame_time = {i: t for t, i in frames}
    onsets = beep_onsets(audio, audio_start)
    offsets = []
    for onset in onsets:
        k = round((onset - frame_time[indices[0]]) / BEEP_EVERY)
        index = lesson.sent[0] + k * FPS
        if index in frame_time:
            offsets.append(onset - frame_time[index])
    assert len(offsets) >= lesson_seconds - 2, (onsets, offsets)
    assert max(abs(o) for o in offsets) < 0.1, f"A/V offsets {offsets}"


def test_segments_start_on_keyframes_and_seek(server, lessons) -> None:
    rec = lessons["h264"].recording
    base = f"{server.url}/replay/{rec['id']}"
    status, headers, playlist = asyncio.run(fetch(base + "/index.m3u8"))
    text = playlist.decode()
    assert status == 200 and headers["Content-Type"] == "application/vnd.apple.mpegurl"
    assert "#EXT-X-PLAYLIST-TYPE:VOD" in text and text.rstrip().endswith("#EXT-X-ENDLIST")
    assert "no-cache" not in headers["Cache-Control"]
    init_uri = re.search(r'#EXT-X-MAP:URI="([^"]+)"', text).group(1)
    segments = [line for line in text.splitlines() if line and not line.startswith("#")]
    durations = [float(v) for v in re.findall(r"#EXTINF:([\d.]+),", text)]
    assert all(d <= 4.0 for d in durations[:-1]) and all(d >= 1.0 for d in durations[:-1]), durations
    status, headers, init = asyncio.run(fetch(f"{base}/{init_uri}"))
    assert headers["Content-Type"] == "video/mp4" and "immutable" in headers["Cache-Control"]

    start = 0.0
    for n, (uri, seconds) in enumerate(zip(segments, durations)):
        status, headers, body = asyncio.run(fetch(f"{base}/{uri}"))
        assert status == 200 and headers["Content-Type"] == "video/iso.segment"
        assert headers["Accept-Ranges"] == "bytes" and "immutable" in headers["Cache-Control"]
        # Each segment alone (after the init) decodes from a key frame: that is what seeking does.
        with av.open(io.BytesIO(init + body)) as c:
            video = c.streams.video[0]
            packets = [p for p in c.demux(video) if p.size]
            assert packets[0].is_keyframe, f"segment {n} does not start on a key frame"
            decoded = [f for p in packets for f in p.decode()]
            indices = [decode_index_frame(f.to_ndarray(format="gray")) for f in decoded]
        assert None not in indices and len(indices) == len(packets)
        assert abs(float(decoded[0].time) - start) < 0.05, (n, decoded[0].time, start)
        start += seconds

    # A range request on the middle segment
    middle = segments[len(segments) // 2]
    status, headers, part = asyncio.run(fetch(f"{base}/{middle}", {"Range": "bytes=0-99"}))
    assert status == 206 and len(part) == 100 and headers["Content-Range"].startswith("bytes 0-99/")

    # Seek the whole playlist to the middle segment, as a player would
    target = sum(durations[:len(segments) // 2]) + 0.2
    with av.open(f"{base}/index.m3u8") as c:
        video = c.streams.video[0]
        c.seek(int(target * 1_000_000))  # AV_TIME_BASE units: lands on the segment's key frame
        frame = next(f for p in c.demux(video) for f in p.decode())
    index = decode_index_frame(frame.to_ndarray(format="gray"))
    assert index is not None and abs(float(frame.time) - target) < 2.5, (frame.time, target)
    assert abs(index - lessons["h264"].sent[0] - round(float(frame.time) * FPS)) <= 1


def test_download_is_one_faststart_mp4(server, lessons) -> None:
    rec = lessons["h264"].recording
    status, headers, body = asyncio.run(fetch(f"{server.url}{rec['download']}"))
    assert status == 200 and headers["Content-Type"] == "video/mp4" and headers["Accept-Ranges"] == "bytes"
    assert 0 <= body.find(b"moov") < body.find(b"mdat"), "moov must come before mdat (faststart)"
    with av.open(io.BytesIO(body)) as c:
        assert {s.type for s in c.streams} == {"video", "audio"}
        frames, _, _ = decode_all(c)
    assert [i for _, i in frames] == [i for i in range(frames[0][1], frames[0][1] + len(frames))]


def test_vp8_lesson_recorded_as_webm(server, lessons) -> None:
    lesson = lessons["vp8"]
    rec = lesson.recording
    assert rec["container"] == "webm" and rec["codecs"]["video"] == "vp8"
    base = f"{server.url}/replay/{rec['id']}"
    _, _, playlist = asyncio.run(fetch(base + "/index.m3u8"))
    text = playlist.decode()
    init_uri = re.search(r'#EXT-X-MAP:URI="([^"]+)"', text).group(1)
    segments = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert init_uri.endswith(".webm") and all(s.endswith(".webm") for s in segments)
    parts = []
    for uri in [init_uri] + segments:
        status, headers, body = asyncio.run(fetch(f"{base}/{uri}"))
        assert status == 200 and headers["Content-Type"] == "video/webm"
        parts.append(body)
    with av.open(io.BytesIO(b"".join(parts))) as c:
        assert c.streams.video[0].codec_context.name in ("vp8", "libvpx")
        frames, audio, _ = decode_all(c)
    indices = [i for _, i in frames]
    assert None not in indices and indices == list(range(indices[0], indices[0] + len(indices)))
    assert abs(rec["duration"] - len(lesson.sent) / FPS) < 0.5 and len(audio) > 0
    status, headers, body = asyncio.run(fetch(f"{server.url}{rec['download']}"))
    assert status == 200 and headers["Content-Type"] == "video/webm" and body[:4] == b"\x1aE\xdf\xa3"


async def test_teacher_reconnect_continues_one_recording(server) -> None:
    room = "reconnect-recorded"
    token = server.token("teacher", room, "Mr Okafor")
    runs = []

    async def teach(start: int, seconds: float):
        video = IndexedVideoTrack(fps=FPS, start=start)
        session = await publish(server.url, room, token, [video, BeepAudioTrack(video)])
        await asyncio.wait_for(session.connected.wait(), 15)
        await asyncio.sleep(seconds)
        runs.append(video)
        return session

    first = await teach(0, 3)
    aiortc_glue.vanish(first.pc)  # network gone: same room and Router, replaced by the next session
    second = await teach(1000, 3)
    await second.pc.close()  # connection closed: the room empties and its Router goes away
    await asyncio.sleep(1.0)
    third = await teach(2000, 3)  # a new Room and Router for the same room name
    aiortc_glue.vanish(third.pc)  # and gone for good: no DELETE
    vanished = time.time()
    # closed after the server's peer timeout plus the grace period (the same), with slack for CI
    rec = await wait_state(server, room, ("complete",), 2 * PEER_TIMEOUT + 6)
    assert abs(rec["ended_at"] - vanished) < 1.0, "ended_at is when the media stopped"
    await asyncio.gather(first.pc.close(), third.pc.close())
    assert len(await recordings_of(server, room)) == 1, "a reconnect must not start another recording"

    with av.open(f"{server.url}{rec['playlist']}") as c:
        frames, _, _ = decode_all(c)
    indices = [i for _, i in frames]
    assert None not in indices
    assert indices == sorted(indices), "frames out of order across the reconnects"
    for run in runs:
        got = [i for i in indices if run.sent[0] <= i <= run.sent[-1]]
        assert len(got) >= len(run.sent) - 10, (run.sent[0], len(got), len(run.sent))
        assert got == list(range(got[0], got[0] + len(got))), "a run lost frames in the middle"
    sent_seconds = sum(len(r.sent) for r in runs) / FPS
    assert abs(rec["duration"] - sent_seconds) < 1.5, (rec["duration"], sent_seconds)


async def test_crash_loses_at_most_a_segment_and_is_repaired(tmp_path: Path) -> None:
    data = tmp_path / "crash"
    first = ServerProcess(data)
    room = "grade9-history"
    try:
        video = IndexedVideoTrack(fps=FPS)
        teacher = await publish(first.url, room, first.token("teacher", room, "T"), [video, BeepAudioTrack(video)])
        await asyncio.wait_for(teacher.connected.wait(), 15)
        await asyncio.sleep(7)
        first.proc.kill()  # kill -9 mid-lesson
        first.proc.wait()
        sent = len(video.sent)
        await teacher.pc.close()
    finally:
        first.stop()
    second = ServerProcess(data)
    try:
        (rec,) = await recordings_of(second, room)
        assert rec["state"] == "repaired"
        # at most the segment being built (~2 s) is lost
        assert rec["duration"] >= sent / FPS - 3.0, (rec["duration"], sent / FPS)
        status, headers, playlist = await fetch(f"{second.url}{rec['playlist']}")
        assert status == 200 and "#EXT-X-PLAYLIST-TYPE:VOD" in playlist.decode()
        assert playlist.decode().rstrip().endswith("#EXT-X-ENDLIST")
        assert not list((data / "recordings" / rec["id"]).glob("*.tmp"))
        with av.open(f"{second.url}{rec['playlist']}") as c:
            frames, audio, _ = decode_all(c)
        indices = [i for _, i in frames]
        assert None not in indices and indices == list(range(indices[0], indices[0] + len(indices)))
        assert abs(len(indices) / FPS - rec["duration"]) < 0.5 and len(audio) > 0
    finally:
        second.stop()


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required"]


async def play_and_seek(page, url: str, engine: str) -> None:
    """Open a replay page, play it, check time advances, seek, check it lands and plays on."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(url)
    await page.wait_for_function("window.skyclassReplay && window.skyclassReplay.state().readyState >= 1",
                                 timeout=15000)
    await page.evaluate("(() => { const v = document.getElementById('video'); v.muted = true; v.play(); })()")
    await page.wait_for_function("window.skyclassReplay.state().currentTime > 1.0", timeout=15000)
    state = await page.evaluate("window.skyclassReplay.state()")
    assert state["engine"] == engine and state["error"] is None, state
    target = round(state["duration"] * 0.6, 2)
    await page.evaluate(f"document.getElementById('video').currentTime = {target}")
    await page.wait_for_function(
        f"(() => {{ const s = window.skyclassReplay.state(); return s.currentTime > {target} + 0.5; }})()",
        timeout=15000)
    state = await page.evaluate("window.skyclassReplay.state()")
    assert target + 0.5 < state["currentTime"] < target + 3.0, (target, state)
    assert state["error"] is None and not errors, (state, errors)


async def test_chromium_plays_and_seeks_the_replays(server, lessons) -> None:
    if not Path(CHROMIUM).exists():
        import os
        if os.environ.get("CI"):
            pytest.fail("chromium is required under CI")
        pytest.skip("chromium not installed")
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            page = await browser.new_page()
            await play_and_seek(page, f"{server.url}{lessons['h264'].recording['page']}", "hls.js")
            await play_and_seek(page, f"{server.url}{lessons['vp8'].recording['page']}", "mse-webm")
            # the landing page lists both lessons
            await page.goto(server.url + "/")
            await page.wait_for_selector("#recordings li a", timeout=10000)
            links = await page.eval_on_selector_all("#recordings li a", "els => els.map(e => e.getAttribute('href'))")
            assert {lessons[k].recording["page"] for k in ("h264", "vp8")} <= set(links), links
        finally:
            await browser.close()
