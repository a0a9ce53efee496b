"""WHIP (RFC 9725) publish and WHEP watch: SDP offer in, answer out, media wired to the room's Router."""

from __future__ import annotations

import logging
from typing import Optional

from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc import sdp as aiortc_sdp

from skyclass.media import aiortc_glue
from skyclass.media.router import SPEAKER_PREFIX, TrackStream, slot_for

from .auth import authenticate, require_grant
from .errors import HttpError
from .rooms import RoomRegistry, Session

logger = logging.getLogger(__name__)

SDP_TYPE = "application/sdp"

# Video codecs in order of preference: H.264 first so recording and HLS need no
# transcoding; VP8 accepted. Constrained baseline (42e01f) before baseline (42001f).
VIDEO_PREFERENCE = ("video/h264", "video/vp8")
AUDIO_PREFERENCE = ("audio/opus",)


def SignallingError(status: int, reason: str, headers: Optional[dict] = None) -> HttpError:
    """A WHIP/WHEP failure; the error middleware answers it as ``text/plain``."""
    error = {400: "bad request", 403: "forbidden", 404: "not found", 405: "method not allowed",
             409: "conflict", 415: "unsupported media type", 503: "over capacity"}.get(status, "error")
    return HttpError(status, error, reason, headers)


def _codec_preferences(kind: str, fixed_mime: Optional[str]) -> list:
    """Capabilities to offer for ``kind``: the room's codec if it has one, else all we accept."""
    order = [fixed_mime.lower()] if fixed_mime else list(VIDEO_PREFERENCE if kind == "video" else AUDIO_PREFERENCE)
    caps = RTCRtpSender.getCapabilities(kind).codecs
    chosen = []
    for mime in order:
        matching = [c for c in caps if c.mimeType.lower() == mime]
        if mime == "video/h264":
            # constrained baseline first; packetization-mode=1 only (aiortc only offers 1)
            matching.sort(key=lambda c: c.parameters.get("profile-level-id") != "42e01f")
        chosen.extend(matching)
    chosen.extend(c for c in caps if c.mimeType.lower() == f"{kind}/rtx")
    return chosen


def parse_offer(text: str) -> aiortc_sdp.SessionDescription:
    """Validate an SDP offer enough to give a client a useful 400 instead of a stack trace."""
    if not text.strip():
        raise SignallingError(400, "empty body: expected an SDP offer")
    if not text.lstrip().startswith("v=0"):
        raise SignallingError(400, "malformed SDP: must start with 'v=0'")
    try:
        description = aiortc_sdp.SessionDescription.parse(text)
    except Exception as exc:  # aiortc's parser raises whatever the bad line triggers
        raise SignallingError(400, f"malformed SDP: {exc.__class__.__name__}: {exc}") from exc
    media = [m for m in description.media if m.kind in ("audio", "video")]
    if not media:
        raise SignallingError(400, "SDP offer has no audio or video m-line")
    for m in media:
        if not m.ice.usernameFragment or not m.ice.password:
            raise SignallingError(400, f"SDP {m.kind} m-line lacks a=ice-ufrag/a=ice-pwd")
        if not m.dtls or not m.dtls.fingerprints:
            raise SignallingError(400, f"SDP {m.kind} m-line lacks a DTLS fingerprint")
    return description


def _raw_setup(text: str) -> Optional[str]:
    for line in text.splitlines():
        if line.startswith("a=setup:"):
            return line.split(":", 1)[1].strip()
    return None


async def _read_offer(request: web.Request) -> tuple[str, aiortc_sdp.SessionDescription]:
    content_type = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if content_type != SDP_TYPE:
        raise SignallingError(415, f"Content-Type must be {SDP_TYPE}, got {content_type or 'nothing'}")
    text = await request.text()
    return text, parse_offer(text)


def _new_peer_connection() -> RTCPeerConnection:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    aiortc_glue.use_shared_certificate(pc)
    return pc


async def _negotiate(pc: RTCPeerConnection, offer_text: str) -> str:
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_text, type="offer"))
    except Exception as exc:
        raise SignallingError(400, f"cannot use offer: {exc or exc.__class__.__name__}") from exc
    aiortc_glue.answer_dtls_as_server(pc, _raw_setup(offer_text))
    answer = await pc.createAnswer()
    await pc.setLocalDescription(answer)
    return pc.localDescription.sdp


def _watch_connection(registry: RoomRegistry, session: Session) -> None:
    pc = session.pc

    @pc.on("connectionstatechange")
    async def on_state() -> None:
        state = pc.connectionState
        logger.info("room=%s peer=%s %s connection %s", session.room, session.id, session.kind, state)
        if state == "connected":
            if session.kind == "whip":
                aiortc_glue.stop_consent_checks(pc)
            for consumer in session.consumers:
                dtls = consumer._sender.transport
                if aiortc_glue.dtls_connected(dtls):
                    consumer.bind(aiortc_glue.SenderBinding(dtls))
        elif state in ("failed", "closed"):
            await registry.close_session(session, reason=f"connection {state}")


