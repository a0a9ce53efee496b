"""The district's timetable: lessons, when their rooms open, who may join them.

A lesson says which room it uses, for whom (the audience: every student of a grade in
the district, one school's grade, or one class), who teaches it and when. A timetabled
room opens for joining ``OPEN_BEFORE`` seconds before its start and closes
``CLOSE_AFTER`` seconds after its end; rooms that are not in the timetable stay open
(ad-hoc rooms and the demo room keep working as before).

Lessons are loaded from CSV or TOML (``skyclass timetable import``) and edited through
the API; they live in the shared state store, and each node caches them keyed by the
store's timetable version so a WHEP join costs one tiny read, not a timetable load.
"""

from __future__ import annotations

import csv
import io
import re
import time
import tomllib
from dataclasses import asdict, dataclass, field
from datetime import date as Date
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Iterable, Optional

from .state import State
from .tokens import Claims

VERSION_CHECK_INTERVAL = 1.0  # seconds: how stale another node's (or the CLI's) edit may look here
OPEN_BEFORE = 10 * 60
CLOSE_AFTER = 15 * 60
KINDS = ("lesson", "qa", "tutoring")
AUDIENCES = ("district", "school", "class")
ROOM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
FIELDS = ("id", "date", "start", "end", "room", "grade", "subject", "kind", "audience", "school", "class",
          "teacher", "title")


class TimetableError(ValueError):
    """A lesson or a timetable file is invalid; the message says where and why."""


@dataclass
class Lesson:
    id: str
    room: str
    grade: str
    subject: str
    kind: str
    audience: str
    teacher: str
    start: float  # epoch seconds
    end: float
    school: str = ""
    klass: str = ""  # "class" in files and JSON
    title: str = ""
    opens: float = field(init=False)
    closes: float = field(init=False)

    def __post_init__(self) -> None:
        self.opens = self.start - OPEN_BEFORE
        self.closes = self.end + CLOSE_AFTER

    def is_open(self, now: Optional[float] = None) -> bool:
        now = time.time() if now is None else now
        return self.opens <= now < self.closes

    @property
    def label(self) -> str:
        return self.title or f"Grade {self.grade} {self.subject}".strip()

    def to_json(self) -> dict:
        out = asdict(self)
        out["class"] = out.pop("klass")
        out["start_iso"] = _iso(self.start)
        out["end_iso"] = _iso(self.end)
        return out

    def admits_student(self, claims: Claims) -> Optional[str]:
        """None if this student may join, else why not.

        A token for this very room always may; a token for every room ("*") must match
        the lesson's audience through its school/grade/class claims.
        """
        if claims.room == self.room:
            return None
        if claims.room != "*":
            return f"token is for room {claims.room!r}, not {self.room!r}"
        extra = claims.extra
        grade, school, klass = str(extra.get("grade", "")), str(extra.get("school", "")), str(extra.get("class", ""))
        if self.grade and grade != self.grade:
            return f"lesson {self.id} is for grade {self.grade}"
        if self.audience in ("school", "class") and self.school and school != self.school:
            return f"lesson {self.id} is for school {self.school}"
        if self.audience == "class" and klass != self.klass:
            return f"lesson {self.id} is for class {self.klass}"
        return None


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="minutes")


