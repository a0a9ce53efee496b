"""The catalogue of recordings: what a lesson was, stored beside its media and indexed for queries.

Each recording keeps its metadata in ``meta.json`` in its own directory, so the media and
the facts about it move, back up and survive restarts together. At start-up the directory
tree is read into a :class:`RecordingStore`. The store interface is deliberately narrow
(put, get, delete, list with filters): :class:`MemoryStore` on a single node, :class:`RedisStore`
when several nodes share one catalogue.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Protocol

from .playlist import write_atomic

logger = logging.getLogger(__name__)

META_NAME = "meta.json"
STATES = ("recording", "complete", "repaired")
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


@dataclass
class RecordingInfo:
    """One lesson's recording. Times are Unix seconds (like ``/api/rooms``' ``started_at``)."""

    id: str
    room: str
    title: str
    teacher: str
    started_at: float
    ended_at: Optional[float] = None
    duration: float = 0.0
    size: int = 0
    state: str = "recording"
    grade: Optional[str] = None
    subject: Optional[str] = None
    codecs: dict[str, str] = field(default_factory=dict)
    container: str = "fmp4"
    segments: int = 0
    lesson: Optional[str] = None  # the timetable's lesson id, when the lesson lookup knows it
    # Where the files are: the node that holds them and its base URL (multi-node catalogues
    # list every node's recordings; another node redirects replay requests there).
    node: Optional[str] = None
    origin: Optional[str] = None

    def public(self) -> dict:
        """The API's view: the stored fields plus where to play and download it."""
        data = asdict(self)
        data["playlist"] = f"/replay/{self.id}/index.m3u8"
        data["page"] = f"/replay/{self.id}"
        data["download"] = f"/replay/{self.id}.{'webm' if self.container == 'webm' else 'mp4'}"
        data["date"] = local_date(self.started_at)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "RecordingInfo":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def local_date(ts: float) -> str:
    """The lesson's calendar date in the server's time zone (the district's), YYYY-MM-DD."""
    return time.strftime("%Y-%m-%d", time.localtime(ts))


class RecordingStore(Protocol):
    """Where the catalogue is indexed. In-process today; Redis later, behind the same calls."""

    async def put(self, info: RecordingInfo) -> None: ...

    async def get(self, recording_id: str) -> Optional[RecordingInfo]: ...

    async def delete(self, recording_id: str) -> None: ...

    async def list(self, room: Optional[str] = None, grade: Optional[str] = None, subject: Optional[str] = None,
                   date: Optional[str] = None) -> list[RecordingInfo]: ...


class MemoryStore:
    """The embedded default: a dict, newest first on listing."""

    def __init__(self) -> None:
        self._items: dict[str, RecordingInfo] = {}

    async def put(self, info: RecordingInfo) -> None:
        self._items[info.id] = info

    async def get(self, recording_id: str) -> Optional[RecordingInfo]:
        return self._items.get(recording_id)

    async def delete(self, recording_id: str) -> None:
        self._items.pop(recording_id, None)

    async def list(self, room: Optional[str] = None, grade: Optional[str] = None, subject: Optional[str] = None,
                   date: Optional[str] = None) -> list[RecordingInfo]:
        return sorted((i for i in self._items.values() if _matches(i, room, grade, subject, date)),
                      key=lambda i: i.started_at, reverse=True)


