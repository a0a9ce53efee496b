"""Ops endpoints and room state: /healthz, /readyz, /metrics (Prometheus text), /api/rooms, /api/ops."""

from __future__ import annotations

import asyncio

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from skyclass.loadtest.clients import FrameChecker, IndexedVideoTrack, ToneAudioTrack, publish, watch
from skyclass.server.tokens import issue_token

from conftest import SECRET

GAUGES = ("skyclass_rooms", "skyclass_publishers", "skyclass_viewers_total")
COUNTERS = ("skyclass_rtp_packets_in", "skyclass_rtp_bytes_in", "skyclass_rtp_packets_out", "skyclass_rtp_bytes_out",
            "skyclass_keyframe_requests_received", "skyclass_keyframe_requests_sent", "skyclass_nacks_received",
            "skyclass_retransmissions", "skyclass_packets_dropped_slow_viewer")


async def scrape(http: aiohttp.ClientSession, url: str) -> tuple[dict[str, float], dict[str, float], str]:
    """(unlabelled samples by exposed name, per-room viewers, raw text)."""
    async with http.get(url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain"), resp.headers["Content-Type"]
        assert "version=0.0.4" in resp.headers["Content-Type"]
        text = await resp.text()
    samples: dict[str, float] = {}
    viewers: dict[str, float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            if sample.name == "skyclass_viewers":
                viewers[sample.labels["room"]] = sample.value
            elif not sample.labels:
                samples[sample.name] = sample.value
    for name in GAUGES:
        assert types.get(name) == "gauge", (name, types.get(name))
    for name in COUNTERS:
        assert types.get(name) == "counter", (name, types.get(name))
    return samples, viewers, text


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
    async with http.get(url) as resp:
        assert resp.content_type == "application/json", (url, resp.content_type)
        return resp.status, await resp.json()


async def test_health_and_readiness(server) -> None:
    async with aiohttp.ClientSession() as http:
        status, body = await get_json(http, server.url + "/healthz")
        assert status == 200 and body["status"] == "ok"
        assert isinstance(body["uptime"], (int, float)) and body["uptime"] >= 0
        status, body = await get_json(http, server.url + "/readyz")
        assert status == 200 and body.get("ready") is True


async def test_metrics_exposition_names(server) -> None:
    async with aiohttp.ClientSession() as http:
        samples, _, text = await scrape(http, server.url)
    # exposed sample names: gauges as named, counters with prometheus_client's _total suffix
    for name in GAUGES:
        assert name in samples and samples[name] >= 0
        assert f"\n{name} " in text
    for name in COUNTERS:
        assert name + "_total" in samples and samples[name + "_total"] >= 0
        assert f"\n{name}_total " in text
    assert "# TYPE skyclass_rooms gauge" in text
    assert "# HELP skyclass_rtp_packets_in" in text


async def test_unknown_room_is_not_live(server) -> None:
    async with aiohttp.ClientSession() as http:
        status, body = await get_json(http, server.url + "/api/rooms/metrics-api-nobody-here")
        assert status == 200
        assert body["live"] is False and body["viewers"] == 0 and body["publisher"] is None
        assert body["room"] == "metrics-api-nobody-here"
        status, listing = await get_json(http, server.url + "/api/rooms")
        assert status == 200 and isinstance(listing["rooms"], list)
        assert "metrics-api-nobody-here" not in {r["room"] for r in listing["rooms"]}


async def test_metrics_and_rooms_during_a_lesson(fresh_server) -> None:
    """On a server of our own, so every gauge and counter is ours to account for."""
    server = fresh_server
    room = "metrics-api-lesson"
    async with aiohttp.ClientSession() as http:
        idle, idle_viewers, _ = await scrape(http, server.url)
        assert idle["skyclass_rooms"] == 0 and idle["skyclass_publishers"] == 0
        assert idle["skyclass_viewers_total"] == 0 and idle_viewers == {}
        assert all(idle[name + "_total"] == 0 for name in COUNTERS)

        video = IndexedVideoTrack()
        teacher = await publish(server.url, room, server.token("teacher", room, "Ms Metrics"),
                                [video, ToneAudioTrack()])
        checkers: list[FrameChecker] = []

        def on_track(track) -> None:
            if track.kind == "video":
                checkers.append(FrameChecker(track))

        student = await watch(server.url, room, server.token("student", room, "s1"), on_track)
        try:
            await asyncio.wait_for(teacher.connected.wait(), 20)
            await asyncio.wait_for(student.connected.wait(), 20)
            assert await checkers[0].wait_frames(10, 30)

            first, viewers, _ = await scrape(http, server.url)
            assert first["skyclass_rooms"] == 1
            assert first["skyclass_publishers"] == 1
            assert first["skyclass_viewers_total"] == 1 and viewers == {room: 1}
            assert first["skyclass_rtp_packets_in_total"] > 0
            assert first["skyclass_rtp_packets_out_total"] > 0
            assert first["skyclass_rtp_bytes_in_total"] > 12 * first["skyclass_rtp_packets_in_total"]
            assert first["skyclass_rtp_bytes_out_total"] > 12 * first["skyclass_rtp_packets_out_total"]
            # one student: it cannot get more than the teacher sent (retransmissions are counted apart)
            assert first["skyclass_rtp_packets_out_total"] <= first["skyclass_rtp_packets_in_total"]
            # the joining student asked for a keyframe, and the teacher was asked for one
            assert first["skyclass_keyframe_requests_sent_total"] >= 1

            status, state = await get_json(http, f"{server.url}/api/rooms/{room}")
            assert status == 200
            assert state["live"] is True and state["viewers"] == 1 and state["publisher"] == "Ms Metrics"
            assert state["codecs"]["video"].lower() == "video/h264"
            assert state["codecs"]["audio"].lower() == "audio/opus"
            assert isinstance(state["started_at"], (int, float))
            status, listing = await get_json(http, server.url + "/api/rooms")
            assert status == 200
            listed = {r["room"]: r for r in listing["rooms"]}
            assert set(listed) == {room}
            assert listed[room]["live"] is True and listed[room]["viewers"] == 1

            await asyncio.sleep(1.5)
            second, _, _ = await scrape(http, server.url)
            for name in ("skyclass_rtp_packets_in", "skyclass_rtp_packets_out", "skyclass_rtp_bytes_in",
                         "skyclass_rtp_bytes_out"):
                assert second[name + "_total"] > first[name + "_total"], name
            # 1.5 s of 15 fps video plus 50 pps audio: far more than a trickle
            assert second["skyclass_rtp_packets_in_total"] - first["skyclass_rtp_packets_in_total"] >= 60
            assert second["skyclass_rtp_packets_out_total"] - first["skyclass_rtp_packets_out_total"] >= 60
        finally:
            for c in checkers:
                c.stop()
            await student.close()
            await teacher.close()

        # everybody left: the room is gone, the gauges are back to zero, the counters stay
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            after, after_viewers, _ = await scrape(http, server.url)
            if after["skyclass_rooms"] == 0 or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.2)
        assert after["skyclass_rooms"] == 0 and after["skyclass_publishers"] == 0
        assert after["skyclass_viewers_total"] == 0 and after_viewers == {}
        assert after["skyclass_rtp_packets_in_total"] >= second["skyclass_rtp_packets_in_total"]
        assert after["skyclass_rtp_packets_out_total"] >= second["skyclass_rtp_packets_out_total"]
        status, state = await get_json(http, f"{server.url}/api/rooms/{room}")
        assert state["live"] is False and state["viewers"] == 0
        status, listing = await get_json(http, server.url + "/api/rooms")
        assert listing["rooms"] == []


async def test_ops_snapshot_during_a_lesson(server) -> None:
    """GET /api/ops: ops tokens only; the room with its teacher, students spread over the fan-out
    workers and its recording; node counters and CPU that grow while the lesson runs."""
    room = "ops-api-lesson"
    ops = issue_token(SECRET, "ops", "*", "Ops", 600)
    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/api/ops") as resp:
            assert resp.status == 401 and (await resp.json())["error"] == "unauthorized"
        async with http.get(server.url + "/api/ops",
                            headers={"Authorization": f"Bearer {server.token('teacher', room, 'T')}"}) as resp:
            assert resp.status == 403 and "ops" in (await resp.json())["detail"]

        async def snapshot() -> dict:
            async with http.get(server.url + "/api/ops", headers={"Authorization": f"Bearer {ops}"}) as resp:
                assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"
                return await resp.json()

        teacher = await publish(server.url, room, server.token("teacher", room, "Ms Ops"), [IndexedVideoTrack()])
        students = [await watch(server.url, room, server.token("student", room, f"s{i}"), lambda track: None)
                    for i in range(2)]
        try:
            await asyncio.wait_for(teacher.connected.wait(), 20)
            for s in students:
                await asyncio.wait_for(s.connected.wait(), 20)
            await asyncio.sleep(1.0)
            first = await snapshot()
            rooms = {r["room"]: r for r in first["rooms"]}
            ours = rooms[room]
            assert ours["live"] is True and ours["publisher"] == "Ms Ops" and ours["viewers"] == 2, ours
            assert ours["recording"] is not None and ours["recording"]["state"] == "recording", ours
            assert first["ready"] is True and first["store"] == "in-process"
            assert len(first["workers"]) == 2 and all(w["up"] for w in first["workers"]), first["workers"]
            assert sum(w["viewers"] for w in first["workers"]) == first["totals"]["viewers"] >= 2
            assert first["capacity"]["slots"] == 2 * first["capacity"]["per_worker"]
            await asyncio.sleep(1.5)
            second = await snapshot()
            assert second["counters"]["packets_out"] - first["counters"]["packets_out"] >= 10  # 2 students, 15 fps
            assert second["counters"]["packets_in"] > first["counters"]["packets_in"]
            assert second["cpu_seconds"] > first["cpu_seconds"] and second["uptime"] >= first["uptime"]
        finally:
            for s in students:
                await s.close()
            await teacher.close()