def _parse_time(value: Any, day: Optional[Date], where: str) -> float:
    """'08:00' on ``day`` (local time), an ISO datetime, a TOML datetime or epoch seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.astimezone()).timestamp()
    text = str(value).strip()
    if re.fullmatch(r"\d{1,2}:\d{2}(:\d{2})?", text):
        if day is None:
            raise TimetableError(f"{where}: time {text!r} needs a date (a 'date' column or --date)")
        parts = [int(p) for p in text.split(":")]
        moment = datetime(day.year, day.month, day.day, parts[0], parts[1], parts[2] if len(parts) > 2 else 0)
        return moment.astimezone().timestamp()
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise TimetableError(f"{where}: cannot read time {text!r} (use HH:MM or an ISO date-time)") from exc
    return (moment if moment.tzinfo else moment.astimezone()).timestamp()


def _parse_date(value: Any, where: str) -> Optional[Date]:
    if value in (None, ""):
        return None
    if isinstance(value, Date):
        return value
    try:
        return Date.fromisoformat(str(value).strip())
    except ValueError as exc:
        raise TimetableError(f"{where}: cannot read date {value!r} (use YYYY-MM-DD)") from exc


def lesson_from_dict(row: dict, default_day: Optional[Date] = None, where: str = "lesson") -> Lesson:
    """Validate one lesson from a file row, a TOML table or an API body."""
    row = {str(k).strip().lower(): v for k, v in row.items() if k is not None}
    unknown = set(row) - set(FIELDS) - {"start_iso", "end_iso", "opens", "closes"}
    if unknown:
        raise TimetableError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")

    def text(name: str, required: bool = True) -> str:
        value = row.get(name)
        value = "" if value is None else str(value).strip()
        if required and not value:
            raise TimetableError(f"{where}: '{name}' is required")
        if len(value) > 120:
            raise TimetableError(f"{where}: '{name}' is too long (at most 120 characters)")
        return value

    day = _parse_date(row.get("date"), where) or default_day
    start = _parse_time(row.get("start") if row.get("start") not in (None, "") else _missing(where, "start"), day, where)
    end = _parse_time(row.get("end") if row.get("end") not in (None, "") else _missing(where, "end"), day, where)
    if end <= start:
        raise TimetableError(f"{where}: end must be after start")
    if end - start > 24 * 3600:
        raise TimetableError(f"{where}: a lesson lasts at most 24 hours")
    room = text("room")
    if not ROOM_RE.match(room):
        raise TimetableError(f"{where}: room {room!r} must be letters, digits, '.', '_' or '-' (at most 64)")
    kind = text("kind", required=False) or "lesson"
    if kind not in KINDS:
        raise TimetableError(f"{where}: kind {kind!r} must be one of {', '.join(KINDS)}")
    audience = text("audience", required=False) or "district"
    if audience not in AUDIENCES:
        raise TimetableError(f"{where}: audience {audience!r} must be one of {', '.join(AUDIENCES)}")
    school, klass = text("school", False), text("class", False)
    if audience in ("school", "class") and not school:
        raise TimetableError(f"{where}: audience {audience} needs a 'school'")
    if audience == "class" and not klass:
        raise TimetableError(f"{where}: audience class needs a 'class'")
    lesson_id = text("id", required=False)
    if not lesson_id:
        stamp = datetime.fromtimestamp(start).strftime("%Y-%m-%dT%H%M")
        lesson_id = f"{stamp}-{room}"
    if not ROOM_RE.match(lesson_id):
        raise TimetableError(f"{where}: id {lesson_id!r} must be letters, digits, '.', '_' or '-'")
    return Lesson(id=lesson_id, room=room, grade=text("grade", False), subject=text("subject"), kind=kind,
                  audience=audience, teacher=text("teacher"), start=start, end=end, school=school, klass=klass,
                  title=text("title", False))


def _missing(where: str, name: str) -> Any:
    raise TimetableError(f"{where}: '{name}' is required")


def parse_csv(text: str, default_day: Optional[Date] = None) -> list[Lesson]:
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None:
        raise TimetableError("empty CSV: expected a header row")
    lessons = []
    for row in reader:
        if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
            continue
        if None in row:
            raise TimetableError(f"line {reader.line_num}: more values than columns")
        lessons.append(lesson_from_dict(row, default_day, f"line {reader.line_num}"))
    return lessons


def parse_toml(text: str, default_day: Optional[Date] = None) -> list[Lesson]:
    """``date = 2025-03-03`` at the top (optional) and one ``[[lesson]]`` table per lesson."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TimetableError(f"TOML: {exc}") from exc
    day = _parse_date(doc.get("date"), "TOML 'date'") or default_day
    tables = doc.get("lesson", doc.get("lessons", []))
    if not isinstance(tables, list):
        raise TimetableError("TOML: expected [[lesson]] tables")
    return [lesson_from_dict(t, day, f"[[lesson]] #{i + 1}") for i, t in enumerate(tables)]


def parse_file(path: Path, default_day: Optional[Date] = None) -> list[Lesson]:
    text = path.read_text(encoding="utf-8-sig")
    lessons = parse_toml(text, default_day) if path.suffix.lower() == ".toml" else parse_csv(text, default_day)
    check_overlaps(lessons)
    return lessons


def check_overlaps(lessons: Iterable[Lesson]) -> None:
    """A room holds one lesson at a time (windows included), else joining would be ambiguous."""
    by_room: dict[str, list[Lesson]] = {}
    for lesson in lessons:
        by_room.setdefault(lesson.room, []).append(lesson)
    for room, items in by_room.items():
        items.sort(key=lambda l: l.start)
        for a, b in zip(items, items[1:]):
            if b.opens < a.closes and a.id != b.id:
                raise TimetableError(f"room {room}: lessons {a.id} and {b.id} overlap (with the "
                                     f"{OPEN_BEFORE // 60} min before / {CLOSE_AFTER // 60} min after windows)")


