"""Bad requests against a running lesson: each gets the right status and a readable reason,
and the teacher and the student already in the room do not notice."""

from __future__ import annotations

import asyncio
from typing import Optional

import aiohttp

from skyclass.loadtest.clients import FrameChecker, IndexedVideoTrack, ToneAudioTrack, publish, watch
from skyclass.server.tokens import issue_token

from conftest import SECRET  # the secret the test server signs with

FINGERPRINT = ":".join(["AB"] * 32)


def offer_sdp(direction: str = "recvonly", ice: bool = True, fingerprint: bool = True,
              rtpmap: str = "a=rtpmap:96 H264/90000\r\na=fmtp:96 packetization-mode=1;profile-level-id=42e01f\r\n",
              payload_types: str = "96") -> str:
    """A syntactically valid one-video-m-line offer, with the parts a test wants removed."""
    lines = (
        "v=0\r\n"
        "o=- 1 1 IN IP4 0.0.0.0\r\n"
        "s=-\r\n"
        "t=0 0\r\n"
        "a=group:BUNDLE 0\r\n"
        f"m=video 9 UDP/TLS/RTP/SAVPF {payload_types}\r\n"
        "c=IN IP4 0.0.0.0\r\n"
        f"a={direction}\r\n"
        "a=mid:0\r\n"
        "a=rtcp-mux\r\n"
        + rtpmap
        + "a=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host\r\n"
        + ("a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuv\r\n" if ice else "")
        + (f"a=fingerprint:sha-256 {FINGERPRINT}\r\n" if fingerprint else "")
        + "a=setup:actpass\r\n"
    )
    return lines


async def request(http: aiohttp.ClientSession, method: str, url: str, *, body: Optional[str] = None,
                  content_type: Optional[str] = "application/sdp", token: Optional[str] = None,
                  authorization: Optional[str] = None) -> tuple[int, str, str, dict]:
    headers = {}
    if content_type is not None:
        headers["Content-Type"] = content_type
    if authorization is not None:
        headers["Authorization"] = authorization
    elif token is not None:
        headers["Authorization"] = f"Bearer {token}"
    skip = [] if content_type is not None else ["Content-Type"]
    async with http.request(method, url, data=body.encode() if body is not None else None, headers=headers,
                            skip_auto_headers=skip) as resp:
        text = await resp.text()
        return resp.status, resp.headers.get("Content-Type", ""), text, dict(resp.headers)


def assert_plain_reason(result: tuple[int, str, str, dict], status: int, *words: str) -> None:
    code, content_type, text, _ = result
    assert code == status, f"expected {status}, got {code}: {text!r}"
    assert content_type.split(";")[0].strip() == "text/plain", f"{status}: content type {content_type!r}"
    reason = text.strip()
    assert reason, f"{status} without a reason"
    assert len(reason) < 500 and "Traceback" not in reason, reason
    for word in words:
        assert word.lower() in reason.lower(), f"{status} reason {reason!r} does not mention {word!r}"


async def room_state(http: aiohttp.ClientSession, url: str, room: str) -> dict:
    async with http.get(f"{url}/api/rooms/{room}") as resp:
        assert resp.status == 200
        return await resp.json()


async def room_names(http: aiohttp.ClientSession, url: str) -> set[str]:
    async with http.get(f"{url}/api/rooms") as resp:
        return {r["room"] for r in (await resp.json())["rooms"]}


