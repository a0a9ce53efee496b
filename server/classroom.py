"""The classroom of each room: chat, questions, hands, the floor, presence, lesson start/end.

Every change goes to the shared store and is announced as an event through the store's
pub/sub; every node (this one included) receives each event once and delivers it to its
own websocket clients in that room. So per event a node does O(1) store work and one
send per local recipient, encoded once — never per-student store work.

Presence is aggregate: each node counts its own clients per role and, at most every
``PRESENCE_INTERVAL`` when something changed, writes one entry per room and announces
it; nodes sum the entries and tell staff at most as often, students at most every
``STUDENT_PRESENCE_INTERVAL`` in a big room. Names are only shared in small rooms.

Floor control (a student who speaks): :meth:`Classroom.may_publish` tells WHIP whether
a token may publish, and callbacks registered with :meth:`Classroom.on_floor_taken` run
on every node when a student loses the floor, so the node holding his WHIP session ends
it at once (the default callback does exactly that through the room registry).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, Optional, Union

from aiohttp import web

from .attendance import Attendance
from .history import HistoryLog
from .rooms import Room, RoomRegistry, Session
from .state import GLOBAL_ROOM, PRESENCE_STALE, State
from .timetable import Lesson, Timetable, scope_for
from .tokens import Claims

logger = logging.getLogger(__name__)

STAFF_ROLES = frozenset({"teacher", "assistant", "ops"})
PRESENCE_INTERVAL = 0.5          # seconds between presence flushes (nodes) and staff updates
STUDENT_PRESENCE_INTERVAL = 30.0  # students of a big room hear the count at most this often
PRESENCE_HEARTBEAT = 5.0         # a node re-writes its entries this often (stale after PRESENCE_STALE)
SMALL_ROOM = 40                  # at most this many people: presence carries names
ROOM_NODE_TTL = 30.0
HISTORY_ON_JOIN = 100            # entries a late joiner receives
SLOW_CLIENT_BUFFER = 16 * 1024   # a client with more unsent bytes than this misses messages
BAN_WITHOUT_LESSON = 12 * 3600   # a kick from a room outside the timetable lasts this long

FloorCallback = Callable[[str, str], Union[None, Awaitable[None]]]
MuteCallback = Callable[[str, str, bool], Union[None, Awaitable[None]]]


class ClassroomError(Exception):
    """A request the classroom refuses; ``code`` is machine-readable, the message is for people."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


@dataclass(eq=False)
class Client:
    """One websocket connection of one person to one room, on this node."""

    ws: web.WebSocketResponse
    transport: Any
    room: str
    scope: str
    claims: Claims
    id: str = field(default_factory=lambda: secrets.token_urlsafe(8))
    connected_at: float = field(default_factory=time.time)
    missed: int = 0
    # While the welcome is being assembled, events for this client wait here (then None).
    pending: Optional[list[bytes]] = None

    @property
    def name(self) -> str:
        return self.claims.name

    @property
    def role(self) -> str:
        return self.claims.role

    @property
    def staff(self) -> bool:
        return self.claims.role in STAFF_ROLES and "moderate" in self.claims.grants


