"""HTTP side of the classroom: timetable CRUD, join links, attendance, history, revocation,
kicks, replay watch time — and :func:`setup`, which wires state, timetable, classroom and
attendance into the aiohttp app.

| route | who |
| --- | --- |
| ``GET /api/timetable?date=YYYY-MM-DD|today|all`` | any token; students see their audience's lessons; each lesson carries ``links`` the caller can use |
| ``POST /api/timetable`` (one lesson, or ``{"lessons": [...], "replace": bool}``) | ops; a teacher for his own lessons |
| ``GET/PUT/PATCH/DELETE /api/lessons/{id}`` | read: any token that sees it; write: ops, the lesson's teacher |
| ``POST /api/lessons/{id}/tokens`` ``{"role", "name"}`` | ops (any role); the lesson's teacher (student/assistant) |
| ``GET /api/lessons/{id}/attendance[?format=csv]`` | ops; teacher/assistant of the lesson's room |
| ``GET /api/rooms/{room}/history?since=&until=`` | any token for the room (students: public entries and their own); no token: public entries |
| ``GET /api/recordings/{id}/history`` | anyone (like the recordings): a recorded lesson's public chat and Q&A, ``offset`` into the video |
| ``GET /api/rooms/{room}/classroom`` | any token for the room: lesson, live, floor, presence, node |
| ``POST /api/rooms/{room}/kick`` ``{"name"}`` | moderators of the room |
| ``POST /api/tokens/revoke`` ``{"token"}`` or ``{"jti", "until"}`` | moderators (own room's tokens); ops (any) |
| ``POST /api/recordings/{id}/watch`` ``{"seconds", "lesson"?}`` | any token: adds replay watch time |
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from datetime import date as Date
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

import jwt
from aiohttp import web

from .attendance import Attendance, report_csv
from .auth import authenticate
from .classroom import STAFF_ROLES, Classroom, ClassroomError
from .errors import HttpError
from .events import ws_handler
from .gate import gate_middleware
from .history import HistoryLog, read_recording_history, write_recording_history
from .state import make_state
from .timetable import Lesson, Timetable, TimetableError, lesson_from_dict, scope_for
from .tokens import ALGORITHM, Claims, issue_token

logger = logging.getLogger(__name__)

MAX_IMPORT = 5000


def _parse_day(text: str) -> Optional[Date]:
    if text in ("", "today"):
        return Date.today()
    if text == "all":
        return None
    try:
        return Date.fromisoformat(text)
    except ValueError:
        raise HttpError(400, "bad request", f"date must be YYYY-MM-DD, 'today' or 'all', not {text!r}") from None


async def _json_body(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise HttpError(400, "bad request", "body must be JSON") from None


def _float(request: web.Request, name: str, default: float) -> float:
    value = request.query.get(name)
    if value in (None, ""):
        return default
    try:
        return float(value)
    except ValueError:
        raise HttpError(400, "bad request", f"{name} must be epoch seconds, not {value!r}") from None


class ClassroomApi:
    def __init__(self, app: web.Application) -> None:
        self.app = app

    @property
    def classroom(self) -> Classroom:
        return self.app["classroom"]

    @property
    def timetable(self) -> Timetable:
        return self.app["timetable"]

    def _mint(self, role: str, room: str, name: str, until: float, extra: Optional[dict] = None) -> str:
        return issue_token(self.app["secret"], role, room, name, max(60, int(until - time.time())), extra=extra)

    # timetable ------------------------------------------------------------------------------
    def _sees(self, claims: Claims, lesson: Lesson) -> bool:
        if claims.role in STAFF_ROLES:
            return True
        return lesson.admits_student(claims) is None

    def _may_edit(self, claims: Claims, lesson: Lesson) -> bool:
        return claims.role == "ops" or (claims.role == "teacher" and lesson.teacher == claims.name)

    async def _status(self, lesson: Lesson, now: float) -> str:
        if now < lesson.opens:
            return "upcoming"
        if now >= lesson.closes:
            return "ended"
        return "live" if await self.classroom.state.live(lesson.room) else "open"

    def _links(self, claims: Claims, token: str, lesson: Lesson, now: float) -> dict[str, str]:
        links: dict[str, str] = {}
        if now >= lesson.closes:
            return links
        room = lesson.room
        own_room = claims.room in (room, "*")
        if claims.role == "teacher" and own_room and "publish" in claims.grants:
            links["teach"] = f"/teach/{room}?token={token}"
        if claims.role == "student":
            if lesson.admits_student(claims) is None:
                links["watch"] = f"/watch/{room}?token={token}"
        elif own_room:
            links["watch"] = f"/watch/{room}?token={token}"
        if claims.role == "ops":
            # Ops hand out the day's links: the teacher's and the assistant's are minted here;
            # students' are minted per name (POST /api/lessons/{id}/tokens).
            links["teach"] = f"/teach/{room}?token={self._mint('teacher', room, lesson.teacher, lesson.closes)}"
            links["assist"] = f"/watch/{room}?token={self._mint('assistant', room, 'Assistant', lesson.closes)}"
        return links

    async def _replay_link(self, lesson: Lesson, token: str) -> Optional[str]:
        """The replay page of the lesson's first recording (its beginning; a teacher who comes back
        within the grace period continues it), with the caller's token so that watch time counts."""
        find: Optional[Callable[[Lesson], Awaitable[list[Any]]]] = self.app.get("lesson_recordings")
        recordings = await find(lesson) if find is not None else []
        if not recordings:
            return None
        first = min(recordings, key=lambda info: info.started_at)
        return f"/replay/{first.id}?token={token}" if token else f"/replay/{first.id}"

    async def list_timetable(self, request: web.Request) -> web.Response:
        claims = authenticate(request)
        await self.timetable.refresh(force=True)  # a listing shows edits made a moment ago elsewhere
        day = _parse_day(request.query.get("date", "today"))
        lessons = await (self.timetable.on_day(day) if day is not None else self.timetable.all())
        room = request.query.get("room")
        token = request.headers.get("Authorization", "").partition(" ")[2].strip() or request.query.get("token", "")
        now = time.time()
        out = []
        for lesson in lessons:
            if (room and lesson.room != room) or not self._sees(claims, lesson):
                continue
            item = lesson.to_json()
            item["status"] = await self._status(lesson, now)
            item["links"] = self._links(claims, token, lesson, now)
            if item["status"] != "upcoming" and (claims.role != "student" or lesson.admits_student(claims) is None):
                replay = await self._replay_link(lesson, token)
                if replay:
                    item["links"]["replay"] = replay
            out.append(item)
        return web.json_response({"date": day.isoformat() if day else None, "now": now, "lessons": out,
                                  "you": {"name": claims.name, "role": claims.role, "room": claims.room}})

    def _lesson_of(self, body: Any, where: str, lesson_id: Optional[str] = None) -> Lesson:
        if not isinstance(body, dict):
            raise HttpError(400, "bad request", f"{where}: a lesson is a JSON object")
        if lesson_id is not None:
            body = {**body, "id": lesson_id}
        try:
            return lesson_from_dict(body, Date.today(), where)
        except TimetableError as exc:
            raise HttpError(400, "bad request", str(exc)) from None

    async def _save(self, lessons: list[Lesson], replace: bool = False) -> None:
        try:
            await self.timetable.save(lessons, replace=replace)
        except TimetableError as exc:
            raise HttpError(409, "conflict", str(exc)) from None

    async def create_lessons(self, request: web.Request) -> web.Response:
        claims = authenticate(request)
        if claims.role not in ("ops", "teacher"):
            raise HttpError(403, "forbidden", "only ops and teachers edit the timetable")
        body = await _json_body(request)
        replace = False
        if isinstance(body, dict) and "lessons" in body:
            items, replace = body["lessons"], bool(body.get("replace", False))
            if not isinstance(items, list) or len(items) > MAX_IMPORT:
                raise HttpError(400, "bad request", f"'lessons' must be a list of at most {MAX_IMPORT}")
        else:
            items = [body]
        lessons = [self._lesson_of(item, f"lesson #{i + 1}") for i, item in enumerate(items)]
        if replace and claims.role != "ops":
            raise HttpError(403, "forbidden", "only ops replace the whole timetable")
        for lesson in lessons:
            existing = await self.timetable.get(lesson.id)
            if not self._may_edit(claims, lesson) or (existing is not None and not self._may_edit(claims, existing)):
                raise HttpError(403, "forbidden", f"a teacher edits only his own lessons ({lesson.id})")
        await self._save(lessons, replace)
        logger.info("timetable: %s saved %d lesson(s)%s", claims.name, len(lessons), " (replace)" if replace else "")
        return web.json_response({"saved": [l.to_json() for l in lessons]}, status=201)

    async def _get_lesson(self, request: web.Request) -> tuple[Claims, Lesson]:
        claims = authenticate(request)
        await self.timetable.refresh(force=True)
        lesson = await self.timetable.get(request.match_info["id"])
        if lesson is None or not self._sees(claims, lesson):
            raise HttpError(404, "not found", f"no lesson {request.match_info['id']!r}")
        return claims, lesson

    async def get_lesson(self, request: web.Request) -> web.Response:
        _, lesson = await self._get_lesson(request)
        return web.json_response(lesson.to_json())

    async def put_lesson(self, request: web.Request) -> web.Response:
        claims, existing = await self._get_lesson(request)
        body = await _json_body(request)
        if request.method == "PATCH":
            if not isinstance(body, dict):
                raise HttpError(400, "bad request", "a lesson patch is a JSON object")
            base = existing.to_json()
            for key in ("start_iso", "end_iso", "opens", "closes"):
                base.pop(key, None)
            body = {**base, **body}
        lesson = self._lesson_of(body, "lesson", existing.id)
        if not self._may_edit(claims, existing) or not self._may_edit(claims, lesson):
            raise HttpError(403, "forbidden", "only ops and the lesson's teacher edit it")
        await self._save([lesson])
        return web.json_response(lesson.to_json())

    async def delete_lesson(self, request: web.Request) -> web.Response:
        claims, lesson = await self._get_lesson(request)
        if not self._may_edit(claims, lesson):
            raise HttpError(403, "forbidden", "only ops and the lesson's teacher delete it")
        await self.timetable.delete(lesson.id)
        logger.info("timetable: %s deleted lesson %s", claims.name, lesson.id)
        return web.json_response({"deleted": lesson.id})

    async def lesson_tokens(self, request: web.Request) -> web.Response:
        claims, lesson = await self._get_lesson(request)
        body = await _json_body(request)
        role = body.get("role", "student") if isinstance(body, dict) else None
        name = str(body.get("name", "")).strip() if isinstance(body, dict) else ""
        if role not in ("teacher", "assistant", "student") or not name or len(name) > 120:
            raise HttpError(400, "bad request", "body: {\"role\": teacher|assistant|student, \"name\": ...}")
        allowed = claims.role == "ops" or (claims.role == "teacher" and lesson.teacher == claims.name
                                           and role in ("student", "assistant"))
        if not allowed:
            raise HttpError(403, "forbidden", "ops mint any link; a teacher mints student and assistant links "
                                              "for his own lessons")
        if time.time() >= lesson.closes:
            raise HttpError(409, "conflict", f"lesson {lesson.id} is over")
        extra = {k: body[k] for k in ("school", "grade", "class") if k in body}
        token = self._mint(role, lesson.room, name, lesson.closes, extra or None)
        page = "teach" if role == "teacher" else "watch"
        return web.json_response({"token": token, "url": f"/{page}/{lesson.room}?token={token}",
                                  "expires_at": lesson.closes, "role": role, "name": name}, status=201)

    # attendance ---------------------------------------------------------------------------------
    async def attendance(self, request: web.Request) -> web.Response:
        claims = authenticate(request)
        lesson_id = request.match_info["id"]
        lesson = await self.timetable.get(lesson_id)
        room = lesson.room if lesson is not None else lesson_id.partition("@")[0]
        if lesson is None and "@" not in lesson_id:
            raise HttpError(404, "not found", f"no lesson {lesson_id!r} (rooms outside the timetable: ROOM@YYYY-MM-DD)")
        if not (claims.role == "ops" or (claims.role in ("teacher", "assistant") and claims.room in (room, "*"))):
            raise HttpError(403, "forbidden", "attendance is for the lesson's teacher, assistants and ops")
        attendance: Attendance = self.app["attendance"]
        report = await attendance.report(lesson_id)
        report["room"] = room
        if lesson is not None:
            report["lesson_info"] = lesson.to_json()
        if request.query.get("format") == "csv":
            return web.Response(text=report_csv(report), content_type="text/csv",
                                headers={"Content-Disposition": f'attachment; filename="attendance-{lesson_id}.csv"'})
        return web.json_response(report)

    async def watch(self, request: web.Request) -> web.Response:
        claims = authenticate(request)
        recording = request.match_info["id"]
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise HttpError(400, "bad request", "body: {\"seconds\": n, \"lesson\"?: id}")
        try:
            seconds = float(body.get("seconds", 0))
        except (TypeError, ValueError):
            raise HttpError(400, "bad request", "'seconds' must be a number") from None
        if not 0 < seconds <= 300:
            raise HttpError(400, "bad request", "'seconds' must be in (0, 300]: ping at least every 5 minutes")
        key = str(body.get("lesson") or "")
        if not key:
            resolver: Optional[Callable[[str], Awaitable[Optional[str]]]] = self.app.get("recording_lesson")
            if resolver is not None:
                key = await resolver(recording) or ""
            elif await self.timetable.get(recording) is not None:
                key = recording
        key = key or f"recording:{recording}"
        attendance: Attendance = self.app["attendance"]
        total = await attendance.add_watch(key, claims.name, seconds)
        return web.json_response({"recording": recording, "lesson": key, "name": claims.name, "seconds": total})

    # history, room snapshot, kick, revoke ---------------------------------------------------------
    def _room_claims(self, request: web.Request, room: str) -> Claims:
        claims = authenticate(request)
        if claims.room not in (room, "*"):
            raise HttpError(403, "forbidden", f"token is for room {claims.room!r}, not {room!r}")
        return claims

    async def history(self, request: web.Request) -> web.Response:
        """A room's chat and Q&A between ``since`` and ``until``. Without a token: the public
        entries only (what every student saw: public chat, answered questions, the floor), as
        for the recordings, which are public too — so a replay page can show them."""
        room = request.match_info["room"]
        has_token = bool(request.headers.get("Authorization") or request.query.get("token"))
        claims = self._room_claims(request, room) if has_token else None
        since = _float(request, "since", 0.0)
        until = _float(request, "until", time.time() + 60)
        limit = max(1, min(int(_float(request, "limit", 2000)), 5000))
        entries = await self._history(room, since, until, limit)
        staff = claims is not None and claims.role in STAFF_ROLES
        name = claims.name if claims is not None else None
        entries = [e for e in entries if staff or e.get("to", "all") == "all" or e.get("name") == name]
        return web.json_response({"room": room, "since": since, "until": until, "entries": entries[-limit:]})

    async def _history(self, room: str, since: float, until: float, limit: int) -> list[dict]:
        stored = await self.classroom.state.history(room, since, until, limit)
        logged = await asyncio.get_running_loop().run_in_executor(
            None, self.classroom.history_log.read, room, since, until, limit)
        merged = {e["id"]: e for e in logged}
        merged.update({e["id"]: e for e in stored})
        return sorted(merged.values(), key=lambda e: e["ts"])

    async def recording_history(self, request: web.Request) -> web.Response:
        """``GET /api/recordings/{id}/history``: the public chat and Q&A of a recorded lesson,
        with ``offset`` (seconds into the recording) on each entry, for the replay page."""
        lookup: Optional[Callable[[str], Awaitable[Optional[Any]]]] = self.app.get("recording_info")
        info = await lookup(request.match_info["id"]) if lookup is not None else None
        if info is None:
            raise HttpError(404, "not found", f"no recording {request.match_info['id']!r}")
        entries = await self.recording_entries(info)
        directory: Optional[Callable[[str], Path]] = self.app.get("recording_directory")
        if directory is not None:
            # The copy kept with the recording outlives the room's log (and travels with the folder).
            kept = await asyncio.to_thread(read_recording_history, directory(info.id))
            entries = sorted({**{e["id"]: e for e in kept}, **{e["id"]: e for e in entries}}.values(),
                             key=lambda e: e["ts"])
        start = float(info.started_at)
        for entry in entries:
            entry["offset"] = round(float(entry["ts"]) - start, 3)
        end = float(info.ended_at) if getattr(info, "ended_at", None) else time.time()
        return web.json_response({"recording": request.match_info["id"], "room": info.room, "started_at": start,
                                  "ended_at": end, "entries": entries})

    async def recording_entries(self, info: Any) -> list[dict]:
        """A recording's public chat and Q&A: what every student saw from a minute before it
        began to a minute after it ended."""
        start = float(info.started_at)
        end = float(info.ended_at) if getattr(info, "ended_at", None) else time.time()
        return [e for e in await self._history(info.room, start - 60, end + 60, 5000) if e.get("to", "all") == "all"]

    async def snapshot(self, request: web.Request) -> web.Response:
        room = request.match_info["room"]
        claims = self._room_claims(request, room)
        classroom = self.classroom
        lesson, scope, kind = await classroom.context(room)
        body = {
            "room": room, "node": classroom.node_id, "lives_on": await classroom.state.room_node(room),
            "lesson": lesson.to_json() if lesson else None, "scope": scope, "kind": kind,
            "live": await classroom.state.live(room), "floor": await classroom.state.floor(room),
            "presence": await classroom.aggregate_presence(room),
        }
        if claims.role in STAFF_ROLES:
            body["hands"] = await classroom.state.hands(room)
        return web.json_response(body)

    async def kick(self, request: web.Request) -> web.Response:
        room = request.match_info["room"]
        claims = self._room_claims(request, room)
        if "moderate" not in claims.grants:
            raise HttpError(403, "forbidden", f"role {claims.role!r} may not remove students")
        body = await _json_body(request)
        name = str(body.get("name", "")).strip() if isinstance(body, dict) else ""
        if not name:
            raise HttpError(400, "bad request", "body: {\"name\": student}")
        await self.classroom.kick(room, name, claims.name)
        return web.json_response({"room": room, "kicked": name})

    async def revoke(self, request: web.Request) -> web.Response:
        claims = authenticate(request)
        if "moderate" not in claims.grants:
            raise HttpError(403, "forbidden", f"role {claims.role!r} may not revoke tokens")
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise HttpError(400, "bad request", "body: {\"token\": ...} or {\"jti\": ..., \"until\": epoch}")
        if body.get("token"):
            try:
                payload = jwt.decode(str(body["token"]), self.app["secret"], algorithms=[ALGORITHM],
                                     options={"verify_exp": False})
            except jwt.InvalidTokenError as exc:
                raise HttpError(400, "bad request", f"not one of our tokens: {exc}") from None
            jti, until = str(payload.get("jti", "")), float(payload.get("exp", time.time() + 86400))
            room, name = str(payload.get("room", "")), str(payload.get("sub", ""))
            if not jti:
                raise HttpError(409, "conflict", "this token has no id (issued before revocation existed); "
                                                 "kick the student or rotate the secret")
            if claims.role != "ops" and (claims.room == "*" or room != claims.room):
                raise HttpError(403, "forbidden", "a teacher revokes only tokens of his own room")
        elif body.get("jti"):
            if claims.role != "ops":
                raise HttpError(403, "forbidden", "only ops revoke by token id")
            jti, room, name = str(body["jti"]), "*", ""
            until = float(body.get("until", time.time() + 30 * 86400))
        else:
            raise HttpError(400, "bad request", "body: {\"token\": ...} or {\"jti\": ..., \"until\": epoch}")
        await self.classroom.state.revoke(jti, until)
        await self.classroom.revoked(jti, room, name)
        logger.info("token %s (room=%s name=%s) revoked by %s", jti, room, name, claims.name)
        return web.json_response({"revoked": jti, "until": until})

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/ws/{room}", ws_handler)
        app.router.add_get("/api/timetable", self.list_timetable)
        app.router.add_post("/api/timetable", self.create_lessons)
        app.router.add_get("/api/lessons/{id}", self.get_lesson)
        app.router.add_put("/api/lessons/{id}", self.put_lesson)
        app.router.add_patch("/api/lessons/{id}", self.put_lesson)
        app.router.add_delete("/api/lessons/{id}", self.delete_lesson)
        app.router.add_post("/api/lessons/{id}/tokens", self.lesson_tokens)
        app.router.add_get("/api/lessons/{id}/attendance", self.attendance)
        app.router.add_get("/api/rooms/{room}/history", self.history)
        app.router.add_get("/api/rooms/{room}/classroom", self.snapshot)
        app.router.add_post("/api/rooms/{room}/kick", self.kick)
        app.router.add_post("/api/tokens/revoke", self.revoke)
        app.router.add_post("/api/recordings/{id}/watch", self.watch)
        app.router.add_get("/api/recordings/{id}/history", self.recording_history)