def lesson_from_json(data: dict) -> Lesson:
    return Lesson(id=data["id"], room=data["room"], grade=data.get("grade", ""), subject=data["subject"],
                  kind=data["kind"], audience=data["audience"], teacher=data["teacher"], start=float(data["start"]),
                  end=float(data["end"]), school=data.get("school", ""), klass=data.get("class", ""),
                  title=data.get("title", ""))


def day_bounds(day: Date) -> tuple[float, float]:
    start = datetime(day.year, day.month, day.day).astimezone()
    return start.timestamp(), (start + timedelta(days=1)).timestamp()


class Timetable:
    """A node's view of the timetable in the store, reloaded only when its version changes."""

    def __init__(self, state: State) -> None:
        self.state = state
        self._version: Optional[str] = None
        self._checked_at = float("-inf")
        self._lessons: dict[str, Lesson] = {}
        self._by_room: dict[str, list[Lesson]] = {}

    async def refresh(self, force: bool = False) -> None:
        """Reload when the store's version changed; the version itself is read at most every
        VERSION_CHECK_INTERVAL (a join burst would otherwise read it several times per student)."""
        now = time.monotonic()
        if not force and now - self._checked_at < VERSION_CHECK_INTERVAL:
            return
        self._checked_at = now
        version = await self.state.timetable_version()
        if version == self._version:
            return
        lessons = {}
        for raw in await self.state.lessons():
            try:
                lesson = lesson_from_json(raw)
            except (KeyError, TypeError, ValueError):
                continue
            lessons[lesson.id] = lesson
        by_room: dict[str, list[Lesson]] = {}
        for lesson in sorted(lessons.values(), key=lambda l: l.start):
            by_room.setdefault(lesson.room, []).append(lesson)
        self._lessons, self._by_room, self._version = lessons, by_room, version

    async def all(self) -> list[Lesson]:
        await self.refresh()
        return sorted(self._lessons.values(), key=lambda l: (l.start, l.room))

    async def get(self, lesson_id: str) -> Optional[Lesson]:
        await self.refresh()
        return self._lessons.get(lesson_id)

    async def on_day(self, day: Date) -> list[Lesson]:
        lo, hi = day_bounds(day)
        return [l for l in await self.all() if l.start < hi and l.end > lo]

    async def governs(self, room: str) -> bool:
        """True if the room is timetabled at all (then it is closed outside its lessons)."""
        await self.refresh()
        return room in self._by_room

    async def current(self, room: str, now: Optional[float] = None) -> Optional[Lesson]:
        """The lesson whose window is open in ``room`` now."""
        await self.refresh()
        now = time.time() if now is None else now
        for lesson in self._by_room.get(room, ()):
            if lesson.is_open(now):
                return lesson
        return None

    async def lesson_at(self, room: str, when: float) -> Optional[Lesson]:
        """The lesson whose window held ``when`` in ``room`` (a recording's start, say)."""
        return await self.current(room, when)

    def cached_lessons(self) -> list[Lesson]:
        return list(self._lessons.values())

    async def closed_reason(self, room: str, now: Optional[float] = None) -> Optional[str]:
        """None if ``room`` may be joined now; else a reason naming the next (or last) lesson."""
        await self.refresh()
        lessons = self._by_room.get(room)
        if not lessons:
            return None
        now = time.time() if now is None else now
        if any(l.is_open(now) for l in lessons):
            return None
        upcoming = [l for l in lessons if l.opens > now]
        if upcoming:
            nxt = upcoming[0]
            return (f"room {room} is closed: {nxt.label} ({_iso(nxt.start)}) opens at {_iso(nxt.opens)}")
        last = lessons[-1]
        return f"room {room} is closed: {last.label} ended at {_iso(last.end)}"

    async def save(self, lessons: list[Lesson], replace: bool = False) -> None:
        """Store lessons (upsert by id) after checking they do not collide with the rest."""
        await self.refresh(force=True)
        existing = [] if replace else [l for l in await self.all() if l.id not in {x.id for x in lessons}]
        check_overlaps(existing + lessons)
        await self.state.put_lessons([l.to_json() for l in lessons], replace=replace)
        await self.refresh(force=True)

    async def delete(self, lesson_id: str) -> bool:
        removed = await self.state.delete_lesson(lesson_id)
        await self.refresh(force=True)
        return removed


def scope_for(room: str, lesson: Optional[Lesson], now: Optional[float] = None) -> str:
    """The key a lesson's questions and attendance live under: the lesson id, or
    ``room@YYYY-MM-DD`` for a room outside the timetable."""
    if lesson is not None:
        return lesson.id
    now = time.time() if now is None else now
    return f"{room}@{datetime.fromtimestamp(now).strftime('%Y-%m-%d')}"
