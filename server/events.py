"""The websocket ``/ws/{room}?token=``: JSON messages with a ``type``, in and out.

Client → server (``ref`` is echoed in replies and errors, so a page can match them):

| type | who | fields |
| --- | --- | --- |
| ``chat`` | anyone with the chat grant | ``text`` |
| ``question`` (alias ``ask``) | anyone with the chat grant | ``text`` |
| ``questions`` | anyone | – (reply: the queue for staff, answered + own for students) |
| ``answered`` | staff | ``id``, optional ``answer`` |
| ``hand`` | student: own; staff: ``name`` | ``raised`` (bool) — or ``raise`` / ``lower`` types |
| ``floor`` | staff: ``action`` give (``name``) / take; the holder: ``release`` | |
| ``mute`` | staff | ``name``, ``muted`` |
| ``kick`` | staff | ``name`` |
| ``presence`` | anyone | – (reply: the current counts) |
| ``ping`` | anyone | – (reply: ``pong``) |

Server → client: ``welcome`` (lesson, live state, floor, presence, recent history,
questions, hands), ``chat``, ``question``, ``answered``, ``hand``, ``floor``, ``mute``,
``speaking``, ``kicked``, ``presence``, ``lesson`` (live / interrupted / ended / closed),
``error`` ``{error, detail, ref, retry_after?}``.

Students are rate limited (token buckets per kind of message) and size limited; staff are
only size limited. Limits answer with an ``error`` message saying what and when to retry;
a client that keeps breaking them is disconnected.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, Optional

from aiohttp import WSMsgType, web

from .auth import authenticate
from .classroom import Classroom, ClassroomError, Client
from .errors import HttpError

logger = logging.getLogger(__name__)

MAX_FRAME_STUDENT = 2048
MAX_FRAME_STAFF = 16384
MAX_TEXT = 500
MAX_ANSWER = 2000
MAX_NAME = 120
MAX_ERRORS = 60  # refused messages before a client is disconnected
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 60, 15, 4

# kind -> (burst, refill per second) for students
STUDENT_LIMITS: dict[str, tuple[float, float]] = {
    "any": (20, 2.0),
    "chat": (5, 0.5),
    "question": (3, 0.1),
    "hand": (5, 0.2),
}


@dataclass
class Bucket:
    capacity: float
    rate: float
    tokens: float = -1.0
    stamp: float = 0.0

    def take(self, now: float) -> float:
        """0 if allowed (and spent), else seconds until it would be."""
        if self.tokens < 0:
            self.tokens, self.stamp = self.capacity, now
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class Refused(Exception):
    def __init__(self, code: str, detail: str, retry_after: Optional[float] = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.retry_after = retry_after


def _text(msg: dict, key: str, limit: int, required: bool = True) -> Optional[str]:
    value = msg.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise Refused("bad_request", f"'{key}' is required")
        return None
    if not isinstance(value, str):
        raise Refused("bad_request", f"'{key}' must be a string")
    value = value.strip()
    if len(value) > limit:
        raise Refused("too_large", f"'{key}' is {len(value)} characters; at most {limit} are allowed")
    return value


class Connection:
    """One client's websocket session: parses, limits and dispatches its messages."""

    def __init__(self, classroom: Classroom, client: Client, kind: str) -> None:
        self.classroom = classroom
        self.client = client
        self.kind = kind
        self.errors = 0
        self.buckets = {k: Bucket(*v) for k, v in STUDENT_LIMITS.items()}

    def _limit(self, kind: str) -> None:
        if self.client.staff:
            return
        now = time.monotonic()
        for name in ("any", kind):
            bucket = self.buckets.get(name)
            if bucket is None:
                continue
            wait = bucket.take(now)
            if wait:
                burst, rate = STUDENT_LIMITS[name]
                what = "messages" if name == "any" else f"{name} messages"
                raise Refused("rate_limited", f"slow down: at most {int(burst)} {what} at once and "
                              f"{rate * 60:g} per minute; retry in {wait:.1f} s", retry_after=round(wait, 1))

    def _staff_only(self, what: str) -> None:
        if not self.client.staff:
            raise Refused("forbidden", f"only the teacher may {what}")

    async def handle_text(self, data: str) -> None:
        ref: Any = None
        try:
            limit = MAX_FRAME_STAFF if self.client.staff else MAX_FRAME_STUDENT
            if len(data) > limit:
                raise Refused("too_large", f"message is {len(data)} bytes; at most {limit} are allowed")
            try:
                msg = json.loads(data)
            except ValueError:
                raise Refused("bad_request", "messages must be JSON objects with a 'type'") from None
            if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
                raise Refused("bad_request", "messages must be JSON objects with a 'type'")
            ref = msg.get("ref")
            await self.dispatch(msg, ref)
        except Refused as exc:
            self.errors += 1
            error: dict[str, Any] = {"type": "error", "error": exc.code, "detail": exc.detail}
            if ref is not None:
                error["ref"] = ref
            if exc.retry_after is not None:
                error["retry_after"] = exc.retry_after
            await self.classroom.send(self.client, error)
            if self.errors >= MAX_ERRORS:
                logger.warning("room=%s peer=%s %s disconnected after %d refused messages", self.client.room,
                               self.client.id, self.client.name, self.errors)
                await self.client.ws.close(code=1008, message=b"too many refused messages")
        except ClassroomError as exc:
            error = {"type": "error", "error": exc.code, "detail": exc.detail}
            if ref is not None:
                error["ref"] = ref
            await self.classroom.send(self.client, error)

    async def dispatch(self, msg: dict, ref: Any) -> None:
        c, classroom, kind = self.client, self.classroom, msg["type"]
        if kind == "ping":
            await classroom.send(c, {"type": "pong", "ref": ref, "ts": time.time()})
        elif kind == "chat":
            if "chat" not in c.claims.grants and not c.staff:
                raise Refused("forbidden", "your token may not chat")
            text = _text(msg, "text", MAX_TEXT) or ""
            self._limit("chat")
            await classroom.chat(c, text, self.kind)
        elif kind in ("question", "ask"):
            if "chat" not in c.claims.grants and not c.staff:
                raise Refused("forbidden", "your token may not ask questions")
            text = _text(msg, "text", MAX_TEXT) or ""
            self._limit("question")
            await classroom.ask(c, text)
        elif kind == "questions":
            self._limit("any_read")
            questions = await classroom.state.questions(c.scope)
            if not c.staff:
                questions = [q for q in questions if q.get("answered") or q.get("name") == c.name]
            await classroom.send(c, {"type": "questions", "questions": questions, "ref": ref})
        elif kind == "answered":
            self._staff_only("mark questions answered")
            qid = _text(msg, "id", 64) or ""
            await classroom.answered(c, qid, _text(msg, "answer", MAX_ANSWER, required=False))
        elif kind in ("hand", "raise", "lower"):
            raised = kind == "raise" or (kind == "hand" and bool(msg.get("raised", True)))
            name = _text(msg, "name", MAX_NAME, required=False) or c.name
            if name != c.name:
                self._staff_only("raise or lower someone else's hand")
            self._limit("hand")
            await classroom.hand(c.room, name, raised, by=c.name)
        elif kind == "floor":
            action = msg.get("action")
            if action == "give":
                self._staff_only("give the floor")
                await classroom.give_floor(c.room, _text(msg, "name", MAX_NAME) or "", c.name, self.kind)
            elif action == "take":
                self._staff_only("take the floor")
                await classroom.take_floor(c.room, c.name)
            elif action == "release":
                floor = await classroom.state.floor(c.room)
                if floor is None or floor.get("holder") != c.name:
                    raise Refused("bad_request", "you do not have the floor")
                await classroom.take_floor(c.room, c.name, reason="released")
            else:
                raise Refused("bad_request", "floor 'action' must be give, take or release")
        elif kind == "mute":
            self._staff_only("mute a speaker")
            await classroom.mute(c.room, _text(msg, "name", MAX_NAME) or "", bool(msg.get("muted", True)), c.name)
        elif kind == "kick":
            self._staff_only("remove a student")
            name = _text(msg, "name", MAX_NAME) or ""
            if name == c.name:
                raise Refused("bad_request", "you cannot remove yourself")
            await classroom.kick(c.room, name, c.name)
        elif kind == "presence":
            self._limit("any_read")
            presence = await classroom.aggregate_presence(c.room)
            await classroom.send(c, {**presence, "ref": ref})
        else:
            raise Refused("bad_request", f"unknown message type {kind!r}")