def node_id_for(config: Any) -> str:
    return getattr(config, "node_id", "") or f"{socket.gethostname()}:{config.port}"


def setup(app: web.Application) -> None:
    """Wire the classroom into ``app`` (after the room registry exists)."""
    config = app["config"]
    node_id = node_id_for(config)
    state = make_state(node_id, config.redis, config.data)
    timetable = Timetable(state)
    attendance = Attendance(state, node_id)
    classroom = Classroom(state, timetable, app["rooms"], attendance, HistoryLog(config.data))
    app["state"] = state
    app["timetable"] = timetable
    app["attendance"] = attendance
    app["classroom"] = classroom
    app.middlewares.append(gate_middleware)
    api = ClassroomApi(app)
    api.add_routes(app)

    async def on_startup(app: web.Application) -> None:
        await state.start()
        attendance.start()
        await classroom.start()
        logger.info("node=%s classroom up (state: %s)", node_id, "redis" if config.redis else "in-process")

    async def on_shutdown(app: web.Application) -> None:
        await classroom.close()

    async def on_cleanup(app: web.Application) -> None:
        # After every on_shutdown (the room registry ends its sessions there, which the
        # classroom and attendance still record), release the store.
        await classroom.drain()
        await attendance.close()
        await state.close()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    _wire_recorder(app, timetable, api)