class RedisStore:
    """The catalogue of a multi-node deployment, in the Redis every node shares: each node puts
    the recordings it holds (with its ``node`` and ``origin``), and any node lists them all.

    ``{prefix}rec`` is a hash id → JSON entry; ``{prefix}rec:start`` orders ids by start time and
    ``{prefix}rec:room:{room}`` does the same per room, so the common queries ("this room's
    lessons", "the newest") read only the entries they return.
    """

    def __init__(self, redis: Any, prefix: str = "skyclass:") -> None:
        self.redis = redis
        self.key = prefix + "rec"
        # Writes one at a time, in call order: two puts of the same recording on two pooled
        # connections could reach Redis in either order, and a "recording" snapshot landing
        # after "complete" would leave the lesson unfinished in the catalogue.
        self._lock: Optional[asyncio.Lock] = None

    @property
    def _writing(self) -> asyncio.Lock:
        if self._lock is None:  # made on first use, inside the loop that runs the store
            self._lock = asyncio.Lock()
        return self._lock

    async def put(self, info: RecordingInfo) -> None:
        async with self._writing:
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(self.key, info.id, json.dumps(asdict(info), separators=(",", ":")))
            pipe.zadd(self.key + ":start", {info.id: info.started_at})
            pipe.zadd(f"{self.key}:room:{info.room}", {info.id: info.started_at})
            await pipe.execute()

    async def get(self, recording_id: str) -> Optional[RecordingInfo]:
        raw = await self.redis.hget(self.key, recording_id)
        return RecordingInfo.from_dict(json.loads(raw)) if raw else None

    async def delete(self, recording_id: str) -> None:
        async with self._writing:
            info = await self.get(recording_id)
            pipe = self.redis.pipeline(transaction=True)
            pipe.hdel(self.key, recording_id)
            pipe.zrem(self.key + ":start", recording_id)
            if info is not None:
                pipe.zrem(f"{self.key}:room:{info.room}", recording_id)
            await pipe.execute()

    async def list(self, room: Optional[str] = None, grade: Optional[str] = None, subject: Optional[str] = None,
                   date: Optional[str] = None) -> list[RecordingInfo]:
        index = f"{self.key}:room:{room}" if room is not None else self.key + ":start"
        if date is not None:
            # the day in local time, padded a day each way (time zones), then filtered exactly
            day = time.mktime(time.strptime(date, "%Y-%m-%d"))
            ids = await self.redis.zrevrangebyscore(index, day + 2 * 86400, day - 86400)
        else:
            ids = await self.redis.zrevrange(index, 0, -1)
        if not ids:
            return []
        raws = await self.redis.hmget(self.key, ids)
        infos = [RecordingInfo.from_dict(json.loads(raw)) for raw in raws if raw]
        return [i for i in infos if _matches(i, room, grade, subject, date)]


def _matches(info: RecordingInfo, room: Optional[str], grade: Optional[str], subject: Optional[str],
             date: Optional[str]) -> bool:
    return ((room is None or info.room == room)
            and (grade is None or (info.grade or "").lower() == grade.lower())
            and (subject is None or (info.subject or "").lower() == subject.lower())
            and (date is None or local_date(info.started_at) == date))


_GRADE = re.compile(r"^(?:grade|g|year|y)(\d{1,2})$", re.IGNORECASE)


def classify_room(room: str, claims: Optional[dict] = None) -> tuple[Optional[str], Optional[str], str]:
    """(grade, subject, title) for a lesson.

    The teacher's token may say them (``grade``, ``subject``, ``title`` claims); otherwise
    they come from the room's name, which the timetable spells ``grade7-maths`` (also
    ``g7_maths``, ``maths-grade7``): a ``grade<N>``/``g<N>`` part gives the grade, the other
    parts the subject. A room named otherwise has no grade or subject, and its name is the title.
    """
    claims = claims or {}
    grade = claims.get("grade")
    subject = claims.get("subject")
    if grade is None or subject is None:
        parts = [p for p in re.split(r"[-_.\s]+", room) if p]
        found_grade = None
        rest = []
        for part in parts:
            match = _GRADE.match(part)
            if match and found_grade is None:
                found_grade = str(int(match.group(1)))
            else:
                rest.append(part)
        if found_grade is not None:
            grade = grade if grade is not None else found_grade
            if subject is None and rest:
                subject = "-".join(rest).lower()
    grade = str(grade) if grade is not None else None
    subject = str(subject) if subject is not None else None
    title = claims.get("title")
    if not title:
        if subject and grade:
            title = f"{subject.replace('-', ' ').capitalize()}, grade {grade}"
        else:
            title = room
    return grade, subject, str(title)


def save_meta(directory: Path, info: RecordingInfo) -> None:
    write_atomic(directory / META_NAME, json.dumps(asdict(info), indent=1).encode())


def load_meta(directory: Path) -> Optional[RecordingInfo]:
    try:
        data = json.loads((directory / META_NAME).read_text())
        info = RecordingInfo.from_dict(data)
    except (OSError, ValueError, TypeError) as exc:
        logger.warning("recording dir %s: unreadable %s (%s)", directory, META_NAME, exc)
        return None
    if info.id != directory.name or not ID_PATTERN.match(info.id):
        logger.warning("recording dir %s: id %r does not match its directory", directory, info.id)
        return None
    return info