def _created(session: Session, answer: str) -> web.Response:
    return web.Response(
        status=201,
        text=answer,
        content_type=SDP_TYPE,
        headers={"Location": session.location, "Access-Control-Expose-Headers": "Location"},
    )


def _publish_slot_prefix(request: web.Request, room_name: str):
    """Who publishes into which slots: a teacher into the main ones; a student only while
    the classroom gives them the floor, into the speaker slots. Raises 401/403 otherwise."""
    claims = authenticate(request)
    if claims.may("publish", room_name):
        return claims, ""
    classroom = request.app.get("classroom")
    if classroom is not None and claims.room in (room_name, "*") and classroom.may_publish(room_name, claims):
        return claims, SPEAKER_PREFIX
    require_grant(request, "publish", room_name)  # raises the precise 403
    raise SignallingError(403, "not allowed to publish here")


async def whip_post(request: web.Request) -> web.Response:
    """Teacher (or a student given the floor) publishes: decrypt once, feed the room's Router."""
    room_name = request.match_info["room"]
    claims, prefix = _publish_slot_prefix(request, room_name)
    cluster = request.app.get("cluster")
    if cluster is not None:
        home = await cluster.home_elsewhere(room_name)
        if home is not None:  # one ingress per room: publish where it lives
            return await cluster.forward_publish(request, home)
    text, description = await _read_offer(request)
    registry: RoomRegistry = request.app["rooms"]
    room = registry.get_or_create(room_name)
    directions = {m.direction for m in description.media if m.kind in ("audio", "video")}
    if directions <= {"recvonly", "inactive"}:
        raise SignallingError(400, "WHIP offer must send media (sendonly or sendrecv m-lines)")

    pc = _new_peer_connection()
    session = Session(kind="whip", room=room_name, name=claims.name, pc=pc, speaker=bool(prefix))
    try:
        for kind in ("audio", "video"):
            if not any(m.kind == kind for m in description.media):
                continue
            # Prefer what the room already uses so a reconnecting teacher keeps the codec.
            transceiver = pc.addTransceiver(kind, direction="recvonly")
            prefs = _codec_preferences(kind, room.router.streams[prefix + kind].mime_type)
            transceiver.setCodecPreferences(prefs + [c for c in _codec_preferences(kind, None) if c not in prefs])
        answer = await _negotiate(pc, text)
        for transceiver in pc.getTransceivers():
            if transceiver.kind not in ("audio", "video") or transceiver.mid is None:
                continue
            codecs = aiortc_glue.negotiated_codecs(transceiver)
            if not codecs:
                continue
            chosen = codecs[0]
            stream: TrackStream = room.router.streams[prefix + transceiver.kind]
            pts = frozenset(c.payloadType for c in codecs if c.mimeType.lower() == chosen.mimeType.lower())
            producer = stream.attach_producer(transceiver.receiver, session.id, chosen.mimeType, chosen.clockRate, pts)
            session.producers.append(producer)
        if not session.producers:
            raise SignallingError(400, "no usable audio or video codec in the offer (need H264/VP8 or Opus)")
    except Exception:
        if room.idle:
            registry.drop_room(room)
        await pc.close()
        raise
    registry.add_session(session)
    _watch_connection(registry, session)
    logger.info("room=%s peer=%s %s %s publishing %s", room_name, session.id, "speaker" if prefix else "teacher",
                claims.name, room.router.codecs())
    return _created(session, answer)


def offered_media(description: aiortc_sdp.SessionDescription) -> list[tuple[str, bool]]:
    """(kind, wants to receive) for each audio/video m-line of a WHEP offer, in order."""
    return [(m.kind, m.direction in ("recvonly", "sendrecv"))
            for m in description.media if m.kind in ("audio", "video")]