def keepalive(transport: Any) -> None:
    """TCP keepalive on a client's socket: probes after KEEPALIVE_IDLE s of silence, every
    KEEPALIVE_INTERVAL s, dropped after KEEPALIVE_COUNT unanswered ones (~2 minutes)."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    except OSError as exc:
        logger.debug("cannot set TCP keepalive: %s", exc)


async def ws_handler(request: web.Request) -> web.WebSocketResponse:
    """``GET /ws/{room}?token=``: the room's events for one person."""
    room = request.match_info["room"]
    classroom: Classroom = request.app["classroom"]
    claims = authenticate(request)
    if claims.room not in (room, "*"):
        raise HttpError(403, "forbidden", f"token is for room {claims.room!r}, not {room!r}")
    if not ({"subscribe", "moderate"} & set(claims.grants)):
        raise HttpError(403, "forbidden", f"role {claims.role!r} may not join room events")
    lesson, scope, kind = await classroom.context(room)
    # No aiohttp heartbeat: a ping task per client every few seconds is the largest cost of
    # an idle 5,000-student lesson. The kernel's TCP keepalive finds vanished peers instead,
    # for free; pages may also send {"type": "ping"} (e.g. to keep an L7 proxy's idle timer).
    ws = web.WebSocketResponse(heartbeat=None, max_msg_size=64 * 1024, compress=False)
    await ws.prepare(request)
    keepalive(request.transport)
    client = Client(ws=ws, transport=request.transport, room=room, scope=scope, claims=claims, pending=[])
    connection = Connection(classroom, client, kind)
    classroom.add_client(client)
    try:
        welcome = await classroom.welcome(client, lesson, kind)
        pending, client.pending = client.pending, None
        await classroom.send(client, welcome)
        for data in pending:  # events that arrived while the welcome was being assembled
            await classroom.send_many([client], data)
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await connection.handle_text(message.data)
            elif message.type == WSMsgType.BINARY:
                await classroom.send(client, {"type": "error", "error": "bad_request",
                                              "detail": "send JSON text frames, not binary"})
            elif message.type == WSMsgType.ERROR:
                logger.info("room=%s peer=%s websocket error: %s", room, client.id, ws.exception())
    finally:
        classroom.remove_client(client)
    return ws