async def test_bad_requests_do_not_disturb_a_lesson(server) -> None:
    room = "bad-input-lesson"
    other_room = "bad-input-other"
    ghost = "bad-input-ghost"
    url = server.url
    teacher_token = server.token("teacher", room, "Ms T")
    student_token = server.token("student", room, "alice")
    video = IndexedVideoTrack()
    teacher = await publish(url, room, teacher_token, [video, ToneAudioTrack()])
    checkers: list[FrameChecker] = []

    def on_track(track) -> None:
        if track.kind == "video":
            checkers.append(FrameChecker(track))

    student = await watch(url, room, student_token, on_track)
    try:
        await asyncio.wait_for(teacher.connected.wait(), 20)
        await asyncio.wait_for(student.connected.wait(), 20)
        assert len(checkers) == 1
        checker = checkers[0]
        assert await checker.wait_frames(10, 30), f"lesson never started: {len(checker.indices)} frames"

        whip, whep = f"{url}/whip/{room}", f"{url}/whep/{room}"
        async with aiohttp.ClientSession() as http:
            before = len(checker.indices)

            # -- malformed SDP: 400 -----------------------------------------------------------
            for endpoint, token in ((whep, student_token), (whip, teacher_token)):
                assert_plain_reason(await request(http, "POST", endpoint, body="hello, this is not SDP",
                                                  token=token), 400, "SDP")
                assert_plain_reason(await request(http, "POST", endpoint, body="", token=token), 400)
                assert_plain_reason(await request(http, "POST", endpoint, body="v=0\r\n", token=token), 400)
                assert_plain_reason(await request(
                    http, "POST", endpoint, body="v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n", token=token),
                    400, "m-line")
                direction = "recvonly" if endpoint == whep else "sendonly"
                assert_plain_reason(await request(http, "POST", endpoint, token=token,
                                                  body=offer_sdp(direction, ice=False, fingerprint=False)),
                                    400, "ice-ufrag")
                assert_plain_reason(await request(http, "POST", endpoint, token=token,
                                                  body=offer_sdp(direction, ice=True, fingerprint=False)),
                                    400, "fingerprint")
            # a WHIP offer that only wants to receive
            assert_plain_reason(await request(http, "POST", whip, token=teacher_token,
                                              body=offer_sdp("recvonly")), 400, "send")

            # -- wrong media type: 415 -----------------------------------------------------------
            assert_plain_reason(await request(http, "POST", whep, body='{"sdp": "v=0"}',
                                              content_type="application/json", token=student_token),
                                415, "application/sdp")
            assert_plain_reason(await request(http, "POST", whip, body=offer_sdp("sendonly"),
                                              content_type="text/plain", token=teacher_token),
                                415, "application/sdp")
            assert_plain_reason(await request(http, "POST", whep, body=offer_sdp(), content_type=None,
                                              token=student_token), 415)

            # -- authentication: 401 ---------------------------------------------------------------
            no_auth = await request(http, "POST", whep, body=offer_sdp())
            assert_plain_reason(no_auth, 401, "token")
            assert "bearer" in no_auth[3].get("WWW-Authenticate", "").lower()
            for header in ("Basic YWxpY2U6c2VjcmV0", "Bearer", "Bearer    ", student_token, "Token " + student_token):
                result = await request(http, "POST", whep, body=offer_sdp(), authorization=header)
                assert_plain_reason(result, 401, "bearer")
                assert "WWW-Authenticate" in result[3]
            forged = issue_token("some-other-secret-0123456789abcdef", "teacher", room, "Mallory")
            assert_plain_reason(await request(http, "POST", whip, body=offer_sdp("sendonly"), token=forged),
                                401, "invalid")
            assert_plain_reason(await request(http, "POST", whep, body=offer_sdp(), token="garbage.not.jwt"),
                                401, "invalid")
            expired = issue_token(SECRET, "student", room, "late", ttl_seconds=-60)
            assert_plain_reason(await request(http, "POST", whep, body=offer_sdp(), token=expired), 401, "expired")

            # -- authorization: 403 --------------------------------------------------------------------
            assert_plain_reason(await request(http, "POST", whip, body=offer_sdp("sendonly"),
                                              token=student_token), 403, "publish")
            assert_plain_reason(await request(http, "POST", whep, body=offer_sdp(),
                                              token=server.token("student", other_room, "bob")),
                                403, other_room)
            assert_plain_reason(await request(http, "POST", whip, body=offer_sdp("sendonly"),
                                              token=server.token("teacher", other_room, "Mr X")),
                                403, other_room)

            # -- unusable but well-formed offers: 400, and no room is left behind -----------------------
            av1_only = offer_sdp(rtpmap="a=rtpmap:45 AV1/90000\r\n", payload_types="45")
            assert_plain_reason(await request(http, "POST", f"{url}/whep/{ghost}", body=av1_only,
                                              token=server.token("student", ghost, "carol")), 400)
            assert_plain_reason(await request(http, "POST", f"{url}/whip/{ghost}",
                                              body=offer_sdp("sendonly", rtpmap="a=rtpmap:45 AV1/90000\r\n",
                                                             payload_types="45"),
                                              token=server.token("teacher", ghost, "Mr G")), 400)
            assert ghost not in await room_names(http, url)
            # ... nor is the running teacher replaced by a second teacher's unusable offer
            assert_plain_reason(await request(http, "POST", whip,
                                              body=offer_sdp("sendonly", rtpmap="a=rtpmap:45 AV1/90000\r\n",
                                                             payload_types="45"),
                                              token=server.token("teacher", room, "Mr Second")), 400)

            # -- sessions: DELETE / PATCH ----------------------------------------------------------------
            assert_plain_reason(await request(http, "DELETE", f"{whep}/no-such-session", content_type=None,
                                              token=student_token), 404, "session")
            assert_plain_reason(await request(http, "DELETE", f"{whip}/no-such-session", content_type=None,
                                              token=teacher_token), 404, "session")
            # the student's real session, addressed under another room or kind, is unknown there too
            student_id = student.resource.rsplit("/", 1)[1]
            teacher_id = teacher.resource.rsplit("/", 1)[1]
            assert_plain_reason(await request(http, "DELETE", f"{url}/whep/{other_room}/{student_id}",
                                              content_type=None, token=server.token("student", other_room, "alice")),
                                404)
            assert_plain_reason(await request(http, "DELETE", f"{url}/whip/{room}/{student_id}",
                                              content_type=None, token=teacher_token), 404)
            # someone else's session
            assert_plain_reason(await request(http, "DELETE", student.resource, content_type=None,
                                              token=server.token("student", room, "bob")), 403, "someone else")
            assert_plain_reason(await request(http, "DELETE", teacher.resource, content_type=None,
                                              token=student_token), 403)
            assert_plain_reason(await request(http, "DELETE", student.resource, content_type=None), 401)
            patched = await request(http, "PATCH", student.resource, body="a=end-of-candidates\r\n",
                                    content_type="application/trickle-ice-sdpfrag", token=student_token)
            assert_plain_reason(patched, 405, "trickle")
            assert "DELETE" in patched[3].get("Allow", "")
            assert teacher_id in teacher.resource

            # -- the lesson carried on ---------------------------------------------------------------------
            assert await checker.wait_frames(before + 15, 30), (
                f"student stalled: {len(checker.indices) - before} new frames after the bad requests")
            assert checker.indices == sorted(checker.indices)
            sent = set(video.sent)
            assert all(i in sent for i in checker.indices)
            state = await room_state(http, url, room)
            assert state["live"] is True and state["viewers"] == 1 and state["publisher"] == "Ms T", state
            assert state["codecs"]["video"].lower() == "video/h264"
            assert other_room not in await room_names(http, url)
    finally:
        for c in checkers:
            c.stop()
        await student.close()
        await teacher.close()


async def test_api_errors_are_json(server) -> None:
    async with aiohttp.ClientSession() as http:
        for path in ("/api/no-such-thing", "/api/rooms/a/b/c", "/api"):
            async with http.get(server.url + path) as resp:
                assert resp.status == 404, path
                assert resp.content_type == "application/json", (path, resp.content_type)
                body = await resp.json()
                assert set(body) == {"error", "detail"} and body["error"], (path, body)
        async with http.post(server.url + "/api/rooms", data=b"{}") as resp:
            assert resp.status == 405
            assert resp.content_type == "application/json"
            body = await resp.json()
            assert set(body) == {"error", "detail"}
            assert "GET" in resp.headers.get("Allow", ""), "a 405 must say what is allowed (RFC 9110 15.5.6)"
        # outside /api, unknown pages stay plain 404s
        async with http.get(server.url + "/no-such-page") as resp:
            assert resp.status == 404 and resp.content_type != "application/json"


async def test_whip_whep_wrong_method(server) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/whep/bad-input-method") as resp:
            assert resp.status == 405
            assert "POST" in resp.headers.get("Allow", "")
            assert resp.content_type == "text/plain"