def _wire_recorder(app: web.Application, timetable: Timetable, api: ClassroomApi) -> None:
    """Let the recorder name recordings after their lesson, and let replay pings find the
    lesson of a recording (for attendance), when the recorder is part of this app."""
    try:
        from skyclass.recordings.http import MANAGER_KEY
    except ImportError:
        return
    manager = app.get(MANAGER_KEY)
    if manager is None:
        return
    state = app["state"]
    if getattr(state, "redis", None) is not None:
        # Several nodes: one catalogue in the shared Redis (before the manager's start-up fills it).
        from skyclass.recordings.catalogue import RedisStore
        manager.store = RedisStore(state.redis, state.prefix)

    async def describe(room: str, started_at: float) -> Optional[dict]:
        lesson = await timetable.lesson_at(room, started_at)
        if lesson is None:
            return None
        return {"grade": lesson.grade, "subject": lesson.subject, "title": lesson.label, "lesson": lesson.id}

    async def recording_info(recording_id: str) -> Optional[Any]:
        return await manager.store.get(recording_id)

    async def recording_lesson(recording_id: str) -> Optional[str]:
        info = await manager.store.get(recording_id)
        if info is None:
            return None
        if getattr(info, "lesson", None):
            return str(info.lesson)
        lesson = await timetable.lesson_at(info.room, info.started_at)
        return scope_for(info.room, lesson, info.started_at)

    async def lesson_recordings(lesson: Lesson) -> list[Any]:
        return [info for info in await manager.store.list(room=lesson.room)
                if info.lesson == lesson.id or (not info.lesson and lesson.opens <= info.started_at < lesson.closes)]

    async def keep_history(info: Any, directory: Path) -> None:
        entries = await api.recording_entries(info)
        await asyncio.to_thread(write_recording_history, directory, entries)
        logger.info("room=%s recording=%s: %d Q&A entries kept with it", info.room, info.id, len(entries))

    if getattr(manager, "describe", None) is None:
        manager.describe = describe
    app["recording_lesson"] = recording_lesson
    app["recording_info"] = recording_info
    app["lesson_recordings"] = lesson_recordings
    app["recording_directory"] = lambda recording_id: manager.settings.root / recording_id
    manager.finished_hooks.append(keep_history)


__all__ = ["setup", "ClassroomApi", "ClassroomError"]