@dataclass(eq=False)
class LocalRoom:
    """This node's clients of one room and its presence bookkeeping."""

    name: str
    clients: set[Client] = field(default_factory=set)
    staff: set[Client] = field(default_factory=set)
    by_name: dict[str, set[Client]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    viewers: int = 0                      # WHEP sessions on this node (last written)
    dirty: bool = True                    # our entry changed since last written
    stale: bool = True                    # the aggregate may have changed
    presence: Optional[dict] = None       # last aggregate
    presence_json: Optional[str] = None
    sent_staff: Optional[str] = None
    sent_students: Optional[str] = None
    students_sent_at: float = 0.0
    written_at: float = 0.0

    def add(self, client: Client) -> None:
        self.clients.add(client)
        if client.staff:
            self.staff.add(client)
        self.by_name.setdefault(client.name, set()).add(client)
        self.counts[client.role] = self.counts.get(client.role, 0) + 1
        self.dirty = True

    def remove(self, client: Client) -> None:
        if client not in self.clients:
            return
        self.clients.discard(client)
        self.staff.discard(client)
        same = self.by_name.get(client.name)
        if same is not None:
            same.discard(client)
            if not same:
                del self.by_name[client.name]
        self.counts[client.role] = self.counts.get(client.role, 1) - 1
        self.dirty = True

    def entry(self, viewers: int) -> dict:
        total = len(self.clients)
        names = None
        if total <= SMALL_ROOM:
            names = sorted([c.name, c.role] for c in {next(iter(s)) for s in self.by_name.values()})
        return {"counts": {r: n for r, n in self.counts.items() if n}, "viewers": viewers, "names": names,
                "ts": time.time()}


def text_frame(payload: bytes) -> bytes:
    """An unmasked, uncompressed, final websocket text frame (RFC 6455 section 5.2)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x81, n))
    elif n < 65536:
        header = bytes((0x81, 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x81, 127)) + n.to_bytes(8, "big")
    return header + payload


def _dumps(msg: dict) -> str:
    return json.dumps(msg, separators=(",", ":"), ensure_ascii=False)


class Classroom:
    """One per node. Owns the websocket clients of this node and the classroom logic."""

    def __init__(self, state: State, timetable: Timetable, registry: RoomRegistry, attendance: Attendance,
                 history: HistoryLog) -> None:
        self.state = state
        self.node_id = state.node_id
        self.timetable = timetable
        self.registry = registry
        self.attendance = attendance
        self.history_log = history
        self.rooms: dict[str, LocalRoom] = {}
        self._floor_callbacks: list[FloorCallback] = [self._end_speaker_sessions]
        self._mute_callbacks: list[MuteCallback] = []
        self._floor_cache: dict[str, Optional[str]] = {}      # room -> holder, from floor events
        self._home: set[str] = set()                          # rooms whose publisher is on this node
        self._events: asyncio.Queue[tuple[str, dict]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._closed_lessons: set[str] = set()
        self._closing_rooms: set[str] = set()                 # rooms being closed by the timetable
        self._home_tasks: dict[str, asyncio.Task[None]] = {}  # keep "where the room lives" fresh
        state.subscribe(self._on_event)
        registry.observers.append(self)

    # lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        await self.timetable.refresh()
        now = time.time()
        # Lessons whose window already closed are not "closed" again by the ticker.
        self._closed_lessons = {l.id for l in self.timetable.cached_lessons() if l.closes <= now}
        self._tasks = [asyncio.ensure_future(self._deliver_events()),
                       asyncio.ensure_future(self._presence_loop()),
                       asyncio.ensure_future(self._timetable_loop())]

    async def close(self) -> None:
        """Server shutdown, first step: say goodbye to this node's clients. Events keep being
        delivered (to the history log) until :meth:`drain`."""
        for task in self._tasks[1:] + list(self._home_tasks.values()):
            task.cancel()
        clients = [c for room in self.rooms.values() for c in room.clients]
        if clients:  # all at once: each close waits for the peer's answer
            await asyncio.wait([asyncio.ensure_future(c.ws.close(code=1001, message=b"server shutting down"))
                                for c in clients], timeout=3.0)
        for room in list(self.rooms):
            try:
                await self.state.put_presence(room, self.node_id, None)
            except Exception:
                pass
        for room in list(self._home):
            try:
                await self.state.clear_room_node(room, self.node_id)
            except Exception:
                pass

    async def drain(self, timeout: float = 2.0) -> None:
        """Wait (briefly) for in-flight background work, e.g. the last "lesson ended" events."""
        if self._background:
            await asyncio.wait(list(self._background), timeout=timeout)
        deadline = time.monotonic() + timeout
        while not self._events.empty() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the last event may still be in the store's pipe
        for task in self._tasks[:1]:
            task.cancel()
        self.history_log.close()

    def _spawn(self, coro: Awaitable[Any], what: str) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                logger.error("%s failed: %r", what, t.exception(), exc_info=t.exception())

        task.add_done_callback(done)

    # hooks for the media plane -------------------------------------------------------------
    def publish_refusal(self, room: str, claims: Claims) -> Optional[str]:
        """None if ``claims`` may publish (WHIP) into ``room`` now, else the reason.

        Synchronous (WHIP asks it inline), so it reads this node's caches: the timetable
        (refreshed every couple of seconds and on every timetable change seen here) and
        the floor holder of each room, which every node learns from the floor events of
        the shared pub/sub before any client can (the student's page learns it from the
        same event). A teacher may always publish in his own room (token for the room or
        "*", with the publish grant). A student may only while he holds the floor in a qa
        or tutoring room (rooms outside the timetable count as qa), never in a "lesson".
        Bans and timetable windows are enforced before WHIP by the gate middleware.
        """
        if claims.room not in (room, "*"):
            return f"token is for room {claims.room!r}, not {room!r}"
        if "publish" in claims.grants and claims.role in ("teacher", "ops", "assistant"):
            return None
        if claims.role != "student":
            return f"role {claims.role!r} may not publish"
        lesson = self._lesson_now(room)
        kind = lesson.kind if lesson is not None else "qa"
        if kind == "lesson":
            return "students do not publish in a lesson; ask a question instead"
        if self._floor_cache.get(room) != claims.name:
            return "you do not have the floor; raise your hand and wait for the teacher"
        return None

    def may_publish(self, room: str, claims: Claims) -> bool:
        """True if ``claims`` may publish into ``room`` now (see :meth:`publish_refusal`)."""
        return self.publish_refusal(room, claims) is None

    def on_floor_taken(self, callback: FloorCallback) -> None:
        """``callback(room, student_name)`` runs on every node when a student loses the floor."""
        self._floor_callbacks.append(callback)

    def on_speaker_muted(self, callback: MuteCallback) -> None:
        """``callback(room, student_name, muted)`` runs on every node when the teacher (un)mutes him."""
        self._mute_callbacks.append(callback)

    async def _end_speaker_sessions(self, room: str, name: str) -> None:
        """The built-in floor-taken callback: end the student's speaker WHIP sessions on this node."""
        for session in [s for s in self.registry.sessions.values()
                        if s.kind == "whip" and s.room == room and s.name == name and getattr(s, "speaker", False)]:
            await self.registry.close_session(session, reason="floor taken")

    # admission -------------------------------------------------------------------------
    async def admission_refusal(self, room: str, claims: Claims, what: str,
                                banned: Optional[bool] = None) -> Optional[str]:
        """Why ``claims`` may not join ``room`` now (what: "whip" | "whep" | "ws"), or None.

        Timetabled rooms are closed outside their window (staff may still open the
        websocket, e.g. to read the Q&A after the lesson); a student with a token for every
        room must belong to the lesson's audience; a kicked student stays out. ``banned``:
        already looked up by the caller.
        """
        if claims.role == "student":
            if banned is None:
                banned = await self.state.is_banned(room, claims.name)
            if banned:
                return "you were removed from this lesson by the teacher"
        if what == "ws" and claims.role in STAFF_ROLES:
            return None
        reason = await self.timetable.closed_reason(room)
        if reason is not None:
            return reason
        if claims.role == "student":
            lesson = await self.timetable.current(room)
            if lesson is not None:
                return lesson.admits_student(claims)
        return None

    # websocket clients ---------------------------------------------------------------------
    async def context(self, room: str) -> tuple[Optional[Lesson], str, str]:
        """(current lesson, scope key, kind) of ``room``."""
        lesson = await self.timetable.current(room)
        return lesson, scope_for(room, lesson), lesson.kind if lesson is not None else "qa"

    def add_client(self, client: Client) -> None:
        local = self.rooms.get(client.room)
        if local is None:
            local = self.rooms[client.room] = LocalRoom(client.room)
        local.add(client)
        self.attendance.join(client.scope, client.name, client.role, f"ws:{client.id}")
        logger.info("room=%s peer=%s %s %s connected (ws, node %s)", client.room, client.id, client.role,
                    client.name, self.node_id)

    def remove_client(self, client: Client) -> None:
        local = self.rooms.get(client.room)
        if local is not None:
            local.remove(client)
        self.attendance.leave(f"ws:{client.id}")
        logger.info("room=%s peer=%s %s %s left (ws)", client.room, client.id, client.role, client.name)

    async def welcome(self, client: Client, lesson: Optional[Lesson], kind: str) -> dict:
        """What a (late) joiner needs: lesson, live state, floor, presence, recent history."""
        room, scope = client.room, client.scope
        since = lesson.opens if lesson is not None else time.time() - 12 * 3600
        snap = await self.state.room_snapshot(room, scope, since, HISTORY_ON_JOIN * (3 if client.staff else 1))
        entries = snap["history"]
        visible = [e for e in entries if client.staff or e.get("to", "all") == "all" or e.get("name") == client.name]
        questions = snap["questions"]
        if not client.staff:
            questions = [q for q in questions if q.get("answered") or q.get("name") == client.name]
        floor = snap["floor"]
        self._floor_cache[room] = floor.get("holder") if floor else None
        hands = snap["hands"]
        local = self.rooms.get(room)
        msg: dict[str, Any] = {
            "type": "welcome",
            "room": room,
            "node": self.node_id,
            "you": {"name": client.name, "role": client.role, "staff": client.staff, "id": client.id},
            "lesson": lesson.to_json() if lesson is not None else None,
            "scope": scope,
            "kind": kind,
            "live": snap["live"],
            "floor": floor,
            "presence": local.presence if local is not None else None,
            "history": visible[-HISTORY_ON_JOIN:],
            "questions": questions,
        }
        if client.staff:
            msg["hands"] = hands
        else:
            msg["hand"] = any(h["name"] == client.name for h in hands)
        return msg

    # actions -----------------------------------------------------------------------------------
    async def _log_node(self, room: str) -> str:
        """Which node writes this room's history log: where the room lives, else this one."""
        if room in self._home:
            return self.node_id
        return await self.state.room_node(room) or self.node_id

    async def emit(self, room: str, msg: dict, to: str = "all", user: Optional[str] = None,
                   history: bool = False, ctl: Optional[dict] = None) -> None:
        """Announce ``msg`` to ``room`` on every node. ``to``: all | staff | user | staff+user.
        ``history``: also keep it (store + the room's log) for late joiners and replay."""
        envelope: dict[str, Any] = {"to": to, "msg": _dumps(msg), "origin": self.node_id}
        if user is not None:
            envelope["user"] = user
        if ctl:
            envelope["ctl"] = ctl
        if history:
            entry = dict(msg)
            entry.setdefault("id", secrets.token_urlsafe(8))
            entry.setdefault("ts", time.time())
            entry["to"] = "all" if to == "all" else "staff"
            await self.state.append_history(room, entry)
            envelope["log"] = await self._log_node(room)
            envelope["entry"] = entry
        await self.state.publish(room, envelope)

    async def chat(self, client: Client, text: str, kind: str) -> None:
        # In a lesson (thousands of students) students' chat goes to the staff only.
        to = "staff+user" if kind == "lesson" and not client.staff else "all"
        msg = {"type": "chat", "id": secrets.token_urlsafe(8), "ts": time.time(), "name": client.name,
               "role": client.role, "text": text}
        await self.emit(client.room, msg, to=to, user=client.name, history=True)

    async def ask(self, client: Client, text: str) -> dict:
        question = {"id": secrets.token_urlsafe(8), "ts": time.time(), "name": client.name, "text": text,
                    "answered": False, "answer": None, "answered_by": None, "answered_at": None}
        await self.state.put_question(client.scope, question)
        await self.emit(client.room, {"type": "question", "question": question}, to="staff+user",
                        user=client.name, history=True)
        return question

    async def answered(self, client: Client, qid: str, answer: Optional[str]) -> dict:
        question = await self.state.question(client.scope, qid)
        if question is None:
            raise ClassroomError("not_found", f"no question {qid!r} in this lesson")
        question.update(answered=True, answer=answer or question.get("answer"), answered_by=client.name,
                        answered_at=time.time())
        await self.state.put_question(client.scope, question)
        await self.emit(client.room, {"type": "answered", "question": question}, to="all", history=True)
        return question

    async def hand(self, room: str, name: str, raised: bool, by: Optional[str] = None) -> bool:
        changed = await self.state.set_hand(room, name, raised)
        if changed:
            await self.emit(room, {"type": "hand", "name": name, "raised": raised, "by": by or name,
                                   "ts": time.time()}, to="staff+user", user=name)
        return changed

    async def give_floor(self, room: str, name: str, by: str, kind: str) -> None:
        if kind == "lesson":
            raise ClassroomError("forbidden", "no floor in a lesson room (thousands of students): use questions")
        floor = {"holder": name, "muted": False, "since": time.time(), "by": by}
        previous = await self.state.swap_floor(room, floor)
        self._floor_cache[room] = name
        taken = previous.get("holder") if previous and previous.get("holder") != name else None
        await self.state.set_hand(room, name, False)
        await self.emit(room, {"type": "floor", "holder": name, "muted": False, "by": by, "taken_from": taken,
                               "ts": floor["since"]}, history=True, ctl={"floor": name, "taken": taken})
        await self.emit(room, {"type": "hand", "name": name, "raised": False, "by": by, "ts": time.time()},
                        to="staff+user", user=name)
        logger.info("room=%s floor given to %s by %s (taken from %s)", room, name, by, taken)

    async def take_floor(self, room: str, by: str, reason: str = "taken") -> Optional[str]:
        previous = await self.state.swap_floor(room, None)
        self._floor_cache[room] = None
        holder = previous.get("holder") if previous else None
        if holder is not None:
            await self.emit(room, {"type": "floor", "holder": None, "by": by, "taken_from": holder,
                                   "reason": reason, "ts": time.time()}, history=True,
                            ctl={"floor": None, "taken": holder})
            logger.info("room=%s floor taken from %s by %s (%s)", room, holder, by, reason)
        return holder

    async def mute(self, room: str, name: str, muted: bool, by: str) -> None:
        floor = await self.state.floor(room)
        if floor is None or floor.get("holder") != name:
            raise ClassroomError("not_found", f"{name} does not have the floor")
        floor["muted"] = muted
        await self.state.swap_floor(room, floor)
        await self.emit(room, {"type": "mute", "name": name, "muted": muted, "by": by, "ts": time.time()},
                        ctl={"muted": [name, muted]})

    async def kick(self, room: str, name: str, by: str, reason: str = "removed by the teacher") -> None:
        lesson = await self.timetable.current(room)
        until = lesson.closes if lesson is not None else time.time() + BAN_WITHOUT_LESSON
        await self.state.ban(room, name, until)
        floor = await self.state.floor(room)
        if floor is not None and floor.get("holder") == name:
            await self.take_floor(room, by, reason="kicked")
        await self.state.set_hand(room, name, False)
        await self.emit(room, {"type": "kicked", "name": name, "by": by, "reason": reason, "ts": time.time()},
                        to="staff+user", user=name, ctl={"kick": name})
        logger.info("room=%s %s kicked by %s", room, name, by)

    async def revoked(self, jti: str, room: str, name: str) -> None:
        """A token was revoked: its connections end wherever they are."""
        await self.state.publish(GLOBAL_ROOM, {"to": "none", "ctl": {"revoke": jti, "room": room, "name": name},
                                               "origin": self.node_id})

    async def end_lesson(self, room: str, by: str, reason: str) -> None:
        """The lesson is over: floor back, hands down, everyone told."""
        await self.take_floor(room, by, reason=reason)
        await self.state.clear_hands(room)
        await self.state.set_live(room, None)
        await self.emit(room, {"type": "lesson", "state": "ended", "by": by, "reason": reason, "ts": time.time()},
                        history=True)

    # event delivery ---------------------------------------------------------------------------
    def _on_event(self, room: str, envelope: dict) -> None:
        self._events.put_nowait((room, envelope))

    async def _deliver_events(self) -> None:
        """One consumer, so a room's events reach its clients in the order they were published."""
        while True:
            room, envelope = await self._events.get()
            try:
                await self._handle_event(room, envelope)
            except Exception:
                logger.exception("room=%s event delivery failed", room)

    async def _handle_event(self, room: str, envelope: dict) -> None:
        ctl = envelope.get("ctl")
        if ctl:
            self._control(room, ctl)
        if envelope.get("log") == self.node_id and "entry" in envelope:
            try:
                self.history_log.append(room, envelope["entry"])
            except OSError as exc:
                logger.error("room=%s cannot write history log: %s", room, exc)
        if envelope.get("presence"):
            local = self.rooms.get(room)
            if local is not None:
                local.stale = True
        data = envelope.get("msg")
        local = self.rooms.get(room)
        if data is None or local is None or not local.clients:
            return
        to, user = envelope.get("to", "all"), envelope.get("user")
        if to == "all":
            targets: Any = local.clients
        elif to == "staff":
            targets = local.staff
        elif to == "user":
            targets = local.by_name.get(user, ())
        elif to == "staff+user":
            targets = local.staff | local.by_name.get(user, set())
        else:
            return
        await self.send_many(targets, data.encode())

    async def send_many(self, clients: Iterable[Client], data: bytes) -> None:
        """Send one message to many clients: encoded once, framed once, the same bytes written
        to every socket.

        This is the per-student cost of every broadcast (a teacher's chat to 5,000 students is
        5,000 of these), so it skips aiohttp's per-call framing and writes the finished
        RFC 6455 text frame (a server's frames are unmasked; compression is off on these
        websockets) straight to each transport. Frames are whole writes on one thread, so
        they never interleave with aiohttp's own (pings, close). A client whose socket
        holds more than SLOW_CLIENT_BUFFER unsent bytes misses the message rather than
        growing the server's memory; its page catches up from the history on reconnect.
        """
        frame = text_frame(data)
        for client in clients:
            if client.pending is not None:
                client.pending.append(data)
                continue
            transport = client.transport
            if transport is None or client.ws.closed or transport.is_closing():
                continue
            if transport.get_write_buffer_size() > SLOW_CLIENT_BUFFER:
                client.missed += 1
                continue
            transport.write(frame)

    async def send(self, client: Client, msg: dict) -> None:
        await self.send_many([client], _dumps(msg).encode())

    def _control(self, room: str, ctl: dict) -> None:
        """Node-local effects of an event: floor callbacks, ending kicked/revoked sessions."""
        if "floor" in ctl:
            self._floor_cache[room] = ctl["floor"]
        taken = ctl.get("taken")
        if taken:
            for callback in self._floor_callbacks:
                self._spawn(_maybe_await(callback(room, taken)), f"room={room} floor-taken callback")
        muted = ctl.get("muted")
        if muted:
            for mute_callback in self._mute_callbacks:
                self._spawn(_maybe_await(mute_callback(room, muted[0], bool(muted[1]))), f"room={room} mute callback")
        kicked = ctl.get("kick")
        if kicked:
            self._spawn(self._end_local(room, kicked, "kicked", "removed by the teacher"), f"room={room} kick")
        jti = ctl.get("revoke")
        if jti:
            self._spawn(self._end_revoked(jti, ctl.get("room", ""), ctl.get("name", "")), "revoke")

    async def _end_local(self, room: str, name: str, code: str, reason: str,
                         jti: Optional[str] = None) -> None:
        """End ``name``'s websockets (or only those of token ``jti``) and sessions in ``room`` on this node."""
        local = self.rooms.get(room)
        for client in list(local.by_name.get(name, ())) if local is not None else []:
            if jti is None or client.claims.jti == jti:
                await self.send(client, {"type": "kicked" if code == "kicked" else "error", "error": code,
                                         "detail": reason, "name": name})
                await client.ws.close(code=4403, message=reason.encode()[:120])
        for session in [s for s in self.registry.sessions.values() if s.room == room and s.name == name]:
            await self.registry.close_session(session, reason=reason)

    async def _end_revoked(self, jti: str, room: str, name: str) -> None:
        rooms = list(self.rooms) if room == "*" else [room]
        for r in rooms:
            local = self.rooms.get(r)
            if local is not None and any(c.claims.jti == jti for c in local.by_name.get(name, ())):
                await self._end_local(r, name, "revoked", "token revoked", jti=jti)
        if room != "*":
            for session in [s for s in self.registry.sessions.values() if s.room == room and s.name == name]:
                await self.registry.close_session(session, reason="token revoked")

    # presence ----------------------------------------------------------------------------------
    async def _presence_loop(self) -> None:
        last_heartbeat = 0.0
        while True:
            await asyncio.sleep(PRESENCE_INTERVAL)
            try:
                heartbeat = time.monotonic() - last_heartbeat >= PRESENCE_HEARTBEAT
                if heartbeat:
                    last_heartbeat = time.monotonic()
                await self._flush_presence(heartbeat)
            except Exception:
                logger.exception("node=%s presence flush failed", self.node_id)

    async def _flush_presence(self, heartbeat: bool) -> None:
        # WHEP viewers of this node count too (a student may watch without the events page).
        for name, room in self.registry.rooms.items():
            local = self.rooms.get(name)
            if local is None and room.viewers:
                local = self.rooms[name] = LocalRoom(name)
            if local is not None and len(room.viewers) != local.viewers:
                local.dirty = True
        for name, local in list(self.rooms.items()):
            room = self.registry.rooms.get(name)
            viewers = len(room.viewers) if room is not None else 0
            if not local.clients and viewers == 0 and not local.dirty:
                if not heartbeat:
                    continue
                # nobody here any more: drop our entry and forget the room
                await self.state.put_presence(name, self.node_id, None)
                await self.state.publish(name, {"to": "none", "presence": True, "origin": self.node_id})
                del self.rooms[name]
                continue
            if local.dirty or heartbeat:
                changed = local.dirty
                local.viewers = viewers
                local.dirty = False
                await self.state.put_presence(name, self.node_id, local.entry(viewers))
                if changed:
                    await self.state.publish(name, {"to": "none", "presence": True, "origin": self.node_id})
            if local.stale or heartbeat:
                local.stale = False
                await self._announce_presence(local)

    async def aggregate_presence(self, room: str) -> dict:
        entries = await self.state.presence(room)
        now = time.time()
        counts: dict[str, int] = {}
        viewers = 0
        names: Optional[list] = []
        for entry in entries.values():
            if now - float(entry.get("ts", 0)) > PRESENCE_STALE:
                continue  # that node is gone
            for role, n in entry.get("counts", {}).items():
                counts[role] = counts.get(role, 0) + int(n)
            viewers += int(entry.get("viewers", 0))
            if names is not None and entry.get("names") is not None:
                names.extend(entry["names"])
            else:
                names = None
        total = sum(counts.values())
        if names is not None and total > SMALL_ROOM:
            names = None
        if names is not None:
            names = [{"name": n, "role": r} for n, r in sorted({(n, r) for n, r in names})]
        return {"type": "presence", "room": room, "counts": counts, "total": total,
                "students": counts.get("student", 0), "viewers": viewers, "names": names}

    async def _announce_presence(self, local: LocalRoom) -> None:
        if not local.clients:
            return
        presence = await self.aggregate_presence(local.name)
        local.presence = presence
        data = _dumps(presence)
        if data != local.sent_staff and local.staff:
            local.sent_staff = data
            await self.send_many(list(local.staff), data.encode())
        if data != local.sent_students:
            small = presence["names"] is not None
            now = time.monotonic()
            if small or now - local.students_sent_at >= STUDENT_PRESENCE_INTERVAL:
                local.sent_students = data
                local.students_sent_at = now
                await self.send_many([c for c in local.clients if not c.staff], data.encode())
            else:
                local.stale = True  # try again on a later tick

    # timetable windows ----------------------------------------------------------------------
    async def _timetable_loop(self) -> None:
        """Close rooms whose lesson window ended: end this node's sessions and tell its clients."""
        while True:
            await asyncio.sleep(2.0)
            try:
                await self.timetable.refresh()
                now = time.time()
                for lesson in self.timetable.cached_lessons():
                    if lesson.closes <= now and lesson.id not in self._closed_lessons:
                        self._closed_lessons.add(lesson.id)
                        if await self.timetable.current(lesson.room, now) is None:
                            await self._close_room_locally(lesson)
            except Exception:
                logger.exception("node=%s timetable tick failed", self.node_id)

    async def _close_room_locally(self, lesson: Lesson) -> None:
        room = lesson.room
        logger.info("room=%s lesson %s window closed; ending this node's sessions", room, lesson.id)
        self._closing_rooms.add(room)
        try:
            if any(s.kind == "whip" and s.room == room for s in self.registry.sessions.values()):
                await self.end_lesson(room, by="timetable", reason="the lesson's time is over")
            local = self.rooms.get(room)
            if local is not None:
                for client in [c for c in local.clients if not c.staff]:
                    await self.send(client, {"type": "lesson", "state": "closed",
                                             "reason": "the lesson's time is over"})
                    await client.ws.close(code=4000, message=b"lesson over")
            for session in [s for s in self.registry.sessions.values() if s.room == room]:
                await self.registry.close_session(session, reason="lesson window closed", ended=True)
        finally:
            self._closing_rooms.discard(room)

    # RoomRegistry observer: lesson start/end, speakers, WHEP attendance ------------------------
    def publisher_joined(self, room: Room, session: Session) -> None:
        self._home.add(room.name)
        self.attendance.join(self._scope_now(room.name), session.name, "teacher", f"whip:{session.id}")
        self._spawn(self._lesson_live(room.name, session.name, room.started_at), f"room={room.name} lesson live")
        task = self._home_tasks.get(room.name)
        if task is None or task.done():
            self._home_tasks[room.name] = asyncio.ensure_future(self._keep_home(room.name))

    def publisher_left(self, room: Room, session: Session, ended: bool) -> None:
        self.attendance.leave(f"whip:{session.id}")
        if room.name in self._closing_rooms:
            return
        if ended:
            self._spawn(self.end_lesson(room.name, by=session.name, reason="the teacher ended the lesson"),
                        f"room={room.name} lesson end")
        else:
            self._spawn(self.emit(room.name, {"type": "lesson", "state": "interrupted", "ts": time.time()}),
                        f"room={room.name} lesson interrupted")

    def speaker_joined(self, room: Room, session: Session) -> None:
        self.attendance.join(self._scope_now(room.name), session.name, "student", f"whip:{session.id}")
        self._spawn(self.emit(room.name, {"type": "speaking", "name": session.name, "state": "on",
                                          "ts": time.time()}, history=True), f"room={room.name} speaking on")

    def speaker_left(self, room: Room, session: Session) -> None:
        self.attendance.leave(f"whip:{session.id}")
        self._spawn(self.emit(room.name, {"type": "speaking", "name": session.name, "state": "off",
                                          "ts": time.time()}), f"room={room.name} speaking off")

    def room_closed(self, room: Room) -> None:
        task = self._home_tasks.pop(room.name, None)
        if task is not None:
            task.cancel()
        if room.name in self._home:
            self._home.discard(room.name)
            self._spawn(self.state.clear_room_node(room.name, self.node_id), f"room={room.name} clear node")

    def viewer_joined(self, room: Room, session: Session) -> None:
        self.attendance.join(self._scope_now(room.name), session.name, "student", f"whep:{session.id}")

    def viewer_left(self, room: Room, session: Session) -> None:
        self.attendance.leave(f"whep:{session.id}")

    def _lesson_now(self, room: str) -> Optional[Lesson]:
        """The open lesson of ``room`` from this node's timetable cache (no store access)."""
        now = time.time()
        for lesson in self.timetable.cached_lessons():
            if lesson.room == room and lesson.is_open(now):
                return lesson
        return None

    def _scope_now(self, room: str) -> str:
        return scope_for(room, self._lesson_now(room))

    async def _lesson_live(self, room: str, teacher: str, started_at: Optional[float]) -> None:
        await self.state.set_room_node(room, self.node_id, ROOM_NODE_TTL)
        info = {"teacher": teacher, "since": started_at or time.time(), "node": self.node_id}
        await self.state.set_live(room, info)
        await self.emit(room, {"type": "lesson", "state": "live", **info, "ts": time.time()}, history=True)

    async def _keep_home(self, room: str) -> None:
        """Refresh "where the room lives" while the room is on this node (the entry expires otherwise)."""
        while room in self._home:
            await asyncio.sleep(ROOM_NODE_TTL / 3)
            try:
                await self.state.set_room_node(room, self.node_id, ROOM_NODE_TTL)
            except Exception as exc:
                logger.warning("room=%s cannot refresh its node entry: %s", room, exc)


async def _maybe_await(value: Union[None, Awaitable[None]]) -> None:
    if inspect.isawaitable(value):
        await value