async def open_viewer(registry: RoomRegistry, room_name: str, name: str, offer_text: str,
                      kinds: list[tuple[str, bool]], session_id: Optional[str] = None) -> tuple[Session, str]:
    """Negotiate a student's session against this process's Router for ``room_name``.

    Used by the front in single-process mode and by each fan-out worker. Returns the
    registered session and the answer SDP, or raises an HTTP error with a reason.
    """
    room = registry.get_or_create(room_name)
    pc = _new_peer_connection()
    session = Session(kind="whep", room=room_name, name=name, pc=pc)
    if session_id:
        session.id = session_id
    try:
        transceivers = {}
        ordinals: dict[str, int] = {}
        for kind, wanted in kinds:
            # The offer's first audio/video m-lines get the teacher, the second ones the
            # speaker slot (a student given the floor); m-lines the student does not
            # receive on, or beyond those, get no consumer.
            slot = slot_for(kind, ordinals.get(kind, 0))
            ordinals[kind] = ordinals.get(kind, 0) + 1
            if slot is None:
                break
            stream = room.router.streams[slot]
            # Before the teacher arrives a student accepts every codec we forward, so the
            # teacher may pick; once the room has a codec, students must take that one.
            transceiver = pc.addTransceiver(aiortc_glue.ParkedTrack(kind), direction="sendonly")
            transceiver.setCodecPreferences(_codec_preferences(kind, stream.mime_type))
            if wanted:
                transceivers[slot] = transceiver
        answer = await _negotiate(pc, offer_text)
        for slot, transceiver in transceivers.items():
            if transceiver.mid is None or not aiortc_glue.negotiated_codecs(transceiver):
                continue
            consumer = room.router.streams[slot].add_consumer(transceiver, session.id)
            session.consumers.append(consumer)
        if not session.consumers:
            raise SignallingError(400, "no usable codec in the offer")
        if any(not c.playable for c in session.consumers):
            missing = [c.stream.mime_type for c in session.consumers if not c.playable]
            raise SignallingError(409, f"the room's codec is {', '.join(map(str, missing))}; the offer does not accept it")
    except Exception:
        for consumer in session.consumers:
            consumer.close()
        if room.idle:
            registry.drop_room(room)
        await pc.close()
        raise
    registry.add_session(session)
    _watch_connection(registry, session)
    return session, answer


async def whep_post(request: web.Request) -> web.Response:
    """Student watches: routed to a fan-out worker, or served here in single-process mode."""
    room_name = request.match_info["room"]
    claims = require_grant(request, "subscribe", room_name)
    text, description = await _read_offer(request)
    kinds = offered_media(description)
    registry: RoomRegistry = request.app["rooms"]
    cluster = request.app.get("cluster")
    if cluster is not None:
        await cluster.prepare_viewer(room_name)  # taught on another node: relay it here
    pool = request.app.get("workers")
    if pool is not None:
        session, answer = await pool.open_viewer(registry, room_name, claims.name, text, kinds)
    else:
        admit_local_viewer(request.app)
        session, answer = await open_viewer(registry, room_name, claims.name, text, kinds)
    logger.info("room=%s peer=%s student %s watching (worker %s)", room_name, session.id, claims.name,
                session.worker if session.worker is not None else "-")
    return _created(session, answer)


def admit_local_viewer(app: web.Application) -> None:
    """Single-process admission: refuse past the capacity rather than degrade everyone."""
    registry: RoomRegistry = app["rooms"]
    cap = app["config"].max_viewers_per_worker
    if sum(len(r.viewers) for r in registry.rooms.values()) >= cap:
        raise SignallingError(503, f"this server is full ({cap} viewers); retry shortly",
                              headers={"Retry-After": "5"})


async def session_delete(request: web.Request) -> web.Response:
    """DELETE on a WHIP/WHEP resource ends that session (RFC 9725 section 4.2)."""
    kind = request.match_info["kind"]
    room_name = request.match_info["room"]
    registry: RoomRegistry = request.app["rooms"]
    session = registry.sessions.get(request.match_info["session"])
    if session is None and kind == "whip" and request.app.get("cluster") is not None:
        forwarded = await request.app["cluster"].forward_delete(request, request.match_info["session"])
        if forwarded is not None:
            return forwarded
    if session is None or session.kind != kind or session.room != room_name:
        raise SignallingError(404, "no such session")
    claims = authenticate(request)
    if claims.room not in (room_name, "*"):
        raise SignallingError(403, f"token is for room {claims.room!r}, not {room_name!r}")
    if claims.name != session.name and "moderate" not in claims.grants:
        raise SignallingError(403, "this session belongs to someone else")
    # A teacher's DELETE ends the lesson; a speaker's only ends their turn.
    await registry.close_session(session, reason="DELETE", ended=session.kind == "whip" and not session.speaker)
    return web.Response(status=200, text="session ended\n", content_type="text/plain")


async def session_patch(request: web.Request) -> web.Response:
    """Trickle ICE / ICE restart are not supported: the answer carries every candidate."""
    registry: RoomRegistry = request.app["rooms"]
    if request.match_info["session"] not in registry.sessions:
        raise SignallingError(404, "no such session")
    raise SignallingError(405, "trickle ICE is not supported; the answer carries all candidates",
                          headers={"Allow": "DELETE"})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/whip/{room}", whip_post)
    app.router.add_post("/whep/{room}", whep_post)
    app.router.add_delete("/{kind:whip|whep}/{room}/{session}", session_delete)
    app.router.add_patch("/{kind:whip|whep}/{room}/{session}", session_patch)
